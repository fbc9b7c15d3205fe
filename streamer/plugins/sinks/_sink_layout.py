"""What the file sinks (``csv``, ``parquet``) share: record kinds, column names, the periods
that name files, safe path components, and the grouping of a batch by output file.

Pure: no file I/O, no third-party import (the ``parquet`` sink's module imports it without
pyarrow being installed). Column names are the data.binance.vision ones, the same in every
format, so a CSV and a Parquet file of one stream have the same columns.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence

from streamer import (
    AGGTRADE_STREAM,
    DEPTH_STREAM,
    ORDERBOOK_STREAM,
    BookSnapshot,
    DepthUpdate,
    Kline,
    Marker,
    Trade,
    kline_stream,
)

#: Record kinds; the kinds of trades, depth updates and books are their output stream names.
AGGTRADE, DEPTH, ORDERBOOK = AGGTRADE_STREAM, DEPTH_STREAM, ORDERBOOK_STREAM
KLINE, MARKERS = "kline", "markers"

AGGTRADE_COLUMNS = (
    "agg_trade_id",
    "price",
    "quantity",
    "first_trade_id",
    "last_trade_id",
    "transact_time",
    "is_buyer_maker",
)
KLINE_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "event_time",
    "receive_time",
)
DEPTH_COLUMNS = (
    "event_time",
    "transact_time",
    "first_update_id",
    "last_update_id",
    "prev_update_id",
    "side",
    "price",
    "quantity",
    "receive_time",
)
BOOK_PREFIX_COLUMNS = ("last_update_id", "event_time", "receive_time")
MARKER_COLUMNS = ("time", "stream", "kind", "first_key", "last_key", "reason")

#: Column holding the resume key of each kind (aggTrade id, kline open time, update id).
KEY_COLUMN = {AGGTRADE: 0, KLINE: 0, ORDERBOOK: 0, DEPTH: 3}

_MS_PER_DAY = 86_400_000
_MS_PER_HOUR = 3_600_000
#: Times above this are microseconds (spot ``timeUnit=MICROSECOND``), not milliseconds:
#: 1e14 ms is the year 5138.
_MICROS_THRESHOLD = 100_000_000_000_000

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class InvalidComponent(ValueError):
    """A record field that would become a path component is unsafe (traversal, separator...)."""


def check_component(what: str, value: str) -> str:
    """Return ``value`` when it is a safe single path component, else raise.

    Safe: 1-64 characters of ``A-Z a-z 0-9 _ . -`` starting with a letter or digit, so
    ``..``, ``/``, ``\\``, empty strings and hidden names can never become part of a path.
    """
    if not isinstance(value, str) or _COMPONENT.fullmatch(value) is None:
        raise InvalidComponent(
            f"invalid {what} {value!r}: a path component must be 1-64 characters of "
            "A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return value


def check_tree_path(path: str) -> None:
    """Raise ``ValueError`` (one line) when the tree root ``path`` is not a directory or
    cannot be written or created; looks only, creates nothing (``Sink.check``)."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if os.path.islink(probe) and not os.path.exists(probe):
        raise ValueError(f"path {path}: {probe} is a broken symbolic link")
    if not os.path.isdir(probe):
        where = "" if probe == path else f": {probe}"
        raise ValueError(f"path {path}{where} is not a directory")
    verb = "cannot be written" if probe == path else f"cannot be created in {probe}"
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise ValueError(f"path {path} {verb}: read-only file system")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"path {path} {verb}: permission denied")


def aggtrade_columns(market: str) -> tuple[str, ...]:
    """aggTrades columns; ``is_best_match`` exists only on spot (as on data.binance.vision)."""
    best = ("is_best_match",) if market == "spot" else ()
    return (*AGGTRADE_COLUMNS, *best, "event_time", "receive_time")


def ms_time(t: int) -> int:
    """``t`` in milliseconds, converting microsecond timestamps."""
    return t // 1000 if t >= _MICROS_THRESHOLD else t


class PeriodNamer:
    """Maps millisecond times to rotation periods and their file-name labels (UTC)."""

    __slots__ = ("_labels", "hourly", "span")

    def __init__(self, hourly: bool) -> None:
        self.hourly = hourly
        self.span = _MS_PER_HOUR if hourly else _MS_PER_DAY
        self._labels: dict[int, str] = {}

    def label(self, period: int) -> str:
        """``YYYY-MM-DD`` (daily) or ``YYYY-MM-DD-HH`` (hourly) for a period number."""
        label = self._labels.get(period)
        if label is None:
            tm = time.gmtime(period * self.span // 1000)
            label = time.strftime("%Y-%m-%d-%H" if self.hourly else "%Y-%m-%d", tm)
            self._labels[period] = label
        return label


def stream_name(kind: str, interval: str) -> str:
    """Output stream name used in StreamKey and Marker: ``aggtrade``, ``kline_1m``..."""
    return kline_stream(interval) if kind == KLINE else kind


def depth_rows(record: DepthUpdate) -> int:
    """Rows a depth event becomes: one per level, or one empty-level row for an empty event."""
    return len(record.bids) + len(record.asks) or 1


#: Where a record goes: ``(kind, exchange, market, symbol, interval, period)``.
FileTarget = tuple[str, str, str, str, str, int]


def group_by_file(
    batch: Sequence, span: int, place: Callable[[object], tuple[str, int, str] | None]
) -> tuple[dict[FileTarget, list], list]:
    """Records of ``batch`` grouped by the file they go to, in batch order, and the records
    ``place`` declined. Trades are placed here, a run of one symbol's trades in one period
    without a lookup per record (the common case); ``place(record)`` gives any other
    record's ``(kind, time, interval)``, or ``None`` to hand it back."""
    groups: dict[FileTarget, list] = {}
    rest: list = []
    run: list | None = None
    run_symbol = run_market = run_exchange = ""
    run_period = -1
    for r in batch:
        if r.__class__ is Trade:
            t = r.transact_time
            if t >= _MICROS_THRESHOLD:
                t //= 1000
            period = t // span
            if (
                run is not None
                and period == run_period
                and r.symbol == run_symbol
                and r.market == run_market
                and r.exchange == run_exchange
            ):
                run.append(r)
                continue
            run_symbol, run_market, run_exchange = r.symbol, r.market, r.exchange
            run_period = period
            target = (AGGTRADE, run_exchange, run_market, run_symbol, "", period)
            run = groups.get(target)
            if run is None:
                run = groups[target] = []
            run.append(r)
            continue
        placed = place(r)
        if placed is None:
            rest.append(r)
            continue
        kind, t, interval = placed
        if t >= _MICROS_THRESHOLD:
            t //= 1000
        target = (kind, r.exchange, r.market, r.symbol, interval, t // span)
        group = groups.get(target)
        if group is None:
            groups[target] = [r]
        else:
            group.append(r)
    return groups, rest


def group_records(batch: Sequence, span: int) -> tuple[dict[FileTarget, list], int, int]:
    """:func:`group_by_file` with a file sink's placement of every record: trades, depth,
    order books and markers by their time (a marker without one: now), closed klines by
    their open time. Also returns how many records have no file: unclosed klines, and
    records of an unknown type."""
    now_ms = 0

    def place(r) -> tuple[str, int, str] | None:
        nonlocal now_ms
        cls = r.__class__
        if cls is DepthUpdate:
            return DEPTH, r.event_time, ""
        if cls is BookSnapshot:
            return ORDERBOOK, r.event_time or r.receive_time, ""
        if cls is Kline:
            return (KLINE, r.open_time, r.interval) if r.closed else None
        if cls is Marker:
            if not r.time:
                now_ms = now_ms or time.time_ns() // 1_000_000
            return MARKERS, r.time or now_ms, ""
        return None

    groups, rest = group_by_file(batch, span, place)
    unclosed = sum(1 for r in rest if r.__class__ is Kline)
    return groups, unclosed, len(rest) - unclosed


def folders_in(path: str) -> list[str]:
    """The sorted names of the folders in ``path`` (none when it cannot be listed)."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def files_in(path: str) -> list[str]:
    """The names of the files in ``path`` (none when it cannot be listed)."""
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if e.is_file(follow_symlinks=False)]
    except OSError:
        return []
