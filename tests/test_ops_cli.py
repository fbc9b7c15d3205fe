"""The operations commands' options and outputs (status, health, daemon start arguments)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec
import pytest
import typer
import yaml
from test_ops_status import make_doc
from typer.testing import CliRunner

from streamer.core.ops import commands as ops_cli
from streamer.core.ops import daemon as d
from streamer.core.ops.health import DEGRADED, DOWN, HEALTHY


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    ops_cli.add_commands(app)
    return app


def live_doc(**changes) -> dict:
    """A document as if just published by this (live) process."""
    now = int(time.time() * 1000)
    doc = make_doc(pid=os.getpid(), updated_at=now, started_at=now - 100_000, **changes)
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]["last_event_time"] = now - 500
    return doc


def write(state: Path, doc: dict) -> None:
    state.mkdir(exist_ok=True)
    (state / "status.json").write_text(json.dumps(doc))


def test_health_exit_codes_and_json(app, tmp_path: Path):
    state = tmp_path / "state"
    runner = CliRunner()
    args = ["health", "--state-dir", str(state), "--window", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == DOWN and result.output.startswith("DOWN\n  - no status at")
    write(state, live_doc())
    result = runner.invoke(app, args)
    assert result.exit_code == HEALTHY, result.output
    doc = live_doc()
    doc["children"]["spot.worker0"].update(alive=False, restarts=2, last_exit_code=-9)
    write(state, doc)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == DEGRADED
    report = json.loads(result.output)
    assert report["health"] == "degraded" and report["code"] == 1
    assert report["problems"] == ["spot.worker0 is down (exit code -9), restarts 2"]


def test_health_thresholds_are_options(app, tmp_path: Path):
    state = tmp_path / "state"
    doc = live_doc()
    btc = doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]
    btc["last_event_time"] = doc["updated_at"] - 20_000
    write(state, doc)
    runner = CliRunner()
    args = ["health", "--state-dir", str(state), "--window", "0"]
    lagging = runner.invoke(app, args)
    assert lagging.exit_code == DEGRADED and "spot BTCUSDT aggtrade is lagging" in lagging.output
    assert runner.invoke(app, [*args, "--lag-after", "30"]).exit_code == HEALTHY


def test_status_finds_the_state_dir_from_the_config(app, tmp_path: Path, monkeypatch):
    state = tmp_path / "from-config"
    write(state, live_doc())
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "pipelines": [{"name": "p", "exchange": "x", "symbols": ["A"], "streams": {"s": {}},
                       "sinks": ["c"]}],
        "sinks": {"c": {"type": "csv"}},
        "runtime": {"state_dir": str(state)},
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["status", "--config", str(config), "--window", "0"])
    assert result.exit_code == 0, result.output
    assert "health HEALTHY" in result.output and "spot.worker0" in result.output
    # ... and from the environment.
    monkeypatch.setenv("STREAMER_STATE_DIR", str(state))
    result = CliRunner().invoke(app, ["status", "--window", "0", "--json"])
    assert msgspec.json.decode(result.output)["pid"] == os.getpid()
    bad = CliRunner().invoke(app, ["status", "--config", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "config file not found" in bad.output


def test_status_without_a_collector_says_so(app, tmp_path: Path):
    result = CliRunner().invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: no status at" in result.output and "not running" in result.output


def test_watch_refreshes_with_rates_and_json_lines(app, tmp_path: Path):
    state = tmp_path / "state"
    write(state, live_doc())
    runner = CliRunner()
    table = runner.invoke(
        app, ["status", "--state-dir", str(state), "--watch", "--count", "2", "--interval", "0"]
    )
    assert table.exit_code == 0
    assert table.output.count("collector pid") == 2
    lines = runner.invoke(
        app,
        ["status", "--state-dir", str(state), "--watch", "--json", "--count", "3",
         "--interval", "0"],
    ).output.splitlines()  # fmt: skip
    assert len(lines) == 3
    assert all(json.loads(line)["health"] == "healthy" for line in lines)
    (state / "status.json").unlink()
    waiting = runner.invoke(
        app, ["status", "--state-dir", str(state), "--watch", "--count", "1", "--json"]
    )
    assert json.loads(waiting.output)["health"] == "down"


def test_daemon_start_passes_other_options_to_run(app, tmp_path: Path, monkeypatch):
    calls = []

    def fake_start(paths, run_args, **options):
        calls.append((paths, list(run_args), options))
        return d.StartResult(pid=1, ready=True, running=True, message="started pid 1")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(d, "start", fake_start)
    result = CliRunner().invoke(
        app,
        ["daemon", "start", "--symbols", "BTCUSDT,ETHUSDT", "--data-dir", "./d", "--quiet",
         "--log-max-bytes", "1000", "--wait", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths, run_args, options = calls[0]
    assert run_args == ["--symbols", "BTCUSDT,ETHUSDT", "--data-dir", "./d", "--quiet",
                        "--state-dir", str(tmp_path / ".streamer")]  # fmt: skip
    assert paths.state_dir == tmp_path / ".streamer"
    assert options == {"wait": 5.0, "log_max_bytes": 1000, "log_backups": d.DEFAULT_BACKUPS}


def test_daemon_start_failure_exits_1_with_the_reason(app, tmp_path: Path, monkeypatch):
    def fake_start(paths, run_args, **options):
        return d.StartResult(pid=7, ready=False, running=False, message="it broke: see log")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(d, "start", fake_start)
    result = CliRunner().invoke(app, ["daemon", "start"])
    assert result.exit_code == 1 and "error: it broke: see log" in result.output


def test_the_state_dir_is_always_forwarded_to_run_as_an_absolute_path(
    app, tmp_path: Path, monkeypatch
):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        d, "start", lambda paths, run_args, **o: calls.append((paths, run_args)) or
        d.StartResult(pid=1, ready=True, running=True, message="ok"),
    )  # fmt: skip
    result = CliRunner().invoke(app, ["daemon", "start", "--state-dir", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert calls[0][0].state_dir == tmp_path / "elsewhere"
    # Absolute: a later 'restart' from another directory still publishes here.
    assert calls[0][1] == ["--state-dir", str(tmp_path / "elsewhere")]


def test_daemon_start_store_runs_a_storage_node(app, tmp_path: Path, monkeypatch):
    calls = []

    def fake_start(paths, run_args, **options):
        calls.append((list(run_args), options))
        return d.StartResult(pid=1, ready=True, running=True, message="started pid 1")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(d, "start", fake_start)
    (tmp_path / "store.yaml").write_text(
        "source: {type: nats, durable: store-1}\nsinks:\n  csv: {type: csv, path: ./data}\n"
    )
    result = CliRunner().invoke(app, ["daemon", "start", "--store", "--config", "store.yaml"])
    assert result.exit_code == 0, result.output
    run_args, options = calls[0]
    state = str(tmp_path / ".streamer")
    assert run_args == ["--config", "store.yaml", "--state-dir", state]
    assert options["argv"][1:] == ["-m", "streamer", "store", *run_args]
