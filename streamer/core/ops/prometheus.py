"""An optional Prometheus endpoint: ``GET /metrics`` in the text exposition format.

Off by default. Two ways to run it:

* inside the supervisor, from its latest status document (no file round trip)::

      tg.start_soon(serve_metrics, supervisor.status, port)

* beside any collector, from its status file: ``streamer metrics --port 9108``
  (:func:`file_source`).

It binds 127.0.0.1 unless told otherwise (the data is not secret, but an open port on a
server is a decision for the operator, e.g. behind a reverse proxy). Each scrape renders
the current document; nothing is cached between scrapes. Metric names and labels are
listed in ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus

from .health import EXIT_CODES
from .status_view import StatusError, StatusView, Thresholds, build_view, read_document

StatusSource = Callable[[], Mapping[str, Any] | None]

#: Streams that are order books (resync/verification series instead of gap series).
_BOOK_STREAMS = frozenset({"orderbook"})

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 16384


def file_source(path: str | os.PathLike[str]) -> StatusSource:
    """A source reading ``path`` at each scrape (``None`` when there is no usable status)."""

    def read() -> Mapping[str, Any] | None:
        try:
            return read_document(path)
        except StatusError:
            return None

    return read


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Out:
    """Samples grouped per metric family, as the format requires."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def metric(
        self, name: str, kind: str, help_: str, value: float | int | None, /, **labels: str
    ) -> None:
        if value is None:
            return
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = (kind, help_, [])
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        shown = f"{name}{{{label_text}}}" if label_text else name
        # repr keeps every digit of a float (epoch seconds must not become 1.764e+09).
        family[2].append(f"{shown} {value!r}" if isinstance(value, float) else f"{shown} {value}")

    def sample(self, name: str, kind: str, help_: str, value: float | int, labels: str) -> None:
        """Like :meth:`metric` with the label text already escaped and joined."""
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = (kind, help_, [])
        family[2].append(f"{name}{{{labels}}} {value!r}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self._families.items():
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def render_metrics(doc: Mapping[str, Any] | None, thresholds: Thresholds | None = None) -> str:
    """The exposition text for one status document (``None``: only ``streamer_up 0``)."""
    out = _Out()
    if doc is None:
        out.metric("streamer_up", "gauge", "1 when a collector publishes status.", 0)
        return out.text()
    view = build_view(doc, thresholds=thresholds, check_pid=False)
    _render(out, view, doc)
    return out.text()


def _render(out: _Out, view: StatusView, doc: Mapping[str, Any]) -> None:
    m = out.metric
    m("streamer_up", "gauge", "1 when a collector publishes status.", int(view.state == "running"))
    m(
        "streamer_health",
        "gauge",
        "0 healthy, 1 degraded, 2 down (as streamer health).",
        EXIT_CODES[view.health],
    )
    m(
        "streamer_uptime_seconds",
        "gauge",
        "Seconds since the supervisor started.",
        round(view.uptime, 3),
    )
    m(
        "streamer_status_updated_seconds",
        "gauge",
        "When the status was published (epoch s).",
        round(view.published, 3),
    )
    for p in view.pipelines:
        lab = {"pipeline": p.name}
        m(
            "streamer_pipeline_messages_total",
            "counter",
            "Records produced by the pipeline.",
            p.messages,
            **lab,
        )
        m(
            "streamer_pipeline_ws_messages_total",
            "counter",
            "WebSocket messages received.",
            p.ws_messages,
            **lab,
        )
        m(
            "streamer_pipeline_reconnects_total",
            "counter",
            "WebSocket reconnects.",
            p.reconnects,
            **lab,
        )
        m(
            "streamer_rest_weight_used",
            "gauge",
            "REST weight used in the current window.",
            p.rest_weight_used,
            **lab,
        )
        m(
            "streamer_pipeline_pending_records",
            "gauge",
            "Records waiting in the workers.",
            p.pending_records,
            **lab,
        )
    # Per stream: a few series each (2000 symbols x 4 streams is already 40k series).
    for r in view.streams:
        lab = (
            f'pipeline="{_escape(r.pipeline)}",symbol="{_escape(r.symbol)}",'
            f'stream="{_escape(r.stream)}"'
        )
        sample = out.sample
        sample(
            "streamer_messages_total", "counter", "Records produced per stream.", r.messages, lab
        )
        if r.flushed is not None:
            sample(
                "streamer_rows_flushed_total",
                "counter",
                "Records durably in files (the lowest over the sinks).",
                r.flushed,
                lab,
            )
        if r.stream in _BOOK_STREAMS:
            sample("streamer_book_resyncs_total", "counter", "Order book resyncs.", r.resyncs, lab)
            sample(
                "streamer_book_verifications_total",
                "counter",
                "Order book verifications.",
                r.verifications,
                lab,
            )
        else:
            sample(
                "streamer_gaps_found_total",
                "counter",
                "Gaps detected (trades, klines).",
                r.gaps_found,
                lab,
            )
            sample(
                "streamer_gaps_filled_total",
                "counter",
                "Gaps filled from REST.",
                r.gaps_filled,
                lab,
            )
        if r.last_event_time:
            sample(
                "streamer_last_event_time_seconds",
                "gauge",
                "Exchange time of the last event.",
                r.last_event_time / 1000.0,
                lab,
            )
        if r.lag is not None:
            sample(
                "streamer_lag_seconds",
                "gauge",
                "Status time minus the last event time.",
                r.lag,
                lab,
            )
        if r.behind is not None:
            sample(
                "streamer_behind_seconds",
                "gauge",
                "Status time minus the exchange time of the newest record in the files.",
                r.behind,
                lab,
            )
        if r.held is not None:
            sample(
                "streamer_trades_held",
                "gauge",
                "Trades held back by the stream while a gap is filled.",
                r.held,
                lab,
            )
        if r.held_for is not None:
            sample(
                "streamer_held_seconds",
                "gauge",
                "How long the oldest held trade has waited.",
                r.held_for,
                lab,
            )
        for flag in r.flags:
            sample(
                "streamer_stream_flagged",
                "gauge",
                "1 per flag raised on a stream.",
                1,
                f'{lab},flag="{flag}"',
            )
    for s in view.sinks:
        lab = {"sink": s.name}
        m(
            "streamer_sink_records_written_total",
            "counter",
            "Records handed to the sink.",
            s.written,
            **lab,
        )
        m("streamer_sink_rows_flushed_total", "counter", "Rows written to files.", s.flushed, **lab)
        m(
            "streamer_sink_write_errors_total",
            "counter",
            "Failed writes (retried).",
            s.write_errors,
            **lab,
        )
        m(
            "streamer_sink_rows_dropped_total",
            "counter",
            "Rows dropped by the sink.",
            s.rows_dropped,
            **lab,
        )
        m(
            "streamer_sink_rows_buffered",
            "gauge",
            "Rows waiting for a retry after failed writes.",
            s.rows_buffered,
            **lab,
        )
        m(
            "streamer_sink_pending",
            "gauge",
            "Rows and batches waiting for the sink.",
            s.pending,
            **lab,
        )
        m(
            "streamer_sink_since_flush_seconds",
            "gauge",
            "Seconds since the writer last flushed.",
            s.since_flush,
            **lab,
        )
        for flag in s.flags:
            m("streamer_sink_flagged", "gauge", "1 per flag raised on a sink.", 1, **lab, flag=flag)
    # Per stream errors of each sink (sinks count them by bare symbol).
    for name, body in sorted(_dict(doc.get("sinks")).items()):
        for symbol, per_symbol in sorted(_dict(_dict(body).get("streams")).items()):
            for stream, counters in sorted(_dict(per_symbol).items()):
                errors = _dict(counters).get("write_errors")
                if isinstance(errors, int) and errors:
                    m(
                        "streamer_sink_stream_write_errors_total",
                        "counter",
                        "Failed writes per sink and stream.",
                        errors,
                        sink=name,
                        symbol=symbol,
                        stream=stream,
                    )
    for c in view.children:
        lab = {"child": c.name, "kind": c.kind}
        m(
            "streamer_child_up",
            "gauge",
            "1 while the child process runs.",
            int(c.state == "running"),
            **lab,
        )
        m(
            "streamer_child_restarts_total",
            "counter",
            "Restarts of the child process.",
            c.restarts,
            **lab,
        )
        m(
            "streamer_child_queue_depth",
            "gauge",
            "Batches queued in the child.",
            c.queue_depth,
            **lab,
        )
        for flag in c.flags:
            m(
                "streamer_child_flagged",
                "gauge",
                "1 per flag raised on a child.",
                1,
                **lab,
                flag=flag,
            )
    # Every raw counter too, so nothing published is out of reach of a dashboard.
    for section, label in (("pipelines", "pipeline"), ("sinks", "sink")):
        for name, body in sorted(_dict(doc.get(section)).items()):
            for counter, value in sorted(_dict(_dict(body).get("totals")).items()):
                if isinstance(value, int):
                    m(
                        f"streamer_{label}_counter",
                        "gauge",
                        f"Raw {label} counters by name.",
                        value,
                        **{label: name, "name": counter},
                    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def _handle(stream: SocketStream, source: StatusSource, thresholds: Thresholds | None):
    async with stream:
        request = b""
        with anyio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                try:
                    request += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, target = (line[0], line[1]) if len(line) >= 2 else ("", "")
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", "only GET\n"
        elif path == "/metrics":
            try:
                # The source is called in the loop (it may read the supervisor's state);
                # rendering thousands of series goes to a thread to keep the loop free.
                doc = source()
                text = await anyio.to_thread.run_sync(render_metrics, doc, thresholds)
                status, body = "200 OK", text
            except Exception as exc:  # a broken document must not kill the endpoint
                status, body = "500 Internal Server Error", f"cannot render: {exc}\n"
        elif path == "/":
            status, body = "200 OK", "market-streamer metrics: see /metrics\n"
        else:
            status, body = "404 Not Found", "not found; try /metrics\n"
        data = body.encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with (
            anyio.move_on_after(5),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await stream.send(head if method == "HEAD" else head + data)


async def serve_metrics(
    source: StatusSource,
    port: int,
    host: str = "127.0.0.1",
    *,
    thresholds: Thresholds | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on ``host:port`` until cancelled (``port=0``: any free port).

    ``source`` returns the latest status document (or ``None``). With
    ``await tg.start(serve_metrics, ...)`` the bound port is returned once listening.
    Raises ``OSError`` when the port cannot be bound.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    task_status.started(bound)

    async def handler(stream: SocketStream) -> None:
        await _handle(stream, source, thresholds)

    async with listener:
        await listener.serve(handler)


async def metrics_endpoint(
    source: StatusSource, port: int, logger: logging.Logger, host: str = "127.0.0.1"
) -> None:
    """:func:`serve_metrics` for the supervisor: a port that cannot be bound is logged once
    (``[metrics]``) and the run continues without the endpoint; ``port <= 0`` does nothing.

    Wiring, in ``Supervisor.run``'s task group::

        tg.start_soon(metrics_endpoint, self.status, self.runtime.metrics_port, log)
    """
    if port <= 0:
        return
    try:
        await serve_metrics(source, port, host)
    except OSError as exc:
        logger.error(
            "[metrics] cannot listen on %s:%d (%s); running without the metrics endpoint",
            host, port, exc.strerror or exc,
        )  # fmt: skip
