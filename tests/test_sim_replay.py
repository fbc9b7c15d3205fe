"""Replay of recorded captures through the simulator; golden counts from the data README."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import websockets

from streamer.testing.captures import read_cryptofeed
from streamer.testing.faults import FaultPlan
from streamer.testing.sim import SimConfig, SimServer

DATA = Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _rebuild(style: str, events: list[dict], snapshot: dict) -> tuple[int, int, int, int]:
    """Apply Binance's book procedure; returns (dropped, applied, gaps, crossed)."""
    last = snapshot["lastUpdateId"]
    bids = {float(p): q for p, q in snapshot["bids"]}
    asks = {float(p): q for p, q in snapshot["asks"]}
    dropped = applied = gaps = crossed = 0
    prev_u = None
    for ev in events:
        U, u = ev["U"], ev["u"]
        if prev_u is None:
            stale = u <= last if style == "spot" else u < last
            if stale:
                dropped += 1
                continue
            ok = U <= last + 1 <= u if style == "spot" else U <= last <= u
        else:
            ok = prev_u + 1 == U if style == "spot" else ev["pu"] == prev_u
        if not ok:
            gaps += 1
        for side, levels in ((bids, ev["b"]), (asks, ev["a"])):
            for p, q in levels:
                if float(q) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = q
        if bids and asks and max(bids) >= min(asks):
            crossed += 1
        prev_u = u
        applied += 1
    return dropped, applied, gaps, crossed


async def _replay_books(
    capture: str, rest_prefix: str, style: str, faults: FaultPlan | None = None
) -> dict[str, tuple]:
    cfg = SimConfig(replay=capture, replay_speed=0, data_dir=str(DATA))
    if faults is not None:
        cfg = SimConfig(replay=capture, replay_speed=0, data_dir=str(DATA), faults=faults)
    async with SimServer(cfg) as sim:
        streams = [s for s in sim.replay.streams() if "@depth" in s]
        expected = sim.replay.count(streams)
        if faults is not None and faults.drop_depth_every:
            expected -= expected // faults.drop_depth_every
        url = f"{sim.ws_url}/stream?streams={'/'.join(streams)}"
        by_symbol: dict[str, list[dict]] = {}
        async with websockets.connect(url, max_size=None) as ws:
            for _ in range(expected):
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                by_symbol.setdefault(msg["data"]["s"], []).append(msg["data"])
        out = {}
        async with httpx.AsyncClient(base_url=sim.rest_url) as client:
            for symbol, events in by_symbol.items():
                r = await client.get(
                    f"{rest_prefix}/depth", params={"symbol": symbol, "limit": 1000}
                )
                assert r.status_code == 200, r.text
                out[symbol] = _rebuild(style, events, r.json())
        return out


async def test_replay_binance_futures_golden_counts():
    books = await _replay_books("BINANCE_FUTURES", "/fapi/v1", "futures")
    assert {s: b[:2] for s, b in books.items()} == {
        "AKROUSDT": (1, 188),
        "CTKUSDT": (5, 180),
        "KEEPUSDT": (3, 132),
        "SUSHIUSDT": (3, 252),
    }
    assert all(b[2:] == (0, 0) for b in books.values())


async def test_replay_binance_spot_golden_counts():
    books = await _replay_books("BINANCE", "/api/v3", "spot")
    assert {s: b[:2] for s, b in books.items()} == {
        "BLZETH": (1, 9),
        "LRCBTC": (2, 13),
        "NKNUSDT": (1, 149),
        "RUNEEUR": (1, 1),
    }
    assert all(b[2:] == (0, 0) for b in books.values())


async def test_replay_binance_us_golden_counts():
    books = await _replay_books("BINANCE_US", "/api/v3", "spot")
    assert books == {
        "COMPUSDT": (1, 106, 0, 0),
        "CRVUSDT": (1, 28, 0, 0),
        "OMGBUSD": (1, 158, 0, 0),
        "ZRXUSDT": (1, 40, 0, 0),
    }


@pytest.mark.parametrize(
    ("capture", "prefix", "style", "golden"),
    [
        ("usdm_btcusdt_20240808.gz", "/fapi/v1", "futures", (4, 6547, 0, 0)),
        ("spot_btcusdt_20240808.gz", "/api/v3", "spot", (2, 3449, 0, 0)),
    ],
)
async def test_replay_hftbacktest_golden_counts(capture, prefix, style, golden):
    books = await _replay_books(capture, prefix, style)
    assert books == {"BTCUSDT": golden}


async def test_replay_serves_recorded_exchange_info():
    cfg = SimConfig(replay="BINANCE_FUTURES", replay_speed=0, data_dir=str(DATA))
    async with SimServer(cfg) as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        info = (await client.get("/fapi/v1/exchangeInfo")).json()
        snap = await client.get("/fapi/v1/depth", params={"symbol": "SUSHIUSDT", "limit": 1000})
    assert info["serverTime"] == 1626858243909  # the recorded answer, not a synthetic one
    assert {"SUSHIUSDT", "AKROUSDT"} <= {s["symbol"] for s in info["symbols"]}
    assert snap.json()["lastUpdateId"] == 600859605926


async def test_replay_raw_stream_gets_recorded_data_bytes():
    prefix = b'{"stream":"sushiusdt@aggTrade","data":'
    recorded = [
        e.payload[len(prefix) : -1]
        for e in read_cryptofeed("BINANCE_FUTURES", DATA)
        if e.payload.startswith(prefix)
    ]
    cfg = SimConfig(replay="BINANCE_FUTURES", replay_speed=0, data_dir=str(DATA))
    async with (
        SimServer(cfg) as sim,
        websockets.connect(f"{sim.ws_url}/ws/sushiusdt@aggTrade") as ws,
    ):
        got = [await asyncio.wait_for(ws.recv(decode=False), 5) for _ in recorded]
    assert [json.loads(m)["a"] for m in got] == list(range(87353230, 87353270))
    assert got == recorded  # byte for byte, envelope removed


async def test_replay_paced_at_recorded_speed():
    cfg = SimConfig(replay="BINANCE_FUTURES", replay_speed=20, data_dir=str(DATA))
    async with SimServer(cfg) as sim:
        frames = [f for f in sim.replay.frames if f.stream == "sushiusdt@depth@100ms"]
        span = (frames[-1].time_ns - frames[0].time_ns) / 1e9 / 20
        loop = asyncio.get_running_loop()
        async with websockets.connect(f"{sim.ws_url}/stream?streams=sushiusdt@depth@100ms") as ws:
            t0 = loop.time()
            for _ in frames:
                await asyncio.wait_for(ws.recv(), 10)
            elapsed = loop.time() - t0
        # Paced, not dumped at once (generous lower bound; the upper bound is the timeout).
        assert elapsed >= span * 0.5


async def test_replay_with_dropped_depth_events_shows_gaps():
    books = await _replay_books(
        "BINANCE_FUTURES", "/fapi/v1", "futures", FaultPlan(drop_depth_every=100)
    )
    gaps = sum(b[2] for b in books.values())
    assert gaps == 7  # 764 recorded diffs, every 100th dropped (7), none of them stale
    assert all(b[3] == 0 for b in books.values())
