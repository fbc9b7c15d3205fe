"""CSV sink faults of issue 11: folders deleted while running (2), rows lost at close (3),
and the gzip level range (14)."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, load_status, start_streamer, subprocess_env, synth_config, wait_for
from test_csv_faults import FaultyIO, make_sink, rows_of, trade_file, trades

from streamer.core.records import Kline
from streamer.plugins.sinks.csv_batch import Options

PLUGINS = "core_plugins,sink_fault_plugins"
T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC


def ids_in(path: Path) -> list[int]:
    return [int(r[0]) for r in rows_of(path)[1:]]


def marker_rows(root: Path, symbol: str, market: str = "usdm") -> list[list[str]]:
    folder = root / f"binance/{market}/markers/{symbol}"
    return [row for p in sorted(folder.iterdir()) for row in rows_of(p)[1:]]


@pytest.mark.parametrize("what", ["symbol folder", "whole tree"])
def test_deleted_folders_are_recreated_and_no_row_is_lost(tmp_path: Path, what: str) -> None:
    root = tmp_path / "csv"
    sink, counters = make_sink(root)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 5))
        await sink.flush()
        shutil.rmtree(root / "binance/usdm/aggTrades/BTCUSDT" if what != "whole tree" else root)
        await sink.write(trades("BTCUSDT", 6, 5))
        await sink.flush()
        assert sink.pending_rows == 0
        await sink.write(trades("BTCUSDT", 11, 5))
        await sink.close()

    asyncio.run(scenario())
    assert ids_in(trade_file(root)) == list(range(6, 16))  # 1-5 went with the folder
    assert sink.pending_rows == 0
    assert counters.get("dirs_recreated") == 1
    assert counters.total("rows_dropped") == 0
    assert counters.total("write_errors") == 0


class AggTradesFail(FaultyIO):
    """Writes to aggTrades files fail (permission denied); markers still work."""

    def __init__(self) -> None:
        super().__init__()
        self.deny = False

    def open(self, path: str) -> int:
        if self.deny and "aggTrades" in path:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return super().open(path)

    def write(self, fd: int, data: bytes) -> None:
        if self.deny and "aggTrades" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        super().write(fd, data)


def kline(open_time: int) -> Kline:
    return Kline("binance", "usdm", "ETHUSDT", "1m", open_time, open_time + 59_999, "1", "2",
                 "0.5", "1.5", "10", "15", 3, "4", "6", True, open_time + 60_000,
                 open_time + 60_001)  # fmt: skip


def test_rows_unwritten_at_close_are_counted_and_recorded_as_gap_markers(tmp_path: Path) -> None:
    fio = AggTradesFail()
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 5))
        await sink.write([kline(T0)])
        await sink.flush()
        fio.deny = True
        await sink.write(trades("BTCUSDT", 6, 10))
        await sink.write(trades("SOLUSDT", 100, 3))
        await sink.write([kline(T0 + 60_000)])
        await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    assert ids_in(trade_file(tmp_path)) == [1, 2, 3, 4, 5]
    # After close, pending_rows is exactly what was lost; the kline was written.
    assert sink.pending_rows == 13
    assert counters.get("rows_dropped", "BTCUSDT", "aggtrade") == 10
    assert counters.get("rows_dropped", "SOLUSDT", "aggtrade") == 3
    assert counters.get("rows_dropped", "ETHUSDT", "kline_1m") == 0
    gaps = {sym: marker_rows(tmp_path, sym) for sym in ("BTCUSDT", "SOLUSDT")}
    for symbol, (first, last) in {"BTCUSDT": (6, 15), "SOLUSDT": (100, 102)}.items():
        [row] = gaps[symbol]
        assert row[1:5] == ["aggtrade", "gap", str(first), str(last)]
        assert row[5].startswith("not written before exit: permission denied")
    assert counters.get("gap_markers") == 2


def test_overflow_gaps_still_unreported_at_close_are_written(tmp_path: Path) -> None:
    fio = AggTradesFail()
    sink, counters = make_sink(tmp_path, fio, max_buffered_rows=4, flush_rows=2)

    async def scenario():
        fio.deny = True
        await sink.write(trades("BTCUSDT", 1, 10))  # 4 kept for retry, 6 dropped
        await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    assert sink.pending_rows == 4
    rows = marker_rows(tmp_path, "BTCUSDT")
    ranges = sorted((int(r[3]), int(r[4])) for r in rows)
    assert ranges == [(1, 4), (5, 10)]  # the lost retry buffer and the overflow
    assert counters.total("rows_dropped") == 10


def _rows_written(state: Path) -> int:
    status = load_status(state)
    if not status:
        return 0
    return status["sinks"].get("files", {}).get("totals", {}).get("rows_written", 0)


def _write_errors(state: Path) -> int:
    status = load_status(state)
    if not status:
        return 0
    return status["sinks"].get("files", {}).get("totals", {}).get("write_errors", 0)


def synth_ids(root: Path, symbol: str) -> list[int]:
    folder = root / "synth/test/aggTrades" / symbol
    return [i for p in sorted(folder.iterdir()) for i in ids_in(p)]


def run_config(tmp_path: Path, sink_type: str) -> Path:
    cfg = synth_config(
        tmp_path,
        sinks={"files": {"type": sink_type, "path": str(tmp_path / "csv"),
                         "flush_interval": "100ms"}},
        pipeline={"sinks": ["files"]},
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rows_lost_at_close_make_the_run_exit_non_zero_and_the_next_run_sees_them(
    tmp_path: Path,
) -> None:
    config = run_config(tmp_path, "csvfail")
    state = tmp_path / "state"
    proc = start_streamer(
        ["run", "--config", str(config)], cwd=tmp_path, STREAMER_PLUGIN_MODULES=PLUGINS
    )
    try:
        wait_for(lambda: _rows_written(state) > 100, what="rows written")
        (tmp_path / "csv.fail").touch()  # aggTrades writes now fail (EACCES)
        wait_for(lambda: _write_errors(state) > 2, what="write errors")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    [line] = [x for x in err.splitlines() if "rows could not be written before exit" in x]
    lost = int(re.search(r"(\d+) rows could not be written", line).group(1))
    assert lost > 0 and f"(sinks.files: {lost})" in line
    assert "stopped cleanly" not in err
    status = load_status(state)
    assert status["exit_code"] == 1
    assert status["sinks"]["files"]["totals"]["rows_lost_at_close"] == lost
    # Every lost range is a gap marker in the tree, where the next run sees it.
    symbols = ("AAA", "BBB", "CCC", "DDD")
    total = 0
    for symbol in symbols:
        folder = tmp_path / "csv/synth/test/markers" / symbol
        rows = [row for p in sorted(folder.glob("*.csv")) for row in rows_of(p)[1:]]
        [gap] = [r for r in rows if r[2] == "gap" and r[5].startswith("not written before exit")]
        # The lost range starts right after the last row on disk.
        on_disk = synth_ids(tmp_path / "csv", symbol)
        assert not on_disk or int(gap[3]) == on_disk[-1] + 1
        total += int(gap[4]) - int(gap[3]) + 1
    assert total == lost
    # The next run (writes work again) backfills the lost ranges from its holdings.
    (tmp_path / "csv.fail").unlink()
    proc = start_streamer(
        ["run", "--config", str(config), "--duration", "1"],
        cwd=tmp_path,
        STREAMER_PLUGIN_MODULES=PLUGINS,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for symbol in symbols:
        ids = synth_ids(tmp_path / "csv", symbol)
        assert ids == list(range(ids[0], ids[0] + len(ids))), symbol


def test_deleting_the_data_dir_during_a_run_loses_nothing_after_it(tmp_path: Path) -> None:
    config = run_config(tmp_path, "csv")
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    try:
        wait_for(lambda: _rows_written(state) > 100, what="rows written")
        # rm -rf, without racing the writer's re-creation inside the tree being removed.
        os.rename(tmp_path / "csv", tmp_path / "trash")
        shutil.rmtree(tmp_path / "trash")
        written = _rows_written(state)
        wait_for(
            lambda: (
                (tmp_path / "csv/synth/test/aggTrades/AAA").is_dir()
                and _rows_written(state) > written + 100
            ),
            what="writing again after the data dir was deleted",
        )
        # The lock went with the deleted tree and was taken again: still one collector.
        second = subprocess.run(
            [sys.executable, "-m", "streamer", "run", "--config", str(config),
             "--state-dir", str(tmp_path / "state2")],
            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1 and "is in use by pid" in second.stderr, second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    status = load_status(state)
    totals = status["sinks"]["files"]["totals"]
    assert totals["dirs_recreated"] >= 1
    assert totals.get("rows_lost_at_close", 0) == 0 and totals.get("write_errors", 0) == 0
    for symbol in ("AAA", "BBB", "CCC", "DDD"):
        ids = synth_ids(tmp_path / "csv", symbol)
        assert len(ids) > 10 and ids == list(range(ids[0], ids[0] + len(ids))), symbol


def test_gzip_level_range_is_the_one_the_readme_states() -> None:
    readme = (REPO / "README.md").read_text()
    [line] = [x for x in readme.splitlines() if x.startswith("| `gzip_level` |")]
    low, high = map(int, re.search(r"(\d+) \([a-z ]+\) to (\d+)", line).groups())
    for level in (low, high):
        Options(path="x", gzip_level=level)
    for level in (low - 1, high + 1):
        with pytest.raises(ValueError, match=f"between {low} and {high}"):
            Options(path="x", gzip_level=level)
