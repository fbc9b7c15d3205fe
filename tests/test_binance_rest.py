"""Binance REST: the shared weight budget, 429/418/403/5xx/timeouts, and the adapter's calls."""

from __future__ import annotations

import itertools
import logging
import time

import anyio
import httpx
import msgspec
import pytest

from streamer.core.api import ExchangeContext
from streamer.core.counters import Counters
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.plugins.exchanges.binance.rest import RestClient, RestError, WeightBudget

pytestmark = pytest.mark.anyio

LOG = logging.getLogger("test.binance.rest")


class FakeTime:
    """A wall clock that only moves when someone sleeps on it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def make_client(handler, ft: FakeTime, limit: int = 6000, **kw) -> tuple[RestClient, Counters]:
    counters = Counters()
    budget = WeightBudget(limit, clock=ft.clock, sleep=ft.sleep)
    client = RestClient(
        "https://api.example",
        budget,
        counters=counters,
        logger=LOG,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        **kw,
    )
    return client, counters


async def test_budget_paces_requests_beyond_the_burst():
    ft = FakeTime()
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        return httpx.Response(200, content=b"{}")

    client, counters = make_client(handler, ft, limit=600)  # ceiling 480/min, burst 96
    for _ in range(10):
        await client.get("/api/v3/depth", {"symbol": "BTCUSDT"}, 25)
    assert counters.get("rest_requests") == 10
    # 96 weight of burst covers 3 calls; the other 7 are spread at 8 weight/s.
    assert calls[3] > calls[0]
    assert calls[-1] - calls[0] >= (10 * 25 - 96) / 8 - 0.01
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert max(gaps) < 25 / 8 + 0.01  # evenly paced, never one long stall


async def test_server_reported_weight_stops_calls_until_next_minute():
    ft = FakeTime(1_700_000_010.0)  # 10 s into a minute window
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        # Another process on the same IP has used nearly everything.
        return httpx.Response(200, content=b"{}", headers={"X-MBX-USED-WEIGHT-1M": "5990"})

    client, counters = make_client(handler, ft)
    await client.get("/api/v3/ping", {}, 1)
    await client.get("/api/v3/ping", {}, 1)
    assert counters.get("rest_weight_used") == 5990
    assert int(calls[1] // 60) == int(calls[0] // 60) + 1, "second call waited for the next minute"


@pytest.mark.parametrize("status", [429, 418])
async def test_retry_after_blocks_the_host(status):
    ft = FakeTime()
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        if len(calls) == 1:
            return httpx.Response(status, headers={"Retry-After": "7"}, content=b"{}")
        return httpx.Response(200, content=b"[]")

    client, counters = make_client(handler, ft)
    body = await client.get("/api/v3/aggTrades", {"symbol": "X"}, 4)
    assert body == b"[]"
    assert counters.get(f"rest_{status}") == 1
    assert calls[1] - calls[0] >= 7
    # Every other call to the host waits for the block as well.
    ft2 = FakeTime()
    other_calls: list[float] = []

    def handler2(request):
        other_calls.append(ft2.now)
        if request.url.path.endswith("a") and len(other_calls) == 1:
            return httpx.Response(status, headers={"Retry-After": "30"})
        return httpx.Response(200, content=b"{}")

    client2, _ = make_client(handler2, ft2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client2.get, "/a", {}, 1)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(client2.get, "/b", {}, 1)
    assert len(other_calls) == 3
    assert all(t >= other_calls[0] + 30 for t in other_calls[1:])


async def test_429_without_retry_after_backs_off_exponentially():
    ft = FakeTime()
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        if len(calls) <= 3:
            return httpx.Response(429)
        return httpx.Response(200, content=b"{}")

    client, counters = make_client(handler, ft)
    await client.get("/x", {}, 1)
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert waits[0] >= 2 and waits[1] >= 4 and waits[2] >= 8
    assert counters.get("rest_429") == 3


async def test_5xx_and_timeouts_are_retried_with_backoff():
    ft = FakeTime()
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        if len(calls) == 1:
            return httpx.Response(503)
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        if len(calls) == 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=b"ok")

    client, counters = make_client(handler, ft)
    assert await client.get("/x", {}, 1) == b"ok"
    assert counters.get("rest_5xx") == 1
    assert counters.get("rest_timeouts") == 1
    assert counters.get("rest_transport_errors") == 1
    assert counters.get("rest_retries") == 3
    assert all(b > a for a, b in itertools.pairwise(calls))


async def test_403_backs_off_then_gives_up():
    ft = FakeTime()
    calls: list[float] = []

    def handler(request):
        calls.append(ft.now)
        return httpx.Response(403, content=b"blocked")

    client, counters = make_client(handler, ft, max_attempts=3)
    with pytest.raises(RestError) as info:
        await client.get("/x", {}, 1)
    assert info.value.status == 403
    assert counters.get("rest_403") == 3
    assert calls[1] - calls[0] >= 2.5  # not a tight retry loop


async def test_retries_exhausted_raise():
    ft = FakeTime()
    client, _ = make_client(lambda r: httpx.Response(500), ft, max_attempts=2)
    with pytest.raises(RestError, match="gave up after 2 attempts"):
        await client.get("/x", {}, 1)


async def test_client_error_is_not_retried_and_names_binance_code():
    ft = FakeTime()
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(400, content=b'{"code":-1121,"msg":"Invalid symbol."}')

    client, counters = make_client(handler, ft)
    with pytest.raises(RestError, match="Invalid symbol") as info:
        await client.get("/api/v3/depth", {"symbol": "NOPE"}, 5)
    assert info.value.code == -1121 and len(calls) == 1
    assert counters.get("rest_client_errors") == 1


# --------------------------------------------------------------------------- adapter REST

EXCHANGE_INFO = msgspec.json.encode(
    {
        "rateLimits": [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
             "limit": 1200},
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5,
             "limit": 300000},
        ],
        "symbols": [
            {"symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT"},
            {"symbol": "ETHBTC", "status": "TRADING", "baseAsset": "ETH", "quoteAsset": "BTC"},
            {"symbol": "OLDUSDT", "status": "BREAK", "baseAsset": "OLD", "quoteAsset": "USDT"},
            {"symbol": "HALTUSDT", "status": "CANCEL_ONLY", "baseAsset": "H", "quoteAsset": "USDT"},
        ],
    }
)  # fmt: skip


def make_adapter(handler, **options) -> tuple[BinanceAdapter, Counters, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def recording(request):
        seen.append(request)
        return handler(request)

    counters = Counters()
    ctx = ExchangeContext(
        pipeline="t",
        counters=counters,
        logger=LOG,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(recording)),
    )
    opts = msgspec.convert(options, BinanceOptions)
    return BinanceAdapter(opts, ctx), counters, seen


async def test_list_and_resolve_symbols(caplog):
    adapter, _, seen = make_adapter(lambda r: httpx.Response(200, content=EXCHANGE_INFO))
    infos = await adapter.list_symbols()
    assert seen[0].url.path == "/api/v3/exchangeInfo"
    assert {i.symbol for i in infos} == {"BTCUSDT", "ETHBTC", "OLDUSDT", "HALTUSDT"}
    assert adapter.budget.limit == 1200, "weight limit taken from exchangeInfo"
    with caplog.at_level(logging.WARNING):
        chosen = await adapter.resolve_symbols(["btcusdt", "OLDUSDT", "HALTUSDT"])
    assert chosen == ["BTCUSDT"]
    assert "OLDUSDT" in caplog.text and "BREAK" in caplog.text and "CANCEL_ONLY" in caplog.text
    with pytest.raises(ValueError, match=r"unknown symbol.*NOSUCH"):
        await adapter.resolve_symbols(["BTCUSDT", "NOSUCH"])
    assert await adapter.resolve_symbols(["all"]) == ["BTCUSDT", "ETHBTC"]


async def test_resolve_all_with_quote_filter_and_weight_override():
    adapter, _, _ = make_adapter(
        lambda r: httpx.Response(200, content=EXCHANGE_INFO),
        quote_assets=["usdt"], rest_weight_limit=500,
    )  # fmt: skip
    assert await adapter.resolve_symbols(["all"]) == ["BTCUSDT"]
    assert adapter.budget.limit == 500


async def test_futures_snapshot_limits_and_weights():
    limits = []

    def handler(request):
        limits.append(int(request.url.params["limit"]))
        return httpx.Response(
            200, content=b'{"lastUpdateId":7,"E":1,"T":1,"bids":[["1.0","2"]],"asks":[]}'
        )

    adapter, _counters, seen = make_adapter(handler, market="usdm")
    assert adapter.sequence_rule.style == "futures"
    assert adapter.sequence_rule.max_snapshot_limit == 1000
    for asked in (5000, 1000, 30, 5, 501):
        snap = await adapter.fetch_book_snapshot("BTCUSDT", asked)
        assert snap.last_update_id == 7 and snap.bids == [("1.0", "2")]
    assert limits == [1000, 1000, 50, 5, 1000]
    assert all(r.url.path == "/fapi/v1/depth" for r in seen)
    assert set(limits) <= {5, 10, 20, 50, 100, 500, 1000}
    assert adapter.snapshot_weight(1000) == 20 and adapter.snapshot_weight(50) == 2
    spot, _, _ = make_adapter(handler)
    assert spot.snapshot_limit(9000) == 5000 and spot.snapshot_weight(5000) == 250
    assert spot.sequence_rule.style == "spot" and spot.sequence_rule.max_snapshot_limit == 5000


def agg_server(first_id: int, last_id: int, *, now_ms: int | None = None, spacing_ms: int = 1):
    """aggTrades served from ids first..last, the newest at ``now_ms``."""
    now_ms = now_ms or time.time_ns() // 1_000_000

    def t_of(i: int) -> int:
        return now_ms - (last_id - i) * spacing_ms

    def handler(request):
        params = request.url.params
        limit = int(params["limit"])
        assert limit <= 1000
        if "fromId" in params:
            assert "startTime" not in params and "endTime" not in params
            start = max(int(params["fromId"]), first_id)
        else:
            start_time = int(params["startTime"])
            start = next(i for i in range(first_id, last_id + 1) if t_of(i) >= start_time)
        rows = [
            {"a": i, "p": "1.5", "q": "2", "f": i, "l": i, "T": t_of(i), "m": False}
            for i in range(start, min(last_id, start + limit - 1) + 1)
        ]
        return httpx.Response(200, content=msgspec.json.encode(rows))

    return handler


async def test_backfill_trades_paginates_by_id():
    adapter, counters, seen = make_adapter(agg_server(1, 2500), market="usdm")
    pages = [p async for p in adapter.backfill_trades("BTCUSDT", 10)]
    ids = [t.trade_id for p in pages for t in p]
    assert ids == list(range(10, 2501))
    assert [r.url.params["fromId"] for r in seen] == ["10", "1010", "2010"]
    assert all(r.url.path == "/fapi/v1/aggTrades" for r in seen)
    assert counters.get("backfilled_trades", "BTCUSDT") == 2491
    bounded = [p async for p in adapter.backfill_trades("BTCUSDT", 100, 120)]
    assert [t.trade_id for p in bounded for t in p] == list(range(100, 121))


async def test_backfill_trades_skips_what_is_older_than_max_age():
    # Trades 1..100, one per minute: with a 30 min max age only the newest 31 come back.
    adapter, _, seen = make_adapter(agg_server(1, 100, spacing_ms=60_000), backfill_max_age="30m")
    ids = [t.trade_id for p in [p async for p in adapter.backfill_trades("X", 1)] for t in p]
    assert ids[0] >= 70 and ids[-1] == 100 and ids == list(range(ids[0], 101))
    assert any("startTime" in r.url.params and "fromId" not in r.url.params for r in seen)


async def test_backfill_klines_pages_and_drops_the_open_bar():
    now = time.time_ns() // 1_000_000
    minute = 60_000
    newest_open = now - now % minute  # still open

    def handler(request):
        params = request.url.params
        limit = int(params["limit"])
        start, end = int(params["startTime"]), int(params["endTime"])
        first = start + (-start) % minute
        rows = []
        t = first
        while t <= min(end, newest_open) and len(rows) < limit:
            rows.append([t, "1", "2", "0.5", "1.5", "10", t + minute - 1, "15", 3, "5", "7", "0"])
            t += minute
        return httpx.Response(200, content=msgspec.json.encode(rows))

    for market, cap in (("spot", 1000), ("usdm", 1500)):
        adapter, _counters, seen = make_adapter(handler, market=market, backfill_max_age="2d")
        start = newest_open - 2500 * minute
        pages = [p async for p in adapter.backfill_klines("BTCUSDT", "1m", start, now)]
        opens = [k.open_time for p in pages for k in p]
        assert opens == list(range(start, newest_open, minute))  # the open bar is left out
        assert all(int(r.url.params["limit"]) == cap for r in seen)
        assert all(k.closed for p in pages for k in p)
    with pytest.raises(ValueError, match="not served"):
        [p async for p in adapter.backfill_klines("BTCUSDT", "1s", 0, 1)]


async def test_backfill_klines_leaves_out_a_bar_that_closed_while_the_request_travelled(
    monkeypatch,
):
    """A bar closing between sending the request and reading the answer may still take
    trades on the server, so it is not complete: the stream's final update must win."""
    import streamer.plugins.exchanges.binance.adapter as adapter_module

    second = 1000
    sent_at = 1_795_000_000_000  # the clock when the request leaves
    clock = {"now": sent_at}
    monkeypatch.setattr(adapter_module, "_now_ms", lambda: clock["now"])

    def handler(request):
        clock["now"] = sent_at + 50  # the answer arrives 50 ms later
        opens = [sent_at - 2 * second, sent_at - second + 20]  # the second closes at +19 ms
        rows = [[t, "1", "2", "0.5", "1.5", "10", t + second - 1, "15", 3, "5", "7", "0"]
                for t in opens]  # fmt: skip
        return httpx.Response(200, content=msgspec.json.encode(rows))

    adapter, _counters, _seen = make_adapter(handler, market="spot")
    pages = [p async for p in adapter.backfill_klines("BTCUSDT", "1s", 0, sent_at)]
    assert [k.open_time for p in pages for k in p] == [sent_at - 2 * second]


@pytest.fixture
def anyio_backend():
    return "asyncio"
