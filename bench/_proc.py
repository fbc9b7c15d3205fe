"""Process-tree CPU and memory sampling from ``/proc`` (Linux only, no psutil).

:class:`TreeSampler` follows a root process and every descendant it ever sees, in a
background thread. CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (per process, so a
child that has not been reaped yet still counts); memory is the resident set size summed
over the live processes at each sample, and its peak. Summed RSS counts shared pages once
per process (a pessimistic figure); the proportional set size (PSS, shared pages split
between the processes that map them) is sampled too when ``smaps_rollup`` is readable.

CPU spent by a child between its last sample and its exit is lost: at a 100 ms period
that is negligible for long-running workers.

Finding the tree means reading the ``stat`` of every process on the machine (4 ms of CPU
with a hundred processes): the sampler does that once every ``rescan_every`` samples and
in between reads only the processes it already knows, so the harness's own CPU stays small
beside the subject's. A child is therefore seen up to a second after it starts; the CPU it
spent until then is still counted (CPU is read as a running total per process).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read_stat(pid: int) -> tuple[int, int, int, int] | None:
    """``(ppid, cpu_ticks, rss_bytes, starttime)`` of ``pid``, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): shift every index by 3.
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12])
    starttime = int(fields[19])
    rss = int(fields[21]) * _PAGE
    return ppid, ticks, rss, starttime


def _read_pss(pid: int) -> int | None:
    """Proportional set size of ``pid`` in bytes (``None`` when unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _all_parents() -> dict[int, int]:
    """pid -> ppid for every visible process."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            pid = int(name)
            stat = _read_stat(pid)
            if stat is not None:
                parents[pid] = stat[0]
    return parents


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    parents = _all_parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parents or pid == root:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class TreeUsage:
    """What a :class:`TreeSampler` measured over a window."""

    cpu_seconds: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    processes: int = 0
    samples: int = 0
    #: ``(monotonic time, summed RSS)`` per sample, for memory-over-time plots.
    rss_series: list[tuple[float, int]] = field(default_factory=list)


class TreeSampler:
    """Samples a process tree every ``interval`` seconds in a daemon thread.

    Use :meth:`mark` to start a measurement window and :meth:`usage` to read it; several
    windows can be taken one after another from one sampler. ``extra_roots`` are further
    trees to include (for example processes started separately).
    """

    def __init__(
        self, root: int, interval: float = 0.1, pss_every: int = 10, rescan_every: int = 10
    ) -> None:
        self.roots = [root]
        self.interval = interval
        self._pss_every = pss_every
        self._rescan_every = rescan_every
        self._samples = 0
        self._known: list[int] = []
        self._lock = threading.Lock()
        # (pid, starttime) -> last cpu ticks: a recycled pid is a different process.
        self._ticks: dict[tuple[int, int], int] = {}
        self._mark: dict[tuple[int, int], int] = {}
        self._usage = TreeUsage()
        #: Peaks over the sampler's whole life (not reset by :meth:`mark`).
        self.lifetime_peak_rss = 0
        self.lifetime_peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def start(self) -> TreeSampler:
        """Start sampling; returns ``self``."""
        self._sample()
        self.mark()
        self._thread.start()
        return self

    def stop(self) -> TreeUsage:
        """Take a last sample, stop the thread, and return the current window's usage."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        return self.usage()

    def mark(self) -> None:
        """Start a new window: CPU counts from now, peaks are reset."""
        with self._lock:
            self._mark = dict(self._ticks)
            self._usage = TreeUsage()

    def usage(self) -> TreeUsage:
        """Usage since the last :meth:`mark` (a copy)."""
        with self._lock:
            cpu = sum(t - self._mark.get(k, 0) for k, t in self._ticks.items()) / _TICK
            u = self._usage
            return TreeUsage(
                cpu_seconds=cpu,
                peak_rss=u.peak_rss,
                peak_pss=u.peak_pss,
                processes=u.processes,
                samples=u.samples,
                rss_series=list(u.rss_series),
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        if self._samples % self._rescan_every == 0 or not self._known:
            pids: list[int] = []
            for root in self.roots:
                pids.extend(descendants(root))
        else:
            pids = self._known
        self._samples += 1
        rss_sum = 0
        seen: dict[tuple[int, int], int] = {}
        for pid in pids:
            stat = _read_stat(pid)
            if stat is None:
                continue
            _, ticks, rss, start = stat
            seen[(pid, start)] = ticks
            rss_sum += rss
        self._known = [pid for pid, _ in seen]
        with self._lock:
            self._ticks.update(seen)
            u = self._usage
            u.samples += 1
            u.processes = max(u.processes, len(seen))
            u.peak_rss = max(u.peak_rss, rss_sum)
            self.lifetime_peak_rss = max(self.lifetime_peak_rss, rss_sum)
            u.rss_series.append((time.monotonic(), rss_sum))
            take_pss = u.samples % self._pss_every == 1
        if take_pss:
            pss = [_read_pss(pid) for pid, _ in seen]
            if all(p is not None for p in pss):
                total = sum(p for p in pss if p is not None)
                with self._lock:
                    self._usage.peak_pss = max(self._usage.peak_pss, total)
                    self.lifetime_peak_pss = max(self.lifetime_peak_pss, total)
