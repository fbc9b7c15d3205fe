"""Daemon machinery (pidfile, start, stop, restart) with a trivial fake collector.

The fake publishes a status document like the runtime does, so readiness, graceful stop,
forced stop, start failures and stale pidfiles are tested without the real runtime (the
end-to-end tests with the real one are in ``test_ops_integration.py``).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from streamer.core.ops import daemon as d

FAKE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    state_dir, mode = sys.argv[1], sys.argv[2]
    print(f"fake collector {os.getpid()} mode={mode}", flush=True)
    if mode == "fail":
        print("error: bad config: pipelines[0].symbols: unknown symbol FOO", flush=True)
        sys.exit(3)
    started = int(time.time() * 1000)
    state = {"stop": False}
    if mode == "linger":
        # A child that ignores SIGTERM and outlives this process.
        subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(60)"])
    def on_term(signum, frame):
        if mode == "stubborn":
            print("ignoring SIGTERM", flush=True)
            return
        state["stop"] = True
    signal.signal(signal.SIGTERM, on_term)
    def publish(status):
        doc = {"pid": os.getpid(), "started_at": started,
               "updated_at": int(time.time() * 1000), "state": status,
               "exit_code": 0 if status == "stopped" else None, "pipelines": {}, "sinks": {},
               "children": {"p.worker0": {"kind": "worker", "pid": os.getpid(),
                                          "alive": status == "running", "restarts": 0}}}
        tmp = os.path.join(state_dir, ".status.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, os.path.join(state_dir, "status.json"))
    while not state["stop"]:
        if mode != "silent":
            publish("running")
        time.sleep(0.05)
    publish("stopped")
    print("stopped cleanly", flush=True)
    """
)


@pytest.fixture
def fake(tmp_path: Path):
    """``(paths, argv(mode))`` for a fake collector in a fresh state dir; stops it after."""
    script = tmp_path / "fake_streamer.py"
    script.write_text(FAKE)
    paths = d.DaemonPaths.for_state_dir(tmp_path / "state")
    paths.state_dir.mkdir()

    def argv(mode: str = "ok") -> list[str]:
        return [sys.executable, str(script), str(paths.state_dir), mode]

    yield paths, argv
    # Only a collector this test started, never whatever a pidfile names: os.killpg(1, ...)
    # is kill(-1, ...), every process the caller may signal.
    state = d.check(paths)
    info = state.info
    ours = state.state == "running" and info and 1 < info.pid != os.getpgrp()
    if ours and d.process_cmdline(info.pid)[1:2] == [str(script)]:
        os.killpg(info.pid, signal.SIGKILL)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_start_waits_until_ready_and_writes_a_pidfile_with_the_start_time(fake):
    paths, argv = fake
    result = d.start(paths, argv=argv(), wait=20)
    assert result.ready and result.running, result.message
    info = d.read_pidfile(paths.pidfile)
    assert info is not None and info.pid == result.pid
    assert info.start_ticks == d.process_start_ticks(result.pid)
    assert info.argv == argv() and info.log_file == str(paths.log_file)
    assert d.check(paths).state == "running"
    # It runs detached: its own session, no controlling terminal.
    assert os.getsid(result.pid) == result.pid
    wait_until(lambda: "mode=ok" in d.tail(paths.log_file), what="the log")


def test_a_second_start_is_refused_with_a_clear_message(fake):
    paths, argv = fake
    first = d.start(paths, argv=argv(), wait=20)
    assert first.ready
    with pytest.raises(d.DaemonError, match=rf"already running: pid {first.pid} since .*stop"):
        d.start(paths, argv=argv(), wait=20)
    assert d.read_pidfile(paths.pidfile).pid == first.pid


def test_a_stale_pidfile_of_a_dead_process_is_recovered(fake):
    paths, argv = fake
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    d.write_pidfile(paths.pidfile, d.PidInfo(pid=pid, start_ticks=1))
    assert d.check(paths).state == "stale"
    result = d.start(paths, argv=argv(), wait=20)
    assert result.ready
    assert result.recovered_stale == (
        f"removed a stale pidfile {paths.pidfile}: pid {pid} is not running"
    )


def test_a_pidfile_whose_pid_was_reused_is_stale(fake):
    paths, _ = fake
    # Our own (live) pid, but a different start time: another program got the pid.
    ticks = d.process_start_ticks(os.getpid())
    d.write_pidfile(paths.pidfile, d.PidInfo(pid=os.getpid(), start_ticks=ticks + 1))
    state = d.check(paths)
    assert state.state == "stale"
    assert "belongs to another process" in state.reason
    # A pidfile with garbage in it is stale too, and stop cleans it up.
    paths.pidfile.write_text("not a pid")
    assert d.check(paths).state == "stale"
    result = d.stop(paths)
    assert result.outcome == "not-running" and "stale pidfile" in result.message
    assert not paths.pidfile.exists()


def test_stop_drains_gracefully_and_removes_the_pidfile(fake):
    paths, argv = fake
    started = d.start(paths, argv=argv(), wait=20)
    result = d.stop(paths, timeout=20)
    assert (result.outcome, result.pid) == ("stopped", started.pid)
    assert not paths.pidfile.exists()
    assert not d.pid_alive(started.pid)
    assert msgspec.json.decode(paths.status_file.read_bytes())["state"] == "stopped"
    wait_until(lambda: "stopped cleanly" in d.tail(paths.log_file), what="the last log line")
    assert d.stop(paths).outcome == "not-running"


def test_stop_forces_after_the_timeout_and_says_so(fake):
    paths, argv = fake
    started = d.start(paths, argv=argv("stubborn"), wait=20)
    result = d.stop(paths, timeout=0.5)
    assert result.outcome == "forced"
    assert "did not exit within 0.5s: killed its process group" in result.message
    assert not d.pid_alive(started.pid) and not paths.pidfile.exists()


def test_stop_kills_children_left_behind_by_the_supervisor(fake):
    paths, argv = fake
    started = d.start(paths, argv=argv("linger"), wait=20)
    result = d.stop(paths, timeout=20)
    assert result.outcome == "stopped"
    assert "killed children left behind" in result.message
    wait_until(lambda: not d.group_alive(started.pid), what="the process group to die")


def test_a_collector_that_dies_at_start_is_reported_with_its_log(fake):
    paths, argv = fake
    result = d.start(paths, argv=argv("fail"), wait=20)
    assert not result.ready and not result.running
    assert result.message.startswith("the collector exited with code 3 during start-up")
    assert "bad config: pipelines[0].symbols: unknown symbol FOO" in result.message
    assert not paths.pidfile.exists()


def test_not_ready_in_time_says_why_and_leaves_it_running(fake):
    paths, argv = fake
    result = d.start(paths, argv=argv("silent"), wait=0.5)
    assert not result.ready and result.running
    assert f"pid {result.pid} is running but not ready after 0.5s" in result.message
    assert "no status at" in result.message
    assert d.check(paths).state == "running"
    assert d.stop(paths, timeout=20).outcome == "stopped"


def test_status_left_by_an_earlier_run_does_not_count_as_ready(fake):
    paths, _ = fake
    old = {"pid": 1, "started_at": 1, "updated_at": 1000, "state": "stopped", "pipelines": {},
           "children": {"x": {"kind": "worker", "alive": True}}}  # fmt: skip
    paths.status_file.write_bytes(msgspec.json.encode(old))
    ok, why = d.status_ready(paths, 12345, time.time())
    assert not ok and "left over from an earlier run" in why


def test_restart_reuses_the_previous_command_line(fake):
    paths, argv = fake
    first = d.start(paths, argv=argv(), wait=20)
    stopped, started = d.restart(paths, stop_timeout=20, wait=20)
    assert stopped.outcome == "stopped" and stopped.pid == first.pid
    assert started.ready and started.pid != first.pid
    assert d.read_pidfile(paths.pidfile).argv == argv()
    # After a stop the pidfile is gone, but the last command line is remembered.
    d.stop(paths, timeout=20)
    _, again = d.restart(paths, stop_timeout=20, wait=20)
    assert again.ready and d.read_pidfile(paths.pidfile).argv == argv()


def test_restart_without_any_previous_start_is_an_error(fake):
    paths, _ = fake
    with pytest.raises(d.DaemonError, match="no previous command line"):
        d.restart(paths)


def test_a_concurrent_daemon_command_is_refused(fake):
    paths, argv = fake
    with open(paths.state_dir / d.LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(d.DaemonError, match="another 'streamer daemon' command"):
            d.start(paths, argv=argv(), wait=20)


def test_a_foreground_collector_on_the_same_state_dir_is_refused(fake, tmp_path):
    paths, argv = fake
    # Started outside the daemon (no pidfile), publishing to the same state dir.
    proc = subprocess.Popen(argv())
    try:
        wait_until(paths.status_file.exists, what="the foreground status")
        with pytest.raises(d.DaemonError, match=rf"a collector \(pid {proc.pid}\) .*outside"):
            d.start(paths, argv=argv(), wait=20)
    finally:
        proc.terminate()
        proc.wait(10)


# -- CLI -------------------------------------------------------------------------------------
def ops_app():
    import typer

    from streamer.core.ops.commands import add_commands

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    add_commands(app)
    return app


def test_cli_daemon_status_uses_lsb_exit_codes(fake):
    paths, argv = fake
    runner = CliRunner()
    app = ops_app()
    args = ["daemon", "status", "--state-dir", str(paths.state_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "not running" in result.output
    d.start(paths, argv=argv(), wait=20)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("running: pid")
    info = d.read_pidfile(paths.pidfile)
    os.killpg(info.pid, signal.SIGKILL)
    wait_until(lambda: not d.pid_alive(info.pid), what="the kill")
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.output.startswith("dead: pid")
    stop = runner.invoke(app, ["daemon", "stop", "--state-dir", str(paths.state_dir)])
    assert stop.exit_code == 0 and "removed a stale pidfile" in stop.output


def test_cli_daemon_stop_reports_graceful_and_forced(fake):
    paths, argv = fake
    runner = CliRunner()
    app = ops_app()
    d.start(paths, argv=argv(), wait=20)
    result = runner.invoke(app, ["daemon", "stop", "--state-dir", str(paths.state_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("stopped pid") and "final: 0 records produced" in result.output
    d.start(paths, argv=argv("stubborn"), wait=20)
    result = runner.invoke(
        app, ["daemon", "stop", "--state-dir", str(paths.state_dir), "--timeout", "0.3"]
    )
    assert result.exit_code == 1 and "forced stop of pid" in result.output


# -- only our own process is ever signalled (issue 11, fault 4) -------------------------------
@pytest.fixture
def bystander():
    """An unrelated live process (its own session, so no group kill can reach the tests)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait(10)


def _cli(*args: str):
    return CliRunner().invoke(ops_app(), list(args))


def test_stop_refuses_a_bare_pidfile_naming_an_unrelated_process(fake, bystander):
    paths, _ = fake
    paths.pidfile.write_text(f"{bystander.pid}\n")
    assert d.check(paths).state == "foreign"
    with pytest.raises(d.DaemonError, match=rf"refusing to signal: pid {bystander.pid} is alive"):
        d.stop(paths, timeout=1)
    result = _cli("daemon", "stop", "--state-dir", str(paths.state_dir), "--timeout", "1")
    assert result.exit_code == 1
    assert result.output.startswith("error: refusing to signal") and result.output.count("\n") == 1
    assert bystander.poll() is None, "an unrelated process was killed"
    assert paths.pidfile.exists()  # not ours to delete either: the operator decides
    status = _cli("daemon", "status", "--state-dir", str(paths.state_dir))
    assert status.exit_code == 4 and status.output.startswith("unknown: pid")
    with pytest.raises(d.DaemonError, match="names a live process that is not a collector"):
        d.start(paths, argv=["true"], wait=0)


def test_stop_refuses_a_process_whose_command_line_differs(fake, bystander):
    paths, argv = fake
    # Right pid and start time, but not the command the pidfile says was started.
    ticks = d.process_start_ticks(bystander.pid)
    d.write_pidfile(paths.pidfile, d.PidInfo(pid=bystander.pid, start_ticks=ticks, argv=argv()))
    state = d.check(paths)
    assert state.state == "foreign" and "not the command the pidfile recorded" in state.reason
    with pytest.raises(d.DaemonError, match="refusing to signal"):
        d.stop(paths, timeout=1)
    assert bystander.poll() is None


def test_stop_never_signals_pid_1(fake, monkeypatch):
    paths, _ = fake
    sent = []
    real_kill, real_killpg = os.kill, os.killpg

    # Signals other than 0 are recorded, never delivered: on the old code this would have
    # been SIGTERM to init and then killpg(1) = kill(-1), every process on the machine.
    def kill(pid, sig):
        if sig == 0:
            return real_kill(pid, sig)
        sent.append(("kill", pid, sig))

    def killpg(pgid, sig):
        if sig == 0:
            return real_killpg(pgid, sig)
        sent.append(("killpg", pgid, sig))

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "killpg", killpg)
    init = d.PidInfo(pid=1, start_ticks=d.process_start_ticks(1), argv=d.process_cmdline(1))
    try:
        for content in ("1\n", msgspec.json.encode(init).decode()):
            paths.pidfile.write_text(content)
            with pytest.raises(d.DaemonError, match="pid 1 is the init process"):
                d.stop(paths, timeout=0.2)
    finally:
        paths.pidfile.unlink(missing_ok=True)  # before any teardown reads it
    assert sent == []


def test_a_stale_pidfile_is_not_running_with_a_note_and_nothing_is_signalled(fake, bystander):
    paths, argv = fake
    # The pid was reused by the bystander: different start time, so stale, not foreign.
    ticks = d.process_start_ticks(bystander.pid)
    d.write_pidfile(paths.pidfile, d.PidInfo(pid=bystander.pid, start_ticks=ticks - 1, argv=argv()))
    result = _cli("daemon", "stop", "--state-dir", str(paths.state_dir))
    assert result.exit_code == 0
    assert result.output == (
        f"not running (removed a stale pidfile: pid {bystander.pid} now belongs to another "
        "process (start time differs))\n"
    )
    assert bystander.poll() is None and not paths.pidfile.exists()


def test_the_pidfile_records_what_proves_the_process_ours(fake):
    paths, argv = fake
    started = d.start(paths, argv=argv(), wait=20)
    info = d.read_pidfile(paths.pidfile)
    assert info.start_ticks == d.process_start_ticks(started.pid)
    assert d.process_cmdline(started.pid) == info.argv == argv()
    assert d.identify(info) == ("running", "")
    assert d.stop(paths, timeout=20).outcome == "stopped"
