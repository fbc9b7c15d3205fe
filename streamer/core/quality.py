"""Facts about collected data, as a sink reads them back, for the data-quality report.

A sink type that can describe its files implements
:meth:`~streamer.core.api.Sink.report_facts`: one :class:`StreamFacts` per output stream,
streaming (read file by file, block by block; never a whole stream in memory), each holding
the stream's gaps (:class:`GapFact`) and per UTC day its counts per minute and a latency
histogram per hour (:class:`DayFacts`). The report builder (:mod:`streamer.core.report`)
knows nothing of any file format: it aggregates these facts.

Times are milliseconds since the epoch (UTC); keys are the stream's resume keys
(:func:`~streamer.core.records.record_key`).

Latency (exchange event time to ``receive_time``) is counted in the fixed buckets
:data:`LATENCY_EDGES_MS` (never by storing values), so percentiles are bucket upper bounds.
"""

from __future__ import annotations

import bisect
import sys
import time
from typing import TextIO

import msgspec

MINUTES_PER_DAY = 1440
MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000

#: Upper bounds (inclusive, ms) of the latency buckets; the last bucket is everything above.
#: Bucket 0 holds latencies <= 0 (clock skew between exchange and receiver).
LATENCY_EDGES_MS: tuple[int, ...] = (
    0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250,
    300, 400, 500, 600, 800, 1000, 1500, 2000, 3000, 5000, 10_000, 20_000, 30_000, 60_000,
    300_000, 3_600_000,
)  # fmt: skip
LATENCY_BUCKETS = len(LATENCY_EDGES_MS) + 1


def latency_bucket(ms: int) -> int:
    """Index of the bucket holding a latency of ``ms`` milliseconds."""
    return bisect.bisect_left(LATENCY_EDGES_MS, ms)


def bucket_label(index: int) -> str:
    """The upper bound of bucket ``index`` as text (``"> 3600000"`` for the last one)."""
    if index >= len(LATENCY_EDGES_MS):
        return f"> {LATENCY_EDGES_MS[-1]}"
    return str(LATENCY_EDGES_MS[index])


def percentile(counts: list[int], q: float) -> int | None:
    """Upper bound (ms) of the bucket holding the ``q`` quantile of ``counts`` (None when
    empty; the last bucket's lower bound + 1 for values above every edge)."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            return LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else LATENCY_EDGES_MS[-1] + 1
    return LATENCY_EDGES_MS[-1] + 1


class GapFact(msgspec.Struct, kw_only=True):
    """A hole, a repair or an inconsistency in one stream.

    ``kind``: what was found in the rows (``gap``: keys missing, ``break``: a broken update
    chain, ``crossed``, ``order``, ``duplicate``, ``torn``...) or ``marker`` when only a
    marker row tells of it (a ``filled`` gap leaves no hole in the rows). ``cause``: the
    marker kind that accounts for it (``filled``, ``unfillable``, ``resync``, ``overflow``,
    ``verify_mismatch``, ``gap``, refined to ``restart`` or ``shutdown`` from the marker's
    reason), or ``unexplained``. ``missing``: rows are absent over the time range (a filled
    gap is not missing). Time range: the rows around the hole (``first_time`` the last row
    before it, ``last_time`` the first row after it), or the rows a repair covers; ``None``
    where no such row exists.
    """

    kind: str
    cause: str
    reason: str = ""
    first_key: int = 0
    last_key: int = 0
    count: int = 1
    first_time: int | None = None
    last_time: int | None = None
    explained: bool = False
    missing: bool = False
    where: str = ""


class DayFacts(msgspec.Struct, kw_only=True):
    """One stream's rows on one UTC day (``day``: ``YYYY-MM-DD``)."""

    day: str
    files: int = 0
    bytes: int = 0
    rows: int = 0
    #: Exchange messages (events): a depth event spans several rows, other streams one.
    messages: int = 0
    first_time: int | None = None
    last_time: int | None = None
    rows_per_minute: list[int] = msgspec.field(default_factory=lambda: [0] * MINUTES_PER_DAY)
    messages_per_minute: list[int] = msgspec.field(default_factory=lambda: [0] * MINUTES_PER_DAY)
    #: Per hour of the day: latency bucket counts (empty list: no sample) and the maximum.
    latency: list[list[int]] = msgspec.field(default_factory=lambda: [[] for _ in range(24)])
    latency_max: list[int | None] = msgspec.field(default_factory=lambda: [None] * 24)
    #: Marker rows of this stream dated this day, by kind.
    markers: dict[str, int] = msgspec.field(default_factory=dict)

    def add_latency(self, hour: int, ms: int) -> None:
        """Count one latency sample (slow path; readers may inline it)."""
        counts = self.latency[hour]
        if not counts:
            counts = self.latency[hour] = [0] * LATENCY_BUCKETS
        counts[latency_bucket(ms)] += 1
        top = self.latency_max[hour]
        if top is None or ms > top:
            self.latency_max[hour] = ms


class StreamFacts(msgspec.Struct, kw_only=True):
    """One output stream (``stream``: ``aggtrade``, ``depth``, ``kline_1m``, ``orderbook``...)
    as its files hold it. ``interval_ms``: the bar length of a kline stream (expected bars per
    day), else None. ``problems``: what a check of the rows found, by kind; ``errors``: those
    no marker explains."""

    exchange: str
    market: str
    symbol: str
    stream: str
    interval_ms: int | None = None
    files: int = 0
    bytes: int = 0
    rows: int = 0
    first_time: int | None = None
    last_time: int | None = None
    gaps: list[GapFact] = msgspec.field(default_factory=list)
    days: list[DayFacts] = msgspec.field(default_factory=list)
    problems: dict[str, int] = msgspec.field(default_factory=dict)
    errors: int = 0

    @property
    def name(self) -> str:
        return f"{self.exchange}/{self.market}/{self.symbol}/{self.stream}"


def day_label(ms: int) -> str:
    """``YYYY-MM-DD`` (UTC) of a millisecond time."""
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))


class Progress:
    """Progress of a long read on a terminal: files, rows, rate and time left, on one line
    rewritten at most a few times a second. Readers call :meth:`begin` with what they will
    read, then :meth:`advance` as they go; :meth:`done` clears the line.

    Commands create one only when the stream is a terminal (``isatty``); piped output stays
    quiet. ``clock`` is for tests.
    """

    def __init__(self, out: TextIO | None = None, *, interval: float = 0.25, clock=None) -> None:
        self.out = out or sys.stderr
        self.interval = interval
        self.clock = clock or time.monotonic
        self.total_files = 0
        self.total_bytes = 0
        self.files = 0
        self.rows = 0
        self.bytes = 0
        self._start = self.clock()
        self._shown = 0.0
        self._width = 0

    def begin(self, files: int, bytes_: int) -> None:
        """Announce ``files`` files holding ``bytes_`` bytes to read."""
        self.total_files, self.total_bytes = files, bytes_
        self._start = self.clock()

    def advance(self, *, files: int = 0, rows: int = 0, bytes_: int = 0) -> None:
        """Count what was read since the last call; redraw when due."""
        self.files += files
        self.rows += rows
        self.bytes += bytes_
        now = self.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self._draw(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: ``files 3/40, 1.2M rows, 350k rows/s, 8% read, 1m20s left``."""
        elapsed = max((self.clock() if now is None else now) - self._start, 1e-6)
        rate = self.rows / elapsed
        text = f"files {self.files}/{self.total_files}, {_si(self.rows)} rows, {_si(rate)} rows/s"
        if self.total_bytes:
            share = min(self.bytes / self.total_bytes, 1.0)
            text += f", {share:.0%} read"
            if share > 0.001:
                left = elapsed * (1 - share) / share
                text += f", {_duration(left)} left"
        return text

    def _draw(self, text: str) -> None:
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.out.write("\r" + text + " " * pad)
        self.out.flush()

    def done(self) -> None:
        """Clear the progress line."""
        if self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0


def _si(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
