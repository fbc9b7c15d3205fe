"""Reconnects after healthy connections are immediate (issue 11).

A server that closes every connection after a while (the soak closes every 20 s) made the
old manager treat each drop of a connection younger than 30 s as another failure, so the
reconnect backoff grew to its 30 s cap and every stream went silent for up to half a
minute per drop.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from streamer.core.counters import Counters
from streamer.plugins.exchanges.binance.connections import (
    ConnectionManager,
    ConnectionRateLimiter,
    ConnectionSettings,
    build_groups,
)

LOG = logging.getLogger("test.binance.reconnects")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def agg(i: int) -> str:
    body = f'"a":{i},"p":"1.0","q":"2.0","f":{i},"l":{i},"T":1,"m":true,"M":true'
    return '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT",' + body + "}}"


@pytest.mark.anyio
@pytest.mark.parametrize("ws_impl", ["protocol", "connection"])
async def test_a_healthy_connection_that_drops_reconnects_at_once_every_time(ws_impl):
    from websockets.asyncio.server import serve

    opened = 0

    async def handler(ws):
        nonlocal opened
        opened += 1
        for i in range(8):  # delivers data for a while, then the server closes it
            await ws.send(agg(opened * 100 + i))
            await anyio.sleep(0.05)
        await ws.close()

    reconnects: list[str] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        (group,) = build_groups(f"ws://127.0.0.1:{port}", ["btcusdt@aggTrade"], 10)
        settings = ConnectionSettings(
            market="spot", backoff_base=30.0, backoff_max=60.0, healthy_after=0.2, ws_impl=ws_impl
        )
        manager = ConnectionManager(
            [group], settings, on_record=lambda r: None,
            on_reconnect=lambda symbols, reason: reconnects.append(reason),
            counters=Counters(), logger=LOG, limiter=ConnectionRateLimiter(),
        )  # fmt: skip
        with anyio.fail_after(15):  # any backoff (15 s and more here) would blow this
            async with anyio.create_task_group() as tg:
                tg.start_soon(manager.run)
                while opened < 6:
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
    assert len(reconnects) >= 5
