"""Live summary and metrics endpoint beside a run, fed by the status file."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
from test_ops_status import make_doc

from streamer.core.config import RuntimeConfig
from streamer.core.ops.sidecar import run_sidecars


def publish(state: Path, doc: dict) -> None:
    tmp = state / ".tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(state / "status.json")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(30)
def test_summary_lines_follow_the_status_and_metrics_are_served(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    out = io.StringIO()
    runtime = RuntimeConfig(state_dir=str(state), metrics_port=free_port())
    with run_sidecars(runtime, stream=out, summary_every=0.05, force_summary=True) as port:
        assert port == runtime.metrics_port
        url = f"http://127.0.0.1:{port}/metrics"
        assert "streamer_up 0" in httpx.get(url, timeout=5).text  # nothing published yet
        first = make_doc()
        publish(state, first)
        wait_for(lambda: "msgs 3000" in out.getvalue(), what="the first summary line")
        assert "streamer_messages_total" in httpx.get(url, timeout=5).text
        second = make_doc(updated_at=first["updated_at"] + 1000)
        second["pipelines"]["spot"]["totals"]["records_emitted"] = 3500
        publish(state, second)
        wait_for(lambda: "msgs 3500 (500/s)" in out.getvalue(), what="a rate over 1 s")
        publish(state, make_doc(updated_at=first["updated_at"] + 2000, state="stopped"))
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[stopped]")  # the final document is always shown
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)  # the endpoint is gone with the run


@pytest.mark.timeout(30)
def test_a_busy_metrics_port_is_logged_and_the_run_goes_on(tmp_path: Path, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        runtime = RuntimeConfig(state_dir=str(tmp_path), metrics_port=busy.getsockname()[1])
        with caplog.at_level(logging.ERROR), run_sidecars(runtime, quiet=True) as port:
            assert port is None
    assert "[metrics] cannot listen on 127.0.0.1" in caplog.text


def test_nothing_runs_when_quiet_and_metrics_are_off(tmp_path: Path):
    out = io.StringIO()
    publish_dir = tmp_path
    publish(publish_dir, make_doc())
    with run_sidecars(RuntimeConfig(state_dir=str(tmp_path)), stream=out) as port:
        assert port is None
    assert out.getvalue() == ""  # StringIO is not a terminal: no summary
