"""The ``aggtrade`` stream type: every aggregated trade exactly once, in id order, no gaps.

Exchange-neutral: it relies only on trade ids being consecutive per symbol and on
``ExchangeAdapter.backfill_trades``. Per symbol, a :class:`KeySequencer` emits trades in id
order, drops duplicates (overlapping connections during rotation deliver some trades twice)
and holds trades that arrive above a gap while a background task fills the gap from REST.
Live data keeps flowing into the hold meanwhile; once the gap is filled the held trades are
emitted in order. A gap is detected from an id jump, after ``on_reconnect``, and at start
from the sinks' last held id (``StreamContext.resume``). Each filled or unfillable range
is reported as a :class:`~streamer.core.records.Marker` and counted.

:class:`KeySequencer` and :class:`GapFillStream` are reused by the ``kline`` stream type.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, ClassVar

import anyio
import msgspec

from streamer.core.api import Channel, StreamContext, StreamKey, StreamType, Subscription
from streamer.core.hookspecs import hookimpl
from streamer.core.logs import RateLimitedLog
from streamer.core.records import Marker, MarkerKind, Record, Trade
from streamer.core.units import check_duration, parse_duration


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class KeySequencer:
    """Emits the records of one (symbol, stream) exactly once, in key order.

    ``next_key(k)`` is the key that follows ``k`` (``k + 1`` for trade ids). ``last`` is
    the key of the last emitted record (``None`` until the first one, which is accepted
    as the starting point). Records above ``next_key(last)`` are held until the gap below
    them is filled (:meth:`push` returns True so the owner can schedule a fill) or given
    up (:meth:`skip_gap`).
    """

    __slots__ = (
        "_emit", "_key_of", "_next_key", "catch_up_mark", "duplicates", "held", "last",
        "live_max", "wants_catch_up",
    )  # fmt: skip

    def __init__(
        self,
        emit: Callable[[Record], None],
        key_of: Callable[[Any], int],
        next_key: Callable[[int], int],
        last: int | None = None,
    ) -> None:
        self._emit = emit
        self._key_of = key_of
        self._next_key = next_key
        self.last = last
        self.held: dict[int, Record] = {}
        #: Highest key seen from the live stream (tells an open-ended fill when to stop).
        self.live_max: int | None = None
        #: A fill up to the newest record is wanted (after a reconnect or at start).
        self.wants_catch_up = False
        #: ``live_max`` when the catch-up was requested: live data above it proves the
        #: live stream is flowing again, so a catch-up may stop once it reaches it.
        self.catch_up_mark: int | None = None
        self.duplicates = 0

    def request_catch_up(self) -> None:
        """Ask for a fill from ``last`` up to the newest record (reconnect, restart)."""
        self.wants_catch_up = True
        self.catch_up_mark = self.live_max

    def caught_up(self) -> bool:
        """True once no gap is open and the live stream has delivered data since the
        catch-up was requested, all of it already emitted."""
        live = self.live_max
        return (
            not self.held
            and live is not None
            and (self.catch_up_mark is None or live > self.catch_up_mark)
            and self.last is not None
            and self.last >= live
        )

    def push(self, record: Any, live: bool = True) -> bool:
        """Offer one record; returns True when it opened or widened a gap (held)."""
        key = self._key_of(record)
        if live and (self.live_max is None or key > self.live_max):
            self.live_max = key
        last = self.last
        if last is None:
            self.last = key
            self._emit(record)
            return False
        if key <= last:
            self.duplicates += 1
            return False
        expected = self._next_key(last)
        if key == expected:
            self.last = key
            self._emit(record)
            if self.held:
                self._drain()
            return False
        if key < expected or key in self.held:
            self.duplicates += 1
            return False
        self.held[key] = record
        return True

    def _drain(self) -> None:
        held = self.held
        while held:
            key = self._next_key(self.last)  # type: ignore[arg-type]
            record = held.pop(key, None)
            if record is None:
                return
            self.last = key
            self._emit(record)

    def gap(self) -> tuple[int, int] | None:
        """``(first missing key, last missing key)`` below the held records, if any."""
        if not self.held or self.last is None:
            return None
        return self._next_key(self.last), min(self.held) - 1

    def skip_gap(self) -> tuple[int, int] | None:
        """Give up the current gap: emit the held records from the lowest one on.

        Returns the skipped range, or None when there was no gap.
        """
        gap = self.gap()
        if gap is None:
            return None
        first = min(self.held)
        self.last = first
        self._emit(self.held.pop(first))
        self._drain()
        return gap


class _SymbolState:
    __slots__ = ("filling", "idle_rounds", "reason", "seq")

    def __init__(self, seq: KeySequencer) -> None:
        self.seq = seq
        self.filling = False
        self.reason = "gap"
        self.idle_rounds = 0


class GapFillStream(StreamType):
    """Base of stream types whose records have consecutive keys and can be refetched.

    Subclasses register one :class:`KeySequencer` per (symbol, output stream) with
    :meth:`_add_state`, feed records through :meth:`_offer` and give the REST source
    (:meth:`_fetch`). ``Options`` must have ``backfill`` (bool), ``gap_grace`` (duration)
    and ``max_held`` (int).
    """

    #: Gaps filled at the same time (REST pacing is the adapter's job).
    fill_concurrency: ClassVar[int] = 4
    #: Fill attempts that find nothing before a gap is declared unfillable ...
    max_idle_rounds: ClassVar[int] = 5
    #: ... and the pause between them (REST can trail the live stream briefly).
    idle_retry_delay: ClassVar[float] = 1.0

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        self._grace = parse_duration(options.gap_grace)  # type: ignore[attr-defined]
        self._backfill: bool = options.backfill  # type: ignore[attr-defined]
        self._max_held: int = options.max_held  # type: ignore[attr-defined]
        self._log = RateLimitedLog(context.logger, 60.0)
        self._states: dict[tuple[str, str], _SymbolState] = {}
        self._pending: dict[tuple[str, str], float] = {}
        self._wake = anyio.Event()
        self._exchange_name = getattr(context.exchange, "exchange", "")
        self._market = getattr(context.exchange, "market", "")

    # ------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _fetch(self, symbol: str, stream: str, start: int, end: int | None) -> AsyncIterator[list]:
        """Records with keys ``start..end`` (open-ended when None), oldest first."""

    def _stream_key(self, symbol: str, stream: str) -> StreamKey:
        return StreamKey(self._exchange_name, self._market, symbol, stream)

    def _add_state(self, symbol: str, stream: str, seq: KeySequencer) -> None:
        state = _SymbolState(seq)
        resume = self.context.resume.get(self._stream_key(symbol, stream))
        if resume is not None:
            seq.last = resume
            seq.request_catch_up()
            state.reason = "restart"
            self._pending[(symbol, stream)] = time.monotonic() + self._grace
        self._states[(symbol, stream)] = state

    # ------------------------------------------------------------ hot path helpers

    def _offer(self, symbol: str, stream: str, record: Record) -> None:
        state = self._states.get((symbol, stream))
        if state is None:
            return
        seq = state.seq
        if not seq.push(record):
            if seq.wants_catch_up and seq.caught_up():
                # Live data resumed right after the last record: nothing to fetch.
                seq.wants_catch_up = False
        else:
            if len(seq.held) > self._max_held:
                self._give_up(symbol, stream, state, "hold limit reached")
            elif not state.filling and (symbol, stream) not in self._pending:
                state.reason = "gap"
                self._pending[(symbol, stream)] = time.monotonic() + self._grace
                self._wake.set()

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:
        """Schedule a catch-up fill for every stream of ``symbols`` that has a position.

        The fill starts after ``gap_grace``: if live data resumes exactly where it
        stopped meanwhile, nothing is fetched; if it resumes above, only the gap below it
        is fetched; if nothing arrives (a quiet symbol), everything up to the newest is.
        """
        wanted = set(symbols)
        due = time.monotonic() + self._grace
        for (symbol, stream), state in self._states.items():
            if symbol in wanted and state.seq.last is not None:
                state.seq.request_catch_up()
                state.reason = reason
                self._pending[(symbol, stream)] = due
        self._wake.set()

    # ------------------------------------------------------------ background

    async def run(self) -> None:
        """Fill gaps as they are found, a few symbols at a time, until cancelled."""
        limiter = anyio.CapacityLimiter(self.fill_concurrency)
        async with anyio.create_task_group() as tg:
            while True:
                if not self._pending:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                now = time.monotonic()
                due = [key for key, at in self._pending.items() if at <= now]
                for key in due:
                    del self._pending[key]
                    state = self._states[key]
                    if not state.filling:
                        state.filling = True
                        tg.start_soon(self._fill_loop, key, state, limiter)
                if not due:
                    wake = self._wake = anyio.Event()
                    with anyio.move_on_after(min(self._pending.values()) - now):
                        await wake.wait()

    async def _fill_loop(
        self, key: tuple[str, str], state: _SymbolState, limiter: anyio.CapacityLimiter
    ) -> None:
        symbol, stream = key
        seq = state.seq
        failures = 0
        try:
            while seq.gap() is not None or seq.wants_catch_up:
                if not self._backfill:
                    seq.wants_catch_up = False
                    self._give_up(symbol, stream, state, "backfill disabled")
                    return
                catch_up = seq.wants_catch_up
                try:
                    async with limiter:
                        await self._fill_once(symbol, stream, state)
                    failures = 0
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # REST trouble: retry later, live data is held
                    if catch_up:
                        seq.wants_catch_up = True  # the catch-up is still owed
                    failures += 1
                    self.context.counters.incr("backfill_errors", symbol, stream)
                    self._log.warning(
                        f"backfill_error_{stream}",
                        "backfill of %s %s failed (%s: %s); retrying",
                        symbol, stream, type(exc).__name__, exc,
                    )  # fmt: skip
                    await anyio.sleep(min(60.0, 0.5 * 2**failures))
        finally:
            state.filling = False

    async def _fill_once(self, symbol: str, stream: str, state: _SymbolState) -> None:
        seq = state.seq
        assert seq.last is not None
        gap = seq.gap()
        # Held live records bound the gap from above, so a catch-up reduces to the gap.
        seq.wants_catch_up = False
        start = gap[0] if gap else seq._next_key(seq.last)
        end = gap[1] if gap else None
        first = last = fetched_max = None
        count = 0
        async for page in self._fetch(symbol, stream, start, end):
            for record in page:
                before = seq.last
                k = seq._key_of(record)
                fetched_max = k if fetched_max is None else max(fetched_max, k)
                if seq.push(record, live=False) or seq.last != before:
                    first = k if first is None else min(first, k)
                    last = k if last is None else max(last, k)
                    count += 1
            if seq.gap() is None and (end is not None or seq.caught_up()):
                break
        if count:
            self.context.counters.incr(f"{self._counter_prefix}_backfilled", symbol, stream, count)
            if first is not None and last is not None:
                self._marker(symbol, stream, "filled", first, last, state.reason)
        gap = seq.gap()
        if gap is None:
            state.idle_rounds = 0
            return
        if fetched_max is not None and fetched_max > gap[1]:
            # REST already serves records past the gap, so it has none for the gap.
            self._give_up(symbol, stream, state, state.reason)
            return
        # REST may lag the live stream by a moment: retry a few times before giving up.
        state.idle_rounds = state.idle_rounds + 1 if count == 0 else 0
        if state.idle_rounds >= self.max_idle_rounds:
            state.idle_rounds = 0
            self._give_up(symbol, stream, state, state.reason)
        else:
            await anyio.sleep(self.idle_retry_delay)

    def _give_up(self, symbol: str, stream: str, state: _SymbolState, reason: str) -> None:
        skipped = state.seq.skip_gap()
        if skipped is not None:
            self._marker(symbol, stream, "unfillable", skipped[0], skipped[1], reason)

    def _marker(
        self, symbol: str, stream: str, kind: MarkerKind, first: int, last: int, reason: str
    ) -> None:
        self.context.counters.incr(f"gaps_{kind}", symbol, stream)
        self.context.emit(
            Marker(
                self._exchange_name,
                self._market,
                symbol,
                stream,
                kind,
                first,
                last,
                _now_ms(),
                reason,
            )
        )

    _counter_prefix: ClassVar[str] = "records"


class AggTradeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``aggtrade`` stream type."""

    #: Fill gaps from the exchange's REST API (False: only report them as unfillable).
    backfill: bool = True
    #: Wait this long before filling a gap found by an id jump (rotation overlap).
    gap_grace: str = "500ms"
    #: Live trades held per symbol while a gap is filled; beyond it the gap is given up.
    max_held: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 200_000

    def __post_init__(self) -> None:
        check_duration("gap_grace", self.gap_grace)


def _trade_id(trade: Trade) -> int:
    return trade.trade_id


def _plus_one(key: int) -> int:
    return key + 1


class AggTradeStream(GapFillStream):
    """Aggregated trades, exactly once per id, gaps filled from REST (stream ``aggtrade``)."""

    Options: ClassVar[type[msgspec.Struct]] = AggTradeOptions
    channels: ClassVar[frozenset[Channel]] = frozenset({"trade"})
    STREAM: ClassVar[str] = "aggtrade"
    _counter_prefix: ClassVar[str] = "trades"

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        for symbol in context.symbols:
            seq = KeySequencer(context.emit, _trade_id, _plus_one)
            self._add_state(symbol, self.STREAM, seq)

    def subscriptions(self) -> list[Subscription]:
        """One ``trade`` channel per symbol."""
        return [Subscription(symbol, "trade") for symbol in self.context.symbols]

    def on_record(self, record: Record) -> None:
        """De-duplicate, order and gap-check one trade."""
        self._offer(record.symbol, self.STREAM, record)  # type: ignore[union-attr]

    def _fetch(self, symbol: str, stream: str, start: int, end: int | None):
        return self.context.exchange.backfill_trades(symbol, start, end)

    def held(self, symbol: str) -> int:
        """Trades of ``symbol`` currently held above a gap."""
        return len(self._states[(symbol, self.STREAM)].seq.held)

    def last_id(self, symbol: str) -> int | None:
        """The id of the last trade of ``symbol`` emitted."""
        return self._states[(symbol, self.STREAM)].seq.last


@hookimpl
def register_streams(register):
    """Register the ``aggtrade`` stream type."""
    register("aggtrade", AggTradeStream)
