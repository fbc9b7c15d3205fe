"""Monitoring that tells the truth, against the real writer and runtime: write errors of a
full disk, a stopped writer, per-market counts and how far behind the written output is."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from conftest import load_status, start_streamer, subprocess_env, synth_config, wait_for
from core_plugins import read_lines
from test_ops_status import table_cells

from streamer.core.api import StreamKey
from streamer.core.config import parse_config
from streamer.core.ops.health import check_health
from streamer.core.ops.status_view import STALLED, build_view, render_table, sample
from streamer.core.records import Trade, encode_batch
from streamer.core.runtime.bootstrap import ChildSpec, PluginSelection
from streamer.core.runtime.status_file import merge_counters
from streamer.core.runtime.worker import _cadence_of
from streamer.core.runtime.writer import Writer

SYMBOLS = ["AAA", "BBB", "CCC", "DDD"]
NOW_MS = 1_764_000_100_000


def _trade(market: str, trade_id: int, event_time: int, symbol: str = "BTCUSDT") -> Trade:
    return Trade(
        exchange="binance", market=market, symbol=symbol, trade_id=trade_id, price="1.5",
        quantity="2", first_trade_id=trade_id, last_trade_id=trade_id, transact_time=event_time,
        is_buyer_maker=False, is_best_match=True, event_time=event_time, receive_time=event_time,
    )  # fmt: skip


class _Sink:
    """A sink whose flush may leave rows pending and whose holdings the test sets."""

    def __init__(self) -> None:
        self.rows: list = []
        self.pending_rows = 0
        self.held: dict[StreamKey, int] = {}

    async def write(self, batch) -> None:
        self.rows.extend(batch)

    async def flush(self) -> None:
        pass

    async def holdings(self) -> dict[StreamKey, int]:
        return dict(self.held)


def _writer(tmp_path: Path) -> Writer:
    spec = ChildSpec(
        kind="writer", child="sink.csv", incarnation=1, plugins=PluginSelection(),
        config=parse_config(synth_config(tmp_path)), control_path="", log_level=20,
        sink_paths={}, sink="csv",
    )  # fmt: skip
    return Writer(spec)


def _doc_from(writer: Writer) -> dict[str, Any]:
    """A status document around the writer's published counters (two pipelines)."""
    status = msgspec.json.decode(msgspec.json.encode(writer._status()))
    pipelines = {
        market: {
            "exchange": "binance",
            "market": market,
            "symbols": ["BTCUSDT"],
            "totals": {},
            "streams": {"BTCUSDT": {"aggtrade": {"records_emitted": n}}},
            "process": {},
        }
        for market, n in (("spot", 3), ("usdm", 2))
    }
    return {
        "pid": 0,
        "started_at": NOW_MS - 100_000,
        "updated_at": NOW_MS,
        "state": "running",
        "pipelines": pipelines,
        "sinks": {"csv": {"type": "csv", **merge_counters([status["counters"]])}},
        "children": {},
    }


def test_writer_counts_each_market_apart_and_publishes_what_is_in_the_files(tmp_path):
    """Faults 13 and 0: the writer counted ``records_written`` by (symbol, stream), so spot
    and USD-M BTCUSDT were one sum; and nothing said how old the written output was."""
    writer = _writer(tmp_path)
    sink = _Sink()
    writer._sink = sink  # as run() does
    batch = [_trade("spot", 1, NOW_MS - 9000), _trade("usdm", 7, NOW_MS - 5000),
             _trade("spot", 2, NOW_MS - 8000), _trade("spot", 3, NOW_MS - 4000),
             _trade("usdm", 8, NOW_MS - 3000)]  # fmt: skip

    async def main() -> None:
        assert await writer._write(sink, encode_batch(batch)) is True
        # A flush that left rows pending: only streams whose last key the sink holds count.
        sink.pending_rows = 1
        sink.held = {StreamKey("binance", "usdm", "BTCUSDT", "aggtrade"): 8}
        await writer._flushed(sink)

    anyio.run(main)
    view = build_view(_doc_from(writer), check_pid=False, now=NOW_MS / 1000)
    rows = {r.pipeline: r for r in view.streams}
    assert (rows["spot"].written, rows["usdm"].written) == (3, 2)
    assert (rows["spot"].flushed, rows["usdm"].flushed) == (0, 2)
    assert rows["usdm"].behind == pytest.approx(3.0) and rows["spot"].behind is None
    # The rest reaches the files: spot is confirmed and its newest written trade shows.
    sink.pending_rows = 0
    anyio.run(writer._flushed, sink)
    view = build_view(_doc_from(writer), check_pid=False, now=NOW_MS / 1000)
    rows = {r.pipeline: r for r in view.streams}
    assert (rows["spot"].flushed, rows["spot"].behind) == (3, pytest.approx(4.0))
    doc = _doc_from(writer)
    # The sink section still sums the markets per symbol for readers of the raw document.
    assert doc["sinks"]["csv"]["streams"]["BTCUSDT"]["aggtrade"]["records_written"] == 5
    process = doc["sinks"]["csv"]["process"]
    assert process["last_flush_time"] > 0 and process["rows_pending"] == 0


def test_worker_publishes_the_cadence_of_clocked_streams():
    class Opts(msgspec.Struct):
        interval: Any = None

    assert _cadence_of(Opts("1m")) == 60.0
    assert _cadence_of(Opts(2.5)) == 2.5
    for value in ("update", 0, "0", None, float("nan"), float("inf"), True):
        assert _cadence_of(Opts(value)) is None, value
    assert _cadence_of(object()) is None


# -- the real runtime in a subprocess ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def _sink_total(doc: dict | None, sink: str, name: str) -> int:
    if not doc:
        return 0
    return doc["sinks"].get(sink, {}).get("totals", {}).get(name, 0)


@pytest.mark.timeout(90)
def test_a_full_disk_shows_as_write_errors_in_status_health_and_metrics(tmp_path, write_config):
    """Fault 10: the CSV sink's failed writes (counted per stream) never reached the status
    table, ``streamer health`` or ``/metrics``; a full disk read as healthy."""
    state = tmp_path / "state"
    data = tmp_path / "csv"
    port = _free_port()
    config = write_config(
        sinks={"files": {"type": "full_csv", "path": str(data), "flush_interval": "100ms"}},
        pipeline={"sinks": ["files"]},
        runtime={"metrics_port": port},
    )
    proc = start_streamer(
        ["run", "--config", str(config)], cwd=tmp_path,
        STREAMER_PLUGIN_MODULES="core_plugins,monitor_plugins",
    )  # fmt: skip
    try:
        wait_for(lambda: _sink_total(load_status(state), "files", "rows_written") > 100,
                 what="rows in files")  # fmt: skip
        before = check_health(state / "status.json", window=1.0)
        assert not any("write error" in p for p in before.problems), before.problems
        (tmp_path / "csv.full").touch()  # the disk is full from now on
        wait_for(lambda: _sink_total(load_status(state), "files", "write_errors") > 0,
                 what="write errors counted")  # fmt: skip

        report = check_health(state / "status.json", window=1.0)
        assert report.health == "degraded" and report.code == 1
        assert any(p.startswith("sink files has ") and "write error(s)" in p
                   for p in report.problems), report.problems  # fmt: skip
        cli = subprocess.run(
            [sys.executable, "-m", "streamer", "health", "--state-dir", str(state)],
            capture_output=True, text=True, env=subprocess_env(), timeout=30,
        )  # fmt: skip
        assert cli.returncode == 1 and "write error(s)" in cli.stdout, cli.stdout + cli.stderr

        view = sample(state / "status.json", window=1.0)
        sink = next(s for s in view.sinks if s.name == "files")
        assert sink.write_errors > 0 and sink.rows_buffered > 0
        assert table_cells(render_table(view), "dups", "files")["errors"] == str(sink.write_errors)

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        errors = [line for line in metrics.splitlines()
                  if line.startswith('streamer_sink_write_errors_total{sink="files"}')]  # fmt: skip
        assert errors and int(errors[0].split()[-1]) > 0, metrics
        assert 'streamer_sink_stream_write_errors_total{sink="files",symbol=' in metrics

        os.unlink(tmp_path / "csv.full")  # space again: the retried rows are written
        wait_for(lambda: (d := load_status(state))
                 and d["sinks"]["files"]["process"].get("rows_buffered") == 0,
                 what="the retry buffer drained")  # fmt: skip
    finally:
        code, err = _finish(proc)
    assert code == 0, err
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_a_stopped_writer_is_degraded_within_seconds_and_recovers(tmp_path, write_config):
    """Fault 12: a writer stopped with SIGSTOP read HEALTHY for a minute: nothing checked
    that it kept flushing while batches piled up for it."""
    state = tmp_path / "state"
    proc = start_streamer(["run", "--config", str(write_config())], cwd=tmp_path)
    status = state / "status.json"

    def sink_a(doc: dict):
        view = build_view(doc, check_pid=False)
        return next(s for s in view.sinks if s.name == "a"), view

    try:
        doc = wait_for(
            lambda: (d := load_status(state)) and _sink_total(d, "a", "records_written") > 200
            and d, what="records written",
        )  # fmt: skip
        assert STALLED not in sink_a(doc)[0].flags
        assert doc["sinks"]["a"]["process"]["flush_interval_ms"] == 200
        writer = doc["children"]["sink.a"]["pid"]
        os.kill(writer, signal.SIGSTOP)
        try:
            stalled = wait_for(
                lambda: (d := load_status(state)) and STALLED in sink_a(d)[0].flags and d,
                timeout=30, what="sink a flagged stalled",
            )  # fmt: skip
            sink, view = sink_a(stalled)
            assert sink.pending > 0 and sink.since_flush >= 5.0
            assert any(p.startswith("sink a has not flushed for") for p in view.problems)
            report = check_health(status, window=1.0)
            assert report.code == 1
            assert any(p.startswith("sink a has not flushed for") for p in report.problems)
        finally:
            os.kill(writer, signal.SIGCONT)
        wait_for(lambda: (d := load_status(state)) and not sink_a(d)[0].flags,
                 timeout=30, what="sink a flushing again")  # fmt: skip
    finally:
        code, err = _finish(proc)
    assert code == 0, err
    a = read_lines(tmp_path / "a")
    assert a == read_lines(tmp_path / "b")
    for ids in a.values():
        assert ids == list(range(ids[0], ids[0] + len(ids)))
