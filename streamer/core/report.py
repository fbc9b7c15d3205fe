"""``streamer report``: aggregate what a sink's files hold into a data-quality report.

Exchange- and format-neutral: the facts come from the sink type
(:meth:`~streamer.core.api.Sink.report_facts`, one :class:`StreamFacts` per stream); this
module computes coverage and summaries, writes the JSON, the text summary, and (with
:mod:`streamer.core.report_html`, optional matplotlib) the HTML page.

Memory stays bounded by the number of streams, not the amount of data: each stream's full
facts (per-minute counts, gaps) go to a temporary spill file as they arrive; only a compact
record per stream (holes, counts) and window-wide aggregates (messages per minute and
latency histograms per stream type) stay in memory. The JSON is written at the end, when
the window is known, streaming the spill file back.

Coverage of a stream over a period: the share of the period not inside a *hole*: the time
before its first row or after its last row when longer than a slack (60 s, two bars for
klines, three mean row spacings: "not collected"), and the time range of every gap after
which rows are missing (an unfilled aggTrade gap, a depth chain break, a book resync, an
overflow...). A quiet market with consecutive keys is complete, not a hole. The period is
``--from``/``--to``, else the span of the rows found (klines aside: a bar sits at its open time).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from .quality import (
    LATENCY_BUCKETS,
    MS_PER_DAY,
    MS_PER_HOUR,
    MS_PER_MINUTE,
    DayFacts,
    GapFact,
    StreamFacts,
    percentile,
)

SLACK_MS = 60_000
PICTURES_HINT = "pip install 'market-streamer[report]'"
#: Holes kept per stream in memory for the pictures (the JSON has every gap).
MAX_HOLES = 2000
#: Gaps listed on the page (the JSON has every gap).
MAX_GAP_ROWS = 300


def iso(ms: int | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS.mmm`` UTC, or None."""
    if ms is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


def parse_when(text: str, *, end: bool = False) -> int:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` (UTC) as ms. A bare date given as an end
    means the end of that day. Raises ``ValueError`` with a readable message."""
    import calendar

    text = text.strip()
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            tm = time.strptime(text, fmt)
        except ValueError:
            continue
        ms = calendar.timegm(tm) * 1000
        if end and fmt == "%Y-%m-%d":
            ms += MS_PER_DAY
        return ms
    raise ValueError(f"bad date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")


def slack_of(
    interval_ms: int | None, first: int | None = None, last: int | None = None, rows: int = 0
) -> int:
    """How far from the period's ends a stream's first and last rows may be without a hole:
    60 s, two bars of a kline stream, three times the stream's mean row spacing."""
    spacing = (
        (last - first) // (rows - 1) if first is not None and last is not None and rows > 1 else 0
    )
    return max(SLACK_MS, 2 * (interval_ms or 0), 3 * spacing)


def merge_holes(holes: list[tuple[int, int, str]], w0: int, w1: int) -> list[list]:
    """Holes clipped to ``[w0, w1)``, sorted and merged (the first cause kept)."""
    out: list[list] = []
    for a, b, cause in sorted((max(a, w0), min(b, w1), c) for a, b, c in holes):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
            if cause not in out[-1][2].split(", "):
                out[-1][2] += ", " + cause
        else:
            out.append([a, b, cause])
    return out


def covered(holes: list[list], a: int, b: int) -> float:
    """Share of ``[a, b)`` outside the (merged) ``holes``."""
    if b <= a:
        return 1.0
    missing = sum(max(0, min(h[1], b) - max(h[0], a)) for h in holes)
    return max(0.0, 1.0 - missing / (b - a))


class _Compact(msgspec.Struct):
    """What stays in memory per stream."""

    exchange: str
    market: str
    symbol: str
    stream: str
    interval_ms: int | None
    first: int | None
    last: int | None
    gap_holes: list[tuple[int, int, str]]
    rows: int
    bytes: int
    files: int
    gaps: int
    errors: int
    causes: dict[str, int]
    #: unexplained gaps per day label
    unexplained_days: dict[str, int]
    coverage: float = 0.0
    holes: list[list] = msgspec.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.exchange}/{self.market}/{self.symbol}/{self.stream}"


def _stream_type(stream: str) -> str:
    return stream


class ReportBuilder:
    """Consumes :class:`StreamFacts` (:meth:`add`), then :meth:`finish` computes coverage
    and returns the model the renderers use; :meth:`write_json` writes the full facts."""

    def __init__(self, root: str, start: int | None = None, end: int | None = None) -> None:
        self.root = root
        self.start, self.end = start, end
        self.compacts: list[_Compact] = []
        self._spill = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._enc = msgspec.msgpack.Encoder()
        #: stream type -> minute (epoch minutes) -> messages
        self.rates: dict[str, dict[int, int]] = {}
        #: stream type -> merged latency histogram; (stream type, epoch hour) -> histogram
        self.latency: dict[str, list[int]] = {}
        self.latency_hours: dict[tuple[str, int], list[int]] = {}
        self.latency_max: dict[str, int] = {}
        self.first: int | None = None
        self.last: int | None = None
        self._span: list[int | None] = [None, None]  # first and last row time, klines aside
        self._bar_span: list[int | None] = [None, None]
        self.model: dict[str, Any] | None = None
        #: The most notable gaps for the page: unexplained first, then the longest holes.
        self.gap_rows: list[tuple[tuple, dict]] = []

    def _keep_gap(self, sf: StreamFacts, g: GapFact) -> None:
        span = (g.last_time or 0) - (g.first_time or 0) if g.missing else 0
        rank = (g.explained, not g.missing, -span)
        row = {"stream": sf.name, **_gap_doc(g)}
        self.gap_rows.append((rank, row))
        if len(self.gap_rows) > 4 * MAX_GAP_ROWS:
            self.gap_rows.sort(key=lambda r: r[0])
            del self.gap_rows[MAX_GAP_ROWS:]

    def notable_gaps(self) -> list[dict]:
        """At most :data:`MAX_GAP_ROWS` gaps, unexplained first, then the longest holes."""
        self.gap_rows.sort(key=lambda r: r[0])
        return [row for _, row in self.gap_rows[:MAX_GAP_ROWS]]

    def add(self, sf: StreamFacts) -> None:
        data = self._enc.encode(sf)
        self._spill.write(len(data).to_bytes(8, "little"))
        self._spill.write(data)
        holes = [
            (g.first_time, g.last_time, g.cause)
            for g in sf.gaps
            if g.missing and g.first_time is not None and g.last_time is not None
        ]
        causes: dict[str, int] = {}
        unexplained_days: dict[str, int] = {}
        for g in sf.gaps:
            key = g.cause if g.explained or g.kind == "silence" else "unexplained"
            causes[key] = causes.get(key, 0) + 1
            if key == "unexplained":
                day = _gap_day(g) or ""
                unexplained_days[day] = unexplained_days.get(day, 0) + 1
            self._keep_gap(sf, g)
        self.compacts.append(
            _Compact(
                sf.exchange, sf.market, sf.symbol, sf.stream, sf.interval_ms,
                sf.first_time, sf.last_time, holes, sf.rows, sf.bytes, sf.files,
                len(sf.gaps), sf.errors, causes, unexplained_days,
            )
        )  # fmt: skip
        if sf.first_time is not None and sf.last_time is not None:
            # Bars are placed at their open time, which can be long before anything else
            # was collected: kline streams set the window only when there is nothing else.
            span = self._bar_span if sf.interval_ms else self._span
            span[0] = sf.first_time if span[0] is None else min(span[0], sf.first_time)
            span[1] = sf.last_time if span[1] is None else max(span[1], sf.last_time)
            self.first, self.last = self._span if self._span[0] is not None else self._bar_span
        kind = _stream_type(sf.stream)
        rates = self.rates.setdefault(kind, {})
        for d in sf.days:
            base = _day_ms(d.day) // MS_PER_MINUTE
            for m, n in enumerate(d.messages_per_minute):
                if n:
                    rates[base + m] = rates.get(base + m, 0) + n
            merged = self.latency.setdefault(kind, [0] * LATENCY_BUCKETS)
            for h, counts in enumerate(d.latency):
                if not counts:
                    continue
                hour = _day_ms(d.day) // MS_PER_HOUR + h
                per_hour = self.latency_hours.setdefault((kind, hour), [0] * LATENCY_BUCKETS)
                for i, n in enumerate(counts):
                    merged[i] += n
                    per_hour[i] += n
                top = d.latency_max[h]
                if top is not None and top > self.latency_max.get(kind, top - 1):
                    self.latency_max[kind] = top

    def window(self) -> tuple[int, int] | None:
        w0 = self.start if self.start is not None else self.first
        w1 = self.end if self.end is not None else (None if self.last is None else self.last + 1)
        if w0 is None or w1 is None or w1 <= w0:
            return None
        return w0, w1

    def finish(self) -> dict[str, Any]:
        """Coverage of every stream over the window; the model of the report."""
        win = self.window()
        streams = self.compacts
        for c in streams:
            if win is None:
                c.coverage, c.holes = 0.0, []
                continue
            c.holes = self._holes(c, *win)[:MAX_HOLES]
            c.coverage = covered(c.holes, *win)
        symbols: dict[str, list[_Compact]] = {}
        for c in streams:
            symbols.setdefault(f"{c.exchange}/{c.market}/{c.symbol}", []).append(c)
        per_symbol = [
            {
                "symbol": name,
                "coverage": sum(c.coverage for c in cs) / len(cs),
                "unexplained": sum(c.errors for c in cs),
                "gaps": sum(c.gaps for c in cs),
                "worst_stream": min(cs, key=lambda c: c.coverage).stream,
            }
            for name, cs in symbols.items()
        ]
        worst = sorted(per_symbol, key=lambda s: (s["coverage"], -s["unexplained"], s["symbol"]))
        causes: dict[str, int] = {}
        for c in streams:
            for k, n in c.causes.items():
                causes[k] = causes.get(k, 0) + n
        span = (win[1] - win[0]) if win else 0
        total = sum(c.coverage * span for c in streams) / (span * len(streams)) if span else 0.0
        days = self._day_rows(win)
        complete = sum(1 for d in days if d["complete"])
        self.model = {
            "root": self.root,
            "generated": iso(int(time.time() * 1000)),
            "window": None if win is None else {"from": iso(win[0]), "to": iso(win[1]),
                                                "from_ms": win[0], "to_ms": win[1]},
            "summary": {
                "streams": len(streams),
                "symbols": len(symbols),
                "stream_days": len(days),
                "complete_stream_days": complete,
                "coverage": total,
                "rows": sum(c.rows for c in streams),
                "bytes": sum(c.bytes for c in streams),
                "files": sum(c.files for c in streams),
                "gaps": sum(c.gaps for c in streams),
                "unexplained": sum(c.errors for c in streams),
                "by_cause": dict(sorted(causes.items())),
                "worst_symbols": worst[:10],
                "empty_streams": [c.name for c in streams if not c.rows],
            },
        }  # fmt: skip
        return self.model

    def _holes(self, c: _Compact, w0: int, w1: int) -> list[list]:
        slack = slack_of(c.interval_ms, c.first, c.last, c.rows)
        if c.first is None or c.last is None:
            return [[w0, w1, "no data"]]
        holes = list(c.gap_holes)
        if c.first - w0 > slack:
            holes.append((w0, c.first, "not collected"))
        if w1 - c.last > slack:
            holes.append((c.last, w1, "not collected"))
        return merge_holes(holes, w0, w1)

    def _day_rows(self, win: tuple[int, int] | None) -> list[dict]:
        """Per stream and day of the window: coverage, and complete (full coverage, no
        unexplained gap dated that day)."""
        if win is None:
            return []
        out = []
        for c in self.compacts:
            for d0 in range(win[0] // MS_PER_DAY * MS_PER_DAY, win[1], MS_PER_DAY):
                a, b = max(d0, win[0]), min(d0 + MS_PER_DAY, win[1])
                if b <= a:
                    continue
                cov = covered(c.holes, a, b)
                label = time.strftime("%Y-%m-%d", time.gmtime(d0 // 1000))
                bad = c.unexplained_days.get(label, 0)
                out.append({"stream": c.name, "day": d0, "coverage": cov,
                            "complete": cov >= 0.9999 and not bad})  # fmt: skip
        return out

    # -- JSON -----------------------------------------------------------------------------
    def write_json(self, path: str) -> None:
        """The whole report as JSON, streamed from the spill file (one stream at a time)."""
        model = self.model if self.model is not None else self.finish()
        win = self.window()
        dec = msgspec.msgpack.Decoder(StreamFacts)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            head = {k: v for k, v in model.items()}
            out.write(json.dumps(head, indent=1)[:-2] + ',\n "streams": [\n')
            self._spill.seek(0)
            for i, compact in enumerate(self.compacts):
                size = int.from_bytes(self._spill.read(8), "little")
                sf = dec.decode(self._spill.read(size))
                doc = _stream_doc(sf, compact, win)
                out.write(("" if i == 0 else ",\n") + json.dumps(doc, separators=(",", ":")))
            out.write("\n ]\n}\n")
        os.replace(tmp, path)

    def close(self) -> None:
        self._spill.close()


def _day_ms(label: str) -> int:
    import calendar

    y, m, d = (int(x) for x in label.split("-"))
    return calendar.timegm((y, m, d, 0, 0, 0)) * 1000


def _gap_doc(g: GapFact) -> dict:
    doc = msgspec.to_builtins(g)
    doc["from"], doc["to"] = iso(g.first_time), iso(g.last_time)
    return doc


def _stream_doc(sf: StreamFacts, c: _Compact, win: tuple[int, int] | None) -> dict:
    days: dict[str, DayFacts] = {d.day: d for d in sf.days}
    labels = set(days)
    if win is not None:
        for d0 in range(win[0] // MS_PER_DAY * MS_PER_DAY, win[1], MS_PER_DAY):
            labels.add(time.strftime("%Y-%m-%d", time.gmtime(d0 // 1000)))
    day_docs = []
    for label in sorted(labels):
        d = days.get(label) or DayFacts(day=label)
        d0 = _day_ms(label)
        a, b = (
            (d0, d0 + MS_PER_DAY)
            if win is None
            else (max(d0, win[0]), min(d0 + MS_PER_DAY, win[1]))
        )
        in_day = [g for g in sf.gaps if _gap_day(g) == label]
        unexplained = sum(1 for g in in_day if not g.explained)
        cov = covered(c.holes, a, b) if b > a else None
        doc: dict[str, Any] = {
            "day": label,
            "coverage": cov,
            "complete": cov is not None and cov >= 0.9999 and not unexplained,
            "holes": [
                {"from": iso(max(h[0], a)), "to": iso(min(h[1], b)), "cause": h[2],
                 "seconds": (min(h[1], b) - max(h[0], a)) / 1000}
                for h in c.holes if h[1] > a and h[0] < b
            ],
            "files": d.files, "bytes": d.bytes, "rows": d.rows, "messages": d.messages,
            "first": iso(d.first_time), "last": iso(d.last_time),
            "gaps": len(in_day), "unexplained": unexplained,
            "markers": d.markers,
            "rows_per_minute": d.rows_per_minute,
            "messages_per_minute": d.messages_per_minute,
            "latency_ms": [
                {"hour": h, "samples": sum(counts), "p50": percentile(counts, 0.5),
                 "p99": percentile(counts, 0.99), "max": d.latency_max[h]}
                for h, counts in enumerate(d.latency) if counts
            ],
        }  # fmt: skip
        if sf.interval_ms and b > a:
            lo = -(-(a // sf.interval_ms * sf.interval_ms) // sf.interval_ms)
            hi = (b - 1) // sf.interval_ms
            doc["klines"] = {"closed": d.rows, "expected": max(0, hi - lo + 1)}
        if sf.stream == "orderbook":
            doc["book"] = {
                "snapshots": d.rows,
                "resyncs": d.markers.get("resync", 0),
                "verify_mismatches": d.markers.get("verify_mismatch", 0),
                "note": "successful verifications are not written to files: "
                "see the `verifications` counter of `streamer status`",
            }
        day_docs.append(doc)
    return {
        "exchange": sf.exchange, "market": sf.market, "symbol": sf.symbol, "stream": sf.stream,
        "coverage": c.coverage, "files": sf.files, "bytes": sf.bytes, "rows": sf.rows,
        "first": iso(sf.first_time), "last": iso(sf.last_time),
        "problems": sf.problems, "unexplained": sf.errors,
        "gaps": [_gap_doc(g) for g in sf.gaps],
        "days": day_docs,
    }  # fmt: skip


def _gap_day(g: GapFact) -> str | None:
    t = g.first_time if g.first_time is not None else g.last_time
    return None if t is None else time.strftime("%Y-%m-%d", time.gmtime(t // 1000))


# -- text ---------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_text(builder: ReportBuilder) -> str:
    """A short text summary: window, completeness, gaps by cause, the worst symbols."""
    model = builder.model if builder.model is not None else builder.finish()
    s = model["summary"]
    win = model["window"]
    lines = []
    if win:
        lines.append(f"period: {win['from']} - {win['to']} UTC")
    lines.append(
        f"{s['symbols']} symbol(s), {s['streams']} stream(s), {s['rows']} rows in "
        f"{s['files']} files ({_size(s['bytes'])})"
    )
    lines.append(
        f"complete: {s['complete_stream_days']}/{s['stream_days']} stream-days; "
        f"coverage {s['coverage']:.2%}"
    )
    causes = ", ".join(f"{k} {v}" for k, v in s["by_cause"].items()) or "none"
    lines.append(f"gaps and repairs: {s['gaps']} ({causes}); unexplained: {s['unexplained']}")
    bad = [w for w in s["worst_symbols"] if w["coverage"] < 0.9999 or w["unexplained"]]
    if bad:
        lines.append("worst symbols:")
        for w in bad:
            lines.append(
                f"  {w['symbol']:<32} {w['coverage']:8.2%}  unexplained {w['unexplained']}"
                f"  (worst stream {w['worst_stream']})"
            )
    for name in s["empty_streams"]:
        lines.append(f"note: {name}: no rows (files hold only a header, or only markers)")
    return "\n".join(lines)


def build(
    facts: Iterable[StreamFacts], root: str, start: int | None, end: int | None
) -> ReportBuilder:
    """Feed every stream's facts to a new :class:`ReportBuilder` and finish it."""
    builder = ReportBuilder(root, start, end)
    for sf in facts:
        builder.add(sf)
    builder.finish()
    return builder
