"""``streamer verify DATA_DIR``: are the files of the CSV sink complete and consistent?

The ``csv`` sink's :meth:`~streamer.plugins.sinks.csv_batch.CsvSink.verify`, which the core
``verify`` command dispatches to, calls :func:`verify_tree`. It reads the tree written by the
``csv`` sink (layout and columns from :mod:`._csv_layout`), plain and ``.csv.gz``,
streaming (files are read in blocks of whole rows, never whole), and reports per
(exchange, market, symbol, stream): files, rows, first/last key and time span, and the
problems found:

* ``gap`` / ``duplicate``: aggTrade ids not consecutive per symbol (across files), closed
  klines missing or repeated by open time (UTC calendar months for ``1M``);
* ``break``: a depth update-id chain break (spot: ``first_update_id == prev last + 1``;
  usdm: ``prev_update_id == prev last``); ``inconsistent``: rows of one event with
  different ids;
* ``crossed``: an orderbook row whose best bid >= best ask; ``order``: an orderbook
  ``last_update_id`` not above the previous one;
* ``misaligned``: a kline open time off the interval grid; ``interval``: an interval folder
  that is not a Binance interval (rows counted, not checked);
* ``torn``: a file ending in a partial row or gzip member; ``header``, ``bad_row``,
  ``corrupt``: a file or row the sink would not have written.

A problem whose key range is covered by marker rows of the same stream (kinds
:data:`EXPLAINING_KINDS`) is *explained*, not an error; for a depth ``break`` a marker
overlapping the missing update ids is enough (depth keys are the events' last update ids).
A marker whose ``last_key`` is 0 (end unknown, e.g. an orderbook ``resync``) explains the
first problem at or after its ``first_key``. :func:`verify` returns a :class:`Report`;
``Report.exit_code`` is 0 when no unexplained problem is left, 1 otherwise.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import os
import time
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation

import msgspec

from streamer import KLINE_INTERVALS as INTERVALS
from streamer import Progress, interval_ms, next_open_time

from . import _csv_layout as layout

#: Marker kinds that account for a missing range or a resync.
EXPLAINING_KINDS = frozenset({"filled", "unfillable", "gap", "overflow", "resync"})
#: Problem kinds that a covering marker explains (the others are always errors).
EXPLAINABLE = frozenset({"gap", "break", "crossed", "order"})
#: Problems kept in detail per stream; beyond it they are only counted (and unexplained).
MAX_PROBLEMS = 1000

_BLOCK = 1 << 22  # bytes read per plain block
_GZ_BLOCK = 1 << 20  # compressed bytes per gzip block
_GZ_OUT = 1 << 23  # at most this much inflated per call (CSV inflates ~5-10x, zeros ~1000x)
_MAX_ROW = 1 << 26  # a "row" longer than this is not one: the file is reported corrupt
_AGG_TIME = layout.AGGTRADE_COLUMNS.index("transact_time")
_DEPTH_FIRST = layout.DEPTH_COLUMNS.index("first_update_id")
_DEPTH_LAST = layout.DEPTH_COLUMNS.index("last_update_id")
_DEPTH_PREV = layout.DEPTH_COLUMNS.index("prev_update_id")
_DEPTH_TIME = layout.DEPTH_COLUMNS.index("event_time")
_KLINE_KEY = layout.KLINE_COLUMNS.index("open_time")
_BOOK_KEY = layout.BOOK_PREFIX_COLUMNS.index("last_update_id")
_BOOK_TIME = layout.BOOK_PREFIX_COLUMNS.index("event_time")
_BOOK_RECV = layout.BOOK_PREFIX_COLUMNS.index("receive_time")
_NB = len(layout.BOOK_PREFIX_COLUMNS)  # index of bid_price_0; ask_price_0 is _NB + 2


class VerifyError(ValueError):
    """Bad input (a missing or unreadable data directory): exit code 2."""


class Problem(msgspec.Struct):
    """One problem, or a run of adjacent ones of the same kind (``count`` rows or keys).

    ``first``/``last``: the key range concerned (missing ids, repeated ids, update ids...).
    ``explained_by``: the marker(s) covering it, empty when it is an error.
    """

    kind: str
    file: str
    line: int
    first: int = 0
    last: int = 0
    count: int = 1
    detail: str = ""
    explained_by: str = ""


class StreamReport(msgspec.Struct):
    """What one stream's files hold. Times are in the files' unit (ms, or us on spot)."""

    exchange: str
    market: str
    symbol: str
    stream: str
    files: int = 0
    rows: int = 0
    first_key: int | None = None
    last_key: int | None = None
    first_time: int | None = None
    last_time: int | None = None
    markers: dict[str, int] = msgspec.field(default_factory=dict)
    problems: list[Problem] = msgspec.field(default_factory=list)
    #: Problems beyond :data:`MAX_PROBLEMS` (counted as unexplained errors).
    problems_omitted: int = 0
    errors: int = 0
    explained: int = 0

    @property
    def name(self) -> str:
        return f"{self.exchange}/{self.market}/{self.symbol}/{self.stream}"


class Report(msgspec.Struct):
    """The whole verification: every stream, and the totals that decide the exit code."""

    root: str
    streams: list[StreamReport]
    files: int = 0
    rows: int = 0
    errors: int = 0
    explained: int = 0
    warnings: list[str] = msgspec.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every problem is explained, 1 otherwise."""
        return 1 if self.errors else 0


# -- reading ---------------------------------------------------------------------------------
class _FileScan:
    """Reads one file as blocks of whole rows (header excluded), plain or gzip.

    After :meth:`blocks` is exhausted: ``header`` (first line, or None), ``torn`` (bytes of a
    partial last row), ``torn_member`` (compressed bytes of an incomplete last gzip member,
    which the sink cuts off at its next start; its whole rows are still checked),
    ``corrupt`` (why reading stopped).
    """

    def __init__(self, path: str, gz: bool) -> None:
        self.path, self.gz = path, gz
        self.header: bytes | None = None
        self.torn = 0
        self.torn_member = 0
        self.corrupt = ""
        self.size = 0

    def _raw(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            if not self.gz:
                while block := f.read(_BLOCK):
                    self.size += len(block)
                    yield block
                return
            # Member by member (the sink writes one per flush), never a whole member at once.
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            member_start = 0
            while raw := f.read(_GZ_BLOCK):
                self.size += len(raw)
                while raw:
                    try:
                        out = dec.decompress(raw, _GZ_OUT)
                    except zlib.error as exc:
                        self.corrupt = f"corrupt gzip data after byte {member_start}: {exc}"
                        return
                    if out:
                        yield out
                    if not dec.eof:
                        raw = dec.unconsumed_tail  # output was capped: more from this input
                        continue
                    # Member complete: the next one starts in unused_data.
                    raw = dec.unused_data
                    member_start = self.size - len(raw)
                    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if self.size > member_start:
                self.torn_member = self.size - member_start

    def blocks(self) -> Iterator[bytes]:
        """Blocks of whole rows, each ending in a newline outside quotes."""
        rest = b""
        for data in self._raw():
            buf = rest + data if rest else data
            if self.header is None:
                nl = buf.find(b"\n")
                if nl < 0:
                    rest = buf
                    continue
                self.header, buf = buf[: nl + 1], buf[nl + 1 :]
            end = _row_boundary(buf)
            if end <= 0:
                if len(buf) > _MAX_ROW:  # unbalanced quotes or no newline: not our rows
                    self.corrupt = f"no row end in {len(buf)} bytes"
                    return
                rest = buf
                continue
            rest = buf[end:]
            yield buf[:end]
        self.torn = len(rest)


def _row_boundary(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` made of whole rows (0 if none).

    A newline inside a quoted cell is not a row end: quotes are doubled inside cells, so
    a newline ends a row only after an even number of quotes.
    """
    end = buf.rfind(b"\n") + 1
    if end and b'"' in buf:
        quotes = buf.count(b'"', 0, end)
        while end and quotes % 2:
            prev = buf.rfind(b"\n", 0, end - 1) + 1
            quotes -= buf.count(b'"', prev, end)
            end = prev
    return end


def _unquoted_lines(block: bytes) -> tuple[list[bytes], list[int]]:
    """Rows of a block holding quoted cells, as plain lines (separators inside cells become
    spaces: those cells are exchange strings, never the integers checked here), and the
    offset of each row's first line in the block."""
    out, starts = [], []
    reader = csv.reader(io.StringIO(block.decode("utf-8", "replace"), newline=""))
    start = 0
    for row in reader:
        cells = [c.replace(",", " ").replace("\n", " ").replace("\r", " ") for c in row]
        out.append(",".join(cells).encode())
        starts.append(start)
        start = reader.line_num
    return out, starts


# -- checkers --------------------------------------------------------------------------------
class _Checker:
    """Per-stream state across its files, in period order. Subclasses check row blocks."""

    key_col = 0
    time_col = 0

    def __init__(self, report: StreamReport, columns: int) -> None:
        self.report = report
        self.commas = columns - 1
        self.file = ""
        self.problems: list[Problem] = []
        self.omitted = 0
        self._line0 = 0
        self._where: list[int] | None = None  # line offset of each row, when not i

    def problem(
        self,
        kind: str,
        line: int,
        first: int = 0,
        last: int = 0,
        detail: str = "",
        count: int | None = None,
    ) -> None:
        """Record a problem, merging it into the previous one when it continues a run."""
        probs = self.problems
        if probs:
            p = probs[-1]
            if p.kind == kind == "duplicate" and p.file == self.file and p.last + 1 == first:
                p.last, p.count = last, p.count + 1
                return
        if len(probs) >= MAX_PROBLEMS:
            self.omitted += 1
            return
        if count is None:
            count = last - first + 1 if kind in ("gap", "duplicate") and last >= first else 1
        probs.append(Problem(kind, self.file, line, first, last, count, detail))

    def feed(self, block: bytes, line0: int) -> tuple[int, int]:
        """Check one block of rows starting at file line ``line0``.

        Returns ``(rows checked, lines consumed)``.
        """
        self._line0, self._where = line0, None
        if b'"' in block:
            lines, self._where = _unquoted_lines(block)
            used = block.count(b"\n")
        else:
            lines = block.split(b"\n")
            lines.pop()  # after the final newline
            used = len(lines)
        if self._where is not None or block.count(b",") != self.commas * len(lines):
            lines = self._well_formed(lines)
        if not lines:
            return 0, used
        self._span(lines)
        self.check(lines)
        return len(lines), used

    def at(self, i: int) -> int:
        """File line number of row ``i`` of the block being checked."""
        return self._line0 + (i if self._where is None else self._where[i])

    def _well_formed(self, lines: list[bytes]) -> list[bytes]:
        good, where = [], []
        for i, line in enumerate(lines):
            n = line.count(b",") + 1
            if n == self.commas + 1:
                good.append(line)
                where.append(i if self._where is None else self._where[i])
            else:
                self.problem("bad_row", self.at(i), detail=f"{n} cells, expected {self.commas + 1}")
        self._where = where
        return good

    def _span(self, lines: list[bytes]) -> None:
        r = self.report
        try:
            if r.first_key is None:
                first = lines[0].split(b",")
                r.first_key, r.first_time = int(first[self.key_col]), self._time(first)
            last = lines[-1].split(b",")
            r.last_key, r.last_time = int(last[self.key_col]), self._time(last)
        except (ValueError, IndexError):
            pass  # the check reports the bad row

    def _time(self, cells: list[bytes]) -> int:
        return int(cells[self.time_col])

    def check(self, lines: list[bytes]) -> None:
        """Check the rows of one block (line numbers from :meth:`at`)."""
        raise NotImplementedError

    def _ints(self, lines: list[bytes], col: int) -> tuple[list[int], list[int]]:
        """Column ``col`` as ints and the line number of each; bad rows are reported."""
        ints, where = [], []
        for i, line in enumerate(lines):
            try:
                ints.append(int(line.split(b",", col + 1)[col]))
            except (ValueError, IndexError):
                self.problem("bad_row", self.at(i), detail=f"column {col + 1} is not an integer")
                continue
            where.append(self.at(i))
        return ints, where


class _AggTrades(_Checker):
    """aggTrade ids consecutive per symbol: a jump is a gap, a step back a duplicate."""

    time_col = _AGG_TIME

    def __init__(self, report: StreamReport, columns: int) -> None:
        super().__init__(report, columns)
        self.prev: int | None = None

    def check(self, lines: list[bytes]) -> None:
        where: list[int] | None = None
        try:
            ids = [int(line.split(b",", 1)[0]) for line in lines]
        except ValueError:
            ids, where = self._ints(lines, 0)
            if not ids:
                return
        prev = self.prev
        start = ids[0] if prev is None else prev + 1
        # Fast path: the whole block continues the sequence (compared in C).
        if ids[-1] == start + len(ids) - 1 and ids == list(range(start, start + len(ids))):
            self.prev = ids[-1]
            return
        for i, x in enumerate(ids):
            if prev is None or x == prev + 1:
                prev = x
            elif x > prev:
                line = where[i] if where else self.at(i)
                self.problem("gap", line, prev + 1, x - 1, f"{x - prev - 1} ids missing")
                prev = x
            else:
                self.problem("duplicate", where[i] if where else self.at(i), x, x)
        self.prev = prev


class _Klines(_Checker):
    """Closed klines one per interval by open time (calendar months for ``1M``)."""

    key_col = time_col = _KLINE_KEY

    def __init__(self, report: StreamReport, columns: int, interval: str) -> None:
        super().__init__(report, columns)
        self.interval = interval
        self.step = interval_ms(interval) if interval in INTERVALS else None
        self.prev: int | None = None

    def _next(self, t: int) -> int:
        return t + self.step if self.step is not None else next_open_time(t, self.interval)

    def check(self, lines: list[bytes]) -> None:
        times, where = self._ints(lines, self.key_col)
        if self.interval not in INTERVALS:
            if self.prev is None:
                self.problem("interval", self.at(0), detail=f"unknown interval {self.interval!r}")
            self.prev = times[-1] if times else self.prev
            return
        prev = self.prev
        for x, line in zip(times, where, strict=True):
            if prev is None:
                prev = x
                continue
            expected = self._next(prev)
            if x == expected:
                prev = x
            elif x <= prev:
                self.problem("duplicate", line, x, x)
            elif x < expected:
                self.problem("misaligned", line, x, x, f"open time {x} after {prev}")
                prev = x
            else:
                self._gap(line, expected, x)
                prev = x
        self.prev = prev

    def _gap(self, line: int, expected: int, x: int) -> None:
        # The range named is the open times of the missing bars, as kline markers use.
        last, count = expected, 1
        if self.step is not None:
            count = (x - expected) // self.step
            last = expected + (count - 1) * self.step
            aligned = (x - expected) % self.step == 0
        else:
            while (nxt := next_open_time(last, self.interval)) < x:
                last, count = nxt, count + 1
            aligned = nxt == x
        detail = f"{count} bars missing" + ("" if aligned else f", then off-grid open {x}")
        self.problem("gap", line, expected, last, detail, count)


class _Depth(_Checker):
    """The update-id chain of diff-depth events (consecutive rows with one last id)."""

    key_col = _DEPTH_LAST
    time_col = _DEPTH_TIME

    def __init__(self, report: StreamReport, columns: int, futures: bool) -> None:
        super().__init__(report, columns)
        self.futures = futures
        self.prev: tuple[int, bytes, bytes] | None = None  # (last id, first id, pu) of the event
        self.events = 0

    def check(self, lines: list[bytes]) -> None:
        prev = self.prev
        futures = self.futures
        for i, line in enumerate(lines):
            cells = line.split(b",", _DEPTH_PREV + 1)
            try:
                last = int(cells[_DEPTH_LAST])
                first_b, pu_b = cells[_DEPTH_FIRST], cells[_DEPTH_PREV]
                if prev is not None and last == prev[0]:
                    if first_b != prev[1] or pu_b != prev[2]:
                        self.problem("inconsistent", self.at(i), last, last,
                                     "rows of one event with different ids")  # fmt: skip
                    continue
                first = int(first_b)
                pu = int(pu_b) if futures else 0
            except (ValueError, IndexError):
                self.problem("bad_row", self.at(i), detail="update ids are not integers")
                continue
            self.events += 1
            if prev is not None:
                p = prev[0]
                if last < p:
                    self.problem("duplicate", self.at(i), first, last, "event not above the last")
                    continue
                if (pu != p) if futures else (first != p + 1):
                    want = f"prev_update_id {p}" if futures else f"first_update_id {p + 1}"
                    got = f"prev_update_id {pu}" if futures else f"first_update_id {first}"
                    self.problem("break", self.at(i), p + 1, max(first - 1, p + 1),
                                 f"expected {want}, got {got}")  # fmt: skip
            prev = (last, first_b, pu_b)
        self.prev = prev


class _Books(_Checker):
    """orderbook rows: last_update_id increasing, best bid below best ask."""

    key_col = _BOOK_KEY
    time_col = _BOOK_TIME

    def __init__(self, report: StreamReport, columns: int, levels: int) -> None:
        super().__init__(report, columns)
        self.levels = levels
        self.prev: int | None = None

    def _time(self, cells: list[bytes]) -> int:
        return int(cells[self.time_col]) or int(cells[_BOOK_RECV])  # 0: unknown

    def check(self, lines: list[bytes]) -> None:
        prev = self.prev
        top = _NB + 4 if self.levels else _NB
        for i, line in enumerate(lines):
            cells = line.split(b",", top)
            try:
                uid = int(cells[_BOOK_KEY])
            except ValueError:
                self.problem("bad_row", self.at(i), detail="last_update_id is not an integer")
                continue
            if prev is not None and uid <= prev:
                self.problem("order", self.at(i), uid, uid, f"last_update_id {uid} after {prev}")
            prev = uid if prev is None else max(prev, uid)
            if self.levels:
                bid, ask = cells[_NB], cells[_NB + 2]
                if bid and ask and _crossed(bid, ask):
                    line_no = self.at(i)
                    detail = f"best bid {bid.decode()} >= best ask {ask.decode()}"
                    self.problem("crossed", line_no, uid, uid, detail)
        self.prev = prev


def _crossed(bid: bytes, ask: bytes) -> bool:
    try:
        b, a = float(bid), float(ask)
        if b != a:
            return b > a
        return Decimal(bid.decode()) >= Decimal(ask.decode())  # exact when floats tie
    except (ValueError, InvalidOperation):
        return False


# -- markers ---------------------------------------------------------------------------------
class _Marker(msgspec.Struct):
    kind: str
    first: int
    last: int
    reason: str


def _read_markers(scan: _FileScan, add) -> int:
    rows = 0
    for block in scan.blocks():
        text = block.decode("utf-8", "replace")
        for cells in csv.reader(io.StringIO(text, newline="")):
            if len(cells) != len(layout.MARKER_COLUMNS):
                continue
            _time, stream, kind, first, last, reason = cells
            try:
                add(stream, _Marker(kind, int(first), int(last), reason))
            except ValueError:
                continue
            rows += 1
    return rows


def _describe(m: _Marker) -> str:
    end = "" if m.last == 0 and m.first else f"-{m.last}"
    return f"{m.kind} {m.first}{end}" + (f" ({m.reason})" if m.reason else "")


def _explain(problems: list[Problem], markers: list[_Marker]) -> None:
    """Mark problems covered by explaining markers (closed ranges merged; open-ended ones
    each explain the first problem at or after their first key)."""
    closed = sorted(
        (m for m in markers if m.kind in EXPLAINING_KINDS and m.last and m.first <= m.last),
        key=lambda m: m.first,
    )
    merged: list[list] = []  # [first, last, [markers]]
    for m in closed:
        if merged and m.first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], m.last)
            merged[-1][2].append(m)
        else:
            merged.append([m.first, m.last, [m]])
    starts = [r[0] for r in merged]
    open_ended = sorted(
        (m for m in markers if m.kind in EXPLAINING_KINDS and m.first and not m.last),
        key=lambda m: m.first,
    )
    for p in problems:
        if p.kind not in EXPLAINABLE:
            continue
        if p.kind == "break":
            # Depth keys are events' last update ids, not one per update id: markers of
            # dropped events name ids inside the hole, so any overlap explains it.
            i = bisect.bisect_right(starts, p.last) - 1
            covered = i >= 0 and merged[i][1] >= p.first
        else:
            i = bisect.bisect_right(starts, p.first) - 1
            covered = i >= 0 and merged[i][1] >= p.last
        if covered:
            cover = [m for m in merged[i][2] if m.last >= p.first and m.first <= p.last]
            p.explained_by = "; ".join(_describe(m) for m in cover[:3])
    for m in open_ended:
        for p in problems:
            if p.kind in EXPLAINABLE and not p.explained_by and p.last >= m.first:
                p.explained_by = _describe(m)
                break


# -- the tree --------------------------------------------------------------------------------
def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))


def _data_files(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file(follow_symlinks=False)]
    keyed = [(k, n) for n in names if (k := layout.period_sort_key(n)) is not None]
    return [n for _, n in sorted(keyed)]


def _folders(root: str) -> Iterator[tuple[str, str, str, str, str, str]]:
    """(kind, exchange, market, symbol, interval, folder) of every stream folder."""
    return layout.stream_folders(root, _subdirs)


def _checker(kind: str, report: StreamReport, header: bytes, interval: str) -> _Checker | None:
    market = report.market
    if kind == layout.ORDERBOOK:
        levels = layout.book_levels_of_header(header)
        return None if levels is None else _Books(report, len(layout.book_columns(levels)), levels)
    if not layout.expected_header(kind, market, header):
        return None
    if kind == layout.AGGTRADE:
        return _AggTrades(report, len(layout.aggtrade_columns(market)))
    if kind == layout.KLINE:
        return _Klines(report, len(layout.KLINE_COLUMNS), interval)
    return _Depth(report, len(layout.DEPTH_COLUMNS), futures=market != "spot")


def check_root(root: str | os.PathLike[str]) -> str:
    """``root`` as a str; raises :class:`VerifyError` when it is not a directory."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "not a directory" if os.path.exists(root) else "no such directory"
        raise VerifyError(f"{root}: {what}")
    return root


def no_files_error(root: str) -> VerifyError:
    """The error for a folder holding no file of the csv sink's layout (naming the parquet
    sink when ``root`` holds its ``exchange=...`` folders)."""
    with contextlib.suppress(OSError):
        if any(d.startswith("exchange=") for d in _subdirs(root)):
            return VerifyError(
                f"{root}: a parquet sink's tree (exchange=... folders), not a csv one: "
                "add --sink parquet"
            )
    return VerifyError(
        f"{root}: no files of the csv sink's layout found (give the sink's path, the "
        "folder holding <exchange>/<market>/aggTrades|klines|depth|orderbook|markers)"
    )


def _begin(progress: Progress | None, folders: list) -> None:
    if progress is None:
        return
    files = size = 0
    for *_, folder in folders:
        with contextlib.suppress(OSError):
            for name in _data_files(folder):
                files += 1
                with contextlib.suppress(OSError):
                    size += os.stat(os.path.join(folder, name)).st_size
    progress.begin(files, size)


def verify(root: str | os.PathLike[str], progress: Progress | None = None) -> Report:
    """Check every stream under ``root`` (the ``path`` of a ``csv`` sink), telling
    ``progress`` (if given) what was read.

    Raises :class:`VerifyError` when ``root`` is not a readable directory or holds no file
    of the sink's layout.
    """
    root = check_root(root)
    streams: dict[tuple[str, str, str, str], StreamReport] = {}
    markers: dict[tuple[str, str, str, str], list[_Marker]] = {}
    checkers: dict[tuple[str, str, str, str], _Checker] = {}
    report = Report(root=root, streams=[])

    def stream(ex: str, mk: str, sym: str, name: str) -> StreamReport:
        key = (ex, mk, sym, name)
        if key not in streams:
            streams[key] = StreamReport(ex, mk, sym, name)
        return streams[key]

    try:
        folders = list(_folders(root))
    except OSError as exc:
        raise VerifyError(f"{root}: {exc.strerror or exc}") from None
    _begin(progress, folders)
    on_block = None if progress is None else _progress_hook(progress)
    for kind, ex, mk, sym, interval, folder in folders:
        try:
            names = _data_files(folder)
        except OSError as exc:
            report.warnings.append(f"{folder}: {exc.strerror or exc}")
            continue
        for name in names:
            path = os.path.join(folder, name)
            report.files += 1
            if kind == layout.MARKERS:
                _markers_file(report, path, name, ex, mk, sym, stream, markers)
                continue
            key = (ex, mk, sym, layout.stream_name(kind, interval))
            sr = stream(*key)
            sr.files += 1
            _data_file(kind, interval, path, name, sr, checkers, key, on_block)
            if progress is not None:
                progress.advance(files=1)
    if progress is not None:
        progress.done()
    if not report.files:
        raise no_files_error(root)
    for key, sr in streams.items():
        chk = checkers.get(key)
        if chk is not None:
            sr.problems += chk.problems
            sr.problems_omitted += chk.omitted
        sr.problems.sort(key=_file_order)
        _explain(sr.problems, markers.get(key, []))
        sr.explained = sum(1 for p in sr.problems if p.explained_by)
        sr.errors = len(sr.problems) - sr.explained + sr.problems_omitted
        report.rows += sr.rows
        report.errors += sr.errors
        report.explained += sr.explained
    report.streams = [streams[k] for k in sorted(streams)]
    return report


def _file_order(p: Problem) -> tuple:
    return (layout.period_sort_key(p.file) or ("", 0), p.file, p.line)


def _progress_hook(progress: Progress):
    read = [0, ""]  # bytes of the current file already counted, and its path

    def on_block(scan: _FileScan, block, line0, chk, before, rows) -> None:
        if read[1] != scan.path:
            read[:] = [0, scan.path]
        progress.advance(rows=rows, bytes_=scan.size - read[0])
        read[0] = scan.size

    return on_block


#: ``on_block(scan, block, first line, checker, problems before the block, rows)``: called
#: after each block of rows is checked (``streamer report`` reads its facts there).
BlockHook = Callable[["_FileScan", bytes, int, "_Checker", int, int], None]


def _data_file(
    kind, interval, path, name, sr: StreamReport, checkers, key, on_block: BlockHook | None = None
) -> None:
    scan = _FileScan(path, name.endswith(".gz"))
    chk = checkers.get(key)
    line = 2  # first data line (after the header)
    header_ok = False
    try:
        for block in scan.blocks():
            if not header_ok:
                chk = _accept_header(kind, interval, scan.header or b"", sr, chk)
                if chk is None:
                    sr.problems.append(Problem("header", name, 1, detail=_bad_header(scan.header)))
                    return
                checkers[key], chk.file, header_ok = chk, name, True
            before = len(chk.problems)
            rows, used = chk.feed(block, line)
            if on_block is not None:
                on_block(scan, block, line, chk, before, rows)
            sr.rows += rows
            line += used
    except OSError as exc:
        sr.problems.append(Problem("corrupt", name, line, detail=f"unreadable: {exc}"))
        return
    if scan.header is None:
        if scan.size and not scan.corrupt:
            sr.problems.append(Problem("torn", name, 1, detail="no whole header line"))
            return
    elif not header_ok and _accept_header(kind, interval, scan.header, sr, chk) is None:
        sr.problems.append(Problem("header", name, 1, detail=_bad_header(scan.header)))
    _file_end(scan, sr, name, line)


def _accept_header(
    kind: str, interval: str, header: bytes, sr: StreamReport, chk: _Checker | None
) -> _Checker | None:
    """The stream's checker if ``header`` is one the sink writes (a new one for the first
    file), else None. An orderbook file may declare another depth than the previous one."""
    if chk is None:
        return _checker(kind, sr, header, interval)
    if isinstance(chk, _Books):
        levels = layout.book_levels_of_header(header)
        if levels is None:
            return None
        chk.levels, chk.commas = levels, len(layout.book_columns(levels)) - 1
        return chk
    return chk if layout.expected_header(kind, sr.market, header) else None


def _bad_header(header: bytes | None) -> str:
    shown = (header or b"")[:80].decode("utf-8", "replace").rstrip("\r\n")
    return f"unexpected header {shown!r}: file skipped"


def _file_end(scan: _FileScan, sr: StreamReport, name: str, line: int) -> None:
    if scan.corrupt:
        sr.problems.append(Problem("corrupt", name, line, detail=scan.corrupt))
    elif scan.torn_member:
        detail = f"torn last gzip member ({scan.torn_member} bytes)"
        sr.problems.append(Problem("torn", name, line, detail=detail))
    elif scan.torn:
        sr.problems.append(
            Problem("torn", name, line, detail=f"torn last line ({scan.torn} bytes)")
        )


def _markers_file(report: Report, path, name, ex, mk, sym, stream, markers) -> None:
    scan = _FileScan(path, name.endswith(".gz"))
    sr_file = stream(ex, mk, sym, layout.MARKERS)
    sr_file.files += 1

    def add(stream_name: str, m: _Marker) -> None:
        sr = stream(ex, mk, sym, stream_name)
        sr.markers[m.kind] = sr.markers.get(m.kind, 0) + 1
        markers.setdefault((ex, mk, sym, stream_name), []).append(m)

    try:
        sr_file.rows += _read_markers(scan, add)
    except OSError as exc:
        sr_file.problems.append(Problem("corrupt", name, 0, detail=f"unreadable: {exc}"))
        return
    if scan.header is not None and not layout.expected_header(layout.MARKERS, mk, scan.header):
        sr_file.problems.append(Problem("header", name, 1, detail=_bad_header(scan.header)))
    _file_end(scan, sr_file, name, 0)


# -- output ----------------------------------------------------------------------------------
def _fmt_time(t: int | None) -> str:
    if t is None:
        return "-"
    ms = layout.ms_time(t)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000))


def _fmt_span(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "-"
    s = (layout.ms_time(b) - layout.ms_time(a)) // 1000
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def render_table(report: Report) -> str:
    """A readable table of the streams, then every problem (explained ones marked)."""
    head = ("stream", "files", "rows", "first key", "last key", "first time (UTC)", "span",
            "errors", "explained", "markers")  # fmt: skip
    rows = [head]
    for s in report.streams:
        marks = " ".join(f"{k}={v}" for k, v in sorted(s.markers.items())) or "-"
        rows.append((
            s.name, str(s.files), str(s.rows),
            "-" if s.first_key is None else str(s.first_key),
            "-" if s.last_key is None else str(s.last_key),
            _fmt_time(s.first_time), _fmt_span(s.first_time, s.last_time),
            str(s.errors), str(s.explained), marks,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    listed = [(s, p) for s in report.streams for p in s.problems]
    if listed:
        out.append("")
    for s, p in listed:
        keys = f" {p.first}-{p.last}" if p.first or p.last else ""
        if p.first == p.last and p.first:
            keys = f" {p.first}"
        what = f"{p.kind}{keys}" + (f" ({p.detail})" if p.detail else "")
        status = f"explained by {p.explained_by}" if p.explained_by else "ERROR"
        out.append(f"{status}: {s.name}: {what} at {p.file}:{p.line}")
    for s in report.streams:
        if s.problems_omitted:
            out.append(f"ERROR: {s.name}: {s.problems_omitted} more problems not listed")
    out += [f"warning: {w}" for w in report.warnings]
    verdict = "OK" if not report.errors else f"{report.errors} unexplained problem(s)"
    out.append(
        f"\n{report.files} files, {report.rows} rows, {report.explained} explained "
        f"problem(s): {verdict}"
    )
    return "\n".join(out)


def render_json(report: Report) -> str:
    """The report as JSON (``exit_code`` included)."""
    doc = msgspec.to_builtins(report)
    doc["exit_code"] = report.exit_code
    return msgspec.json.format(msgspec.json.encode(doc).decode(), indent=2)


def verify_tree(
    root: str | os.PathLike[str], *, as_json: bool = False, progress: Progress | None = None
) -> tuple[str, int]:
    """The report on the csv tree at ``root`` (a table, or JSON) and its exit code: 0 when
    every problem is explained by a marker, 1 otherwise. Raises :class:`VerifyError` (a
    ``ValueError``) when ``root`` is not a csv sink's tree."""
    report = verify(root, progress)
    return (render_json(report) if as_json else render_table(report)), report.exit_code
