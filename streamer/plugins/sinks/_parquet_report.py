"""``streamer report DATA --sink parquet``: the facts of a parquet tree (private to
:mod:`.parquet_sink`; imports pyarrow).

The report of a csv tree (:mod:`._csv_report`) is reused whole: its walk (symbol filter,
period filter, markers first, then stream by stream) and its per-stream facts, fed here
with the rows of the Parquet files and open segments rendered as csv rows batch by batch
(:func:`._parquet_verify._csv_block`, the same rendering ``verify --sink parquet`` checks),
so gaps, causes, coverage, counts per minute, latency and klines are the csv tree's for the
same records. Only ``bytes``, ``files`` and the ``where`` of a problem (``date=.../part-...``
and the row within that file) are the parquet files' own.

Memory: one record batch of one file at a time (at most 65,536 rows), plus the current
symbol's markers and one stream's per-day aggregates, as for csv.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pyarrow as pa

from streamer import Progress, StreamFacts

from . import _csv_report as cr
from . import _csv_verify as cv
from . import _parquet_files as pf
from . import _parquet_verify as pv
from . import _sink_layout as layout


def _span(name: str) -> tuple[int, int] | None:
    """The period a part or segment name labels (``YYYY-MM-DD`` or ``YYYY-MM-DD-HH``)."""
    order = pf.file_order(os.path.basename(name))
    if order is None:
        return None
    label = order[0]
    return cr.period_span(label[:10], int(label[11:13]) if len(label) > 10 else 24)


def _listing(folder: str) -> list[tuple[str, int, tuple[int, int]]]:
    """``(path relative to the stream folder, size, period span)`` of its files, in write
    order."""
    out = []
    for path, rel in pv._files(folder):
        span = _span(rel)
        if span is None:
            continue
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        out.append((rel, size, span))
    return out


def no_files_error(root: str) -> cv.VerifyError:
    """The error for a folder holding no file of the parquet sink's layout."""
    return cv.VerifyError(
        f"{root}: no files of the parquet sink's layout found (give the sink's path, the "
        "folder holding exchange=<exchange>/market=<market>/stream=<stream>/...)"
    )


def report_facts(
    root: str | os.PathLike[str],
    *,
    start: int | None = None,
    end: int | None = None,
    symbols: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Iterator[StreamFacts]:
    """One :class:`StreamFacts` per stream of the parquet tree at ``root`` (only
    ``symbols``, only files and rows in ``[start, end)`` ms when given). Raises
    ``ValueError`` (one line) when ``root`` is not a parquet tree or nothing is left after
    the filters."""
    root = cv.check_root(root)
    try:
        folders = list(pf.stream_partitions(root, cv._subdirs))
    except OSError as exc:
        raise cv.VerifyError(f"{root}: {exc.strerror or exc}") from None

    def entries() -> Iterator[cr.Entry]:
        for kind, interval, ex, mk, _stream, sym, folder in folders:
            try:
                files = _listing(folder)
            except OSError:
                continue
            yield kind, ex, mk, sym, interval, folder, files

    groups = cr.select(root, entries(), start, end, symbols, no_files_error)
    return cr.facts_of(groups, start, end, progress, _read_markers, _read_stream)


def _read_markers(folder: str, files, out: dict[str, list], progress) -> None:
    ignored = cv.StreamReport("", "", "", layout.MARKERS)  # as for csv: unreadable is skipped

    def add(batch: pa.RecordBatch) -> None:
        cols = batch.to_pydict()
        for t, stream, kind, first, last, reason in zip(
            cols["time"], cols["stream"], cols["kind"], cols["first_key"], cols["last_key"],
            cols["reason"], strict=True,
        ):  # fmt: skip
            if None in (t, first, last):
                continue
            out.setdefault(stream, []).append(
                cr.new_marker(t, kind or "", first, last, reason or "")
            )

    for rel, size, _span in files:
        pv._read(os.path.join(folder, rel), rel, layout.MARKERS, "", ignored, add)
        if progress is not None:
            progress.advance(files=1, bytes_=size)


def _read_stream(reader: cr._StreamReader, folder: str, files, progress) -> StreamFacts:
    """A parquet stream's files, batch by batch, as csv rows through verify's checker."""
    sf = reader.facts
    kind, market = reader.kind, sf.market
    report = cv.StreamReport(sf.exchange, market, sf.symbol, sf.stream)
    chk = pv._checker(kind, report, reader.interval)
    order: dict[str, int] = {}
    for i, (rel, size, span) in enumerate(files):
        order[rel] = i
        reader.add_file(size, span)
        chk.file = rel
        line = [1]

        def feed(batch: pa.RecordBatch, line=line) -> None:
            block = pv._csv_block(kind, batch)
            before = len(chk.problems)
            rows, used = chk.feed(block, line[0])
            reader.on_block(block, line[0], chk, before)
            line[0] += used
            if progress is not None:
                progress.advance(rows=rows)

        pv._read(os.path.join(folder, rel), rel, kind, market, report, feed)
        if progress is not None:
            progress.advance(files=1, bytes_=size)
    problems = report.problems + chk.problems
    problems.sort(key=lambda p: (order.get(p.file, -1), p.line))
    return reader.finish(problems, chk.omitted)
