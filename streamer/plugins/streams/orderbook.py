"""The ``orderbook`` stream type: exact local books per symbol, top-N snapshots out.

For each symbol it buffers depth updates from the subscription on, fetches a REST snapshot
through the adapter (off the read loop, a bounded number in flight, paced by the adapter's
REST budget), bridges it and then checks continuity on every update (rules from the
adapter's :class:`SequenceRule`). A break discards only that symbol's book, emits a
``Marker(kind="resync")`` and resyncs it; other books keep running. Books are verified
periodically against a fresh snapshot at a common update id.

Output: :class:`BookSnapshot` records with the top ``levels`` levels every ``interval``
(only when the book moved since the last one), or after every applied update with
``interval: update``. The state machine lives in :mod:`._book`.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Sequence
from typing import Annotated

import anyio
import msgspec

from streamer import (
    BookSnapshot,
    DepthUpdate,
    Duration,
    Marker,
    MarkerKind,
    RateLimitedLog,
    Record,
    SequenceRule,
    StreamContext,
    StreamType,
    Subscription,
    check_duration,
    hookimpl,
    parse_duration,
)

from . import _book as B

STREAM = "orderbook"

#: Longest pause before retrying a snapshot that failed or came back too old.
_MAX_RETRY_DELAY = 30.0
#: A sequence gap this soon after a reconnect is reported as caused by it.
_RECONNECT_WINDOW = 60.0
#: How often ``updates_applied`` is published from the books' own tallies (seconds).
_PUBLISH_EVERY = 0.5
#: Each book's deep levels are re-stored compactly about this often (seconds), a slice
#: of the books at each publishing tick.
_COMPACT_EVERY = 60.0


class OrderBookOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``orderbook`` stream (the ``streams.orderbook`` config section)."""

    #: Levels per side in each output snapshot.
    levels: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 20
    #: How often to write each book: a duration (``"1s"``), or ``"update"``/``"0"`` for a
    #: snapshot after every applied update.
    interval: Duration = "1s"
    #: Depth of the REST snapshot; capped by the exchange's maximum and rounded up to a
    #: value its API accepts (Binance spot: up to 5000, USD-M: 5..1000 fixed steps).
    snapshot_limit: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000
    #: How often each book is compared with a fresh snapshot (jittered per symbol);
    #: ``"0"`` or ``"off"`` disables verification.
    verify_interval: Duration = "10m"
    #: Depth update speed requested from the adapter (``"100ms"``); empty for its default.
    #: Must equal the ``depth`` stream's speed in the same pipeline (both read one depth
    #: feed); the runtime refuses different speeds at start-up.
    speed: str = ""
    #: Updates buffered per symbol while its snapshot request is in flight; past it the
    #: oldest half is dropped (counted as ``buffer_overflows``).
    buffer_limit: Annotated[int, msgspec.Meta(ge=2, le=10_000_000)] = 5000
    #: Updates kept per symbol while its snapshot request waits in the queue (the newest
    #: ones; a snapshot taken later covers the older ones). Bounds memory when thousands
    #: of symbols wait for snapshots at start-up.
    queued_buffer_limit: Annotated[int, msgspec.Meta(ge=2, le=10_000_000)] = 100
    #: Snapshot requests in flight at once for this stream instance.
    snapshot_concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2

    def __post_init__(self) -> None:
        # The same checks as the stream's constructor, so ``config check`` reports them.
        _parse_interval(self.interval)
        _parse_verify(self.verify_interval)
        if self.levels > self.snapshot_limit:
            raise ValueError(
                f"levels: {self.levels} exceeds the snapshot depth (snapshot_limit "
                f"{self.snapshot_limit}); deeper levels would be unknown"
            )
        if self.speed:
            check_duration("speed", self.speed)


def effective_snapshot_limit(requested: int, rule: SequenceRule) -> int:
    """The snapshot depth to request: ``requested`` capped by ``rule.max_snapshot_limit``
    and rounded up to the nearest of ``rule.snapshot_limits`` (or its largest value)."""
    if requested < 1:
        raise ValueError(f"snapshot_limit must be >= 1, got {requested}")
    limit = min(requested, rule.max_snapshot_limit)
    allowed = sorted(v for v in rule.snapshot_limits if v <= rule.max_snapshot_limit)
    if not allowed:
        return limit
    for value in allowed:
        if value >= limit:
            return value
    return allowed[-1]


def _parse_interval(text: str | float) -> float:
    """Seconds between snapshots; 0.0 means after every update."""
    if isinstance(text, str) and text.strip().lower() in ("update", "0"):
        return 0.0
    if isinstance(text, int | float) and not isinstance(text, bool) and text == 0:
        return 0.0
    try:
        return parse_duration(text, positive=True)
    except ValueError as exc:
        raise ValueError(f"interval: {exc} (or 'update' for a snapshot per update)") from None


def _parse_verify(text: str | float) -> float:
    if isinstance(text, str) and text.strip().lower() in ("off", "0", "none", ""):
        return 0.0
    if isinstance(text, int | float) and not isinstance(text, bool) and text == 0:
        return 0.0
    seconds = check_duration("verify_interval", text)
    if seconds < 1:
        raise ValueError(f"verify_interval: must be at least 1s or 'off', got {text!r}")
    return seconds


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_BREAK_REASONS = {
    B.GAP: ("sequence_gaps", "sequence gap"),
    B.CROSSED: ("crossed_books", "crossed book"),
    B.MALFORMED: ("malformed_updates", "malformed update"),
    B.MISMATCH: ("verify_mismatches", "verify mismatch"),
}


class OrderBookStream(StreamType):
    """Maintains one exact local book per symbol and writes top-N snapshots.

    Counters (stream ``orderbook``, per symbol): ``updates_applied``, ``updates_dropped``
    (covered by a snapshot or already applied), ``updates_buffered``, ``resyncs``,
    ``sequence_gaps``, ``crossed_books``, ``malformed_updates``, ``verifications``,
    ``verify_mismatches``, ``verify_retries``, ``buffer_overflows``, ``buffer_restarts``,
    ``buffer_trims``, ``snapshots_fetched``, ``snapshot_refetches``, ``snapshot_errors``,
    ``bad_snapshots``, ``books_emitted``, ``reconnects``; ``unknown_symbol`` (no symbol)
    for updates of symbols this instance does not own.

    ``updates_applied`` is kept off the per-update path: each book tallies its applied
    updates in a plain int (:attr:`SyncStats.applied <._book.SyncStats>`), published into
    the counters every ``_PUBLISH_EVERY`` seconds while :meth:`run` runs, once more when it
    stops, and on :meth:`publish_counters`.
    """

    Options = OrderBookOptions
    channels = frozenset({"depth"})

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, OrderBookOptions)
        if options.levels < 1:
            raise ValueError(f"orderbook: levels must be >= 1, got {options.levels}")
        if options.snapshot_concurrency < 1:
            raise ValueError(
                f"orderbook: snapshot_concurrency must be >= 1, got {options.snapshot_concurrency}"
            )
        if options.buffer_limit < 2:
            raise ValueError(f"orderbook: buffer_limit must be >= 2, got {options.buffer_limit}")
        if options.queued_buffer_limit < 2:
            raise ValueError(
                f"orderbook: queued_buffer_limit must be >= 2, got {options.queued_buffer_limit}"
            )
        exchange = context.exchange
        try:
            self._rule: SequenceRule = exchange.sequence_rule
        except NotImplementedError:
            raise ValueError(
                f"orderbook: exchange {type(exchange).__name__} does not serve order books"
            ) from None
        self.snapshot_limit = effective_snapshot_limit(options.snapshot_limit, self._rule)
        if options.levels > self.snapshot_limit:
            raise ValueError(
                f"orderbook: levels ({options.levels}) exceeds the snapshot depth "
                f"({self.snapshot_limit}); deeper levels would be unknown"
            )
        self._levels = options.levels
        self._interval = _parse_interval(options.interval)
        self._emit_every = self._interval == 0.0
        self._verify_every = _parse_verify(options.verify_interval)
        self._exchange = getattr(exchange, "exchange", "")
        self._market = getattr(exchange, "market", "")
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger)
        self._syncs = {
            symbol: B.BookSync(
                symbol,
                self._rule,
                options.buffer_limit,
                options.queued_buffer_limit,
                depth=options.levels,
            )
            for symbol in context.symbols
        }
        for symbol in context.symbols:
            self._counters.set("book_syncing", 1, symbol, STREAM)  # until the book is live
        self._emitted: dict[str, int] = {}
        #: ``stats.applied`` of each book as last published to ``updates_applied``.
        self._published: dict[str, int] = {}
        # Pending snapshot jobs (ordered sets): syncs always go before verifications.
        self._sync_queue: dict[str, None] = {}
        self._verify_queue: dict[str, None] = {}
        self._sync_in_flight: set[str] = set()
        self._verifying_now = False
        self._retries: dict[str, int] = {}
        self._next_verify: dict[str, float] = {}
        self._reconnected_at: dict[str, float] = {}
        self._wakeup: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._rng = random.Random(zlib.crc32(f"{context.pipeline}/{STREAM}".encode()))

    # -- public API ----------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        """One depth subscription per symbol (``param`` = the ``speed`` option)."""
        speed = self.options.speed  # type: ignore[attr-defined]
        return [Subscription(symbol, "depth", speed) for symbol in self.context.symbols]

    def book(self, symbol: str) -> B.BookSync:
        """The sync state of ``symbol`` (for status and tests; do not mutate)."""
        return self._syncs[symbol]

    def on_record(self, record: Record) -> None:
        """Hot path: feed one depth update to its symbol's book."""
        if type(record) is not DepthUpdate:
            return
        sync = self._syncs.get(record.symbol)
        if sync is None:
            self._counters.incr("unknown_symbol", "", STREAM)
            return
        code = sync.feed(record)
        if code == B.APPLIED:  # counted in sync.stats.applied, published periodically
            if self._emit_every:
                self._emit(sync)
            return
        self._handle(sync, code, record)

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:
        """Note the reconnect; books resync only if their sequence actually breaks."""
        now = time.monotonic()
        for symbol in symbols:
            if symbol in self._syncs:
                self._counters.incr("reconnects", symbol, STREAM)
                self._reconnected_at[symbol] = now

    async def run(self) -> None:
        """Snapshot workers, the periodic writer and the verification scheduler."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.options.snapshot_concurrency):  # type: ignore[attr-defined]
                    tg.start_soon(self._snapshot_worker)
                if not self._emit_every:
                    tg.start_soon(self._emit_loop)
                if self._verify_every:
                    tg.start_soon(self._verify_loop)
                tg.start_soon(self._publish_loop)
        finally:
            self.publish_counters()

    def publish_counters(self) -> None:
        """Add what each book applied since the last call to ``updates_applied``."""
        published = self._published
        incr = self._counters.incr
        for symbol, sync in self._syncs.items():
            applied = sync.stats.applied
            done = published.get(symbol, 0)
            if applied != done:
                incr("updates_applied", symbol, STREAM, applied - done)
                published[symbol] = applied

    async def _publish_loop(self) -> None:
        syncs = list(self._syncs.values())
        per_tick = max(1, math.ceil(len(syncs) * _PUBLISH_EVERY / _COMPACT_EVERY))
        at = 0
        while True:
            await anyio.sleep(_PUBLISH_EVERY)
            self.publish_counters()
            for sync in syncs[at : at + per_tick]:
                sync.compact()
            at = at + per_tick if at + per_tick < len(syncs) else 0

    # -- update outcomes -----------------------------------------------------------------
    def _handle(self, sync: B.BookSync, code: int, update: DepthUpdate | None) -> None:
        symbol = sync.symbol
        incr = self._counters.incr
        if code in (B.STALE, B.COVERED):
            incr("updates_dropped", symbol, STREAM)
            return
        if code in (B.BUFFERED, B.BUFFER_RESTART, B.OVERFLOW, B.TRIMMED):
            incr("updates_buffered", symbol, STREAM)
            if code == B.OVERFLOW:
                incr("buffer_overflows", symbol, STREAM)
                self._log.warning(
                    "orderbook_overflow",
                    "%s: snapshot buffer full (%d updates); dropped the oldest half",
                    symbol,
                    self.options.buffer_limit,  # type: ignore[attr-defined]
                )
            elif code == B.BUFFER_RESTART:
                incr("buffer_restarts", symbol, STREAM)
            elif code == B.TRIMMED:
                incr("buffer_trims", symbol, STREAM)
            self._request(symbol)
            return
        if code == B.SYNCED:  # a live update bridged the snapshot
            self._retries.pop(symbol, None)
            self._on_synced(sync)
            return
        if code == B.VERIFIED:
            incr("verifications", symbol, STREAM)
            if self._emit_every:
                self._emit(sync)
            return
        if code == B.REFETCH:
            incr("snapshot_refetches", symbol, STREAM)
            self._request(symbol)
            return
        if code in B.BREAKS:  # a crossed or mismatching update was applied: in stats.applied
            self._on_break(sync, code)

    def _on_break(self, sync: B.BookSync, code: int) -> None:
        symbol = sync.symbol
        counter, reason = _BREAK_REASONS[code]
        incr = self._counters.incr
        incr(counter, symbol, STREAM)
        incr("resyncs", symbol, STREAM)
        self._counters.set("book_syncing", 1, symbol, STREAM)
        if code == B.MISMATCH:
            incr("verifications", symbol, STREAM)
        elif code == B.GAP:
            at = self._reconnected_at.pop(symbol, None)
            if at is not None and time.monotonic() - at < _RECONNECT_WINDOW:
                reason = "sequence gap after reconnect"
        self._log.warning(
            f"orderbook_{counter}", "%s: %s (%s); resyncing this book", symbol, reason, sync.detail
        )
        now = _now_ms()
        # The first update id without a correct book: after a crossed book or a failed
        # verification the book at local_id itself is wrong.
        first = sync.local_id if code in (B.CROSSED, B.MISMATCH) else sync.local_id + 1
        if code == B.MISMATCH:
            self._marker(symbol, "verify_mismatch", first, now, reason)
        self._marker(symbol, "resync", first, now, reason)
        self._emitted.pop(symbol, None)
        self._next_verify.pop(symbol, None)
        self._request(symbol)

    def _marker(self, symbol: str, kind: MarkerKind, first: int, now: int, reason: str) -> None:
        self.context.emit(
            Marker(self._exchange, self._market, symbol, STREAM, kind, first, 0, now, reason)
        )

    def _emit(self, sync: B.BookSync) -> None:
        bids, asks = sync.top(self._levels)
        self.context.emit(
            BookSnapshot(
                self._exchange,
                self._market,
                sync.symbol,
                sync.local_id,
                sync.event_time,
                sync.receive_time,
                bids,
                asks,
            )
        )
        self._emitted[sync.symbol] = sync.local_id
        self._counters.incr("books_emitted", sync.symbol, STREAM)

    # -- snapshots -----------------------------------------------------------------------
    def _request(self, symbol: str) -> None:
        """Queue a sync snapshot for ``symbol`` if it needs one and none is pending."""
        sync = self._syncs[symbol]
        if not (sync.needs_snapshot and sync.buffered):
            return  # fetched only once an update is buffered, so the snapshot can bridge
        if symbol in self._sync_queue or symbol in self._sync_in_flight:
            return
        self._sync_queue[symbol] = None
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _next_job(self) -> tuple[str, bool]:
        while True:
            if self._sync_queue:
                symbol = next(iter(self._sync_queue))
                del self._sync_queue[symbol]
                return symbol, False
            # One verification at a time: with many symbols they would otherwise take the
            # whole REST budget; syncs (and other REST users) only ever wait behind one.
            if self._verify_queue and not self._verifying_now:
                symbol = next(iter(self._verify_queue))
                del self._verify_queue[symbol]
                return symbol, True
            if self._wakeup is None or self._wakeup.is_set():
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    async def _snapshot_worker(self) -> None:
        exchange = self.context.exchange
        while True:
            symbol, verify = await self._next_job()
            sync = self._syncs[symbol]
            if verify and not sync.live:
                continue
            if not verify:
                if not sync.needs_snapshot:
                    continue
                self._sync_in_flight.add(symbol)
                sync.fetching = True  # from now on every update may be needed
            else:
                self._verifying_now = True
            try:
                snapshot = await exchange.fetch_book_snapshot(symbol, self.snapshot_limit)
            except Exception as exc:
                self._counters.incr("snapshot_errors", symbol, STREAM)
                self._log.warning(
                    "orderbook_snapshot_error", "%s: snapshot request failed: %r", symbol, exc
                )
                self._sync_in_flight.discard(symbol)
                if verify:
                    self._schedule_verify(symbol, retry=True)
                else:
                    self._retry_later(symbol)
                continue
            finally:
                if verify:
                    self._verifying_now = False
                    self._wake()
                else:
                    sync.fetching = False
            self._sync_in_flight.discard(symbol)
            self._counters.incr("snapshots_fetched", symbol, STREAM)
            if verify:
                self._on_verify_snapshot(sync, snapshot)
            else:
                self._on_sync_snapshot(sync, snapshot)

    def _on_sync_snapshot(self, sync: B.BookSync, snapshot: BookSnapshot) -> None:
        symbol = sync.symbol
        stats = sync.stats
        dropped = stats.covered + stats.stale
        code = sync.on_snapshot(snapshot)
        # The buffered updates dropped inside on_snapshot (applied ones are in stats.applied).
        dropped = stats.covered + stats.stale - dropped
        if dropped:
            self._counters.incr("updates_dropped", symbol, STREAM, dropped)
        if code in (B.SYNCED, B.BRIDGING_WAIT, B.IGNORED):
            self._retries.pop(symbol, None)
            if code == B.SYNCED:
                self._on_synced(sync)
            return
        if code == B.REFETCH:
            self._counters.incr("snapshot_refetches", symbol, STREAM)
            self._retry_later(symbol)
        elif code == B.BAD_SNAPSHOT:
            self._counters.incr("bad_snapshots", symbol, STREAM)
            self._log.warning("orderbook_bad_snapshot", "%s: %s; refetching", symbol, sync.detail)
            self._retry_later(symbol)
        elif code in B.BREAKS:
            self._on_break(sync, code)

    def _on_synced(self, sync: B.BookSync) -> None:
        """The book just went live (from a snapshot or a bridging update)."""
        self._counters.set("book_syncing", 0, sync.symbol, STREAM)
        if self._emit_every:
            self._emit(sync)
        self._schedule_verify(sync.symbol)

    def _retry_later(self, symbol: str) -> None:
        attempt = self._retries.get(symbol, 0)
        self._retries[symbol] = attempt + 1
        delay = min(_MAX_RETRY_DELAY, 0.25 * 2**attempt)
        if self._tg is None:
            self._request(symbol)
        else:
            self._tg.start_soon(self._request_after, symbol, delay)

    async def _request_after(self, symbol: str, delay: float) -> None:
        await anyio.sleep(delay)
        self._request(symbol)

    # -- verification --------------------------------------------------------------------
    def _schedule_verify(self, symbol: str, retry: bool = False) -> None:
        if not self._verify_every:
            return
        every = self._verify_every
        # Jitter spreads the fetches of books that synced together; a retry comes sooner.
        span = self._rng.uniform(0.05, 0.15) if retry else self._rng.uniform(0.5, 1.5)
        # time.monotonic, not anyio.current_time: this also runs from on_record, which
        # may be called outside any task.
        self._next_verify[symbol] = time.monotonic() + every * span

    async def _verify_loop(self) -> None:
        tick = min(1.0, self._verify_every / 4)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for symbol, due in list(self._next_verify.items()):
                sync = self._syncs[symbol]
                if now < due or not sync.live or sync.verifying:
                    continue
                del self._next_verify[symbol]
                self._verify_queue[symbol] = None
                self._wake()

    def _on_verify_snapshot(self, sync: B.BookSync, snapshot: BookSnapshot) -> None:
        symbol = sync.symbol
        code = sync.begin_verify(snapshot)
        if code == B.VERIFIED:
            self._counters.incr("verifications", symbol, STREAM)
            self._schedule_verify(symbol)
        elif code == B.VERIFY_PENDING:
            self._schedule_verify(symbol)  # the next one waits until this one is done
        elif code == B.VERIFY_STALE:
            self._counters.incr("verify_retries", symbol, STREAM)
            self._schedule_verify(symbol, retry=True)
        elif code == B.BAD_SNAPSHOT:
            self._counters.incr("bad_snapshots", symbol, STREAM)
            self._log.warning("orderbook_bad_snapshot", "%s: %s", symbol, sync.detail)
            self._schedule_verify(symbol, retry=True)
        elif code == B.MISMATCH:
            self._on_break(sync, code)

    # -- periodic output -----------------------------------------------------------------
    async def _emit_loop(self) -> None:
        interval = self._interval
        next_at = anyio.current_time() + interval
        while True:
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            next_at += interval
            self.flush()

    def flush(self) -> int:
        """Write a snapshot of every live book that moved since its last one; returns how many."""
        emitted = self._emitted
        n = 0
        for symbol, sync in self._syncs.items():
            if sync.live and emitted.get(symbol) != sync.local_id:
                self._emit(sync)
                n += 1
        return n


@hookimpl
def register_streams(register) -> None:  # type: ignore[no-untyped-def]
    """Register the ``orderbook`` stream type."""
    register(STREAM, OrderBookStream)


__all__ = ["STREAM", "OrderBookOptions", "OrderBookStream", "effective_snapshot_limit"]
