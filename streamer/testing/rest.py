"""REST half of the simulator: ``/api/v3/*`` (spot) and ``/fapi/v1/*`` (USD-M).

:class:`RestApi` turns a request into ``(status, body)``; :class:`RestFront` answers the
HTTP request around it: the weight accounting (``X-MBX-USED-WEIGHT-1M``, 429/418 bans),
the REST faults, and a replay's recorded answers. Answers use Binance's shapes and
error JSON (``{"code":-1121,"msg":"Invalid symbol."}``) with HTTP 400 for bad parameters.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from streamer import Counters

from . import _wire as wire
from .faults import Faults
from .market import INTERVAL_MS, SPOT_INTERVALS, USDM_INTERVALS, SymbolMarket, SymbolSpec
from .simconfig import SimConfig

__all__ = ["ApiError", "RestApi", "RestFront", "request_weight"]

_json = msgspec.json.Encoder()
_SYMBOL_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
_INT_RE = re.compile(r"^-?[0-9]{1,20}$")
_USDM_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)

#: Parameters each endpoint reads; anything else is answered with -1104 like Binance.
_PARAMS: dict[str, set[str]] = {
    "ping": set(),
    "time": set(),
    "exchangeInfo": {"symbol", "symbols", "symbolStatus", "permissions", "showPermissionSets"},
    "depth": {"symbol", "limit", "symbolStatus"},
    "aggTrades": {"symbol", "fromId", "startTime", "endTime", "limit"},
    "klines": {"symbol", "interval", "startTime", "endTime", "limit", "timeZone"},
}


class ApiError(Exception):
    """A Binance error answer: HTTP ``status`` with ``{"code":code,"msg":msg}``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code, self.msg, self.status = code, msg, status

    def body(self) -> bytes:
        """The JSON error body."""
        return _json.encode({"code": self.code, "msg": self.msg})


def _depth_weight(market: str, limit: int) -> int:
    if market == "spot":
        if limit <= 100:
            return 5
        if limit <= 500:
            return 25
        if limit <= 1000:
            return 50
        return 250
    if limit <= 50:
        return 2
    return {100: 5, 500: 10}.get(limit, 20)


def _kline_weight(market: str, limit: int) -> int:
    if market == "spot":
        return 2
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


def request_weight(market: str, endpoint: str, params: dict[str, str]) -> int:
    """Request weight as documented in the protocol reference §5 (bad values use defaults)."""
    raw = params.get("limit", "")
    limit = int(raw) if raw.isdigit() else 0
    if endpoint == "depth":
        return _depth_weight(market, limit or (100 if market == "spot" else 500))
    if endpoint == "klines":
        return _kline_weight(market, limit or 500)
    if endpoint == "aggTrades":
        return 4 if market == "spot" else 20
    if endpoint == "exchangeInfo":
        return 20 if market == "spot" else 1
    return 1


class RestApi:
    """Answers REST requests from the synthetic markets of one simulator."""

    def __init__(
        self,
        markets: dict[tuple[str, str], SymbolMarket],
        specs: dict[tuple[str, str], SymbolSpec],
        weight_limits: dict[str, int],
        clock: Callable[[], int],
    ) -> None:
        self.markets = markets
        self.specs = specs  # every listed symbol, trading or not
        self.weight_limits = weight_limits
        self.clock = clock
        #: Optional ``(market, symbol, limit) -> (lastUpdateId, bids, asks) | None`` for
        #: symbols without a synthetic market (the high-rate source uses it).
        self.snapshot_hook: Callable[[str, str, int], tuple[int, list, list] | None] | None = None

    def handle(
        self, market: str, endpoint: str, query: list[tuple[str, str]], micro: bool = False
    ) -> bytes:
        """The JSON body for ``GET /<prefix>/<endpoint>``; raises :class:`ApiError`.

        ``micro`` (spot ``X-MBX-TIME-UNIT: MICROSECOND``) answers times in µs. Spot time
        parameters may be given in ms or µs either way.
        """
        allowed = _PARAMS.get(endpoint)
        if allowed is None:
            raise ApiError(-1, f"Unknown endpoint {endpoint}.", 404)
        params: dict[str, str] = {}
        for key, value in query:
            if key in params:
                raise ApiError(-1101, "Duplicate values for a parameter detected.")
            params[key] = value
        extra = [k for k in params if k not in allowed]
        if extra:
            raise ApiError(
                -1104,
                f"Not all sent parameters were read; read '{len(params) - len(extra)}' "
                f"parameter(s) but was sent '{len(params)}'.",
            )
        if market == "spot":
            for name in ("startTime", "endTime"):
                value = params.get(name, "")
                if _INT_RE.match(value) and int(value) >= 10**15:  # µs parameter
                    params[name] = str(int(value) // 1000)
        body: Any = getattr(self, f"_{endpoint}")(market, params)
        if micro and market == "spot":
            body = _micro(endpoint, body)
        return _json.encode(body)

    # -- parameter helpers ------------------------------------------------------------------

    def _symbol(self, market: str, params: dict[str, str]) -> SymbolSpec:
        raw = params.get("symbol", "")
        if not raw:
            raise ApiError(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        if not _SYMBOL_RE.match(raw):
            raise ApiError(
                -1100,
                "Illegal characters found in parameter 'symbol'; legal range is "
                "'^[A-Z0-9-_.]{1,20}$'.",
            )
        spec = self.specs.get((market, raw))
        if spec is None:
            raise ApiError(-1121, "Invalid symbol.")
        return spec

    @staticmethod
    def _int(params: dict[str, str], name: str) -> int | None:
        raw = params.get(name)
        if raw is None or raw == "":
            return None
        if not _INT_RE.match(raw):
            raise ApiError(
                -1100,
                f"Illegal characters found in parameter '{name}'; legal range is "
                "'^[0-9]{1,20}$'.",
            )
        return int(raw)

    @staticmethod
    def _bad(name: str) -> ApiError:
        return ApiError(-1130, f"Data sent for parameter '{name}' is not valid.")

    # -- endpoints --------------------------------------------------------------------------

    def _ping(self, market: str, params: dict[str, str]) -> dict:
        return {}

    def _time(self, market: str, params: dict[str, str]) -> dict:
        return {"serverTime": self.clock()}

    def _exchangeInfo(self, market: str, params: dict[str, str]) -> dict:
        specs = [s for (m, _), s in self.specs.items() if m == market]
        if market == "spot":
            if "symbol" in params:
                specs = [self._symbol(market, params)]
            elif "symbols" in params:
                try:
                    names = msgspec.json.decode(params["symbols"], type=list[str])
                except msgspec.DecodeError as exc:
                    raise ApiError(
                        -1100, "Illegal characters found in parameter 'symbols'."
                    ) from exc
                specs = [self._symbol(market, {"symbol": n}) for n in names]
            if "symbolStatus" in params:
                if "symbol" in params or "symbols" in params:
                    raise ApiError(-1128, "Combination of optional parameters invalid.")
                specs = [s for s in specs if s.status == params["symbolStatus"]]
        limits = [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": self.weight_limits[market],
            },
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
        ]
        if market == "spot":
            limits.append(
                {
                    "rateLimitType": "RAW_REQUESTS",
                    "interval": "MINUTE",
                    "intervalNum": 5,
                    "limit": 300000,
                }
            )
        out: dict[str, Any] = {
            "timezone": "UTC",
            "serverTime": self.clock(),
            "rateLimits": limits,
            "exchangeFilters": [],
        }
        if market == "usdm":
            out["futuresType"] = "U_MARGINED"
            out["assets"] = [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "0"}]
        out["symbols"] = [_symbol_info(s) for s in sorted(specs, key=lambda s: s.symbol)]
        return out

    def _depth(self, market: str, params: dict[str, str]) -> dict:
        spec = self._symbol(market, params)
        limit = self._int(params, "limit")
        if market == "spot":
            limit = 100 if limit is None else limit
            if limit < 1:
                raise self._bad("limit")
            limit = min(limit, 5000)
            status = params.get("symbolStatus")
            if status is not None and status != spec.status:
                raise ApiError(
                    -1220, "The symbol's status does not match the requested symbolStatus."
                )
        else:
            limit = 500 if limit is None else limit
            if limit not in _USDM_DEPTH_LIMITS:
                raise self._bad("limit")
        mk = self.markets.get((market, spec.symbol))
        hooked = self.snapshot_hook(market, spec.symbol, limit) if self.snapshot_hook else None
        if hooked is not None:
            last, bids, asks = hooked
        elif mk is None:
            last, bids, asks = 1, [], []
        else:
            last, bids, asks = mk.snapshot(limit)
        if market == "spot":
            return {"lastUpdateId": last, "bids": bids, "asks": asks}
        now = self.clock()
        return {"lastUpdateId": last, "E": now, "T": now, "bids": bids, "asks": asks}

    def _limit(self, params: dict[str, str], default: int, maximum: int) -> int:
        limit = self._int(params, "limit")
        if limit is None:
            return default
        if limit < 1 or limit > maximum:
            raise self._bad("limit")
        return limit

    def _aggTrades(self, market: str, params: dict[str, str]) -> list:
        spec = self._symbol(market, params)
        limit = self._limit(params, 500, 1000)
        from_id = self._int(params, "fromId")
        start = self._int(params, "startTime")
        end = self._int(params, "endTime")
        if market == "usdm":
            if from_id is not None and (start is not None or end is not None):
                raise ApiError(-1128, "Combination of optional parameters invalid.")
            if start is not None and end is not None and end - start >= 3_600_000:
                raise ApiError(-1127, "More than 1 hours between startTime and endTime.")
        mk = self.markets.get((market, spec.symbol))
        trades = mk.trades if mk else []
        if from_id is not None:
            if from_id < 0:
                raise self._bad("fromId")
            first = trades[0].trade_id if trades else 0
            lo = max(0, from_id - first)  # ids are consecutive per symbol
            chosen = [
                t
                for t in trades[lo:]
                if (start is None or t.transact_time >= start)
                and (end is None or t.transact_time <= end)
            ][:limit]
        elif start is not None or end is not None:
            times = mk.trade_times if mk else []
            lo = bisect.bisect_left(times, start) if start is not None else 0
            hi = bisect.bisect_right(times, end) if end is not None else len(times)
            chosen = trades[lo:hi][:limit] if start is not None else trades[lo:hi][-limit:]
        else:
            chosen = trades[-limit:]
        spot = market == "spot"
        out = []
        for t in chosen:
            row = {
                "a": t.trade_id,
                "p": t.price,
                "q": t.quantity,
                "f": t.first_trade_id,
                "l": t.last_trade_id,
                "T": t.transact_time,
                "m": t.is_buyer_maker,
            }
            if spot:
                row["M"] = True
            out.append(row)
        return out

    def _klines(self, market: str, params: dict[str, str]) -> list:
        spec = self._symbol(market, params)
        interval = params.get("interval", "")
        if not interval:
            raise ApiError(
                -1102,
                "Mandatory parameter 'interval' was not sent, was empty/null, or malformed.",
            )
        if interval not in (SPOT_INTERVALS if market == "spot" else USDM_INTERVALS):
            raise ApiError(-1120, "Invalid interval.")
        limit = self._limit(params, 500, 1000 if market == "spot" else 1500)
        start = self._int(params, "startTime")
        end = self._int(params, "endTime")
        mk = self.markets.get((market, spec.symbol))
        if mk is None or mk.last_time is None:
            return []
        span = INTERVAL_MS.get(interval, 31 * 86_400_000) * (limit + 1)
        if start is not None:
            opens = list(mk.bar_opens(interval, start, end if end is not None else mk.last_time))
            opens = [t for t in opens if t >= start][:limit]
        else:
            stop = end if end is not None else mk.last_time
            opens = list(mk.bar_opens(interval, stop - span, stop))[-limit:]
        rows = []
        for t in opens:
            k = mk.bar(interval, t).record(False, 0)
            rows.append(
                [
                    k.open_time,
                    k.open,
                    k.high,
                    k.low,
                    k.close,
                    k.volume,
                    k.close_time,
                    k.quote_volume,
                    k.count,
                    k.taker_buy_volume,
                    k.taker_buy_quote_volume,
                    "0",
                ]
            )
        return rows


def _micro(endpoint: str, body: Any) -> Any:
    """Spot answer with times in µs (``X-MBX-TIME-UNIT: MICROSECOND``)."""
    if isinstance(body, dict) and "serverTime" in body:
        body["serverTime"] *= 1000
    elif endpoint == "aggTrades":
        for row in body:
            row["T"] *= 1000
    elif endpoint == "klines":
        for row in body:
            row[0] *= 1000
            row[6] = row[6] * 1000 + 999
    return body


def _symbol_info(s: SymbolSpec) -> dict:
    tick = s.fmt_price(s.tick)
    step = _fmt_units(s.step, s.qty_decimals)
    filters = [
        {
            "filterType": "PRICE_FILTER",
            "minPrice": tick,
            "maxPrice": s.fmt_price(s.base_price * 100),
            "tickSize": tick,
        },
        {
            "filterType": "LOT_SIZE",
            "minQty": step,
            "maxQty": _fmt_units(s.step * 10**7, s.qty_decimals),
            "stepSize": step,
        },
    ]
    if s.market == "spot":
        return {
            "symbol": s.symbol,
            "status": s.status,
            "baseAsset": s.base_asset,
            "baseAssetPrecision": 8,
            "quoteAsset": s.quote_asset,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "orderTypes": [
                "LIMIT",
                "LIMIT_MAKER",
                "MARKET",
                "STOP_LOSS_LIMIT",
                "TAKE_PROFIT_LIMIT",
            ],
            "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "permissions": [],
            "permissionSets": [["SPOT"]],
            "filters": filters,
        }
    return {
        "symbol": s.symbol,
        "pair": s.symbol,
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000,
        "status": s.status,
        "baseAsset": s.base_asset,
        "quoteAsset": s.quote_asset,
        "marginAsset": s.quote_asset,
        "pricePrecision": s.price_decimals,
        "quantityPrecision": s.qty_decimals,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "filters": filters,
    }


def _fmt_units(value: int, decimals: int) -> str:
    if decimals == 0:
        return str(value)
    scale = 10**decimals
    return f"{value // scale}.{value % scale:0{decimals}d}"


def wall_ms() -> int:
    """Local wall clock in ms."""
    return time.time_ns() // 1_000_000


class RestFront:
    """Answers one simulator's REST requests over HTTP.

    ``recorded(path, query)`` (a replay's recorded answers) is asked first when set.
    """

    def __init__(
        self,
        config: SimConfig,
        counters: Counters,
        faults: Faults,
        api: RestApi,
        now_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.counters = counters
        self.faults = faults
        self.api = api
        self.now_ms = now_ms
        self.recorded: Callable[[str, list[tuple[str, str]]], bytes | None] | None = None
        self._weights: dict[str, list[float]] = {}

    def _weight_state(self, market: str) -> list[float]:
        window = self.config.weight_window_s
        idx = math.floor(time.monotonic() / window)
        state = self._weights.get(market)
        if state is None or state[0] != idx:
            banned = state[3] if state else 0.0
            state = self._weights[market] = [idx, 0, 0, banned]
        return state

    async def answer(self, req: wire.Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one REST request; returns whether to keep the connection open."""
        keep = req.keep_alive
        path = req.path
        self.counters.incr("rest_requests", "", path)
        if path.startswith("/api/v3/"):
            market, endpoint = "spot", path[len("/api/v3/") :]
        elif path.startswith("/fapi/v1/"):
            market, endpoint = "usdm", path[len("/fapi/v1/") :]
        else:
            market, endpoint = "", ""
        if self.recorded is not None:
            found = self.recorded(path, req.query)
            if found is not None:
                writer.write(
                    wire.http_response(200, found, [("X-MBX-USED-WEIGHT-1M", "1")], keep_alive=keep)
                )
                return keep
        if not market:
            self.counters.incr("rest_not_found")
            body = _json.encode({"code": -1, "msg": f"Path {path} not found."})
            writer.write(wire.http_response(404, body, keep_alive=keep))
            return keep
        if req.method != "GET":
            body = _json.encode({"code": -1, "msg": "Method not allowed."})
            writer.write(wire.http_response(405, body, keep_alive=keep))
            return keep
        state = self._weight_state(market)
        fault = self.faults.take_rest_fault(path)
        if fault is not None:
            self.counters.incr("fault_rest", "", str(fault.status))
            if fault.status == 0:
                await asyncio.sleep(fault.delay_s)
                writer.transport.abort()
                return False
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1])))]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            writer.write(
                wire.http_response(
                    fault.status, _fault_body(fault.status), headers, keep_alive=keep
                )
            )
            return keep
        now = time.monotonic()
        limit = self.config.weight_limit_spot if market == "spot" else self.config.weight_limit_usdm
        if state[3] > now:
            self.counters.incr("rest_418", "", market)
            retry = max(1, math.ceil(state[3] - now))
            body = _json.encode(
                {
                    "code": -1003,
                    "msg": f"Way too much request weight used; IP banned until "
                    f"{int(self.now_ms() + retry * 1000)}. Please use WebSocket Streams "
                    "for live updates to avoid bans.",
                }
            )
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1]))), ("Retry-After", str(retry))]
            writer.write(wire.http_response(418, body, headers, keep_alive=keep))
            return keep
        params = dict(req.query)
        weight = request_weight(market, endpoint, params)
        if state[1] + weight > limit:
            state[2] += 1
            window = self.config.weight_window_s
            if state[2] > self.config.ban_after_429s:
                state[3] = now + self.config.ban_s
                self.counters.incr("rest_bans", "", market)
                return await self.answer(req, writer)
            self.counters.incr("rest_429", "", market)
            retry = max(1, math.ceil((state[0] + 1) * window - now))
            body = _json.encode(
                {
                    "code": -1003,
                    "msg": f"Too much request weight used; current limit is {limit} request "
                    "weight per 1 MINUTE. Please use WebSocket Streams for live updates to "
                    "avoid polling the API.",
                }
            )
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1]))), ("Retry-After", str(retry))]
            writer.write(wire.http_response(429, body, headers, keep_alive=keep))
            return keep
        state[1] += weight
        headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1])))]
        try:
            micro = req.headers.get("x-mbx-time-unit", "").upper() == "MICROSECOND"
            body = self.api.handle(market, endpoint, req.query, micro)
            status = 200
        except ApiError as exc:
            self.counters.incr("rest_errors", "", str(exc.code))
            body, status = exc.body(), exc.status
        if status == 200 and endpoint == "depth":
            delay = self.faults.take_snapshot_delay()
            if delay:
                self.counters.incr("fault_slow_snapshots")
                await asyncio.sleep(delay)
        writer.write(wire.http_response(status, body, headers, keep_alive=keep))
        return keep


def _fault_body(status: int) -> bytes:
    if status == 429:
        return _json.encode({"code": -1003, "msg": "Too many requests queued."})
    if status == 418:
        return _json.encode({"code": -1003, "msg": "Way too much request weight used; IP banned."})
    if status == 403:
        return _json.encode({"code": -1, "msg": "WAF limit violated."})
    if status >= 500:
        return _json.encode(
            {
                "code": -1001,
                "msg": "Internal error; unable to process your request. Please try again.",
            }
        )
    return _json.encode({"code": -1, "msg": "Simulated error."})
