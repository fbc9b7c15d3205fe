"""Prometheus text endpoint: exposition format and the loopback HTTP server."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest
from test_ops_status import NOW_MS, make_doc

from streamer.core.ops.prometheus import (
    file_source,
    metrics_endpoint,
    render_metrics,
    serve_metrics,
)

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+]+$')


def test_exposition_declares_each_metric_once_and_every_line_parses():
    text = render_metrics(make_doc())
    lines = text.splitlines()
    helps = [line.split()[2] for line in lines if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    family = ""
    seen: list[str] = []
    for line in lines:
        assert line.startswith("# ") or SAMPLE.match(line), line
        if line.startswith("# TYPE"):
            family = line.split()[2]
            seen.append(family)
        elif not line.startswith("#"):
            # Samples of a family are contiguous, right after its TYPE line.
            assert line.split("{")[0].split()[0] == family, line
    assert len(seen) == len(set(seen))
    btc = '{pipeline="spot",symbol="BTCUSDT",stream="aggtrade"}'
    assert f"streamer_messages_total{btc} 1000" in lines
    assert f"streamer_rows_flushed_total{btc} 990" in lines
    assert f"streamer_gaps_found_total{btc} 3" in lines
    assert f"streamer_last_event_time_seconds{btc} {(NOW_MS - 500) / 1000!r}" in lines
    assert 'streamer_rest_weight_used{pipeline="spot"} 120' in lines
    assert 'streamer_child_up{child="spot.worker0",kind="worker"} 1' in lines
    assert 'streamer_pipeline_counter{pipeline="spot",name="ws_messages"} 3500' in lines
    assert "streamer_up 1" in lines


def test_label_values_are_escaped():
    doc = make_doc()
    doc["pipelines"]['we"ird\\name'] = doc["pipelines"].pop("spot")
    text = render_metrics(doc)
    assert 'pipeline="we\\"ird\\\\name"' in text


def test_no_status_is_up_zero():
    assert render_metrics(None) == (
        "# HELP streamer_up 1 when a collector publishes status.\n"
        "# TYPE streamer_up gauge\nstreamer_up 0\n"
    )


def test_file_source_reads_each_time_and_tolerates_absence(tmp_path):
    source = file_source(tmp_path / "status.json")
    assert source() is None
    (tmp_path / "status.json").write_text('{"pipelines": {}}')
    assert source() == {"pipelines": {}}


@pytest.mark.timeout(30)
def test_server_answers_metrics_root_404_and_405_on_loopback():
    docs = [make_doc()]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, lambda: docs[0], 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                r = await c.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
                assert "streamer_up 1" in r.text
                docs[0] = None  # the collector went away
                assert "streamer_up 0" in (await c.get("/metrics")).text
                assert (await c.get("/")).status_code == 200
                assert (await c.get("/nope")).status_code == 404
                assert (await c.post("/metrics")).status_code == 405
            tg.cancel_scope.cancel()

    anyio.run(main)


@pytest.mark.timeout(30)
def test_a_broken_document_is_a_500_not_a_dead_endpoint():
    def source():
        raise RuntimeError("boom")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, source, 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                r = await c.get("/metrics")
                assert r.status_code == 500 and "boom" in r.text
                assert (await c.get("/")).status_code == 200
            tg.cancel_scope.cancel()

    anyio.run(main)


@pytest.mark.timeout(30)
def test_metrics_endpoint_logs_a_busy_port_and_returns(caplog):
    import logging
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    logger = logging.getLogger("streamer.test.metrics")
    try:
        with caplog.at_level(logging.ERROR):
            anyio.run(metrics_endpoint, lambda: None, port, logger)
            anyio.run(metrics_endpoint, lambda: None, 0, logger)  # off: returns at once
    finally:
        busy.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"[metrics] cannot listen on 127.0.0.1:{port} (Address already in use); "
        "running without the metrics endpoint"
    ]


@pytest.mark.timeout(60)
def test_metrics_command_serves_the_status_file(tmp_path):
    import json
    import socket
    import subprocess
    import sys
    import time

    (tmp_path / "status.json").write_text(json.dumps(make_doc()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        "import typer\n"
        "from streamer.core.ops.commands import add_commands\n"
        "app = typer.Typer()\n"
        "@app.callback()\n"
        "def root():\n"
        "    pass\n"
        "add_commands(app)\n"
        "app()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "metrics", "--state-dir", str(tmp_path), "--port",
         str(port)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the endpoint never came up"
                time.sleep(0.1)
        assert r.status_code == 200
        assert (
            'streamer_messages_total{pipeline="spot",symbol="ETHUSDT",stream="aggtrade"} 1900'
            in r.text
        )
    finally:
        proc.terminate()
        proc.wait(10)


def test_sink_write_errors_counted_per_stream_are_exported_with_labels():
    """Fault 10: ``streamer_sink_write_errors_total`` read the process-wide counter only and
    stayed 0 while the CSV sink counted its failed writes per stream."""
    doc = make_doc()
    sink = doc["sinks"]["csv"]
    sink["streams"]["BTCUSDT"]["aggtrade"]["write_errors"] = 5
    sink["totals"]["write_errors"] = 5
    sink["process"].update(rows_buffered=40, last_flush_time=NOW_MS - 20_000,
                           flush_interval_ms=1000, rows_pending=40)  # fmt: skip
    lines = render_metrics(doc).splitlines()
    assert 'streamer_sink_write_errors_total{sink="csv"} 5' in lines
    assert (
        'streamer_sink_stream_write_errors_total{sink="csv",symbol="BTCUSDT",stream="aggtrade"} 5'
        in lines
    )
    assert 'streamer_sink_rows_buffered{sink="csv"} 40' in lines
    assert 'streamer_sink_pending{sink="csv"} 45' in lines  # 40 rows + 2 + 3 queued batches
    assert 'streamer_sink_since_flush_seconds{sink="csv"} 20.0' in lines
    assert 'streamer_sink_flagged{sink="csv",flag="stalled"} 1' in lines


def test_behind_and_held_series_per_stream():
    doc = make_doc()
    doc["sinks"]["csv"]["markets"] = {
        "binance/spot": {"BTCUSDT": {"aggtrade": {"records_written": 995,
                                                  "written_event_time": NOW_MS - 1500}}}
    }  # fmt: skip
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"].update(
        trades_held=12, held_for_ms=2500
    )
    lines = render_metrics(doc).splitlines()
    btc = '{pipeline="spot",symbol="BTCUSDT",stream="aggtrade"}'
    assert f"streamer_behind_seconds{btc} 1.5" in lines
    assert f"streamer_trades_held{btc} 12" in lines
    assert f"streamer_held_seconds{btc} 2.5" in lines
    # Not published: no series at all.
    assert not any("ETHUSDT" in line for line in lines if line.startswith("streamer_behind"))
