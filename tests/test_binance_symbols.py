"""``symbols: [all]`` must not subscribe a listed symbol that is not a valid stream name.

One such name in a combined-stream URL gets the whole connection (up to 1024 streams)
rejected, so nothing is collected. Listed under ``all`` it is skipped with one warning;
requested by name it is an error.
"""

from __future__ import annotations

import logging

import httpx
import msgspec
import pytest

from streamer.core.api import ExchangeContext, Subscription
from streamer.core.counters import Counters
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.testing.streams import parse_stream

pytestmark = pytest.mark.anyio

LOG = logging.getLogger("test.binance.symbols")
ODD = ["币安人生USDT", "BAD-SYM", "SP ACE"]


def exchange_info(symbols: list[str]) -> bytes:
    return msgspec.json.encode(
        {
            "rateLimits": [],
            "symbols": [
                {"symbol": s, "status": "TRADING", "baseAsset": s[:-4], "quoteAsset": "USDT"}
                for s in symbols
            ],
        }
    )


def adapter_for(symbols: list[str], market: str = "spot") -> BinanceAdapter:
    body = exchange_info(symbols)
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body))
    )
    ctx = ExchangeContext(pipeline="t", counters=Counters(), logger=LOG, http_client=client)
    return BinanceAdapter(msgspec.convert({"market": market}, BinanceOptions), ctx)


async def test_all_skips_symbols_that_are_not_valid_stream_names(caplog):
    adapter = adapter_for(["BTCUSDT", *ODD, "ETHUSDT"])
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        chosen = await adapter.resolve_symbols(["all"])
    assert chosen == ["BTCUSDT", "ETHUSDT"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "skipping 3 listed symbol(s) that are not valid stream names" in warnings[0]
    assert all(repr(s) in warnings[0] for s in ODD), warnings[0]
    # Every stream the adapter would open is one the server accepts.
    subs = [Subscription(s, c) for s in chosen for c in ("trade", "depth")]
    names = [n for g in adapter.stream_groups(subs) for n in g.streams]
    assert names and all(parse_stream(n, "spot") is not None for n in names), names


async def test_explicitly_requested_invalid_symbol_is_an_error():
    adapter = adapter_for(["BTCUSDT", *ODD])
    with pytest.raises(ValueError, match=r"cannot be streamed from Binance spot.*'BAD-SYM'"):
        await adapter.resolve_symbols(["BTCUSDT", "bad-sym"])
    assert await adapter.resolve_symbols(["btcusdt"]) == ["BTCUSDT"]


async def test_usdm_keeps_dated_delivery_contracts():
    adapter = adapter_for(["BTCUSDT", "BTCUSDT_260327", "币安人生USDT"], market="usdm")
    chosen = await adapter.resolve_symbols(["all"])
    assert chosen == ["BTCUSDT", "BTCUSDT_260327"]
    names = [n for g in adapter.stream_groups([Subscription(s, "trade") for s in chosen])
             for n in g.streams]  # fmt: skip
    assert all(parse_stream(n, "usdm") is not None for n in names), names


async def test_many_invalid_symbols_make_one_short_warning(caplog):
    adapter = adapter_for(["BTCUSDT"] + [f"X-{i}USDT" for i in range(2000)])
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert await adapter.resolve_symbols(["all"]) == ["BTCUSDT"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping 2000 listed symbol(s)" in warning and "and 1995 more" in warning
    assert len(warning) < 300
