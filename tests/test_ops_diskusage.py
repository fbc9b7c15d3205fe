"""Disk usage of a CSV tree and real-capture rates for the operations guide."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from streamer.core.ops.diskusage import capture_rates, render_usage, usage

DATA = Path(__file__).resolve().parents[1].parent / "shared/research/data"


def test_usage_sums_files_bytes_and_rows_per_kind_and_symbol(tmp_path: Path):
    trades = tmp_path / "binance/spot/aggTrades/BTCUSDT"
    trades.mkdir(parents=True)
    (trades / "BTCUSDT-aggTrades-2026-11-24.csv").write_text("h\n1\n2\n")
    (trades / "BTCUSDT-aggTrades-2026-11-25.csv").write_text("h\n3\n")
    klines = tmp_path / "binance/spot/klines/BTCUSDT/1m"
    klines.mkdir(parents=True)
    with gzip.open(klines / "BTCUSDT-1m-2026-11-25.csv.gz", "wb") as f:
        f.write(b"h\n1\n2\n3\n")
    (tmp_path / "README.txt").write_text("not data")
    rows = {(u.kind, u.symbol): u for u in usage(tmp_path)}
    assert set(rows) == {("aggTrades", "BTCUSDT"), ("klines", "BTCUSDT")}
    assert (rows["aggTrades", "BTCUSDT"].files, rows["aggTrades", "BTCUSDT"].rows) == (2, 3)
    assert rows["aggTrades", "BTCUSDT"].bytes == 10
    assert rows["klines", "BTCUSDT"].rows == 3
    table = render_usage(list(rows.values()), seconds=86_400 / 2)
    assert table.splitlines()[1].split()[:4] == ["aggTrades", "BTCUSDT", "2", "3"]
    assert table.splitlines()[1].endswith("20 B")  # 10 bytes in half a day


def test_capture_rates_of_the_real_spot_btcusdt_recording():
    capture = DATA / "hftbacktest_examples/spot_btcusdt_20240808.gz"
    if not capture.is_file():
        pytest.skip(f"shared captures not available at {capture}")
    rates = capture_rates(capture)
    # depth@100ms: at most 10 events per second; the README's 3449 applied diffs + 2 dropped.
    assert 9.0 < rates["depth_events"] <= 10.05
    assert round(rates["depth_events"] * rates["seconds"]) == 3451
    assert rates["depth_rows"] > rates["depth_events"] and rates["trades"] > 0
