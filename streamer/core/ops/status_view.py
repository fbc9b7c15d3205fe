"""Reading, judging and rendering what a running collector publishes.

The runtime replaces ``<state_dir>/status.json`` every ``runtime.status_interval`` seconds
(shape documented in :mod:`streamer.core.runtime.status_file`). This module turns one or two
such documents into a :class:`StatusView`: per pipeline, per sink, per child process and
per ``(pipeline, symbol, stream)`` row, with rates and flags, plus an overall verdict
(``healthy``, ``degraded``, ``down``) that ``streamer health`` turns into an exit code.

Rates come from two documents (``prev`` and ``cur``: the counter difference over the
difference of their ``updated_at``), or, with a single document, from the counters over
the run's age. Counters restart from zero when a child restarts; a negative difference
is treated as "restarted" and the rate falls back to the current value over the window.

The reader is tolerant by design: a counter it does not find is shown as ``-``, unknown
keys are ignored, so an older or newer runtime still gives a useful table.

Which counters feed which column (first name found wins; see ``docs/operations.md``):

=============  ===========================================================================
messages       ``records_emitted`` of the pipeline's workers for that (symbol, stream)
written        ``records_written`` of the sinks' writers (records handed to the sink)
flushed        ``records_flushed`` of the writers (records known to be in files, the unit
               of ``written``), else (older writers) ``rows_flushed`` or ``rows_written``
last event     gauge ``last_event_time`` (exchange ms); lag = updated_at - last event
behind         gauge ``written_event_time`` of the writers: updated_at minus the exchange
               time of the newest record in the files (the slowest sink)
held           gauges ``trades_held`` and ``held_for_ms`` of the stream, when published
gaps           ``gaps_found`` or ``gaps_filled + gaps_unfillable``; filled ``gaps_filled``
resyncs        ``resyncs``; verifications ``verifications``
reconnects     ``reconnects`` per row, else the pipeline's ``reconnects``/``ws_reconnects``
REST weight    gauge ``rest_weight_used`` of the pipeline
sink errors    ``write_errors`` and ``rows_dropped`` summed over the sink's streams and
               process; pending ``rows_pending`` + queued batches; ``last_flush_time``
=============  ===========================================================================

Sink counters are matched to a pipeline's rows by market: writers key theirs by
``(exchange/market, symbol, stream)`` (the document's ``markets``), so BTCUSDT of a spot
and of a USD-M pipeline are two rows with their own counts. Counters a sink keeps by bare
symbol are used only when a writer published nothing for the market.

Thresholds follow each stream's cadence: a ``kline_<interval>`` stream writes one bar per
interval and a stream type with an ``interval`` option (an order book every ``1s``)
publishes it as its cadence; the lag, silent and behind thresholds are the configured
ones plus that cadence.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

import msgspec

from ..records import KLINE_STREAM_PREFIX
from ..units import KLINE_INTERVALS, format_size, interval_ms
from .processes import pid_alive

Health = Literal["healthy", "degraded", "down"]

#: Row flags.
SILENT = "silent"
LAGGING = "lagging"
RESYNC = "resync"
RESTARTED = "restarted"
DOWN = "down"
BACKLOG = "backlog"
BEHIND = "behind"
STALLED = "stalled"
UNRESPONSIVE = "unresponsive"


class StatusError(Exception):
    """No usable status document: missing, unreadable or not a status."""


class Thresholds(msgspec.Struct, kw_only=True, frozen=True):
    """When a stream or process gets flagged (seconds unless stated)."""

    #: A stream with no new message for this long (or none at all this long after
    #: start) is ``silent``. Quiet symbols may need more; kline streams tick every ~2 s.
    silent_after: float = 60.0
    #: A stream whose last exchange event is older than this while messages still arrive
    #: is ``lagging``.
    lag_after: float = 10.0
    #: An order book without output for this long while updates are buffered is ``resync``.
    resync_after: float = 60.0
    #: The status document is ``down`` when older than this.
    stale_after: float = 15.0
    #: A child restarted less than this long ago makes the run ``degraded``.
    restart_window: float = 300.0
    #: Records waiting in a worker (``pending_records``) above this are a ``backlog``.
    backlog_records: int = 100_000
    #: A stream whose newest record in a sink's files is older than this, plus the sink's
    #: flush interval and the stream's cadence, is ``behind``.
    behind_after: float = 10.0
    #: A sink that has not flushed for this many flush intervals (and at least
    #: ``flush_stall_min`` seconds) while rows wait for it is ``stalled``.
    flush_stall_intervals: float = 5.0
    flush_stall_min: float = 5.0
    #: A running child whose own last report is older than this is ``unresponsive``
    #: (stopped with SIGSTOP, or its event loop is stuck).
    child_stale_after: float = 10.0


class StreamRow(msgspec.Struct, kw_only=True):
    """One ``(pipeline, symbol, stream)``. ``None`` means "not published"."""

    pipeline: str
    symbol: str
    stream: str
    messages: int = 0
    rate: float = 0.0
    last_event_time: int | None = None
    lag: float | None = None
    written: int | None = None
    flushed: int | None = None
    reconnects: int = 0
    gaps_found: int = 0
    gaps_filled: int = 0
    resyncs: int = 0
    verifications: int = 0
    #: Records recovered from REST (``<kind>_backfilled`` counters of the stream).
    backfilled: int = 0
    #: Seconds between the stream's outputs when it writes on a clock (klines, books).
    cadence: float = 0.0
    #: Exchange time (ms) of the newest record in the files of the slowest sink.
    written_event_time: int | None = None
    #: Seconds the written output is behind: ``updated_at`` - ``written_event_time``.
    behind: float | None = None
    #: Trades held back by the stream (waiting for a gap fill) and for how long (s).
    held: int | None = None
    held_for: float | None = None
    #: Seconds without a new message, when known (from history or the event lag).
    idle: float | None = None
    flags: list[str] = msgspec.field(default_factory=list)


class PipelineRow(msgspec.Struct, kw_only=True):
    """One pipeline: totals over its symbols and its worker processes."""

    name: str
    exchange: str = ""
    market: str = ""
    symbols: int = 0
    messages: int = 0
    rate: float = 0.0
    ws_messages: int | None = None
    reconnects: int = 0
    rest_weight_used: int | None = None
    queue_depth: int = 0
    pending_records: int = 0
    restarts: int = 0
    workers: int = 0
    workers_running: int = 0
    flags: list[str] = msgspec.field(default_factory=list)


class SinkRow(msgspec.Struct, kw_only=True):
    """One sink instance (its writer process)."""

    name: str
    type: str = ""
    written: int = 0
    flushed: int | None = None
    rate: float = 0.0
    queue_depth: int = 0
    duplicates_dropped: int = 0
    write_errors: int = 0
    rows_dropped: int = 0
    #: Rows waiting for a retry after failed writes (gauge ``rows_buffered``).
    rows_buffered: int = 0
    #: Rows accepted by the sink and not yet flushed, plus batches queued for it.
    pending: int = 0
    #: Seconds since the writer last flushed (or found nothing to flush), when published.
    since_flush: float | None = None
    flush_interval: float | None = None
    flags: list[str] = msgspec.field(default_factory=list)


class ChildRow(msgspec.Struct, kw_only=True):
    """One child process of the supervisor."""

    name: str
    kind: str
    pid: int | None = None
    state: Literal["running", "down"] = "down"
    restarts: int = 0
    uptime: float = 0.0
    last_exit_code: int | None = None
    queue_depth: int = 0
    #: Bytes it holds for the sinks (a worker: pending records and queued batches; a
    #: writer: its queue) and its budget (``worker_buffer``/``writer_buffer``).
    held_bytes: int = 0
    buffer_bytes: int = 0
    #: A worker: times it asked the exchange adapter to stop reading, and whether it is
    #: paused now.
    read_pauses: int = 0
    reading_paused: bool = False
    #: Seconds since the child's own last report (``None``: it does not say).
    report_age: float | None = None
    flags: list[str] = msgspec.field(default_factory=list)


class StatusView(msgspec.Struct, kw_only=True):
    """Everything ``streamer status`` shows, also its ``--json`` output."""

    pid: int = 0
    #: ``running``, ``stopping`` or ``stopped`` as published; ``gone`` when the supervisor
    #: died without saying so.
    state: str = "unknown"
    exit_code: int | None = None
    started_at: int = 0
    updated_at: int = 0
    #: Seconds since ``updated_at`` when the view was built.
    age: float = 0.0
    uptime: float = 0.0
    #: Seconds the rates were measured over (0: averages since start).
    window: float = 0.0
    health: Health = "down"
    problems: list[str] = msgspec.field(default_factory=list)
    pipelines: list[PipelineRow] = msgspec.field(default_factory=list)
    sinks: list[SinkRow] = msgspec.field(default_factory=list)
    children: list[ChildRow] = msgspec.field(default_factory=list)
    streams: list[StreamRow] = msgspec.field(default_factory=list)

    @property
    def published(self) -> float:
        """``updated_at`` in seconds since the epoch (0 when unknown)."""
        return self.updated_at / 1000.0


# -- loading ---------------------------------------------------------------------------------
def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw status document at ``path``; raises :class:`StatusError` with the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StatusError(
            f"no status at {path}: the collector is not running or uses another state dir"
        ) from None
    except OSError as exc:
        raise StatusError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise StatusError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "pipelines" not in doc:
        raise StatusError(f"{path} is not a streamer status document (no 'pipelines')")
    return doc


def load_status(
    path: str | os.PathLike[str],
    *,
    prev: Mapping[str, Any] | None = None,
    thresholds: Thresholds | None = None,
    now: float | None = None,
) -> StatusView:
    """Read ``path`` and build its view (see :func:`build_view`)."""
    return build_view(read_document(path), prev=prev, thresholds=thresholds, now=now)


# -- building --------------------------------------------------------------------------------
def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _first(counters: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        if name in counters:
            return _int(counters[name])
    return None


def _streams_of(section: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(symbol, stream): counters}`` of a pipeline or sink section."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    streams = section.get("streams")
    if not isinstance(streams, dict):
        return out
    for symbol, per_symbol in streams.items():
        if not isinstance(per_symbol, dict):
            continue
        for stream, counters in per_symbol.items():
            if isinstance(counters, dict):
                out[(symbol, stream)] = counters
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _rate(cur: int | None, prev: int | None, window: float, age: float) -> float:
    if cur is None:
        return 0.0
    if window > 0 and prev is not None:
        delta = cur - prev if cur >= prev else cur  # a restart reset the counter
        return delta / window
    return cur / age if age > 0 else 0.0


def build_view(
    doc: Mapping[str, Any],
    *,
    prev: Mapping[str, Any] | None = None,
    thresholds: Thresholds | None = None,
    now: float | None = None,
    history: StatusHistory | None = None,
    check_pid: bool = True,
) -> StatusView:
    """Judge one status document, with rates over ``prev`` when given.

    ``history`` (kept by a caller that reads repeatedly, e.g. ``--watch``) remembers when
    each stream last made progress so ``silent`` and ``resync`` can be flagged after their
    thresholds. ``check_pid`` also verifies that the publishing supervisor is alive (turn it
    off for documents from another machine or a fixture).
    """
    th = thresholds or Thresholds()
    now = time.time() if now is None else now
    updated = _int(doc.get("updated_at"))
    started = _int(doc.get("started_at"))
    prev_updated = _int(prev.get("updated_at")) if prev else 0
    window = (updated - prev_updated) / 1000.0 if prev and updated > prev_updated else 0.0
    if window <= 0:
        prev = None
    uptime = max(0.0, (updated - started) / 1000.0) if started and updated else 0.0
    view = StatusView(
        pid=_int(doc.get("pid")),
        state=str(doc.get("state", "unknown")),
        exit_code=doc.get("exit_code") if isinstance(doc.get("exit_code"), int) else None,
        started_at=started,
        updated_at=updated,
        age=max(0.0, now - updated / 1000.0) if updated else 0.0,
        uptime=uptime,
        window=window,
    )
    _children(view, doc, th)
    sink_streams = _sinks(view, doc, prev, window, uptime, th)
    _pipelines(view, doc, prev, window, uptime, th, sink_streams, history)
    _judge(view, th, check_pid)
    return view


def _children(view: StatusView, doc: Mapping[str, Any], th: Thresholds) -> None:
    for name, child in sorted(_dict(doc.get("children")).items()):
        if not isinstance(child, dict):
            continue
        info = _dict(child.get("info"))
        depths = _dict(info.get("queue_depths"))
        depth = sum(_int(v) for v in depths.values()) + _int(info.get("queue_depth"))
        row = ChildRow(
            name=name,
            kind=str(child.get("kind", "")),
            pid=child.get("pid") if isinstance(child.get("pid"), int) else None,
            state="running" if child.get("alive") else "down",
            restarts=_int(child.get("restarts")),
            uptime=_float(child.get("uptime")),
            last_exit_code=child.get("last_exit_code")
            if isinstance(child.get("last_exit_code"), int)
            else None,
            queue_depth=depth,
            held_bytes=_int(info.get("held_bytes")),
            buffer_bytes=_int(info.get("buffer_bytes")),
            read_pauses=_int(info.get("read_pauses")),
            reading_paused=info.get("reading_paused") is True,
        )
        if row.state == "down":
            row.flags.append(DOWN)
        elif row.restarts and row.uptime < th.restart_window:
            row.flags.append(RESTARTED)
        reported = _int(info.get("status_time"))
        if reported and view.updated_at:
            row.report_age = max(0.0, (view.updated_at - reported) / 1000.0)
        if row.state == "running" and (row.report_age or 0.0) >= th.child_stale_after:
            row.flags.append(UNRESPONSIVE)
        if _int(info.get("pending_records")) > th.backlog_records:
            row.flags.append(BACKLOG)
        view.children.append(row)


class _SinkStreams(msgspec.Struct):
    """One sink's per-stream counters: by market (current writers) and by bare symbol."""

    flush_interval: float
    markets: dict[tuple[str, str, str], dict[str, Any]]
    bare: dict[tuple[str, str], dict[str, Any]]

    def of(self, market: str, symbol: str, stream: str) -> tuple[dict[str, Any] | None, bool]:
        """The counters of one stream and whether they are the writer's market-keyed ones.

        A writer that keys by market has its counts summed over markets in the bare
        section: those belong to no single pipeline, so they are never a fallback."""
        if self.markets:
            return self.markets.get((market, symbol, stream)), True
        return self.bare.get((symbol, stream)), False


def _markets_of(sink: Mapping[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for market, per_market in _dict(sink.get("markets")).items():
        for (symbol, stream), counters in _streams_of({"streams": per_market}).items():
            out[(market, symbol, stream)] = counters
    return out


def _sinks(
    view: StatusView,
    doc: Mapping[str, Any],
    prev: Mapping[str, Any] | None,
    window: float,
    age: float,
    th: Thresholds,
) -> list[_SinkStreams]:
    """Fill ``view.sinks``; returns each sink's per-stream counters for the stream rows."""
    out: list[_SinkStreams] = []
    prev_sinks = _dict(prev.get("sinks")) if prev else {}
    children = {c.name: c for c in view.children}
    raw_children = _dict(doc.get("children"))
    for name, sink in sorted(_dict(doc.get("sinks")).items()):
        if not isinstance(sink, dict):
            continue
        totals = _dict(sink.get("totals"))
        process = _dict(sink.get("process"))
        written = _first(totals, "records_written") or 0
        prev_totals = _dict(_dict(prev_sinks.get(name)).get("totals"))
        # Its writer processes: ``sink.<name>``, or ``sink.<name>#<i>`` when it runs as
        # several (their children carry ``sink``); the sink is down when one of them is.
        writers = [
            children[n]
            for n, c in raw_children.items()
            if n in children
            and isinstance(c, dict)
            and c.get("kind") == "writer"
            and c.get("sink", n[5:] if n.startswith("sink.") else None) == name
        ]
        interval_ms = _first(process, "flush_interval_ms")
        row = SinkRow(
            name=name,
            type=str(sink.get("type", "")),
            written=written,
            flushed=_sink_flushed(sink),
            rate=_rate(written, _first(prev_totals, "records_written"), window, age),
            queue_depth=sum(w.queue_depth for w in writers),
            duplicates_dropped=_first(totals, "duplicates_dropped") or 0,
            # Sinks count errors per stream, per process or both: the totals hold the sum.
            write_errors=_summed(sink, "write_errors"),
            rows_dropped=_summed(sink, "rows_dropped"),
            rows_buffered=_first(process, "rows_buffered") or 0,
            flush_interval=interval_ms / 1000.0 if interval_ms else None,
        )
        # What waits for this sink: rows in the sink, batches in its writer's queue and in
        # the queues of the workers sending to it (those grow when the writer stops reading).
        row.pending = (
            (_first(process, "rows_pending") or 0)
            + row.queue_depth
            + sum(
                _int(_dict(_dict(_dict(c).get("info")).get("queue_depths")).get(name))
                for c in raw_children.values()
                if isinstance(c, dict) and c.get("kind") == "worker"
            )
        )
        last_flush = _first(process, "last_flush_time")
        if last_flush and view.updated_at:
            row.since_flush = max(0.0, (view.updated_at - last_flush) / 1000.0)
        if any(w.state == "down" for w in writers):
            row.flags.append(DOWN)
        elif (
            row.pending and row.since_flush is not None and row.since_flush >= _stall_after(row, th)
        ):
            row.flags.append(STALLED)
        view.sinks.append(row)
        out.append(_SinkStreams(row.flush_interval or 0.0, _markets_of(sink), _streams_of(sink)))
    return out


def _stall_after(sink: SinkRow, th: Thresholds) -> float:
    return max(th.flush_stall_min, th.flush_stall_intervals * (sink.flush_interval or 1.0))


def _summed(sink: Mapping[str, Any], name: str) -> int:
    """A sink counter over everything: its total, or (documents without one) the sum of
    its process-wide and per-stream values."""
    found = _first(_dict(sink.get("totals")), name)
    if found is not None:
        return found
    per_stream = sum(_first(c, name) or 0 for c in _streams_of(sink).values())
    return (_first(_dict(sink.get("process")), name) or 0) + per_stream


def _sink_flushed(sink: Mapping[str, Any]) -> int | None:
    """Records a sink holds in its files, in the unit of ``written``: the writers'
    ``records_flushed`` summed over streams; from older writers, the rows the sink counted
    (process-wide when it keeps one, else over its streams; never both)."""
    records = [_first(c, "records_flushed") for c in _streams_of(sink).values()]
    if any(n is not None for n in records):
        return sum(n or 0 for n in records)
    process = _dict(sink.get("process"))
    found = _first(process, "rows_flushed", "rows_written")
    if found is not None:
        return found
    per_stream = [
        _first(counters, "rows_flushed", "rows_written") for counters in _streams_of(sink).values()
    ]
    known = [n for n in per_stream if n is not None]
    return sum(known) if known else None


def _min(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _pipelines(
    view: StatusView,
    doc: Mapping[str, Any],
    prev: Mapping[str, Any] | None,
    window: float,
    age: float,
    th: Thresholds,
    sink_streams: list[_SinkStreams],
    history: StatusHistory | None,
) -> None:
    prev_pipes = _dict(prev.get("pipelines")) if prev else {}
    children = view.children
    for name, pipe in sorted(_dict(doc.get("pipelines")).items()):
        if not isinstance(pipe, dict):
            continue
        totals = _dict(pipe.get("totals"))
        process = _dict(pipe.get("process"))
        prev_pipe = _dict(prev_pipes.get(name))
        workers = [c for c in children if c.kind == "worker" and c.name.startswith(name + ".")]
        messages = _first(totals, "records_emitted") or 0
        row = PipelineRow(
            name=name,
            exchange=str(pipe.get("exchange", "")),
            market=str(pipe.get("market", "")),
            symbols=len(pipe.get("symbols") or []),
            messages=messages,
            rate=_rate(
                messages, _first(_dict(prev_pipe.get("totals")), "records_emitted"), window, age
            ),
            ws_messages=_first(totals, "ws_messages", "messages_received"),
            reconnects=_first(process, "ws_reconnects", "reconnects") or 0,
            rest_weight_used=_first(process, "rest_weight_used"),
            queue_depth=sum(c.queue_depth for c in workers),
            restarts=sum(c.restarts for c in workers),
            workers=len(workers),
            workers_running=sum(c.state == "running" for c in workers),
        )
        row.pending_records = sum(
            _int(_dict(_dict(_dict(doc.get("children")).get(c.name)).get("info")).get(
                "pending_records"
            ))
            for c in workers
        )  # fmt: skip
        if row.workers_running < row.workers:
            row.flags.append(DOWN)
        elif any(RESTARTED in c.flags for c in workers):
            row.flags.append(RESTARTED)
        view.pipelines.append(row)
        prev_streams = _streams_of(prev_pipe)
        market = f"{row.exchange}/{row.market}"
        cadences: dict[str, float] = {}
        for c in workers:
            info = _dict(_dict(_dict(doc.get("children")).get(c.name)).get("info"))
            for stream, seconds in _dict(info.get("cadence")).items():
                cadences[stream] = max(cadences.get(stream, 0.0), _float(seconds))
        for (symbol, stream), counters in sorted(_streams_of(pipe).items()):
            if symbol == "*" or stream == "*":
                continue  # counters of a symbol not tied to one stream (REST fetches...)
            sinks = [
                (found, keyed, sink.flush_interval)
                for sink in sink_streams
                for found, keyed in (sink.of(market, symbol, stream),)
                if found is not None
            ]
            view.streams.append(
                _stream_row(
                    name, symbol, stream, counters, prev_streams.get((symbol, stream)),
                    window, age, view, th, sinks, history,
                    cadence_of(stream, cadences),
                )
            )  # fmt: skip


_MONTH_MS = 31 * 86_400_000  # the longest calendar month, for the 1M bar's cadence


def cadence_of(stream: str, published: Mapping[str, float] | None = None) -> float:
    """Seconds between outputs of ``stream`` when it writes on a clock, else 0: the bar
    length of ``kline_<interval>`` (a month counts 31 days), or what the worker published
    for the stream (``info.cadence``, from an ``interval`` option)."""
    if stream.startswith(KLINE_STREAM_PREFIX):
        interval = stream.removeprefix(KLINE_STREAM_PREFIX)
        if interval in KLINE_INTERVALS:
            return (interval_ms(interval) or _MONTH_MS) / 1000
    return (published or {}).get(stream, 0.0)


def _stream_row(
    pipeline: str,
    symbol: str,
    stream: str,
    counters: Mapping[str, Any],
    prev: Mapping[str, Any] | None,
    window: float,
    age: float,
    view: StatusView,
    th: Thresholds,
    sinks: list[tuple[dict[str, Any], bool, float]],
    history: StatusHistory | None,
    cadence: float = 0.0,
) -> StreamRow:
    messages = _first(counters, "records_emitted") or 0
    prev_messages = _first(prev, "records_emitted") if prev is not None else None
    filled = _first(counters, "gaps_filled") or 0
    found = _first(counters, "gaps_found")
    if found is None:
        found = filled + (_first(counters, "gaps_unfillable") or 0)
    last_event = _first(counters, "last_event_time")
    row = StreamRow(
        pipeline=pipeline,
        symbol=symbol,
        stream=stream,
        messages=messages,
        rate=_rate(messages, prev_messages, window, age),
        last_event_time=last_event or None,
        lag=max(0.0, (view.updated_at - last_event) / 1000.0) if last_event else None,
        written=_min(_first(c, "records_written") for c, _, _ in sinks),
        flushed=_min(
            (_first(c, "records_flushed") or 0)
            if keyed
            else _first(c, "rows_flushed", "rows_written")
            for c, keyed, _ in sinks
        ),
        reconnects=_first(counters, "reconnects", "ws_reconnects") or 0,
        gaps_found=found,
        gaps_filled=filled,
        resyncs=_first(counters, "resyncs") or 0,
        verifications=_first(counters, "verifications") or 0,
        backfilled=sum(_int(v) for k, v in counters.items() if k.endswith("_backfilled")),
        cadence=float(cadence),
        held=_first(counters, "trades_held"),
    )
    held_for = _first(counters, "held_for_ms")
    row.held_for = held_for / 1000.0 if held_for is not None else None
    # Behind: the slowest sink's newest written record, against that sink's allowance.
    behind_flag = False
    for c, _, flush_interval in sinks:
        written_at = _first(c, "written_event_time")
        if not written_at or not view.updated_at:
            continue
        behind = max(0.0, (view.updated_at - written_at) / 1000.0)
        if row.behind is None or behind > row.behind:
            row.behind, row.written_event_time = behind, written_at
        if behind >= th.behind_after + flush_interval + cadence:
            behind_flag = True
    # How long without progress: from history, else from the event lag.
    idle = None
    stalled_book = None
    if history is not None:
        idle, stalled_book = history.observe(row, counters, view.published)
    if idle is None and row.lag is not None and window > 0 and row.rate == 0:
        idle = row.lag
    row.idle = idle
    silent_after = th.silent_after + cadence
    if (idle is not None and idle >= silent_after) or (
        messages == 0 and view.uptime >= silent_after
    ):
        row.flags.append(SILENT)
    elif row.lag is not None and row.lag >= th.lag_after + cadence:
        row.flags.append(LAGGING)
    if behind_flag:
        row.flags.append(BEHIND)
    if stream == "orderbook" and _book_stuck(counters, view, th, stalled_book):
        row.flags.append(RESYNC)
    return row


def _book_stuck(
    counters: Mapping[str, Any], view: StatusView, th: Thresholds, stalled: float | None
) -> bool:
    """An order book that has not produced output for ``resync_after`` while its updates
    pile up in the buffer: a snapshot never bridged, or every attempt failed."""
    if _first(counters, "book_syncing") and stalled is None:
        # A gauge from the stream itself: trust it once the book had time to sync.
        return view.uptime >= th.resync_after
    if stalled is not None:
        return stalled >= th.resync_after
    never_live = not _first(counters, "books_emitted") and (
        _first(counters, "updates_buffered") or 0
    )
    return bool(never_live) and view.uptime >= th.resync_after


class _Seen(msgspec.Struct):
    messages: int
    progress_at: float
    out: int
    out_at: float
    buffered: int
    stalled: bool = False


class StatusHistory:
    """Remembers, across repeated reads, when each stream last made progress.

    :meth:`observe` returns ``(idle, stalled)``: seconds since the stream's message count
    last grew, and seconds since an order book's output last grew while its buffer kept
    growing (``None``: not stalled, or not known yet at the first observation).
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], _Seen] = {}

    def observe(
        self, row: StreamRow, counters: Mapping[str, Any], at: float
    ) -> tuple[float | None, float | None]:
        """Record ``row`` as of ``at`` (epoch seconds) and return its idle/stalled times."""
        key = (row.pipeline, row.symbol, row.stream)
        out = _first(counters, "books_emitted", "records_emitted") or 0
        buffered = _first(counters, "updates_buffered") or 0
        seen = self._seen.get(key)
        if seen is None:
            self._seen[key] = _Seen(row.messages, at, out, at, buffered)
            return None, None
        if row.messages != seen.messages:
            seen.messages, seen.progress_at = row.messages, at
        if out != seen.out:
            seen.out, seen.out_at, seen.stalled = out, at, False
        elif buffered > seen.buffered:
            seen.stalled = True  # no output while updates pile up
        seen.buffered = buffered
        return at - seen.progress_at, (at - seen.out_at) if seen.stalled else None


def _judge(view: StatusView, th: Thresholds, check_pid: bool) -> None:
    problems = view.problems
    down = False
    if view.state == "stopped":
        down = True
        code = "" if view.exit_code is None else f" with exit code {view.exit_code}"
        problems.append(f"the collector stopped{code}")
    elif check_pid and view.pid and not pid_alive(view.pid):
        down = True
        view.state = "gone"
        problems.append(f"supervisor pid {view.pid} is not running (it died without a status)")
    elif view.age > th.stale_after:
        down = True
        problems.append(f"status not updated for {view.age:.0f}s (stale after {th.stale_after:g}s)")
    for child in view.children:
        if DOWN in child.flags and view.state == "running":
            code = "" if child.last_exit_code is None else f" (exit code {child.last_exit_code})"
            problems.append(f"{child.name} is down{code}, restarts {child.restarts}")
        elif RESTARTED in child.flags:
            problems.append(f"{child.name} restarted {child.restarts}x, up {child.uptime:.0f}s")
        if BACKLOG in child.flags:
            problems.append(f"{child.name} has a backlog of pending records")
        if UNRESPONSIVE in child.flags:
            problems.append(
                f"{child.name} has not reported for {child.report_age or 0:.0f}s (stopped or stuck)"
            )
    for row in view.streams:
        for flag in row.flags:
            what = f"{row.pipeline} {row.symbol} {row.stream} is {flag}"
            if flag == BEHIND:
                what += f": its newest written record is {_s(row.behind)} old"
            problems.append(what)
    for sink in view.sinks:
        if sink.write_errors:
            waiting = (
                f", {sink.rows_buffered} row(s) wait for a retry" if sink.rows_buffered else ""
            )
            problems.append(f"sink {sink.name} has {sink.write_errors} write error(s){waiting}")
        if sink.rows_dropped:
            problems.append(f"sink {sink.name} dropped {sink.rows_dropped} row(s)")
        if STALLED in sink.flags:
            problems.append(
                f"sink {sink.name} has not flushed for {sink.since_flush or 0:.0f}s with "
                f"{sink.pending} row(s)/batch(es) pending "
                f"(flush interval {sink.flush_interval or 1.0:g}s)"
            )
    if not view.pipelines and not down:
        problems.append("no pipeline in the status")
    if down:
        view.health = "down"
    elif problems or view.state != "running":
        view.health = "degraded"
    else:
        view.health = "healthy"


# -- two reads -------------------------------------------------------------------------------
def sample(
    path: str | os.PathLike[str],
    *,
    window: float = 1.5,
    thresholds: Thresholds | None = None,
    check_pid: bool = True,
) -> StatusView:
    """Read the status, wait for the next publication (at most ``window`` seconds) and
    build the view with rates over the two. Without a new publication in time (a stopped
    or stuck collector) the rates are averages since start."""
    first = read_document(path)
    deadline = time.monotonic() + window
    second = first
    while time.monotonic() < deadline and first.get("state") == "running":
        time.sleep(0.05)
        try:
            doc = read_document(path)
        except StatusError:
            continue
        if doc.get("updated_at") != first.get("updated_at"):
            second = doc
            break
    prev = first if second is not first else None
    return build_view(second, prev=prev, thresholds=thresholds, check_pid=check_pid)


# -- rendering -------------------------------------------------------------------------------
def _n(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000_000:
        return f"{value / 1e6:.1f}M"
    if value >= 100_000:
        return f"{value / 1e3:.0f}k"
    return str(value)


def _r(rate: float) -> str:
    if rate >= 1000:
        return f"{rate / 1000:.1f}k"
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _held(row: StreamRow) -> str:
    if row.held is None:
        return "-"
    return f"{_n(row.held)}/{_s(row.held_for)}" if row.held_for is not None else _n(row.held)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = [
            c.ljust(w) if i < 3 or (not c[:1].isdigit() and c != "-") else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_table(view: StatusView) -> str:
    """A human-readable multi-section table of ``view`` (what ``streamer status`` prints)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.published))
    rates = f"rates over {view.window:.1f}s" if view.window else "rates averaged since start"
    lines = [
        f"collector pid {view.pid}  state {view.state}  health {view.health.upper()}  "
        f"up {_s(view.uptime)}  updated {when} ({view.age:.1f}s ago)  {rates}",
        "",
    ]
    lines += _table(
        ["pipeline", "exchange", "market", "symbols", "msgs", "msg/s", "ws msgs", "reconn",
         "rest wt", "queue", "pending", "workers", "restarts", "flags"],
        [
            [p.name, p.exchange, p.market, str(p.symbols), _n(p.messages), _r(p.rate),
             _n(p.ws_messages), str(p.reconnects), _n(p.rest_weight_used), str(p.queue_depth),
             str(p.pending_records), f"{p.workers_running}/{p.workers}", str(p.restarts),
             ",".join(p.flags)]
            for p in view.pipelines
        ],
    )  # fmt: skip
    lines.append("")
    lines += _table(
        ["sink", "type", "written", "rows/s", "flushed", "queue", "pending", "last flush",
         "dups", "errors", "dropped", "flags"],
        [
            [s.name, s.type, _n(s.written), _r(s.rate), _n(s.flushed), str(s.queue_depth),
             _n(s.pending), _s(s.since_flush), _n(s.duplicates_dropped), str(s.write_errors),
             _n(s.rows_dropped), ",".join(s.flags)]
            for s in view.sinks
        ],
    )  # fmt: skip
    lines.append("")
    lines += _table(
        ["pipeline", "symbol", "stream", "msgs", "msg/s", "last event", "lag", "written",
         "flushed", "behind", "held", "reconn", "gaps", "filled", "backfill", "resyncs",
         "verified", "flags"],
        [
            [r.pipeline, r.symbol, r.stream, _n(r.messages), _r(r.rate),
             time.strftime("%H:%M:%S", time.gmtime(r.last_event_time / 1000))
             if r.last_event_time else "-",
             _s(r.lag), _n(r.written), _n(r.flushed), _s(r.behind), _held(r),
             str(r.reconnects), str(r.gaps_found),
             str(r.gaps_filled), _n(r.backfilled), str(r.resyncs), str(r.verifications),
             ",".join(r.flags)]
            for r in view.streams
        ],
    )  # fmt: skip
    lines.append("")
    lines += _table(
        ["process", "kind", "pid", "state", "uptime", "restarts", "last exit", "queue", "held",
         "pauses", "flags"],
        [
            [c.name, c.kind, str(c.pid or "-"), c.state, _s(c.uptime), str(c.restarts),
             "-" if c.last_exit_code is None else str(c.last_exit_code), str(c.queue_depth),
             _held_bytes(c), f"{c.read_pauses}{' (paused)' if c.reading_paused else ''}",
             ",".join(c.flags)]
            for c in view.children
        ],
    )  # fmt: skip
    if view.problems:
        lines.append("")
        lines.append("problems:")
        lines += [f"  - {p}" for p in view.problems]
    return "\n".join(lines)


def render_json(view: StatusView) -> str:
    """``view`` as indented JSON (the ``--json`` output; field names are stable)."""
    return msgspec.json.format(msgspec.json.encode(view), indent=2).decode()


def render_summary(view: StatusView) -> str:
    """One compact line for a terminal running ``streamer run``: progress and rates."""
    msgs = sum(p.messages for p in view.pipelines)
    rate = sum(p.rate for p in view.pipelines)
    written = sum(s.written for s in view.sinks)
    wrate = sum(s.rate for s in view.sinks)
    running = sum(c.state == "running" for c in view.children)
    restarts = sum(c.restarts for c in view.children)
    gaps = sum(r.gaps_found for r in view.streams)
    filled = sum(r.gaps_filled for r in view.streams)
    backfilled = sum(r.backfilled for r in view.streams)
    flagged = sum(bool(r.flags) for r in view.streams)
    parts = [
        f"up {_s(view.uptime)}",
        f"msgs {_n(msgs)} ({_r(rate)}/s)",
        f"written {_n(written)} ({_r(wrate)}/s)",
        f"procs {running}/{len(view.children)}",
    ]
    if restarts:
        parts.append(f"restarts {restarts}")
    if gaps:
        parts.append(f"gaps {filled}/{gaps} filled")
    if backfilled:
        parts.append(f"backfilled {_n(backfilled)}")
    if flagged:
        parts.append(f"flagged {flagged}")
    # A run that is ending is not "down": say what it is doing.
    label = view.state if view.state in ("stopping", "stopped") else view.health
    if view.state == "stopped" and view.exit_code is not None:
        label += f", exit code {view.exit_code}"
    return f"[{label}] " + "  ".join(parts)


class LiveSummary:
    """Shows :func:`render_summary` of each published document on a terminal.

    The supervisor calls it with every status document it publishes (``live(doc)``); it
    prints at most once per ``every`` seconds, rewriting one line when ``stream`` is a
    terminal and appending lines otherwise. Never raises: the summary must not hurt a run.
    """

    def __init__(self, stream: TextIO | None = None, every: float = 1.0) -> None:
        self._stream = stream or sys.stderr
        self._every = every
        self._prev: Mapping[str, Any] | None = None
        self._last: float | None = None
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

    def __call__(self, doc: Mapping[str, Any]) -> None:
        now = time.monotonic()
        last = self._last
        if last is not None and now - last < self._every and doc.get("state") == "running":
            return
        try:
            # The document was just published: judge it as of its own time.
            at = doc.get("updated_at")
            at = at / 1000.0 if isinstance(at, int) else None
            view = build_view(doc, prev=self._prev, check_pid=False, now=at)
            line = render_summary(view)
            if self._tty:
                self._stream.write("\r\x1b[2K" + line)
                if doc.get("state") == "stopped":
                    self._stream.write("\n")
            else:
                self._stream.write(line + "\n")
            self._stream.flush()
        except Exception:  # never let the summary break the run
            return
        self._prev = doc
        self._last = now


def _held_bytes(child: ChildRow) -> str:
    """``3.2MB/32MB``: what a child holds for the sinks against its budget."""
    if not child.buffer_bytes:
        return "-"
    return f"{format_size(child.held_bytes)}/{format_size(child.buffer_bytes)}"
