"""Sink start-up: path checks shared by ``config check`` and ``run``, the data-dir lock, and
a sink that cannot open ending the run (issue 11, faults 1 and 6)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_status, start_streamer, subprocess_env, synth_config, wait_for

PLUGINS = "core_plugins,sink_fault_plugins"
LOCK_NAME = ".streamer.lock"


def csv_config(tmp_path: Path, data: Path, state: str = "state", name: str = "c.yaml") -> Path:
    cfg = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(data), "flush_interval": "100ms"}},
        pipeline={"sinks": ["files"]},
        runtime={"state_dir": str(tmp_path / state)},
    )
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def streamer(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``streamer ARGS``; every call here is expected to end by itself, and quickly."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        cwd=cwd,
        env=subprocess_env(STREAMER_PLUGIN_MODULES=PLUGINS),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _file_path(tmp_path: Path) -> Path:
    (tmp_path / "datafile").write_text("not a directory\n")
    return tmp_path / "datafile"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "datafile").write_text("not a directory\n")
    return tmp_path / "datafile" / "csv"


def _not_writable(tmp_path: Path) -> Path:
    # Not writable even by root (tests may run as root, who ignores chmod).
    return Path("/proc/sys/streamer-test-data")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_file_path, "is not a directory"),
        (_under_a_file, "datafile is not a directory"),
        (_not_writable, "cannot be created in /proc/sys"),
    ],
    ids=["file", "under-a-file", "not-writable"],
)
def test_config_check_and_run_refuse_a_bad_data_dir_with_the_same_line(
    tmp_path: Path, make, expected: str
) -> None:
    data = make(tmp_path)
    config = csv_config(tmp_path, data)
    check = one_error_line(streamer(["config", "check", str(config)], tmp_path))
    run = one_error_line(streamer(["run", "--config", str(config), "--duration", "5"], tmp_path))
    assert check == run
    assert check.startswith(f"error: sinks.files: path {data}")
    assert expected in check
    assert not (tmp_path / "state" / "status.json").exists()  # nothing was started


def test_run_reports_a_bad_data_dir_before_it_asks_the_exchange(tmp_path: Path) -> None:
    # The sink check is local: a bad path must not hide behind an unreachable exchange.
    data = _file_path(tmp_path)
    cfg = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(data)}},
        pipeline={"sinks": ["files"], "options": {"unreachable": True}},
        runtime={"state_dir": str(tmp_path / "state")},
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = one_error_line(streamer(["run", "--config", str(config), "--duration", "5"], tmp_path))
    assert run.startswith(f"error: sinks.files: path {data}"), run


def test_two_sinks_on_one_path_are_refused(tmp_path: Path) -> None:
    cfg = synth_config(
        tmp_path,
        sinks={
            "one": {"type": "csv", "path": str(tmp_path / "csv")},
            "two": {"type": "csv", "path": str(tmp_path / "x" / ".." / "csv")},
        },
        pipeline={"sinks": ["one", "two"]},
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    line = one_error_line(streamer(["config", "check", str(config)], tmp_path))
    assert line == f"error: sinks.one and sinks.two both write {tmp_path / 'csv'}; " + (
        "give each sink its own path"
    )


def _rows(state: Path) -> int:
    status = load_status(state)
    if not status or status.get("state") != "running":
        return 0
    return status["sinks"].get("files", {}).get("totals", {}).get("rows_written", 0)


def test_second_collector_on_a_path_in_use_is_refused_and_the_lock_dies_with_the_holder(
    tmp_path: Path,
) -> None:
    data = tmp_path / "csv"
    first_cfg = csv_config(tmp_path, data, state="state1", name="one.yaml")
    second_cfg = csv_config(tmp_path, data, state="state2", name="two.yaml")
    first = start_streamer(["run", "--config", str(first_cfg)], cwd=tmp_path)
    try:
        wait_for(lambda: _rows(tmp_path / "state1") > 50, what="first collector writing")
        line = one_error_line(streamer(["run", "--config", str(second_cfg)], tmp_path))
        assert line == (
            f"error: {data} is in use by pid {first.pid} (state dir {tmp_path / 'state1'}, "
            f"since {json.loads((data / LOCK_NAME).read_text())['started']})"
        )
        assert load_status(tmp_path / "state2") is None
        os.kill(first.pid, signal.SIGKILL)  # no clean-up at all: the lock must go with it
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)
    third = start_streamer(["run", "--config", str(second_cfg)], cwd=tmp_path)
    try:
        wait_for(lambda: _rows(tmp_path / "state2") > 0, what="third collector writing")
    finally:
        third.send_signal(signal.SIGTERM)
        _, err = third.communicate(timeout=60)
    assert third.returncode == 0, err


def test_locks_in_process_and_a_removed_lock_file_is_restored(tmp_path: Path) -> None:
    from streamer.core.runtime.sinklock import PathLocks

    data = tmp_path / "csv"
    holder = PathLocks(str(tmp_path / "state"))
    holder.acquire({"files": [str(data)]})
    try:
        with pytest.raises(ValueError, match=rf"^{data} is in use by pid {os.getpid()} "):
            PathLocks(str(tmp_path / "other")).acquire({"files": [str(data)]})
        # The whole data dir deleted while running: the lock file goes with it...
        (data / LOCK_NAME).unlink()
        data.rmdir()
        holder.refresh()
        assert (data / LOCK_NAME).exists()
        # ... and is taken again, so a collector started afterwards is still refused.
        with pytest.raises(ValueError, match="is in use by"):
            PathLocks(str(tmp_path / "other")).acquire({"files": [str(data)]})
    finally:
        holder.release()
    PathLocks(str(tmp_path / "other")).acquire({"files": [str(data)]})


def test_check_sinks_returns_absolute_claims_and_names_a_failing_sink(tmp_path: Path) -> None:
    from streamer.core.runtime.sinklock import check_sinks
    from streamer.plugins.sinks.csv_batch import CsvSink, Options

    class Registry:
        @staticmethod
        def sink(name):
            return CsvSink

    claims = check_sinks({"a": ("csv", Options(path="relative/dir"))}, Registry())
    assert claims == {"a": [os.path.abspath("relative/dir")]}
    (tmp_path / "f").touch()
    expected = f"sinks.b: path {tmp_path / 'f'} is not a directory"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_sinks({"b": ("csv", Options(path=str(tmp_path / "f")))}, Registry())


def test_a_sink_that_cannot_open_ends_the_run_with_one_line(tmp_path: Path) -> None:
    cfg = synth_config(
        tmp_path,
        sinks={"bad": {"type": "broken", "path": "/nowhere"}},
        pipeline={"sinks": ["bad"]},
        runtime={"restart_backoff_max": 1},
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = streamer(["run", "--config", str(config), "--quiet"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert len(lines) == 1, result.stderr
    assert "sinks.bad: cannot open: /nowhere: Input/output error; run stopped" in lines[0]
    status = load_status(tmp_path / "state")
    assert status["children"]["sink.bad"]["restarts"] == 0
    assert status["exit_code"] == 1
