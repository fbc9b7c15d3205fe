"""What the simulator streams, what REST serves and what truth reports agree exactly."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio
T0 = 1_764_000_000_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _data(ws, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        out.append(msg.get("data", msg))
    return out


@pytest.mark.parametrize(("market", "path"), [("spot", "/ws"), ("usdm", "/market/ws")])
async def test_streamed_aggtrades_equal_truth(market, path):
    async with (
        SimServer(SimConfig(trade_probability=1.0)) as sim,
        websockets.connect(f"{sim.ws_url}{path}/ethusdt@aggTrade") as ws,
    ):
        got = await _data(ws, 30)
        truth = {t.trade_id: t for t in sim.truth.trades(market, "ETHUSDT")}
    ids = [g["a"] for g in got]
    assert ids == list(range(ids[0], ids[0] + 30))
    for g in got:
        t = truth[g["a"]]
        assert (g["p"], g["q"], g["f"], g["l"], g["T"], g["m"]) == (
            t.price, t.quantity, t.first_trade_id, t.last_trade_id, t.transact_time,
            t.is_buyer_maker,
        )  # fmt: skip


def _apply(book: dict[str, dict[float, tuple[str, str]]], ev: dict) -> None:
    for key, levels in (("bids", ev["b"]), ("asks", ev["a"])):
        side = book[key]
        for p, q in levels:
            if float(q) == 0:
                side.pop(float(p), None)
            else:
                side[float(p)] = (p, q)


def _sorted(book) -> tuple[list, list]:
    bids = [book["bids"][k] for k in sorted(book["bids"], reverse=True)]
    asks = [book["asks"][k] for k in sorted(book["asks"])]
    return bids, asks


@pytest.mark.parametrize(
    ("market", "url", "rest"),
    [
        ("spot", "/ws/btcusdt@depth@100ms", "/api/v3/depth"),
        ("spot", "/ws/btcusdt@depth", "/api/v3/depth"),
        ("usdm", "/public/ws/btcusdt@depth@0ms", "/fapi/v1/depth"),
        ("usdm", "/public/ws/btcusdt@depth@250ms", "/fapi/v1/depth"),
    ],
)
async def test_book_rebuilt_from_stream_and_snapshot_equals_truth(market, url, rest):
    cfg = SimConfig(book_levels=100, tick_ms=50)
    async with (
        SimServer(cfg) as sim,
        websockets.connect(sim.ws_url + url) as ws,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        buffered = await _data(ws, 2)  # buffer before the snapshot, as Binance says
        snap = (await client.get(rest, params={"symbol": "BTCUSDT", "limit": 1000})).json()
        last = snap["lastUpdateId"]
        book = {
            "bids": {float(p): (p, q) for p, q in snap["bids"]},
            "asks": {float(p): (p, q) for p, q in snap["asks"]},
        }
        applied = 0
        prev_u = None
        events = buffered + await _data(ws, 3 if url.endswith("@depth") else 8)  # 1 s each
        for ev in events:
            if prev_u is None:
                if (ev["u"] <= last) if market == "spot" else (ev["u"] < last):
                    continue
                if market == "spot":
                    assert ev["U"] <= last + 1 <= ev["u"]
                else:
                    assert ev["U"] <= last <= ev["u"]
            elif market == "spot":
                assert ev["U"] == prev_u + 1
            else:
                assert ev["pu"] == prev_u
            _apply(book, ev)
            prev_u = ev["u"]
            applied += 1
            bids, asks = sim.truth.book_at(market, "BTCUSDT", prev_u)
            assert _sorted(book) == (bids, asks)
        assert applied >= 3


async def test_streamed_closed_klines_equal_rest_and_truth():
    cfg = SimConfig(trade_probability=1.0, tick_ms=50)
    async with (
        SimServer(cfg) as sim,
        websockets.connect(f"{sim.ws_url}/market/ws/btcusdt@kline_1m") as ws1,
        websockets.connect(f"{sim.ws_url}/ws/ethusdt@kline_1s") as ws2,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        finals = []
        while len(finals) < 2:
            msg = json.loads(await asyncio.wait_for(ws2.recv(), 5))
            if msg["k"]["x"]:
                finals.append(msg["k"])
        rows = (
            await client.get(
                "/api/v3/klines",
                params={
                    "symbol": "ETHUSDT",
                    "interval": "1s",
                    "startTime": finals[0]["t"],
                    "limit": 2,
                },
            )
        ).json()
        truth = sim.truth.closed_klines("spot", "ETHUSDT", "1s")
        live = json.loads(await asyncio.wait_for(ws1.recv(), 5))["k"]
    for k, row in zip(finals, rows, strict=True):
        assert row == [
            k["t"], k["o"], k["h"], k["l"], k["c"], k["v"], k["T"], k["q"], k["n"], k["V"],
            k["Q"], "0",
        ]  # fmt: skip
        assert any(t.open_time == k["t"] and t.close == k["c"] and t.count == k["n"] for t in truth)
    assert live["x"] is False and live["i"] == "1m"


async def _history(seed: int) -> tuple[list, list]:
    cfg = SimConfig(seed=seed, start_time_ms=T0, history_s=30)
    async with SimServer(cfg) as sim:
        trades = [t for t in sim.truth.trades("spot", "BTCUSDT") if t.transact_time < T0 + 30_000]
        klines = sim.truth.closed_klines("usdm", "ETHUSDT", "1s")[:25]
        return trades, klines


async def test_same_seed_same_market_other_seed_differs():
    a, b, c = await _history(7), await _history(7), await _history(8)
    assert a == b
    assert a[0] and a[1]
    assert a[0] != c[0]
