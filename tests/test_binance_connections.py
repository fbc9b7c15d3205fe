"""Stream URLs, connection chunking and limits, backoff, pings and age rotation."""

from __future__ import annotations

import logging
import random
import time

import anyio
import msgspec
import pytest

from streamer.core.api import ExchangeContext, Subscription
from streamer.core.counters import Counters
from streamer.core.records import Trade
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.plugins.exchanges.binance.connections import (
    ConnectionManager,
    ConnectionRateLimiter,
    ConnectionSettings,
    build_groups,
)

LOG = logging.getLogger("test.binance.connections")


def adapter(**options) -> BinanceAdapter:
    return BinanceAdapter(
        msgspec.convert(options, BinanceOptions),
        ExchangeContext(pipeline="t", counters=Counters(), logger=LOG),
    )


def test_spot_combined_url_with_lowercase_names():
    a = adapter()
    subs = [Subscription("BTCUSDT", "trade"), Subscription("BTCUSDT", "kline", "1m"),
            Subscription("ETHUSDT", "depth", "100ms"), Subscription("ETHUSDT", "depth", "1000ms"),
            Subscription("BNBUSDT", "kline", "1s")]  # fmt: skip
    (group,) = a.stream_groups(subs)
    assert group.url == (
        "wss://stream.binance.com:9443/stream?streams=bnbusdt@kline_1s/btcusdt@aggTrade/"
        "btcusdt@kline_1m/ethusdt@depth/ethusdt@depth@100ms"
    )
    assert group.symbols == ("BNBUSDT", "BTCUSDT", "ETHUSDT")


def test_usdm_urls_are_routed_never_unrouted():
    a = adapter(market="usdm")
    subs = [Subscription("BTCUSDT", "trade"), Subscription("BTCUSDT", "kline", "1m"),
            Subscription("BTCUSDT", "depth", ""), Subscription("ETHUSDT", "depth", "250ms"),
            Subscription("ETHUSDT", "depth", "0ms")]  # fmt: skip
    urls = sorted(g.url for g in a.stream_groups(subs))
    assert urls == [
        "wss://fstream.binance.com/market/stream?streams=btcusdt@aggTrade/btcusdt@kline_1m",
        "wss://fstream.binance.com/public/stream?streams=btcusdt@depth@100ms/ethusdt@depth/"
        "ethusdt@depth@0ms",
    ]


def test_chunking_never_exceeds_the_per_connection_limit():
    names = [f"s{i:04d}usdt@aggTrade" for i in range(1025)]
    groups = build_groups("wss://x", names, 1024)
    assert [len(g.streams) for g in groups] == [1024, 1]
    a = adapter()
    subs = [Subscription(f"S{i:03d}USDT", "trade") for i in range(450)]
    assert [len(g.streams) for g in a.stream_groups(subs)] == [200, 200, 50]
    with pytest.raises(ValueError, match=r"1\.\.1024"):
        build_groups("wss://x", names, 1025)
    with pytest.raises(msgspec.ValidationError, match="1024"):
        msgspec.convert({"max_streams_per_connection": 1025}, BinanceOptions)


def test_streams_of_one_symbol_share_a_connection():
    names = [f"{s}@{k}" for s in ("aaa", "bbb", "ccc") for k in ("aggTrade", "kline_1m")]
    groups = build_groups("wss://x", names, 2)
    assert [g.symbols for g in groups] == [("AAA",), ("BBB",), ("CCC",)]


@pytest.mark.parametrize(
    ("options", "sub", "message"),
    [
        ({}, Subscription("BTCUSDT", "depth", "250ms"), "depth speed '250ms'"),
        ({"market": "usdm"}, Subscription("BTCUSDT", "kline", "1s"), "interval '1s'"),
        ({}, Subscription("BTCUSDT", "kline", "7m"), "interval '7m'"),
    ],
)
def test_unsupported_stream_parameters_are_clear_errors(options, sub, message):
    with pytest.raises(ValueError, match=message):
        adapter(**options).stream_name(sub)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"market": "usdm", "depth_speed": "1000ms"}, "not served on usdm"),
        ({"market": "coinm"}, "Invalid enum value 'coinm'"),
        ({"rotate_at": "7am"}, "HH:MM"),
        ({"reconnect_backoff_max": "fast"}, "invalid duration"),
        ({"max_new_connections_per_5m": 301}, "between 1 and 300"),
        ({"ws_impl": "trio"}, "Invalid enum value 'trio'"),
    ],
)
def test_bad_adapter_options(raw, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, BinanceOptions)


def _manager(**settings) -> ConnectionManager:
    return ConnectionManager(
        [], ConnectionSettings(market="spot", **settings), on_record=lambda r: None,
        on_reconnect=lambda s, r: None, counters=Counters(), logger=LOG,
        limiter=ConnectionRateLimiter(),
    )  # fmt: skip


def test_backoff_is_capped_jittered_and_unbounded_in_retries():
    m = _manager(backoff_base=0.5, backoff_max=8.0, rng=random.Random(3))
    assert m._backoff(1) == 0.0, "the first reconnect is immediate"
    delays = [m._backoff(n) for n in range(2, 40)]
    assert all(0 < d <= 8.0 for d in delays)
    assert delays[0] <= 0.5 and delays[-1] >= 4.0  # grows to the cap (jitter >= 50%)
    assert len(set(delays[-10:])) == 10, "jittered, not a fixed schedule"


def test_rotation_delay_by_age_and_time_of_day():
    m = _manager(rotate_after=23 * 3600.0, rotate_at_second=None)
    assert m._rotation_delay(0.0) == 23 * 3600.0
    m = _manager(rotate_after=0, rotate_at_second=3 * 3600)
    assert m._rotation_delay(86400 * 100 + 3600) == 2 * 3600
    m = _manager(rotate_after=23 * 3600.0, rotate_at_second=3 * 3600)
    assert m._rotation_delay(86400 * 100 + 3600) == 2 * 3600
    m = _manager(rotate_after=0, rotate_at_second=None)
    assert m._rotation_delay(0.0) == float("inf")


@pytest.mark.anyio
async def test_connection_rate_limiter_enforces_a_rolling_window():
    limiter = ConnectionRateLimiter(limit=3, window=0.3)
    start = time.monotonic()
    stamps = []
    for _ in range(5):
        await limiter.acquire()
        stamps.append(time.monotonic() - start)
    assert stamps[2] < 0.1
    assert stamps[3] >= 0.29 and stamps[4] >= 0.29


# --------------------------------------------------------------------------- with the simulator


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["protocol", "connection"])
def ws_impl(request) -> str:
    """Every test with a server runs on both receive paths (``connection`` for one release)."""
    return request.param


@pytest.mark.anyio
async def test_pings_are_answered_with_their_payload_and_age_rotation_precedes_the_cut(ws_impl):
    sim_mod = pytest.importorskip("streamer.testing.sim", reason="the simulator has not landed")
    cfg = sim_mod.SimConfig(seed=5, spot_symbols=["BTCUSDT"], tick_ms=20, ping_interval_s=0.3,
                            pong_timeout_s=1.0, max_connection_age_s=2.0)  # fmt: skip
    async with sim_mod.SimServer(cfg) as sim:
        a = adapter(
            rest_url=sim.rest_url, ws_url=sim.ws_url, rotate_after="1s", rotation_overlap="200ms",
            ws_impl=ws_impl,
        )  # fmt: skip
        trades: list[Trade] = []
        reconnects = []

        class Inbox:
            def on_record(self, record):
                if isinstance(record, Trade):
                    trades.append(record)

            def on_reconnect(self, symbols, reason):
                reconnects.append(reason)

        with anyio.move_on_after(3.5):
            await a.stream([Subscription("BTCUSDT", "trade")], Inbox())
        await a.aclose()
        c = a.context.counters
        assert sim.counters.get("ws_pings_sent") >= 6
        assert sim.counters.get("ws_pong_timeouts") == 0
        assert sim.counters.get("ws_max_age_closes") == 0, "rotated before the server's cut"
        assert sim.counters.get("ws_rate_limit_disconnects") == 0
        assert c.get("ws_rotations") >= 2 and c.get("ws_reconnects") == 0 and reconnects == []
        ids = [t.trade_id for t in trades]
        assert len(set(ids)) < len(ids), "overlapping connections both delivered (dedup later)"


@pytest.mark.anyio
async def test_bad_frames_are_counted_not_fatal_and_server_shutdown_is_replaced(ws_impl):
    from websockets.asyncio.server import serve

    def agg(i: int) -> str:
        body = f'"a":{i},"p":"1.0","q":"2.0","f":{i},"l":{i},"T":1,"m":true,"M":true'
        return (
            '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT",' + body + "}}"
        )

    connections = []
    shutdown_frame = '{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":5}}'

    async def handler(ws):
        connections.append(ws.request.path)
        n = len(connections)
        if n == 1:
            for frame in [agg(1), '{"e":"somethingNew","E":1}',
                          '{"stream":"btcusdt@markPrice","data":{}}', '{"stream":"btcusdt@agg',
                          '{"code":2,"msg":"Invalid request: too many parameters","id":1}',
                          '{"result":null,"id":2}', agg(2),
                          shutdown_frame]:  # fmt: skip
                await ws.send(frame)
        else:
            await ws.send(agg(2))
            await ws.send(agg(3))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        a = adapter(ws_url=f"ws://127.0.0.1:{port}", rotation_overlap="100ms", ws_impl=ws_impl)
        got: list[int] = []
        reconnects = []

        class Inbox:
            def on_record(self, record):
                got.append(record.trade_id)

            def on_reconnect(self, symbols, reason):
                reconnects.append(reason)

        async with anyio.create_task_group() as tg:
            tg.start_soon(a.stream, [Subscription("BTCUSDT", "trade")], Inbox())
            with anyio.fail_after(10):
                while a.context.counters.get("ws_rotations") < 1:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        await a.aclose()
    c = a.context.counters
    assert connections == ["/stream?streams=btcusdt@aggTrade"] * 2
    assert got == [1, 2, 2, 3], "bad frames skipped; the replacement overlaps (dedup later)"
    assert c.get("malformed_frames", stream="unknown_event") == 1
    assert c.get("malformed_frames", stream="unknown_stream") == 1
    assert c.get("malformed_frames", stream="json") == 1
    assert c.get("ws_control_errors") == 1
    assert c.get("ws_server_shutdowns") == 1 and c.get("ws_reconnects") == 0 and not reconnects


@pytest.mark.anyio
async def test_connect_failures_are_retried_until_the_server_comes_back(ws_impl):
    import socket

    from websockets.asyncio.server import serve

    with socket.socket() as probe:  # a free port, closed again: nothing listens there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    frame = ('{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT","a":7,'
             '"p":"1.0","q":"2.0","f":7,"l":7,"T":1,"m":true,"M":true}}')  # fmt: skip

    async def handler(ws):
        await ws.send(frame)
        await ws.wait_closed()

    a = adapter(ws_url=f"ws://127.0.0.1:{port}", reconnect_backoff_max="200ms", ws_impl=ws_impl)
    got = []

    class Inbox:
        def on_record(self, record):
            got.append(record.trade_id)

        def on_reconnect(self, symbols, reason):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(a.stream, [Subscription("BTCUSDT", "trade")], Inbox())
        with anyio.fail_after(10):
            while a.context.counters.get("ws_connect_failures") < 3:
                await anyio.sleep(0.02)
        async with serve(handler, "127.0.0.1", port):
            with anyio.fail_after(10):
                while not got:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    await a.aclose()
    assert got == [7]
    assert a.context.counters.get("ws_connects") >= 4


@pytest.mark.anyio
async def test_failed_replacement_keeps_the_old_connection(ws_impl):
    from websockets.asyncio.server import serve

    clock = {"id": 0}
    opened = []

    def agg(i: int) -> str:
        body = f'"a":{i},"p":"1.0","q":"2.0","f":{i},"l":{i},"T":1,"m":true,"M":true'
        return (
            '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT",' + body + "}}"
        )

    async def handler(ws):
        opened.append(1)
        if len(opened) == 2:
            await ws.close()  # the first replacement attempt dies before delivering
            return
        sent = clock["id"]  # a new connection starts with the live stream's next event
        while True:
            while sent < clock["id"]:
                sent += 1
                await ws.send(agg(sent))
            with anyio.move_on_after(0.005):
                await ws.wait_closed()
                return  # the client went away

    async def ticker():
        while True:
            clock["id"] += 1
            await anyio.sleep(0.01)

    async with serve(handler, "127.0.0.1", 0) as server, anyio.create_task_group() as market:
        market.start_soon(ticker)
        port = server.sockets[0].getsockname()[1]
        a = adapter(ws_url=f"ws://127.0.0.1:{port}", rotation_overlap="100ms", ws_impl=ws_impl)
        got: list[int] = []
        reconnects = []

        class Inbox:
            def on_record(self, record):
                got.append(record.trade_id)

            def on_reconnect(self, symbols, reason):
                reconnects.append(reason)

        async with anyio.create_task_group() as tg:
            tg.start_soon(a.stream, [Subscription("BTCUSDT", "trade")], Inbox())
            with anyio.fail_after(10):
                while len(got) < 5:
                    await anyio.sleep(0.01)
                a.connections.request_rotation()
                while a.context.counters.get("ws_rotations") < 1:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        await a.aclose()
        market.cancel_scope.cancel()
    assert len(opened) == 3
    assert reconnects == [] and a.context.counters.get("ws_reconnects") == 0
    assert sorted(set(got)) == list(range(min(got), max(got) + 1)), "no id was missed"
