"""``streamer verify --sink parquet``: are the files of the parquet sink complete and consistent?

The checks are the CSV sink's (:mod:`._csv_verify`: gaps and duplicates of aggTrade ids and
klines, depth update-id chain breaks, crossed or out-of-order books, explained by marker
rows), run on the same rows: each record batch of a Parquet file or open segment is
rendered as the CSV rows the csv sink would have written (only the cells the checks read are
exact; an order book is cut to its best level) and fed to the CSV checkers. Files are read in
write order across the ``date=`` partitions: finished ``part-*.parquet`` files and the open
``_open-*.arrows`` segments of a running (or crashed) collector. ``line`` in a problem is
the row number within its file (1 = first row).

Parquet-specific problems: ``torn`` (a segment ending in a partial batch: a crash; the next
start drops it), ``header`` (a file whose columns are not the sink's), ``corrupt`` (a file
that cannot be read).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import _csv_verify as cv
from . import _parquet_files as pf
from . import _parquet_schema as ps
from . import _sink_layout as layout

_BATCH_ROWS = 65_536


def _columns(kind: str, market: str) -> tuple[str, ...]:
    if kind == layout.AGGTRADE:
        return layout.aggtrade_columns(market)
    if kind == layout.KLINE:
        return layout.KLINE_COLUMNS
    if kind == layout.DEPTH:
        return layout.DEPTH_COLUMNS
    if kind == layout.ORDERBOOK:
        return (*layout.BOOK_PREFIX_COLUMNS, *ps.BOOK_LIST_COLUMNS)
    return layout.MARKER_COLUMNS


def _checker(kind: str, report: cv.StreamReport, interval: str) -> cv._Checker:
    if kind == layout.AGGTRADE:
        return cv._AggTrades(report, len(layout.aggtrade_columns(report.market)))
    if kind == layout.KLINE:
        return cv._Klines(report, len(layout.KLINE_COLUMNS), interval)
    if kind == layout.DEPTH:
        return cv._Depth(report, len(layout.DEPTH_COLUMNS), futures=report.market != "spot")
    return cv._Books(report, len(layout.BOOK_PREFIX_COLUMNS) + 4, 1)


def _cells(column: pa.Array) -> pa.Array:
    """A column as the CSV sink's cells (booleans ``true``/``false``, nulls empty)."""
    return column.cast(pa.string())


def _first(column: pa.Array) -> pa.Array:
    """The best level of a list column, as a cell (empty for an empty side)."""
    return pa.array(["" if not x else str(x[0]) for x in column.to_pylist()], pa.string())


def _csv_block(kind: str, batch: pa.RecordBatch) -> bytes:
    """The rows of ``batch`` as CSV lines in the csv sink's column order."""
    if kind == layout.ORDERBOOK:
        n = batch.num_rows
        empty = pa.array([""] * n, pa.string())
        cells = [_cells(batch.column(c)) for c in layout.BOOK_PREFIX_COLUMNS]
        cells += [
            _first(batch.column("bid_price")),
            empty,
            _first(batch.column("ask_price")),
            empty,
        ]
    else:
        cells = [_cells(batch.column(i)) for i in range(batch.num_columns - 1)]  # no timestamp
    lines = pc.binary_join_element_wise(*cells, ",", null_handling="replace", null_replacement="")
    return ("\n".join(lines.to_pylist()) + "\n").encode()


def _batches(path: str) -> tuple[Iterator[pa.RecordBatch], object]:
    if path.endswith(pf.SEGMENT_SUFFIX):
        seg = pf.Segment(path)
        return iter(seg), seg
    f = pq.ParquetFile(path)
    return f.iter_batches(batch_size=_BATCH_ROWS), f


def _schema_ok(kind: str, market: str, names: list[str]) -> bool:
    return tuple(names) == (*_columns(kind, market), ps.TIMESTAMP)


def _read(path: str, rel: str, kind: str, market: str, sr: cv.StreamReport, on_batch) -> None:
    """Feed every whole batch of one file to ``on_batch``; problems go to ``sr``."""
    try:
        batches, source = _batches(path)
        if isinstance(source, pq.ParquetFile):
            names = source.schema_arrow.names
            if not _schema_ok(kind, market, names):
                sr.problems.append(cv.Problem("header", rel, 0, detail=f"columns {names}"))
                return
        checked = False
        for batch in batches:
            if not checked:
                checked = True
                if not _schema_ok(kind, market, batch.schema.names):
                    sr.problems.append(
                        cv.Problem("header", rel, 0, detail=f"columns {batch.schema.names}")
                    )
                    return
            if batch.num_rows:
                on_batch(batch)
    except (OSError, pa.ArrowException) as exc:
        sr.problems.append(cv.Problem("corrupt", rel, 0, detail=f"unreadable: {exc}"))
        return
    if isinstance(source, pf.Segment) and source.torn:
        sr.problems.append(
            cv.Problem("torn", rel, source.rows + 1, detail="torn last batch of a segment")
        )


def _files(folder: str) -> list[tuple[str, str]]:
    """``(path, path relative to the stream folder)`` of its data files, in write order."""
    found = []
    for date_dir in pf.date_dirs(folder, cv._subdirs):
        with os.scandir(date_dir) as it:
            for e in it:
                order = pf.file_order(e.name)
                if order is not None and e.is_file(follow_symlinks=False):
                    rel = f"{os.path.basename(date_dir)}/{e.name}"
                    found.append((order, e.name.startswith(pf.SEGMENT_PREFIX), e.path, rel))
    found.sort()
    return [(path, rel) for _, _, path, rel in found]


def verify(root: str | os.PathLike[str]) -> cv.Report:
    """Check every stream under ``root`` (the ``path`` of a ``parquet`` sink); raises
    :class:`~._csv_verify.VerifyError` when it is not a readable parquet sink tree."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "not a directory" if os.path.exists(root) else "no such directory"
        raise cv.VerifyError(f"{root}: {what}")
    streams: dict[tuple[str, str, str, str], cv.StreamReport] = {}
    markers: dict[tuple[str, str, str, str], list] = {}
    checkers: dict[tuple[str, str, str, str], cv._Checker] = {}
    report = cv.Report(root=root, streams=[])

    def stream(key: tuple[str, str, str, str]) -> cv.StreamReport:
        if key not in streams:
            streams[key] = cv.StreamReport(*key)
        return streams[key]

    try:
        folders = list(pf.stream_partitions(root, cv._subdirs))
    except OSError as exc:
        raise cv.VerifyError(f"{root}: {exc.strerror or exc}") from None
    for kind, interval, ex, mk, name, sym, folder in folders:
        try:
            files = _files(folder)
        except OSError as exc:
            report.warnings.append(f"{folder}: {exc.strerror or exc}")
            continue
        key = (ex, mk, sym, name)
        sr = stream(key)
        for path, rel in files:
            report.files += 1
            sr.files += 1
            if kind == layout.MARKERS:
                _read(path, rel, kind, mk, sr, _marker_reader(sr, key, stream, markers))
                continue
            chk = checkers.get(key)
            if chk is None:
                chk = checkers[key] = _checker(kind, sr, interval)
            chk.file = rel
            line = [1]

            def feed(batch: pa.RecordBatch, chk=chk, line=line, kind=kind, sr=sr) -> None:
                rows, used = chk.feed(_csv_block(kind, batch), line[0])
                sr.rows += rows
                line[0] += used

            _read(path, rel, kind, mk, sr, feed)
    if not report.files:
        raise cv.VerifyError(
            f"{root}: no files of the parquet sink's layout found (give the sink's path, the "
            "folder holding exchange=<exchange>/market=<market>/stream=<stream>/...)"
        )
    for key, sr in streams.items():
        chk = checkers.get(key)
        if chk is not None:
            sr.problems += chk.problems
            sr.problems_omitted += chk.omitted
        sr.problems.sort(key=lambda p: (p.file, p.line))
        cv._explain(sr.problems, markers.get(key, []))
        sr.explained = sum(1 for p in sr.problems if p.explained_by)
        sr.errors = len(sr.problems) - sr.explained + sr.problems_omitted
        report.rows += sr.rows
        report.errors += sr.errors
        report.explained += sr.explained
    report.streams = [streams[k] for k in sorted(streams)]
    return report


def _marker_reader(sr_file: cv.StreamReport, key, stream, markers):
    ex, mk, sym, _ = key

    def add(batch: pa.RecordBatch) -> None:
        cols = batch.to_pydict()
        for st, kind, first, last, reason in zip(
            cols["stream"], cols["kind"], cols["first_key"], cols["last_key"], cols["reason"],
            strict=True,
        ):  # fmt: skip
            about = (ex, mk, sym, st)
            sr = stream(about)
            sr.markers[kind] = sr.markers.get(kind, 0) + 1
            markers.setdefault(about, []).append(cv._Marker(kind, first, last, reason))
            sr_file.rows += 1

    return add


def verify_tree(root: str | os.PathLike[str], *, as_json: bool = False) -> tuple[str, int]:
    """The report on the parquet tree at ``root`` (a table, or JSON) and its exit code: 0
    when every problem is explained by a marker, 1 otherwise."""
    report = verify(root)
    text = cv.render_json(report) if as_json else cv.render_table(report)
    return text, report.exit_code
