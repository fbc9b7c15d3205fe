"""Packaging of plugins: declared entry points, the documented hooks, a third-party example."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SYNTH_EPOCH_MS, subprocess_env

from streamer.core import api, hookspecs

PLUGINS_DIR = REPO / "streamer" / "plugins"


def declared_entry_points() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["entry-points"]["streamer"]


def plugin_modules_on_disk() -> set[str]:
    """Every plugin module under streamer/plugins: exchange packages, stream/sink modules."""
    found = set()
    for package in (PLUGINS_DIR / "exchanges").iterdir():
        if package.is_dir() and (package / "__init__.py").exists():
            found.add(f"streamer.plugins.exchanges.{package.name}")
    for kind in ("streams", "sinks"):
        for module in (PLUGINS_DIR / kind).glob("*.py"):
            if module.stem != "__init__" and not module.stem.startswith("_"):
                found.add(f"streamer.plugins.{kind}.{module.stem}")
    return found


def test_declared_entry_points_match_the_plugin_modules():
    declared = declared_entry_points()
    values = set(declared.values())
    assert values - {"streamer.testing.plugin"} == plugin_modules_on_disk()
    assert declared["sim"] == "streamer.testing.plugin"
    assert (REPO / "streamer" / "testing" / "plugin.py").exists()
    for value in values:
        importlib.import_module(value)  # each one imports


def test_installed_entry_points_match_pyproject():
    from importlib import metadata

    installed = {
        ep.name: ep.value
        for ep in metadata.entry_points(group="streamer")
        if ep.dist is not None and ep.dist.metadata["Name"] == "market-streamer"
    }
    assert installed == declared_entry_points(), "reinstall: pip install -e ."


def _public_methods(cls: type) -> list[str]:
    return [
        name
        for name, member in vars(cls).items()
        if not name.startswith("_")
        and (inspect.isfunction(member) or isinstance(member, property | classmethod))
    ]


def test_contributing_documents_every_hook_and_base_class_method():
    text = (REPO / "CONTRIBUTING.md").read_text()
    hooks = [
        name
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "streamer_spec")
    ]
    assert sorted(hooks) == [
        "register_commands", "register_exchanges", "register_sinks", "register_sources",
        "register_streams",
    ]  # fmt: skip
    missing = [hook for hook in hooks if f"`{hook}" not in text]
    for cls in (api.ExchangeAdapter, api.StreamType, api.Sink, api.Source):
        missing += [
            f"{cls.__name__}.{name}" for name in _public_methods(cls) if f"`{name}" not in text
        ]
        assert f"`{cls.__name__}`" in text
    assert not missing, f"CONTRIBUTING.md does not document: {', '.join(missing)}"


@pytest.fixture(scope="module")
def jsonl_site(tmp_path_factory) -> Path:
    """examples/streamer-jsonl installed (offline) into a private site directory."""
    pytest.importorskip("hatchling", reason="the test extra installs hatchling")
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
         "--no-deps", "--no-index", "--target", str(target),
         str(REPO / "examples" / "streamer-jsonl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("streamer_jsonl-*.dist-info"))
    return target


def _env_with(site: Path) -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def test_example_plugin_is_discovered_through_its_entry_point(jsonl_site):
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "plugins"],
        env=_env_with(jsonl_site), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("jsonl"))
    assert "streamer-jsonl 0.1.0" in row and "loaded" in row and "sink jsonl" in row


def test_example_plugin_runs_a_pipeline(jsonl_site, tmp_path):
    config = {
        "pipelines": [
            {
                "name": "synth",
                "exchange": "synth",
                "options": {"epoch_ms": SYNTH_EPOCH_MS, "rate": 200},
                "symbols": ["AAA", "BBB"],
                "streams": {"seq": {}},
                "sinks": ["out"],
            }
        ],
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out")}},
        "runtime": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 20},
    }
    path = tmp_path / "jsonl.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["run", "--config", str(path), "--plugins", "jsonl", "--duration", "2", "-q"]
    for _ in range(2):  # the second run resumes from the files' holdings
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", *args],
            cwd=tmp_path, env=_env_with(jsonl_site), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    for symbol in ("AAA", "BBB"):
        file = tmp_path / "out" / "synth" / "test" / symbol / "aggtrade.jsonl"
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        ids = [row["trade_id"] for row in rows]
        assert len(ids) > 100
        assert ids == list(range(ids[0], ids[0] + len(ids))), "gap or duplicate across runs"
        assert rows[0]["kind"] == "trade" and isinstance(rows[0]["price"], str)
