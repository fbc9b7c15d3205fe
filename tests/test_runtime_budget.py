"""The worker's byte budget: pause reading past half of it, overflow markers past all of it,
held bytes back to 0 after a drain; the writer's byte-bounded queue; SIGTERM with a full
buffer drains and exits 0; ``worker_buffer``/``writer_buffer`` validation."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from conftest import synth_config
from core_plugins import make_trade, read_lines, read_markers

from streamer.core.config import ConfigError, parse_config
from streamer.core.records import DepthUpdate, Marker, Trade, decode_batch
from streamer.core.runtime import read_status, run
from streamer.core.runtime.channels import FrameReader
from streamer.core.runtime.worker import Worker, record_weight
from streamer.core.units import parse_size

PLUGINS = ["core_plugins"]


def _worker(tmp_path: Path, **runtime) -> Worker:
    config = parse_config(synth_config(tmp_path, runtime=runtime))
    return Worker(SimpleNamespace(config=config, pipeline_index=0))  # type: ignore[arg-type]


# -- the budget, in one process ------------------------------------------------------------------
def test_weights_follow_type_and_levels():
    trade = make_trade("AAA", 1)
    depth = DepthUpdate("ex", "spot", "AAA", 0, None, 1, 2, None, [("1", "1")] * 20,
                        [("2", "1")] * 20, 0)  # fmt: skip
    assert 300 < record_weight(trade) < 1000
    assert 6000 < record_weight(depth) < 10_000  # measured: ~7.9 KB of Python objects


def test_emit_pauses_reading_then_drops_with_markers_and_drains_back_to_zero(tmp_path):
    worker = _worker(tmp_path, worker_buffer="64KB", batch_size=100_000)
    calls: list[str] = []
    # A fake adapter honouring the hook, the way the Binance adapter attaches its sockets.
    worker._flow.attach(lambda: calls.append("pause"), lambda: calls.append("resume"))
    weight = record_weight(make_trade("AAA", 1))
    budget = 64 * 1024

    trade_id = 0
    while not calls:
        trade_id += 1
        worker.emit(make_trade("AAA", trade_id))
    assert calls == ["pause"] and worker._flow.paused
    assert budget // 2 < worker._pending_bytes <= budget // 2 + weight
    assert worker.counters.snapshot().get(("read_pauses", "", "")) == 1
    # Past the pause, records still arrive (an adapter's last read, output on a clock)...
    while trade_id < 3 * budget // weight:
        trade_id += 1
        worker.emit(make_trade("AAA", trade_id))
    assert calls == ["pause"]  # paused once, not per record
    # ... and only beyond the whole budget are they dropped, counted.
    assert worker._pending_bytes <= budget
    kept = len(worker._pending)
    dropped = trade_id - kept
    assert dropped > 0
    counted = worker.counters.snapshot()[("records_overflowed", "AAA", "aggtrade")]
    assert counted == dropped
    # A marker is never dropped, even over the budget.
    gap = Marker("synth", "test", "AAA", "aggtrade", "gap", 1, 2, 0, "test")
    worker.emit(gap)
    assert worker._pending[-1] is gap

    frames: list[bytes] = []

    async def drain() -> None:
        path = str(tmp_path / "sink.sock")
        listener = await anyio.create_unix_listener(path)
        send, receive = anyio.create_memory_object_stream[bytes](1)
        worker._queues["a"] = (send, receive)
        worker._lanes["a"] = ["a"]  # one writer for sink "a"

        async def serve() -> None:
            stream = await listener.accept()
            reader = FrameReader(stream)
            while (payload := await reader.receive()) is not None:
                frames.append(payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            tg.start_soon(worker._sender, "a", path, receive)
            with anyio.fail_after(30):
                await worker._flush()
                await send.aclose()
        await listener.aclose()

    anyio.run(drain)
    assert worker._pending_bytes == 0 and worker._queued_bytes == 0
    assert calls == ["pause", "resume"] and not worker._flow.paused
    records = [r for payload in frames for r in decode_batch(payload)]
    ids = [r.trade_id for r in records if type(r) is Trade]
    assert ids == list(range(1, kept + 1))  # every kept record once, in order
    overflow = [r for r in records if type(r) is Marker and r.kind == "overflow"]
    assert [(m.first_key, m.last_key) for m in overflow] == [(kept + 1, trade_id)]
    assert gap in records


def test_a_record_bigger_than_the_budget_passes_when_nothing_is_held(tmp_path):
    worker = _worker(tmp_path, worker_buffer="64KB")
    huge = DepthUpdate("ex", "spot", "AAA", 0, None, 1, 2, None, [("1", "1")] * 400, [], 0)
    assert record_weight(huge) > 64 * 1024
    worker.emit(huge)
    assert worker._pending == [huge]
    worker.emit(huge)  # but not on top of anything else
    assert worker._pending == [huge]


# -- runs through the processes ------------------------------------------------------------------
def _run_until(config, done, limit: float = 90, plugins=None, modules=PLUGINS) -> int:
    sent: list[bool] = []

    def watch(status: dict) -> None:
        if not sent and done(status):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    code = run(config, plugins, extra_plugin_modules=modules, duration=limit, on_status=watch)
    assert sent, f"the condition never held within {limit} s"
    return code


def _worker_info(status: dict) -> list[dict]:
    return [c.get("info", {}) for c in status.get("children", {}).values() if c["kind"] == "worker"]


def test_stop_with_more_than_the_writer_can_take_in_time_leaves_markers_and_exits_0(tmp_path):
    # A writer far slower than the budget assumes (0.3 s per 1000 records, the feed brings
    # 6000/s): what the worker cannot send within half the shutdown timeout becomes
    # overflow markers instead of being killed with the worker (before: exit 1, the backlog
    # gone without a trace). What is already encoded and in flight (a few batches in the
    # socket and the writer's queue) still reaches the sink in the other half.
    config = parse_config(
        synth_config(
            tmp_path,
            pipeline={
                "options": {"epoch_ms": 1_764_000_000_000, "rate": 3000},
                "symbols": ["AAA", "BBB"],
                "sinks": ["a"],
                "workers": 1,
            },
            sinks={"a": {"type": "lines", "path": str(tmp_path / "a"), "write_delay": 0.3}},
            runtime={
                "batch_size": 1000,
                "queue_batches": 1,
                "writer_buffer": "64KB",
                "shutdown_timeout": 8,
            },
        )
    )
    code = _run_until(
        config,
        lambda s: sum(i.get("pending_records", 0) for i in _worker_info(s)) > 10_000,
        plugins=[],
    )
    status = read_status(tmp_path / "state")
    assert code == 0 and status["exit_code"] == 0
    streams = status["pipelines"]["synth"]["streams"]
    markers = [m for m in read_markers(tmp_path / "a") if m[5] == "overflow"]
    assert markers and all(m[9] == "not sent before the shutdown timeout" for m in markers)
    emitted = status["pipelines"]["synth"]["totals"]["records_emitted"]
    on_disk = read_lines(tmp_path / "a")
    assert sum(len(ids) for ids in on_disk.values()) + len(markers) == emitted  # (markers count)
    for key, ids in on_disk.items():
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # written once, in order
        spans = [(m[6], m[7]) for m in markers if m[3] == key.symbol]
        # What follows the written ids is exactly what the markers cover.
        assert spans == [(ids[-1] + 1, spans[0][1])]
        dropped = spans[0][1] - ids[-1]
        assert dropped == streams[key.symbol]["aggtrade"]["records_overflowed"]


SIM_SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT"]


def test_sigterm_with_a_full_buffer_through_the_simulator_drains_and_exits_0(
    tmp_path, binance_sim_factory
):
    sim = binance_sim_factory(seed=5, spot_symbols=SIM_SYMBOLS, usdm_symbols=[], tick_ms=2,
                              history_s=5.0)  # fmt: skip
    config = parse_config(
        {
            "pipelines": [
                {
                    "name": "spot",
                    "exchange": "binance",
                    "options": {
                        "market": "spot",
                        "rest_url": sim.rest_url,
                        "ws_url": sim.ws_url,
                    },
                    "symbols": SIM_SYMBOLS,
                    "streams": {"aggtrade": {}, "depth": {}},
                    "sinks": ["csv"],
                    "workers": 1,
                }
            ],
            "sinks": {"csv": {"type": "slowcsv", "path": str(tmp_path / "data")}},
            "runtime": {
                "state_dir": str(tmp_path / "state"),
                "status_interval": 0.2,
                # A small budget, so that it fills within a few batches.
                "worker_buffer": "1MB",
                "writer_buffer": "256KB",
            },
        }
    )

    def full(status: dict) -> bool:
        process = status.get("pipelines", {}).get("spot", {}).get("totals", {})
        return process.get("read_pauses", 0) >= 2 and process.get("ws_read_pauses", 0) >= 2

    # The installed plugins (binance, csv) and a CSV sink slowed down to 4 batches/s.
    code = _run_until(config, full, modules=["budget_plugins"])
    status = read_status(tmp_path / "state")
    assert code == 0 and status["exit_code"] == 0
    assert status["pipelines"]["spot"]["totals"].get("records_overflowed", 0) == 0
    for info in _worker_info(status):
        assert info["held_bytes"] == 0 and info["pending_records"] == 0
    for symbol in SIM_SYMBOLS:
        folder = tmp_path / "data" / "binance/spot/aggTrades" / symbol
        ids = []
        for path in sorted(folder.glob("*.csv")):
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            ids += [int(r[0]) for r in rows]
        assert len(ids) > 10, symbol
        truth = sorted(t.trade_id for t in sim.truth.trades("spot", symbol))
        assert ids == [i for i in truth if ids[0] <= i <= ids[-1]], f"{symbol}: ids"


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12XB", r"runtime\.worker_buffer: invalid size '12XB': use a number of bytes"),
        ("-1MB", r"runtime\.worker_buffer: invalid size '-1MB': must not be negative"),
        ("1KB", r"runtime\.worker_buffer: invalid size '1KB': must be at least 64KB"),
        ("2TB", r"runtime\.worker_buffer: invalid size '2TB': larger than 1TB"),
        (True, r"runtime\.worker_buffer: expected `int \| str`, got `bool`"),
    ],
)
def test_bad_buffer_sizes_are_one_line_errors(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(synth_config(tmp_path, runtime={"worker_buffer": value}))


def test_buffer_sizes_parse_with_binary_units(tmp_path):
    config = parse_config(
        synth_config(tmp_path, runtime={"worker_buffer": "48MB", "writer_buffer": 1 << 20})
    )
    assert config.runtime.worker_buffer_bytes == 48 << 20
    assert config.runtime.writer_buffer_bytes == 1 << 20
    assert parse_size("512 KiB") == parse_size("512kb") == 512 * 1024
    assert parse_config(synth_config(tmp_path)).runtime.worker_buffer_bytes == 32 << 20


def test_status_shows_held_bytes_and_pauses():
    from test_ops_status import make_doc, view_of

    from streamer.core.ops.status_view import render_table

    doc = make_doc()
    doc["children"]["spot.worker0"]["info"].update(
        held_bytes=3 << 20, buffer_bytes=32 << 20, read_pauses=7, reading_paused=True
    )
    view = view_of(doc)
    worker = next(c for c in view.children if c.name == "spot.worker0")
    assert (worker.held_bytes, worker.read_pauses, worker.reading_paused) == (3 << 20, 7, True)
    line = next(x for x in render_table(view).splitlines() if x.startswith("spot.worker0"))
    assert "3MB/32MB" in line and "7 (paused)" in line
