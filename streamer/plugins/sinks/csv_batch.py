"""The ``csv`` sink: fast, crash-safe CSV files in the data.binance.vision layout.

Layout under ``Options.path`` (``<label>`` is ``YYYY-MM-DD``, or ``YYYY-MM-DD-HH`` with
hourly rotation, from the record's exchange time in UTC)::

    <exchange>/<market>/aggTrades/<SYMBOL>/<SYMBOL>-aggTrades-<label>.csv
    <exchange>/<market>/klines/<SYMBOL>/<interval>/<SYMBOL>-<interval>-<label>.csv
    <exchange>/<market>/depth/<SYMBOL>/<SYMBOL>-depth-<label>.csv
    <exchange>/<market>/orderbook/<SYMBOL>/<SYMBOL>-orderbook-<label>.csv
    <exchange>/<market>/markers/<SYMBOL>/<SYMBOL>-markers-<label>.csv

(``.csv.gz`` with ``gzip: true``). Columns are documented in the README (``Output files``).

Rows of trades, depth updates and closed klines are built in the collector workers by the
sink's encoder (:class:`._csv_encoder.CsvEncoder`) and arrive as ready bytes per file
(:meth:`CsvSink.write_chunks`); everything else, and every record given to
:meth:`CsvSink.write`, is encoded here. Both paths produce the same bytes.

How it writes: :meth:`CsvSink.write` routes each record to its file, drops what it already
holds (keys must grow per stream), encodes rows by joining the exchange's exact strings
and appends them to that file's pending buffer. :meth:`CsvSink.flush` (also run from
``write`` every ``flush_interval`` or ``flush_rows``) issues one ``write`` per file, or
one gzip member per file. A failed write is undone (truncated back), its rows stay
pending and are retried on the next flush; rows beyond ``max_buffered_rows`` are dropped,
counted, and reported as a ``gap`` marker once writing works again.

One writer per directory tree: :meth:`CsvSink.claims` names ``path``, so the runtime locks
it (``.streamer.lock`` inside) and refuses a second collector or a second sink on it;
:meth:`CsvSink.check` refuses a path that is a file or cannot be written before anything
starts. A folder deleted while running is created again on the next flush
(``dirs_recreated``). Rows still unwritten at close are reported as ``gap`` markers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import msgspec

from streamer import (
    KLINE_STREAM_PREFIX,
    BookSnapshot,
    Chunk,
    Duration,
    Marker,
    Progress,
    RateLimitedLog,
    Record,
    Sink,
    SinkContext,
    StreamFacts,
    StreamKey,
    check_duration,
    hookimpl,
    parse_duration,
    record_key,
    record_time,
)

from . import _csv_files as files
from . import _csv_layout as layout
from ._csv_encoder import CsvEncoder
from ._sink_layout import check_tree_path

__all__ = ["CsvSink", "Options"]


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``csv`` sink (the ``sinks.<name>`` section of the YAML config)."""

    #: Root directory of the tree (created if missing).
    path: str
    #: New file per UTC day, or per UTC hour (``-HH`` appended to the date).
    rotation: Literal["daily", "hourly"] = "daily"
    #: ``write`` flushes when the last flush is older than this (``"1s"``, ``"250ms"``, 2.5).
    flush_interval: Duration = "1s"
    #: ``write`` also flushes once this many rows are pending.
    flush_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 100_000
    #: Write ``.csv.gz`` files, one gzip member per flush.
    gzip: bool = False
    #: zlib level for gzip members (1 fastest .. 9 smallest).
    gzip_level: Annotated[int, msgspec.Meta(ge=1, le=9)] = 6
    #: ``never``; ``flush``: fsync every file written at each flush; ``rotation``: fsync a
    #: file when the stream moves to the next period and at close.
    fsync: Literal["never", "flush", "rotation"] = "rotation"
    #: Open file descriptors kept at most (least recently used are closed first).
    max_open_files: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 256
    #: Rows kept for retry while writes fail; beyond it rows are dropped and reported.
    max_buffered_rows: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 1_000_000
    #: ... and at most this many megabytes of encoded rows (order-book rows are large).
    max_buffered_mb: Annotated[int, msgspec.Meta(ge=1, le=1_048_576)] = 256
    #: Levels per side in orderbook files; default: the depth of a new file's first snapshot.
    book_levels: Annotated[int, msgspec.Meta(ge=1, le=5000)] | None = None

    def __post_init__(self) -> None:
        # Range checks are the ``Meta`` above (``config check`` reports them with the path);
        # these also hold for Options built in code.
        if not self.path:
            raise ValueError("path: must not be empty")
        check_duration("flush_interval", self.flush_interval, positive=True)
        for name in ("flush_rows", "max_open_files", "max_buffered_rows", "max_buffered_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.flush_rows > self.max_buffered_rows:
            raise ValueError("flush_rows: must not exceed max_buffered_rows")
        if not 1 <= self.gzip_level <= 9:
            raise ValueError(f"gzip_level: must be between 1 and 9, got {self.gzip_level}")
        if self.book_levels is not None and self.book_levels < 1:
            raise ValueError(f"book_levels: must be at least 1, got {self.book_levels}")


# A target file: (kind, exchange, market, symbol, interval, period number).
_Target = tuple[str, str, str, str, str, int]

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _reason(exc: OSError) -> str:
    if exc.errno in _DISK_FULL:
        return "disk full"
    if exc.errno in _DENIED:
        return "permission denied"
    return f"write error: {exc.strerror or exc}"


class _File:
    """State of one output file: where it is, what is pending, and its descriptor."""

    __slots__ = (
        "columns",
        "commas",
        "created",
        "directory",
        "fd",
        "header",
        "identity",
        "kind",
        "levels",
        "path",
        "pending",
        "pending_bytes",
        "pending_first",
        "pending_key",
        "pending_rows",
        "retired",
        "size",
        "stream",
        "symbol",
        "target",
        "unconfirmed",
    )

    def __init__(self, target: _Target, directory: str, path: str) -> None:
        self.target = target
        self.kind = target[0]
        self.symbol = target[3]
        self.directory = directory
        self.path = path
        self.columns: tuple[str, ...] = ()
        self.header = b""
        self.commas = 0
        self.levels: int | None = None
        self.stream: StreamKey | None = None
        self.fd: int | None = None
        #: (st_dev, st_ino) of the file we wrote; None until opened.
        self.identity: tuple[int, int] | None = None
        self.size = 0
        self.created = False
        self.pending: list[bytes] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.pending_key: int | None = None
        #: Key and time of the first pending record (the start of a range lost at close).
        self.pending_first: tuple[int, int] | None = None
        self.retired = False
        #: File size before a failed write that could not be cut back (see ``_reconcile``).
        self.unconfirmed: int | None = None

    def set_columns(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.header = layout.header_line(columns)
        self.commas = len(columns) - 1


class _Drop:
    """Rows of one stream dropped while the disk failed, reported later as a gap marker."""

    __slots__ = ("first_key", "last_key", "reason", "rows", "time")

    def __init__(self, first_key: int, time_ms: int, reason: str) -> None:
        self.first_key = first_key
        self.last_key = first_key
        self.time = time_ms
        self.reason = reason
        self.rows = 0


class CsvSink(Sink):
    """Writes records to CSV files; see the module docstring for layout and guarantees.

    ``io`` replaces the system calls used for writing (tests inject faults with it).
    Counters (in ``context.counters``), per (symbol, stream): ``rows_written``,
    ``rows_dropped``, ``rows_duplicate``, ``write_errors``; process-wide:
    ``bytes_written``, ``file_flushes``, ``records_invalid``, ``klines_unclosed``,
    ``rows_quoted``, ``torn_repairs``, ``files_reopened``, ``files_conflict``,
    ``book_levels_truncated``, ``gap_markers``, ``fd_limit_hits``, ``fsync_errors``,
    ``rows_dropped`` (rows still unwritten at close); gauges ``rows_buffered`` (rows
    waiting for a retry after a failed write) and ``files_open``. Use ``Counters.total``
    for a sum over symbols.
    """

    Options = Options
    Encoder = CsvEncoder
    #: Files are per symbol: N writers each own their symbols' folders (``context.owns``).
    multi_writer = True

    @classmethod
    def verify(
        cls,
        path: str | os.PathLike[str],
        *,
        as_json: bool = False,
        progress: Progress | None = None,
    ) -> tuple[str, int]:
        """``streamer verify``: gaps, duplicates, chain breaks, crossed books and torn rows in
        the tree at ``path`` (see :mod:`._csv_verify`)."""
        from ._csv_verify import verify_tree  # only the verify command needs it

        return verify_tree(path, as_json=as_json, progress=progress)

    @classmethod
    def report_facts(
        cls,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        end: int | None = None,
        symbols: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[StreamFacts]:
        """``streamer report``: the facts of every stream in the tree at ``path`` (see
        :mod:`._csv_report`)."""
        from ._csv_report import report_facts  # only the report command needs it

        return report_facts(path, start=start, end=end, symbols=symbols, progress=progress)

    def __init__(
        self, options: Options, context: SinkContext, *, io: files.FileIO | None = None
    ) -> None:
        super().__init__(options, context)
        self._opts = options
        self._root = os.path.abspath(options.path)
        self._io = io or files.FileIO()
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger, interval=30.0)
        self._periods = layout.PeriodNamer(options.rotation == "hourly")
        self._flush_seconds = parse_duration(options.flush_interval)
        self._gz = options.gzip
        self._files: dict[_Target, _File] = {}
        self._open_lru: OrderedDict[_Target, _File] = OrderedDict()
        #: Files with pending rows, in the order they got them.
        self._dirty: dict[_Target, _File] = {}
        #: Newest period seen per stream folder (kind, exchange, market, symbol, interval).
        self._current: dict[tuple[str, str, str, str, str], int] = {}
        #: Last key accepted per stream (dedupe) and last key durably written (holdings).
        self._accepted: dict[StreamKey, int] = {}
        self._durable: dict[StreamKey, int] = {}
        self._pending_rows = 0
        self._pending_bytes = 0
        self._max_bytes = options.max_buffered_mb * 1_000_000
        self._failing = False
        self._failure_reason: str | None = None
        self._drops: dict[tuple[StreamKey, str], _Drop] = {}
        self._made_dirs: set[str] = set()
        self._last_flush = time.monotonic()
        self._opened = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    def check(cls, options: Options) -> None:
        """Refuse a ``path`` that is not a directory or cannot be written (creates nothing)."""
        check_tree_path(options.path)

    @classmethod
    def claims(cls, options: Options) -> list[str]:
        """The whole tree under ``path`` belongs to one sink of one collector."""
        return [options.path]

    async def open(self) -> None:
        """Create the root, repair the newest file of every stream and read what it holds."""
        self._open_sync()

    async def holdings(self) -> dict[StreamKey, int]:
        """Last key durably written per stream: aggTrade id, closed kline open time
        (stream ``kline_<interval>``), depth/orderbook ``last_update_id``."""
        if not self._opened:
            self._open_sync()
        return dict(self._durable)

    async def write(self, batch: Sequence[Record]) -> None:
        """Accept one batch (in order); flushes when the interval or row count is reached."""
        self._write_sync(batch)

    async def write_chunks(self, streams: Sequence[StreamKey], chunks: Sequence[Chunk]) -> None:
        """Accept rows built by :class:`CsvEncoder` (in order), exactly as :meth:`write`
        would have accepted their records."""
        self._write_chunks_sync(streams, chunks)

    async def flush(self) -> None:
        """Write every pending row, one write (or gzip member) per file; never raises for
        disk errors (rows stay pending, see the class docstring)."""
        self._flush_sync()

    async def close(self) -> None:
        """Flush, fsync (policy ``rotation``) and close every file."""
        self._close_sync()

    @property
    def pending_rows(self) -> int:
        """Rows accepted but not yet written (waiting for a flush or a retry)."""
        return self._pending_rows

    # --- open / holdings ---------------------------------------------------------------

    def _open_sync(self) -> None:
        if self._opened:
            return
        self._opened = True
        os.makedirs(self._root, exist_ok=True)
        for kind, key, folder, names in self._scan():
            self._read_newest(kind, key, folder, names)
        self._accepted.update(self._durable)

    def _scan(self):
        """Yield (kind, StreamKey or None, folder, file names) for every stream folder of
        the symbols this writer owns (another writer may be appending to the others)."""
        owns = self.context.owns
        for kind, exchange, market, symbol, interval, folder in layout.stream_folders(
            self._root, layout.folders_in
        ):
            if not owns(symbol):
                continue
            if kind == layout.MARKERS:
                key = None
            else:
                stream = f"kline_{interval}" if kind == layout.KLINE else kind
                key = StreamKey(exchange, market, symbol, stream)
            yield kind, key, folder, layout.files_in(folder)

    def _read_newest(self, kind: str, key: StreamKey | None, folder: str, names: list[str]) -> None:
        """Repair the newest file(s) of a stream and record the last key they hold."""
        ordered = sorted(
            (sk, name) for name in names if (sk := layout.period_sort_key(name)) is not None
        )
        # Newest period first; a period may have both .csv and .csv.gz (gzip toggled).
        best: int | None = None
        seen_period = None
        for period, name in reversed(ordered):
            if seen_period is not None and period != seen_period:
                break
            path = os.path.join(folder, name)
            try:
                tail = files.repair(path, name.endswith(".gz"))
            except OSError as exc:
                self._log.warning("unreadable", "cannot read %s: %s", path, exc)
                continue
            if tail.torn:
                self._counted_repair(path, tail)
            if key is None:
                return
            if not layout.expected_header(kind, key.market, tail.header):
                continue  # not our layout: it is moved aside before anything is appended
            value = self._key_of(kind, tail)
            if value is None:
                continue  # empty or header only: an older period holds the last key
            seen_period = period
            best = value if best is None else max(best, value)
        if key is not None and best is not None:
            self._durable[key] = best

    def _key_of(self, kind: str, tail: files.Tail) -> int | None:
        line = tail.last_line
        if line is None or line == tail.header:
            return None
        try:
            return int(line.split(b",")[layout.KEY_COLUMN[kind]])
        except (ValueError, IndexError):
            self._counters.incr("files_unreadable")
            return None

    def _counted_repair(self, path: str, tail: files.Tail) -> None:
        self._counters.incr("torn_repairs")
        self._log.warning(
            "torn_repair",
            "repaired %s: cut %d bytes of a torn last row left by a crash",
            path,
            tail.size - tail.valid_size,
        )

    # --- write -------------------------------------------------------------------------

    def _write_sync(self, batch: Sequence[Record]) -> None:
        if not self._opened:
            self._open_sync()
        groups, unclosed, unknown = layout.group_records(batch, self._periods.span)
        if unclosed:
            self._counters.incr("klines_unclosed", n=unclosed)
        if unknown:
            self._counters.incr("records_invalid", n=unknown)
            self._log.warning("invalid_record", "ignored %d records of unknown type", unknown)
        for target, records in groups.items():
            self._accept(target, records)
            if not self._failing and (
                self._pending_rows >= self._opts.flush_rows
                or self._pending_bytes >= self._max_bytes // 2
            ):
                self._flush_sync()
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self._flush_sync()

    def _write_chunks_sync(self, streams: Sequence[StreamKey], chunks: Sequence[Chunk]) -> None:
        if not self._opened:
            self._open_sync()
        kinds = [_kind_of_stream(sk.stream) for sk in streams]
        for c in chunks:
            sk = streams[c.stream]
            kind, interval = kinds[c.stream]
            if not kind or type(c.unit) is not int or not c.keys:
                self._counters.incr("records_invalid", n=len(c.keys))
                self._log.warning("invalid_chunk", "ignored a chunk of stream %s", sk.stream)
                continue
            target = (kind, sk.exchange, sk.market, sk.symbol, interval, c.unit)
            self._accept_chunk(target, c)
            if not self._failing and (
                self._pending_rows >= self._opts.flush_rows
                or self._pending_bytes >= self._max_bytes // 2
            ):
                self._flush_sync()
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self._flush_sync()

    def _accept_chunk(self, target: _Target, chunk: Chunk | None) -> None:
        """:meth:`_accept` for ready rows: the same de-duplication, rotation and bounds,
        cutting the chunk at record boundaries where the records would have been cut."""
        f = self._files.get(target)
        if f is None:
            try:
                f = self._new_file(target)
            except layout.InvalidComponent as exc:
                n = len(chunk.keys)
                self._counters.incr("records_invalid", n=n)
                self._log.error("invalid_record", "dropped %d records: %s", n, exc)
                return
        sk = f.stream
        assert sk is not None  # chunks are never markers
        chunk = self._dedupe_chunk(sk, chunk)
        if chunk is None:
            return
        self._rotate(f)
        rows = chunk.rows
        if self._over_bound(rows):
            if not self._failing:
                self._flush_sync()  # a huge batch, not a failing disk: make room first
            if self._over_bound(rows):
                chunk = self._drop_overflow_chunk(f, chunk)
                if chunk is None:
                    return
                rows = chunk.rows
        self._append(f, target, chunk.data, rows, chunk.keys[0], chunk.times[0], chunk.keys[-1])

    def _dedupe_chunk(self, sk: StreamKey, chunk: Chunk) -> Chunk | None:
        last = self._accepted.get(sk, -1)
        keys = chunk.keys
        if keys[0] > last:
            self._accepted[sk] = keys[-1]
            return chunk
        if keys[-1] <= last:
            self._counters.incr("rows_duplicate", sk.symbol, sk.stream, len(keys))
            return None
        index = bisect_right(keys, last)
        self._counters.incr("rows_duplicate", sk.symbol, sk.stream, index)
        self._accepted[sk] = keys[-1]
        return chunk.tail(index)

    def _drop_overflow_chunk(self, f: _File, chunk: Chunk) -> Chunk | None:
        """:meth:`_drop_overflow` for a chunk: keep the records whose rows fit."""
        room = self._opts.max_buffered_rows - self._pending_rows
        if self._pending_bytes >= self._max_bytes:
            room = 0
        room = max(0, room)
        ends = chunk.row_ends
        cut = bisect_right(ends, room) if ends else min(room, len(chunk.keys))
        rows = chunk.rows - chunk.rows_before(cut)
        self._record_drop(f, chunk.keys[cut], chunk.times[cut], chunk.keys[-1], rows)
        return chunk.head(cut) if cut else None

    def _accept(self, target: _Target, records: list) -> None:
        f = self._files.get(target)
        if f is None:
            try:
                f = self._new_file(target)
            except layout.InvalidComponent as exc:
                self._counters.incr("records_invalid", n=len(records))
                self._log.error("invalid_record", "dropped %d records: %s", len(records), exc)
                return
        kind = f.kind
        sk = f.stream
        if sk is not None:
            records = self._dedupe(sk, kind, records)
            if not records:
                return
        self._rotate(f)
        rows = len(records)
        if kind == layout.DEPTH:
            rows = sum(layout.depth_rows(r) for r in records)
        if kind != layout.MARKERS and self._over_bound(rows):
            if not self._failing:
                self._flush_sync()  # a huge batch, not a failing disk: make room first
            if self._over_bound(rows):
                records, rows = self._drop_overflow(f, records)
                if not records:
                    return
        data = self._encode(f, records, rows)
        if sk is None:
            self._append(f, target, data, rows, None, 0, None)
        else:
            first = records[0]
            self._append(
                f,
                target,
                data,
                rows,
                record_key(first),
                record_time(first),
                record_key(records[-1]),
            )

    def _append(
        self,
        f: _File,
        target: _Target,
        data: bytes,
        rows: int,
        first_key: int | None,
        first_time: int,
        last_key: int | None,
    ) -> None:
        """Add whole rows to ``f``'s pending buffer (keys: ``None`` for markers)."""
        f.pending.append(data)
        f.pending_rows += rows
        f.pending_bytes += len(data)
        self._pending_bytes += len(data)
        if last_key is not None:
            if f.pending_first is None:
                f.pending_first = (first_key, first_time)
            f.pending_key = last_key
        self._pending_rows += rows
        self._dirty[target] = f

    def _over_bound(self, rows: int) -> bool:
        return (
            self._pending_rows + rows > self._opts.max_buffered_rows
            or self._pending_bytes >= self._max_bytes
        )

    def _dedupe(self, sk: StreamKey, kind: str, records: list) -> list:
        last = self._accepted.get(sk, -1)
        kept = []
        if kind == layout.AGGTRADE:
            for r in records:
                if r.trade_id > last:
                    kept.append(r)
                    last = r.trade_id
        else:
            attr = "open_time" if kind == layout.KLINE else "last_update_id"
            for r in records:
                k = getattr(r, attr)
                if k > last:
                    kept.append(r)
                    last = k
        if len(kept) != len(records):
            self._counters.incr("rows_duplicate", sk.symbol, sk.stream, len(records) - len(kept))
        if kept:
            self._accepted[sk] = last
        return kept

    def _encode(self, f: _File, records: list, rows: int) -> bytes:
        kind = f.kind
        if kind == layout.AGGTRADE:
            text = layout.encode_trades(records, f.target[2] == "spot")
        elif kind == layout.DEPTH:
            text = layout.encode_depth(records)
        elif kind == layout.KLINE:
            text = layout.encode_klines(records)
        elif kind == layout.ORDERBOOK:
            if f.levels is None:
                self._set_levels(f, records[0])
            text, cut = layout.encode_books(records, f.levels)
            if cut:
                self._counters.incr("book_levels_truncated", n=cut)
        else:
            return layout.encode_markers(records).encode()
        # An exchange string holding a separator would shift columns: check the shape
        # of the whole group at C speed, and quote field by field only if it is off.
        if text.count("\n") != rows or text.count(",") != rows * f.commas:
            self._counters.incr("rows_quoted", n=rows)
            quoted = [layout.quote_record(r) for r in records]
            return self._encode_plain(f, quoted)
        return text.encode()

    def _encode_plain(self, f: _File, records: list) -> bytes:
        kind = f.kind
        if kind == layout.AGGTRADE:
            return layout.encode_trades(records, f.target[2] == "spot").encode()
        if kind == layout.DEPTH:
            return layout.encode_depth(records).encode()
        if kind == layout.KLINE:
            return layout.encode_klines(records).encode()
        return layout.encode_books(records, f.levels or 0)[0].encode()

    def _set_levels(self, f: _File, first: BookSnapshot) -> None:
        levels = self._opts.book_levels or max(len(first.bids), len(first.asks), 1)
        f.levels = levels
        f.set_columns(layout.book_columns(levels))

    def _drop_overflow(self, f: _File, records: list) -> tuple[list, int]:
        """Keep the prefix of ``records`` that fits the retry buffer; drop the rest."""
        room = self._opts.max_buffered_rows - self._pending_rows
        if self._pending_bytes >= self._max_bytes:
            room = 0
        kept_rows = 0
        cut = 0
        if f.kind == layout.DEPTH:
            for r in records:
                n = layout.depth_rows(r)
                if kept_rows + n > room:
                    break
                kept_rows += n
                cut += 1
        else:
            cut = max(0, room)
            kept_rows = cut
        kept, dropped = records[:cut], records[cut:]
        rows = (
            sum(layout.depth_rows(r) for r in dropped) if f.kind == layout.DEPTH else len(dropped)
        )
        first = dropped[0]
        self._record_drop(f, record_key(first), record_time(first), record_key(dropped[-1]), rows)
        return kept, kept_rows

    def _record_drop(
        self, f: _File, first_key: int, first_time: int, last_key: int, rows: int
    ) -> None:
        """Count ``rows`` dropped from ``f``'s stream (keys ``first_key..last_key``) for the
        gap marker written once writing works again."""
        sk = f.stream
        assert sk is not None  # markers are never dropped
        reason = self._failure_reason or "buffer full"
        drop = self._drops.get((sk, reason))
        if drop is None:
            drop = self._drops[(sk, reason)] = _Drop(first_key, first_time, reason)
        drop.last_key = last_key
        drop.rows += rows
        self._counters.incr("rows_dropped", sk.symbol, sk.stream, rows)
        self._log.error(
            "rows_dropped",
            "retry buffer full (%d rows, max_buffered_rows/max_buffered_mb): dropped %d rows "
            "of %s %s; a gap marker follows once writing works again",
            self._pending_rows,
            rows,
            sk.symbol,
            sk.stream,
        )

    def _new_file(self, target: _Target) -> _File:
        kind, exchange, market, symbol, interval, period = target
        layout.check_component("exchange", exchange)
        layout.check_component("market", market)
        layout.check_component("symbol", symbol)
        if kind == layout.KLINE:
            layout.check_component("interval", interval)
        directory = os.path.join(
            self._root, *layout.folder_parts(kind, exchange, market, symbol, interval)
        )
        name = layout.file_name(kind, symbol, interval, self._periods.label(period), self._gz)
        f = _File(target, directory, os.path.join(directory, name))
        if kind == layout.AGGTRADE:
            f.set_columns(layout.aggtrade_columns(market))
        elif kind == layout.DEPTH:
            f.set_columns(layout.DEPTH_COLUMNS)
        elif kind == layout.KLINE:
            f.set_columns(layout.KLINE_COLUMNS)
        elif kind == layout.MARKERS:
            f.set_columns(layout.MARKER_COLUMNS)
        if kind != layout.MARKERS:
            f.stream = StreamKey(exchange, market, symbol, layout.stream_name(kind, interval))
        self._files[target] = f
        # An existing file is opened now: its header decides the orderbook levels, and a
        # torn tail is repaired before anything is appended. A new file is only created
        # by its first write (no empty files; an empty .gz would not even be gzip).
        if os.path.exists(f.path):
            try:
                self._ensure_open(f)
            except OSError as exc:
                self._on_error(f, exc, "open")
        return f

    def _rotate(self, f: _File) -> None:
        """Retire the previous period's file of this stream when a newer period starts."""
        stream = f.target[:5]
        period = f.target[5]
        current = self._current.get(stream)
        if current is not None and period < current:
            f.retired = True  # a straggler for a past period: close it after this flush
        elif current is None or period > current:
            self._current[stream] = period
            if current is not None:
                old = self._files.get((*stream, current))
                if old is not None:
                    old.retired = True

    # --- files -------------------------------------------------------------------------

    def _ensure_open(self, f: _File) -> None:
        if f.fd is not None:
            self._open_lru.move_to_end(f.target)
            return
        while len(self._open_lru) >= self._opts.max_open_files:
            _, victim = self._open_lru.popitem(last=False)
            self._close_file(victim, sync=False)
        if f.directory not in self._made_dirs:
            self._io.makedirs(f.directory)
            self._made_dirs.add(f.directory)
        for _attempt in range(3):
            existed = os.path.exists(f.path)
            try:
                fd = self._open_fd(f.path)
            except FileNotFoundError:
                if os.path.isdir(f.directory):
                    raise
                self._recreate_dir(f.directory)
                fd = self._open_fd(f.path)
            try:
                st = os.fstat(fd)
                identity = (st.st_dev, st.st_ino)
                # New to us, replaced, or changed behind our back: look before appending.
                fresh = identity != f.identity or st.st_size != f.size
                if fresh and not self._adopt(f, st.st_size, identity == f.identity):
                    self._io.close(fd)
                    continue  # a conflicting file was moved aside: start a new one
            except BaseException:
                self._io.close(fd)
                raise
            f.fd = fd
            f.identity = identity
            f.created = f.created or not existed
            self._open_lru[f.target] = f
            self._counters.set("files_open", len(self._open_lru))
            return
        raise OSError(errno.EBUSY, "file keeps being replaced while opening", f.path)

    def _recreate_dir(self, directory: str) -> None:
        """Someone deleted our folder (or the whole tree) while we run: make it again."""
        self._io.makedirs(directory)
        self._counters.incr("dirs_recreated")
        self._log.warning(
            "dir_recreated",
            "%s was deleted while running; created it again (files written before are gone "
            "with it, rows from now on are kept)",
            directory,
        )

    def _open_fd(self, path: str) -> int:
        """Open ``path``; when the process runs out of descriptors, close half of ours and
        retry once (``max_open_files`` is above what the system allows)."""
        try:
            return self._io.open(path)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._open_lru:
                raise
        self._counters.incr("fd_limit_hits")
        self._log.warning(
            "fd_limit",
            "out of file descriptors with %d files open; lower max_open_files (%d)",
            len(self._open_lru),
            self._opts.max_open_files,
        )
        for _ in range(max(1, len(self._open_lru) // 2)):
            _, victim = self._open_lru.popitem(last=False)
            self._close_file(victim, sync=False)
        return self._io.open(path)

    def _adopt(self, f: _File, size: int, same_file: bool) -> bool:
        """Check a file before appending: repair a torn tail, match the header.

        Returns False when the file had another layout and was moved aside.
        """
        unconfirmed, f.unconfirmed = f.unconfirmed, None
        f.size = 0
        if size == 0:
            return True
        tail = files.repair(f.path, self._gz)
        if tail.torn:
            self._counted_repair(f.path, tail)
        if same_file and unconfirmed is not None and tail.valid_size > unconfirmed:
            self._reconcile(f, unconfirmed, tail.valid_size)
        if tail.valid_size == 0 and not tail.foreign:
            return True  # only a torn first row: the header is written again
        header = tail.header
        if f.kind == layout.ORDERBOOK and header is not None:
            levels = layout.book_levels_of_header(header)
            if levels is not None and (f.levels is None or levels == f.levels):
                if f.levels is None:
                    f.levels = levels
                    f.set_columns(layout.book_columns(levels))
                f.size = tail.valid_size
                return True
        elif header == f.header:
            f.size = tail.valid_size
            return True
        # Someone else's file (or other columns): never mix two layouts in one file.
        aside = f"{f.path}.conflict-{time.time_ns() // 1_000_000}"
        os.rename(f.path, aside)
        self._counters.incr("files_conflict")
        self._log.error(
            "file_conflict",
            "%s has a different header than this sink writes; moved it to %s",
            f.path,
            aside,
        )
        return False

    def _reconcile(self, f: _File, before: int, valid: int) -> None:
        """Drop from the pending rows those whose bytes a failed write left on disk.

        A write failed part-way and could not be cut back; the repair kept its whole rows,
        so they must not be written again. Only plain files get here: a gzip member is
        whole or cut off entirely.
        """
        full = (f.header if before == 0 else b"") + b"".join(f.pending)
        done = valid - before
        if done > len(full) or full[done - 1 : done] != b"\n":
            return  # not our bytes after all: keep everything pending
        rows = full[:done].count(b"\n") - (1 if before == 0 else 0)
        f.pending = [full[done:]] if done < len(full) else []
        f.pending_rows -= rows
        self._pending_rows -= rows
        self._pending_bytes -= f.pending_bytes - (len(full) - done)
        f.pending_bytes = len(full) - done
        self._counters.incr("rows_written", f.symbol, _stream_of(f), rows)
        self._counters.incr("bytes_written", n=done)

    def _check_identity(self, f: _File) -> None:
        """Reopen when our file was deleted or replaced since we opened it."""
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            what = "deleted"
        else:
            if (st.st_dev, st.st_ino) == f.identity:
                return
            what = "replaced"
        self._counters.incr("files_reopened")
        self._log.warning(
            "file_reopened", "%s was %s by someone else; continuing in a new file", f.path, what
        )
        self._close_file(f, sync=False)
        f.identity = None
        f.size = 0
        self._ensure_open(f)

    def _close_file(self, f: _File, sync: bool) -> None:
        if f.fd is None:
            return
        fd, f.fd = f.fd, None
        self._open_lru.pop(f.target, None)
        try:
            if sync:
                self._io.fsync(fd)
        except OSError as exc:
            self._counters.incr("fsync_errors")
            self._log.error("fsync_error", "cannot fsync %s: %s", f.path, exc)
        finally:
            # Nothing is left to do with a descriptor that will not close.
            with contextlib.suppress(OSError):
                self._io.close(fd)
        self._counters.set("files_open", len(self._open_lru))

    # --- flush -------------------------------------------------------------------------

    def _flush_sync(self) -> None:
        self._last_flush = time.monotonic()
        errors = 0
        for target, f in list(self._dirty.items()):
            if self._write_file(f):
                del self._dirty[target]
            else:
                errors += 1
        self._counters.incr("file_flushes")
        if errors:
            self._failing = True
        else:
            if self._failing:
                self._failing = False
                self._failure_reason = None
                self._log.log(logging.INFO, "write_recovered", "writing works again")
            if self._drops:
                self._report_drops()
        self._retire()
        self._counters.set("rows_buffered", self._pending_rows if self._failing else 0)

    def _write_file(self, f: _File) -> bool:
        """Write ``f``'s pending rows with one write; False (rows kept) on an OS error."""
        try:
            self._ensure_open(f)
            self._check_identity(f)
            data = b"".join(f.pending)
            if not data:
                return self._written(f, data)  # a reconciled write left nothing to do
            if f.size == 0:
                data = f.header + data
            if self._gz:
                data = files.gzip_member(data, self._opts.gzip_level)
            before = f.size
            try:
                self._io.write(f.fd, data)
            except OSError:
                self._undo(f, before)
                raise
        except OSError as exc:
            self._on_error(f, exc, "write")
            return False
        self._written(f, data)
        if self._opts.fsync == "flush":
            # The rows are in the file now; a failed fsync must not make us write them again.
            try:
                self._io.fsync(f.fd)
                if f.created:
                    self._io.fsync_dir(f.directory)
                    f.created = False
            except OSError as exc:
                self._counters.incr("fsync_errors")
                self._log.error("fsync_error", "cannot fsync %s: %s", f.path, exc)
        return True

    def _written(self, f: _File, data: bytes) -> bool:
        f.size += len(data)
        rows = f.pending_rows
        counters = self._counters
        counters.incr("bytes_written", n=len(data))
        counters.incr("rows_written", f.symbol, _stream_of(f), rows)
        if f.stream is not None and f.pending_key is not None:
            self._durable[f.stream] = f.pending_key
        self._pending_rows -= rows
        self._pending_bytes -= f.pending_bytes
        f.pending = []
        f.pending_rows = 0
        f.pending_bytes = 0
        f.pending_key = None
        f.pending_first = None
        return True

    def _undo(self, f: _File, size: int) -> None:
        """Cut a partial write back off so the file never holds a torn row."""
        try:
            self._io.truncate(f.fd, size)
        except OSError:
            # Cannot undo now: close, so that the next open repairs the tail and keeps
            # (without writing them twice) the whole rows that reached the file.
            self._close_file(f, sync=False)
            f.unconfirmed = size

    def _on_error(self, f: _File, exc: OSError, op: str) -> None:
        reason = _reason(exc)
        self._failure_reason = self._failure_reason or reason
        self._counters.incr("write_errors", f.symbol, _stream_of(f))
        self._log.error(
            reason.split(":")[0].replace(" ", "_"),
            "cannot %s %s: %s (%s); %d rows wait in the retry buffer (max_buffered_rows %d) "
            "and are retried on the next flush",
            op,
            f.path,
            reason,
            exc,
            self._pending_rows,
            self._opts.max_buffered_rows,
        )

    def _report_drops(self) -> None:
        drops, self._drops = self._drops, {}
        markers = [
            Marker(
                exchange=sk.exchange,
                market=sk.market,
                symbol=sk.symbol,
                stream=sk.stream,
                kind="gap",
                first_key=d.first_key,
                last_key=d.last_key,
                time=d.time,
                reason=d.reason,
            )
            for (sk, _), d in drops.items()
        ]
        self._counters.incr("gap_markers", n=len(markers))
        self._write_sync_markers(markers)

    def _write_sync_markers(self, markers: list[Marker]) -> None:
        span = self._periods.span
        for m in markers:
            t = layout.ms_time(m.time or time.time_ns() // 1_000_000)
            target = (layout.MARKERS, m.exchange, m.market, m.symbol, "", t // span)
            self._accept(target, [m])
        for target, f in list(self._dirty.items()):
            if f.kind == layout.MARKERS and self._write_file(f):
                del self._dirty[target]

    def _retire(self) -> None:
        """Close files of past periods once nothing is pending for them."""
        done = [t for t, f in self._files.items() if f.retired and not f.pending]
        for target in done:
            f = self._files.pop(target)
            self._close_file(f, sync=self._opts.fsync == "rotation")

    def _close_sync(self) -> None:
        if self._closed:
            return
        self._flush_sync()
        if self._pending_rows:
            self._mark_lost()
        sync = self._opts.fsync == "rotation"  # "flush" already synced each write
        for f in list(self._open_lru.values()):
            self._close_file(f, sync=sync)
        self._closed = True

    def _mark_lost(self) -> None:
        """Rows that cannot be written before exit: count them per stream, log them, and
        record their key ranges as ``gap`` markers (with any gaps not yet reported) so the
        next run and ``streamer verify`` see them. Afterwards ``pending_rows`` counts
        exactly the lost data rows (the writer reports them; the run exits non-zero)."""
        reason = f"not written before exit: {self._failure_reason or 'write error'}"
        lost = 0
        for target, f in list(self._dirty.items()):
            if f.stream is None or not f.pending_rows or f.pending_first is None:
                continue
            first_key, first_time = f.pending_first
            sk = f.stream
            drop = self._drops.get((sk, reason))
            if drop is None:
                drop = self._drops[(sk, reason)] = _Drop(first_key, first_time, reason)
            drop.first_key = min(drop.first_key, first_key)
            drop.last_key = max(drop.last_key, f.pending_key or first_key)
            drop.rows += f.pending_rows
            lost += f.pending_rows
            self._counters.incr("rows_dropped", sk.symbol, sk.stream, f.pending_rows)
            del self._dirty[target]
        if lost:
            ranges = "; ".join(
                f"{sk.symbol} {sk.stream} {d.first_key}..{d.last_key}"
                for (sk, why), d in self._drops.items()
                if why == reason
            )
            self._log.error(
                "rows_lost_at_close",
                "closing with %d rows that could not be written (see write errors above): %s",
                lost,
                ranges,
            )
        if self._drops:
            self._report_drops()
        # Whatever marker rows could not be written either are in the log line above.
        self._pending_rows = lost


def _kind_of_stream(stream: str) -> tuple[str, str]:
    """``(kind, interval)`` of a stream whose rows come as chunks; ``("", "")`` otherwise."""
    if stream == layout.AGGTRADE or stream == layout.DEPTH:
        return stream, ""
    if stream.startswith(KLINE_STREAM_PREFIX) and len(stream) > len(KLINE_STREAM_PREFIX):
        return layout.KLINE, stream[len(KLINE_STREAM_PREFIX) :]
    return "", ""


def _stream_of(f: _File) -> str:
    return f.stream.stream if f.stream is not None else layout.MARKERS


@hookimpl
def register_sinks(register) -> None:
    """Register the ``csv`` sink."""
    register("csv", CsvSink)
