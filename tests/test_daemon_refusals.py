"""``streamer daemon start`` when the collector refuses to start (issue 11).

The operator must see the collector's own one-line ``error:`` (the line ``streamer run``
prints in a terminal) and a non-zero exit, not a generic time-out nor a wall of log lines.
Everything runs the real CLI in subprocesses; the synth exchange and the fault sinks are
inline plugins from ``tests/``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_status, start_streamer, subprocess_env, synth_config, wait_for

PLUGINS = "core_plugins,sink_fault_plugins"


def streamer(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        cwd=cwd,
        env=subprocess_env(STREAMER_PLUGIN_MODULES=PLUGINS),
        capture_output=True,
        text=True,
        timeout=90,
    )


def write(tmp_path: Path, name: str, **changes) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(synth_config(tmp_path, **changes)))
    return path


def bad_option(tmp_path: Path) -> Path:
    return write(tmp_path, "c.yaml", pipeline={"streams": {"seq": {}, "orderbook": {"levels": 0}}})


def data_dir_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "datafile").write_text("not a directory\n")
    return write(
        tmp_path, "c.yaml", sinks={"a": {"type": "csv", "path": str(tmp_path / "datafile")}},
        pipeline={"sinks": ["a"]},
    )  # fmt: skip


def sink_cannot_open(tmp_path: Path) -> Path:
    return write(
        tmp_path, "c.yaml", sinks={"bad": {"type": "broken", "path": "/nowhere"}},
        pipeline={"sinks": ["bad"]}, runtime={"restart_backoff_max": 1},
    )  # fmt: skip


def unknown_symbol(tmp_path: Path) -> Path:
    return write(tmp_path, "c.yaml", pipeline={"symbols": ["AAA", "NOPE"]})


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (bad_option, "streams.orderbook.levels: must be an integer between 1 and 5000, got 0"),
        (data_dir_is_a_file, "is not a directory"),
        (sink_cannot_open, "sinks.bad: cannot open: /nowhere"),
        (unknown_symbol, "unknown symbol(s) on synth test: NOPE"),
    ],
    ids=["bad-option", "data-dir-is-a-file", "sink-cannot-open", "unknown-symbol"],
)
def test_daemon_start_shows_the_collectors_one_error_line(tmp_path: Path, make, fragment):
    config = make(tmp_path)
    run = streamer(["run", "--config", str(config), "--quiet"], tmp_path)
    assert run.returncode == 1, run.stderr
    # One line, "error: ..." (or, for a sink that fails to open, the supervisor's log line).
    run_errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    logged = [line.split(": ", 1)[1] for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(run_errors + logged) == 1, run.stderr
    expected = run_errors[0] if run_errors else f"error: {logged[0]}"
    assert fragment in expected, run.stderr
    # An earlier start's refusal in the log must not be taken for this one's.
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "streamer.log").write_text("error: an old refusal from another start\n")

    start = streamer(["daemon", "start", "-c", str(config), "--wait", "60"], tmp_path)
    assert start.returncode == 1, start.stderr
    assert "Traceback" not in start.stderr
    assert start.stderr.splitlines() == [expected], start.stderr
    assert not (state / "streamer.pid").exists()
    status = streamer(["daemon", "status", "-c", str(config)], tmp_path)
    assert status.returncode == 3, status.stdout  # LSB: not running


def test_daemon_start_on_a_data_dir_another_collector_holds(tmp_path: Path):
    data = tmp_path / "csv"
    sinks = {"files": {"type": "csv", "path": str(data), "flush_interval": "100ms"}}
    first_cfg = write(
        tmp_path, "one.yaml", sinks=sinks, pipeline={"sinks": ["files"]},
        runtime={"state_dir": str(tmp_path / "state1")},
    )  # fmt: skip
    second_cfg = write(
        tmp_path, "two.yaml", sinks=sinks, pipeline={"sinks": ["files"]},
        runtime={"state_dir": str(tmp_path / "state2")},
    )  # fmt: skip
    first = start_streamer(["run", "--config", str(first_cfg)], cwd=tmp_path)
    try:
        wait_for(
            lambda: (load_status(tmp_path / "state1") or {}).get("state") == "running",
            timeout=60, what="the first collector running",
        )  # fmt: skip
        start = streamer(["daemon", "start", "-c", str(second_cfg), "--wait", "60"], tmp_path)
        assert start.returncode == 1, start.stderr
        lines = start.stderr.splitlines()
        assert len(lines) == 1, start.stderr
        assert lines[0].startswith(f"error: {data} is in use by pid {first.pid} "), lines[0]
        assert f"(state dir {tmp_path / 'state1'}, since " in lines[0]
        assert not (tmp_path / "state2" / "streamer.pid").exists()
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 0
