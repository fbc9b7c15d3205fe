"""The csv sink inside the real runtime: a writer process, holdings, resume without duplicates."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from conftest import synth_config

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
    out = {}
    for symbol in SYMBOLS:
        ids = []
        for path in sorted((root / "synth/test/aggTrades" / symbol).iterdir()):
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            assert rows[0][0] == "agg_trade_id"
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
