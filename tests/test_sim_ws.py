"""WebSocket side of the simulator: shapes, routing, control messages, limits, keep-alive."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.testing import _wire as wire
from streamer.testing.client import RawClient
from streamer.testing.market import SPOT_INTERVALS, USDM_INTERVALS
from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio
T0 = 1_764_000_000_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_data(ws, n: int, timeout: float = 10.0) -> list[dict]:
    """The next ``n`` data messages (control responses skipped)."""
    out = []
    while len(out) < n:
        msg = await recv_json(ws, timeout)
        if "result" not in msg and "code" not in msg:
            out.append(msg)
    return out


async def control(ws, request: dict) -> dict:
    """Send a control message and return its response (data messages skipped)."""
    await ws.send(json.dumps(request))
    while True:
        msg = await recv_json(ws)
        if "id" in msg and ("result" in msg or "code" in msg):
            return msg


async def assert_silent(ws, seconds: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


# -- shapes -----------------------------------------------------------------------------


async def test_spot_aggtrade_raw_shape():
    async with (
        SimServer(SimConfig(trade_probability=1.0)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@aggTrade") as ws,
    ):
        (msg,) = await recv_data(ws, 1)
    assert list(msg) == ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]
    assert msg["e"] == "aggTrade" and msg["s"] == "BTCUSDT"
    assert isinstance(msg["p"], str) and msg["p"].count(".") == 1
    assert len(msg["p"].split(".")[1]) == 8  # spot strings carry 8 decimals
    assert isinstance(msg["a"], int) and msg["l"] >= msg["f"]


async def test_usdm_aggtrade_shape_has_nq_and_no_M():
    async with (
        SimServer(SimConfig(trade_probability=1.0)) as sim,
        websockets.connect(f"{sim.ws_url}/market/ws/btcusdt@aggTrade") as ws,
    ):
        (msg,) = await recv_data(ws, 1)
    assert list(msg) == ["e", "E", "s", "a", "p", "q", "nq", "f", "l", "T", "m"]


async def test_combined_stream_envelope_and_ids():
    url = "/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
    async with SimServer() as sim, websockets.connect(sim.ws_url + url) as ws:
        msgs = await recv_data(ws, 20)
    assert all(list(m) == ["stream", "data"] for m in msgs)
    assert {m["stream"] for m in msgs} == {"btcusdt@depth@100ms", "ethusdt@depth@100ms"}
    for stream in ("btcusdt@depth@100ms", "ethusdt@depth@100ms"):
        events = [m["data"] for m in msgs if m["stream"] == stream]
        assert list(events[0]) == ["e", "E", "s", "U", "u", "b", "a"]
        for prev, ev in itertools.pairwise(events):
            assert ev["U"] == prev["u"] + 1  # spot: contiguous


async def test_usdm_depth_carries_pu_and_ids_jump():
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/public/ws/btcusdt@depth@0ms") as ws,
    ):
        events = await recv_data(ws, 15)
    assert list(events[0]) == ["e", "E", "T", "s", "U", "u", "pu", "b", "a"]
    for prev, ev in itertools.pairwise(events):
        assert ev["pu"] == prev["u"]
    assert any(ev["U"] != prev["u"] + 1 for prev, ev in itertools.pairwise(events))
    zeros = [q for ev in events for _, q in ev["b"] + ev["a"] if float(q) == 0]
    assert zeros and set(zeros) == {"0"}  # futures send a removed level as "0"


@pytest.mark.parametrize(
    ("path", "period"),
    [
        ("/public/ws/btcusdt@depth", 250),
        ("/public/ws/btcusdt@depth@500ms", 500),
        ("/public/ws/btcusdt@depth@100ms", 100),
        ("/ws/btcusdt@depth@100ms", 100),
        ("/ws/btcusdt@depth", 1000),
    ],
)
async def test_depth_speeds(path, period):
    cfg = SimConfig(start_time_ms=T0, tick_ms=50)
    async with SimServer(cfg) as sim, websockets.connect(sim.ws_url + path) as ws:
        events = await recv_data(ws, 3)
    times = [e["E"] for e in events]
    assert [b - a for a, b in itertools.pairwise(times)] == [period, period]


async def test_partial_depth_and_book_ticker_shapes():
    async with SimServer() as sim:
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth5@100ms") as ws:
            (spot,) = await recv_data(ws, 1)
        async with websockets.connect(f"{sim.ws_url}/public/ws/btcusdt@depth10@100ms") as ws:
            (fut,) = await recv_data(ws, 1)
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@bookTicker") as ws:
            (tick,) = await recv_data(ws, 1)
    assert list(spot) == ["lastUpdateId", "bids", "asks"] and len(spot["bids"]) == 5
    assert fut["e"] == "depthUpdate" and len(fut["b"]) == 10 and "pu" in fut
    assert list(tick) == ["u", "s", "b", "B", "a", "A"]


async def test_kline_1s_closes_with_x_true_and_matches_truth():
    cfg = SimConfig(trade_probability=1.0)
    async with SimServer(cfg) as sim, websockets.connect(f"{sim.ws_url}/ws/btcusdt@kline_1s") as ws:
        finals = []
        while len(finals) < 2:
            msg = await recv_json(ws)
            assert list(msg["k"]) == [
                "t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"
            ]  # fmt: skip
            if msg["k"]["x"]:
                finals.append(msg["k"])
        truth = {k.open_time: k for k in sim.truth.closed_klines("spot", "BTCUSDT", "1s")}
    assert finals[1]["t"] == finals[0]["T"] + 1
    for k in finals:
        t = truth[k["t"]]
        assert (k["o"], k["h"], k["l"], k["c"], k["v"], k["n"], k["q"], k["V"], k["Q"]) == (
            t.open, t.high, t.low, t.close, t.volume, t.count, t.quote_volume,
            t.taker_buy_volume, t.taker_buy_quote_volume,
        )  # fmt: skip


async def test_every_kline_interval_is_accepted():
    async with SimServer() as sim:
        async with websockets.connect(f"{sim.ws_url}/ws") as ws:
            names = [f"btcusdt@kline_{i}" for i in SPOT_INTERVALS]
            assert await control(ws, {"method": "SUBSCRIBE", "params": names, "id": 1}) == {
                "result": None,
                "id": 1,
            }
        async with websockets.connect(f"{sim.ws_url}/market/ws") as ws:
            names = [f"btcusdt@kline_{i}" for i in USDM_INTERVALS]
            resp = await control(ws, {"method": "SUBSCRIBE", "params": names, "id": 2})
            assert resp == {"result": None, "id": 2}
            resp = await control(
                ws, {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1s"], "id": 3}
            )
            assert resp["code"] == 2 and "btcusdt@kline_1s" in resp["msg"]


# -- routing ----------------------------------------------------------------------------


async def test_usdm_routing_serves_each_kind_on_its_route_only():
    # Few trades, so no client queue fills up while the silent ones are checked.
    async with SimServer(SimConfig(trade_probability=0.2)) as sim:
        base = sim.ws_url
        async with (
            websockets.connect(f"{base}/market/ws/btcusdt@aggTrade") as market_agg,
            websockets.connect(f"{base}/public/ws/btcusdt@aggTrade") as public_agg,
            websockets.connect(f"{base}/market/ws/btcusdt@depth@100ms") as market_depth,
            websockets.connect(f"{base}/fstream/ws/btcusdt@depth@100ms") as unrouted_depth,
            websockets.connect(f"{base}/fstream/ws/btcusdt@aggTrade") as unrouted_agg,
            websockets.connect(f"{base}/fstream/public/ws/btcusdt@depth@100ms") as fpublic,
        ):
            await recv_data(market_agg, 3)
            await recv_data(unrouted_depth, 3)
            await recv_data(fpublic, 1)
            for ws in (public_agg, market_depth, unrouted_agg):
                await assert_silent(ws)
        counters = sim.truth.counters()
    assert counters[("ws_unrouted_streams", "BTCUSDT", "aggTrade")] == 2
    assert counters[("ws_unrouted_streams", "BTCUSDT", "depth")] == 1


async def test_unknown_symbol_stream_is_accepted_but_silent():
    async with SimServer() as sim, websockets.connect(f"{sim.ws_url}/ws/nosuchusdt@aggTrade") as ws:
        await assert_silent(ws)
        assert sim.truth.counters()[("ws_unknown_symbol_streams", "NOSUCHUSDT", "")] == 1


async def test_bad_paths_and_stream_names_are_rejected_with_http_errors():
    async with SimServer() as sim:
        with pytest.raises(InvalidStatus) as exc:
            await websockets.connect(f"{sim.ws_url}/nope")
        assert exc.value.response.status_code == 404
        with pytest.raises(InvalidStatus) as exc:
            await websockets.connect(f"{sim.ws_url}/ws/btcusdt@bogus")
        assert exc.value.response.status_code == 400
        assert b"invalid stream name" in exc.value.response.body
        assert sim.truth.counters()[("ws_bad_handshakes", "", "")] == 1


# -- control messages -------------------------------------------------------------------


async def test_subscribe_list_unsubscribe_and_properties():
    async with SimServer() as sim, websockets.connect(f"{sim.ws_url}/ws") as ws:
        assert await control(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 1}) == {
            "result": False,
            "id": 1,
        }
        sub = {"method": "SUBSCRIBE", "params": ["btcusdt@aggTrade", "btcusdt@depth"], "id": 2}
        assert await control(ws, sub) == {"result": None, "id": 2}
        resp = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 3})
        assert resp == {"result": ["btcusdt@aggTrade", "btcusdt@depth"], "id": 3}
        unsub = {"method": "UNSUBSCRIBE", "params": ["btcusdt@depth"], "id": 312}
        assert await control(ws, unsub) == {"result": None, "id": 312}
        resp = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 4})
        assert resp["result"] == ["btcusdt@aggTrade"]
        await asyncio.sleep(1.1)  # stay under the 5 messages/s limit
        setp = {"method": "SET_PROPERTY", "params": ["combined", True], "id": 5}
        assert await control(ws, setp) == {"result": None, "id": 5}
        assert await control(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 6}) == {
            "result": True,
            "id": 6,
        }
        unsub = {"method": "UNSUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 7}
        await control(ws, unsub)
        sub = {"method": "SUBSCRIBE", "params": ["btcusdt@depth@100ms"], "id": 8}
        await control(ws, sub)
        (msg,) = await recv_data(ws, 1)
        assert msg["stream"] == "btcusdt@depth@100ms"


@pytest.mark.parametrize(
    ("raw", "code", "msg"),
    [
        (b'{"method":"SUBSCRIBE",', 3, "Invalid JSON: expected value at line 1 column"),
        (b'{"params":[],"id":1}', 2, "Invalid request: missing field `method`"),
        (b'{"method":"PING","id":1}', 2, "Invalid request: unknown variant `PING`"),
        (b'{"method":"LIST_SUBSCRIPTIONS"}', 2, "request ID must be an unsigned integer"),
        (b'{"method":"LIST_SUBSCRIPTIONS","id":true}', 2, "request ID must be"),
        (b'{"method":"LIST_SUBSCRIPTIONS","id":"a b"}', 2, "request ID must be"),
        (b'{"method":"LIST_SUBSCRIPTIONS","params":["x"],"id":1}', 2, "too many parameters"),
        (b'{"method":"SET_PROPERTY","params":["fast",true],"id":1}', 0, "Unknown property"),
        (b'{"method":"SET_PROPERTY","params":["combined","yes"],"id":1}', 1, "expected Boolean"),
        (b'{"method":"GET_PROPERTY","params":[5],"id":1}', 2, "property name must be a string"),
        (b'{"method":"GET_PROPERTY","params":["combined","x"],"id":1}', 2, "too many parameters"),
        (b'{"method":"SUBSCRIBE","params":"btcusdt@depth","id":1}', 2, "Invalid request"),
        (b'{"method":"SUBSCRIBE","params":["btcusdt@nope"],"id":1}', 2, "invalid stream name"),
        (b"[1,2]", 2, "Invalid request"),
    ],
)
async def test_bad_control_messages_get_documented_errors(raw, code, msg):
    async with SimServer() as sim, websockets.connect(f"{sim.ws_url}/ws") as ws:
        await ws.send(raw.decode())
        resp = await recv_json(ws)
        assert resp["code"] == code and msg in resp["msg"]
        assert list(resp) == ["code", "msg", "id"]
        # The connection survives and still answers.
        assert (await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 9}))["result"] == []
        assert sim.truth.counters()[("ws_control_errors", "", str(code))] == 1


async def test_request_id_types_spot_versus_futures():
    async with SimServer() as sim:
        async with websockets.connect(f"{sim.ws_url}/ws") as ws:
            for req_id in ("abc-123", None, -5):
                resp = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": req_id})
                assert resp == {"result": [], "id": req_id}
        async with websockets.connect(f"{sim.ws_url}/market/ws") as ws:
            resp = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": "abc"})
            assert resp["code"] == 2
            resp = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 7})
            assert resp == {"result": [], "id": 7}


# -- limits -----------------------------------------------------------------------------


async def test_max_streams_per_connection():
    cfg = SimConfig(max_streams=1024)
    async with SimServer(cfg) as sim:
        names = [f"s{i}usdt@aggTrade" for i in range(1025)]
        with pytest.raises(InvalidStatus) as exc:
            await websockets.connect(f"{sim.ws_url}/stream?streams=" + "/".join(names))
        assert exc.value.response.status_code == 400
        assert b"too many streams" in exc.value.response.body
        url = f"{sim.ws_url}/stream?streams=" + "/".join(names[:1024])
        async with websockets.connect(url) as ws:
            extra = {"method": "SUBSCRIBE", "params": [names[1024]], "id": 1}
            resp = await control(ws, extra)
            assert resp["code"] == 2 and "too many streams" in resp["msg"]
            again = {"method": "SUBSCRIBE", "params": [names[0]], "id": 2}
            assert await control(ws, again) == {"result": None, "id": 2}  # already counted


@pytest.mark.parametrize(("path", "limit"), [("/ws", 5), ("/market/ws", 10)])
async def test_incoming_message_rate_limit_disconnects(path, limit):
    async with SimServer() as sim:
        async with websockets.connect(sim.ws_url + path) as ws:
            for i in range(limit):
                await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": i})
        async with websockets.connect(sim.ws_url + path) as ws:
            for i in range(limit + 1):
                await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
            with pytest.raises(ConnectionClosed) as exc:
                for _ in range(limit + 2):
                    await recv_json(ws)
            assert exc.value.rcvd.code == 1008
        assert sim.truth.counters()[("ws_rate_limit_disconnects", "", "")] == 1


async def test_server_pings_and_client_pongs_keep_connection():
    # Pongs count toward the 5 messages/s limit: ping every 0.25 s stays under it.
    cfg = SimConfig(ping_interval_s=0.25, pong_timeout_s=0.5)
    async with (
        SimServer(cfg) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        await recv_data(ws, 12)  # about 1.2 s, several ping rounds
        assert sim.truth.counters()[("ws_pings_sent", "", "")] >= 3
        assert ("ws_pong_timeouts", "", "") not in sim.truth.counters()


async def test_missing_pong_disconnects_and_unsolicited_pong_does_not_help():
    cfg = SimConfig(ping_interval_s=0.1, pong_timeout_s=0.3)
    async with SimServer(cfg) as sim:
        client = await RawClient.connect(f"{sim.ws_url}/ws")
        payload = await client.recv_until(wire.OP_PING)
        assert payload.isdigit()
        client.send(b"unrelated", wire.OP_PONG)  # not an echo of the ping payload
        close = await client.recv_until(wire.OP_CLOSE, timeout=3)
        assert int.from_bytes(close[:2], "big") == 1008
        await client.close()
        assert sim.truth.counters()[("ws_pong_timeouts", "", "")] == 1
        assert sim.truth.counters()[("ws_unsolicited_pongs", "", "")] == 1


async def test_max_connection_age():
    cfg = SimConfig(max_connection_age_s=0.3)
    async with (
        SimServer(cfg) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        with pytest.raises(ConnectionClosed) as exc:
            await recv_data(ws, 100)
        assert exc.value.rcvd.code == 1000
        assert sim.truth.counters()[("ws_max_age_closes", "", "")] == 1


async def test_server_shutdown_event_raw_and_combined():
    async with SimServer() as sim:
        async with (
            websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth") as raw,
            websockets.connect(f"{sim.ws_url}/stream?streams=btcusdt@depth") as comb,
        ):
            sim.faults.server_shutdown(grace_s=0.1)
            msg = await recv_json(raw)
            assert list(msg) == ["e", "E"] and msg["e"] == "serverShutdown"
            msg = await recv_json(comb)
            assert msg["stream"] == "!serverShutdown" and msg["data"]["e"] == "serverShutdown"
            for ws in (raw, comb):
                with pytest.raises(ConnectionClosed) as exc:
                    await recv_json(ws, 3)
                assert exc.value.rcvd.code == 1001
        assert sim.truth.counters()[("server_shutdowns", "", "")] == 1


# -- client misbehaviour never crashes the server ---------------------------------------


async def test_protocol_violations_close_the_connection_only():
    async with SimServer(SimConfig(max_frame_bytes=1000)) as sim:
        client = await RawClient.connect(f"{sim.ws_url}/ws")
        client.send(b'{"method":"LIST_SUBSCRIPTIONS","id":1}', masked=False)
        close = await client.recv_until(wire.OP_CLOSE)
        assert int.from_bytes(close[:2], "big") == 1002
        await client.close()
        client = await RawClient.connect(f"{sim.ws_url}/ws")
        client.send(b"x" * 2000)
        close = await client.recv_until(wire.OP_CLOSE)
        assert int.from_bytes(close[:2], "big") == 1009
        await client.close()
        # Garbage instead of HTTP gets a 400; the server keeps serving.
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        assert (await reader.read(100)).startswith(b"HTTP/1.1 400")
        writer.close()
        async with websockets.connect(f"{sim.ws_url}/ws") as ws:
            assert (await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1}))["result"] == []
        counters = sim.truth.counters()
        assert counters[("ws_protocol_errors", "", "")] == 2
        assert counters[("http_bad_requests", "", "")] == 1
        assert ("sim_internal_errors", "", "") not in counters


async def test_client_close_is_answered():
    async with SimServer() as sim:
        ws = await websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth")
        await asyncio.wait_for(ws.close(), 3)
        assert ws.close_code == 1000
        await asyncio.sleep(0)
        assert sim.truth.counters()[("ws_open_connections", "", "")] in (0, 1)


async def test_spot_time_unit_microsecond():
    cfg = SimConfig(trade_probability=1.0, start_time_ms=T0)
    async with SimServer(cfg) as sim:
        url = f"{sim.ws_url}/stream?streams=btcusdt@aggTrade/btcusdt@kline_1m&timeUnit=MICROSECOND"
        async with (
            websockets.connect(url) as micro,
            websockets.connect(f"{sim.ws_url}/ws/btcusdt@aggTrade") as milli,
        ):
            got = await recv_data(micro, 6)
            plain = await recv_data(milli, 1)
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"{sim.ws_url}/public/ws/btcusdt@depth?timeUnit=MICROSECOND")
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth?timeUnit=NANOSECOND")
    assert plain[0]["E"] < 10**15
    trades = [m["data"] for m in got if m["stream"] == "btcusdt@aggTrade"]
    klines = [m["data"] for m in got if m["stream"] == "btcusdt@kline_1m"]
    assert trades and all(t["E"] >= 10**15 and t["T"] >= 10**15 for t in trades)
    assert all(k["k"]["t"] % 60_000_000 == 0 and k["E"] >= 10**15 for k in klines)


async def test_random_garbage_never_crashes_the_server():
    import random

    rng = random.Random(1234)
    async with SimServer(SimConfig(incoming_limit=10_000)) as sim:
        for _ in range(30):  # random bytes instead of HTTP
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
            writer.write(
                bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) + b"\r\n\r\n"
            )
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(200), 2)
            writer.close()
        client = await RawClient.connect(f"{sim.ws_url}/ws")
        pieces = [b"{", b"}", b"[", b"]", b'"method"', b'"id"', b'"params"', b":", b",", b"1"]
        pieces += [b'"SUBSCRIBE"', b'"SET_PROPERTY"', b'"combined"', b"null", b"true", b"\xff"]
        for _ in range(300):  # random control messages
            client.send(b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
        client.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 77}).encode())
        while True:
            op, payload = await client.recv(5)
            if op == wire.OP_TEXT and b'"id":77' in payload:
                break
        for _ in range(20):  # random frames, including bad opcodes and lengths
            client.writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randint(2, 40))))
        await client.close()
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            await recv_data(ws, 1)
        assert ("sim_internal_errors", "", "") not in sim.truth.counters()
