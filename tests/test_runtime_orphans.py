"""What a run leaves behind when things go wrong (issue 11, fault 14 in part).

* An unwritable state dir is logged at most once a minute, not every status interval,
  and counted in ``status_write_errors`` once status can be written again.
* After ``kill -9`` of the supervisor every child logs one line, exits without a
  traceback, and the children remove the socket folder on their way out; a folder left by
  a run whose processes were all killed is swept by the next run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import pytest
import yaml
from conftest import load_status, start_streamer, synth_config, wait_for

from streamer.core.config import parse_config
from streamer.core.ops.daemon import pid_alive
from streamer.core.runtime import channels, child, worker
from streamer.core.runtime.supervisor import Supervisor


def test_an_unwritable_state_dir_is_logged_once_not_every_interval(tmp_path: Path, caplog):
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state directory should be")
    data = synth_config(tmp_path, runtime={"state_dir": str(blocked)})
    supervisor = Supervisor(parse_config(data), None, [], sink_types={})
    with caplog.at_level(logging.INFO, logger="streamer.supervisor"):
        for _ in range(30):  # 30 status intervals
            supervisor._publish()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "cannot write status to" in errors[0].getMessage()
        blocked.unlink()
        supervisor._publish()
    assert load_status(blocked)["status_write_errors"] == 30
    assert "status written to" in caplog.records[-1].getMessage()


@pytest.fixture
def private_tmp():
    """A short private temporary directory (Unix socket paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="stt"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_after_a_supervisor_sigkill_children_exit_quietly_and_clean_up(
    tmp_path: Path, private_tmp: Path
):
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump(synth_config(tmp_path)))
    proc = start_streamer(["run", "--config", str(config)], tmp_path, TMPDIR=str(private_tmp))
    try:
        # Every child connected (it reported status) and data flows.
        doc = wait_for(
            lambda: (
                (d := load_status(tmp_path / "state"))
                and len(d["children"]) == 4
                and all(c["alive"] and c["info"] for c in d["children"].values())
                and d["pipelines"]["synth"]["totals"].get("records_emitted")
                and d
            ),
            timeout=60,
            what="every child running",
        )
        assert len(list(private_tmp.glob("streamer-*"))) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pids = {name: c["pid"] for name, c in doc["children"].items()}
        for name, pid in pids.items():
            wait_for(lambda pid=pid: not pid_alive(pid), timeout=30, what=f"{name} to exit")
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in err, err
    for name in pids:
        said = [line for line in err.splitlines() if f" {name} " in line and "WARNING" in line]
        said += [line for line in err.splitlines() if f" {name} " in line and "ERROR" in line]
        assert len(said) == 1 and "the supervisor is gone" in said[0], (name, said)
    assert list(private_tmp.glob("streamer-*")) == []


def test_the_next_run_sweeps_socket_folders_of_dead_runs(private_tmp: Path, monkeypatch):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(done.stdout)
    left = private_tmp / f"streamer-{dead}-abc123"
    left.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(left / "ctl.sock"))
    live = private_tmp / f"streamer-{os.getpid()}-def456"
    live.mkdir()
    other = private_tmp / f"streamer-{dead}-notours"
    other.mkdir()
    (other / "data.csv").write_text("not a socket: kept")
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    made = Path(channels.make_socket_dir())
    assert not left.exists()
    assert live.is_dir() and other.is_dir()
    assert made.parent == private_tmp and made.name.startswith(f"streamer-{os.getpid()}-")


def test_a_child_stops_retrying_its_connection_once_the_supervisor_is_gone(
    private_tmp: Path, monkeypatch
):
    path = private_tmp / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening: connection refused
        monkeypatch.setattr(worker, "supervisor_gone", lambda: True)

        async def connect():
            with anyio.fail_after(10):
                await worker.connect_unix_retry(str(path), timeout=30)

        with pytest.raises(child.SupervisorGone):
            anyio.run(connect)
