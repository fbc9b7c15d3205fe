"""Local order books and the per-symbol sync state machine behind the ``orderbook`` stream.

Exchange-neutral: everything exchange-specific comes in through a :class:`SequenceRule`
(``style="spot"`` or ``"futures"``, see ``binance-protocol.md`` §4) and through the
normalised ``first/last/prev_update_id`` fields of :class:`DepthUpdate`.

Data structure. Each side keeps ``dict[float key -> (price, qty)]`` with the exchange's exact
strings, plus a list of the float keys kept sorted so that the best level is *last* (bids
key = price, asks key = -price). Most changes happen near the top of the book, so
``bisect.insort``/``del`` move only the few elements after the insertion point, and the top N
levels are one reversed slice: no sort per snapshot.

Sync. :class:`BookSync` is a small state machine, one per symbol:

* ``WAITING``: no book. Updates are buffered as a contiguous chain (a break in the chain
  restarts the buffer at the breaking update). Until the snapshot request is actually
  in flight (:attr:`BookSync.fetching`) only the newest ``recent_limit`` updates are kept:
  a snapshot taken later covers older ones anyway, and thousands of symbols queued for
  snapshots at start-up must not hold minutes of updates each. In flight, up to
  ``buffer_limit`` are kept; past that the oldest half is dropped (an overflow).
* ``BRIDGING``: a REST snapshot was applied; updates it covers are dropped; the first update
  that reaches past it must bridge it, otherwise the snapshot is too old (refetch).
* ``LIVE``: every update must continue the previous one; anything else discards this book
  only (the caller resyncs it).

Methods return small integer codes (module constants) so the hot path allocates nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence

from streamer import BookSnapshot, DepthUpdate, Level, SequenceRule

# -- result codes ------------------------------------------------------------------------
#: The update was applied to the live book.
APPLIED = 0
#: The update was buffered while waiting for a snapshot.
BUFFERED = 1
#: The update was buffered, but it did not continue the buffer: the buffer restarted with it.
BUFFER_RESTART = 2
#: The update was buffered and the buffer overflowed while a snapshot request was in
#: flight: its oldest half was dropped.
OVERFLOW = 3
#: Ignored: already applied (a duplicate or an older update, ``u <= local``).
STALE = 4
#: Dropped: covered by the snapshot (``u <= L`` spot, ``u < L`` futures).
COVERED = 5
#: The snapshot is older than the buffered updates: fetch another one (buffer kept).
REFETCH = 6
#: The book just went live: the snapshot was bridged (from ``on_snapshot``, or from
#: ``feed`` when that update was the bridging one and was applied).
SYNCED = 7
#: The snapshot was applied; waiting for the update that bridges it.
BRIDGING_WAIT = 8
#: Sequence break: the book was discarded (the breaking update starts the new buffer).
GAP = 9
#: The book became crossed (best bid >= best ask): discarded.
CROSSED = 10
#: An update or snapshot carried an unusable level or sequence field: book discarded.
MALFORMED = 11
#: Ignored: a snapshot arrived for a book that does not need one.
IGNORED = 12
#: Verification: the book matched the fresh snapshot at a common update id.
VERIFIED = 13
#: Verification: the book differed from the fresh snapshot: discarded.
MISMATCH = 14
#: Verification: the fresh snapshot is held until the live book reaches its update id.
VERIFY_PENDING = 15
#: Verification: the fresh snapshot is older than the live book; try again later.
VERIFY_STALE = 16
#: The REST snapshot itself is unusable (bad level or crossed): fetch another one.
BAD_SNAPSHOT = 17
#: The update was buffered; no snapshot request was in flight, so only the most recent
#: updates are kept and the oldest ones were trimmed (normal while queued).
TRIMMED = 18

#: Codes after which the book was discarded and a new snapshot is needed.
BREAKS = frozenset({GAP, CROSSED, MALFORMED, MISMATCH})

# -- states ------------------------------------------------------------------------------
WAITING = 0
BRIDGING = 1
LIVE = 2

_INF = math.inf
#: Separator of a compact level string ``price|qty``.
_SEP = "|"
_join = _SEP.join
#: Levels per side read on the hot path when the caller does not say.
DEFAULT_DEPTH = 20
#: Smallest sorted window (keys) a side keeps.
_MIN_WINDOW = 64


class MalformedLevel(ValueError):
    """A price or quantity string is not a finite non-negative number (price > 0)."""


class BookSide:
    """One side of a book: exact ``(price, qty)`` strings ordered by a float key.

    ``descending=True`` for bids (best = highest price). :meth:`top` returns best first.
    ``boundary`` is the worst key known from the last REST snapshot: levels with a smaller
    key may be missing (Binance only serves the top ``limit`` levels); ``-inf`` when the
    whole side is known.

    Layout: every level sits in ``_levels`` (``key -> value``); only the best keys are kept
    sorted, in ``_top`` (ascending, best last). Invariant: every key ``>= _floor`` is in
    ``_top`` (``_floor`` is ``-inf`` while ``_top`` holds the whole side), and ``_top``
    holds at least ``depth`` keys unless it holds the whole side, so the best ``depth``
    levels and the best key are always exact. ``_top`` is trimmed back to ``_target`` keys
    when it grows past ``_hi`` and refilled from the dict when it falls under ``depth``.
    A value is the level's ``(price, qty)`` as decoded, or the compact string
    ``price + "|" + qty`` (a price cannot contain ``|``: ``float()`` refuses it) for
    snapshot levels and for levels outside the window once :meth:`compact` ran: most of
    a deep book, and cheaper to keep (one string instead of a tuple of two).
    """

    __slots__ = ("_floor", "_hi", "_levels", "_lo", "_sign", "_target", "_top", "boundary")

    def __init__(self, descending: bool, depth: int = DEFAULT_DEPTH) -> None:
        self._sign = 1.0 if descending else -1.0
        self._levels: dict[float, Level | str] = {}
        self._top: list[float] = []
        self._floor = -_INF
        self._lo = max(1, depth)
        self._target = max(4 * self._lo, _MIN_WINDOW)
        self._hi = 2 * self._target
        self.boundary = -_INF

    def __len__(self) -> int:
        return len(self._levels)

    def key(self, price: str) -> float:
        """The ordering key of ``price`` (best level has the largest key)."""
        return self._sign * float(price)

    def apply(self, levels: Iterable[Sequence[str]]) -> None:
        """Set each level to its absolute quantity; ``0`` removes it (absent: ignored).

        Raises :class:`MalformedLevel` on a non-numeric, non-finite or negative value; the
        side may then be partially updated (the caller discards the book).
        """
        book = self._levels
        top = self._top
        floor = self._floor
        sign = self._sign
        try:
            for level in levels:
                price, qty = level
                try:
                    p = float(price)
                    q = float(qty)
                except (TypeError, ValueError):
                    raise MalformedLevel(f"not a number in level {price!r} {qty!r}") from None
                if not 0.0 < p < _INF:
                    raise MalformedLevel(f"bad price {price!r}")
                k = sign * p
                if 0.0 < q < _INF:
                    # Keys below the floor are not in the sorted window: a dict write only.
                    if k >= floor and k not in book:
                        insort(top, k)
                    book[k] = level
                elif q == 0.0:
                    if book.pop(k, None) is not None and k >= floor:
                        del top[bisect_left(top, k)]
                else:  # negative, infinite or NaN
                    raise MalformedLevel(f"bad quantity {qty!r}")
        finally:
            n = len(top)
            if n > self._hi:
                del top[: n - self._target]
                self._floor = top[0]
            elif n < self._lo and floor != -_INF:
                self._refill()

    def _refill(self) -> None:
        """Rebuild ``_top`` from every level: the best ``_target`` keys (or all of them)."""
        book = self._levels
        if len(book) <= self._hi:
            self._top = sorted(book)
            self._floor = -_INF
        else:
            keys = sorted(book)
            del keys[: len(keys) - self._target]
            self._top = keys
            self._floor = keys[0]

    def load(self, levels: Iterable[Sequence[str]]) -> None:
        """Replace the side by a snapshot's levels; ``boundary`` becomes its worst key.

        Loaded levels are stored compactly (one string each): a deep book is mostly
        snapshot levels that never change.
        """
        self._levels = {}
        self._top = []
        self._floor = _INF  # nothing is sorted while loading; _refill sorts once at the end
        try:
            self.apply(levels)
        finally:
            if self._floor == _INF:
                self._refill()
        book = self._levels
        self._levels = {k: v if type(v) is str else _join(v) for k, v in book.items()}
        self.boundary = min(book) if book else _INF

    def compact(self) -> None:
        """Store every level outside the window as one compact string (rebuilds the dict,
        which also drops the room left by removed levels). Off the hot path: callers run
        it now and then, not per update."""
        floor = self._floor
        self._levels = {
            k: v if type(v) is str or k >= floor else _join(v) for k, v in self._levels.items()
        }

    def best_key(self) -> float:
        """Key of the best level (``-inf`` when the side is empty)."""
        return self._top[-1] if self._top else -_INF

    def top(self, n: int) -> list[Level]:
        """The best ``n`` levels, best first, as exact ``(price, qty)`` strings."""
        keys = self._top
        if n > len(keys) and self._floor != -_INF:
            keys = sorted(self._levels)  # deeper than the window: sort everything (rare)
        get = self._levels.__getitem__
        return [v if type(v) is tuple else _level(v) for v in map(get, keys[: -n - 1 : -1])]

    def from_key(self, lowest: float) -> list[Level]:
        """Every level with ``key >= lowest``, best first."""
        levels = self._levels
        keys = sorted(filter(lowest.__le__, levels), reverse=True)
        return [_level(levels[k]) for k in keys]

    def replace_from(self, lowest: float, other: BookSide) -> None:
        """Replace every level with ``key >= lowest`` by ``other``'s levels in that range."""
        levels = self._levels
        for k in [k for k in levels if k >= lowest]:
            del levels[k]
        for k, v in other._levels.items():
            if k >= lowest:
                levels[k] = v
        self.boundary = min(self.boundary, lowest)
        self._refill()

    def copy(self) -> BookSide:
        """An independent copy (level values are immutable, shared)."""
        out = BookSide.__new__(BookSide)
        out._sign = self._sign
        out._levels = dict(self._levels)
        out._top = list(self._top)
        out._floor = self._floor
        out._lo, out._target, out._hi = self._lo, self._target, self._hi
        out.boundary = self.boundary
        return out


def _level(value: Level | str | Sequence[str]) -> Level:
    """The ``(price, qty)`` tuple of a stored value."""
    if type(value) is str:
        price, _, qty = value.partition(_SEP)
        return (price, qty)
    price, qty = value
    return (price, qty)


class LocalBook:
    """A local order book: two :class:`BookSide` objects.

    ``depth`` is how many levels per side are read with :meth:`BookSide.top` on the hot
    path (deeper reads stay exact, they just sort the whole side).
    """

    __slots__ = ("asks", "bids")

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self.bids = BookSide(descending=True, depth=depth)
        self.asks = BookSide(descending=False, depth=depth)

    @classmethod
    def from_snapshot(cls, snapshot: BookSnapshot, depth: int = DEFAULT_DEPTH) -> LocalBook:
        """A book holding exactly ``snapshot``'s levels (raises :class:`MalformedLevel`)."""
        book = cls(depth)
        book.bids.load(snapshot.bids)
        book.asks.load(snapshot.asks)
        return book

    def apply(self, update: DepthUpdate) -> None:
        """Apply one diff event's absolute quantities (raises :class:`MalformedLevel`)."""
        self.bids.apply(update.bids)
        self.asks.apply(update.asks)

    def compact(self) -> None:
        """:meth:`BookSide.compact` both sides."""
        self.bids.compact()
        self.asks.compact()

    def crossed(self) -> bool:
        """True when best bid >= best ask (both sides non-empty)."""
        # bid key = price, ask key = -price
        bids = self.bids._top
        asks = self.asks._top
        return bool(bids) and bool(asks) and bids[-1] >= -asks[-1]


class SyncStats:
    """What one :class:`BookSync` has done since it was created (plain ints, cheap)."""

    __slots__ = (
        "applied",
        "buffer_restarts",
        "covered",
        "overflows",
        "refetches",
        "stale",
        "trimmed",
    )

    def __init__(self) -> None:
        self.applied = 0
        self.trimmed = 0
        self.covered = 0
        self.stale = 0
        self.refetches = 0
        self.overflows = 0
        self.buffer_restarts = 0


class BookSync:
    """The sync state machine of one symbol's book (see the module docstring).

    Contract:

    * :meth:`feed` takes every depth update of the symbol, in arrival order.
    * :attr:`needs_snapshot` says when the caller should fetch a REST snapshot and hand it
      to :meth:`on_snapshot`; on :data:`REFETCH` it must fetch another one.
    * A code in :data:`BREAKS` means the book was discarded and a new snapshot is needed;
      other symbols' ``BookSync`` objects are never touched.
    * :meth:`begin_verify` compares the live book with a fresh snapshot at a common update
      id; the outcome may come later, from :meth:`feed` (:data:`VERIFIED`/:data:`MISMATCH`).
    """

    __slots__ = (
        "_buffer",
        "_buffer_limit",
        "_depth",
        "_futures",
        "_recent_limit",
        "_shadow",
        "_shadow_id",
        "book",
        "detail",
        "event_time",
        "fetching",
        "local_id",
        "receive_time",
        "state",
        "stats",
        "symbol",
    )

    def __init__(
        self,
        symbol: str,
        rule: SequenceRule,
        buffer_limit: int = 5000,
        recent_limit: int | None = None,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        if buffer_limit < 2:
            raise ValueError(f"buffer_limit must be >= 2, got {buffer_limit}")
        if recent_limit is not None and recent_limit < 2:
            raise ValueError(f"recent_limit must be >= 2, got {recent_limit}")
        self.symbol = symbol
        #: Levels per side the caller reads with :meth:`top` (kept sorted; deeper is slower).
        self._depth = depth
        self._futures = rule.style == "futures"
        self._buffer_limit = buffer_limit
        self._recent_limit = min(
            buffer_limit if recent_limit is None else recent_limit, buffer_limit
        )
        #: Set by the caller while a sync snapshot request is in flight: the buffer may
        #: then grow to ``buffer_limit`` (otherwise it keeps the newest ``recent_limit``).
        self.fetching = False
        self._buffer: list[DepthUpdate] = []
        self._shadow: LocalBook | None = None
        self._shadow_id = 0
        self.book: LocalBook | None = None
        self.state = WAITING
        #: Update id the book reflects (the snapshot's ``lastUpdateId`` until bridged).
        self.local_id = 0
        #: Exchange event time and local receive time of the last applied update.
        self.event_time = 0
        self.receive_time = 0
        #: A short description of the last break or refetch, for markers and logs.
        self.detail = ""
        self.stats = SyncStats()

    # -- queries -------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """True when the book is synced and continuous."""
        return self.state == LIVE

    @property
    def needs_snapshot(self) -> bool:
        """True while there is no book (a snapshot must be fetched)."""
        return self.state == WAITING

    @property
    def buffered(self) -> int:
        """Number of updates waiting for a snapshot."""
        return len(self._buffer)

    @property
    def verifying(self) -> bool:
        """True while a verification snapshot is held."""
        return self._shadow is not None

    def compact(self) -> None:
        """Store the book's deep levels compactly (see :meth:`BookSide.compact`); cheap to
        call now and then (a pass over the levels), never needed for correctness."""
        if self.book is not None:
            self.book.compact()

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """The best ``n`` bids and asks of the live book (raises if not live)."""
        book = self.book
        if book is None or self.state != LIVE:
            raise RuntimeError(f"{self.symbol}: book is not live")
        return book.bids.top(n), book.asks.top(n)

    # -- updates -------------------------------------------------------------------------
    def feed(self, update: DepthUpdate) -> int:
        """Process one depth update; returns a result code."""
        if self.state == LIVE:
            u = update.last_update_id
            local = self.local_id
            if u <= local:
                self.stats.stale += 1
                return STALE
            if self._futures:
                pu = update.prev_update_id
                if pu != local:
                    if pu is None:
                        return self._break(MALFORMED, "futures update without prev_update_id")
                    return self._break(GAP, f"pu={pu} != last u={local}", restart=update)
            elif update.first_update_id > local + 1:
                return self._break(
                    GAP, f"U={update.first_update_id} > last u+1={local + 1}", restart=update
                )
            return self._apply(update)
        if self.state == WAITING:
            return self._buffer_update(update)
        return self._bridge(update)

    def _apply(self, update: DepthUpdate) -> int:
        book = self.book
        assert book is not None
        try:
            book.apply(update)
        except MalformedLevel as exc:
            return self._break(MALFORMED, str(exc))
        self.local_id = update.last_update_id
        self.event_time = update.event_time
        self.receive_time = update.receive_time
        self.stats.applied += 1
        if book.crossed():
            return self._break(CROSSED, f"crossed book at u={self.local_id}")
        if self._shadow is not None and update.last_update_id >= self._shadow_id:
            return self._finish_verify(update)
        return APPLIED

    def _buffer_update(self, update: DepthUpdate) -> int:
        buf = self._buffer
        code = BUFFERED
        if buf:
            last = buf[-1].last_update_id
            if update.last_update_id <= last:
                self.stats.stale += 1
                return STALE
            if self._futures:
                chained = update.prev_update_id == last
            else:
                chained = update.first_update_id <= last + 1
            if not chained:
                buf.clear()
                self.stats.buffer_restarts += 1
                code = BUFFER_RESTART
        buf.append(update)
        if self.fetching:
            if len(buf) > self._buffer_limit:
                # Drop the oldest half: the snapshot on its way is most likely newer.
                del buf[: len(buf) // 2]
                self.stats.overflows += 1
                code = OVERFLOW
        elif len(buf) > self._recent_limit:
            # Not fetching yet: the snapshot will be taken later, so old updates are useless.
            cut = len(buf) - self._recent_limit // 2
            del buf[:cut]
            self.stats.trimmed += cut
            code = TRIMMED
        return code

    def _bridge(self, update: DepthUpdate) -> int:
        snap_id = self.local_id
        u = update.last_update_id
        if u < snap_id or (u == snap_id and not self._futures):
            self.stats.covered += 1
            return COVERED
        first = update.first_update_id
        if first <= (snap_id if self._futures else snap_id + 1):
            self.state = LIVE
            code = self._apply(update)
            return SYNCED if code == APPLIED else code
        # The first update past the snapshot does not reach back to it: too old.
        self.detail = f"snapshot lastUpdateId={snap_id} older than first U={first}"
        self.book = None
        self.state = WAITING
        self._buffer = [update]
        self.stats.refetches += 1
        return REFETCH

    # -- snapshots -----------------------------------------------------------------------
    def on_snapshot(self, snapshot: BookSnapshot) -> int:
        """Apply a REST snapshot to a book that needs one; returns a result code.

        :data:`REFETCH` when it is older than the buffered updates (buffer kept),
        :data:`BAD_SNAPSHOT` when it is unusable or crossed, :data:`SYNCED` when the buffered
        updates bridged it, :data:`BRIDGING_WAIT` when no buffered update reaches past it
        yet, a code in :data:`BREAKS` when the buffered updates broke it,
        :data:`IGNORED` when the book is not waiting for a snapshot.
        """
        if self.state != WAITING:
            return IGNORED
        last = snapshot.last_update_id
        buf = self._buffer
        if buf:
            first = buf[0].first_update_id
            if first > (last if self._futures else last + 1):
                self.detail = f"snapshot lastUpdateId={last} older than first U={first}"
                self.stats.refetches += 1
                return REFETCH
        try:
            book = LocalBook.from_snapshot(snapshot, self._depth)
        except MalformedLevel as exc:
            self.detail = f"bad snapshot: {exc}"
            return BAD_SNAPSHOT
        if book.crossed():
            self.detail = f"crossed snapshot at lastUpdateId={last}"
            return BAD_SNAPSHOT
        self.book = book
        self.local_id = last
        self.state = BRIDGING
        self._buffer = []
        for i, update in enumerate(buf):
            code = self.feed(update)
            if code == REFETCH:
                # Keep the chain from the update that could not bridge the snapshot.
                self._buffer = buf[i:]
                return code
            if code in BREAKS:
                if code == GAP:
                    self._buffer = buf[i:]
                return code
        return SYNCED if self.state == LIVE else BRIDGING_WAIT

    def reset(self, detail: str = "") -> None:
        """Discard the book and any buffer (for example after a verification mismatch)."""
        self._discard()
        self._buffer = []
        self.detail = detail

    def _discard(self) -> None:
        self.book = None
        self.state = WAITING
        self._shadow = None

    def _break(self, code: int, detail: str, restart: DepthUpdate | None = None) -> int:
        self._discard()
        self.detail = detail
        # A sequence break's update is valid: it starts the chain the next snapshot bridges.
        self._buffer = [restart] if restart is not None else []
        return code

    # -- verification --------------------------------------------------------------------
    def begin_verify(self, snapshot: BookSnapshot) -> int:
        """Start comparing the live book with a fresh REST snapshot.

        Returns :data:`VERIFY_STALE` (snapshot older than the book: retry later),
        :data:`BAD_SNAPSHOT` (unusable or crossed snapshot), :data:`IGNORED` (book not
        live), :data:`VERIFIED`/:data:`MISMATCH` (compared now), or
        :data:`VERIFY_PENDING`: the snapshot is held and the outcome comes from :meth:`feed`
        once an update reaches its id (the update that reaches it is applied to both books,
        as when syncing, so both sit at that update's id when compared).
        """
        if self.state != LIVE:
            return IGNORED
        try:
            shadow = LocalBook.from_snapshot(snapshot, self._depth)
        except MalformedLevel as exc:
            self.detail = f"bad verification snapshot: {exc}"
            return BAD_SNAPSHOT
        if shadow.crossed():
            self.detail = f"crossed verification snapshot at {snapshot.last_update_id}"
            return BAD_SNAPSHOT
        if snapshot.last_update_id < self.local_id:
            return VERIFY_STALE
        self._shadow = shadow
        self._shadow_id = snapshot.last_update_id
        if snapshot.last_update_id == self.local_id:
            return self._compare()
        return VERIFY_PENDING

    def _finish_verify(self, update: DepthUpdate) -> int:
        shadow = self._shadow
        assert shadow is not None
        try:
            shadow.apply(update)
        except MalformedLevel:  # cannot happen: the same update just applied to the book
            self._shadow = None
            return APPLIED
        return self._compare()

    def _compare(self) -> int:
        book = self.book
        shadow = self._shadow
        assert book is not None and shadow is not None
        self._shadow = None
        for name, mine, fresh in (("bid", book.bids, shadow.bids), ("ask", book.asks, shadow.asks)):
            # Only the range both books know for sure: levels beyond a snapshot are unknown.
            lowest = max(mine.boundary, fresh.boundary)
            ours = mine.from_key(lowest)
            theirs = fresh.from_key(lowest)
            if ours != theirs:
                self.detail = _describe_mismatch(name, ours, theirs, self.local_id)
                self._discard()
                self._buffer = []
                return MISMATCH
        # The fresh snapshot is the truth within its range: refresh the deep levels it knows.
        book.bids.replace_from(shadow.bids.boundary, shadow.bids)
        book.asks.replace_from(shadow.asks.boundary, shadow.asks)
        return VERIFIED


def _describe_mismatch(side: str, ours: list[Level], theirs: list[Level], at: int) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return f"{side} level {i} at u={at}: local {a[0]} x {a[1]}, snapshot {b[0]} x {b[1]}"
    return f"{side} side at u={at}: local has {len(ours)} levels, snapshot {len(theirs)}"
