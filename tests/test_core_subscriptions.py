"""Start-up refusal of stream types that would share a channel at different speeds."""

from __future__ import annotations

import anyio
import pytest

from streamer.core.config import ConfigError, parse_config
from streamer.core.runtime import PluginSelection, plan_pipelines


def _config(sim, streams: dict) -> object:
    return parse_config(
        {
            "pipelines": [
                {
                    "name": "spot",
                    "exchange": "binance",
                    "options": {"market": "spot", "rest_url": sim.rest_url, "ws_url": sim.ws_url},
                    "symbols": ["BTCUSDT"],
                    "streams": streams,
                    "sinks": ["csv"],
                }
            ],
            "sinks": {"csv": {"type": "csv", "path": "unused"}},
        }
    )


def _plan(config):
    return anyio.run(plan_pipelines, config, PluginSelection(enabled=("binance", "csv")))


def test_depth_and_orderbook_at_different_speeds_are_refused(binance_sim):
    config = _config(binance_sim, {"depth": {"speed": "1000ms"}, "orderbook": {"speed": "100ms"}})
    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.streams: depth and orderbook .*speeds"):
        _plan(config)


def test_same_speed_and_several_kline_intervals_are_accepted(binance_sim):
    config = _config(
        binance_sim,
        {
            "depth": {"speed": "100ms"},
            "orderbook": {"speed": "100ms"},
            "kline": {"intervals": ["1m", "1s"]},
        },
    )
    plans, sinks = _plan(config)
    assert plans[0].symbols == ["BTCUSDT"]
    assert sinks == {"csv": "csv"}
