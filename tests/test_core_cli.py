"""The ``streamer`` CLI: every bad input gives one ``error:`` line and exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env, synth_config
from typer.testing import CliRunner

from streamer import __version__
from streamer.cli import build_app
from streamer.core import plugins as plugin_loader

ENV = {"STREAMER_PLUGIN_MODULES": "core_plugins"}


def invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(build_app(), list(args), env={**ENV, **(env or {})})
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_yaml(tmp_path: Path, data, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# -- happy paths -------------------------------------------------------------------------------
def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"streamer (market-streamer) {__version__}"


def test_help_lists_builtin_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "plugins", "symbols", "config"):
        assert command in result.stdout


def test_config_check_accepts_a_valid_file(tmp_path):
    path = write_yaml(tmp_path, synth_config(tmp_path), "ok.yaml")
    result = invoke("config", "check", str(path))
    assert result.exit_code == 0, result.output
    assert "ok (1 pipeline(s), 2 sink(s))" in result.stdout


def test_config_show_prints_every_default(tmp_path):
    path = write_yaml(tmp_path, synth_config(tmp_path), "ok.yaml")
    result = invoke("config", "show", str(path))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    options = {"epoch_ms": 1_764_000_000_000, "rate": 300, "crash_after": 0.0}
    assert shown["pipelines"][0]["options"] == {**options, "unreachable": False}
    assert shown["sinks"]["a"]["write_delay"] == 0.0
    assert shown["runtime"]["batch_size"] == 2000
    assert shown["runtime"]["status_interval"] == 0.2


def test_plugins_lists_builtins_and_what_they_register():
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    for name in ("binance", "csv", "aggtrade", "depth", "kline", "orderbook", "sim"):
        assert "market-streamer" in rows[name]
    assert "exchange synth" in rows["core_plugins"]
    assert "sink lines" in rows["core_plugins"]


def test_symbols_lists_trading_symbols_of_an_exchange():
    result = invoke("symbols", "--exchange", "synth", "--market", "")
    assert result.exit_code == 0, result.output
    listed = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert listed == ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
    result = invoke("symbols", "--exchange", "synth", "--market", "", "--all", "--quote", "usd")
    assert "HALTED\tBREAK" in result.stdout


def test_run_from_flags_and_config_end_to_end(tmp_path):
    path = write_yaml(tmp_path, synth_config(tmp_path), "ok.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "-c", str(path), "--duration", "1.5", "-q",
         "--state-dir", str(tmp_path / "elsewhere")],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "records.jsonl").stat().st_size > 0
    assert json.loads((tmp_path / "elsewhere" / "status.json").read_text())["exit_code"] == 0
    assert not (tmp_path / "state").exists()


# -- bad input -----------------------------------------------------------------------------------
def test_missing_config_file(tmp_path):
    assert_one_line_error(
        invoke("config", "check", str(tmp_path / "nope.yaml")), "config file not found"
    )
    assert_one_line_error(invoke("run", "--config", str(tmp_path / "nope.yaml")), "not found")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write_yaml(tmp_path, "pipelines:\n  - name: x\n    symbols: [A, B\nsinks: {}\n")
    assert_one_line_error(invoke("config", "check", str(path)), "YAML syntax error", "line 4")


def test_unknown_top_level_key(tmp_path):
    data = synth_config(tmp_path)
    data["pipeline"] = []
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data))), "unknown field `pipeline`"
    )


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"exchange": "kraken"}, ["pipelines[0].exchange", "unknown exchange 'kraken'", "synth"]),
        ({"streams": {"trades": {}}}, ["pipelines[0].streams", "unknown stream 'trades'", "seq"]),
        ({"sinks": ["nowhere"]}, ["pipelines[0].sinks[0]", "'nowhere' is not defined", "a, b"]),
        ({"symbols": []}, ["pipelines[0].symbols", "symbol list is empty"]),
        (
            {"options": {"rate": "fast"}},
            ["pipelines[0].options.rate: must be an integer, got 'fast'"],
        ),
        (
            {"streams": {"kline": {"intervals": ["1m", "7x"]}}},
            ["pipelines[0].streams.kline.intervals[1]", "invalid kline interval '7x'", "1s, 1m"],
        ),
        (
            {"streams": {"kline": {"intervals": ["1m", 5]}}},
            ["pipelines[0].streams.kline.intervals[1]", "expected `str`, got `int`"],
        ),
    ],
)
def test_bad_pipeline(tmp_path, change, fragments):
    data = synth_config(tmp_path, pipeline=change)
    assert_one_line_error(invoke("config", "check", str(write_yaml(tmp_path, data))), *fragments)


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("batch_size", "an integer between 1 and 1000000"),
        ("queue_batches", "an integer between 1 and 100000"),
        ("shutdown_timeout", "a number > 0 and <= 3600"),
    ],
)
def test_runtime_settings_must_be_positive(tmp_path, key, rule):
    data = synth_config(tmp_path, runtime={key: 0})
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data))),
        f"runtime.{key}: must be {rule}, got 0",
    )


def test_unknown_sink_type_lists_available(tmp_path):
    sinks = {"a": {"type": "orc"}, "b": {"type": "lines", "path": "x"}}
    data = synth_config(tmp_path, sinks=sinks)
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data))),
        "sinks.a.type",
        "unknown sink 'orc'",
        "lines",
    )


def test_invalid_sink_option_type(tmp_path):
    data = synth_config(tmp_path)
    data["sinks"]["b"]["write_delay"] = "slow"
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data))), "sinks.b.write_delay"
    )


def test_duplicate_pipeline_names(tmp_path):
    data = synth_config(tmp_path)
    data["pipelines"].append(dict(data["pipelines"][0]))
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data))),
        "pipelines[1].name",
        "duplicate pipeline name 'synth'",
    )


def test_run_with_unknown_symbol_fails_before_starting(tmp_path):
    data = synth_config(tmp_path, pipeline={"symbols": ["AAA", "ZZZ"]})
    result = invoke("run", "--config", str(write_yaml(tmp_path, data)))
    assert_one_line_error(result, "unknown symbol(s) on synth test: ZZZ")


def test_symbols_of_unreachable_exchange_fails_in_one_line(monkeypatch):
    import core_plugins

    async def refused(self):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(core_plugins.SynthExchange, "list_symbols", refused)
    result = invoke("symbols", "--exchange", "synth", "--market", "")
    assert_one_line_error(result, "cannot list the symbols of synth", "Connection refused")


def test_run_with_unreachable_exchange_fails_in_one_line(tmp_path):
    data = synth_config(tmp_path, pipeline={"options": {"unreachable": True}})
    result = invoke("run", "--config", str(write_yaml(tmp_path, data)))
    assert_one_line_error(
        result, "pipelines[0]: cannot list the symbols of synth", "Connection refused"
    )


def test_run_rejects_flags_that_need_no_config(tmp_path):
    path = write_yaml(tmp_path, synth_config(tmp_path))
    assert_one_line_error(
        invoke("run", "--config", str(path), "--symbols", "AAA"), "--symbols only apply"
    )


def test_run_with_empty_symbols_flag():
    assert_one_line_error(invoke("run", "--symbols", ","), "--symbols", "empty")


def test_run_with_unknown_stream_flag():
    assert_one_line_error(
        invoke("run", "--streams", "aggtrade,nope"), "unknown stream 'nope'", "aggtrade"
    )


def test_run_with_plugin_that_is_not_installed():
    assert_one_line_error(invoke("run", "--plugins", "binance,kraken"), "not installed: kraken")


# -- plugin discovery problems, with fake distributions on sys.path -------------------------------
def fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: a ``*.dist-info`` directory with entry points."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    info.joinpath("entry_points.txt").write_text(f"[streamer]\n{lines}")


def test_duplicate_plugin_name_from_two_distributions(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "streamer-othercsv", {"csv": "core_plugins"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugin_loader.PluginError) as caught:
        plugin_loader.discover_entry_points()
    assert "market-streamer 0.1.0" in str(caught.value)
    assert "streamer-othercsv 1.0" in str(caught.value)
    assert_one_line_error(invoke("plugins"), "'csv' is declared by two distributions",
                          "market-streamer", "streamer-othercsv")  # fmt: skip
    # Blocking the name, as the message suggests, gets the user going again.
    result = invoke("plugins", env={"STREAMER_BLOCK_PLUGINS": "csv"})
    assert result.exit_code == 0, result.output
    assert "blocked" in next(line for line in result.stdout.splitlines() if line.startswith("csv"))


def test_plugin_import_error_is_named_and_others_still_work(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "streamer-broken", {"broken": "no_such_module_for_streamer"})
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("broken"))
    assert "streamer-broken 1.0" in row and "FAILED" in row
    assert "plugin 'broken' from distribution streamer-broken 1.0 failed to import" in result.stderr
    assert "No module named 'no_such_module_for_streamer'" in result.stderr
    assert "binance" in result.stdout and "Traceback" not in result.output
    # Other plugins still work: a valid config checks out.
    path = write_yaml(tmp_path, synth_config(tmp_path), "ok.yaml")
    assert invoke("config", "check", str(path)).exit_code == 0
    # Asking for it explicitly is an error naming it.
    assert_one_line_error(invoke("config", "check", str(path), "--plugins", "broken"),
                          "plugin 'broken'", "streamer-broken")  # fmt: skip


def test_block_env_var_disables_a_plugin(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "streamer-broken", {"broken": "no_such_module_for_streamer"})
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("plugins", env={"STREAMER_BLOCK_PLUGINS": "broken, csv"})
    assert result.exit_code == 0
    assert "FAILED" not in result.stdout and result.stderr == ""
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "blocked" in rows["broken"] and "blocked" in rows["csv"]
    data = synth_config(tmp_path, sinks={"a": {"type": "csv", "path": "x"},
                                         "b": {"type": "lines", "path": "y"}})  # fmt: skip
    assert_one_line_error(
        invoke("config", "check", str(write_yaml(tmp_path, data)),
               env={"STREAMER_BLOCK_PLUGINS": "csv"}),
        "unknown sink 'csv'",
    )  # fmt: skip


def test_no_builtin_plugins_found_is_a_loud_error(monkeypatch):
    monkeypatch.setattr(plugin_loader.metadata, "entry_points", lambda **kw: [])
    with pytest.raises(plugin_loader.PluginError, match="no built-in plugins found"):
        plugin_loader.make_plugin_manager()
    assert_one_line_error(invoke("plugins"), "no built-in plugins found", "pip install -e .")
    # --help still works so the user can find out what is wrong.
    assert invoke("--help").exit_code == 0


def test_plugins_flag_enables_exactly_the_named_plugins():
    pm, report = plugin_loader.make_plugin_manager(["csv"])
    loaded = {p.name for p in report.plugins if p.loaded}
    assert loaded == {"csv", "aggtrade", "depth", "kline", "orderbook"}
    assert pm.get_plugin("binance") is None
