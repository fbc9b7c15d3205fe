"""Latency from the exchange's event time to the row being written, by tailing CSV files.

A :class:`CsvTailer` thread polls a few output files every ``interval`` seconds, reads the
rows appended since the last poll and records, per row:

* ``written``: the wall clock when the poll saw the row minus the row's ``event_time``
  (an upper bound of send-to-disk latency; it over-states by at most one poll period);
* ``received``: the row's ``receive_time`` minus its ``event_time`` (send-to-receipt lag).

The benchmark feed stamps ``E`` with the time it generated the event, so both include the
time spent in the feed's socket buffers. Only rows that appear after :meth:`start` count.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
from dataclasses import dataclass


@dataclass
class Sample:
    """One row's latencies (milliseconds) and when it was seen (monotonic seconds)."""

    seen: float
    written: int
    received: int


class CsvTailer:
    """Tails files matching ``pattern`` (a glob), reading two integer columns per row."""

    def __init__(
        self,
        pattern: str,
        event_col: int,
        receive_col: int,
        interval: float = 0.005,
        max_files: int = 20,
    ) -> None:
        self.pattern = pattern
        self.event_col = event_col
        self.receive_col = receive_col
        self.interval = interval
        self.max_files = max_files
        self.samples: list[Sample] = []
        self._files: dict[str, tuple[int, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="csv-tailer", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> CsvTailer:
        """Start polling; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(timeout=5)

    def window(self, t0: float, t1: float) -> list[Sample]:
        """Samples seen between monotonic times ``t0`` and ``t1``."""
        with self._lock:
            return [s for s in self.samples if t0 <= s.seen < t1]

    def _discover(self) -> None:
        for path in sorted(glob.glob(self.pattern))[: self.max_files]:
            if path not in self._files:
                self._files[path] = (0, b"")

    def _loop(self) -> None:
        next_glob = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now >= next_glob:
                self._discover()
                next_glob = now + 0.5
            self._poll()

    def _poll(self) -> None:
        wall = time.time_ns() // 1_000_000
        seen = time.monotonic()
        fresh: list[Sample] = []
        for path, (offset, rest) in list(self._files.items()):
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            offset += len(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1
            # Keep a torn last line for the next poll.
            self._files[path] = (offset, data[cut:])
            for line in data[:cut].splitlines():
                cells = line.split(b",")
                try:
                    event = int(cells[self.event_col])
                    received = int(cells[self.receive_col])
                except (IndexError, ValueError):
                    continue  # the header, or a foreign row
                fresh.append(Sample(seen, wall - event, received - event))
        if fresh:
            with self._lock:
                self.samples.extend(fresh)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[k])


def dir_bytes(root: str) -> int:
    """Total size of the regular files under ``root``."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
    return total
