"""Simulator lifecycle: clients coming and going in high-rate mode, and clean shutdown."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
import websockets

from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _receive(ws, count: int, timeout: float = 5.0) -> list[dict]:
    """``count`` data messages from ``ws`` (each must arrive within ``timeout``)."""
    return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(count)]


def _url(sim: SimServer, streams: list[str]) -> str:
    return f"{sim.ws_url}/stream?streams=" + "/".join(streams)


async def test_high_rate_serves_every_new_client_after_earlier_ones_left():
    # Regression: the generator kept its round-robin position when the subscribed set
    # shrank; a client with fewer streams than the one before it ended the generator
    # (IndexError) and that client and every later one received nothing.
    async with SimServer(SimConfig(high_rate=5_000, high_rate_symbols=8)) as sim:
        every = sim.high_rate.streams()
        sizes = [8, 1, 8, 3, 2, 8, 1]
        for cycle, symbols in enumerate(sizes):
            streams = sim.high_rate.streams(symbols)
            async with websockets.connect(_url(sim, streams), max_queue=None) as ws:
                msgs = await _receive(ws, 300)
            assert {m["stream"] for m in msgs} <= set(streams), f"cycle {cycle}"
            assert len({m["stream"] for m in msgs}) == len(streams), f"cycle {cycle}"
        # Two overlapping clients: the one with more streams leaves first, then a third
        # joins while the second is still there.
        big = await websockets.connect(_url(sim, every), max_queue=None)
        small = await websockets.connect(_url(sim, every[:3]), max_queue=None)
        try:
            await _receive(big, 300)
            await _receive(small, 100)
            await big.close()
            await _receive(small, 100)
            third = await websockets.connect(_url(sim, every[3:9]), max_queue=None)
            try:
                got = await _receive(third, 200)
                assert {m["stream"] for m in got} == set(every[3:9])
                await _receive(small, 100)
            finally:
                await third.close()
            await _receive(small, 100)
        finally:
            await small.close()
        assert sim.counters.get("sim_internal_errors") == 0
        generator = [t for t in sim._tasks if "HighRateSource.run" in repr(t.get_coro())]
        assert generator and not generator[0].done()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def root_log():
    """Every log record of the test at any level, from any logger (asyncio included)."""
    handler = _Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _problems(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING
        or "CancelledError" in r.getMessage()
        or (r.exc_info is not None and r.exc_info[0] is asyncio.CancelledError)
    ]


async def _clients(sim: SimServer) -> tuple[list, httpx.AsyncClient]:
    """Open WebSocket clients (raw, combined, USD-M) that received data, plus a REST client
    holding a keep-alive connection."""
    urls = [
        f"{sim.ws_url}/ws/btcusdt@depth@100ms/btcusdt@aggTrade",
        f"{sim.ws_url}/stream?streams=ethusdt@depth@100ms",
        f"{sim.usdm_ws_url}/market/ws/btcusdt@aggTrade",
        f"{sim.ws_url}/ws",  # subscribed to nothing: idle in its read loop
    ]
    sockets = [await websockets.connect(u) for u in urls]
    for ws in sockets[:3]:
        await asyncio.wait_for(ws.recv(), 5)
    rest = httpx.AsyncClient(base_url=sim.rest_url)
    assert (await rest.get("/api/v3/ping")).status_code == 200
    return sockets, rest


async def test_aclose_with_clients_connected_logs_nothing(root_log):
    for cfg in (SimConfig(seed=2, tick_ms=20), SimConfig(high_rate=2_000, high_rate_symbols=2)):
        sim = SimServer(cfg)
        await sim.start()
        if cfg.high_rate:
            sockets = [await websockets.connect(_url(sim, sim.high_rate.streams()), max_queue=None)]
            await _receive(sockets[0], 50)
            rest = httpx.AsyncClient(base_url=sim.rest_url)
            assert (await rest.get("/api/v3/ping")).status_code == 200
        else:
            sockets, rest = await _clients(sim)
        await sim.aclose()
        # Every handler ended and nothing is left to log once the loop runs on.
        assert not sim._handlers and not sim._conns
        await asyncio.sleep(0.1)
        for ws in sockets:
            await ws.close()
        await rest.aclose()
    assert _problems(root_log) == []


def test_stop_of_thread_server_with_clients_connected_logs_nothing(root_log):
    sim = SimServer(SimConfig(seed=3, tick_ms=20)).start_in_thread()
    held: list = []

    async def connect() -> None:
        held.extend(await _clients(sim))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(connect())
        sim.stop()
        assert sim._thread is None and not sim._handlers
        sockets, rest = held

        async def close() -> None:
            for ws in sockets:
                await ws.close()
            await rest.aclose()

        loop.run_until_complete(close())
    finally:
        loop.close()
    assert _problems(root_log) == []
