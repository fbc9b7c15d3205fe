"""A sink running as several writer processes, each owning a stable partition of the symbols.

Partitioning (``writer_of``: crc32 of the symbol's UTF-8 modulo N) is stable across
processes and hash seeds and puts every symbol in exactly one writer; the worker splits
each batch by it; ``writers: N`` is validated alike by ``config check`` and ``run``; a run
with three writers writes byte-identical files to one writer fed the same records; and
SIGKILL of one of three writers mid-run is repaired without a gap or a duplicate.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import load_status, start_streamer, synth_config, wait_for
from test_core_cli import assert_one_line_error, invoke, write_yaml

from streamer.core.api import SinkContext, writer_of
from streamer.core.config import ConfigError, effective_config, parse_config, validate_components
from streamer.core.counters import Counters
from streamer.core.plugins import Registry, make_plugin_manager
from streamer.core.runtime import PipelinePlan, PluginSelection, auto_writers, plan_writers
from streamer.core.runtime.bootstrap import ChildSpec
from streamer.core.runtime.supervisor import Supervisor
from streamer.core.runtime.worker import Worker

pytest.importorskip("streamer.testing.sim", reason="the simulator is not available")

# Over three writers these fall in partitions 0, 0, 2, 1 (checked below): every writer works.
SIM_SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "XRPUSDT"]


# -- partitioning ---------------------------------------------------------------------------
def test_partition_is_crc32_of_the_symbol_and_the_same_in_another_process() -> None:
    symbols = [f"S{i}USDT" for i in range(500)] + SIM_SYMBOLS + ["", "ÄÖÜ"]
    for n in (1, 2, 3, 7):
        mine = [writer_of(s, n) for s in symbols]
        assert mine == [zlib.crc32(s.encode("utf-8")) % n for s in symbols]
    assert [writer_of(s, 3) for s in SIM_SYMBOLS] == [0, 0, 2, 1]
    # Another interpreter with another hash seed agrees (Python's hash() would not).
    code = (
        "import sys; from streamer.core.api import writer_of; "
        "print([writer_of(s, 7) for s in sys.argv[1:]])"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code, *symbols],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == str([writer_of(s, 7) for s in symbols])


@pytest.mark.parametrize("writers", [1, 2, 3, 5])
def test_every_symbol_is_owned_by_exactly_one_writer(writers: int) -> None:
    contexts = [
        SinkContext(
            name="csv", counters=Counters(), logger=logging.getLogger("t"), writer=i,
            writers=writers,
        )
        for i in range(writers)
    ]  # fmt: skip
    symbols = [f"X{i}" for i in range(2000)]
    for symbol in symbols:
        assert sum(c.owns(symbol) for c in contexts) == 1
    if writers > 1:  # and the load is spread (no writer is left without symbols)
        counts = [sum(c.owns(s) for s in symbols) for c in contexts]
        assert min(counts) > 2000 / writers / 2


def test_the_worker_splits_a_batch_by_writer_keeping_order(tmp_path: Path) -> None:
    from core_plugins import make_trade

    config = parse_config(synth_config(tmp_path))
    spec = ChildSpec(
        kind="worker", child="w", incarnation=1,
        plugins=PluginSelection(extra_modules=("core_plugins",)), config=config,
        control_path="", log_level=20, sink_paths={}, pipeline_index=0, symbols=[],
    )  # fmt: skip
    worker = Worker(spec)
    batch = [make_trade(f"X{i % 37}", i) for i in range(1000)]
    parts = worker._split(batch, 3)
    assert sorted(r.trade_id for p in parts for r in p) == list(range(1000))
    for i, part in enumerate(parts):
        assert all(writer_of(r.symbol, 3) == i for r in part)
        assert [r.trade_id for r in part] == sorted(r.trade_id for r in part)
    assert len(worker._owner[3]) == 37  # one lookup per symbol, then cached


def test_automatic_writers_follow_symbols_and_cpus(tmp_path: Path) -> None:
    assert auto_writers(4, 8) == 1
    assert auto_writers(500, 8) == 1
    assert auto_writers(501, 8) == 2
    assert auto_writers(2000, 2) == 2
    assert auto_writers(4000, 16) == 8
    assert auto_writers(0, None) == 1
    data = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv")},
               "fixed": {"type": "csv", "path": str(tmp_path / "c2"), "writers": 3},
               "a": {"type": "lines", "path": str(tmp_path / "a")}},
        pipeline={"sinks": ["files", "fixed", "a"]},
    )  # fmt: skip
    config = parse_config(data)
    plugins = PluginSelection(extra_modules=("core_plugins",))
    types = {"files": "csv", "fixed": "csv", "a": "lines"}

    def plan(n: int) -> list[PipelinePlan]:
        symbols = [f"S{i}" for i in range(n)]
        return [PipelinePlan(0, "synth", "synth", "test", symbols, [symbols])]

    # A small run keeps one writer; 2000 symbols on 4 CPUs get 4; a sink type that cannot
    # be partitioned (lines) always runs as one; the setting wins over the rule.
    assert plan_writers(config, plan(4), types, plugins, 4) == {"files": 1, "fixed": 3, "a": 1}
    assert plan_writers(config, plan(2000), types, plugins, 4) == {"files": 4, "fixed": 3, "a": 1}
    supervisor = Supervisor(
        config, plugins, plan(8), sink_types=types, sink_writers={"files": 1, "fixed": 3, "a": 1}
    )
    names = sorted(c.name for c in supervisor.children if c.kind == "writer")
    assert names == ["sink.a", "sink.files", "sink.fixed#0", "sink.fixed#1", "sink.fixed#2"]


# -- configuration ----------------------------------------------------------------------------
def _registry() -> Registry:
    import core_plugins

    pm, _ = make_plugin_manager(None, plugins=[core_plugins])
    return Registry.from_manager(pm)


@pytest.mark.parametrize(
    "value,fragment",
    [
        (0, "must be an integer between 1 and 1024, got 0"),
        (-2, "got -2"),
        ("3", "got '3'"),
        (True, "got true"),
        (1.5, "got 1.5"),
        (None, "got null"),
        (5000, "got 5000"),
    ],
)
def test_bad_writers_is_one_error_line_in_config_check_and_in_run(
    tmp_path: Path, value, fragment: str
) -> None:
    data = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv"), "writers": value}},
        pipeline={"sinks": ["files"]},
    )
    if value is None:  # an explicit null is a bad value too, not "automatic"
        data["sinks"]["files"]["writers"] = None
    path = write_yaml(tmp_path, data)
    for args in (("config", "check", str(path)), ("run", "--config", str(path))):
        assert_one_line_error(invoke(*args), "sinks.files.writers: ", fragment)
    assert not (tmp_path / "csv").exists()  # nothing started


def test_writers_above_one_is_refused_for_a_sink_that_cannot_be_partitioned(
    tmp_path: Path,
) -> None:
    data = synth_config(tmp_path)
    data["sinks"]["a"]["writers"] = 2
    path = write_yaml(tmp_path, data)
    for args in (("config", "check", str(path)), ("run", "--config", str(path))):
        assert_one_line_error(
            invoke(*args), "sinks.a.writers: sink type 'lines' runs as one writer process only"
        )
    data["sinks"]["a"]["writers"] = 1  # one is always fine
    result = invoke("config", "check", str(write_yaml(tmp_path, data, "ok.yaml")))
    assert result.exit_code == 0, result.output


def test_good_writers_is_accepted_and_shown(tmp_path: Path) -> None:
    data = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv"), "writers": 3}},
        pipeline={"sinks": ["files"]},
    )
    config = parse_config(data)
    validate_components(config, _registry())
    assert effective_config(config, _registry())["sinks"]["files"]["writers"] == 3
    result = invoke("config", "check", str(write_yaml(tmp_path, data, "ok.yaml")))
    assert result.exit_code == 0, result.output
    data["sinks"]["files"]["writers"] = "many"
    with pytest.raises(ConfigError, match=r"sinks\.files\.writers"):
        validate_components(parse_config(data), _registry())


# -- through the simulator --------------------------------------------------------------------
def _sim_config(tmp_path: Path, sim, sinks: dict[str, dict]) -> Path:
    data = {
        "pipelines": [
            {
                "name": "spot",
                "exchange": "binance",
                "options": {"market": "spot", "rest_url": sim.rest_url, "ws_url": sim.ws_url},
                "symbols": SIM_SYMBOLS,
                "streams": {"aggtrade": {}, "kline": {"intervals": ["1s"]}, "depth": {}},
                "sinks": list(sinks),
                "workers": 1,
            }
        ],
        "sinks": {
            name: {"type": "csv", "path": str(tmp_path / name), "flush_interval": "100ms", **extra}
            for name, extra in sinks.items()
        },
        "runtime": {
            "state_dir": str(tmp_path / "state"),
            "status_interval": 0.2,
            "shutdown_timeout": 30,
            "restart_backoff_max": 1,
        },
    }
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows_written(status: dict | None, sink: str) -> int:
    if not status:
        return 0
    return status["sinks"].get(sink, {}).get("totals", {}).get("rows_written", 0)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".streamer")
    }


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    return err


@pytest.mark.timeout(180)
def test_three_writers_write_the_same_files_as_one(tmp_path: Path, binance_sim_factory) -> None:
    """One pipeline feeds a one-writer and a three-writer csv sink: identical trees."""
    sim = binance_sim_factory(seed=5, spot_symbols=SIM_SYMBOLS, usdm_symbols=[], tick_ms=20)
    config = _sim_config(tmp_path, sim, {"one": {"writers": 1}, "three": {"writers": 3}})
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    try:
        status = wait_for(
            lambda: (s := load_status(state)) and _rows_written(s, "three") > 600 and s,
            timeout=90,
            what="rows written by the three writers",
        )
        # Each of the three writers got its own symbols' rows and reports them.
        writers = {n: c for n, c in status["children"].items() if c.get("sink") == "three"}
        assert sorted(writers) == ["sink.three#0", "sink.three#1", "sink.three#2"]
        assert status["sinks"]["three"]["writers"] == 3
        assert "sink.one" in status["children"]
    finally:
        _stop(proc)
    one, three = _tree(tmp_path / "one"), _tree(tmp_path / "three")
    assert len(one) >= 3 * len(SIM_SYMBOLS)  # aggTrades, klines and depth of every symbol
    assert sorted(one) == sorted(three)
    for name in one:
        assert one[name] == three[name], f"{name} differs"
    final = load_status(state)
    assert (
        final["sinks"]["three"]["totals"]["rows_written"]
        == (final["sinks"]["one"]["totals"]["rows_written"])
    )
    for symbol in SIM_SYMBOLS:  # per stream: the writer owning it
        per = final["sinks"]["three"]["markets"]["binance/spot"][symbol]["aggtrade"]
        assert (
            per["records_written"]
            == (
                final["sinks"]["one"]["markets"]["binance/spot"][symbol]["aggtrade"][
                    "records_written"
                ]
            )
        )


def _trade_ids(root: Path, symbol: str) -> list[int]:
    ids: list[int] = []
    for path in sorted((root / "binance/spot/aggTrades" / symbol).glob("*.csv")):
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0][0] == "agg_trade_id" and all(len(r) == len(rows[0]) for r in rows)
        ids += [int(r[0]) for r in rows[1:]]
    return ids


@pytest.mark.timeout(240)
def test_sigkill_of_one_of_three_writers_loses_and_repeats_nothing(
    tmp_path: Path, binance_sim_factory
) -> None:
    sim = binance_sim_factory(
        seed=7, spot_symbols=SIM_SYMBOLS, usdm_symbols=[], tick_ms=20, history_s=30.0
    )
    config = _sim_config(tmp_path, sim, {"csv": {"writers": 3}})
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    try:
        status = wait_for(
            lambda: (s := load_status(state)) and _rows_written(s, "csv") > 400 and s,
            timeout=90,
            what="rows written",
        )
        # Writer 2 owns BNBUSDT only; the others keep their pids through its restart.
        others = {n: status["children"][n]["pid"] for n in ("sink.csv#0", "sink.csv#1")}
        os.kill(status["children"]["sink.csv#2"]["pid"], signal.SIGKILL)
        status = wait_for(
            lambda: (
                (s := load_status(state))
                and s["children"]["sink.csv#2"]["restarts"] == 1
                and s["children"]["sink.csv#2"]["alive"]
                and all(s["children"][n]["alive"] for n in s["children"])
                and _rows_written(s, "csv") > 400
                and s
            ),
            timeout=90,
            what="the killed writer restarted and writing again",
        )
        assert {n: status["children"][n]["pid"] for n in others} == others
        assert status["children"]["sink.csv#0"]["restarts"] == 0
    finally:
        err = _stop(proc)
    assert "sink.csv#2" in err and "restarting" in err
    root = tmp_path / "csv"
    for symbol in SIM_SYMBOLS:
        ids = _trade_ids(root, symbol)
        assert len(ids) > 5, symbol
        truth = sorted(t.trade_id for t in sim.truth.trades("spot", symbol))
        # Every id between the first and last written is there exactly once.
        assert ids == [i for i in truth if ids[0] <= i <= ids[-1]], f"{symbol}: gap or repeat"
    verify = subprocess.run(
        [sys.executable, "-m", "streamer", "verify", str(root), "--sink", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_csv_writer_repairs_and_reports_only_its_own_symbols(tmp_path: Path) -> None:
    """Writer 2 of 3 (BNBUSDT) must not cut the torn tail another writer may be appending."""
    import asyncio

    from streamer.plugins.sinks.csv_batch import CsvSink, Options

    header = (
        "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
        "is_buyer_maker,is_best_match,event_time,receive_time\n"
    )
    torn = {}
    for symbol in SIM_SYMBOLS:
        folder = tmp_path / "binance/spot/aggTrades" / symbol
        folder.mkdir(parents=True)
        path = folder / f"{symbol}-aggTrades-2026-11-23.csv"
        path.write_text(header + "7,1.0,2.0,1,1,5,true,true,5,6\n8,1.0,2")  # torn last row
        torn[symbol] = path

    def open_writer(i: int) -> dict:
        context = SinkContext(
            name="csv", counters=Counters(), logger=logging.getLogger("t"), writer=i, writers=3
        )
        sink = CsvSink(Options(path=str(tmp_path)), context)

        async def scenario() -> dict:
            await sink.open()
            held = await sink.holdings()
            await sink.close()
            return held

        return asyncio.run(scenario())

    held = open_writer(2)
    assert {k.symbol for k in held} == {"BNBUSDT"} and set(held.values()) == {7}
    assert torn["BNBUSDT"].read_text().endswith("true,true,5,6\n")  # repaired: its own
    for symbol in ("BTCUSDT", "ETHUSDT", "XRPUSDT"):  # untouched: the others'
        assert torn[symbol].read_text().endswith("\n8,1.0,2"), symbol


# -- status -----------------------------------------------------------------------------------
def test_status_merges_the_writers_of_a_sink(tmp_path: Path) -> None:
    """Counters summed under the sink, the oldest flush, queues summed, down if one is."""
    import time as _time

    from streamer.core.ops.status_view import DOWN, STALLED, build_view

    config = parse_config(
        synth_config(
            tmp_path, sinks={"files": {"type": "csv", "path": str(tmp_path / "csv")}},
            pipeline={"sinks": ["files"]},
        )
    )  # fmt: skip
    plans = [PipelinePlan(0, "synth", "synth", "test", ["AAA", "BBB"], [["AAA", "BBB"]])]
    supervisor = Supervisor(
        config, PluginSelection(extra_modules=("core_plugins",)), plans,
        sink_types={"files": "csv"}, sink_writers={"files": 2},
    )  # fmt: skip
    now_ms = _time.time_ns() // 1_000_000
    w0, w1 = supervisor._children["sink.files#0"], supervisor._children["sink.files#1"]
    w0.counters = [
        ("records_written", "binance/spot/AAA", "aggtrade", 5),
        ("last_flush_time", "", "", now_ms),
        ("rows_pending", "", "", 3),
    ]
    w1.counters = [
        ("records_written", "binance/spot/BBB", "aggtrade", 7),
        ("last_flush_time", "", "", now_ms - 60_000),
        ("rows_pending", "", "", 4),
    ]
    w0.info = {"queue_depth": 2, "status_time": now_ms}
    w1.info = {"queue_depth": 5, "status_time": now_ms}
    supervisor._marks = {"sink.files#0": {}, "sink.files#1": {}}
    doc = supervisor.status()
    sink = doc["sinks"]["files"]
    assert sink["writers"] == 2 and sink["totals"]["records_written"] == 12
    assert sink["process"]["last_flush_time"] == now_ms - 60_000  # the laggard's
    assert sink["process"]["rows_pending"] == 7
    assert doc["children"]["sink.files#1"]["sink"] == "files"
    for child in doc["children"].values():  # fixture: everything alive
        child["alive"] = True
    view = build_view(doc, check_pid=False, now=now_ms / 1000)
    (row,) = view.sinks
    assert row.queue_depth == 7 and STALLED in row.flags  # writer 1 has not flushed for 60 s
    doc["children"]["sink.files#0"]["alive"] = False
    (row,) = build_view(doc, check_pid=False, now=now_ms / 1000).sinks
    assert DOWN in row.flags
