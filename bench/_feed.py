"""A high-rate, Binance-shaped spot feed for benchmarks (run in its own process).

Why not just the package's simulator: a benchmark feed must push well over 100k msg/s on
loopback while taking as little CPU as possible from the subject, and the harness must be
able to change the rate live and read how far the feed fell behind. So this server:

* writes pre-built WebSocket frames straight to the transport, many per ``write`` call
  (one ``send`` per message through ``websockets`` tops out near 60k msg/s);
* builds each event from byte templates with fixed-width ids and times, so only a few
  integers are formatted per message and ``E`` is the time the event was generated;
* generates one global event stream at ``rate`` events/s over ``symbols`` with the mix of
  the issue (50% depth with 20+20 levels, 45% aggTrade, 5% kline_1m) and sends each event
  to every connection subscribed to its stream, like the exchange;
* never drops: when a client's socket buffer is over ``--high-water`` bytes, generation
  pauses and the *backlog* (events due but not yet generated) grows. That, and ``E`` lag
  at the client, is how "falling behind" is seen.

It also serves the REST endpoints a collector needs to start and keep books in sync
(``exchangeInfo``, ``depth`` consistent with the streamed update ids, ``ping``, ``time``;
``aggTrades``/``klines`` answer ``[]``: the feed never skips an id, so no backfill is due),
and two control endpoints: ``/_bench/rate?value=N`` and ``/_bench/stats``.

Usage: ``python bench/_feed.py --symbols 100 --rate 20000`` prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

#: Ids start here so they keep 13 digits (fixed-width frames) for any benchmark length.
ID_BASE = 1_000_000_000_000
LEVELS = 20
#: Share of each event kind (depth, aggTrade, kline), in 1/200ths.
MIX = {"depth": 100, "agg": 90, "kline": 10}
TICK = 0.002


def symbol_names(n: int) -> list[str]:
    """``n`` fixed-width symbol names (``S0000USDT``...), the same in every process."""
    return [f"S{i:04d}USDT" for i in range(n)]


def _ws_header(length: int) -> bytes:
    """Header of an unmasked final text frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return bytes((0x81, 126)) + length.to_bytes(2, "big")
    return bytes((0x81, 127)) + length.to_bytes(8, "big")


def _level_pool(rng: random.Random, variants: int) -> tuple[list[bytes], list[list[str]]]:
    """Depth bodies ``"b":[...],"a":[...]`` over one fixed ladder of prices.

    Every variant touches the same 20 bid and 20 ask prices (bids below 100, asks above),
    so a book built from them is never crossed; about one level in ten is a deletion.
    """
    bid_prices = [f"{99.99 - 0.01 * i:.8f}" for i in range(LEVELS)]
    ask_prices = [f"{100.00 + 0.01 * i:.8f}" for i in range(LEVELS)]
    bodies = []
    for _ in range(variants):

        def side(prices: list[str]) -> str:
            cells = []
            for p in prices:
                q = "0.00000000" if rng.random() < 0.1 else f"{rng.uniform(0.001, 50):.8f}"
                cells.append(f'["{p}","{q}"]')
            return ",".join(cells)

        bodies.append(f'"b":[{side(bid_prices)}],"a":[{side(ask_prices)}]'.encode())
    return bodies, [bid_prices, ask_prices]


class _Symbol:
    __slots__ = ("agg", "kline_open", "kline_trade0", "name", "tid", "upd")

    def __init__(self, name: str) -> None:
        self.name = name
        self.agg = ID_BASE
        self.tid = ID_BASE
        self.upd = ID_BASE
        self.kline_open = 0
        self.kline_trade0 = ID_BASE


class _Conn:
    """A subscribed client: per (symbol index, kind) the wrapper prefix of its frames."""

    __slots__ = ("prefix", "suffix", "ws")

    def __init__(self, ws: ServerConnection, prefix: dict[tuple[int, str], bytes], wrap: bool):
        self.ws = ws
        self.prefix = prefix
        self.suffix = b"}" if wrap else b""


class Feed:
    """The event generator and its subscribers (one asyncio loop)."""

    def __init__(self, n_symbols: int, rate: float, seed: int, high_water: int) -> None:
        self.names = symbol_names(n_symbols)
        self.index = {n.lower(): i for i, n in enumerate(self.names)}
        self.symbols = [_Symbol(n) for n in self.names]
        rng = random.Random(seed)
        self.depth_bodies, self.ladder = _level_pool(rng, 16)
        self.trade_bodies = [
            f'"p":"{rng.uniform(99.9, 100.1):.8f}","q":"{rng.uniform(0.0001, 3):.8f}"'.encode()
            for _ in range(32)
        ]
        pattern = [k for k, n in MIX.items() for _ in range(n)]
        rng.shuffle(pattern)
        self.pattern = pattern
        self.high_water = high_water
        self.conns: set[_Conn] = set()
        self.headers: dict[int, bytes] = {}
        self.generated = 0
        self.bytes_sent = 0
        self.stalled_ticks = 0
        self.max_buffer = 0
        self._pos = 0
        self._next_sym = {k: 0 for k in MIX}
        self.set_rate(rate)

    # -- control --------------------------------------------------------------------

    def set_rate(self, rate: float) -> None:
        """Change the target rate; the schedule restarts from now (no catch-up burst)."""
        self.rate = max(0.0, float(rate))
        self._t0 = time.monotonic()
        self._gen0 = self.generated

    def due(self) -> int:
        """Events the schedule wants generated by now since the last rate change."""
        return int(self.rate * (time.monotonic() - self._t0))

    def stats(self) -> dict[str, float]:
        """Counters for the harness (``backlog`` = due but not generated)."""
        return {
            "rate": self.rate,
            "generated": self.generated,
            "backlog": max(0, self.due() - (self.generated - self._gen0)),
            "bytes_sent": self.bytes_sent,
            "connections": len(self.conns),
            "stalled_ticks": self.stalled_ticks,
            "max_buffer": self.max_buffer,
            "time_ms": time.time_ns() // 1_000_000,
        }

    # -- generation -----------------------------------------------------------------

    def _event(self, kind: str, s: _Symbol, now: int) -> bytes:
        if kind == "agg":
            s.agg += 1
            f = s.tid + 1
            s.tid += 2
            body = self.trade_bodies[s.agg & 31]
            return b'{"e":"aggTrade","E":%d,"s":"%s","a":%d,%s,"f":%d,"l":%d,"T":%d,' % (
                now,
                s.name.encode(),
                s.agg,
                body,
                f,
                s.tid,
                now - 1,
            ) + (b'"m":true,"M":true}' if s.agg & 1 else b'"m":false,"M":true}')
        if kind == "depth":
            first = s.upd + 1
            s.upd += 3
            return b'{"e":"depthUpdate","E":%d,"s":"%s","U":%d,"u":%d,%s}' % (
                now,
                s.name.encode(),
                first,
                s.upd,
                self.depth_bodies[s.upd & 15],
            )
        minute = now - now % 60_000
        closed = s.kline_open and minute > s.kline_open
        open_time = s.kline_open if closed else minute
        if not s.kline_open:
            s.kline_open = minute
            s.kline_trade0 = s.tid + 1
        count = s.tid - s.kline_trade0 + 1
        body = (
            b'{"e":"kline","E":%d,"s":"%s","k":{"t":%d,"T":%d,"s":"%s","i":"1m","f":%d,"L":%d,'
            b'"o":"100.00000000","c":"100.01000000","h":"100.02000000","l":"99.98000000",'
            b'"v":"12.48311000","n":%d,"x":%s,"q":"1248.31100000","V":"6.90215000",'
            b'"Q":"690.21500000","B":"0"}}'
            % (
                now,
                s.name.encode(),
                open_time,
                open_time + 59_999,
                s.name.encode(),
                s.kline_trade0,
                s.tid,
                max(count, 0),
                b"true" if closed else b"false",
            )
        )
        if closed:
            s.kline_open = minute
            s.kline_trade0 = s.tid + 1
        return body

    def generate(self, count: int) -> None:
        """Generate ``count`` events now and queue them on every subscribed connection."""
        now = time.time_ns() // 1_000_000
        pattern, plen, n = self.pattern, len(self.pattern), len(self.symbols)
        conns = list(self.conns)
        out: dict[_Conn, list[bytes]] = {c: [] for c in conns}
        headers = self.headers
        for _ in range(count):
            kind = pattern[self._pos]
            self._pos = (self._pos + 1) % plen
            i = self._next_sym[kind]
            self._next_sym[kind] = (i + 1) % n
            data = self._event(kind, self.symbols[i], now)
            for c in conns:
                prefix = c.prefix.get((i, kind))
                if prefix is None:
                    continue
                size = len(prefix) + len(data) + len(c.suffix)
                head = headers.get(size)
                if head is None:
                    head = headers[size] = _ws_header(size)
                out[c] += (head, prefix, data, c.suffix)
        self.generated += count
        for c, parts in out.items():
            if parts:
                blob = b"".join(parts)
                self.bytes_sent += len(blob)
                transport = c.ws.transport
                if not transport.is_closing():
                    transport.write(blob)

    async def pump(self) -> None:
        """Generate what is due every tick unless a client's socket buffer is full."""
        while True:
            await asyncio.sleep(TICK)
            if not self.conns:
                # Nobody listening: nothing is due (no burst when a client connects).
                self.set_rate(self.rate)
                continue
            behind = self.due() - (self.generated - self._gen0)
            if behind <= 0:
                continue
            buffered = max(c.ws.transport.get_write_buffer_size() for c in self.conns)
            self.max_buffer = max(self.max_buffer, buffered)
            if buffered > self.high_water:
                self.stalled_ticks += 1
                continue
            # At most 20 ms of events per tick, so one slow tick does not become a burst.
            self.generate(min(behind, max(1, int(self.rate * 0.02))))

    # -- subscribers ----------------------------------------------------------------

    def subscribe(self, ws: ServerConnection, path: str) -> _Conn:
        """Parse ``/stream?streams=a/b`` or ``/ws/<stream>`` into a :class:`_Conn`."""
        parts = urlsplit(path)
        if parts.path.rstrip("/") == "/stream":
            names = parse_qs(parts.query).get("streams", [""])[0].split("/")
            wrap = True
        elif parts.path.startswith("/ws/"):
            names = parts.path[4:].split("/")
            wrap = False
        else:
            raise ValueError(f"unknown path {parts.path}")
        prefix: dict[tuple[int, str], bytes] = {}
        for name in filter(None, names):
            sym, _, channel = name.partition("@")
            i = self.index.get(sym)
            if i is None:
                continue
            kind = {"aggTrade": "agg", "kline_1m": "kline"}.get(channel)
            if channel.startswith("depth"):
                kind = "depth"
            if kind is None:
                continue
            prefix[(i, kind)] = b'{"stream":"%s","data":' % name.encode() if wrap else b""
        return _Conn(ws, prefix, wrap)

    # -- REST -----------------------------------------------------------------------

    def rest(self, path: str) -> tuple[int, object]:
        """Answer one REST request: ``(status, JSON-able body)``."""
        parts = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = parts.path.rstrip("/")
        if route in ("/api/v3/ping",):
            return 200, {}
        if route == "/api/v3/time":
            return 200, {"serverTime": time.time_ns() // 1_000_000}
        if route == "/api/v3/exchangeInfo":
            return 200, {
                "timezone": "UTC",
                "serverTime": time.time_ns() // 1_000_000,
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": 1_000_000,
                    }
                ],
                "symbols": [
                    {
                        "symbol": n,
                        "status": "TRADING",
                        "baseAsset": n[:-4],
                        "quoteAsset": "USDT",
                    }
                    for n in self.names
                ],
            }
        if route in ("/api/v3/aggTrades", "/api/v3/klines"):
            return 200, []
        if route == "/api/v3/depth":
            i = self.index.get(q.get("symbol", "").lower())
            if i is None:
                return 400, {"code": -1121, "msg": "Invalid symbol."}
            bids, asks = self.ladder
            qty = "1.00000000"
            return 200, {
                "lastUpdateId": self.symbols[i].upd,
                "bids": [[p, qty] for p in bids],
                "asks": [[p, qty] for p in asks],
            }
        if route == "/_bench/rate":
            self.set_rate(float(q.get("value", self.rate)))
            return 200, {"rate": self.rate}
        if route == "/_bench/stats":
            return 200, self.stats()
        return 404, {"code": -1, "msg": f"unknown path {parts.path}"}


def _is_upgrade(request: Request) -> bool:
    return "websocket" in request.headers.get("Upgrade", "").lower()


async def serve_feed(feed: Feed, host: str, port: int, ready: Iterable[str] = ()) -> None:
    """Serve ``feed`` until cancelled; prints ``READY <port>`` once listening."""

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if _is_upgrade(request):
            return None
        status, body = feed.rest(request.path)
        headers = Headers([("Content-Type", "application/json"), ("X-MBX-USED-WEIGHT-1M", "1")])
        return Response(
            status, "OK" if status == 200 else "Error", headers, json.dumps(body).encode()
        )

    async def handler(ws: ServerConnection) -> None:
        try:
            conn = feed.subscribe(ws, ws.request.path)
        except ValueError as exc:
            await ws.close(1008, str(exc))
            return
        feed.conns.add(conn)
        try:
            # Read (and ignore) whatever the client sends so pings get their pongs.
            async for _ in ws:
                pass
        finally:
            feed.conns.discard(conn)

    async with serve(
        handler,
        host,
        port,
        process_request=process_request,
        compression=None,
        max_size=2**20,
        ping_interval=None,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"READY {bound}", flush=True)
        await feed.pump()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--high-water", type=int, default=4 * 2**20)
    args = ap.parse_args(argv)
    feed = Feed(args.symbols, args.rate, args.seed, args.high_water)
    try:
        asyncio.run(serve_feed(feed, args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
