"""``streamer report DATA_DIR``: the facts of a csv tree (private to :mod:`.csv_batch`).

:func:`report_facts` walks the tree with the same walker and reads the files with the same
block reader and checkers as ``streamer verify`` (:mod:`._csv_verify`), so gaps, chain
breaks and their explanations are verify's, found in one pass. A hook on every checked
block adds what the report needs: rows and messages per minute, a latency histogram per
hour (exchange event time to ``receive_time``), bytes per day, and the time range of every
gap and marker (the rows around it).

The walk (:func:`select`, :func:`facts_of`) and the per-stream facts (:class:`_StreamReader`:
one call of ``on_block`` per block of csv rows a checker has seen) do not care where the rows
come from: the parquet sink's report (:mod:`._parquet_report`) feeds them its own files'
rows, rendered as csv rows as its verify does.

Memory: the tree is read symbol by symbol (its markers first, then each stream), and only
one stream's per-day aggregates are held at a time; rows are never kept.
"""

from __future__ import annotations

import bisect
import calendar
import contextlib
import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import msgspec

from streamer import (
    KLINE_INTERVALS,
    LATENCY_BUCKETS,
    LATENCY_EDGES_MS,
    DayFacts,
    GapFact,
    Progress,
    StreamFacts,
    day_label,
    interval_ms,
)

from . import _csv_layout as layout
from . import _csv_verify as verify

_MS_DAY = 86_400_000
_MICROS = 100_000_000_000_000  # times above are microseconds (see layout.ms_time)
#: Marker kinds after which rows are missing (``filled`` and ``verify_mismatch``: not).
_MISSING_KINDS = frozenset({"unfillable", "gap", "overflow", "resync"})
#: An orderbook silent longer than this (and than 3 times its mean spacing) is a hole: no
#: key tells of missing books (a stopped collector leaves no marker there).
BOOK_SILENCE_MS = 10_000


class _Marker(msgspec.Struct):
    time: int
    kind: str
    first: int
    last: int
    reason: str


def cause_of(kind: str, reason: str) -> str:
    """The cause named in the report for a marker: its kind, a ``gap`` refined by its reason
    (``restart``, ``shutdown``: rows lost when the collector stopped)."""
    text = reason.lower()
    if kind == "gap":
        if "restart" in text:
            return "restart"
        if "before exit" in text or "shutdown" in text:
            return "shutdown"
    return kind


def period_span(date: str, hour: int) -> tuple[int, int]:
    """``(start, end)`` in ms of a rotation period: the UTC day ``date`` (``YYYY-MM-DD``),
    or one hour of it (``hour`` 0-23; 24: the whole day)."""
    y, m, d = (int(x) for x in date.split("-"))
    day = calendar.timegm((y, m, d, 0, 0, 0)) * 1000
    if hour == 24:
        return day, day + _MS_DAY
    return day + hour * 3_600_000, day + (hour + 1) * 3_600_000


def _period_start(name: str) -> tuple[int, int] | None:
    """``(start, end)`` in ms of the period a csv file name labels (a day or an hour)."""
    key = layout.period_sort_key(name)
    return None if key is None else period_span(*key)


def _listing(folder: str) -> list[tuple[str, int, tuple[int, int]]]:
    """``(name, size, period span)`` of the data files of a csv stream folder."""
    out = []
    for name in verify._data_files(folder):
        span = _period_start(name)
        if span is None:
            continue
        try:
            size = os.stat(os.path.join(folder, name)).st_size
        except OSError:
            size = 0
        out.append((name, size, span))
    return out


def report_facts(
    root: str | os.PathLike[str],
    *,
    start: int | None = None,
    end: int | None = None,
    symbols: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Iterator[StreamFacts]:
    """One :class:`StreamFacts` per stream of the csv tree at ``root`` (only ``symbols``,
    only files and rows in ``[start, end)`` ms when given). Raises ``ValueError`` (one line)
    when ``root`` is not a csv tree or nothing is left after the filters."""
    root = verify.check_root(root)
    try:
        folders = list(layout.stream_folders(root, verify._subdirs))
    except OSError as exc:
        raise verify.VerifyError(f"{root}: {exc.strerror or exc}") from None

    def entries() -> Iterator[Entry]:
        for kind, ex, mk, sym, interval, folder in folders:
            try:
                files = _listing(folder)
            except OSError:
                continue
            yield kind, ex, mk, sym, interval, folder, files

    groups = select(root, entries(), start, end, symbols, verify.no_files_error)
    return facts_of(groups, start, end, progress, _read_markers, _read_stream)


#: ``(kind, exchange, market, symbol, interval, folder, files)`` of one stream folder, each
#: file as ``(name relative to the folder, size, (start, end) ms of its period)``.
Entry = tuple[str, str, str, str, str, str, list[tuple[str, int, tuple[int, int]]]]
#: Reads one symbol's marker files (folder, files, out by stream name, progress).
MarkerReader = Callable[[str, list, dict[str, list["_Marker"]], "Progress | None"], None]
#: Reads one stream's files into a :class:`_StreamReader` and returns its facts.
StreamRead = Callable[["_StreamReader", str, list, "Progress | None"], StreamFacts]


def select(
    root: str,
    entries: Iterable[Entry],
    start: int | None,
    end: int | None,
    symbols: Sequence[str] | None,
    no_files: Callable[[str], Exception],
) -> dict[tuple[str, str, str], list[Entry]]:
    """The stream folders to read, by ``(exchange, market, symbol)``, keeping only
    ``symbols`` and files whose period overlaps ``[start, end)``. Raises ``no_files(root)``
    when the tree holds no data file, a one-line ``ValueError`` when the filters leave
    none."""
    wanted = {s.upper() for s in symbols} if symbols else None
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    seen_symbols: set[str] = set()
    any_file = False
    for kind, ex, mk, sym, interval, folder, files in entries:
        any_file = any_file or bool(files)
        if files:
            seen_symbols.add(sym)
        if wanted is not None and sym.upper() not in wanted:
            continue
        files = [f for f in files if _overlaps(f[2], start, end)]
        if files:
            groups.setdefault((ex, mk, sym), []).append(
                (kind, ex, mk, sym, interval, folder, files)
            )
    if not any_file:
        raise no_files(root)
    if not groups:
        if wanted is not None and not wanted & {s.upper() for s in seen_symbols}:
            have = ", ".join(sorted(seen_symbols)[:10]) + (
                ", ..." if len(seen_symbols) > 10 else ""
            )
            raise verify.VerifyError(
                f"{root}: no files for symbol(s) {', '.join(sorted(wanted))} "
                f"(the tree holds {have})"
            )
        raise verify.VerifyError(f"{root}: no files in the period asked for (--from/--to)")
    return groups


def facts_of(
    groups: dict[tuple[str, str, str], list[Entry]],
    start: int | None,
    end: int | None,
    progress: Progress | None,
    read_markers: MarkerReader,
    read_stream: StreamRead,
) -> Iterator[StreamFacts]:
    """The facts of every stream of :func:`select`'s ``groups``, symbol by symbol (its
    markers first, then each stream), reading files with the sink's own readers."""
    if progress is not None:
        files = [f for entries in groups.values() for e in entries for f in e[6]]
        progress.begin(len(files), sum(size for _, size, _ in files))
    try:
        for _key, entries in sorted(groups.items()):
            yield from _symbol(entries, start, end, progress, read_markers, read_stream)
    finally:
        if progress is not None:
            progress.done()


def _overlaps(span: tuple[int, int], start: int | None, end: int | None) -> bool:
    return (start is None or span[1] > start) and (end is None or span[0] < end)


def _symbol(entries, start, end, progress, read_markers, read_stream) -> Iterator[StreamFacts]:
    markers: dict[str, list[_Marker]] = {}
    for kind, _ex, _mk, _sym, _interval, folder, files in entries:
        if kind == layout.MARKERS:
            read_markers(folder, files, markers, progress)
    done = set()
    ex, mk, sym = entries[0][1:4]
    for kind, _ex, _mk, _sym, interval, folder, files in entries:
        if kind == layout.MARKERS:
            continue
        name = layout.stream_name(kind, interval)
        done.add(name)
        reader = _StreamReader(ex, mk, sym, kind, interval, markers.get(name, []), start, end)
        yield read_stream(reader, folder, files, progress)
    for name in sorted(set(markers) - done):  # markers of a stream without any file
        reader = _StreamReader(ex, mk, sym, "", "", markers[name], start, end, stream=name)
        yield reader.finish()


def new_marker(time: int, kind: str, first: int, last: int, reason: str) -> _Marker:
    """A marker row as the report keeps it (``time`` in ms, microseconds converted)."""
    return _Marker(layout.ms_time(time), kind, first, last, reason)


def _read_markers(folder: str, files, out: dict[str, list[_Marker]], progress) -> None:
    for name, _size, _span in files:
        scan = verify._FileScan(os.path.join(folder, name), name.endswith(".gz"))
        with contextlib.suppress(OSError):
            for block in scan.blocks():
                text = block.decode("utf-8", "replace")
                for cells in csv.reader(io.StringIO(text, newline="")):
                    if len(cells) != len(layout.MARKER_COLUMNS):
                        continue
                    t, stream, kind, first, last, reason = cells
                    try:
                        m = new_marker(int(t), kind, int(first), int(last), reason)
                    except ValueError:
                        continue
                    out.setdefault(stream, []).append(m)
        if progress is not None:
            progress.advance(files=1)


def _read_stream(reader: _StreamReader, folder: str, files, progress) -> StreamFacts:
    """A csv stream's files, block by block through verify's reader and checker."""
    sf = reader.facts
    report = verify.StreamReport(sf.exchange, sf.market, sf.symbol, sf.stream)
    checkers: dict = {}
    key = (sf.exchange, sf.market, sf.symbol, sf.stream)
    hook = reader.on_block
    progress_hook = None if progress is None else verify._progress_hook(progress)

    def on_block(scan, block, line0, chk, before, rows):
        hook(block, line0, chk, before)
        if progress_hook is not None:
            progress_hook(scan, block, line0, chk, before, rows)

    for name, size, span in files:
        reader.add_file(size, span)
        path = os.path.join(folder, name)
        verify._data_file(reader.kind, reader.interval, path, name, report, checkers, key, on_block)
        if progress is not None:
            progress.advance(files=1)
    chk = checkers.get(key)
    problems = list(report.problems)
    if chk is not None:
        problems += chk.problems
        report.problems_omitted += chk.omitted
    problems.sort(key=verify._file_order)
    return reader.finish(problems, report.problems_omitted)


class _Track:
    """The rows around one marker's key range, found while the stream is read."""

    __slots__ = ("after", "before", "done", "first_in", "last_in", "m")

    def __init__(self, m: _Marker) -> None:
        self.m = m
        self.before: int | None = None  # time of the last row below first
        self.first_in: int | None = None  # of the first row at or above first
        self.last_in: int | None = None  # of the last row within [first, last]
        self.after: int | None = None  # of the first row above last
        self.done = False


# (key, placement time, event time for latency or None, receive time) columns per kind
def _columns(kind: str, market: str) -> tuple[int, int, int | None, int]:
    if kind == layout.AGGTRADE:
        cols = layout.aggtrade_columns(market)
        return 0, cols.index("transact_time"), cols.index("event_time"), len(cols) - 1
    if kind == layout.DEPTH:
        c = layout.DEPTH_COLUMNS
        return c.index("last_update_id"), 0, 0, c.index("receive_time")
    if kind == layout.KLINE:
        c = layout.KLINE_COLUMNS
        return 0, 0, c.index("event_time"), c.index("receive_time")
    return 0, 1, 1, 2  # orderbook: last_update_id, event_time (0: use receive_time), ...


class _StreamReader:
    def __init__(self, ex, mk, sym, kind, interval, markers, start, end, stream=None) -> None:
        name = stream or layout.stream_name(kind, interval)
        step = (
            interval_ms(interval) if kind == layout.KLINE and interval in KLINE_INTERVALS else None
        )
        if kind == layout.KLINE and interval == "1M":
            step = None  # calendar months: no fixed count per day
        self.facts = StreamFacts(exchange=ex, market=mk, symbol=sym, stream=name, interval_ms=step)
        self.kind, self.interval = kind, interval
        self.start, self.end = start, end
        self.markers = sorted(markers, key=lambda m: (m.first, m.time))
        self.tracks = [_Track(m) for m in self.markers if m.first]
        self.pending = 0  # tracks[:pending] have started (first <= a key seen)
        self.days: dict[str, DayFacts] = {}
        self.day_of: dict[int, DayFacts] = {}
        self.prev_time: int | None = None
        self.prev_key: int | None = None
        self.problem_times: dict[int, tuple[int | None, int | None]] = {}
        self.silences: list[tuple[int, int]] = []
        if kind:
            self.cols = _columns(kind, mk)
        self.edges = LATENCY_EDGES_MS

    def _day(self, d: int) -> DayFacts:
        facts = self.day_of.get(d)
        if facts is None:
            label = day_label(d * _MS_DAY)
            facts = self.days.get(label)
            if facts is None:
                facts = self.days[label] = DayFacts(day=label)
            self.day_of[d] = facts
        return facts

    def add_file(self, size: int, span: tuple[int, int]) -> None:
        """Count one file of ``size`` bytes holding the period ``span``."""
        sf = self.facts
        sf.files += 1
        sf.bytes += size
        day = self._day(span[0] // _MS_DAY)
        day.files += 1
        day.bytes += size

    # -- per block ------------------------------------------------------------------------
    def on_block(self, block: bytes, line0: int, chk, before: int) -> None:
        """Take the facts of one block of csv rows (first at file line ``line0``) that
        ``chk`` has just checked (its problems from index ``before`` on are this block's)."""
        if b'"' in block:
            lines, _ = verify._unquoted_lines(block)
        else:
            lines = block.split(b"\n")
            lines.pop()
        kc, tc, ec, rc = self.cols
        book = self.kind == layout.ORDERBOOK
        depth = self.kind == layout.DEPTH
        start, end = self.start, self.end
        edges = self.edges
        bucket = bisect.bisect_left
        keys: list[int] = []
        times: list[int] = []
        cur_d = -1
        day = None
        rpm = mpm = lat = lmax = None
        prev_key = self.prev_key
        t = self.prev_time or 0
        k = prev_key or 0
        for line in lines:
            c = line.split(b",")
            try:
                k = int(c[kc])
                t = int(c[tc])
                r = int(c[rc])
                e = int(c[ec]) if ec is not None and c[ec] else 0
            except (ValueError, IndexError):
                keys.append(k)
                times.append(t)
                continue
            if book and not t:
                t = r
            if t >= _MICROS:
                t //= 1000
            if e >= _MICROS:
                e //= 1000
            keys.append(k)
            times.append(t)
            if (start is not None and t < start) or (end is not None and t >= end):
                prev_key = k
                continue
            d = t // _MS_DAY
            if d != cur_d:
                cur_d = d
                day = self._day(d)
                rpm, mpm, lat, lmax = (
                    day.rows_per_minute,
                    day.messages_per_minute,
                    day.latency,
                    day.latency_max,
                )
            minute = (t - d * _MS_DAY) // 60_000
            rpm[minute] += 1
            day.rows += 1
            if not depth or k != prev_key:
                mpm[minute] += 1
                day.messages += 1
            prev_key = k
            if day.first_time is None or t < day.first_time:
                day.first_time = t
            if day.last_time is None or t > day.last_time:
                day.last_time = t
            if e:
                hour = minute // 60
                ms = r - e
                h = lat[hour]
                if not h:
                    h = lat[hour] = [0] * LATENCY_BUCKETS
                h[bucket(edges, ms)] += 1
                top = lmax[hour]
                if top is None or ms > top:
                    lmax[hour] = ms
        if not keys:
            return
        # Times around the problems the checker found in this block.
        for p in chk.problems[before:]:
            i = p.line - line0
            if not 0 <= i < len(times):
                continue
            prev = times[i - 1] if i > 0 else self.prev_time
            self.problem_times[id(p)] = (prev, times[i])
        self._track(keys, times)
        if book:
            prev = self.prev_time
            for t in times:
                if prev is not None and t - prev > BOOK_SILENCE_MS:
                    self.silences.append((prev, t))
                prev = t
        self.prev_time, self.prev_key = times[-1], prev_key

    def _track(self, keys: list[int], times: list[int]) -> None:
        tracks = self.tracks
        kmax = max(keys[-1], keys[0])
        while self.pending < len(tracks) and tracks[self.pending].m.first <= kmax:
            self.pending += 1
        n = len(keys)
        for tr in tracks[: self.pending]:
            if tr.done:
                continue
            m = tr.m
            if tr.first_in is None:
                i = bisect.bisect_left(keys, m.first)
                if i > 0:
                    tr.before = times[i - 1]
                elif tr.before is None:
                    tr.before = self.prev_time
                if i < n:
                    tr.first_in = times[i]
            hi = m.last or m.first
            j = bisect.bisect_right(keys, hi)
            if j > 0 and keys[j - 1] >= m.first:
                tr.last_in = times[j - 1]
            if j < n:
                tr.after = times[j]
                tr.done = True

    # -- the stream's facts ---------------------------------------------------------------
    def finish(self, problems: list | None = None, omitted: int = 0) -> StreamFacts:
        sf = self.facts
        problems = problems or []
        vmarkers = [verify._Marker(m.kind, m.first, m.last, m.reason) for m in self.markers]
        verify._explain(problems, vmarkers)
        described = {
            id(m): verify._describe(vm) for m, vm in zip(self.markers, vmarkers, strict=True)
        }
        used: set[int] = set()
        gaps: list[GapFact] = []
        for p in problems:
            sf.problems[p.kind] = sf.problems.get(p.kind, 0) + p.count
            t0, t1 = self.problem_times.get(id(p), (None, None))
            cause = "unexplained"
            reason = p.detail
            if p.explained_by:
                for m in self.markers:
                    if described[id(m)] in p.explained_by:
                        if cause == "unexplained":
                            cause = cause_of(m.kind, m.reason)
                            reason = m.reason or p.detail
                        used.add(id(m))
            missing = p.kind in ("gap", "break")
            if p.kind not in ("gap", "break"):
                t0 = t1  # the row concerned
            gaps.append(
                GapFact(
                    kind=p.kind,
                    cause=cause,
                    reason=reason,
                    first_key=p.first,
                    last_key=p.last,
                    count=p.count,
                    first_time=t0,
                    last_time=t1,
                    explained=bool(p.explained_by),
                    missing=missing,
                    where=f"{p.file}:{p.line}",
                )
            )
            if not p.explained_by:
                sf.errors += 1
        sf.errors += omitted
        tracks = {id(tr.m): tr for tr in self.tracks}
        for m in self.markers:
            day = self._day(m.time // _MS_DAY) if m.time else None
            if day is not None and self._in_window(m.time):
                day.markers[m.kind] = day.markers.get(m.kind, 0) + 1
            if id(m) in used:
                continue
            tr = tracks.get(id(m))
            if m.kind == "filled":
                t0 = tr.first_in if tr else None
                t1 = tr.last_in if tr else None
            elif m.last == 0:
                t0 = tr.before if tr else None
                t1 = tr.first_in if tr else None
            else:
                t0 = tr.before if tr else None
                t1 = tr.after if tr else None
            t0 = m.time if t0 is None else t0
            t1 = m.time if t1 is None else t1
            gaps.append(
                GapFact(
                    kind="marker",
                    cause=cause_of(m.kind, m.reason),
                    reason=m.reason,
                    first_key=m.first,
                    last_key=m.last,
                    count=(m.last - m.first + 1) if m.last >= m.first > 0 else 1,
                    first_time=min(t0, t1),
                    last_time=max(t0, t1),
                    explained=True,
                    missing=m.kind in _MISSING_KINDS,
                )
            )
        gaps += self._silences(gaps)
        gaps = [g for g in gaps if self._gap_in_window(g)]
        gaps.sort(key=lambda g: (g.first_time or 0, g.first_key))
        sf.gaps = gaps
        sf.days = [self.days[k] for k in sorted(self.days)]
        for d in sf.days:
            sf.rows += d.rows
            if d.first_time is not None:
                sf.first_time = (
                    d.first_time if sf.first_time is None else min(sf.first_time, d.first_time)
                )
                sf.last_time = (
                    d.last_time if sf.last_time is None else max(sf.last_time, d.last_time)
                )
        return sf

    def _silences(self, gaps: list[GapFact]) -> list[GapFact]:
        rows = sum(d.rows for d in self.days.values())
        if not self.silences or rows < 2:
            return []
        first = min(d.first_time for d in self.days.values() if d.first_time is not None)
        last = max(d.last_time for d in self.days.values() if d.last_time is not None)
        limit = max(BOOK_SILENCE_MS, 3 * (last - first) // (rows - 1))
        holes = [(g.first_time, g.last_time) for g in gaps if g.missing and g.first_time]
        out = []
        for a, b in self.silences:
            if b - a <= limit or any(h0 <= a and b <= h1 for h0, h1 in holes if h1):
                continue
            reason = f"no book for {(b - a) / 1000:.1f} s"
            out.append(GapFact(kind="silence", cause="silence", first_time=a, last_time=b,
                               missing=True, reason=reason))  # fmt: skip
        return out

    def _in_window(self, t: int) -> bool:
        return (self.start is None or t >= self.start) and (self.end is None or t < self.end)

    def _gap_in_window(self, g: GapFact) -> bool:
        if g.first_time is None or g.last_time is None:
            return True
        if self.start is not None and g.last_time < self.start:
            return False
        return self.end is None or g.first_time < self.end
