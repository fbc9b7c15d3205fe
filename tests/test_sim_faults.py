"""Every fault the simulator can inject, live (sim.faults) and per run (FaultPlan)."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK

from streamer.testing.faults import FaultPlan
from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def recv_raw(ws, timeout: float = 5.0) -> str:
    return await asyncio.wait_for(ws.recv(), timeout)


async def data(ws, n: int) -> list[dict]:
    return [json.loads(await recv_raw(ws)) for _ in range(n)]


def counter(sim: SimServer, name: str, symbol: str = "", stream: str = "") -> int:
    return sim.truth.counters().get((name, symbol, stream), 0)


# -- stream faults ----------------------------------------------------------------------


async def test_drop_aggtrades_makes_an_id_gap_that_rest_fills():
    async with (
        SimServer(SimConfig(trade_probability=1.0)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@aggTrade") as ws,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        first = (await data(ws, 1))[0]["a"]
        sim.faults.drop_aggtrades("BTCUSDT", 3)
        ids = [m["a"] for m in await data(ws, 10)]
        gaps = [(a, b) for a, b in zip([first, *ids], ids, strict=False) if b != a + 1]
        assert len(gaps) == 1 and gaps[0][1] - gaps[0][0] == 4  # exactly 3 missing
        missing = list(range(gaps[0][0] + 1, gaps[0][1]))
        r = await client.get(
            "/api/v3/aggTrades", params={"symbol": "BTCUSDT", "fromId": missing[0], "limit": 3}
        )
        assert [t["a"] for t in r.json()] == missing
        assert counter(sim, "fault_aggtrade_dropped", "BTCUSDT") == 3


@pytest.mark.parametrize(("path", "spot"), [("/ws", True), ("/public/ws", False)])
async def test_drop_depth_breaks_the_sequence(path, spot):
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}{path}/btcusdt@depth@100ms") as ws,
    ):
        events = await data(ws, 1)
        sim.faults.drop_depth("BTCUSDT", 1)  # an event after this one (maybe one in flight)
        events += await data(ws, 6)
        if spot:
            breaks = [b for a, b in itertools.pairwise(events) if b["U"] != a["u"] + 1]
        else:
            breaks = [b for a, b in itertools.pairwise(events) if b["pu"] != a["u"]]
        assert len(breaks) == 1
        assert counter(sim, "fault_depth_dropped", "BTCUSDT") == 1


async def test_duplicate_reorder_and_malformed_frames():
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        await data(ws, 1)
        sim.faults.duplicate(1)
        raws = [await recv_raw(ws) for _ in range(4)]
        assert any(a == b for a, b in itertools.pairwise(raws))
        sim.faults.reorder(1)
        events = await data(ws, 5)
        assert any(b["u"] < a["u"] for a, b in itertools.pairwise(events))
        sim.faults.malformed_frames(1)
        bad = 0
        for _ in range(5):
            try:
                json.loads(await recv_raw(ws))
            except json.JSONDecodeError:
                bad += 1
        assert bad == 1
        assert counter(sim, "fault_duplicate", "BTCUSDT", "depth") == 1
        assert counter(sim, "fault_reorder", "BTCUSDT", "depth") == 1
        assert counter(sim, "fault_malformed", "BTCUSDT", "depth") == 1


async def test_stall_keeps_the_connection_open_but_silent():
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        await data(ws, 1)
        sim.faults.stall(0.6)
        loop = asyncio.get_running_loop()
        # Whatever was already in flight may still arrive; then silence.
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            while True:
                await asyncio.wait_for(ws.recv(), 0.4)
                t0 = loop.time()
        msg = json.loads(await recv_raw(ws, 3))  # data resumes on the same connection
        assert loop.time() - t0 >= 0.4 and msg["e"] == "depthUpdate"


@pytest.mark.parametrize("abrupt", [False, True])
async def test_close_connections_clean_or_abrupt(abrupt):
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        await data(ws, 1)
        sim.faults.close_connections(abrupt=abrupt)
        expected = ConnectionClosedError if abrupt else ConnectionClosedOK
        with pytest.raises(expected) as exc:
            await data(ws, 100)
        assert (exc.value.rcvd is None) == abrupt
        assert counter(sim, "fault_connections_closed") == 1


async def test_close_connections_by_path():
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as keep,
        websockets.connect(f"{sim.ws_url}/ws/ethusdt@depth@100ms") as gone,
    ):
        sim.faults.close_connections(path_contains="ethusdt")
        with pytest.raises(ConnectionClosedOK):
            await data(gone, 100)
        await data(keep, 3)


async def test_close_after_messages():
    async with (
        SimServer() as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        await data(ws, 1)
        sim.faults.close_after_messages(4)
        got = 0
        with pytest.raises(ConnectionClosed):
            while True:
                await recv_raw(ws)
                got += 1
        assert got == 4


# -- REST faults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry", "code"), [(429, 7, -1003), (418, 120, -1003), (503, None, -1001)]
)
async def test_rest_error_injection(status, retry, code):
    async with SimServer() as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        sim.faults.rest_error(status, count=2, retry_after=retry, path="/depth")
        r = await client.get("/api/v3/ping")
        assert r.status_code == 200  # other paths untouched
        for _ in range(2):
            r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})
            assert r.status_code == status and r.json()["code"] == code
            assert r.headers.get("Retry-After") == (str(retry) if retry else None)
            assert "X-MBX-USED-WEIGHT-1M" in r.headers
        r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})
        assert r.status_code == 200
        assert counter(sim, "fault_rest", "", str(status)) == 2


async def test_rest_timeout_then_recovery():
    async with SimServer() as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        sim.faults.rest_timeout(1.0)
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/api/v3/time", timeout=0.3)
        r = await client.get("/api/v3/time", timeout=3)
        assert r.status_code == 200
        assert counter(sim, "fault_rest", "", "0") == 1


async def test_slow_snapshots_are_stale_on_arrival():
    async with SimServer() as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        sim.faults.slow_snapshots(0.5, count=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"}, timeout=5)
        assert loop.time() - t0 >= 0.45
        assert r.json()["lastUpdateId"] < sim.truth.last_update_id("spot", "BTCUSDT")
        t0 = loop.time()
        await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"}, timeout=5)
        assert loop.time() - t0 < 0.45  # only one was slowed
        assert counter(sim, "fault_slow_snapshots") == 1


async def test_clear_cancels_pending_faults():
    async with SimServer() as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        sim.faults.rest_error(500, count=5)
        sim.faults.clear()
        assert (await client.get("/api/v3/ping")).status_code == 200


# -- per-run plan (the CLI flags) -------------------------------------------------------


async def test_plan_drop_every_nth_aggtrade():
    plan = FaultPlan(drop_aggtrade_every=2)
    async with (
        SimServer(SimConfig(trade_probability=1.0, faults=plan)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@aggTrade") as ws,
    ):
        ids = [m["a"] for m in await data(ws, 6)]
    assert all(b - a == 2 for a, b in itertools.pairwise(ids))


async def test_plan_drop_depth_duplicate_malformed_every():
    plan = FaultPlan(drop_depth_every=3)
    async with SimServer(SimConfig(faults=plan)) as sim:
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            events = await data(ws, 6)
        breaks = sum(1 for a, b in itertools.pairwise(events) if b["U"] != a["u"] + 1)
        assert breaks >= 1
    plan = FaultPlan(duplicate_every=2, malformed_every=3)
    async with SimServer(SimConfig(faults=plan)) as sim:
        async with websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            raws = [await recv_raw(ws) for _ in range(12)]
        assert sum(a == b for a, b in itertools.pairwise(raws)) >= 2
        assert counter(sim, "fault_malformed", "BTCUSDT", "depth") >= 1


async def test_plan_close_every_and_after_messages():
    plan = FaultPlan(close_every_s=0.3, abrupt=True)
    async with (
        SimServer(SimConfig(faults=plan)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        with pytest.raises(ConnectionClosedError):
            await data(ws, 100)
    plan = FaultPlan(close_after_messages=3)
    async with (
        SimServer(SimConfig(faults=plan)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        with pytest.raises(ConnectionClosedOK):
            await data(ws, 4)
        assert counter(sim, "fault_close_after_messages") == 1


async def test_plan_stall_and_shutdown():
    plan = FaultPlan(stall_after_s=0.2, stall_for_s=10)
    async with (
        SimServer(SimConfig(faults=plan)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        with pytest.raises(TimeoutError):
            for _ in range(100):
                await asyncio.wait_for(ws.recv(), 0.5)
        assert counter(sim, "fault_stalls") == 1
    plan = FaultPlan(shutdown_every_s=0.2)
    async with (
        SimServer(SimConfig(faults=plan, shutdown_grace_s=0.05)) as sim,
        websockets.connect(f"{sim.ws_url}/ws/btcusdt@depth") as ws,
    ):
        assert json.loads(await recv_raw(ws))["e"] == "serverShutdown"
        with pytest.raises(ConnectionClosedOK):
            await data(ws, 10)


async def test_plan_rest_429_and_5xx_every():
    plan = FaultPlan(rest_429_every=2, rest_5xx_every=3)
    async with (
        SimServer(SimConfig(faults=plan)) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        codes = [(await client.get("/api/v3/ping")).status_code for _ in range(6)]
    assert codes.count(429) == 3
    assert 503 in codes


async def test_plan_slow_snapshots():
    plan = FaultPlan(slow_snapshot_s=0.3)
    async with (
        SimServer(SimConfig(faults=plan)) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await client.get("/fapi/v1/depth", params={"symbol": "BTCUSDT"})
        assert loop.time() - t0 >= 0.25
