"""REST side of the simulator: shapes, parameters, errors, weights and rate limits."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest

from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio
T0 = 1_764_000_000_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def sim():
    cfg = SimConfig(start_time_ms=T0, history_s=120, trade_probability=0.8)
    async with SimServer(cfg) as server:
        yield server


@pytest.fixture
async def client(sim):
    async with httpx.AsyncClient(base_url=sim.rest_url) as c:
        yield c


async def test_ping_time_and_weight_header(client, sim):
    r = await client.get("/api/v3/ping")
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["X-MBX-USED-WEIGHT-1M"] == "1"
    r = await client.get("/api/v3/time")
    assert T0 + 120_000 <= r.json()["serverTime"] <= sim.now_ms()  # the virtual clock
    assert r.headers["X-MBX-USED-WEIGHT-1M"] == "2"
    r = await client.get("/fapi/v1/ping")
    assert r.headers["X-MBX-USED-WEIGHT-1M"] == "1"  # separate budget per market


async def test_exchange_info_lists_non_trading_symbols(client):
    spot = (await client.get("/api/v3/exchangeInfo")).json()
    assert {s["symbol"]: s["status"] for s in spot["symbols"]} == {
        "BTCUSDT": "TRADING",
        "ETHUSDT": "TRADING",
        "LUNAUSDT": "BREAK",
    }
    assert spot["rateLimits"][0] == {
        "rateLimitType": "REQUEST_WEIGHT",
        "interval": "MINUTE",
        "intervalNum": 1,
        "limit": 6000,
    }
    btc = next(s for s in spot["symbols"] if s["symbol"] == "BTCUSDT")
    assert (btc["baseAsset"], btc["quoteAsset"]) == ("BTC", "USDT")
    assert {f["filterType"] for f in btc["filters"]} == {"PRICE_FILTER", "LOT_SIZE"}
    fut = (await client.get("/fapi/v1/exchangeInfo")).json()
    assert fut["futuresType"] == "U_MARGINED"
    assert fut["rateLimits"][0]["limit"] == 2400
    assert {s["symbol"]: s["status"] for s in fut["symbols"]}["DEADUSDT"] == "SETTLING"
    one = (await client.get("/api/v3/exchangeInfo", params={"symbol": "ETHUSDT"})).json()
    assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
    some = await client.get("/api/v3/exchangeInfo", params={"symbols": '["BTCUSDT","LUNAUSDT"]'})
    assert [s["symbol"] for s in some.json()["symbols"]] == ["BTCUSDT", "LUNAUSDT"]
    brk = await client.get("/api/v3/exchangeInfo", params={"symbolStatus": "BREAK"})
    assert [s["symbol"] for s in brk.json()["symbols"]] == ["LUNAUSDT"]


@pytest.mark.parametrize(
    ("limit", "weight", "levels"),
    [
        (None, 5, 100),
        (5, 5, 5),
        (101, 25, 101),
        (1000, 50, 1000),
        (5000, 250, 5000),
        (9000, 250, 5000),
    ],
)
async def test_spot_depth_limits_and_weights(limit, weight, levels):
    cfg = SimConfig(book_levels=6000, spot_symbols=["BTCUSDT"], usdm_symbols=[])
    async with SimServer(cfg) as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        params = {"symbol": "BTCUSDT"} | ({"limit": limit} if limit else {})
        r = await client.get("/api/v3/depth", params=params)
    body = r.json()
    assert list(body) == ["lastUpdateId", "bids", "asks"]
    assert r.headers["X-MBX-USED-WEIGHT-1M"] == str(weight)
    assert len(body["bids"]) == levels and len(body["asks"]) == levels


@pytest.mark.parametrize(
    ("limit", "weight"), [(5, 2), (10, 2), (20, 2), (50, 2), (100, 5), (500, 10), (1000, 20)]
)
async def test_usdm_depth_limits_and_weights(client, limit, weight):
    r = await client.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": limit})
    body = r.json()
    assert list(body) == ["lastUpdateId", "E", "T", "bids", "asks"]
    assert r.headers["X-MBX-USED-WEIGHT-1M"] == str(weight)
    assert 0 < len(body["bids"]) <= limit


async def test_depth_snapshot_is_the_true_book(client, sim):
    r = await client.get("/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": 1000})
    body = r.json()
    bids, asks = sim.truth.book_at("usdm", "ETHUSDT", body["lastUpdateId"])
    assert body["bids"] == [list(level) for level in bids[:1000]]
    assert body["asks"] == [list(level) for level in asks[:1000]]
    best_bid, best_ask = float(body["bids"][0][0]), float(body["asks"][0][0])
    assert best_bid < best_ask


async def test_agg_trades_paging_and_windows(client, sim):
    truth = sim.truth.trades("spot", "BTCUSDT")
    assert len(truth) > 1500
    first = truth[0].trade_id
    assert [t.trade_id for t in truth] == list(range(first, first + len(truth)))
    got = []
    from_id = first
    while from_id <= truth[-1].trade_id:
        r = await client.get(
            "/api/v3/aggTrades", params={"symbol": "BTCUSDT", "fromId": from_id, "limit": 1000}
        )
        page = r.json()
        assert r.headers["X-MBX-USED-WEIGHT-1M"]
        got.extend(page)
        from_id = page[-1]["a"] + 1
    assert [(g["a"], g["p"], g["q"], g["f"], g["l"], g["T"], g["m"]) for g in got] == [
        (t.trade_id, t.price, t.quantity, t.first_trade_id, t.last_trade_id, t.transact_time,
         t.is_buyer_maker)
        for t in truth
    ]  # fmt: skip
    assert list(got[0]) == ["a", "p", "q", "f", "l", "T", "m", "M"]
    recent = [
        r["a"] for r in (await client.get("/api/v3/aggTrades", params={"symbol": "BTCUSDT"})).json()
    ]
    newest = sim.truth.trades("spot", "BTCUSDT")[-1].trade_id  # the market keeps trading
    assert recent == list(range(recent[0], recent[0] + 500))
    assert truth[-1].trade_id <= recent[-1] <= newest
    start, end = truth[100].transact_time, truth[300].transact_time
    win = (
        await client.get(
            "/api/v3/aggTrades", params={"symbol": "BTCUSDT", "startTime": start, "endTime": end}
        )
    ).json()
    assert [w["a"] for w in win] == [t.trade_id for t in truth if start <= t.transact_time <= end]
    tail = (
        await client.get(
            "/api/v3/aggTrades", params={"symbol": "BTCUSDT", "endTime": end, "limit": 5}
        )
    ).json()
    assert [w["a"] for w in tail] == [t.trade_id for t in truth if t.transact_time <= end][-5:]
    fut = (await client.get("/fapi/v1/aggTrades", params={"symbol": "BTCUSDT", "limit": 3})).json()
    assert list(fut[0]) == ["a", "p", "q", "f", "l", "T", "m"]


async def test_klines_match_truth_and_limits(client, sim):
    closed = sim.truth.closed_klines("spot", "BTCUSDT", "1m")
    assert len(closed) >= 1
    rows = (
        await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSDT", "interval": "1m", "startTime": closed[0].open_time},
        )
    ).json()
    assert len(rows[0]) == 12 and rows[0][11] == "0"
    for row, k in zip(rows, closed, strict=False):
        assert row == [
            k.open_time, k.open, k.high, k.low, k.close, k.volume, k.close_time,
            k.quote_volume, k.count, k.taker_buy_volume, k.taker_buy_quote_volume, "0",
        ]  # fmt: skip
    assert len(rows) == len(closed) + 1  # plus the bar still open
    params = {"symbol": "BTCUSDT", "interval": "1s", "limit": 100}
    secs = (await client.get("/api/v3/klines", params=params)).json()
    assert len(secs) == 100  # the newest 100 of the 120 one-second bars
    assert secs[-1][0] >= T0 + 119_000  # ends at the newest bar
    assert all(b[0] == a[6] + 1 for a, b in itertools.pairwise(secs))
    r = await client.get(
        "/fapi/v1/klines", params={"symbol": "BTCUSDT", "interval": "1m", "limit": 1500}
    )
    assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "10"


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/api/v3/depth", {"symbol": "NOPEUSDT"}, -1121),
        ("/api/v3/depth", {"symbol": "btcusdt"}, -1100),
        ("/api/v3/depth", {}, -1102),
        ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": "abc"}, -1100),
        ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 0}, -1130),
        ("/api/v3/depth", {"symbol": "BTCUSDT", "symbolStatus": "BREAK"}, -1220),
        ("/fapi/v1/depth", {"symbol": "BTCUSDT", "limit": 7}, -1130),
        ("/fapi/v1/depth", {"symbol": "BTCUSDT", "limit": 5000}, -1130),
        ("/api/v3/depth", {"symbol": "BTCUSDT", "foo": 1}, -1104),
        ("/api/v3/aggTrades", {"symbol": "BTCUSDT", "limit": 1001}, -1130),
        ("/api/v3/aggTrades", {"symbol": "BTCUSDT", "fromId": -1}, -1130),
        ("/fapi/v1/aggTrades", {"symbol": "BTCUSDT", "fromId": 1, "startTime": T0}, -1128),
        (
            "/fapi/v1/aggTrades",
            {"symbol": "BTCUSDT", "startTime": T0, "endTime": T0 + 3_600_000},
            -1127,
        ),
        ("/api/v3/klines", {"symbol": "BTCUSDT"}, -1102),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "2m"}, -1120),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1M", "limit": 1001}, -1130),
        ("/fapi/v1/klines", {"symbol": "BTCUSDT", "interval": "1s"}, -1120),
        ("/fapi/v1/klines", {"symbol": "BTCUSDT", "interval": "1m", "limit": 1501}, -1130),
        ("/api/v3/exchangeInfo", {"symbol": "NOPE"}, -1121),
        ("/api/v3/exchangeInfo", {"symbols": "[BTC"}, -1100),
    ],
)
async def test_bad_parameters_get_binance_errors(client, sim, path, params, code):
    r = await client.get(path, params=params)
    assert r.status_code == 400
    body = r.json()
    assert list(body) == ["code", "msg"] and body["code"] == code
    assert "X-MBX-USED-WEIGHT-1M" in r.headers
    assert sim.truth.counters()[("rest_errors", "", str(code))] == 1


async def test_duplicate_parameter_and_unknown_path(client):
    r = await client.get("/api/v3/depth?symbol=BTCUSDT&symbol=ETHUSDT")
    assert r.json()["code"] == -1101
    r = await client.get("/api/v1/depth?symbol=BTCUSDT")
    assert r.status_code == 404
    r = await client.post("/api/v3/ping")
    assert r.status_code == 405
    r = await client.get("/api/v3/nothing")
    assert r.status_code == 404


async def test_weight_budget_429_then_418_ban():
    cfg = SimConfig(weight_limit_spot=30, ban_after_429s=2, ban_s=30, weight_window_s=60)
    async with SimServer(cfg) as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        statuses = []
        for _ in range(6):
            r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})  # weight 5
            statuses.append(r.status_code)
        assert statuses == [200] * 6
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "30"
        r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})
        assert r.status_code == 429 and r.json()["code"] == -1003
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "30"
        r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})
        assert r.status_code == 429
        r = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT"})
        assert r.status_code == 418 and "banned" in r.json()["msg"]
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        r = await client.get("/api/v3/ping")
        assert r.status_code == 418  # banned means everything
        r = await client.get("/fapi/v1/ping")
        assert r.status_code == 200  # the other market has its own budget
        counters = sim.truth.counters()
    assert counters[("rest_429", "", "spot")] == 2
    assert counters[("rest_bans", "", "spot")] == 1
    assert counters[("rest_418", "", "spot")] == 2


async def test_weight_window_resets():
    cfg = SimConfig(weight_limit_usdm=4, weight_window_s=0.3, ban_after_429s=1000)
    async with SimServer(cfg) as sim, httpx.AsyncClient(base_url=sim.rest_url) as client:
        for _ in range(50):
            r = await client.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 5})
            if r.status_code == 429:
                break
        assert r.status_code == 429
        retry = int(r.headers["Retry-After"])
        assert retry == 1
        for _ in range(100):
            r = await client.get("/fapi/v1/ping")
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200
        assert sim.truth.counters()[("rest_429", "", "usdm")] >= 1


async def test_spot_rest_time_unit_microsecond(client, sim):
    micro = {"X-MBX-TIME-UNIT": "MICROSECOND"}
    trades = sim.truth.trades("spot", "BTCUSDT")
    start_us = trades[10].transact_time * 1000  # µs parameters are accepted too
    r = await client.get(
        "/api/v3/aggTrades",
        params={"symbol": "BTCUSDT", "startTime": start_us, "limit": 2},
        headers=micro,
    )
    expected = [t for t in trades if t.transact_time * 1000 >= start_us][:2]
    assert [(t["a"], t["T"]) for t in r.json()] == [
        (t.trade_id, t.transact_time * 1000) for t in expected
    ]
    rows = (
        await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSDT", "interval": "1m", "limit": 1},
            headers=micro,
        )
    ).json()
    assert rows[0][0] % 60_000_000 == 0 and rows[0][6] == rows[0][0] + 59_999_999
    assert (await client.get("/api/v3/time", headers=micro)).json()["serverTime"] >= 10**15
    assert (await client.get("/fapi/v1/time", headers=micro)).json()["serverTime"] < 10**15
