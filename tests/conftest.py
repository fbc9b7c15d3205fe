"""Shared test set-up: inline plugins importable by spawned children, config helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# Spawned children inherit sys.path, so the inline plugins in core_plugins.py reach them.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# The simulator's fixtures (binance_sim), once that module exists.
pytest_plugins = (
    ["streamer.testing.pytest_plugin"]
    if importlib.util.find_spec("streamer.testing.pytest_plugin") is not None
    else []
)
# A real nats-server with JetStream for the NATS tests (issue 15).
pytest_plugins = [*pytest_plugins, "nats_fixtures"]

# A real PostgreSQL for the postgres sink's tests (pg_server, pg_dsn; started on first use).
from pg_server import pg_dsn, pg_server  # noqa: E402, F401

#: A fixed origin for the synthetic exchange's clock-driven trade ids.
SYNTH_EPOCH_MS = 1_764_000_000_000


def synth_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A config dict: the synth exchange, the seq stream, two ``lines`` sinks in tmp_path.

    Keyword arguments override top-level keys; ``pipeline=`` and ``runtime=`` dicts are
    merged into the first pipeline and the runtime section.
    """
    data: dict[str, Any] = {
        "pipelines": [
            {
                "name": "synth",
                "exchange": "synth",
                "options": {"epoch_ms": SYNTH_EPOCH_MS, "rate": 300},
                "symbols": ["AAA", "BBB", "CCC", "DDD"],
                "streams": {"seq": {}},
                "sinks": ["a", "b"],
                "workers": 2,
            }
        ],
        "sinks": {
            "a": {"type": "lines", "path": str(tmp_path / "a")},
            "b": {"type": "lines", "path": str(tmp_path / "b")},
        },
        "runtime": {
            "state_dir": str(tmp_path / "state"),
            "status_interval": 0.2,
            "shutdown_timeout": 20,
            "batch_interval": 0.02,
        },
    }
    data["pipelines"][0].update(changes.pop("pipeline", {}))
    data["runtime"].update(changes.pop("runtime", {}))
    data.update(changes)
    return data


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write ``synth_config(tmp_path, **changes)`` (or a given dict) to a YAML file."""

    def write(data: dict[str, Any] | None = None, name: str = "streamer.yaml", **changes):
        path = tmp_path / name
        if data is None:
            data = synth_config(tmp_path, **changes)
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m streamer`` children that need the inline plugins."""
    env = dict(os.environ)
    paths = [str(TESTS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["STREAMER_PLUGIN_MODULES"] = "core_plugins"
    env.update(extra)
    return env


def start_streamer(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start ``python -m streamer ARGS`` with the inline plugins available."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", *args],
        cwd=cwd,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def load_status(state_dir: Path) -> dict[str, Any] | None:
    """The published status.json, or None while there is none."""
    try:
        return json.loads((state_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_sim_config(
    tmp_path: Path,
    sim: Any,
    *,
    symbols: list[str],
    streams: dict[str, Any],
    options: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
) -> Path:
    """Write a one-pipeline Binance spot config against ``sim``, CSV into tmp_path/data."""
    data = {
        "pipelines": [
            {
                "name": "spot",
                "exchange": "binance",
                "options": {
                    "market": "spot",
                    "rest_url": sim.rest_url,
                    "ws_url": sim.ws_url,
                    **(options or {}),
                },
                "symbols": symbols,
                "streams": streams,
                "sinks": ["csv"],
            }
        ],
        "sinks": {"csv": {"type": "csv", "path": str(tmp_path / "data"), "flush_interval": 0.2}},
        "runtime": {
            "state_dir": str(tmp_path / "state"),
            "status_interval": 0.2,
            "shutdown_timeout": 20,
            "restart_backoff_max": 1,
            **(runtime or {}),
        },
    }
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
