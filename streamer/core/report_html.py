"""The data-quality report as one self-contained HTML page (``streamer report -o``).

Tables are plain HTML; the pictures are matplotlib figures inlined as SVG (the optional
extra ``market-streamer[report]``). Nothing refers to anything outside the file: no
script, no stylesheet, no font or image URL, so it opens from disk in any browser.
Without matplotlib the page has the tables and says how to get the pictures.
"""

from __future__ import annotations

import html
import io
import re
import time
import warnings
from typing import Any

from .quality import LATENCY_EDGES_MS, MS_PER_MINUTE, percentile
from .report import PICTURES_HINT, ReportBuilder, _size, iso

#: Above this many streams the coverage timeline becomes a heat-map of symbols.
TIMELINE_MAX = 48
#: Streams listed in the table (the worst first); the JSON has all.
MAX_STREAM_ROWS = 1000

_GOOD, _BAD, _EXPLAINED, _QUIET = "#2e9d5b", "#d64541", "#f0a202", "#d9d9d9"
_STEPS_MS = [1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
             3 * 3_600_000, 6 * 3_600_000, 86_400_000]  # fmt: skip

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid
#ddd;padding-bottom:4px} .sub{color:#666;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:24px} .card span{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} th,td{border-bottom:1px solid #eee;
padding:3px 8px;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b02a26;font-weight:600} .ok{color:#2e7d4f} .note{background:#fff7e0;
border:1px solid #f0d890;padding:8px 12px;border-radius:4px}
figure{margin:8px 0} svg{max-width:100%;height:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_html(builder: ReportBuilder) -> str:
    """The page: summary, coverage, rates, latency, gaps, streams."""
    model = builder.model if builder.model is not None else builder.finish()
    s = model["summary"]
    win = model["window"]
    pictures = have_matplotlib()
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Data-quality report: {_e(model['root'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Data-quality report</h1>",
        f'<div class="sub">{_e(model["root"])} &middot; '
        + (f"{_e(win['from'])} &ndash; {_e(win['to'])} UTC" if win else "no rows")
        + f" &middot; generated {_e(model['generated'])} UTC</div>",
    ]
    if not pictures:
        out.append(
            f'<p class="note">No pictures: matplotlib is not installed. '
            f"<code>{_e(PICTURES_HINT)}</code> and run the report again.</p>"
        )
    # -- summary
    bad = s["unexplained"]
    out.append('<div class="cards">')
    for value, label, cls in (
        (_pct(s["coverage"]), "coverage (time with data)", ""),
        (f"{s['complete_stream_days']}/{s['stream_days']}", "stream-days complete", ""),
        (str(bad), "unexplained problems", "bad" if bad else "ok"),
        (str(s["gaps"]), "gaps and repairs", ""),
        (f"{s['rows']:,}", "rows", ""),
        (_size(s["bytes"]), f"on disk in {s['files']} files", ""),
    ):
        out.append(
            f'<div class="card"><b class="{cls}">{_e(value)}</b><span>{_e(label)}</span></div>'
        )
    out.append("</div>")
    if s["by_cause"]:
        causes = ", ".join(f"{_e(k)}: {v}" for k, v in s["by_cause"].items())
        out.append(f"<p>Gaps and repairs by cause: {causes}.</p>")
    out.append("<h2>Worst ten symbols</h2>")
    out.append(_table(
        ["symbol", "coverage", "unexplained", "gaps", "worst stream"],
        [[w["symbol"], _pct(w["coverage"]), w["unexplained"], w["gaps"], w["worst_stream"]]
         for w in s["worst_symbols"]],
        numeric={1, 2, 3},
    ))  # fmt: skip
    if pictures and s["worst_symbols"]:
        out.append(_figure(_worst_chart(s["worst_symbols"])))
    for name in s["empty_streams"]:
        out.append(
            f"<p class='note'>{_e(name)}: no rows (files hold only a header, or only markers)</p>"
        )
    # -- pictures
    if pictures and win:
        out.append("<h2>Coverage</h2>")
        many = len(builder.compacts) > TIMELINE_MAX
        out.append(
            "<p class='sub'>"
            + (
                "Share of each time slot with data, per symbol (its worst stream); red is missing."
                if many
                else "Green: rows present; red: missing rows no marker explains (unexplained "
                "gaps, silent order books, spans not collected); amber: missing, explained by "
                "a marker; blue ticks: gaps repaired (filled)."
            )
            + "</p>"
        )
        span = builder.window()
        out.append(_figure(_heatmap(builder, span) if many else _timeline(builder, span)))
        out.append("<h2>Messages per minute</h2>")
        out.append(_figure(_rates(builder)))
        out.append("<h2>Latency: exchange event time to receive time</h2>")
        out.append(_figure(_latency(builder)))
    if builder.latency:
        rows = []
        for kind, counts in sorted(builder.latency.items()):
            rows.append([kind, sum(counts), percentile(counts, 0.5), percentile(counts, 0.99),
                         builder.latency_max.get(kind)])  # fmt: skip
        out.append(_table(["stream", "samples", "p50 ms (<=)", "p99 ms (<=)", "max ms"], rows,
                          numeric={1, 2, 3, 4}))  # fmt: skip
    # -- gaps
    gaps = builder.notable_gaps()
    out.append(f"<h2>Gaps ({s['gaps']}; {len(gaps)} listed, unexplained first)</h2>")
    out.append(_table(
        ["stream", "what", "cause", "keys", "from (UTC)", "to (UTC)", "missing", "explained",
         "reason"],
        [[g["stream"], g["kind"], g["cause"], _keys(g), g["from"] or "-", g["to"] or "-",
          "yes" if g["missing"] else "no", "yes" if g["explained"] else "NO",
          g["reason"]] for g in gaps],
        bad_col=7,
    ))  # fmt: skip
    # -- streams
    streams = sorted(builder.compacts, key=lambda c: (c.coverage, -c.errors, c.name))
    out.append(
        f"<h2>Streams ({len(streams)}"
        + (f"; the worst {MAX_STREAM_ROWS} listed" if len(streams) > MAX_STREAM_ROWS else "")
        + ")</h2>"
    )
    out.append(_table(
        ["stream", "coverage", "rows", "files", "bytes", "first (UTC)", "last (UTC)", "gaps",
         "unexplained"],
        [[c.name, _pct(c.coverage), c.rows, c.files, _size(c.bytes), iso(c.first) or "-",
          iso(c.last) or "-", c.gaps, c.errors] for c in streams[:MAX_STREAM_ROWS]],
        numeric={1, 2, 3, 4, 7, 8},
    ))  # fmt: skip
    out.append(
        "<p class='sub'>Per stream and day (rows and messages per minute, latency p50/p99/max "
        "per hour, closed klines against the expected count, book resyncs, bytes on disk): "
        "the JSON report (<code>--json</code>).</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)


def _keys(g: dict) -> str:
    a, b = g["first_key"], g["last_key"]
    if not a and not b:
        return "-"
    if b == 0:
        return f"{a}-"
    return str(a) if a == b else f"{a}-{b}"


def _table(head, rows, numeric=frozenset(), bad_col=None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = "n" if i in numeric else ""
            if bad_col == i and v == "NO":
                cls = "bad"
            cells.append(f'<td class="{cls}">{_e("-" if v is None else v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


# -- figures --------------------------------------------------------------------------------
def _figure(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with (
        matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "streamer"}),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # tick locators on very short spans, tight layout
        fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.find("<svg") :]
    # Drop the metadata block (it names matplotlib's web site) and any comment.
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return f"<figure>{svg}</figure>"


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.patch.set_facecolor("white")
    return fig


def _time_axis(ax, w0: int, w1: int) -> None:
    import matplotlib.dates as mdates

    ax.set_xlim(w0 / 86_400_000, w1 / 86_400_000)  # matplotlib date numbers: days since epoch
    span = w1 - w0
    fmt = "%H:%M:%S" if span < 600_000 else ("%H:%M" if span < 2 * 86_400_000 else "%m-%d")
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=10))


def _d(ms: float) -> float:
    return ms / 86_400_000  # epoch-based date numbers (matplotlib's default epoch is 1970)


def _worst_chart(worst: list[dict]):
    fig = _new_figure(9, 0.3 * len(worst) + 0.8)
    ax = fig.add_subplot()
    names = [w["symbol"] for w in reversed(worst)]
    values = [w["coverage"] * 100 for w in reversed(worst)]
    colors = [
        _BAD if w["unexplained"] else (_GOOD if w["coverage"] >= 0.9999 else _EXPLAINED)
        for w in reversed(worst)
    ]
    ax.barh(names, values, color=colors)
    ax.set_xlim(min(values) - 1 if min(values) > 90 else 0, 100.5)
    ax.set_xlabel("coverage %")
    ax.tick_params(labelsize=8)
    for i, w in enumerate(reversed(worst)):
        if w["unexplained"]:
            ax.text(100, i, f" {w['unexplained']} unexplained", va="center", fontsize=8,
                    color=_BAD)  # fmt: skip
    return fig


def _timeline(builder: ReportBuilder, win: tuple[int, int]):
    w0, w1 = win
    streams = sorted(builder.compacts, key=lambda c: c.name)
    fig = _new_figure(11, 0.28 * len(streams) + 1.2)
    ax = fig.add_subplot()
    gaps_by_stream: dict[str, list[dict]] = {}
    for g in builder.notable_gaps():
        gaps_by_stream.setdefault(g["stream"], []).append(g)
    for y, c in enumerate(streams):
        ax.broken_barh([(_d(w0), _d(w1) - _d(w0))], (y - 0.35, 0.7), color=_GOOD)
        for a, b, cause in c.holes:
            unexplained = any(
                c in cause for c in ("not collected", "no data", "unexplained", "silence")
            )
            color = _BAD if unexplained else _EXPLAINED
            width = max(_d(b) - _d(a), (_d(w1) - _d(w0)) / 800)
            ax.broken_barh([(_d(a), width)], (y - 0.35, 0.7), color=color)
        ticks = [
            _d(g["first_time"]) for g in gaps_by_stream.get(c.name, [])
            if not g["missing"] and g["first_time"] is not None
        ]  # fmt: skip
        if ticks:
            ax.plot(ticks, [y] * len(ticks), "|", color="#1f5fbf", markersize=9)
    ax.set_yticks(range(len(streams)), [c.name for c in streams], fontsize=8)
    ax.set_ylim(-0.6, len(streams) - 0.4)
    ax.invert_yaxis()
    _time_axis(ax, w0, w1)
    ax.set_xlabel("UTC")
    ax.grid(axis="x", color="#eee")
    return fig


def _bins(w0: int, w1: int, most: int = 300) -> int:
    for step in _STEPS_MS:
        if (w1 - w0) / step <= most:
            return step
    return _STEPS_MS[-1]


def _heatmap(builder: ReportBuilder, win: tuple[int, int]):
    import numpy as np

    from .report import covered

    w0, w1 = win
    step = _bins(w0, w1)
    n = max(1, -(-(w1 - w0) // step))
    symbols: dict[str, list] = {}
    for c in builder.compacts:
        symbols.setdefault(f"{c.market}/{c.symbol}", []).append(c)
    names = sorted(symbols)
    grid = np.ones((len(names), n))
    for i, name in enumerate(names):
        for c in symbols[name]:  # each slot: its worst stream, so one missing stream shows
            slots: dict[int, float] = {}
            for a, b, _ in c.holes:
                for j in range(max(0, (a - w0) // step), min(n, (b - w0) // step + 1)):
                    s0 = w0 + j * step
                    lost = 1 - covered([[a, b, ""]], s0, min(s0 + step, w1))
                    slots[j] = slots.get(j, 0.0) + lost
            for j, lost in slots.items():
                grid[i, j] = min(grid[i, j], max(0.0, 1 - lost))
    height = min(max(2.5, len(names) * 0.012 + 1.5), 14)
    fig = _new_figure(11, height)
    ax = fig.add_subplot()
    img = ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap="RdYlGn", vmin=0, vmax=1,
        extent=(_d(w0), _d(w0 + n * step), len(names), 0),
    )  # fmt: skip
    fig.colorbar(img, ax=ax, label="share of time with data", fraction=0.03)
    _time_axis(ax, w0, w1)
    ax.set_ylabel(f"{len(names)} symbols (sorted by name)")
    if len(names) <= 60:
        ax.set_yticks([i + 0.5 for i in range(len(names))], names, fontsize=7)
    ax.set_xlabel(f"UTC, slots of {step // 1000} s")
    return fig


def _rates(builder: ReportBuilder):
    fig = _new_figure(11, 3.2)
    ax = fig.add_subplot()
    lo = hi = None
    for kind, per_minute in sorted(builder.rates.items()):
        if not per_minute:
            continue
        minutes = sorted(per_minute)
        xs = [_d(m * MS_PER_MINUTE) for m in minutes]
        ax.step(xs, [per_minute[m] for m in minutes], where="post", label=kind, linewidth=1.2)
        lo = minutes[0] if lo is None else min(lo, minutes[0])
        hi = minutes[-1] if hi is None else max(hi, minutes[-1])
    if lo is not None:
        _time_axis(ax, lo * MS_PER_MINUTE, (hi + 1) * MS_PER_MINUTE)
    ax.set_ylabel("messages / minute (all symbols)")
    ax.set_yscale("symlog", linthresh=10)
    ax.grid(color="#eee")
    ax.legend(fontsize=8, loc="upper left", ncols=4)
    return fig


def _latency(builder: ReportBuilder):
    fig = _new_figure(11, 3.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.3])
    for kind, counts in sorted(builder.latency.items()):
        total = sum(counts) or 1
        # bucket i holds (edges[i-1], edges[i]]; bucket 0 (<= 0 ms) is drawn at 0.5 ms
        xs = [0.5, *LATENCY_EDGES_MS[1:], LATENCY_EDGES_MS[-1] * 2]
        ax1.step(xs, [n / total for n in counts], where="mid", label=kind, linewidth=1.2)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency ms (bucket upper bound, log)")
    ax1.set_ylabel("share of rows")
    ax1.grid(color="#eee")
    ax1.legend(fontsize=8)
    for kind in sorted(builder.latency):
        hours = sorted(h for k, h in builder.latency_hours if k == kind)
        if not hours:
            continue
        xs = [_d(h * 3_600_000) for h in hours]
        p50 = [percentile(builder.latency_hours[(kind, h)], 0.5) for h in hours]
        p99 = [percentile(builder.latency_hours[(kind, h)], 0.99) for h in hours]
        line = ax2.plot(xs, p99, marker="o", markersize=3, label=f"{kind} p99")[0]
        ax2.plot(xs, p50, marker=".", linestyle="--", color=line.get_color(), label=f"{kind} p50")
    ax2.set_yscale("symlog", linthresh=1)
    ax2.set_ylabel("ms per hour (p50 dashed, p99)")
    ax2.grid(color="#eee")
    import matplotlib.dates as mdates

    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:00"))
    ax2.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=6))
    ax2.legend(fontsize=7, ncols=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout()
    return fig


def page_time() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
