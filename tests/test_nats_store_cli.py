"""``streamer store`` and store files: bad input is one ``error:`` line."""

from __future__ import annotations

from conftest import synth_config
from test_core_cli import assert_one_line_error, invoke, write_yaml


def store_file(tmp_path, **source):
    data = {
        "source": {"type": "nats", "durable": "store-1", **source},
        "sinks": {"csv": {"type": "csv", "path": str(tmp_path / "data")}},
    }
    return write_yaml(tmp_path, data, name="store.yaml")


def test_config_check_accepts_a_store_file(tmp_path):
    result = invoke("config", "check", str(store_file(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "ok (source nats, 1 sink(s))" in result.stdout


def test_bad_store_files_are_one_line(tmp_path):
    assert_one_line_error(invoke("config", "check", str(store_file(tmp_path, durable="a b"))),
                          "source.durable")  # fmt: skip
    assert_one_line_error(invoke("config", "check", str(store_file(tmp_path, typo=1))),
                          "source", "typo")  # fmt: skip
    assert_one_line_error(
        invoke("config", "check", str(store_file(tmp_path, url="http://x:1"))), "source: url"
    )
    assert_one_line_error(invoke("config", "check", str(store_file(tmp_path, type="kafka"))),
                          "source.type", "unknown source 'kafka'")  # fmt: skip


def test_store_and_run_refuse_each_others_files(tmp_path):
    collector = write_yaml(tmp_path, synth_config(tmp_path), name="collector.yaml")
    assert_one_line_error(invoke("store", "--config", str(collector)), "needs a 'source'")
    assert_one_line_error(
        invoke("run", "--config", str(store_file(tmp_path))), "streamer store --config"
    )
