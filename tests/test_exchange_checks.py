"""Exchange-dependent start-up checks: ``config check`` and ``run`` agree (issue 11).

A value only the exchange can judge (a depth speed Binance does not serve on the market,
kline ``1s`` on USD-M, an order book deeper than USD-M's 1000-level snapshot) goes through
BOTH ``streamer config check FILE`` and ``streamer run --config FILE``: one shared check
builds the adapter and the stream types without the network, so both print the same
single ``error:`` line and exit 1, and ``run`` starts nothing. The simulator answers
``exchangeInfo``, so a value that slipped through would let ``run`` reach the supervisor
(replaced here by a stand-in that records the call instead of spawning processes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from typer.testing import CliRunner

from streamer import Counters
from streamer.cli import build_app
from streamer.core import runtime
from streamer.core.api import ExchangeContext, Subscription
from streamer.plugins.exchanges.binance.adapter import BinanceAdapter, BinanceOptions

SPOT_SPEEDS = "use one of 100ms, 1000ms"
USDM_SPEEDS = "use one of 0ms, 100ms, 250ms, 500ms"

# (market, streams, message after "<file>: pipelines[0].")
CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "spot",
        {"depth": {"speed": "500ms"}},
        f"streams.depth: depth speed '500ms' is not served on Binance spot; {SPOT_SPEEDS}",
    ),
    (
        "spot",
        {"orderbook": {"speed": "250ms"}},
        f"streams.orderbook: depth speed '250ms' is not served on Binance spot; {SPOT_SPEEDS}",
    ),
    (
        "usdm",
        {"depth": {"speed": "1000ms"}},
        f"streams.depth: depth speed '1000ms' is not served on Binance usdm; {USDM_SPEEDS}",
    ),
    (
        "usdm",
        {"orderbook": {"speed": "10ms"}},
        f"streams.orderbook: depth speed '10ms' is not served on Binance usdm; {USDM_SPEEDS}",
    ),
    (
        "usdm",
        {"kline": {"intervals": ["1m", "1s"]}},
        "streams.kline: kline interval(s) 1s not served by binance usdm; use one of 1m, 3m,",
    ),
    (
        "usdm",
        {"orderbook": {"levels": 1500, "snapshot_limit": 2000}},
        "streams.orderbook: orderbook: levels (1500) exceeds the snapshot depth (1000)",
    ),
    (
        "spot",
        {"depth": {"speed": "100ms"}, "orderbook": {"speed": "1000ms"}},
        "streams: depth and orderbook both read the 'depth' channel but ask for different "
        "speeds ('100ms' vs '1000ms')",
    ),
]

#: Values the exchange does serve: ``config check`` accepts them and ``run`` goes on.
GOOD: list[tuple[str, dict[str, Any]]] = [
    ("spot", {"depth": {"speed": "1000ms"}, "kline": {"intervals": ["1s", "1M"]}}),
    ("spot", {"orderbook": {"levels": 5000, "snapshot_limit": 5000, "speed": "100ms"}}),
    ("usdm", {"depth": {"speed": "0ms"}, "orderbook": {"speed": "0ms", "levels": 1000}}),
    ("usdm", {"kline": {"intervals": ["1m", "1M"]}, "aggtrade": {}}),
]


def write_config(tmp_path: Path, sim, market: str, streams: dict[str, Any]) -> Path:
    data = {
        "pipelines": [
            {
                "name": market,
                "exchange": "binance",
                "options": {"market": market, "rest_url": sim.rest_url, "ws_url": sim.ws_url},
                "symbols": ["BTCUSDT"],
                "streams": streams,
                "sinks": ["csv"],
            }
        ],
        "sinks": {"csv": {"type": "csv", "path": str(tmp_path / "data")}},
        "runtime": {"state_dir": str(tmp_path / "state")},
    }
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class RecordingSupervisor:
    """Stands in for the supervisor: records that ``run`` got this far, spawns nothing."""

    calls: list[list[str]] = []

    def __init__(self, config, plugins, plans, **kwargs) -> None:
        self.plans = plans

    async def run(self) -> int:
        RecordingSupervisor.calls.append([s for plan in self.plans for s in plan.symbols])
        return 0


@pytest.fixture
def supervisor(monkeypatch) -> type[RecordingSupervisor]:
    RecordingSupervisor.calls = []
    monkeypatch.setattr(runtime, "Supervisor", RecordingSupervisor)
    return RecordingSupervisor


def invoke(*args: str):
    return CliRunner().invoke(build_app(), list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("market", "streams", "message"),
    [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(CASES)],
)
def test_value_the_exchange_does_not_serve_is_refused_alike_by_check_and_run(
    tmp_path, binance_sim, supervisor, market, streams, message
):
    path = write_config(tmp_path, binance_sim, market, streams)
    check = one_error_line(invoke("config", "check", str(path)))
    assert check.startswith(f"error: {path}: pipelines[0].{message}"), check
    assert len(check) < 300, check
    run = one_error_line(invoke("run", "--config", str(path), "-q"))
    assert run == check
    # Refused before anything started: no supervisor, no state or data directory.
    assert supervisor.calls == []
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("market", "streams"), [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(GOOD)]
)
def test_values_the_exchange_serves_pass_check_and_reach_the_supervisor(
    tmp_path, binance_sim, supervisor, market, streams
):
    path = write_config(tmp_path, binance_sim, market, streams)
    result = invoke("config", "check", str(path))
    assert result.exit_code == 0, result.output
    result = invoke("run", "--config", str(path), "-q")
    assert result.exit_code == 0, result.output
    assert supervisor.calls == [["BTCUSDT"]]


def test_config_check_needs_no_network(tmp_path):
    """The shared check builds the adapter but never calls it: a closed port is fine."""

    class Closed:
        rest_url = "http://127.0.0.1:9"
        ws_url = "ws://127.0.0.1:9"

    path = write_config(tmp_path, Closed, "usdm", {"kline": {"intervals": ["1s"]}})
    line = one_error_line(invoke("config", "check", str(path)))
    assert "streams.kline: kline interval(s) 1s not served by binance usdm" in line
    assert one_error_line(invoke("run", "--config", str(path), "-q")) == line
    good = write_config(tmp_path, Closed, "usdm", {"kline": {"intervals": ["1m"]}})
    assert invoke("config", "check", str(good)).exit_code == 0


@pytest.mark.parametrize(
    ("market", "sub", "fragment"),
    [
        ("spot", Subscription("X", "depth", "250ms"), "depth speed '250ms' is not served"),
        ("usdm", Subscription("X", "depth", "1000ms"), "depth speed '1000ms' is not served"),
        ("usdm", Subscription("X", "kline", "1s"), "kline interval '1s' is not served"),
        ("spot", Subscription("X", "kline", "2m"), "kline interval '2m' is not served"),
    ],
)
def test_binance_check_subscriptions_refuses_what_stream_would(market, sub, fragment):
    adapter = BinanceAdapter(
        BinanceOptions(market=market),
        ExchangeContext(pipeline="p", counters=Counters(), logger=logging.getLogger("t")),
    )
    ok = Subscription("X", "depth", "100ms")
    adapter.check_subscriptions([ok, Subscription("X", "trade"), Subscription("X", "kline", "1m")])
    with pytest.raises(ValueError, match=fragment):
        adapter.check_subscriptions([ok, sub])
    with pytest.raises(ValueError, match=fragment):
        adapter.stream_groups([sub])  # what the worker would have hit, in a restart loop
    anyio.run(adapter.aclose)
