"""``bench/diskusage.py``: disk usage of a CSV tree and real-capture rates for the
operations guide."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"

# bench/ is a folder of scripts, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location(
    "bench_diskusage", TESTS.parent / "bench/diskusage.py"
)
assert _spec is not None and _spec.loader is not None
diskusage = sys.modules["bench_diskusage"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diskusage)  # registered first: msgspec resolves its annotations
capture_rates, render_usage, usage = (
    diskusage.capture_rates,
    diskusage.render_usage,
    diskusage.usage,
)


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
    rates = capture_rates(capture)
    # depth@100ms: at most 10 events per second; the README's 3449 applied diffs + 2 dropped.
    assert 9.0 < rates["depth_events"] <= 10.05
    assert round(rates["depth_events"] * rates["seconds"]) == 3451
    assert rates["depth_rows"] > rates["depth_events"] and rates["trades"] > 0
