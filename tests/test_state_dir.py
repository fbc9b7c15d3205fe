"""One rule for the state directory in every command (issue 11, fault 5).

``--state-dir`` > the config's ``runtime.state_dir`` > ``$STREAMER_STATE_DIR`` >
``.streamer``: ``run``, ``daemon start|stop|status``, ``status`` and ``health`` must all
land on the same directory, or ``daemon stop`` says "not running" while the collector
runs and ``health`` says DOWN for a healthy one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import synth_config
from test_ops_cli import live_doc
from typer.testing import CliRunner

from streamer.cli import build_app
from streamer.core import runtime
from streamer.core.config import RuntimeConfig, load_config, resolve_state_dir
from streamer.core.ops import daemon as d
from streamer.core.runtime.supervisor import Supervisor

#: scenario -> (pass --state-dir, config sets state_dir, give --config, env set, winner)
SCENARIOS = {
    "flag": (True, True, True, True, "flag"),
    "config": (False, True, True, True, "config"),
    "env": (False, False, True, True, "env"),  # a config that does not name one
    "env-without-config": (False, False, False, True, "env"),
    "default": (False, False, True, False, "default"),
}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch):
    """``(args, expected dir)`` for a scenario, run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMER_STATE_DIR", raising=False)
    dirs = {
        "flag": tmp_path / "from-flag",
        "config": tmp_path / "from-config",
        "env": tmp_path / "from-env",
        "default": tmp_path / ".streamer",
    }

    def make(scenario: str) -> tuple[list[str], Path]:
        flag, in_config, with_config, env, winner = SCENARIOS[scenario]
        args = []
        if with_config:
            data = synth_config(tmp_path)
            del data["runtime"]["state_dir"]
            if in_config:
                data["runtime"]["state_dir"] = str(dirs["config"])
            config = tmp_path / "streamer.yaml"
            config.write_text(yaml.safe_dump(data))
            args += ["--config", str(config)]
        if flag:
            args += ["--state-dir", str(dirs["flag"])]
        if env:
            monkeypatch.setenv("STREAMER_STATE_DIR", str(dirs["env"]))
        return args, dirs[winner]

    return make


def invoke(*args: str):
    return CliRunner().invoke(build_app(), list(args))


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_run(setup, scenario, monkeypatch):
    args, expected = setup(scenario)
    seen = []
    monkeypatch.setattr(runtime, "run", lambda cfg, *a, **k: seen.append(cfg) or 0)
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    assert Path(seen[0].runtime.state_dir).absolute() == expected


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_daemon_start(setup, scenario, monkeypatch):
    args, expected = setup(scenario)
    calls = []
    monkeypatch.setattr(
        d, "start", lambda paths, run_args, **o: calls.append((paths, run_args)) or
        d.StartResult(pid=1, ready=True, running=True, message="ok"),
    )  # fmt: skip
    result = invoke("daemon", "start", *args)
    assert result.exit_code == 0, result.output
    paths, run_args = calls[0]
    assert paths.state_dir == expected and paths.pidfile == expected / "streamer.pid"
    # ... and the run it starts publishes there.
    assert run_args[-2:] == ["--state-dir", str(expected)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_daemon_stop(setup, scenario):
    args, expected = setup(scenario)
    expected.mkdir(parents=True)
    d.write_pidfile(expected / "streamer.pid", d.PidInfo(pid=dead_pid(), start_ticks=1))
    result = invoke("daemon", "stop", *args)
    assert result.exit_code == 0, result.output
    assert "removed a stale pidfile" in result.output
    assert not (expected / "streamer.pid").exists()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_daemon_status(setup, scenario):
    args, expected = setup(scenario)
    expected.mkdir(parents=True)
    d.write_pidfile(expected / "streamer.pid", d.PidInfo(pid=dead_pid(), start_ticks=1))
    result = invoke("daemon", "status", *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("dead: pid") and str(expected) in result.output


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("command", ["status", "health"])
def test_status_and_health(setup, scenario, command):
    args, expected = setup(scenario)
    expected.mkdir(parents=True)
    (expected / "status.json").write_text(json.dumps(live_doc()))
    result = invoke(command, *args, "--window", "0")
    assert result.exit_code == 0, result.output
    assert "HEALTHY" in result.output


def test_the_rule(monkeypatch):
    monkeypatch.delenv("STREAMER_STATE_DIR", raising=False)
    explicit = RuntimeConfig(state_dir="cfg")
    assert resolve_state_dir("flag", explicit, {"STREAMER_STATE_DIR": "env"}) == Path("flag")
    assert resolve_state_dir(None, explicit, {"STREAMER_STATE_DIR": "env"}) == Path("cfg")
    assert resolve_state_dir(None, RuntimeConfig(), {"STREAMER_STATE_DIR": "env"}) == Path("env")
    assert resolve_state_dir(None, None, {"STREAMER_STATE_DIR": ""}) == Path(".streamer")
    assert resolve_state_dir("~/x", None, {}) == Path.home() / "x"
    monkeypatch.setenv("STREAMER_STATE_DIR", "from-env")
    assert resolve_state_dir(None, None) == Path("from-env")


def test_a_supervisor_started_without_the_cli_follows_the_rule(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("STREAMER_STATE_DIR", str(tmp_path / "env"))
    data = synth_config(tmp_path)
    del data["runtime"]["state_dir"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    supervisor = Supervisor(load_config(tmp_path / "c.yaml"), None, [], sink_types={})
    assert supervisor.state_dir == str(tmp_path / "env")
    supervisor._publish()
    assert json.loads((tmp_path / "env" / "status.json").read_text())["pid"] == os.getpid()


def test_config_show_names_the_effective_state_dir(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("STREAMER_STATE_DIR", str(tmp_path / "env"))
    data = synth_config(tmp_path)
    del data["runtime"]["state_dir"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("STREAMER_PLUGIN_MODULES", "core_plugins")
    result = invoke("config", "show", str(tmp_path / "c.yaml"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["runtime"]["state_dir"] == str(tmp_path / "env")
