"""The multiprocess runtime with inline plugins: data flow, restarts, shutdown, overflow."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import load_status, start_streamer, synth_config, wait_for
from core_plugins import read_lines, read_markers

from streamer import stream_key
from streamer.core.api import StreamKey
from streamer.core.config import parse_config
from streamer.core.records import Kline, Marker, Trade, encode_batch
from streamer.core.runtime import HighWater, auto_workers, partition, read_status, run
from streamer.core.runtime.bootstrap import ChildSpec, PluginSelection
from streamer.core.runtime.channels import FrameReader, OversizedFrame, frame
from streamer.core.runtime.writer import Writer

PLUGINS = ["core_plugins"]


def assert_contiguous(ids_by_key: dict[StreamKey, list[int]], symbols: list[str]) -> None:
    """Each stream holds a gap-free, duplicate-free, increasing run of ids."""
    assert sorted(k.symbol for k in ids_by_key) == sorted(symbols)
    for key, ids in ids_by_key.items():
        assert ids, key
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"gap or duplicate in {key}"


def run_inline(tmp_path: Path, duration: float, **changes) -> tuple[int, dict]:
    config = parse_config(synth_config(tmp_path, **changes))
    code = run(config, [], extra_plugin_modules=PLUGINS, duration=duration)
    return code, read_status(tmp_path / "state")


def run_inline_until(tmp_path: Path, done, limit: float = 90, **changes) -> tuple[int, dict]:
    """Run in this process until ``done(status)`` holds (then SIGTERM, a clean stop), or
    ``limit`` seconds: waits on the condition, not on a guess of how long it takes."""
    config = parse_config(synth_config(tmp_path, **changes))
    sent = []

    def watch(status: dict) -> None:
        if not sent and done(status):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    code = run(config, [], extra_plugin_modules=PLUGINS, duration=limit, on_status=watch)
    assert sent, f"the condition never held within {limit} s"
    return code, read_status(tmp_path / "state")


def _restarts(status: dict, name: str) -> int:
    return status.get("children", {}).get(name, {}).get("restarts", 0)


# -- pure helpers ------------------------------------------------------------------------------
def test_partition_keeps_every_symbol_once_and_never_one_process_per_symbol():
    symbols = [f"S{i}" for i in range(10)]
    groups = partition(symbols, 3)
    assert len(groups) == 3
    assert sorted(s for g in groups for s in g) == sorted(symbols)
    assert partition(["A"], 4) == [["A"]]
    assert auto_workers(2000, 2) == 1
    assert auto_workers(2000, 8) == 7
    assert auto_workers(150, 8) == 2
    assert auto_workers(1, None) == 1


def _trade(trade_id: int, symbol: str = "X") -> Trade:
    return Trade("ex", "spot", symbol, trade_id, "1", "1", 0, 0, 0, False, None, 0, 0)


def _kline(open_time: int, closed: bool) -> Kline:
    return Kline(
        "ex", "spot", "X", "1m", open_time, open_time + 59_999, "1", "1", "1", "1", "1", "1",
        1, "1", "1", closed, 0, 0,
    )  # fmt: skip


def test_high_water_drops_held_records_and_counts_them():
    key = StreamKey("ex", "spot", "X", "aggtrade")
    hw = HighWater({key: 5})
    kept, dropped = hw.filter([_trade(4), _trade(5), _trade(6), _trade(6), _trade(7)])
    assert [r.trade_id for r in kept] == [6, 7]
    assert dropped == {key: 3}
    assert hw.marks[key] == 7
    marker = Marker("ex", "spot", "X", "aggtrade", "gap", 1, 2, 0, "test")
    kept, _ = hw.filter([marker])
    assert kept == [marker]


def test_high_water_only_closed_klines_raise_the_mark():
    hw = HighWater()
    kept, _ = hw.filter([_kline(60_000, False), _kline(60_000, False), _kline(60_000, True)])
    assert len(kept) == 3  # updates of the open bar pass until it closes
    kept, dropped = hw.filter([_kline(60_000, True), _kline(60_000, False), _kline(120_000, False)])
    assert [(k.open_time, k.closed) for k in kept] == [(120_000, False)]
    assert dropped == {stream_key(_kline(0, True)): 2}


# -- in-process runs -----------------------------------------------------------------------------
def test_records_flow_across_processes_without_loss_or_duplicates(tmp_path):
    code, status = run_inline(tmp_path, duration=3)
    assert code == 0
    symbols = ["AAA", "BBB", "CCC", "DDD"]
    a, b = read_lines(tmp_path / "a"), read_lines(tmp_path / "b")
    assert_contiguous(a, symbols)
    assert a == b  # every sink of the pipeline got the same records
    emitted = status["pipelines"]["synth"]["totals"]["records_emitted"]
    assert emitted == sum(len(ids) for ids in a.values()) > 100
    for sink in ("a", "b"):
        totals = status["sinks"][sink]["totals"]
        assert totals["records_written"] == emitted
        assert totals.get("duplicates_dropped", 0) == 0
    assert status["state"] == "stopped" and status["exit_code"] == 0
    workers = [c for c in status["children"].values() if c["kind"] == "worker"]
    assert len(workers) == 2 and all(c["restarts"] == 0 for c in workers)


def test_second_run_resumes_from_sink_holdings_and_backfills(tmp_path):
    assert run_inline(tmp_path, duration=1.5)[0] == 0
    first = read_lines(tmp_path / "a")
    time.sleep(0.5)  # trades keep happening while nothing runs
    code, status = run_inline(tmp_path, duration=1.5)
    assert code == 0
    both = read_lines(tmp_path / "a")
    assert_contiguous(both, ["AAA", "BBB", "CCC", "DDD"])
    for key, ids in first.items():
        assert both[key][: len(ids)] == ids
    streams = status["pipelines"]["synth"]["streams"]
    assert all(streams[s]["aggtrade"].get("backfilled", 0) > 0 for s in ("AAA", "BBB"))


def test_crashing_adapter_is_restarted_with_backoff_and_backfilled(tmp_path, caplog):
    code, status = run_inline_until(
        tmp_path,
        lambda s: _restarts(s, "synth.worker0") >= 2 and _restarts(s, "synth.worker1") >= 2,
        pipeline={"options": {"epoch_ms": 1_764_000_000_000, "rate": 300, "crash_after": 0.5}},
        runtime={"restart_backoff_max": 1},
    )
    assert code == 0
    restarts = [c["restarts"] for n, c in status["children"].items() if "worker" in n]
    assert min(restarts) >= 2
    assert_contiguous(read_lines(tmp_path / "a"), ["AAA", "BBB", "CCC", "DDD"])
    assert any("restarting in" in r.getMessage() for r in caplog.records)


def test_failing_sink_write_restarts_writer_and_workers_without_gap(tmp_path, caplog):
    sinks = synth_config(tmp_path)["sinks"]
    sinks["a"]["fail_on_write"] = 15
    symbols = ["AAA", "BBB", "CCC", "DDD"]

    def restarted_and_written(s: dict) -> bool:
        # Both workers (two symbols each) must have reached the restarted sink, however
        # late a loaded machine started one of them.
        written = {k.symbol for k in read_lines(tmp_path / "a")}
        return (
            _restarts(s, "sink.a") >= 1
            and _restarts(s, "synth.worker0") >= 1
            and written == set(symbols)
        )

    code, status = run_inline_until(tmp_path, restarted_and_written, sinks=sinks)
    assert code == 0
    assert status["children"]["sink.a"]["restarts"] >= 1
    assert status["children"]["synth.worker0"]["restarts"] >= 1
    a = read_lines(tmp_path / "a")
    assert_contiguous(a, symbols)
    assert_contiguous(read_lines(tmp_path / "b"), symbols)
    assert any("sink.a" in r.getMessage() and "exited with code 1" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_overflow_is_counted_and_reported_as_markers(tmp_path):
    code, status = run_inline(
        tmp_path,
        duration=3,
        pipeline={
            "options": {"epoch_ms": 1_764_000_000_000, "rate": 3000},
            "symbols": ["AAA", "BBB"],
            "sinks": ["a"],
            "workers": 1,
        },
        sinks={"a": {"type": "lines", "path": str(tmp_path / "a"), "write_delay": 0.2}},
        runtime={"batch_size": 200, "queue_batches": 1, "worker_buffer": "64KB"},
    )
    assert code == 0
    streams = status["pipelines"]["synth"]["streams"]
    overflowed = sum(streams[s]["aggtrade"].get("records_overflowed", 0) for s in streams)
    assert overflowed > 0
    # The synthetic adapter does not honour the pause: asked, then dropped past the budget.
    assert status["pipelines"]["synth"]["totals"]["read_pauses"] > 0
    assert status["pipelines"]["synth"]["totals"]["backpressure_waits"] > 0
    markers = [m for m in read_markers(tmp_path / "a") if m[5] == "overflow"]
    assert markers, "overflow must be visible in the data, not only in counters"
    # Every id missing from the file is inside an overflow marker's range.
    for key, ids in read_lines(tmp_path / "a").items():
        spans = [(m[6], m[7]) for m in markers if m[3] == key.symbol]
        assert spans, key
        held = set(ids)
        end = max(ids[-1], *(b for _, b in spans))
        missing = [i for i in range(ids[0], end + 1) if i not in held]
        assert len(missing) == streams[key.symbol]["aggtrade"]["records_overflowed"]
        assert all(any(a <= i <= b for a, b in spans) for i in missing)


def test_unknown_symbol_is_rejected_before_any_process_starts(tmp_path):
    config = parse_config(synth_config(tmp_path, pipeline={"symbols": ["AAA", "NOPE"]}))
    with pytest.raises(ValueError, match=r"pipelines\[0\]\.symbols: unknown symbol.*NOPE"):
        run(config, [], extra_plugin_modules=PLUGINS, duration=1)
    assert not (tmp_path / "state").exists()


def test_shutdown_timeout_kills_stuck_children_and_exits_1(tmp_path):
    started = time.monotonic()
    code, status = run_inline(
        tmp_path,
        duration=1.5,
        sinks={"a": {"type": "lines", "path": str(tmp_path / "a"), "close_delay": 60},
               "b": {"type": "lines", "path": str(tmp_path / "b")}},
        runtime={"shutdown_timeout": 2},
    )  # fmt: skip
    assert code == 1
    assert time.monotonic() - started < 15
    assert status["exit_code"] == 1


# -- subprocess runs with real signals ---------------------------------------------------------
def _written(status: dict | None, sink: str = "a") -> int:
    if not status:
        return 0
    return status["sinks"].get(sink, {}).get("totals", {}).get("records_written", 0)


def _finish(proc, sig=signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except Exception:
        proc.kill()
        raise
    return proc.returncode, err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_flushes_everything_and_exits_zero(tmp_path, write_config):
    state = tmp_path / "state"
    port = _free_port()
    config = write_config(runtime={"metrics_port": port})
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    wait_for(lambda: _written(load_status(state)) > 200, what="records written")
    # The supervisor serves the live status as Prometheus metrics when asked to.
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert metrics.status_code == 200 and "records_written" in metrics.text
    code, err = _finish(proc)
    assert code == 0, err
    status = load_status(state)
    assert status["state"] == "stopped"
    emitted = status["pipelines"]["synth"]["totals"]["records_emitted"]
    on_disk = read_lines(tmp_path / "a")
    assert sum(len(ids) for ids in on_disk.values()) == emitted == _written(status)
    assert on_disk == read_lines(tmp_path / "b")
    assert_contiguous(on_disk, ["AAA", "BBB", "CCC", "DDD"])
    assert "Traceback" not in err


def test_worker_sigkill_is_restarted_and_the_run_continues_without_gap(tmp_path, write_config):
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(write_config())], cwd=tmp_path)
    status = wait_for(
        lambda: (s := load_status(state)) and _written(s) > 200 and s, what="records written"
    )
    victim = status["children"]["synth.worker0"]["pid"]
    import os

    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            (s := load_status(state))
            and s["children"]["synth.worker0"]["restarts"] == 1
            and s["children"]["synth.worker0"]["alive"]
            and s["children"]["synth.worker0"]["pid"] != victim
        ),
        what="worker restart",
    )
    before = _written(load_status(state))
    wait_for(lambda: _written(load_status(state)) > before + 200, what="data after restart")
    code, err = _finish(proc)
    assert code == 0, err
    assert "synth.worker0" in err and "exited with code -9" in err
    a = read_lines(tmp_path / "a")
    assert_contiguous(a, ["AAA", "BBB", "CCC", "DDD"])
    assert a == read_lines(tmp_path / "b")


def test_writer_sigkill_restarts_writer_and_its_workers_without_loss(tmp_path, write_config):
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(write_config())], cwd=tmp_path)
    status = wait_for(
        lambda: (s := load_status(state)) and _written(s) > 200 and s, what="records written"
    )
    victim = status["children"]["sink.a"]["pid"]
    import os

    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            (s := load_status(state))
            and s["children"]["sink.a"]["restarts"] == 1
            and s["children"]["sink.a"]["alive"]
            and all(s["children"][f"synth.worker{i}"]["restarts"] == 1 for i in (0, 1))
        ),
        what="writer and worker restarts",
    )
    # Sink b kept receiving from the old workers until they were replaced; wait until the
    # new workers have brought sink a past that point (the status of a restarted child
    # may still show its previous incarnation's counters, so compare high-water marks).
    target = load_status(state)["sinks"]["b"]["high_water"]
    wait_for(
        lambda: all(
            load_status(state)["sinks"]["a"]["high_water"].get(k, 0) > v for k, v in target.items()
        ),
        what="sink a past sink b's marks at the restart",
    )
    code, err = _finish(proc)
    assert code == 0, err
    assert "restarts after writer sink.a restarted" in err
    a = read_lines(tmp_path / "a")
    assert_contiguous(a, ["AAA", "BBB", "CCC", "DDD"])
    # Sink b never died: it still holds one gap-free run, and a caught up with it.
    b = read_lines(tmp_path / "b")
    assert_contiguous(b, ["AAA", "BBB", "CCC", "DDD"])
    assert {k: v[-1] for k, v in a.items()} == {k: v[-1] for k, v in b.items()}


def test_second_signal_forces_exit(tmp_path, write_config):
    state = tmp_path / "state"
    config = write_config(
        sinks={"a": {"type": "lines", "path": str(tmp_path / "a"), "close_delay": 60},
               "b": {"type": "lines", "path": str(tmp_path / "b")}},
        runtime={"shutdown_timeout": 60},
    )  # fmt: skip
    proc = start_streamer(["run", "--config", str(config)], cwd=tmp_path)
    wait_for(lambda: _written(load_status(state)) > 0, what="records written")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: (s := load_status(state)) and s["state"] == "stopping", what="stopping")
    started = time.monotonic()
    code, err = _finish(proc, signal.SIGINT, timeout=20)
    assert code == 130, err
    assert time.monotonic() - started < 10
    assert "forcing exit" in err


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie nobody reaped yet has exited


def test_children_do_not_outlive_a_killed_supervisor(tmp_path, write_config):
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(write_config())], cwd=tmp_path)
    status = wait_for(
        lambda: (s := load_status(state)) and _written(s) > 200 and s, what="records written"
    )
    children = [c["pid"] for c in status["children"].values()]
    assert len(children) == 4
    proc.kill()
    proc.communicate(timeout=10)
    wait_for(lambda: all(_gone(pid) for pid in children), timeout=20, what="orphans to exit")
    # Orphaned workers still sent what they held and the writers flushed it.
    assert_contiguous(read_lines(tmp_path / "a"), ["AAA", "BBB", "CCC", "DDD"])


# -- channel and writer units ----------------------------------------------------------------
class _Chunks:
    """A byte receive stream that returns fixed chunks, then ends."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = list(chunks)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._chunks:
            raise anyio.EndOfStream
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        pass


def test_frame_reader_discards_a_frame_cut_short_by_eof():
    async def main():
        whole = frame(b"first") + frame(b"")
        reader = FrameReader(_Chunks(whole[:3], whole[3:], frame(b"second")[:-2]))
        return [await reader.receive() for _ in range(3)]

    assert anyio.run(main) == [b"first", b"", None]


def test_frame_reader_rejects_an_impossible_length():
    async def main():
        return await FrameReader(_Chunks(b"\xff\xff\xff\xff" + b"x" * 10)).receive()

    with pytest.raises(OversizedFrame, match="exceeds"):
        anyio.run(main)


class _MemorySink:
    def __init__(self) -> None:
        self.rows: list = []

    async def write(self, batch) -> None:
        self.rows.extend(batch)


def test_writer_counts_corrupt_batches_and_dropped_duplicates(tmp_path, caplog):
    config = parse_config(synth_config(tmp_path))
    spec = ChildSpec(
        kind="writer", child="sink.a", incarnation=1, plugins=PluginSelection(),
        config=config, control_path="", log_level=20, sink_paths={}, sink="a",
    )  # fmt: skip
    writer = Writer(spec)
    sink = _MemorySink()
    key = StreamKey("ex", "spot", "X", "aggtrade")
    writer._high_water = HighWater({key: 2})

    async def main():
        assert await writer._write(sink, b"\x93garbage") is False
        return await writer._write(sink, encode_batch([_trade(i) for i in (1, 2, 3, 4, 4)]))

    assert anyio.run(main) is True
    assert [r.trade_id for r in sink.rows] == [3, 4]
    assert writer.counters.get("batches_corrupt") == 1
    # Keyed by market: one sink may receive the same symbol from spot and futures pipelines.
    assert writer.counters.get("duplicates_dropped", "@ex/spot/X", "aggtrade") == 3
    assert writer.counters.get("records_written", "@ex/spot/X", "aggtrade") == 2
    assert "corrupt_batch" in caplog.text
