"""Sharding (issue 15): ``--shard K/N`` and ``shard: "K/N"`` split a market's symbols by a
stable hash, so N collectors cover every symbol exactly once with no coordination."""

from __future__ import annotations

import zlib

import anyio
import pytest
from conftest import synth_config
from test_core_cli import assert_one_line_error, invoke, write_yaml

from streamer.core.config import ConfigError, parse_config
from streamer.core.runtime import PluginSelection, plan_pipelines
from streamer.core.shards import in_shard, parse_shard, stable_hash

SYNTH = PluginSelection(enabled=("aggtrade",), extra_modules=("core_plugins",))


def test_the_hash_is_crc32_of_the_utf8_symbol():
    assert stable_hash("BTCUSDT") == zlib.crc32(b"BTCUSDT")
    assert stable_hash("ÄBC") == zlib.crc32("ÄBC".encode())
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 4 / 4 ") == (4, 4)


def test_four_shards_cover_every_symbol_exactly_once():
    symbols = [f"S{i}USDT" for i in range(2000)]
    shards = [[s for s in symbols if in_shard(s, (k, 4))] for k in range(1, 5)]
    assert sorted(s for shard in shards for s in shard) == sorted(symbols)
    assert all(len(shard) > 400 for shard in shards)  # a hash, not a prefix


def _plan(tmp_path, shard: str):
    data = synth_config(tmp_path, pipeline={"symbols": ["all"], "shard": shard})
    config = parse_config(data)

    async def plan():
        return await plan_pipelines(config, SYNTH)

    try:
        plans, _ = anyio.run(plan)
    except ValueError as exc:
        assert "no symbol of this pipeline falls in shard" in str(exc)
        return []
    return plans[0].symbols


def test_four_collectors_given_shards_1_to_4_split_the_market(tmp_path):
    everything = _plan(tmp_path, "")
    parts = [_plan(tmp_path, f"{k}/4") for k in range(1, 5)]
    assert sorted(s for part in parts for s in part) == sorted(everything)
    assert len(everything) == 6 and sum(1 for part in parts if part) >= 2
    for k, part in enumerate(parts, start=1):
        assert all(stable_hash(s) % 4 == k - 1 for s in part)


@pytest.mark.parametrize("bad", ["0/4", "5/4", "2/0", "two", "1/2/3", "-1/4"])
def test_a_bad_shard_is_one_line(tmp_path, bad):
    with pytest.raises(ValueError):
        parse_shard(bad)
    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.shard: ") as info:
        parse_config(synth_config(tmp_path, pipeline={"shard": bad}))
    assert "\n" not in str(info.value)


def test_config_check_and_run_refuse_a_bad_shard(tmp_path):
    path = write_yaml(tmp_path, synth_config(tmp_path, pipeline={"shard": "5/4"}))
    assert_one_line_error(invoke("config", "check", str(path)), "pipelines[0].shard", "5/4")
    good = write_yaml(tmp_path, synth_config(tmp_path), name="good.yaml")
    assert_one_line_error(
        invoke("run", "--config", str(good), "--shard", "0/3"), "--shard", "between 1 and N"
    )
