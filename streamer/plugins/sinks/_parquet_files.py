"""Files of the parquet sink (private to :mod:`.parquet_sink`; imports pyarrow).

Tree under the sink's ``path`` (Hive partitions; ``<label>`` is ``YYYY-MM-DD``, or
``YYYY-MM-DD-HH`` with hourly rotation)::

    exchange=<ex>/market=<mk>/stream=<stream>/symbol=<SYM>/date=<YYYY-MM-DD>/
        part-<label>-<n>.parquet     a finished file: complete, zstd, never changed again
        _open-<label>-<n>.arrows     the open segment: an Arrow IPC stream, appended at
                                     every flush, whole record batches up to the last one
        _tmp-<label>-<n>.parquet.tmp a Parquet file being written (renamed when complete)

``<stream>`` is ``aggtrade``, ``depth``, ``kline_<interval>``, ``orderbook`` or ``markers``;
``<n>`` (nanoseconds when the segment was opened) keeps files of one period in write order.
Readers that take ``*.parquet`` (or skip names starting with ``_``, as pyarrow does) see
finished files only.

A segment file is a schema message followed by record-batch messages (the IPC stream
format, without the end-of-stream marker); a write of one flush is whole batches, so after a
crash every batch but a torn last one is readable (:class:`Segment`). :func:`compact` turns a
segment into one Parquet file under a temporary name, makes it durable and renames it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import _sink_layout as layout
from ._csv_files import FileIO as _FileIO

SEGMENT_PREFIX, SEGMENT_SUFFIX = "_open-", ".arrows"
TMP_PREFIX, TMP_SUFFIX = "_tmp-", ".parquet.tmp"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
_NAME = re.compile(r"^(?:part-|_open-)(\d{4}-\d{2}-\d{2}(?:-\d{2})?)-(\d+)(?:\.parquet|\.arrows)$")
_PARTITION = re.compile(r"^([a-z]+)=(.+)$")


class FileIO(_FileIO):
    """The system calls the sink uses (the csv sink's, plus rename and unlink); tests
    replace it to inject disk-full or permission errors."""

    def rename(self, src: str, dst: str) -> None:
        """Atomically move ``src`` to ``dst``."""
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        """Remove ``path`` (no error if it is gone)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def partition_dir(root: str, exchange: str, market: str, stream: str, symbol: str, label: str):
    """The folder of one stream's files of one UTC day."""
    return os.path.join(
        root,
        f"exchange={exchange}",
        f"market={market}",
        f"stream={stream}",
        f"symbol={symbol}",
        f"date={label[:10]}",
    )


def segment_name(label: str, n: int) -> str:
    return f"{SEGMENT_PREFIX}{label}-{n}{SEGMENT_SUFFIX}"


def part_name(segment: str) -> str:
    """The finished file's name of a segment."""
    return PART_PREFIX + segment[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)] + PART_SUFFIX


def tmp_name(segment: str) -> str:
    return TMP_PREFIX + segment[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)] + TMP_SUFFIX


def file_order(name: str) -> tuple[str, int] | None:
    """Sort key of a part or segment name (write order), ``None`` for anything else."""
    m = _NAME.match(name)
    return None if m is None else (m.group(1), int(m.group(2)))


def kind_of_stream(stream: str) -> tuple[str, str] | None:
    """``(kind, interval)`` of a ``stream=`` partition value, ``None`` if unknown."""
    if stream in (layout.AGGTRADE, layout.DEPTH, layout.ORDERBOOK, layout.MARKERS):
        return stream, ""
    if stream.startswith("kline_") and len(stream) > 6:
        return layout.KLINE, stream[6:]
    return None


def _value(name: str, key: str) -> str | None:
    m = _PARTITION.match(name)
    return m.group(2) if m is not None and m.group(1) == key else None


def stream_partitions(root: str, subdirs) -> Iterator[tuple[str, str, str, str, str, str, str]]:
    """``(kind, interval, exchange, market, stream, symbol, folder)`` of every stream folder
    (``.../symbol=<SYM>``) of the tree, sorted. ``subdirs`` lists sub-folders."""
    for ex_dir in subdirs(root):
        exchange = _value(ex_dir, "exchange")
        if exchange is None:
            continue
        ex_path = os.path.join(root, ex_dir)
        for mk_dir in subdirs(ex_path):
            market = _value(mk_dir, "market")
            if market is None:
                continue
            mk_path = os.path.join(ex_path, mk_dir)
            for st_dir in subdirs(mk_path):
                stream = _value(st_dir, "stream")
                kind = None if stream is None else kind_of_stream(stream)
                if kind is None:
                    continue
                st_path = os.path.join(mk_path, st_dir)
                for sy_dir in subdirs(st_path):
                    symbol = _value(sy_dir, "symbol")
                    if symbol is not None:
                        folder = os.path.join(st_path, sy_dir)
                        yield (*kind, exchange, market, stream, symbol, folder)


def date_dirs(folder: str, subdirs) -> list[str]:
    """The ``date=`` folders of a stream folder, oldest first."""
    return [os.path.join(folder, d) for d in subdirs(folder) if _value(d, "date") is not None]


class Segment:
    """Reads the whole record batches of a segment file; after iterating, ``torn`` is True
    when it ended in a partial message (a crash mid-write) and ``schema`` is its schema
    (``None`` when not even that was whole)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.torn = False
        self.schema: pa.Schema | None = None
        self.rows = 0

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        with pa.OSFile(self.path) as f:
            try:
                reader = pa.ipc.open_stream(f)
            except (pa.ArrowInvalid, OSError, EOFError):
                self.torn = os.path.getsize(self.path) > 0
                return
            self.schema = reader.schema
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError, EOFError):
                    self.torn = True
                    return
                self.rows += batch.num_rows
                yield batch


class _FdFile:
    """A write-only file object over a descriptor, writing through :class:`FileIO` (so the
    Parquet writer meets the same injected faults as the segments)."""

    def __init__(self, io: FileIO, fd: int) -> None:
        self._io, self._fd, self._pos = io, fd, 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self._io.write(self._fd, data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def compact(
    io: FileIO,
    segment_path: str,
    *,
    row_group_rows: int,
    zstd_level: int,
    fsync: bool,
) -> tuple[int, bool]:
    """Turn the segment at ``segment_path`` into its finished Parquet file and remove it.

    Returns ``(rows, torn)``. Idempotent after a crash: a leftover temporary file is
    rewritten; when the finished file already exists (a crash between the rename and the
    unlink), the segment is only removed. A segment without a whole batch is removed and
    leaves no file. Raises ``OSError`` with the temporary file removed; the segment stays.
    """
    folder, name = os.path.split(segment_path)
    final = os.path.join(folder, part_name(name))
    tmp = os.path.join(folder, tmp_name(name))
    if os.path.exists(final):
        io.unlink(segment_path)
        return 0, False
    seg = Segment(segment_path)
    writer: pq.ParquetWriter | None = None
    fd: int | None = None
    pending: list[pa.RecordBatch] = []
    held = 0
    try:
        for batch in seg:
            pending.append(batch)
            held += batch.num_rows
            if held < row_group_rows:
                continue
            if writer is None:
                fd, writer = _open_parquet(io, tmp, batch.schema, zstd_level)
            writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
            pending, held = [], 0
        if pending:
            if writer is None:
                fd, writer = _open_parquet(io, tmp, pending[0].schema, zstd_level)
            writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
        if writer is None:
            io.unlink(segment_path)  # nothing whole in it: no file
            return 0, seg.torn
        writer.close()
        writer = None
        if fsync:
            io.fsync(fd)
        io.close(fd)
        fd = None
        io.rename(tmp, final)
        if fsync:
            io.fsync_dir(folder)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        if fd is not None:
            with contextlib.suppress(OSError):
                io.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    io.unlink(segment_path)
    return seg.rows, seg.torn


def _open_parquet(io: FileIO, tmp: str, schema: pa.Schema, level: int):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash during an earlier compaction
    fd = io.open(tmp)
    try:
        writer = pq.ParquetWriter(
            _FdFile(io, fd),
            schema,
            compression="zstd",
            compression_level=level,
            write_statistics=statistics_columns(schema),
            **encodings(schema),
        )
    except BaseException:
        io.close(fd)
        raise
    return fd, writer


def encodings(schema: pa.Schema) -> dict:
    """Column encodings of finished files: ids and times (int64, timestamps) delta-encoded,
    the few strings (side, marker fields) dictionary-encoded, numbers plain. Dictionary
    encoding of high-cardinality prices made files twice as big and compaction 5x slower."""
    deltas = {
        f.name: "DELTA_BINARY_PACKED"
        for f in schema
        if pa.types.is_int64(f.type) or pa.types.is_timestamp(f.type)
    }
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    return {"use_dictionary": strings or False, "column_encoding": deltas or None}


def statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns with min/max statistics in finished files: ids, times and strings (what
    readers filter on, and :func:`max_key` reads); not prices and quantities, whose
    statistics cost a fifth of the compaction time of order books and serve no filter."""
    return [
        f.name
        for f in schema
        if not (pa.types.is_list(f.type) or pa.types.is_decimal(f.type)
                or pa.types.is_floating(f.type))
    ]  # fmt: skip


def max_key(path: str, column: str) -> int | None:
    """The largest value of ``column`` in a Parquet file (from its footer statistics when
    present), ``None`` when the file holds no row."""
    meta = pq.ParquetFile(path).metadata
    if meta.num_rows == 0:
        return None
    index = meta.schema.to_arrow_schema().get_field_index(column)
    if index < 0:
        raise ValueError(f"{path}: no column {column}")
    best = None
    for i in range(meta.num_row_groups):
        col = meta.row_group(i).column(index)
        stats = col.statistics
        if stats is None or not stats.has_min_max:
            values = pq.read_table(path, columns=[column]).column(0)
            return max(values.to_pylist())
        best = stats.max if best is None else max(best, stats.max)
    return best
