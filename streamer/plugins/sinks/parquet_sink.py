"""The ``parquet`` sink: crash-safe, Hive-partitioned Parquet files (needs pyarrow:
``pip install 'market-streamer[parquet]'``).

Layout under ``Options.path`` (see :mod:`._parquet_files`)::

    exchange=binance/market=spot/stream=aggtrade/symbol=BTCUSDT/date=2026-11-30/part-....parquet

with ``stream=`` ``aggtrade``, ``depth``, ``kline_<interval>``, ``orderbook`` and ``markers``.
Columns are the CSV sink's plus a UTC ``timestamp`` (see :mod:`._parquet_schema`).

How it writes: :meth:`ParquetSink.write` routes each record to its stream and period, drops
what it already holds (keys must grow per stream) and keeps the records. :meth:`flush` turns
each stream's pending records into one Arrow record batch and appends it, with one write, to
the stream's open segment (an Arrow IPC stream file), so that everything flushed survives a
SIGKILL. When a stream moves to the next period (``rotate``: ``day`` or ``hour``), at close,
and at start-up for segments a crash left behind, the segment is compacted into one Parquet
file (zstd, row groups of ``row_group_rows``) under a temporary name that is renamed when
complete: readers of ``*.parquet`` never see a partial file, and a day of one stream is one
file per run of the collector, not one per flush.

Faults: a failed write is cut back (or the segment abandoned for a new one when it cannot
be), its rows stay pending and are retried on the next flush; rows beyond
``max_buffered_rows``/``max_buffered_mb`` are dropped, counted and reported as a ``gap``
marker once writing works again; a failed compaction keeps the segment and is retried. A
price the decimal type cannot hold exactly is never rounded: its record is dropped, counted
(``values_unrepresentable``) and reported as a ``gap`` marker.

pyarrow is imported only when a parquet sink is checked, built or verified, so the plugin
loads (and every other sink works) without it; :meth:`ParquetSink.check` refuses
``type: parquet`` without it in one line naming the extra.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Annotated, Literal

import msgspec

from streamer import (
    BookSnapshot,
    DepthUpdate,
    Duration,
    Kline,
    Marker,
    Progress,
    RateLimitedLog,
    Record,
    Sink,
    SinkContext,
    StreamFacts,
    StreamKey,
    Trade,
    check_duration,
    hookimpl,
    parse_duration,
    record_key,
    record_time,
)

from . import _sink_layout as layout

__all__ = ["Options", "ParquetSink"]

INSTALL_HINT = "pip install 'market-streamer[parquet]'"


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``parquet`` sink (the ``sinks.<name>`` section of the YAML config)."""

    #: Root directory of the tree (created if missing).
    path: str
    #: One Parquet file per stream and UTC day (per run), or per UTC hour.
    rotate: Literal["day", "hour"] = "day"
    #: ``write`` flushes (appends to the open segments) when the last flush is this old.
    flush_interval: Duration = "1s"
    #: ``write`` also flushes once this many rows are pending.
    flush_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 100_000
    #: ``decimal``: exact ``decimal128(38, decimal_scale)``; ``float``: float64.
    price_type: Literal["decimal", "float"] = "decimal"
    #: Digits after the point of the decimal columns (Binance sends 8).
    decimal_scale: Annotated[int, msgspec.Meta(ge=0, le=18)] = 8
    #: Levels per side kept in order-book rows; default: all the snapshot has.
    book_levels: Annotated[int, msgspec.Meta(ge=1, le=5000)] | None = None
    #: ``never``; ``flush``: fsync segments at each flush; ``rotation``: only finished
    #: Parquet files (always fsynced before their rename unless ``never``).
    fsync: Literal["never", "flush", "rotation"] = "rotation"
    #: Rows kept for retry while writes fail; beyond it rows are dropped and reported.
    max_buffered_rows: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 1_000_000
    #: ... and at most this many megabytes of encoded batches.
    max_buffered_mb: Annotated[int, msgspec.Meta(ge=1, le=1_048_576)] = 256
    #: Rows per Parquet row group in finished files.
    row_group_rows: Annotated[int, msgspec.Meta(ge=1_000, le=100_000_000)] = 1_000_000
    #: zstd level of finished files (1 fastest .. 22 smallest; 3 saves ~1% over 1 at a
    #: third more compaction time on market data).
    zstd_level: Annotated[int, msgspec.Meta(ge=1, le=22)] = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        check_duration("flush_interval", self.flush_interval, positive=True)
        if self.flush_rows > self.max_buffered_rows:
            raise ValueError("flush_rows: must not exceed max_buffered_rows")


def require_pyarrow() -> None:
    """Raise ``ValueError`` (one line naming the extra) when pyarrow cannot be imported."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"type parquet needs pyarrow, which cannot be imported ({exc}): {INSTALL_HINT}"
        ) from None


_Target = layout.FileTarget
#: The attribute holding each record type's key (what ``record_key`` returns).
_KEY_ATTR = {Trade: "trade_id", Kline: "open_time", DepthUpdate: "last_update_id",
             BookSnapshot: "last_update_id"}  # fmt: skip
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _reason(exc: OSError) -> str:
    if exc.errno in _DISK_FULL:
        return "disk full"
    if exc.errno in _DENIED:
        return "permission denied"
    return f"write error: {exc.strerror or exc}"


class _Seg:
    """One stream's open segment of one period: where it is and what is pending for it."""

    __slots__ = (
        "directory",
        "identity",
        "kind",
        "label",
        "market",
        "path",
        "pending_first",
        "pending_key",
        "records",
        "retired",
        "rows",
        "size",
        "stream",
        "symbol",
        "target",
        "unwritten",
        "unwritten_bytes",
        "unwritten_rows",
        "written_rows",
    )

    def __init__(self, target: _Target, directory: str, label: str) -> None:
        self.target = target
        self.kind = target[0]
        self.market = target[2]
        self.symbol = target[3]
        self.directory = directory
        self.label = label
        self.path = ""
        self.identity: tuple[int, int] | None = None
        self.size = 0
        self.stream: StreamKey | None = None
        #: Records accepted since the last flush, and their rows.
        self.records: list = []
        self.rows = 0
        #: Encoded record batches (IPC messages) waiting for a successful write.
        self.unwritten: list[bytes] = []
        self.unwritten_rows = 0
        self.unwritten_bytes = 0
        self.written_rows = 0
        self.pending_key: int | None = None
        self.pending_first: tuple[int, int] | None = None
        self.retired = False

    @property
    def pending(self) -> int:
        return self.rows + self.unwritten_rows


class _Drop:
    """Rows of one stream dropped, reported later as a gap marker."""

    __slots__ = ("first_key", "last_key", "reason", "rows", "time")

    def __init__(self, first_key: int, time_ms: int, reason: str) -> None:
        self.first_key = first_key
        self.last_key = first_key
        self.time = time_ms
        self.reason = reason
        self.rows = 0


class ParquetSink(Sink):
    """Writes records to Parquet files; see the module docstring for layout and guarantees.

    ``io`` replaces the system calls used for writing (tests inject faults with it).
    Counters (in ``context.counters``), per (symbol, stream): ``rows_written`` (rows in a
    segment), ``rows_dropped``, ``rows_duplicate``, ``write_errors``,
    ``values_unrepresentable``; process-wide: ``bytes_written``, ``file_flushes``,
    ``records_invalid``, ``klines_unclosed``, ``book_levels_truncated``, ``gap_markers``,
    ``fsync_errors``, ``files_compacted``, ``rows_compacted``, ``compaction_errors``,
    ``segments_recovered`` (left by an earlier run, finished at start), ``torn_repairs``
    (a torn last batch dropped from such a segment), ``files_reopened``,
    ``dirs_recreated``, ``files_unreadable``; gauges ``rows_buffered`` and
    ``segments_open``.
    """

    Options = Options

    @classmethod
    def verify(cls, path: str | os.PathLike[str], *, as_json: bool = False) -> tuple[str, int]:
        """``streamer verify --sink parquet``: gaps, duplicates, chain breaks, crossed books
        and torn segments in the tree at ``path`` (see :mod:`._parquet_verify`)."""
        require_pyarrow()
        from ._parquet_verify import verify_tree

        return verify_tree(path, as_json=as_json)

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
        """``streamer report --sink parquet``: the facts of every stream in the tree at
        ``path``, the csv report's for the same records (see :mod:`._parquet_report`)."""
        require_pyarrow()
        from ._parquet_report import report_facts

        return report_facts(path, start=start, end=end, symbols=symbols, progress=progress)

    @classmethod
    def check(cls, options: Options) -> None:
        """Refuse a missing pyarrow, or a ``path`` that cannot be a writable directory."""
        require_pyarrow()
        layout.check_tree_path(options.path)

    @classmethod
    def claims(cls, options: Options) -> list[str]:
        """The whole tree under ``path`` belongs to one sink of one collector."""
        return [options.path]

    def __init__(self, options: Options, context: SinkContext, *, io=None) -> None:
        super().__init__(options, context)
        require_pyarrow()
        from . import _parquet_files, _parquet_schema

        self._pf = _parquet_files
        self._ps = _parquet_schema
        self._opts = options
        self._root = os.path.abspath(options.path)
        self._io = io or _parquet_files.FileIO()
        self._types = _parquet_schema.Types(options.price_type, options.decimal_scale)
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger, interval=30.0)
        self._periods = layout.PeriodNamer(options.rotate == "hour")
        self._flush_seconds = parse_duration(options.flush_interval)
        self._segs: dict[_Target, _Seg] = {}
        self._dirty: dict[_Target, _Seg] = {}
        self._current: dict[tuple, int] = {}
        self._accepted: dict[StreamKey, int] = {}
        self._durable: dict[StreamKey, int] = {}
        #: Closed segments whose compaction failed, retried at each flush.
        self._to_compact: list[str] = []
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

    async def open(self) -> None:
        """Create the root, finish the segments an earlier run left, read what it holds."""
        self._open_sync()

    async def holdings(self) -> dict[StreamKey, int]:
        """Last key durably written per stream (aggTrade id, closed kline open time,
        depth/orderbook ``last_update_id``), from the Parquet files and open segments."""
        if not self._opened:
            self._open_sync()
        return dict(self._durable)

    async def write(self, batch: Sequence[Record]) -> None:
        """Accept one batch (in order); flushes when the interval or row count is reached."""
        self._write_sync(batch)

    async def flush(self) -> None:
        """Append every pending row to its open segment, one write per segment; never
        raises for disk errors (rows stay pending, see the module docstring)."""
        self._flush_sync()

    async def close(self) -> None:
        """Flush, then compact every open segment into its Parquet file."""
        self._close_sync()

    @property
    def pending_rows(self) -> int:
        """Rows accepted but not yet in a segment file."""
        return self._pending_rows

    # --- open / holdings ---------------------------------------------------------------

    def _open_sync(self) -> None:
        if self._opened:
            return
        self._opened = True
        os.makedirs(self._root, exist_ok=True)
        pf = self._pf
        for kind, _interval, ex, mk, stream, symbol, folder in pf.stream_partitions(
            self._root, layout.folders_in
        ):
            key = None if kind == layout.MARKERS else StreamKey(ex, mk, symbol, stream)
            best = None
            for date_dir in reversed(pf.date_dirs(folder, layout.folders_in)):
                names = layout.files_in(date_dir)
                for name in names:
                    if name.startswith(pf.TMP_PREFIX):
                        self._io.unlink(os.path.join(date_dir, name))  # a crashed compaction
                for name in sorted(n for n in names if n.endswith(pf.SEGMENT_SUFFIX)):
                    value = self._recover(os.path.join(date_dir, name), kind)
                    if value is not None and key is not None:
                        best = value if best is None else max(best, value)
                if key is None:
                    continue
                for name in layout.files_in(date_dir):
                    if name.startswith(pf.PART_PREFIX) and name.endswith(pf.PART_SUFFIX):
                        value = self._max_key(os.path.join(date_dir, name), kind)
                        if value is not None:
                            best = value if best is None else max(best, value)
                if best is not None:
                    break  # the newest day holding rows holds the last key
            if key is not None and best is not None:
                self._durable[key] = best
        self._accepted.update(self._durable)

    def _recover(self, path: str, kind: str) -> int | None:
        """Finish a segment a crash (or a failed compaction) left; returns the last key it
        holds when it could not be finished (else its key is in the Parquet file)."""
        self._counters.incr("segments_recovered")
        try:
            _rows, torn = self._pf.compact(self._io, path, **self._compact_args())
        except OSError as exc:
            self._counters.incr("compaction_errors")
            self._log.error(
                "compaction_error",
                "cannot finish the segment %s left by an earlier run: %s; it is kept "
                "(readable as an Arrow IPC stream) and finished later",
                path,
                exc,
            )
            self._to_compact.append(path)
            return self._segment_key(path, kind)
        if torn:
            self._counters.incr("torn_repairs")
            self._log.warning(
                "torn_repair",
                "finished %s, left by a crash: its torn last batch (never flushed) is dropped",
                path,
            )
        return None

    def _segment_key(self, path: str, kind: str) -> int | None:
        column = self._ps.KEY_NAME.get(kind)
        if column is None:
            return None
        best = None
        try:
            for batch in self._pf.Segment(path):
                if batch.num_rows:
                    value = batch.column(column)[-1].as_py()
                    best = value if best is None else max(best, value)
        except (OSError, KeyError):
            self._counters.incr("files_unreadable")
        return best

    def _max_key(self, path: str, kind: str) -> int | None:
        try:
            return self._pf.max_key(path, self._ps.KEY_NAME[kind])
        except Exception as exc:  # a foreign or damaged file: say so, do not stop
            self._counters.incr("files_unreadable")
            self._log.warning("unreadable", "cannot read %s: %s", path, exc)
            return None

    def _compact_args(self) -> dict:
        return {
            "row_group_rows": self._opts.row_group_rows,
            "zstd_level": self._opts.zstd_level,
            "fsync": self._opts.fsync != "never",
        }

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
            if not self._failing and self._pending_rows >= self._opts.flush_rows:
                self._flush_sync()
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self._flush_sync()

    def _accept(self, target: _Target, records: list) -> None:
        seg = self._segs.get(target)
        if seg is None:
            try:
                seg = self._new_seg(target)
            except layout.InvalidComponent as exc:
                self._counters.incr("records_invalid", n=len(records))
                self._log.error("invalid_record", "dropped %d records: %s", len(records), exc)
                return
        sk = seg.stream
        if sk is not None:
            records = self._dedupe(sk, records)
            if not records:
                return
        self._rotate(seg)
        rows = self._ps.rows_of(seg.kind, records)
        if sk is not None and self._over_bound(rows):
            if not self._failing:
                self._flush_sync()  # a huge batch, not a failing disk: make room first
            if self._over_bound(rows):
                records, rows = self._drop_overflow(seg, records)
                if not records:
                    return
        seg.records += records
        seg.rows += rows
        self._pending_rows += rows
        if sk is not None:
            if seg.pending_first is None:
                first = records[0]
                seg.pending_first = (record_key(first), record_time(first))
            seg.pending_key = record_key(records[-1])
        self._dirty[target] = seg

    def _dedupe(self, sk: StreamKey, records: list) -> list:
        last = self._accepted.get(sk, -1)
        keys = [getattr(r, _KEY_ATTR[r.__class__]) for r in records]
        if keys[0] > last and all(a < b for a, b in pairwise(keys)):
            self._accepted[sk] = keys[-1]  # the common case: all new, in order
            return records
        kept = []
        for r, k in zip(records, keys, strict=True):
            if k > last:
                kept.append(r)
                last = k
        if len(kept) != len(records):
            self._counters.incr("rows_duplicate", sk.symbol, sk.stream, len(records) - len(kept))
        if kept:
            self._accepted[sk] = last
        return kept

    def _over_bound(self, rows: int) -> bool:
        return (
            self._pending_rows + rows > self._opts.max_buffered_rows
            or self._pending_bytes >= self._max_bytes
        )

    def _drop_overflow(self, seg: _Seg, records: list) -> tuple[list, int]:
        """Keep the prefix of ``records`` that fits the retry buffer; drop the rest."""
        room = self._opts.max_buffered_rows - self._pending_rows
        if self._pending_bytes >= self._max_bytes:
            room = 0
        kept_rows = cut = 0
        for r in records:
            n = layout.depth_rows(r) if seg.kind == layout.DEPTH else 1
            if kept_rows + n > room:
                break
            kept_rows += n
            cut += 1
        kept, dropped = records[:cut], records[cut:]
        rows = self._ps.rows_of(seg.kind, dropped)
        first = dropped[0]
        self._record_drop(
            seg.stream, record_key(first), record_time(first), record_key(dropped[-1]), rows
        )
        self._log.error(
            "rows_dropped",
            "retry buffer full (%d rows, max_buffered_rows/max_buffered_mb): dropped %d rows "
            "of %s %s; a gap marker follows once writing works again",
            self._pending_rows,
            rows,
            seg.symbol,
            seg.stream.stream,
        )
        return kept, kept_rows

    def _record_drop(
        self, sk: StreamKey, first_key: int, first_time: int, last_key: int, rows: int,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        reason = reason or self._failure_reason or "buffer full"
        drop = self._drops.get((sk, reason))
        if drop is None:
            drop = self._drops[(sk, reason)] = _Drop(first_key, first_time, reason)
        drop.first_key = min(drop.first_key, first_key)
        drop.last_key = max(drop.last_key, last_key)
        drop.rows += rows
        self._counters.incr("rows_dropped", sk.symbol, sk.stream, rows)

    def _new_seg(self, target: _Target) -> _Seg:
        kind, exchange, market, symbol, interval, period = target
        layout.check_component("exchange", exchange)
        layout.check_component("market", market)
        layout.check_component("symbol", symbol)
        if kind == layout.KLINE:
            layout.check_component("interval", interval)
        stream = layout.stream_name(kind, interval)
        label = self._periods.label(period)
        directory = self._pf.partition_dir(self._root, exchange, market, stream, symbol, label)
        seg = _Seg(target, directory, label)
        if kind != layout.MARKERS:
            seg.stream = StreamKey(exchange, market, symbol, stream)
        self._new_path(seg)
        self._segs[target] = seg
        self._counters.set("segments_open", len(self._segs))
        return seg

    def _new_path(self, seg: _Seg) -> None:
        """Start a new segment file for ``seg`` (nothing is created before its first write)."""
        n = time.time_ns()
        while True:
            path = os.path.join(seg.directory, self._pf.segment_name(seg.label, n))
            if not os.path.exists(path) and not os.path.exists(
                os.path.join(seg.directory, self._pf.part_name(os.path.basename(path)))
            ):
                break
            n += 1
        seg.path = path
        seg.size = 0
        seg.identity = None

    def _rotate(self, seg: _Seg) -> None:
        """Retire the previous period's segment of this stream when a newer period starts."""
        stream = seg.target[:5]
        period = seg.target[5]
        current = self._current.get(stream)
        if current is not None and period < current:
            seg.retired = True  # a straggler for a past period: finish it after this flush
        elif current is None or period > current:
            self._current[stream] = period
            if current is not None:
                old = self._segs.get((*stream, current))
                if old is not None:
                    old.retired = True

    # --- flush -------------------------------------------------------------------------

    def _flush_sync(self) -> None:
        self._last_flush = time.monotonic()
        errors = 0
        for target, seg in list(self._dirty.items()):
            if seg.records:
                self._encode(seg)
            if self._write_seg(seg):
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
        self._finish_retired()
        self._counters.set("rows_buffered", self._pending_rows if self._failing else 0)

    def _encode(self, seg: _Seg) -> None:
        """Turn ``seg``'s pending records into one record batch (an IPC message)."""
        records, seg.records = seg.records, []
        rows, seg.rows = seg.rows, 0
        market = seg.market
        levels = self._opts.book_levels
        if levels is not None and seg.kind == layout.ORDERBOOK:
            cut = sum(max(0, len(r.bids) - levels) + max(0, len(r.asks) - levels)
                      for r in records)  # fmt: skip
            if cut:
                self._counters.incr("book_levels_truncated", n=cut)
        try:
            batch = self._types.batch(seg.kind, market, records, levels)
        except self._ps.Unrepresentable:
            records, batch = self._encode_slow(seg, records, levels)
            kept = self._ps.rows_of(seg.kind, records)
            self._pending_rows -= rows - kept
            rows = kept
            if batch is None:
                return
        data = batch.serialize().to_pybytes()
        seg.unwritten.append(data)
        seg.unwritten_rows += rows
        seg.unwritten_bytes += len(data)
        self._pending_bytes += len(data)

    def _encode_slow(self, seg: _Seg, records: list, levels):
        """Find the records whose values the column type cannot hold; drop and report them."""
        good = []
        for r in records:
            try:
                self._types.batch(seg.kind, seg.market, [r], levels)
            except self._ps.Unrepresentable as exc:
                sk = seg.stream
                if sk is None:
                    continue
                k = record_key(r)
                self._counters.incr("values_unrepresentable", sk.symbol, sk.stream)
                self._record_drop(
                    sk, k, record_time(r), k, self._ps.rows_of(seg.kind, [r]),
                    reason=f"value not representable as {self._types.number}",
                )  # fmt: skip
                self._log.error(
                    "unrepresentable",
                    "dropped a %s record of %s (key %s): %s; set price_type: float or a "
                    "larger decimal_scale to keep such values",
                    sk.stream,
                    sk.symbol,
                    k,
                    exc,
                )
                continue
            good.append(r)
        if not good:
            return [], None
        return good, self._types.batch(seg.kind, seg.market, good, levels)

    def _write_seg(self, seg: _Seg) -> bool:
        """Append ``seg``'s encoded batches with one write; False (kept) on an OS error."""
        if not seg.unwritten:
            return True
        io = self._io
        try:
            fd = self._open_seg(seg)
            try:
                data = b"".join(seg.unwritten)
                if seg.size == 0:
                    data = self._types.schema(seg.kind, seg.market).serialize().to_pybytes() + data
                before = seg.size
                try:
                    io.write(fd, data)
                except OSError:
                    self._undo(seg, fd, before)
                    raise
                seg.size += len(data)
                if self._opts.fsync == "flush":
                    self._fsync(seg, fd)
            finally:
                with contextlib.suppress(OSError):
                    io.close(fd)
        except OSError as exc:
            self._on_error(seg, exc)
            return False
        self._written(seg, len(data))
        return True

    def _open_seg(self, seg: _Seg) -> int:
        """Open ``seg``'s file for appending; a file deleted, replaced or changed behind our
        back is left alone and a new segment started (rows already in it went with it)."""
        io = self._io
        if seg.directory not in self._made_dirs or not os.path.isdir(seg.directory):
            if seg.directory in self._made_dirs:
                self._counters.incr("dirs_recreated")
                self._log.warning(
                    "dir_recreated", "%s was deleted while running; created it again",
                    seg.directory,
                )  # fmt: skip
            io.makedirs(seg.directory)
            self._made_dirs.add(seg.directory)
        for _attempt in range(3):
            fd = io.open(seg.path)
            st = os.fstat(fd)
            if (seg.identity is None and st.st_size == 0) or (
                (st.st_dev, st.st_ino) == seg.identity and st.st_size == seg.size
            ):
                seg.identity = (st.st_dev, st.st_ino)
                return fd
            io.close(fd)
            self._counters.incr("files_reopened")
            self._log.warning(
                "file_reopened",
                "%s was deleted or changed by someone else; continuing in a new segment",
                seg.path,
            )
            self._new_path(seg)
        raise OSError(errno.EBUSY, "segment keeps being replaced while opening", seg.path)

    def _undo(self, seg: _Seg, fd: int, size: int) -> None:
        """Cut a partial write back off; if that fails, the segment (whole up to ``size``)
        is closed for good and the rows go to a new one (a torn message would hide every
        batch after it)."""
        try:
            self._io.truncate(fd, size)
        except OSError:
            if size:
                self._to_compact.append(seg.path)
            self._new_path(seg)

    def _fsync(self, seg: _Seg, fd: int) -> None:
        try:
            self._io.fsync(fd)
            if seg.size and seg.written_rows == 0:
                self._io.fsync_dir(seg.directory)
        except OSError as exc:
            self._counters.incr("fsync_errors")
            self._log.error("fsync_error", "cannot fsync %s: %s", seg.path, exc)

    def _written(self, seg: _Seg, nbytes: int) -> None:
        rows = seg.unwritten_rows
        counters = self._counters
        counters.incr("bytes_written", n=nbytes)
        counters.incr("rows_written", seg.symbol, _stream_of(seg), rows)
        if seg.stream is not None and seg.pending_key is not None and not seg.records:
            self._durable[seg.stream] = seg.pending_key
        self._pending_rows -= rows
        self._pending_bytes -= seg.unwritten_bytes
        seg.written_rows += rows
        seg.unwritten = []
        seg.unwritten_rows = seg.unwritten_bytes = 0
        if not seg.records:
            seg.pending_key = None
            seg.pending_first = None

    def _on_error(self, seg: _Seg, exc: OSError) -> None:
        reason = _reason(exc)
        self._failure_reason = self._failure_reason or reason
        self._counters.incr("write_errors", seg.symbol, _stream_of(seg))
        self._log.error(
            reason.split(":")[0].replace(" ", "_"),
            "cannot write %s: %s (%s); %d rows wait in the retry buffer (max_buffered_rows "
            "%d) and are retried on the next flush",
            seg.path,
            reason,
            exc,
            self._pending_rows,
            self._opts.max_buffered_rows,
        )

    def _report_drops(self) -> None:
        drops, self._drops = self._drops, {}
        markers = [
            Marker(
                exchange=sk.exchange, market=sk.market, symbol=sk.symbol, stream=sk.stream,
                kind="gap", first_key=d.first_key, last_key=d.last_key, time=d.time,
                reason=d.reason,
            )
            for (sk, _), d in drops.items()
        ]  # fmt: skip
        self._counters.incr("gap_markers", n=len(markers))
        span = self._periods.span
        for m in markers:
            t = layout.ms_time(m.time or time.time_ns() // 1_000_000)
            if not m.time:
                m = msgspec.structs.replace(m, time=t)
            self._accept((layout.MARKERS, m.exchange, m.market, m.symbol, "", t // span), [m])
        for target, seg in list(self._dirty.items()):
            if seg.kind == layout.MARKERS:
                if seg.records:
                    self._encode(seg)
                if self._write_seg(seg):
                    del self._dirty[target]

    def _finish_retired(self) -> None:
        """Compact the segments of past periods once nothing is pending for them, and retry
        compactions that failed."""
        for target, seg in list(self._segs.items()):
            if seg.retired and not seg.pending:
                del self._segs[target]
                if seg.size:
                    self._to_compact.append(seg.path)
        self._counters.set("segments_open", len(self._segs))
        self._compact_pending()

    def _compact_pending(self) -> None:
        paths, self._to_compact = self._to_compact, []
        for path in paths:
            try:
                rows, _ = self._pf.compact(self._io, path, **self._compact_args())
            except OSError as exc:
                self._to_compact.append(path)
                self._counters.incr("compaction_errors")
                self._log.error(
                    "compaction_error",
                    "cannot compact %s into Parquet: %s (%s); the segment is kept and "
                    "compacted on a later flush",
                    path,
                    _reason(exc),
                    exc,
                )
                continue
            self._counters.incr("files_compacted")
            self._counters.incr("rows_compacted", n=rows)

    def _close_sync(self) -> None:
        if self._closed:
            return
        self._flush_sync()
        if self._pending_rows:
            self._mark_lost()
        for seg in self._segs.values():
            if seg.size:
                self._to_compact.append(seg.path)
        self._segs.clear()
        self._counters.set("segments_open", 0)
        self._compact_pending()
        if self._to_compact:
            self._log.error(
                "compaction_error",
                "%d segment(s) could not be compacted before exit; the next start finishes "
                "them (they are readable as Arrow IPC streams): %s",
                len(self._to_compact),
                ", ".join(self._to_compact[:5]),
            )
        self._closed = True

    def _mark_lost(self) -> None:
        """Rows that cannot be written before exit: counted, logged and recorded as ``gap``
        markers; afterwards ``pending_rows`` counts exactly the lost data rows."""
        reason = f"not written before exit: {self._failure_reason or 'write error'}"
        lost = 0
        for target, seg in list(self._dirty.items()):
            sk = seg.stream
            if sk is None or not seg.pending or seg.pending_first is None:
                continue
            first_key, first_time = seg.pending_first
            rows = seg.pending
            self._record_drop(sk, first_key, first_time, seg.pending_key or first_key, rows,
                              reason=reason)  # fmt: skip
            lost += rows
            self._pending_bytes -= seg.unwritten_bytes
            seg.records, seg.unwritten = [], []
            seg.rows = seg.unwritten_rows = seg.unwritten_bytes = 0
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
        self._pending_rows = lost


def _stream_of(seg: _Seg) -> str:
    return seg.stream.stream if seg.stream is not None else layout.MARKERS


@hookimpl
def register_sinks(register) -> None:
    """Register the ``parquet`` sink."""
    register("parquet", ParquetSink)
