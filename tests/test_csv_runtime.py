"""The csv sink inside the real runtime: a writer process, holdings, resume without duplicates."""

from __future__ import annotations

import csv
import gzip
import io
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import load_status, start_streamer, synth_config, wait_for

from streamer.core.config import parse_config
from streamer.core.runtime import read_status, run

SYMBOLS = ["AAA", "BBB", "CCC", "DDD"]


def run_with_csv(tmp_path: Path, duration: float) -> tuple[int, dict]:
    data = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv"), "flush_interval": "200ms"}},
        pipeline={"sinks": ["files"]},
    )
    code = run(
        parse_config(data), ["csv"], extra_plugin_modules=["core_plugins"], duration=duration
    )
    return code, read_status(tmp_path / "state")


def ids_on_disk(root: Path) -> dict[str, list[int]]:
    """aggTrade ids per symbol, checking that every row is whole (9 columns off spot)."""
    out = {}
    for symbol in SYMBOLS:
        ids = []
        for path in sorted((root / "synth/test/aggTrades" / symbol).iterdir()):
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()
            assert text.endswith("\n")
            rows = list(csv.reader(io.StringIO(text)))
            assert rows[0][0] == "agg_trade_id" and all(len(r) == 9 for r in rows)
            ids += [int(r[0]) for r in rows[1:]]
        out[symbol] = ids
    return out


def test_runtime_writes_csv_and_resumes_from_its_holdings(tmp_path: Path) -> None:
    code, status = run_with_csv(tmp_path, duration=1.5)
    assert code == 0
    first = ids_on_disk(tmp_path / "csv")
    for ids in first.values():
        assert len(ids) > 10 and ids == list(range(ids[0], ids[0] + len(ids)))
    assert status["sinks"]["files"]["totals"]["rows_written"] == sum(map(len, first.values()))
    time.sleep(0.3)  # trades keep happening while nothing runs
    code, status = run_with_csv(tmp_path, duration=1.5)
    assert code == 0
    both = ids_on_disk(tmp_path / "csv")
    for symbol, ids in both.items():
        # Resumed where the files ended (backfilled from the holdings): no gap, no duplicate.
        assert ids[: len(first[symbol])] == first[symbol]
        assert ids == list(range(ids[0], ids[0] + len(ids))) and len(ids) > len(first[symbol])
    assert status["sinks"]["files"]["totals"].get("rows_duplicate", 0) == 0


def _rows_written(status: dict | None) -> int:
    if not status:
        return 0
    return status["sinks"].get("files", {}).get("totals", {}).get("rows_written", 0)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_writer_sigkill_then_restart_leaves_whole_rows_and_no_duplicates(
    tmp_path: Path, write_config, gz: bool
) -> None:
    config = write_config(
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv"), "gzip": gz,
                         "flush_interval": "100ms"}},
        pipeline={"sinks": ["files"]},
    )  # fmt: skip
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    try:
        status = wait_for(
            lambda: (s := load_status(state)) and _rows_written(s) > 300 and s,
            what="rows written",
        )
        victim = status["children"]["sink.files"]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                (s := load_status(state))
                and s["children"]["sink.files"]["restarts"] == 1
                and s["children"]["sink.files"]["alive"]
                and _rows_written(s) > 300
            ),
            what="writer restarted and writing",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    for symbol, ids in ids_on_disk(tmp_path / "csv").items():
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"gap or duplicate in {symbol}"
