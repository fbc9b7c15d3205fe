"""High-rate benchmark source (``SimConfig(high_rate=<msgs/s>, high_rate_symbols=N)``).

Frames are assembled from pre-encoded byte pieces (only ids and the event time are
formatted per message) and written to each connection in one ``transport.write`` per batch,
which is what lets one Python process push well over 100k messages/s over loopback.

Symbols are ``S0000USDT``, ``S0001USDT``... (spot, listed in exchangeInfo). Each symbol has
three streams: ``<s>@depth@100ms`` (20 bid + 20 ask levels per event, contiguous ``U``/``u``),
``<s>@aggTrade`` (consecutive ids) and ``<s>@kline_1m`` (non-final updates). Only subscribed
streams are generated, in a 50% depth / 45% aggTrade / 5% kline mix. The event time ``E`` of
every frame is the wall-clock ms at which its batch was written, so a client can measure
latency as ``receive_ms - E``. REST ``depth`` answers a book whose ``lastUpdateId`` chains
with the stream, so an order-book client stays in sync.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from streamer import Counters, RateLimitedLog

from . import _wire as wire
from .faults import Faults
from .market import SymbolSpec, make_spec
from .protocol import StreamProtocol
from .rest import RestApi
from .transport import Connection, Transport

__all__ = ["HighRateSource", "high_rate_symbols"]

_log = logging.getLogger("streamer.testing.highrate")

# 20-step pattern: 10 depth, 9 aggTrade, 1 kline.
_PATTERN = (0, 1) * 9 + (0, 2)
_MAX_BURST_S = 0.05
_MAX_BATCH = 4000  # messages per write round: bigger batches only add latency
_HIGH_WATER = 1 << 20


def high_rate_symbols(count: int) -> list[str]:
    """Names of the ``count`` high-rate symbols."""
    return [f"S{i:04d}USDT" for i in range(count)]


class _Sym:
    __slots__ = ("agg_id", "depth_blocks", "kline_tail", "last_u", "name", "trade_id", "trades")

    def __init__(self, name: str, rng: random.Random, seed: int) -> None:
        spec = make_spec("spot", name, seed)
        self.name = name.encode()
        self.last_u = rng.randint(10**9, 2 * 10**9)  # fixed width: 10 digits for long runs
        self.agg_id = rng.randint(10**9, 2 * 10**9)
        self.trade_id = self.agg_id * 2
        mid, tick = spec.base_price, spec.tick

        def levels(sign: int) -> bytes:
            ks = sorted(rng.sample(range(1, 80), 20))
            rows = []
            for k in ks:
                qty = 0 if rng.random() < 0.2 else rng.randint(1, 5000) * spec.step
                rows.append(
                    b'["%s","%s"]'
                    % (spec.fmt_price(mid + sign * k * tick).encode(), spec.fmt_qty(qty).encode())
                )
            return b"[" + b",".join(rows) + b"]"

        self.depth_blocks = [b',"b":' + levels(-1) + b',"a":' + levels(1) + b"}" for _ in range(4)]
        self.trades = []
        for _ in range(8):
            side = rng.choice((-1, 1))
            price = spec.fmt_price(mid + side * tick).encode()
            qty = spec.fmt_qty(rng.randint(1, 500) * spec.step).encode()
            maker = b"true" if side < 0 else b"false"
            self.trades.append((b',"p":"%s","q":"%s","f":' % (price, qty), maker))
        p = spec.fmt_price(mid).encode()
        self.kline_tail = (
            b',"s":"%s","i":"1m","f":-1,"L":-1,"o":"%s","c":"%s","h":"%s","l":"%s",'
            b'"v":"0.00000000","n":0,"x":false,"q":"0.00000000","V":"0.00000000",'
            b'"Q":"0.00000000","B":"0"}}' % (self.name, p, p, p, p)
        )


class HighRateSource:
    """Generates the benchmark traffic of one simulator: ``rate`` messages per second over
    ``symbols`` spot symbols (listed in ``specs``; ``rest`` answers their book snapshots),
    sent to the subscribers ``protocol`` knows through ``transport``."""

    def __init__(
        self,
        rate: int,
        symbols: int,
        seed: int,
        specs: dict[tuple[str, str], SymbolSpec],
        rest: RestApi,
        protocol: StreamProtocol,
        transport: Transport,
        counters: Counters,
        faults: Faults,
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.counters = counters
        self.faults = faults
        self.rate = rate
        rng = random.Random(seed)
        self.symbols: dict[str, _Sym] = {}
        for name in high_rate_symbols(max(1, symbols)):
            self.symbols[name] = _Sym(name, rng, seed)
            specs[("spot", name)] = make_spec("spot", name, seed)
        rest.snapshot_hook = self.snapshot
        self.generated = 0
        self.backpressure = 0
        self._version = -1
        self._lists: tuple[list, list, list] = ([], [], [])
        self._cursor = [0, 0, 0]
        self._step = 0
        self._errors = RateLimitedLog(_log, 10.0)

    def streams(self, symbols: int | None = None) -> list[str]:
        """Stream names of the first ``symbols`` high-rate symbols (all by default)."""
        names = list(self.symbols)[:symbols]
        return [
            f"{s.lower()}@{kind}" for s in names for kind in ("depth@100ms", "aggTrade", "kline_1m")
        ]

    def snapshot(self, market: str, symbol: str, limit: int) -> tuple[int, list, list] | None:
        """A REST book for ``symbol`` whose ``lastUpdateId`` chains with the stream."""
        sym = self.symbols.get(symbol)
        if sym is None or market != "spot":
            return None
        return sym.last_u, [], []

    def _active(self) -> tuple[list, list, list]:
        protocol = self.protocol
        if self._version != protocol.version:
            depth, agg, kline = [], [], []
            for (market, name), subs in protocol.subs.items():
                if market != "spot" or not subs:
                    continue
                sym_name, _, kind = name.partition("@")
                sym = self.symbols.get(sym_name.upper())
                if sym is None:
                    continue
                head = b'{"stream":"' + name.encode() + b'","data":'
                entry = (sym, subs, head)
                if kind == "depth@100ms":
                    depth.append(entry)
                elif kind == "aggTrade":
                    agg.append(entry)
                elif kind == "kline_1m":
                    kline.append(entry)
            self._lists = (depth, agg, kline)
            # The round-robin cursors index the old lists: a client set with fewer streams
            # than the previous one would leave them past the end (IndexError that ended
            # the generator, so later clients got nothing).
            self._cursor = [0, 0, 0]
            self._version = protocol.version
        return self._lists

    def _build(self, n: int) -> dict[Connection, list[bytes]]:
        lists = self._active()
        out: dict[Connection, list[bytes]] = {}
        if not any(lists):
            return out
        now = time.time_ns() // 1_000_000
        e = b"%d" % now
        bar_t = now - now % 60_000
        kline_times = b'"t":%d,"T":%d' % (bar_t, bar_t + 59_999)
        cursor, step = self._cursor, self._step
        counts = [0, 0, 0]
        made = 0
        while made < n:
            kind = _PATTERN[step % 20]
            step += 1
            entries = lists[kind]
            if not entries:
                if not lists[0] and not lists[1] and not lists[2]:
                    break
                continue
            i = cursor[kind]
            cursor[kind] = i + 1 if i + 1 < len(entries) else 0
            sym, subs, head = entries[i]
            if kind == 0:
                first = sym.last_u + 1
                sym.last_u = last = first + 39
                body = b'{"e":"depthUpdate","E":%s,"s":"%s","U":%d,"u":%d%s' % (
                    e,
                    sym.name,
                    first,
                    last,
                    sym.depth_blocks[last & 3],
                )
            elif kind == 1:
                a = sym.agg_id
                sym.agg_id = a + 1
                t = sym.trade_id
                sym.trade_id = t + 2
                piece, maker = sym.trades[a & 7]
                body = (
                    b'{"e":"aggTrade","E":%s,"s":"%s","a":%d%s%d,"l":%d,"T":%s,"m":%s,"M":true}'
                    % (
                        e,
                        sym.name,
                        a,
                        piece,
                        t,
                        t + 1,
                        e,
                        maker,
                    )
                )
            else:
                body = b'{"e":"kline","E":%s,"s":"%s","k":{%s%s' % (
                    e,
                    sym.name,
                    kline_times,
                    sym.kline_tail,
                )
            raw = comb = b""
            for conn in subs:
                if conn.combined:
                    if not comb:
                        wrapped = head + body + b"}"
                        comb = wire.text_header(len(wrapped)) + wrapped
                    data = comb
                else:
                    if not raw:
                        raw = wire.text_header(len(body)) + body
                    data = raw
                buf = out.get(conn)
                if buf is None:
                    out[conn] = [data]
                else:
                    buf.append(data)
                counts[kind] += 1
            made += 1
        self._step = step
        counters = self.counters
        for kind, name in enumerate(("depth", "aggTrade", "kline")):
            if counts[kind]:
                counters.incr("ws_messages_sent", "", name, counts[kind])
        self.generated += made
        return out

    async def run(self) -> None:
        """Generate at ``rate`` messages/s until cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = 0
        max_burst = max(1, min(_MAX_BATCH, int(self.rate * _MAX_BURST_S)))
        while True:
            await asyncio.sleep(0.002)
            if self.faults.stalled():
                start, done = loop.time(), 0
                continue
            conns = [c for c in self.transport.conns if not c.closing]
            if any(c.transport.get_write_buffer_size() > _HIGH_WATER for c in conns):
                self.backpressure += 1
                self.counters.incr("high_rate_backpressure")
                continue
            target = int((loop.time() - start) * self.rate)
            if target - done > max_burst:
                done = target - max_burst  # behind: never try to catch up more than a burst
            n = target - done
            if n <= 0:
                continue
            done += n
            try:
                batches = self._build(n)
            except Exception as exc:
                # One bad round must not end generation for every later client.
                self.counters.incr("sim_internal_errors")
                self._errors.error("high_rate_error", "high-rate generation failed: %r", exc)
                self._version = -1
                continue
            for conn, frames in batches.items():
                if not conn.closing:
                    conn.transport.write(b"".join(frames))
