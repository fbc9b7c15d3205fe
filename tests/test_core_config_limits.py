"""Start-up checks: every numeric or duration option rejects nonsense, with the exact path.

Each bad value goes through BOTH ``streamer config check FILE`` and ``streamer run --config
FILE``: both must print the same single ``error:`` line and exit 1. The synth exchange is
configured ``unreachable``, so a value that slips through validation makes ``run`` fail
at symbol resolution with a different message, before any process is spawned.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env, synth_config
from typer.testing import CliRunner

from streamer.cli import build_app
from streamer.core import units

ENV = {"STREAMER_PLUGIN_MODULES": "core_plugins"}

INT = "must be an integer between"
NUM = "must be a number > 0 and <="
BAD = "invalid duration"
# (where, key, YAML text of the value, message after "<file>: <where>.<key>: ")
CASES = [
    ("runtime", "batch_size", "1e300", f"{INT} 1 and 1000000, got '1e300'"),
    ("runtime", "batch_size", "1" + "0" * 300, f"{INT} 1 and 1000000, got a 301-digit number"),
    ("runtime", "batch_size", "0", f"{INT} 1 and 1000000, got 0"),
    ("runtime", "metrics_port", "70000", f"{INT} 0 and 65535, got 70000"),
    ("runtime", "metrics_port", "-1", f"{INT} 0 and 65535, got -1"),
    ("runtime", "shutdown_timeout", ".nan", f"{NUM} 3600, got nan"),
    ("runtime", "shutdown_timeout", ".inf", f"{NUM} 3600, got inf"),
    ("runtime", "batch_interval", "-1", f"{NUM} 60, got -1"),
    ("runtime", "status_interval", ".inf", f"{NUM} 3600, got inf"),
    ("runtime", "restart_backoff_max", "0", f"{NUM} 3600, got 0"),
    ("runtime", "queue_batches", "0", f"{INT} 1 and 100000, got 0"),
    ("pipelines[0]", "workers", "-1", f"{INT} 0 and 1024, got -1"),
    ("pipelines[0]", "workers", "100000", f"{INT} 0 and 1024, got 100000"),
    ("orderbook", "levels", "-1", f"{INT} 1 and 5000, got -1"),
    ("orderbook", "levels", "0", f"{INT} 1 and 5000, got 0"),
    ("orderbook", "levels", "1000000", f"{INT} 1 and 5000, got 1000000"),
    ("orderbook", "levels", "2000", "2000 exceeds the snapshot depth (snapshot_limit 1000)"),
    ("orderbook", "interval", "0s", f"{BAD} '0s': must be greater than 0"),
    ("orderbook", "interval", "-1s", f"{BAD} '-1s': must not be negative"),
    ("orderbook", "interval", ".nan", f"{BAD} nan: must be a finite number"),
    ("orderbook", "verify_interval", ".inf", f"{BAD} inf: must be a finite number"),
    ("orderbook", "verify_interval", "100ms", "must be at least 1s or 'off', got '100ms'"),
    ("orderbook", "snapshot_limit", "0", f"{INT} 1 and 5000, got 0"),
    ("orderbook", "snapshot_concurrency", "0", f"{INT} 1 and 64, got 0"),
    ("orderbook", "buffer_limit", "1", f"{INT} 2 and 10000000, got 1"),
    ("orderbook", "queued_buffer_limit", "0", f"{INT} 2 and 10000000, got 0"),
    ("orderbook", "speed", "-100ms", f"{BAD} '-100ms': must not be negative"),
    ("depth", "speed", "fast", f"{BAD} 'fast'"),
    ("kline", "gap_grace", "-1s", f"{BAD} '-1s': must not be negative"),
    ("kline", "max_held", "0", f"{INT} 1 and 100000000, got 0"),
    ("aggtrade", "gap_grace", "99999d", f"{BAD} '99999d': longer than ten years"),
    ("aggtrade", "max_held", "1e300", f"{INT} 1 and 100000000, got '1e300'"),
    ("csv", "flush_interval", ".nan", f"{BAD} nan: must be a finite number of seconds"),
    ("csv", "flush_interval", ".inf", f"{BAD} inf: must be a finite number of seconds"),
    ("csv", "flush_interval", "-1", f"{BAD} -1.0: must not be negative"),
    ("csv", "flush_interval", "0s", f"{BAD} '0s': must be greater than 0"),
    ("csv", "flush_interval", "1e300", f"{BAD} '1e300'"),
    ("csv", "gzip_level", "0", f"{INT} 1 and 9, got 0"),
    ("csv", "gzip_level", "10", f"{INT} 1 and 9, got 10"),
    ("csv", "max_open_files", "0", f"{INT} 1 and 65536, got 0"),
    ("csv", "book_levels", "0", f"{INT} 1 and 5000, got 0"),
    ("csv", "flush_rows", "1e300", f"{INT} 1 and 100000000, got '1e300'"),
]
#: Where each section of the table lands in the config file.
PATHS = {
    "runtime": "runtime",
    "pipelines[0]": "pipelines[0]",
    "csv": "sinks.files",
    **{s: f"pipelines[0].streams.{s}" for s in ("orderbook", "depth", "kline", "aggtrade")},
}


def bad_config(tmp_path: Path, where: str, key: str, text: str) -> Path:
    """A valid synth config (unreachable exchange, a csv sink) with ``key: <text>`` placed
    at ``where``; the value is spliced in as YAML text so ``.nan`` and ``1e300`` keep their
    YAML meaning."""
    marker = "__BAD_VALUE__"
    streams: dict = {"seq": {}}
    runtime: dict = {}
    pipeline: dict = {"options": {"unreachable": True}, "sinks": ["files"]}
    sink = {"type": "csv", "path": str(tmp_path / "csv")}
    if where == "runtime":
        runtime[key] = marker
    elif where == "pipelines[0]":
        pipeline[key] = marker
    elif where == "csv":
        sink[key] = marker
    else:
        streams[where] = {key: marker}
    data = synth_config(
        tmp_path, pipeline={**pipeline, "streams": streams}, runtime=runtime, sinks={"files": sink}
    )
    text_yaml = yaml.safe_dump(data).replace(f"'{marker}'", text).replace(marker, text)
    assert text in text_yaml
    path = tmp_path / "bad.yaml"
    path.write_text(text_yaml)
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(build_app(), list(args), env=ENV)


@pytest.mark.parametrize(
    ("where", "key", "text", "message"),
    [pytest.param(*case, id=f"{case[0]}.{case[1]}={case[2][:8]}") for case in CASES],
)
def test_bad_value_is_refused_alike_by_config_check_and_run(tmp_path, where, key, text, message):
    path = bad_config(tmp_path, where, key, text)
    check = one_error_line(invoke("config", "check", str(path)))
    assert check.startswith(f"error: {path}: {PATHS[where]}.{key}: {message}"), check
    assert len(check) < 300, check
    run = one_error_line(invoke("run", "--config", str(path), "-q"))
    assert run == check
    # Refused before anything started: no state directory, no data directory.
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "csv").exists()


def test_the_good_config_of_the_table_is_accepted(tmp_path):
    """The table's base config is valid: only the bad value makes it fail."""
    path = bad_config(tmp_path, "runtime", "batch_size", "500")
    result = invoke("config", "check", str(path))
    assert result.exit_code == 0, result.output
    # ``run`` gets past validation and stops at the unreachable exchange.
    run = one_error_line(invoke("run", "--config", str(path), "-q"))
    assert "cannot list the symbols of synth" in run


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e300"])
def test_run_duration_must_be_a_finite_positive_number(tmp_path, value):
    path = bad_config(tmp_path, "runtime", "batch_size", "500")
    line = one_error_line(invoke("run", "--config", str(path), "--duration", value))
    assert line.startswith("error: --duration must be a number of seconds > 0"), line
    assert line.endswith(f"got {float(value)}"), line


def test_real_cli_prints_the_same_line_for_check_and_run(tmp_path):
    """The same through ``python -m streamer``: stderr is exactly one line, exit code 1."""
    path = bad_config(tmp_path, "orderbook", "levels", "0")
    outputs = []
    for args in (["config", "check", str(path)], ["run", "--config", str(path)]):
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", *args],
            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        outputs.append(proc.stderr)
    assert outputs[0] == outputs[1]
    assert "orderbook.levels: must be an integer between 1 and 5000, got 0" in outputs[0]


# -- fault 8: garbage as a config file, and thousands of unknown symbols ---------------------
GARBAGE = {
    "binary": (bytes(range(256)) * 64, "not a UTF-8 text file (byte 0x80 at offset 128)"),
    "control characters": (b"pipelines:\x00\x01\x02", "YAML syntax error"),
    "deep nesting": (b"[" * 100_000, "YAML nested too deeply"),
    "huge": (b"#" * (5 * 1024 * 1024), "too large for a configuration file"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_config_file_is_named_in_one_line(tmp_path, kind):
    content, fragment = GARBAGE[kind]
    path = tmp_path / "garbage.yaml"
    path.write_bytes(content)
    check = one_error_line(invoke("config", "check", str(path)))
    assert check.startswith(f"error: {path}: "), check
    assert fragment in check and len(check) < 300, check
    assert one_error_line(invoke("run", "--config", str(path), "-q")) == check


def test_ten_thousand_unknown_symbols_give_one_short_line(tmp_path):
    symbols = ["AAA"] + [f"NOPE{i:05d}" for i in range(10_000)]
    data = synth_config(tmp_path, pipeline={"symbols": symbols})
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(data))
    line = one_error_line(invoke("run", "--config", str(path), "-q"))
    assert len(line) < 300, f"{len(line)} characters"
    assert "unknown symbol(s) on synth test: NOPE00000, NOPE00001" in line
    assert "and 9995 more (10000 of 10001 requested)" in line
    assert not (tmp_path / "state").exists()


def test_long_names_in_messages_are_cut(tmp_path):
    data = synth_config(tmp_path, pipeline={"sinks": ["x" * 100_000]})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    line = one_error_line(invoke("config", "check", str(path)))
    assert "pipelines[0].sinks[0]: sink 'xxxx" in line and len(line) < 400, len(line)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        (-1, "must not be negative"),
        ("-1s", "must not be negative"),
        (10**400, "must be a finite number"),
        ("5000d", "longer than ten years"),
        (True, "invalid duration"),
    ],
    ids=["nan", "inf", "-1", "-1s", "10**400", "5000d", "True"],
)
def test_parse_duration_rejects_nonsense(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        units.parse_duration(value)


def test_parse_duration_positive_variant():
    assert units.parse_duration("0s") == 0.0
    assert units.parse_duration(0) == 0.0
    assert units.parse_duration("250ms", positive=True) == 0.25
    with pytest.raises(ValueError, match="must be greater than 0"):
        units.parse_duration("0s", positive=True)
    with pytest.raises(ValueError, match=r"^flush_interval: invalid duration 0"):
        units.check_duration("flush_interval", 0, positive=True)


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("no_data_timeout", "0s", f"{BAD} '0s': must be greater than 0"),
        ("rest_timeout", "0ms", f"{BAD} '0ms': must be greater than 0"),
        ("reconnect_backoff_max", "99999d", f"{BAD} '99999d': longer than ten years"),
        ("rotate_after", "-1s", f"{BAD} '-1s': must not be negative"),
        ("backfill_max_age", "-5m", f"{BAD} '-5m': must not be negative"),
        ("rest_weight_limit", "-1", "must be >= 0"),
    ],
)
def test_bad_binance_option_is_refused_alike_by_config_check_and_run(tmp_path, key, text, message):
    """The exchange's options too; a closed loopback port stands in for the exchange."""
    marker = "__BAD_VALUE__"
    options = {"rest_url": "http://127.0.0.1:9", "ws_url": "ws://127.0.0.1:9", key: marker}
    data = synth_config(
        tmp_path,
        pipeline={"exchange": "binance", "options": options, "streams": {"aggtrade": {}}},
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data).replace(f"'{marker}'", text).replace(marker, text))
    check = one_error_line(invoke("config", "check", str(path)))
    assert check.startswith(f"error: {path}: pipelines[0].options.{key}: {message}"), check
    assert one_error_line(invoke("run", "--config", str(path), "-q")) == check
