"""Inline plugins for the core tests, importable by spawned children as ``core_plugins``.

* ``synth`` exchange: trades whose ids follow the wall clock (``rate`` per second per
  symbol since ``epoch_ms``), so a restarted worker sees a later id than the one before it
  and must backfill; ``backfill_trades`` regenerates any id range deterministically.
* ``seq`` stream type: emits trades in id order, backfilling from ``resume`` and across
  gaps, the way the real ``aggtrade`` stream does.
* ``lines`` sink: appends JSON lines to ``<path>/records.jsonl`` and reports the highest
  trade id per stream as its holdings; ``write_delay``/``close_delay`` slow it down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import msgspec

from streamer import (
    ExchangeAdapter,
    Sink,
    StreamKey,
    StreamType,
    Subscription,
    SymbolInfo,
    Trade,
    hookimpl,
)
from streamer.core.records import Record

SYMBOLS = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]


class SynthOptions(msgspec.Struct, forbid_unknown_fields=True):
    epoch_ms: int = 0
    rate: int = 200
    #: Crash ``stream`` after this many seconds (0: never).
    crash_after: float = 0.0
    #: ``list_symbols`` fails as if the exchange were unreachable.
    unreachable: bool = False


def make_trade(symbol: str, trade_id: int, receive_time: int = 0) -> Trade:
    """The synthetic trade ``trade_id`` of ``symbol``, identical whoever generates it."""
    return Trade(
        exchange="synth",
        market="test",
        symbol=symbol,
        trade_id=trade_id,
        price=f"{100 + trade_id % 50}.{trade_id % 100:02d}",
        quantity=f"0.{trade_id % 1000:03d}",
        first_trade_id=trade_id * 2,
        last_trade_id=trade_id * 2 + 1,
        transact_time=trade_id,
        is_buyer_maker=trade_id % 2 == 0,
        is_best_match=True,
        event_time=trade_id,
        receive_time=receive_time,
    )


class SynthExchange(ExchangeAdapter):
    Options = SynthOptions
    exchange = "synth"
    market = "test"

    def _now_id(self) -> int:
        elapsed = time.time_ns() // 1_000_000 - self.options.epoch_ms
        return elapsed * self.options.rate // 1000

    async def list_symbols(self) -> list[SymbolInfo]:
        if self.options.unreachable:
            raise ConnectionRefusedError(111, "Connection refused")
        infos = [SymbolInfo(s, "TRADING", s, "USD") for s in SYMBOLS]
        return [*infos, SymbolInfo("HALTED", "BREAK", "HAL", "USD")]

    async def stream(self, subscriptions: Sequence[Subscription], inbox) -> None:
        symbols = sorted({s.symbol for s in subscriptions if s.channel == "trade"})
        last = self._now_id()
        started = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now_id = self._now_id()
            receive = time.time_ns() // 1_000_000
            for trade_id in range(last + 1, now_id + 1):
                for symbol in symbols:
                    inbox.on_record(make_trade(symbol, trade_id, receive))
            last = max(last, now_id)
            crash = self.options.crash_after
            if crash and time.monotonic() - started > crash:
                raise RuntimeError("synthetic exchange crashed on purpose")

    async def backfill_trades(
        self, symbol: str, from_id: int, to_id: int | None = None
    ) -> AsyncIterator[list[Trade]]:
        end = self._now_id() if to_id is None else to_id
        for start in range(from_id, end + 1, 100):
            await anyio.sleep(0)
            yield [make_trade(symbol, i) for i in range(start, min(end, start + 99) + 1)]


class SeqStream(StreamType):
    """Trades in id order with no gap: backfills from ``resume`` and across jumps."""

    channels = frozenset({"trade"})

    def __init__(self, options, context) -> None:
        super().__init__(options, context)
        ex = context.exchange
        self._last: dict[str, int | None] = {}
        for symbol in context.symbols:
            key = StreamKey(ex.exchange, ex.market, symbol, "aggtrade")
            self._last[symbol] = context.resume.get(key)
        self._buffer: dict[str, list[Trade]] = {s: [] for s in context.symbols}
        self._filling: set[str] = set()
        self._requests, self._pending = anyio.create_memory_object_stream[tuple](1000)

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(s, "trade") for s in self.context.symbols]

    def on_record(self, record: Record) -> None:
        symbol = record.symbol
        if symbol in self._filling:
            self._buffer[symbol].append(record)
            return
        last = self._last[symbol]
        if last is None or record.trade_id == last + 1:
            self._emit(record)
        elif record.trade_id > last + 1:
            self._filling.add(symbol)
            self._buffer[symbol].append(record)
            self._requests.send_nowait((symbol, last + 1, record.trade_id - 1))
        else:
            self.context.counters.incr("duplicates", symbol, "aggtrade")

    def _emit(self, record: Trade) -> None:
        self._last[record.symbol] = record.trade_id
        self.context.emit(record)

    async def run(self) -> None:
        async for symbol, first, last in self._pending:
            async for page in self.context.exchange.backfill_trades(symbol, first, last):
                for trade in page:
                    self._emit(trade)
                self.context.counters.incr("backfilled", symbol, "aggtrade", len(page))
            buffered, self._buffer[symbol] = self._buffer[symbol], []
            self._filling.discard(symbol)
            for trade in buffered:
                self.on_record(trade)


class LinesOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    write_delay: float = 0.0
    close_delay: float = 0.0
    flush_interval: str = "200ms"
    #: Raise from the N-th ``write`` of each process (0: never).
    fail_on_write: int = 0


class LinesSink(Sink):
    """JSON lines in one file; holdings are the highest trade id per stream."""

    Options = LinesOptions

    async def open(self) -> None:
        Path(self.options.path).mkdir(parents=True, exist_ok=True)
        self._file = open(os.path.join(self.options.path, "records.jsonl"), "ab")  # noqa: SIM115

    async def write(self, batch: Sequence[Record]) -> None:
        self._writes = getattr(self, "_writes", 0) + 1
        if self._writes == self.options.fail_on_write:
            raise OSError("synthetic write failure")
        if self.options.write_delay:
            await anyio.sleep(self.options.write_delay)
        self._file.write(b"".join(msgspec.json.encode(r) + b"\n" for r in batch))

    async def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    async def close(self) -> None:
        if self.options.close_delay:
            await anyio.sleep(self.options.close_delay)
        await self.flush()
        self._file.close()

    async def holdings(self) -> dict[StreamKey, int]:
        return {key: max(ids) for key, ids in read_lines(self.options.path).items() if ids}


def read_lines(path: str | os.PathLike) -> dict[StreamKey, list[int]]:
    """Trade ids per stream in ``<path>/records.jsonl``, in file order (markers skipped)."""
    out: dict[StreamKey, list[int]] = {}
    file = Path(path) / "records.jsonl"
    if not file.exists():
        return out
    for line in file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line after a kill
        if row[0] != "trade":
            continue
        key = StreamKey(row[1], row[2], row[3], "aggtrade")
        out.setdefault(key, []).append(row[4])
    return out


def read_markers(path: str | os.PathLike) -> list[list]:
    """Marker rows in ``<path>/records.jsonl``."""
    file = Path(path) / "records.jsonl"
    if not file.exists():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line]
    return [row for row in rows if row[0] == "marker"]


@hookimpl
def register_exchanges(register):
    register("synth", SynthExchange)


@hookimpl
def register_streams(register):
    register("seq", SeqStream)


@hookimpl
def register_sinks(register):
    register("lines", LinesSink)
