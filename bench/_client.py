"""Pieces shared by the reference clients (``bare_receive.py``, ``baseline_collector.py``).

Both open the same connections as the collector would (combined streams, at most
``per_conn`` streams per connection, streams of one symbol together) and report progress
as one JSON line per ``interval`` on stdout::

    {"t": <monotonic>, "count": <messages so far>, "lag": [<ms>, ...]}

``lag`` holds receive-time minus event time ``E`` for every ``sample_every``-th message
since the previous line. The harness reads these lines to detect falling behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

#: Streams each symbol contributes, as the collector subscribes them.
STREAM_SUFFIXES = ("@aggTrade", "@depth@100ms", "@kline_1m")


def symbol_names(n: int) -> list[str]:
    """The benchmark feed's symbol names (kept in sync with ``_feed.symbol_names``)."""
    return [f"S{i:04d}USDT" for i in range(n)]


def stream_urls(base: str, n_symbols: int, per_conn: int = 200) -> list[str]:
    """Combined-stream URLs covering every stream of ``n_symbols`` symbols."""
    streams = [s.lower() + suffix for s in symbol_names(n_symbols) for suffix in STREAM_SUFFIXES]
    base = base.rstrip("/")
    return [
        f"{base}/stream?streams={'/'.join(streams[i : i + per_conn])}"
        for i in range(0, len(streams), per_conn)
    ]


def event_time(raw: bytes) -> int:
    """The ``E`` field of a raw Binance frame without parsing it (13-digit ms times)."""
    i = raw.find(b'"E":')
    return int(raw[i + 4 : i + 17]) if i >= 0 else 0


class Reporter:
    """Counts messages, samples ``E`` lag, and prints a JSON line every ``interval`` s."""

    def __init__(self, interval: float = 0.25, sample_every: int = 16) -> None:
        self.interval = interval
        self.sample_every = sample_every
        self.count = 0
        self.lags: list[int] = []
        self._next = time.monotonic() + interval

    def sample(self, raw: bytes) -> None:
        """Record the lag of ``raw`` (call for every ``sample_every``-th message)."""
        e = event_time(raw)
        if e:
            self.lags.append(time.time_ns() // 1_000_000 - e)

    def maybe_report(self) -> None:
        """Print a progress line when the interval has passed."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self.report(now)

    def report(self, now: float | None = None) -> None:
        """Print a progress line now."""
        line = {"t": now or time.monotonic(), "count": self.count, "lag": self.lags}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        self.lags = []


async def run_until_signalled(
    start: Callable[[list[Any]], list[Coroutine[Any, Any, None]]], on_stop: Callable[[], None]
) -> None:
    """Run the coroutines ``start(opened)`` returns until SIGINT/SIGTERM or one ends.

    ``opened`` collects the WebSocket connections the coroutines open; on stop ``on_stop``
    reports, then every connection is aborted (a benchmark client need not wait for a close
    handshake behind megabytes of frames) and every task is cancelled and awaited.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    opened: list[Any] = []
    tasks = [asyncio.create_task(coro) for coro in start(opened)]
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    on_stop()
    for ws in opened:
        ws.transport.abort()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
