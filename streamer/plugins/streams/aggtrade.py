"""The ``aggtrade`` stream type: every aggregated trade exactly once, in id order, no gaps.

Exchange-neutral: it relies only on trade ids being consecutive per symbol and on
``ExchangeAdapter.backfill_trades``. Per symbol, a :class:`KeySequencer` emits trades in id
order, drops duplicates (overlapping connections during rotation deliver some trades twice)
and holds trades that arrive above a gap while a background task fills the gap from REST.
Live data keeps flowing into the hold meanwhile; once the gap is filled the held trades are
emitted in order. A gap is detected from an id jump, after ``on_reconnect``, and at start
from the sinks' last held id (``StreamContext.resume``). Each filled or unfillable range
is reported as a :class:`~streamer.core.records.Marker` and counted.

Fill capacity: one request starts at the first hole and covers every further hole within
one REST page (``coalesce_span`` ids), so many small holes cost one request; a few fill
workers serve the streams with the oldest held data first. A hold is bounded in size
(``max_held`` per stream, ``max_held_total`` per stream instance) and in time
(``max_hold``): past either bound the held records are released and the ids that could not
be filled are reported by an ``unfillable`` marker. At shutdown a last fill is tried for
``shutdown_fill``, then whatever is still held is written with markers for what is missing.

Gauges per (symbol, stream), refreshed every ``tick``: ``<prefix>_held`` (records held
above a gap: ``trades_held``, ``klines_held``) and ``held_for_ms`` (how long the oldest held
record has waited, i.e. how far the written output is behind what was received); per
process ``<prefix>_fills_waiting`` (streams waiting for a fill: ``trades_fills_waiting``).
Counters: ``<prefix>_backfilled``, ``gaps_filled``, ``gaps_unfillable``, ``backfill_errors``,
``hold_timeouts``, ``hold_cap_releases`` and ``held_released_at_stop`` (records written
at shutdown above a hole that could not be filled).

:class:`KeySequencer` and :class:`GapFillStream` are reused by the ``kline`` stream type.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import pairwise
from typing import Annotated, Any, ClassVar

import anyio
import msgspec

from streamer import (
    Channel,
    Duration,
    Marker,
    MarkerKind,
    RateLimitedLog,
    Record,
    StreamContext,
    StreamKey,
    StreamType,
    Subscription,
    Trade,
    check_duration,
    hookimpl,
    parse_duration,
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Held records are time-stamped at most this often (the age of a hold is that precise).
_MARK_EVERY = 0.05


class KeySequencer:
    """Emits the records of one (symbol, stream) exactly once, in key order.

    ``next_key(k)`` is the key that follows ``k`` (``k + 1`` for trade ids). ``last`` is
    the key of the last emitted record (``None`` until the first one, which is accepted
    as the starting point). Records above ``next_key(last)`` are held until the gap below
    them is filled (:meth:`push` returns True so the owner can schedule a fill) or given
    up (:meth:`skip_gap`). :meth:`held_age` says how long the oldest held live record has
    waited.
    """

    __slots__ = (
        "_clock", "_emit", "_key_of", "_marks", "_next_key", "catch_up_mark", "duplicates",
        "held", "last", "live_max", "wants_catch_up",
    )  # fmt: skip

    def __init__(
        self,
        emit: Callable[[Record], None],
        key_of: Callable[[Any], int],
        next_key: Callable[[int], int],
        last: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._key_of = key_of
        self._next_key = next_key
        self._clock = clock
        self.last = last
        self.held: dict[int, Record] = {}
        #: (key, arrival time) of held live records, sampled every ``_MARK_EVERY`` s.
        self._marks: deque[tuple[int, float]] = deque()
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
        if live:
            now = self._clock()
            marks = self._marks
            if not self.held or not marks or now - marks[-1][1] >= _MARK_EVERY:
                marks.append((key, now))
        self.held[key] = record
        return True

    def wanted(self, key: int) -> bool:
        """True when a fetched record with ``key`` is neither emitted nor held yet."""
        return self.last is None or (key > self.last and key not in self.held)

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

    def fill_range(self, span: int | None) -> tuple[int, int] | None:
        """The first gap widened to cover further holes that start within ``span`` keys
        of it: ``(first missing key, end)`` where every key above ``end`` up to the next
        held one is held or emitted. One REST page from the first hole fills them all."""
        gap = self.gap()
        if gap is None or span is None:
            return gap
        start, end = gap
        limit = start + span - 1
        near = sorted(k for k in self.held if k <= limit)
        next_key = self._next_key
        for a, b in pairwise(near):
            if next_key(a) != b:  # a hole between two held records
                end = b - 1
        return start, end

    def held_age(self, now: float | None = None) -> float:
        """Seconds the oldest held live record has waited (0.0 when nothing is held)."""
        marks = self._marks
        if not self.held:
            marks.clear()
            return 0.0
        last = self.last
        while marks and last is not None and marks[0][0] <= last:
            marks.popleft()
        if not marks:
            return 0.0
        return max(0.0, (self._clock() if now is None else now) - marks[0][1])

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


# Where a stream is in the fill scheduler.
_IDLE, _PENDING, _READY, _BUSY = range(4)


class _SymbolState:
    __slots__ = (
        "failures", "held_for_ms", "held_n", "idle_rounds", "key", "phase", "reason",
        "requeue_at", "seq",
    )  # fmt: skip

    def __init__(self, key: tuple[str, str], seq: KeySequencer) -> None:
        self.key = key
        self.seq = seq
        self.phase = _IDLE
        self.reason = "gap"
        self.idle_rounds = 0
        self.failures = 0
        #: Earliest time a fill may start again after the current one (a reconnect's grace).
        self.requeue_at = 0.0
        #: Last published gauges (only changes are written).
        self.held_n = -1
        self.held_for_ms = -1


class GapFillStream(StreamType):
    """Base of stream types whose records have consecutive keys and can be refetched.

    Subclasses register one :class:`KeySequencer` per (symbol, output stream) with
    :meth:`_add_state`, feed records through :meth:`_offer` and give the REST source
    (:meth:`_fetch`). ``Options`` must have ``backfill`` (bool), ``gap_grace`` (duration)
    and ``max_held`` (int); ``fill_concurrency`` (int), ``max_hold`` (duration),
    ``max_held_total`` (int) and ``shutdown_fill`` (duration) are optional.
    """

    #: Fill workers when the options do not say (REST pacing is the adapter's job).
    fill_concurrency: ClassVar[int] = 8
    #: Fill attempts that find nothing before a gap is declared unfillable ...
    max_idle_rounds: ClassVar[int] = 5
    #: ... and the pause between them (REST can trail the live stream briefly).
    idle_retry_delay: ClassVar[float] = 1.0
    #: A fill from the first hole also covers holes starting within this many keys of it
    #: (one REST page); None: one gap per request.
    coalesce_span: ClassVar[int | None] = None
    #: Defaults of the optional options.
    default_max_hold: ClassVar[str] = "30s"
    default_max_held_total: ClassVar[int] = 500_000
    default_shutdown_fill: ClassVar[str] = "5s"

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        self._grace = parse_duration(options.gap_grace)  # type: ignore[attr-defined]
        self._backfill: bool = options.backfill  # type: ignore[attr-defined]
        self._max_held: int = options.max_held  # type: ignore[attr-defined]
        self._max_hold = parse_duration(getattr(options, "max_hold", self.default_max_hold))
        self._max_held_total: int = getattr(options, "max_held_total", self.default_max_held_total)
        self._shutdown_fill = parse_duration(
            getattr(options, "shutdown_fill", self.default_shutdown_fill)
        )
        self._workers: int = getattr(options, "fill_concurrency", self.fill_concurrency)
        #: Housekeeping period: hold bounds and gauges.
        self.tick = min(0.5, max(0.05, self._max_hold / 4))
        self._log = RateLimitedLog(context.logger, 60.0)
        self._states: dict[tuple[str, str], _SymbolState] = {}
        self._pending: dict[tuple[str, str], float] = {}
        self._ready: dict[tuple[str, str], None] = {}
        self._wake = anyio.Event()
        self._work = anyio.Event()
        self._exchange_name = getattr(context.exchange, "exchange", "")
        self._market = getattr(context.exchange, "market", "")

    # ------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _fetch(self, symbol: str, stream: str, start: int, end: int | None) -> AsyncIterator[list]:
        """Records with keys ``start..end`` (open-ended when None), oldest first."""

    def _stream_key(self, symbol: str, stream: str) -> StreamKey:
        return StreamKey(self._exchange_name, self._market, symbol, stream)

    def _add_state(self, symbol: str, stream: str, seq: KeySequencer) -> None:
        state = _SymbolState((symbol, stream), seq)
        resume = self.context.resume.get(self._stream_key(symbol, stream))
        self._states[(symbol, stream)] = state
        if resume is not None:
            seq.last = resume
            seq.request_catch_up()
            state.reason = "restart"
            self._schedule(state, time.monotonic() + self._grace)

    # ------------------------------------------------------------ scheduling

    def _schedule(self, state: _SymbolState, due: float) -> None:
        """Start a fill of ``state`` at ``due`` unless one is already on its way."""
        phase = state.phase
        if phase in (_IDLE, _PENDING):
            state.phase = _PENDING
            self._pending[state.key] = due
            self._wake.set()
        elif phase == _BUSY:
            state.requeue_at = max(state.requeue_at, due)

    def _make_ready(self, state: _SymbolState) -> None:
        self._pending.pop(state.key, None)
        state.phase = _READY
        self._ready[state.key] = None
        self._work.set()

    def _take(self) -> _SymbolState | None:
        """The ready stream to fill next: the one whose held data waited longest, then
        the others (catch-ups with nothing held) in the order they became ready."""
        ready = self._ready
        if not ready:
            return None
        best: _SymbolState | None = None
        best_age = 0.0
        now = time.monotonic()
        for key in ready:
            state = self._states[key]
            age = state.seq.held_age(now) if state.seq.held else -1.0
            if best is None or age > best_age:
                best, best_age = state, age
        assert best is not None
        del ready[best.key]
        best.phase = _BUSY
        return best

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
            elif state.phase == _IDLE:
                state.reason = "gap"
                self._schedule(state, time.monotonic() + self._grace)

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:
        """Schedule a catch-up fill for every stream of ``symbols`` that has a position.

        The fill starts after ``gap_grace``: if live data resumes exactly where it
        stopped meanwhile, nothing is fetched; if it resumes above, only the gap below it
        is fetched; if nothing arrives (a quiet symbol), everything up to the newest is.
        """
        wanted = set(symbols)
        due = time.monotonic() + self._grace
        for (symbol, _stream), state in self._states.items():
            if symbol in wanted and state.seq.last is not None:
                state.seq.request_catch_up()
                state.reason = reason
                if state.phase == _PENDING:
                    self._pending[state.key] = due
                else:
                    self._schedule(state, due)
        self._wake.set()

    # ------------------------------------------------------------ background

    async def run(self) -> None:
        """Fill gaps as they are found until cancelled; then a last fill and release."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(max(1, self._workers)):
                    tg.start_soon(self._worker)
                tg.start_soon(self._housekeeping)
                await self._timer()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    async def _timer(self) -> None:
        """Move streams whose grace has passed to the ready set."""
        while True:
            if not self._pending:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            now = time.monotonic()
            due = [key for key, at in self._pending.items() if at <= now]
            for key in due:
                self._make_ready(self._states[key])
            if not due:
                wake = self._wake = anyio.Event()
                with anyio.move_on_after(min(self._pending.values()) - now):
                    await wake.wait()

    async def _worker(self) -> None:
        while True:
            state = self._take()
            if state is None:
                if not self._ready:
                    self._work = anyio.Event()
                    await self._work.wait()
                continue
            retry_in = 0.0
            try:
                retry_in = await self._fill_pass(state)
            finally:
                seq = state.seq
                if seq.gap() is None and not seq.wants_catch_up:
                    state.phase = _IDLE
                else:
                    # More to do: other streams get a turn first (or wait out a retry).
                    state.phase = _IDLE
                    at = max(time.monotonic() + retry_in, state.requeue_at)
                    if at > time.monotonic():
                        self._schedule(state, at)
                    else:
                        self._make_ready(state)
                state.requeue_at = 0.0
            await anyio.lowlevel.checkpoint()

    async def _fill_pass(self, state: _SymbolState) -> float:
        """One fill attempt for ``state``; returns how long to wait before the next."""
        symbol, stream = state.key
        seq = state.seq
        if seq.gap() is None and not seq.wants_catch_up:
            return 0.0
        if not self._backfill:
            seq.wants_catch_up = False
            while seq.gap() is not None:
                self._give_up(symbol, stream, state, "backfill disabled")
            return 0.0
        catch_up = seq.wants_catch_up
        try:
            retry_in = await self._fill_once(symbol, stream, state)
        except anyio.get_cancelled_exc_class():
            if catch_up:
                seq.wants_catch_up = True
            raise
        except Exception as exc:  # REST trouble: retry later, live data is held
            if catch_up:
                seq.wants_catch_up = True  # the catch-up is still owed
            state.failures += 1
            self.context.counters.incr("backfill_errors", symbol, stream)
            self._log.warning(
                f"backfill_error_{stream}",
                "backfill of %s %s failed (%s: %s); retrying",
                symbol, stream, type(exc).__name__, exc,
            )  # fmt: skip
            return min(60.0, 0.5 * 2**state.failures)
        state.failures = 0
        return retry_in

    async def _fill_once(self, symbol: str, stream: str, state: _SymbolState) -> float:
        """Fetch from the first hole (or ``last`` for a catch-up); returns a retry delay
        when REST had nothing yet for a gap that remains."""
        seq = state.seq
        assert seq.last is not None
        coalesce = self.coalesce_span
        span = seq.fill_range(coalesce)
        # Held live records bound the gap from above, so a catch-up reduces to the gap.
        seq.wants_catch_up = False
        start = span[0] if span else seq._next_key(seq.last)
        end = span[1] if span else None
        if end is not None and coalesce is not None:
            # Ask for the whole page: holes that open while the request waits for the
            # REST budget are covered by it too (what is used is decided on arrival).
            end = max(end, start + coalesce - 1)
        first = last = fetched_max = None
        count = 0
        async for page in self._fetch(symbol, stream, start, end):
            # Only records below the highest held one are missing; the live stream
            # delivers those above it.
            bound = max(seq.held, default=seq.last) if end is not None else None
            for record in page:
                k = seq._key_of(record)
                fetched_max = k if fetched_max is None else max(fetched_max, k)
                if not seq.wanted(k) or (bound is not None and k > bound):
                    continue  # emitted, held or still to come live
                seq.push(record, live=False)
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
            return 0.0
        if fetched_max is not None and fetched_max > gap[1]:
            # REST already serves records past the gap, so it has none for the gap.
            state.idle_rounds = 0
            self._give_up(symbol, stream, state, state.reason)
            return 0.0
        if count:  # progress: the next hole goes at once
            state.idle_rounds = 0
            return 0.0
        # REST may lag the live stream by a moment: retry a few times before giving up.
        state.idle_rounds += 1
        if state.idle_rounds >= self.max_idle_rounds:
            state.idle_rounds = 0
            self._give_up(symbol, stream, state, state.reason)
            return 0.0
        return self.idle_retry_delay

    async def _housekeeping(self) -> None:
        while True:
            await anyio.sleep(self.tick)
            self._enforce_bounds()
            self._publish()

    def _enforce_bounds(self, now: float | None = None) -> None:
        """Release holds older than ``max_hold`` and trim the largest holds while all of
        them together exceed ``max_held_total``."""
        now = time.monotonic() if now is None else now
        total = 0
        for (symbol, stream), state in self._states.items():
            seq = state.seq
            if not seq.held:
                continue
            while seq.held and seq.held_age(now) > self._max_hold:
                self.context.counters.incr("hold_timeouts", symbol, stream)
                self._give_up(symbol, stream, state, "hold timeout")
            total += len(seq.held)
        while total > self._max_held_total:
            state = max(self._states.values(), key=lambda s: len(s.seq.held))
            before = len(state.seq.held)
            symbol, stream = state.key
            self.context.counters.incr("hold_cap_releases", symbol, stream)
            self._give_up(symbol, stream, state, "hold limit reached")
            total -= before - len(state.seq.held)

    def _publish(self, now: float | None = None) -> None:
        """Refresh the per-stream hold gauges (written only when they change)."""
        now = time.monotonic() if now is None else now
        counters = self.context.counters
        held_name = f"{self._counter_prefix}_held"
        for (symbol, stream), state in self._states.items():
            seq = state.seq
            n = len(seq.held)
            ms = int(seq.held_age(now) * 1000) if n else 0
            if n != state.held_n:
                state.held_n = n
                counters.set(held_name, n, symbol, stream)
            if ms != state.held_for_ms:
                state.held_for_ms = ms
                counters.set("held_for_ms", ms, symbol, stream)
        waiting = len(self._ready) + len(self._pending)
        counters.set(f"{self._counter_prefix}_fills_waiting", waiting)

    async def _shutdown(self) -> None:
        """Try a last fill of every open gap within ``shutdown_fill``, then write what is
        still held, with an ``unfillable`` marker (reason ``shutdown``) per remaining hole."""
        todo = [s for s in self._states.values() if s.seq.gap() is not None]
        if todo and self._backfill and self._shutdown_fill > 0:
            with anyio.move_on_after(self._shutdown_fill):
                limiter = anyio.CapacityLimiter(max(1, self._workers))
                async with anyio.create_task_group() as tg:
                    for state in todo:
                        tg.start_soon(self._last_fill, state, limiter)
        for (symbol, stream), state in self._states.items():
            seq = state.seq
            if not seq.held:
                continue
            self.context.counters.incr("held_released_at_stop", symbol, stream, len(seq.held))
            while seq.gap() is not None:
                self._give_up(symbol, stream, state, "shutdown")
        self._publish()

    async def _last_fill(self, state: _SymbolState, limiter: anyio.CapacityLimiter) -> None:
        symbol, stream = state.key
        seq = state.seq
        while seq.gap() is not None:
            before = (seq.last, len(seq.held))
            try:
                async with limiter:
                    await self._fill_once(symbol, stream, state)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception:
                self.context.counters.incr("backfill_errors", symbol, stream)
                return
            if (seq.last, len(seq.held)) == before:
                return  # no progress: leave it to the release

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
    gap_grace: Duration = "500ms"
    #: Live trades held per symbol while a gap is filled; beyond it the gap is given up.
    max_held: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 200_000
    #: Live trades held by all symbols of the stream together; beyond it the largest
    #: holds are given up (bounds the worker's memory when many symbols wait at once).
    max_held_total: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 500_000
    #: Longest a trade waits above an unfilled gap; then the gap is given up (reported
    #: as ``unfillable``, reason ``hold timeout``) and the held trades are written.
    max_hold: Duration = "30s"
    #: Gap fills in flight at once (each covers the holes within one REST page).
    fill_concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    #: At shutdown, time allowed for a last fill of open gaps before what is held is
    #: written with ``unfillable`` markers (reason ``shutdown``); "0s" skips the fill.
    shutdown_fill: Duration = "5s"

    def __post_init__(self) -> None:
        check_duration("gap_grace", self.gap_grace)
        check_duration("max_hold", self.max_hold, positive=True)
        check_duration("shutdown_fill", self.shutdown_fill)
        for name, low, high in (
            ("max_held", 1, 100_000_000),
            ("max_held_total", 1, 1_000_000_000),
            ("fill_concurrency", 1, 64),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name}: must be between {low} and {high}, got {value}")


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
    #: ``aggTrades?fromId=`` pages hold up to 1000 ids (Binance's maximum).
    coalesce_span: ClassVar[int | None] = 1000

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
