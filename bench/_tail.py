"""Latency from the exchange's event time to the row being written, by tailing CSV files.

A :class:`CsvTailer` thread polls a few output files every ``interval`` seconds, reads the
rows appended since the last poll and records, per row:

* ``written``: the wall clock when the poll saw the row minus the row's ``event_time``
  (an upper bound of send-to-disk latency; it over-states by at most one poll period);
* ``received``: the row's ``receive_time`` minus its ``event_time`` (send-to-receipt lag);
* ``landed``: the file's modification time, read right after the row was read, minus the
  row's ``receive_time`` (receipt-to-file latency: the row was appended to the file, visible
  to readers, no later than that; a write landing between the read and the ``fstat`` can
  only over-state it).

The benchmark feed stamps ``E`` with the time it generated the event, so both include the
time spent in the feed's socket buffers. Only rows that appear after :meth:`start` count.

A :class:`RowCounter` thread counts the rows appended to *every* file matching a pattern (no
parsing, only newlines), so the harness can tell the rate at which rows reach the disk from
the rate at which messages are read.
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
    #: File modification time minus ``receive_time`` (ms).
    landed: int = 0
    #: The row's ``event_time`` (wall-clock ms).
    event: int = 0


class _Poller:
    """A daemon thread that looks for new files every 0.5 s and reads what the known ones
    gained every ``interval`` seconds (subclasses implement :meth:`_tick`)."""

    _name = "poller"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # path -> [open file, torn last line, ...]: files stay open (one read per poll)
        self._files: dict[str, list] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)

    def start(self):
        """Start polling; returns ``self``."""
        self._thread.start()
        return self

    def _join(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        next_glob = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            discover = now >= next_glob
            if discover:
                next_glob = now + 0.5
            self._tick(discover)

    def _tick(self, discover: bool) -> None:
        raise NotImplementedError


class CsvTailer(_Poller):
    """Tails files matching ``pattern`` (a glob), reading two integer columns per row."""

    def __init__(
        self,
        pattern: str,
        event_col: int,
        receive_col: int,
        interval: float = 0.01,
        max_files: int = 20,
    ) -> None:
        super().__init__(interval)
        self.pattern = pattern
        self.event_col = event_col
        self.receive_col = receive_col
        self.max_files = max_files
        self.samples: list[Sample] = []

    def stop(self) -> None:
        """Stop polling, after one last poll (rows written while the subject stopped)."""
        self._join()
        self._discover()
        self._poll()
        for fh, _ in self._files.values():
            fh.close()
        self._files.clear()

    def window(self, t0: float, t1: float) -> list[Sample]:
        """Samples seen between monotonic times ``t0`` and ``t1``."""
        with self._lock:
            return [s for s in self.samples if t0 <= s.seen < t1]

    def by_event(self, e0: int, e1: int) -> list[Sample]:
        """Samples of rows whose ``event_time`` is in ``[e0, e1)`` (wall-clock ms)."""
        with self._lock:
            return [s for s in self.samples if e0 <= s.event < e1]

    def _discover(self) -> None:
        for path in sorted(glob.glob(self.pattern))[: self.max_files]:
            if path not in self._files:
                try:
                    self._files[path] = [open(path, "rb"), b""]  # noqa: SIM115
                except OSError:
                    continue

    _name = "csv-tailer"

    def _tick(self, discover: bool) -> None:
        if discover:
            self._discover()
        self._poll()

    def _poll(self) -> None:
        wall = time.time_ns() // 1_000_000
        seen = time.monotonic()
        fresh: list[Sample] = []
        for entry in self._files.values():
            fh, rest = entry
            try:
                data = fh.read()
                if not data:
                    continue
                mtime = os.fstat(fh.fileno()).st_mtime_ns // 1_000_000
            except OSError:
                continue
            data = rest + data
            cut = data.rfind(b"\n") + 1
            # Keep a torn last line for the next poll.
            entry[1] = data[cut:]
            for line in data[:cut].splitlines():
                cells = line.split(b",")
                try:
                    event = int(cells[self.event_col])
                    received = int(cells[self.receive_col])
                except (IndexError, ValueError):
                    continue  # the header, or a foreign row
                fresh.append(Sample(seen, wall - event, received - event, mtime - received, event))
        if fresh:
            with self._lock:
                self.samples.extend(fresh)


class RowCounter(_Poller):
    """Counts rows appended to every file matching ``pattern``, in a polling thread.

    Each poll reads what was appended since the previous one and counts complete lines; a
    first line that does not start with a digit (a CSV header) is not a row. ``samples``
    holds ``(monotonic time, rows so far)`` per poll that found new rows, so the rate at
    which rows reach the files can be read over any window (:meth:`rate`).
    """

    def __init__(self, pattern: str, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.pattern = pattern
        self.rows = 0
        self.samples: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def stop(self) -> None:
        """Stop polling (after one last poll)."""
        self._join()
        self.poll()
        self.close()

    _name = "row-counter"

    def _tick(self, discover: bool) -> None:
        self.poll(discover=discover)

    def poll(self, discover: bool = True) -> int:
        """Read what was appended since the last poll; returns the rows counted now."""
        if discover:
            for path in glob.glob(self.pattern):
                if path not in self._files:
                    try:
                        self._files[path] = [open(path, "rb"), b"", True]  # noqa: SIM115
                    except OSError:
                        continue
        fresh = 0
        for entry in self._files.values():
            fh, rest, first = entry
            try:
                data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            data = rest + data
            # Count complete lines only; a torn last line waits for the next poll.
            cut = data.rfind(b"\n") + 1
            entry[1] = data[cut:]
            if not cut:
                continue
            lines = data.count(b"\n", 0, cut)
            if first and not data[:1].isdigit():
                lines -= 1  # the header
            entry[2] = False
            fresh += lines
        if fresh:
            with self._lock:
                self.rows += fresh
                self.samples.append((time.monotonic(), self.rows))
        return fresh

    def close(self) -> None:
        """Close the files (after :meth:`stop`)."""
        for fh, _, _ in self._files.values():
            fh.close()
        self._files.clear()

    def window(self, t0: float, t1: float) -> list[tuple[float, int]]:
        """The samples taken between monotonic times ``t0`` and ``t1``."""
        with self._lock:
            return [s for s in self.samples if t0 <= s[0] < t1]

    def rate(self, t0: float, t1: float) -> float:
        """Rows per second reaching the files over ``[t0, t1)`` (see :func:`landing_rate`)."""
        with self._lock:
            return landing_rate(self.samples, t0, t1)


#: Appends closer together than this belong to one flush (one writer pass over its files).
FLUSH_GAP = 0.15


def landing_rate(samples: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Rows per second from ``(time, cumulative rows)`` samples over ``[t0, t1)``.

    Rows arrive in steps: a writer appends once per flush, one file after the other, so
    the rows of one flush may show up over a few polls. Counting the rows that land inside
    a fixed window would be off by up to a whole flush; instead the appends are grouped
    into flushes (gaps of at least :data:`FLUSH_GAP` s between groups) and the rate is the
    rows of the second to the last flush over the time from the end of the first flush to
    the end of the last: each flush carries what arrived since the previous one. A writer
    appending continuously (no gaps) forms one group, measured from its first append to
    its last when it spans at least half the window. Otherwise (too few flushes) NaN.
    """
    last = 0
    for t, rows in samples:
        if t >= t0:
            break
        last = rows
    # groups: [first append time, last append time, cumulative rows after the group]
    groups: list[list[float]] = []
    for t, rows in samples:
        if not t0 <= t < t1 or rows == last:
            continue
        if groups and t - groups[-1][1] < FLUSH_GAP:
            groups[-1][1:] = [t, rows]
        else:
            groups.append([t, t, rows, last])
        last = rows
    if len(groups) >= 2:
        return (groups[-1][2] - groups[0][2]) / (groups[-1][1] - groups[0][1])
    if groups and groups[0][1] - groups[0][0] >= 0.5 * (t1 - t0):
        # Continuous appends: from the rows after the first append to the last.
        first = next(rows for t, rows in samples if t >= groups[0][0])
        return (groups[0][2] - first) / (groups[0][1] - groups[0][0])
    return float("nan")


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
