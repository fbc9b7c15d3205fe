"""Reference copy of the order book as it was before issue 12 (commit 1f95b94).

``BookSide``/``LocalBook`` below are today's engine verbatim (a float-keyed dict plus a
sorted list of every key), kept so that the randomized differential tests in
``test_orderbook_diff.py`` can compare the faster book against it after every event.
Do not optimise this file: its only job is to stay the old behaviour.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence

from streamer import BookSnapshot, DepthUpdate, Level
from streamer.plugins.streams._book import MalformedLevel

_INF = math.inf


class BookSide:
    """One side of a book: exact ``(price, qty)`` strings ordered by a float key.

    ``descending=True`` for bids (best = highest price). :meth:`top` returns best first.
    ``boundary`` is the worst key known from the last REST snapshot: levels with a smaller
    key may be missing (Binance only serves the top ``limit`` levels); ``-inf`` when the
    whole side is known.
    """

    __slots__ = ("_keys", "_levels", "_sign", "boundary")

    def __init__(self, descending: bool) -> None:
        self._sign = 1.0 if descending else -1.0
        self._levels: dict[float, Level] = {}
        self._keys: list[float] = []
        self.boundary = -_INF

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, price: str) -> float:
        """The ordering key of ``price`` (best level has the largest key)."""
        return self._sign * float(price)

    def apply(self, levels: Iterable[Sequence[str]]) -> None:
        """Set each level to its absolute quantity; ``0`` removes it (absent: ignored).

        Raises :class:`MalformedLevel` on a non-numeric, non-finite or negative value; the
        side may then be partially updated (the caller discards the book).
        """
        book = self._levels
        keys = self._keys
        sign = self._sign
        for price, qty in levels:
            try:
                p = float(price)
                q = float(qty)
            except (TypeError, ValueError):
                raise MalformedLevel(f"not a number in level {price!r} {qty!r}") from None
            if not 0.0 < p < _INF:
                raise MalformedLevel(f"bad price {price!r}")
            k = sign * p
            if q > 0.0:
                if q == _INF:
                    raise MalformedLevel(f"bad quantity {qty!r}")
                if k not in book:
                    insort(keys, k)
                book[k] = (price, qty)
            elif q == 0.0:
                if book.pop(k, None) is not None:
                    del keys[bisect_left(keys, k)]
            else:  # negative or NaN
                raise MalformedLevel(f"bad quantity {qty!r}")

    def load(self, levels: Iterable[Sequence[str]]) -> None:
        """Replace the side by a snapshot's levels; ``boundary`` becomes its worst key."""
        self._levels = {}
        self._keys = []
        self.apply(levels)
        self.boundary = self._keys[0] if self._keys else _INF

    def best_key(self) -> float:
        """Key of the best level (``-inf`` when the side is empty)."""
        return self._keys[-1] if self._keys else -_INF

    def top(self, n: int) -> list[Level]:
        """The best ``n`` levels, best first, as exact ``(price, qty)`` strings."""
        levels = self._levels
        return [levels[k] for k in self._keys[: -n - 1 : -1]]

    def from_key(self, lowest: float) -> list[Level]:
        """Every level with ``key >= lowest``, best first."""
        keys = self._keys
        start = bisect_left(keys, lowest)
        levels = self._levels
        return [levels[k] for k in reversed(keys[start:])]

    def replace_from(self, lowest: float, other: BookSide) -> None:
        """Replace every level with ``key >= lowest`` by ``other``'s levels in that range."""
        keys = self._keys
        start = bisect_left(keys, lowest)
        for k in keys[start:]:
            del self._levels[k]
        del keys[start:]
        okeys = other._keys
        ostart = bisect_left(okeys, lowest)
        for k in okeys[ostart:]:
            self._levels[k] = other._levels[k]
        keys.extend(okeys[ostart:])  # every new key is >= lowest > every kept key
        self.boundary = min(self.boundary, lowest)

    def copy(self) -> BookSide:
        """An independent copy (levels are immutable tuples, shared)."""
        out = BookSide.__new__(BookSide)
        out._sign = self._sign
        out._levels = dict(self._levels)
        out._keys = list(self._keys)
        out.boundary = self.boundary
        return out


class LocalBook:
    """A local order book: two :class:`BookSide` objects."""

    __slots__ = ("asks", "bids")

    def __init__(self) -> None:
        self.bids = BookSide(descending=True)
        self.asks = BookSide(descending=False)

    @classmethod
    def from_snapshot(cls, snapshot: BookSnapshot) -> LocalBook:
        """A book holding exactly ``snapshot``'s levels (raises :class:`MalformedLevel`)."""
        book = cls()
        book.bids.load(snapshot.bids)
        book.asks.load(snapshot.asks)
        return book

    def apply(self, update: DepthUpdate) -> None:
        """Apply one diff event's absolute quantities (raises :class:`MalformedLevel`)."""
        self.bids.apply(update.bids)
        self.asks.apply(update.asks)

    def crossed(self) -> bool:
        """True when best bid >= best ask (both sides non-empty)."""
        # bid key = price, ask key = -price
        bids = self.bids._keys
        asks = self.asks._keys
        return bool(bids) and bool(asks) and bids[-1] >= -asks[-1]
