"""What ``streamer run`` shows and serves beside the runtime, from its status file.

:func:`run_sidecars` wraps a run with, in background threads of the ``streamer run``
process:

* the live terminal summary (:class:`~streamer.core.ops.status.LiveSummary`): one line of
  progress and rates, refreshed in place, when stderr is a terminal and not ``--quiet``;
* the Prometheus endpoint (:mod:`streamer.core.ops.metrics`) on 127.0.0.1 when
  ``runtime.metrics_port`` is set.

Both read ``<state_dir>/status.json``, which the supervisor replaces every
``status_interval``, so nothing in the runtime changes and neither can slow it down::

    with run_sidecars(config.runtime, quiet=quiet):
        code = runtime.run(config, ...)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import anyio
import anyio.from_thread

from ..config import RuntimeConfig
from .metrics import file_source, serve_metrics
from .status import LiveSummary, StatusError, read_document

log = logging.getLogger("streamer.ops")

STATUS_FILE = "status.json"


class _SummaryThread(threading.Thread):
    """Polls the status file and shows each new document through a :class:`LiveSummary`."""

    def __init__(self, path: Path, stream: TextIO, every: float) -> None:
        super().__init__(name="streamer-live-summary", daemon=True)
        self._path = path
        self._live = LiveSummary(stream, every=every)
        self._poll = min(0.25, every)
        self._halt = threading.Event()
        self._seen: object = None

    def _show_new(self) -> None:
        try:
            doc = read_document(self._path)
        except StatusError:
            return  # not published yet
        stamp = (doc.get("pid"), doc.get("updated_at"))
        if stamp != self._seen:
            self._seen = stamp
            self._live(doc)

    def run(self) -> None:
        while not self._halt.wait(self._poll):
            self._show_new()

    def finish(self) -> None:
        """Stop polling and show the final document (the run has returned)."""
        self._halt.set()
        self.join(5)
        self._show_new()


@contextlib.contextmanager
def run_sidecars(
    runtime: RuntimeConfig,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
    summary_every: float = 1.0,
    force_summary: bool = False,
) -> Iterator[int | None]:
    """Run the live summary and the metrics endpoint while the block runs.

    Yields the bound metrics port (``None`` when off or not bindable; a bind failure is
    logged once as ``[metrics]`` and the run goes on). The summary is shown when
    ``stream`` (default stderr) is a terminal and not ``quiet``, or with ``force_summary``.
    """
    stream = stream or sys.stderr
    status_path = Path(runtime.state_dir) / STATUS_FILE
    summary = None
    if force_summary or (not quiet and getattr(stream, "isatty", lambda: False)()):
        summary = _SummaryThread(status_path, stream, summary_every)
        summary.start()
    with contextlib.ExitStack() as stack:
        port = None
        if runtime.metrics_port > 0:
            portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
            try:
                future, port = portal.start_task(
                    serve_metrics, file_source(status_path), runtime.metrics_port
                )
                stack.callback(future.cancel)
                log.info("[metrics] serving http://127.0.0.1:%d/metrics", port)
            except OSError as exc:
                log.error(
                    "[metrics] cannot listen on 127.0.0.1:%d (%s); running without it",
                    runtime.metrics_port, exc.strerror or exc,
                )  # fmt: skip
        try:
            yield port
        finally:
            if summary is not None:
                summary.finish()
