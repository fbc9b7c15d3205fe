"""market-streamer benchmark harness: ``python bench/run.py [--quick]`` (``make bench``).

One run, on one machine, side by side (these machines are noisy, so only figures taken in
the same run are compared):

1. micro-benchmarks (decode, book apply, CSV encode, simulator) when their scripts exist;
2. on the mix (50% depth 20+20 levels, 45% aggTrade, 5% kline_1m over ``--symbols``
   symbols, from the high-rate feed ``_feed.py``), for each of ``--runs`` rounds and each
   subject (the bare-receive limit, the earlier design's baseline, the collector):
   a step at 20k msg/s (CPU per million messages, latency), then a ramp until the subject
   falls behind (sustained msg/s);
3. the full-market case: 2000 symbols, about 15k msg/s with bursts to 40k, collector only;
4. medians and ratios into ``BENCHMARKS.md`` (between the ``bench:results`` markers) and a
   short summary on stdout.

``--quick`` shortens everything to a smoke check (about two minutes) and writes its
report next to the other outputs instead of ``BENCHMARKS.md`` unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _proc import TreeSampler
from _replay import CAPTURE, capture_counts, replay_case
from _subjects import (
    BareSubject,
    BaselineSubject,
    CollectorSubject,
    FeedProcess,
    Subject,
)
from _tail import dir_bytes, percentile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MICRO = ("bench_decode.py", "bench_book.py", "bench_csv.py", "bench_sim.py")
#: Scripts run with ``--quick`` (or their ``MICRO_QUICK_ARGS``) even in a full run, to keep
#: ``make bench`` within its budget: they measure the decoder and the simulator, not targets.
MICRO_ALWAYS_QUICK = ("bench_decode.py", "bench_sim.py")
#: Shorter settings for ``--quick`` runs, for scripts without a ``--quick`` flag of their own
#: (each flag is passed only when the script's ``--help`` lists it).
MICRO_QUICK_ARGS = {
    "bench_book.py": ["--repeat", "2"],
    "bench_csv.py": ["--runs", "1", "--rows", "20000", "--book-rows", "2000"],
    "bench_sim.py": ["--seconds", "2", "--repeat", "1"],
}
MICRO_TIMEOUT = 180
SUBJECTS: dict[str, type[Subject]] = {
    "bare": BareSubject,
    "baseline": BaselineSubject,
    "collector": CollectorSubject,
}
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
#: The label of the ``--compare`` revision's collector.
BEFORE = "collector@before"


@dataclass
class Plan:
    """Durations and rates of one harness run."""

    quick: bool = False
    symbols: int = 100
    runs: int = 3
    subjects: tuple[str, ...] = ("bare", "baseline", "collector")
    warm_rate: float = 2_000
    measure_rate: float = 20_000
    measure_s: float = 8.0
    step_s: float = 3.0
    ramp: tuple[float, ...] = (
        30_000,
        40_000,
        50_000,
        60_000,
        75_000,
        90_000,
        110_000,
        130_000,
        160_000,
        200_000,
        240_000,
    )
    #: Tried, in order, when a subject is already behind at ``measure_rate``.
    ramp_down: tuple[float, ...] = (15_000, 10_000, 7_500, 5_000, 3_000, 2_000)
    ready_timeout: float = 45.0
    full_symbols: int = 2000
    full_s: float = 120.0
    base_rate: float = 11_000
    burst_rate: float = 40_000
    burst_s: float = 8.0
    burst_every: float = 40.0
    #: Collector worker processes (0: the runtime's default for the symbol count).
    workers: int = 0
    #: The orderbook stream's snapshot interval in the collector's config.
    book_interval: str = "1s"
    #: ``sim`` (the package's simulator in high-rate mode) or ``own`` (``_feed.py``).
    feed: str = "sim"
    micro: bool = True
    full: bool = True
    #: The real-traffic case: the recorded USD-M BTCUSDT capture replayed flat out.
    replay: bool = True
    #: Whole-run budget in seconds (``make bench`` must stay under 15 minutes): the
    #: full-market case is shortened (to no less than 30 s) when the rounds ran long.
    budget_s: float = 12 * 60
    #: After the ramp, the collector is held at its sustained rate this long, then sent
    #: SIGTERM while the feed keeps sending: it must drain and exit 0 in time.
    sigterm_hold_s: float = 8.0
    #: The runtime's default ``shutdown_timeout`` (the SIGTERM target's limit).
    shutdown_timeout: float = 15.0
    #: The CSV sink's default ``flush_interval`` in ms (the row-latency target's base).
    flush_ms: float = 1000.0
    #: ``--compare REV``: the revision measured as "before" (resolved commit), else None.
    compare: str | None = None
    #: The ``streamer`` executable of the ``--compare`` revision (set once it is built).
    before_streamer: str | None = None

    @classmethod
    def quick_plan(cls) -> Plan:
        """A smoke check: one round, short steps, a small full-market case."""
        return cls(
            quick=True,
            runs=1,
            measure_s=3.0,
            # At least two flushes (1 s apart) must land in a step to tell its disk rate.
            step_s=2.5,
            ramp=(40_000, 70_000, 100_000, 130_000),
            full_symbols=400,
            full_s=16.0,
            burst_s=4.0,
            burst_every=10.0,
            sigterm_hold_s=3.0,
        )

    def labels(self) -> tuple[str, ...]:
        """The subjects of one round, in the order of the first round.

        With ``--compare`` the collector runs twice, as ``collector`` (this checkout) and
        ``collector@before``, with another subject between the two so that the rotation of
        the order alternates which of them runs first.
        """
        names = list(self.subjects)
        if self.compare and "collector" in names:
            others = [n for n in names if n != "collector"]
            # bare, collector, baseline, collector@before: rotated, the collectors alternate.
            names = [*others[:1], "collector", *others[1:], BEFORE]
        return tuple(names)

    def order(self, round_index: int) -> list[str]:
        """The subjects of round ``round_index`` (0-based): the first round's order rotated,
        so no subject always runs on a warmer machine and old and new alternate."""
        names = list(self.labels())
        k = round_index % len(names) if names else 0
        return names[k:] + names[:k]


# --------------------------------------------------------------------------- measuring


@dataclass
class Step:
    """One rate step of one subject."""

    rate: float
    seconds: float
    achieved: float
    backlog: int
    ok: bool
    why: str
    cpu_s: float
    cpu_per_m: float
    cpu_share: float
    feed_cpu_share: float
    #: CPU of the harness itself (tailer and sampler threads), which shares the machine.
    harness_cpu_share: float
    recv_p50: float
    recv_p99: float
    written_p50: float
    written_p99: float
    rss: int
    counters: dict[str, int] = field(default_factory=dict)
    #: Messages per second whose rows reached the files (the aggTrade rows of every
    #: symbol over the mix's aggTrade share); the achieved rate for a subject writing none.
    rows_rate: float = float("nan")
    #: Receipt-to-file latency (file mtime minus ``receive_time``), ms.
    landed_p50: float = float("nan")
    landed_p99: float = float("nan")


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def run_step(
    feed: FeedProcess,
    subject: Subject,
    sampler: TreeSampler,
    feed_sampler: TreeSampler,
    rate: float,
    seconds: float,
) -> Step:
    """Hold ``rate`` for ``seconds`` and measure; the step fails when the subject is behind.

    Behind means: the feed could not keep its schedule (its socket buffer to the subject
    stayed full, so more than 150 ms of events are still due), or fewer than 90% of the
    scheduled events went out, or the receive lag grew by more than 250 ms from the first
    to the last third of the step, or the low end (10th percentile) of the latency of rows
    reaching the files rose by more than 500 ms (the writer is falling behind while the
    queues still absorb it), or the rows reaching the files account for fewer than 90% of
    the messages sent (a growing backlog between reading and writing).
    """
    feed.set_rate(rate)
    time.sleep(min(1.0, seconds * 0.25))  # let the new rate settle
    before = feed.stats()
    counters0 = subject.status() if isinstance(subject, CollectorSubject) else {}
    sampler.mark()
    feed_sampler.mark()
    t0 = time.monotonic()
    own0 = time.process_time()
    time.sleep(seconds)
    t1 = time.monotonic()
    own = time.process_time() - own0
    after = feed.stats()
    usage = sampler.usage()
    feed_usage = feed_sampler.usage()
    counters1 = subject.status() if isinstance(subject, CollectorSubject) else {}
    delivered = after["generated"] - before["generated"]
    span = t1 - t0
    achieved = delivered / span
    third = span / 3
    recv = subject.received(t0, t1)
    early = subject.received(t0, t0 + third)
    late = subject.received(t1 - third, t1)
    growth = _median(late) - _median(early)
    why = []
    if after["backlog"] > max(1000, 0.15 * rate):
        why.append(f"feed backlog {after['backlog']}")
    if achieved < 0.9 * rate:
        why.append(f"only {achieved:.0f}/s sent")
    if growth > 250:
        why.append(f"lag grew {growth:.0f} ms")
    # Rows reach the files once per flush interval, so their latency is a saw-tooth whose
    # low end (the freshest rows of each flush) stays put while the writer keeps up; that
    # low end rising by half an interval means the writing side is falling behind.
    fresh_late = percentile(subject.written(t1 - third, t1), 0.1)
    row_growth = fresh_late - percentile(subject.written(t0, t0 + third), 0.1)
    if row_growth > 500:
        why.append(f"row latency grew {row_growth:.0f} ms")
    if not subject.alive():
        why.append("subject exited")
    written = subject.written(t0, t1)
    rows_rate = subject.rows_rate(t0, t1) if subject.writes_csv else achieved
    if subject.writes_csv and not rows_rate >= 0.9 * achieved:
        why.append(
            "fewer than two flushes reached the files"
            if rows_rate != rows_rate
            else f"rows on disk {rows_rate:.0f}/s for {achieved:.0f}/s sent"
        )
    landed = subject.landed(t0, t1)
    counters = {
        k: int(counters1.get(k, 0) - counters0.get(k, 0))
        for k in ("ws_messages", "records_emitted", "csv.rows_written", "csv.bytes_written")
        if k in counters1
    }
    return Step(
        rate=rate,
        seconds=span,
        achieved=achieved,
        backlog=int(after["backlog"]),
        ok=not why,
        why="; ".join(why),
        cpu_s=usage.cpu_seconds,
        cpu_per_m=usage.cpu_seconds / delivered * 1e6 if delivered else float("nan"),
        cpu_share=usage.cpu_seconds / span,
        feed_cpu_share=feed_usage.cpu_seconds / span,
        harness_cpu_share=own / span,
        recv_p50=percentile(recv, 0.5),
        recv_p99=percentile(recv, 0.99),
        written_p50=percentile(written, 0.5),
        written_p99=percentile(written, 0.99),
        rss=usage.peak_rss,
        counters=counters,
        rows_rate=rows_rate,
        landed_p50=percentile(landed, 0.5),
        landed_p99=percentile(landed, 0.99),
    )


class NotReady(RuntimeError):
    """A subject did not connect (or sync its books) in time."""


def _wait_ready(subject: Subject, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not subject.ready():
        if not subject.alive():
            raise NotReady(f"{subject.name} exited during start-up (see its log)")
        if time.monotonic() > deadline:
            extra = subject.status() if isinstance(subject, CollectorSubject) else {}
            raise NotReady(
                f"{subject.name} not ready after {timeout:.0f} s; feed {subject.feed.stats()}; "
                f"snapshots {extra.get('snapshots_fetched', 'n/a')}, "
                f"messages {extra.get('ws_messages', 'n/a')}"
            )
        time.sleep(0.2)


def make_subject(name: str, feed: FeedProcess, symbols: int, plan: Plan, workdir: Path) -> Subject:
    """The subject called ``name`` (``bare``, ``baseline``, ``collector``, ``collector@before``)."""
    if name in ("collector", BEFORE):
        streamer = None
        if name == BEFORE:
            if not plan.before_streamer:
                raise RuntimeError("no --compare revision was prepared")
            streamer = Path(plan.before_streamer)
        return CollectorSubject(
            feed,
            symbols,
            workdir,
            workers=plan.workers,
            book_interval=plan.book_interval,
            streamer=streamer,
            label=name,
        )
    return SUBJECTS[name](feed, symbols, workdir)


def measure_subject(
    name: str, feed: FeedProcess, plan: Plan, workdir: Path, log: Any
) -> dict[str, Any]:
    """Start one subject on ``feed``, take the 20k step and the ramp, stop it.

    A collector is then held at its sustained rate for ``plan.sigterm_hold_s`` and sent
    SIGTERM while the feed keeps sending: how long it takes to exit, and with which code.
    """
    subject = make_subject(name, feed, plan.symbols, plan, workdir)
    feed.set_rate(0)
    subject.start()
    sampler = TreeSampler(subject.pid).start()
    feed_sampler = TreeSampler(feed.proc.pid).start()
    started = time.monotonic()
    result: dict[str, Any] = {"subject": name}
    generated0 = feed.stats()["generated"]
    try:
        feed.set_rate(plan.warm_rate)
        _wait_ready(subject, plan.ready_timeout)
        result["ready_s"] = time.monotonic() - started
        time.sleep(1.0)
        at = run_step(feed, subject, sampler, feed_sampler, plan.measure_rate, plan.measure_s)
        log(f"  {name:9s} @{plan.measure_rate / 1000:.0f}k: {_step_line(at)}")
        steps = [at]
        best = at if at.ok else None
        # Up from the measuring rate until a step fails; if even that failed, down until
        # one passes (after a longer step, so the overload's queues can drain first).
        upward = at.ok
        for i, rate in enumerate(plan.ramp if upward else plan.ramp_down):
            seconds = plan.step_s if upward or i else plan.step_s * 2
            step = run_step(feed, subject, sampler, feed_sampler, rate, seconds)
            steps.append(step)
            log(f"  {name:9s} ramp {rate / 1000:.1f}k: {_step_line(step)}")
            if upward and not step.ok:
                break
            if step.ok:
                best = step
                if not upward:
                    break
        result["at_measure"] = asdict(at)
        result["steps"] = [asdict(s) for s in steps]
        # Sustained = the rate at which rows reached the files in the best passing step
        # (messages read, for the bare receiver). When no step passed, what reached the
        # files in the measuring step while overloaded (flagged as such).
        top = best or at
        result["sustained"] = top.rows_rate if subject.writes_csv else top.achieved
        result["sustained_read"] = top.achieved
        result["sustained_ok"] = best is not None
        # Even the top of the ramp passed: the subject's limit is higher still.
        result["ramp_capped"] = upward and all(st.ok for st in steps)
        if isinstance(subject, CollectorSubject) and plan.sigterm_hold_s > 0:
            result["sigterm"] = sigterm_check(feed, subject, plan, top.rate if best else 0, log)
    finally:
        feed.set_rate(0)
        result["messages"] = feed.stats()["generated"] - generated0
        result["exit_code"] = subject.stop()
        sampler.stop()
        feed_sampler.stop()
        result["peak_rss"] = sampler.lifetime_peak_rss
        result["peak_pss"] = sampler.lifetime_peak_pss
        if subject.writes_csv:
            result["bytes_written"] = dir_bytes(str(subject.out))
            if result["messages"]:
                result["bytes_per_message"] = result["bytes_written"] / result["messages"]
        shutil.rmtree(subject.out, ignore_errors=True)
    return result


def sigterm_check(
    feed: FeedProcess, subject: CollectorSubject, plan: Plan, rate: float, log: Any
) -> dict[str, Any]:
    """Hold ``rate`` (or the lowest ramp-down rate when nothing passed), then SIGTERM.

    The feed keeps sending through the shutdown, as an exchange would. Met when the
    collector exits 0 within ``plan.shutdown_timeout``: the runtime exits 1 when it could
    not drain what was queued in time.
    """
    rate = rate or plan.ramp_down[-1]
    feed.set_rate(rate)
    time.sleep(plan.sigterm_hold_s)
    code, seconds = subject.terminate(signal.SIGTERM, plan.shutdown_timeout + 15)
    feed.set_rate(0)
    out = {"rate": rate, "held_s": plan.sigterm_hold_s, "exit_code": code, "seconds": seconds}
    out["ok"] = code == 0 and seconds <= plan.shutdown_timeout
    log(
        f"  {subject.name:9s} SIGTERM at {rate / 1000:.0f}k: exit {code} after {seconds:.1f} s"
        f" ({'ok' if out['ok'] else 'MISSED'})"
    )
    return out


def _step_line(s: Step) -> str:
    return (
        f"{s.achieved:8.0f}/s (disk {_f(s.rows_rate)}/s) {'ok ' if s.ok else 'BEHIND'} "
        f"cpu {s.cpu_share:.2f} "
        f"({s.cpu_per_m:.1f} s/M) feed {s.feed_cpu_share:.2f} harness {s.harness_cpu_share:.2f} "
        f"lag p50/p99 "
        f"{s.recv_p50:.0f}/{s.recv_p99:.0f} ms row {s.written_p50:.0f}/{s.written_p99:.0f} ms"
        f" landed p99 {_f(s.landed_p99)} ms" + (f"  [{s.why}]" if s.why else "")
    )


#: Rows whose events came this long after a burst ended still count as "inside" it (the
#: burst's queue drains through them).
BURST_TAIL_MS = 2000


def full_market(
    plan: Plan,
    workdir: Path,
    log: Any,
    deadline: float = float("inf"),
    label: str = "collector",
) -> dict[str, Any]:
    """The collector on ``full_symbols`` symbols: base rate with periodic bursts.

    The measurement is cut short (to no less than 30 s) so that it ends 30 s before the
    monotonic ``deadline``, leaving time to stop the collector. Row latency is from the
    event time ``E`` to the file (mtime), for the rows of the events sent during the
    measurement, including those that landed only while the collector was stopping.
    """
    feed = FeedProcess(plan.full_symbols, workdir, plan.feed)
    folder = workdir / f"full-{label}"
    folder.mkdir(exist_ok=True)
    subject = make_subject(label, feed, plan.full_symbols, plan, folder)
    assert isinstance(subject, CollectorSubject)
    result: dict[str, Any] = {"symbols": plan.full_symbols, "subject": label}
    sampler = None
    window: tuple[int, int] | None = None
    bursts_wall: list[tuple[int, int]] = []
    try:
        subject.start()
        sampler = TreeSampler(subject.pid).start()
        started = time.monotonic()
        feed.set_rate(plan.base_rate)
        try:
            _wait_ready(subject, 120.0)
            result["ready"] = True
        except NotReady as exc:
            if not subject.alive():
                raise
            # Measure anyway: a slow sync is a finding, not a reason to lose the case.
            log(f"  {exc}; measuring anyway")
            result["ready"] = False
            result["not_ready"] = str(exc)
        result["ready_s"] = time.monotonic() - started
        time.sleep(2.0)
        sampler.mark()
        s0 = feed.stats()
        t0 = time.monotonic()
        w0 = _wall_ms()
        rate = plan.base_rate
        bursts: list[tuple[float, float]] = []
        max_backlog = 0
        length = min(plan.full_s, max(30.0, deadline - t0 - 30.0))
        if length < plan.full_s:
            log(f"  time budget: measuring {length:.0f} s instead of {plan.full_s:.0f} s")
        while (now := time.monotonic()) - t0 < length:
            phase = (now - t0) % plan.burst_every
            # The burst sits in the middle of each period.
            start = (plan.burst_every - plan.burst_s) / 2
            want = plan.burst_rate if start <= phase < start + plan.burst_s else plan.base_rate
            if want != rate:
                feed.set_rate(want)
                if want == plan.burst_rate:
                    bursts.append((now, now + plan.burst_s))
                    bursts_wall.append((_wall_ms(), _wall_ms() + int(plan.burst_s * 1000)))
                rate = want
            max_backlog = max(max_backlog, feed.stats()["backlog"])
            time.sleep(0.25)
        t1 = time.monotonic()
        window = (w0, _wall_ms())
        s1 = feed.stats()
        usage = sampler.usage()
        feed.set_rate(0)
        delivered = s1["generated"] - s0["generated"]
        recv = subject.received(t0, t1)
        result.update(
            seconds=t1 - t0,
            average_rate=delivered / (t1 - t0),
            rows_rate=subject.rows_rate(t0, t1),
            base_rate=plan.base_rate,
            burst_rate=plan.burst_rate,
            bursts=len(bursts),
            burst_s=plan.burst_s,
            cpu_s=usage.cpu_seconds,
            cpu_share=usage.cpu_seconds / (t1 - t0),
            cpu_per_m=usage.cpu_seconds / delivered * 1e6 if delivered else float("nan"),
            peak_rss=usage.peak_rss,
            peak_pss=usage.peak_pss,
            processes=usage.processes,
            max_backlog=max_backlog,
            recv_p99=percentile(recv, 0.99),
            counters=subject.status(),
        )
        log(
            f"  full market {label} {plan.full_symbols} symbols: "
            f"{result['average_rate']:.0f}/s avg, cpu {result['cpu_share']:.2f} cores, "
            f"rss {usage.peak_rss / 2**20:.0f} MiB, pss {usage.peak_pss / 2**20:.0f} MiB"
        )
    finally:
        result["exit_code"] = subject.stop()
        if sampler is not None:
            sampler.stop()
            result["lifetime_peak_rss"] = sampler.lifetime_peak_rss
        # After the stop: the rows of the window that landed while it drained count too.
        if window is not None and subject.tailer is not None:
            rows = subject.tailer.by_event(*window)
            inside, outside = split_bursts(rows, bursts_wall)
            result.update(
                rows_sampled=len(rows),
                written_p50=percentile([r.landed + r.received for r in rows], 0.5),
                written_p99=percentile([r.landed + r.received for r in rows], 0.99),
                outside_p99=percentile([r.landed + r.received for r in outside], 0.99),
                burst_written_p99=percentile([r.landed + r.received for r in inside], 0.99),
            )
            log(
                f"  row p99 (E to file) {_f(result['written_p99'])} ms, outside bursts "
                f"{_f(result['outside_p99'])} ms, inside {_f(result['burst_written_p99'])} ms"
            )
        result["bytes_written"] = dir_bytes(str(subject.out))
        shutil.rmtree(subject.out, ignore_errors=True)
        feed.stop()
    return result


def run_replay(plan: Plan, workdir: Path, log: Any) -> dict[str, dict[str, Any]]:
    """The real-traffic case for each collector (``max(1, runs)`` times each, the
    collectors alternating); per label the runs and their medians."""
    labels = ["collector", BEFORE] if plan.compare else ["collector"]
    expected = capture_counts()
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for i in range(max(1, plan.runs)):
        for label in labels if i % 2 == 0 else labels[::-1]:
            streamer = (
                Path(plan.before_streamer) if label == BEFORE and plan.before_streamer else None
            )
            try:
                r = replay_case(label, workdir, expected, streamer)
                log(
                    f"  replay {label}: {r['rate']:.0f} msg/s ({r['levels_rate']:.0f} levels/s), "
                    f"{r['cpu_s']:.2f} CPU-s = {r['cpu_per_m']:.0f} s/M, exit {r['exit_code']}"
                )
            except Exception as exc:  # one failed run must not lose the others
                log(f"  replay {label}: FAILED: {exc}")
                r = {"subject": label, "error": str(exc)}
            runs[label].append(r)
    out: dict[str, dict[str, Any]] = {}
    for label, rs in runs.items():
        ok = [r for r in rs if "rate" in r]
        out[label] = {"runs": rs, **expected}
        if ok:
            for key in ("seconds", "rate", "levels_rate", "cpu_s", "cpu_per_m", "peak_rss"):
                out[label][key] = _median([r[key] for r in ok])
        else:
            out[label]["error"] = rs[-1].get("error", "no run") if rs else "no run"
    return out


def split_bursts(rows: list[Any], bursts: list[tuple[int, int]]) -> tuple[list[Any], list[Any]]:
    """Rows whose event time falls in a burst (or ``BURST_TAIL_MS`` after it), and the rest."""
    inside, outside = [], []
    for row in rows:
        if any(b0 <= row.event < b1 + BURST_TAIL_MS for b0, b1 in bursts):
            inside.append(row)
        else:
            outside.append(row)
    return inside, outside


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def profile_collector(plan: Plan, workdir: Path, rate: float, seconds: float, log: Any) -> str:
    """cProfile every process of the collector at ``rate`` for ``seconds``; a text report.

    Uses ``bench/_profile/sitecustomize.py``. cProfile slows Python code down (roughly 1.5-2x
    on call-heavy code), so read the shares, not the absolute times.
    """
    import pstats

    prof_dir = workdir / "profile"
    prof_dir.mkdir(exist_ok=True)
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(BENCH / "_profile"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "STREAMER_BENCH_PROFILE": str(prof_dir),
    }
    feed = FeedProcess(plan.symbols, workdir, plan.feed)
    subject = CollectorSubject(feed, plan.symbols, workdir, workers=plan.workers, env=env)
    try:
        subject.start()
        feed.set_rate(plan.warm_rate)
        _wait_ready(subject, plan.ready_timeout)
        feed.set_rate(rate)
        s0 = feed.stats()
        time.sleep(seconds)
        s1 = feed.stats()
        feed.set_rate(0)
    finally:
        subject.stop()
        feed.stop()
    achieved = (s1["generated"] - s0["generated"]) / seconds
    out = [f"collector profiled at {rate:.0f} msg/s asked, {achieved:.0f} msg/s delivered"]
    for path in sorted(prof_dir.glob("*.pstats")):
        stats = pstats.Stats(str(path))
        total = stats.total_tt  # type: ignore[attr-defined]
        areas: dict[str, float] = {}
        rows = []
        for (filename, line, func), (_, _, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            area = _area(filename, func)
            areas[area] = areas.get(area, 0.0) + tt
            rows.append((tt, f"{_short(filename)}:{line}({func})"))
        out.append(f"\n== {path.stem}: {total:.2f} s profiled")
        out.append(
            "by area (own time): "
            + ", ".join(
                f"{a} {t / total:.0%}" for a, t in sorted(areas.items(), key=lambda x: -x[1])[:9]
            )
            if total
            else "no samples"
        )
        for tt, where in sorted(rows, reverse=True)[:15]:
            out.append(f"  {tt:7.3f} s {tt / total if total else 0:5.1%}  {where}")
    text = "\n".join(out)
    (workdir / "profile.txt").write_text(text)
    log(f"profile written to {workdir / 'profile.txt'}")
    return text


def _short(filename: str) -> str:
    for marker in ("site-packages/", "streamer/", "lib/python3"):
        i = filename.find(marker)
        if i >= 0:
            return filename[i:]
    return filename


_AREAS = (
    ("websockets/", "websockets"),
    ("plugins/exchanges/binance/", "binance adapter+decode"),
    ("plugins/streams/_book", "order book"),
    ("plugins/streams/", "stream types"),
    ("plugins/sinks/", "csv sink"),
    ("core/runtime/", "runtime (batches, channels)"),
    ("streamer/core/", "core"),
    ("asyncio/", "asyncio"),
    ("anyio/", "anyio"),
    ("multiprocessing/", "multiprocessing"),
    ("httpx", "httpx"),
)


def _area(filename: str, func: str) -> str:
    for marker, area in _AREAS:
        if marker in filename:
            return area
    if filename == "~":
        # C functions: attribute the big ones by name.
        if "msgspec" in func or "decode" in func or "encode" in func:
            return "msgspec (C)"
        if "select" in func or "poll" in func:
            return "waiting (select/poll)"
        if "recv" in func or "send" in func or "write" in func or "read" in func:
            return "socket/file I/O (C)"
        return "other builtins"
    return "other"


def run_micro(quick: bool, log: Any) -> list[dict[str, Any]]:
    """Run every micro-benchmark script that exists; capture its output."""
    out = []
    for script in MICRO:
        path = BENCH / script
        if not path.exists():
            out.append({"script": script, "missing": True})
            continue
        args = [sys.executable, str(path)]
        if quick or script in MICRO_ALWAYS_QUICK:
            helptext = subprocess.run(
                [*args, "--help"], capture_output=True, text=True, timeout=60
            ).stdout
            if "--quick" in helptext:
                args.append("--quick")
            else:
                extra = MICRO_QUICK_ARGS.get(script, [])
                for flag, value in zip(extra[::2], extra[1::2], strict=True):
                    if flag in helptext:
                        args += [flag, value]
        t0 = time.monotonic()
        # Own session, so a timeout also ends whatever the script started (a simulator...).
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            text, errors = proc.communicate(timeout=MICRO_TIMEOUT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, errors = proc.communicate()
            text, rc = f"{text or ''}\n(killed: still running after {MICRO_TIMEOUT} s)", -1
        if rc != 0 and errors:
            # Only a failure's stderr is worth showing (warnings at exit are not results).
            text = f"{text}\n--- stderr (last lines):\n" + "\n".join(errors.splitlines()[-8:])
        elapsed = time.monotonic() - t0
        log(f"  {script}: exit {rc} in {elapsed:.0f} s")
        out.append(
            {
                "script": script,
                "args": args[2:],
                "rc": rc,
                "seconds": elapsed,
                "output": text.strip(),
            }
        )
    return out


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """nproc, CPU model, Python, kernel, memory and the git commit."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        mem_gib = int(mem) / 2**20
    except OSError:
        mem_gib = float("nan")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_gib": round(mem_gib, 1),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians per subject and medians of the per-round ratios (for each collector)."""
    med: dict[str, dict[str, float]] = {}
    names = sorted({n for r in rounds for n in r})
    for name in names:
        rs = [r[name] for r in rounds if name in r and "at_measure" in r[name]]
        if not rs:
            continue
        at = [r["at_measure"] for r in rs]
        sig = [r["sigterm"] for r in rs if "sigterm" in r]
        med[name] = {
            "sustained": _median([r["sustained"] for r in rs]),
            "sustained_read": _median([r.get("sustained_read", r["sustained"]) for r in rs]),
            "sustained_ok_runs": sum(1 for r in rs if r.get("sustained_ok")),
            "ramp_capped_runs": sum(1 for r in rs if r.get("ramp_capped")),
            "cpu_per_m": _median([a["cpu_per_m"] for a in at]),
            "cpu_share_at_measure": _median([a["cpu_share"] for a in at]),
            "recv_p50": _median([a["recv_p50"] for a in at]),
            "recv_p99": _median([a["recv_p99"] for a in at]),
            "written_p50": _median([a["written_p50"] for a in at]),
            "written_p99": _median([a["written_p99"] for a in at]),
            "landed_p50": _median([a.get("landed_p50", float("nan")) for a in at]),
            "landed_p99": _median([a.get("landed_p99", float("nan")) for a in at]),
            "peak_rss": _median([r["peak_rss"] for r in rs]),
            "bytes_written": _median([r.get("bytes_written", float("nan")) for r in rs]),
            "bytes_per_message": _median([r.get("bytes_per_message", float("nan")) for r in rs]),
            "runs": len(rs),
        }
        if sig:
            med[name].update(
                sigterm_ok_runs=sum(1 for x in sig if x["ok"]),
                sigterm_runs=len(sig),
                sigterm_s=max(x["seconds"] for x in sig),
                sigterm_codes=",".join(str(x["exit_code"]) for x in sig),
            )

    def ratio(a: str, b: str, key: str, invert: bool = False) -> float:
        values = []
        for r in rounds:
            if a in r and b in r and "at_measure" in r[a] and "at_measure" in r[b]:
                x = r[a][key] if key == "sustained" else r[a]["at_measure"][key]
                y = r[b][key] if key == "sustained" else r[b]["at_measure"][key]
                if x and y:
                    values.append(y / x if invert else x / y)
        return _median(values)

    ratios: dict[str, float] = {}
    for c in (n for n in names if n.startswith("collector")):
        suffix = c[len("collector") :]
        ratios[f"collector{suffix}_vs_baseline_sustained"] = ratio(c, "baseline", "sustained")
        ratios[f"collector{suffix}_vs_bare_sustained"] = ratio(c, "bare", "sustained")
        ratios[f"baseline_cpu_per_m_vs_collector{suffix}"] = ratio(c, "baseline", "cpu_per_m", True)
    # Same round, same feed, one after the other: after / before.
    if "collector" in names and BEFORE in names:
        ratios["after_vs_before_sustained"] = ratio("collector", BEFORE, "sustained")
        ratios["after_vs_before_cpu_per_m"] = ratio("collector", BEFORE, "cpu_per_m")
    for key in (
        "collector_vs_baseline_sustained",
        "collector_vs_bare_sustained",
        "baseline_cpu_per_m_vs_collector",
    ):
        ratios.setdefault(key, float("nan"))
    return {"median": med, "ratios": ratios}


@dataclass
class Target:
    """One target of issue 12, as measured in this run."""

    label: str
    goal: str
    value: float | None
    fmt: str
    #: True/False once measured; None when not measured (or not a pass/fail target).
    met: bool | None
    note: str = ""

    def shown(self) -> str:
        """The measured value, formatted."""
        return _f(self.value, self.fmt) if self.value is not None else "n/a"

    def verdict(self) -> str:
        """``met``, ``MISSED``, or why there is no verdict."""
        if self.met is None:
            return self.note or "n/a"
        return "met" if self.met else "MISSED"


def _check(value: float | None, test: Any) -> bool | None:
    if value is None or value != value:
        return None
    return bool(test(value))


def evaluate_targets(
    summary: dict[str, Any],
    full: dict[str, Any] | None,
    plan: dict[str, Any],
    label: str,
    replay: dict[str, Any] | None = None,
) -> list[Target]:
    """Every target of issue 12 for the collector ``label`` (``collector`` or the
    ``--compare`` revision's), from the round summary, its full-market result and its
    replay of the recorded capture."""
    med = summary["median"].get(label, {})
    replay = replay or {}
    replayed = "rate" in replay
    ratios = summary["ratios"]
    suffix = label[len("collector") :]
    full = full or {}
    flush = plan.get("flush_ms", 1000.0)
    limit = plan.get("shutdown_timeout", 15.0)
    rate = plan.get("measure_rate", 20_000) / 1000
    sustained = med.get("sustained")
    if sustained is not None and med.get("sustained_ok_runs", 1) * 2 <= med.get("runs", 1):
        sustained = None  # no step passed in most rounds: no sustained rate to judge
    rss = full.get("peak_rss")
    pss = full.get("peak_pss")
    overflow = (full.get("counters") or {}).get("records_overflowed") if full else None
    sig_runs = med.get("sigterm_runs", 0)
    overflowed = full.get("counters") is not None
    out = [
        Target(
            "mix: sustained, rows on disk",
            ">= 70000 msg/s",
            sustained,
            ".0f",
            _check(sustained, lambda v: v >= 70_000),
        ),
        Target(
            "mix: CPU per M msgs (tree)",
            "<= 20 s",
            med.get("cpu_per_m"),
            ".1f",
            _check(med.get("cpu_per_m"), lambda v: v <= 20),
        ),
        Target(
            "mix: vs seed-style baseline",
            ">= 7x",
            ratios.get(f"collector{suffix}_vs_baseline_sustained"),
            ".2f",
            _check(ratios.get(f"collector{suffix}_vs_baseline_sustained"), lambda v: v >= 7),
        ),
        Target(
            "mix: vs bare websockets receiver",
            "(reported)",
            ratios.get(f"collector{suffix}_vs_bare_sustained"),
            ".0%",
            None,
            "info",
        ),
        Target(
            f"mix: row p99 at {rate:.0f}k (receive to file)",
            f"<= {flush + 100:.0f} ms",
            med.get("landed_p99"),
            ".0f",
            _check(med.get("landed_p99"), lambda v: v <= flush + 100),
        ),
        Target(
            "mix: SIGTERM at sustained rate",
            f"exit 0 within {limit:.0f} s",
            med.get("sigterm_s") if sig_runs else None,
            ".1f",
            (med.get("sigterm_ok_runs") == sig_runs) if sig_runs else None,
            "" if sig_runs else "not measured",
        ),
        Target(
            "full: average CPU",
            "<= 0.6 cores",
            full.get("cpu_share"),
            ".2f",
            _check(full.get("cpu_share"), lambda v: v <= 0.6),
        ),
        Target(
            "full: summed RSS (peak, MB)",
            "<= 700 MB",
            rss / 1e6 if rss else None,
            ".0f",
            _check(rss / 1e6 if rss else None, lambda v: v <= 700),
        ),
        Target(
            "full: summed PSS (peak, MB)",
            "(reported)",
            pss / 1e6 if pss else None,
            ".0f",
            None,
            "info",
        ),
        Target(
            "full: row p99 outside bursts",
            "<= 2000 ms",
            full.get("outside_p99"),
            ".0f",
            _check(full.get("outside_p99"), lambda v: v <= 2000),
        ),
        Target(
            "full: row p99 inside bursts",
            "<= 5000 ms",
            full.get("burst_written_p99"),
            ".0f",
            _check(full.get("burst_written_p99"), lambda v: v <= 5000),
        ),
        Target(
            "full: records overflowed",
            "0",
            float(overflow or 0) if overflowed else None,
            ".0f",
            _check(float(overflow or 0) if overflowed else None, lambda v: v == 0),
        ),
        Target(
            "real traffic: USD-M BTCUSDT replay",
            "msg/s (reported)",
            replay.get("rate"),
            ".0f",
            None,
            "info" if replayed else "not measured",
        ),
        Target(
            "real traffic: replay CPU per M msgs (tree)",
            "(reported)",
            replay.get("cpu_per_m"),
            ".1f",
            None,
            "info" if replayed else "not measured",
        ),
    ]
    return out


def _f(value: float, fmt: str = ".0f", unit: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:{fmt}}{unit}"


def _mib(value: float) -> str:
    return _f(value / 2**20, ".0f", " MiB") if value == value else "n/a"


def full_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The full-market result per collector label (older reports: one, under ``full``)."""
    if report.get("full_by_label"):
        return report["full_by_label"]
    return {"collector": report["full"]} if report.get("full") else {}


def target_table(report: dict[str, Any]) -> list[tuple[Target, Target | None]]:
    """Each target for this checkout's collector, with the ``--compare`` one's beside it."""
    fulls = full_results(report)
    replays = report.get("replay_by_label") or {}
    after = evaluate_targets(
        report["summary"],
        fulls.get("collector"),
        report["plan"],
        "collector",
        replays.get("collector"),
    )
    if not report["plan"].get("compare"):
        return [(t, None) for t in after]
    before = evaluate_targets(
        report["summary"], fulls.get(BEFORE), report["plan"], BEFORE, replays.get(BEFORE)
    )
    return list(zip(after, before, strict=True))


def _ratio(after: Target, before: Target | None) -> str:
    if before is None or after.value is None or before.value is None:
        return "n/a"
    a, b = after.value, before.value
    if a != a or b != b or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def _verdict_md(t: Target) -> str:
    v = t.verdict()
    return "**MISSED**" if v == "MISSED" else v


def _render_full(label: str, full: dict[str, Any]) -> list[str]:
    """The full-market section of one collector."""
    nan = float("nan")
    if full.get("error"):
        return ["", f"### Full market ({label}): failed", "", f"`{full['error']}`"]
    counters = full.get("counters") or {}
    sync = (
        ""
        if full.get("ready", True)
        else f" Not every book had synced when measuring began: {full.get('not_ready')}."
    )
    return [
        "",
        f"### Full market: {full['symbols']} symbols, {label}",
        "",
        f"{full.get('seconds', 0):.0f} s at {full.get('base_rate', 0) / 1000:.0f}k msg/s with "
        f"{full.get('bursts', 0)} bursts of {full.get('burst_s', 0):.0f} s at "
        f"{full.get('burst_rate', 0) / 1000:.0f}k msg/s (start-up and book sync excluded: "
        f"{_f(full.get('ready_s', nan))} s).{sync} Row latency: `E` to the file's mtime, for "
        f"the events of the measured window; inside bursts = events during a burst or up to "
        f"{BURST_TAIL_MS / 1000:.0f} s after it.",
        "",
        "| average msg/s | rows on disk msg/s | CPU (cores) | CPU s per M | peak RSS (tree) "
        "| peak PSS | processes | max feed backlog | row p50 / p99 | p99 outside / inside bursts "
        "| bytes written | records overflowed | backpressure waits | exit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| "
        + " | ".join(
            [
                _f(full.get("average_rate", nan)),
                _f(full.get("rows_rate", nan)),
                _f(full.get("cpu_share", nan), ".2f"),
                _f(full.get("cpu_per_m", nan), ".1f"),
                _mib(full.get("peak_rss", nan)),
                _mib(full.get("peak_pss", nan)),
                str(full.get("processes", "n/a")),
                str(full.get("max_backlog", "n/a")),
                f"{_f(full.get('written_p50', nan))} / {_f(full.get('written_p99', nan))} ms",
                f"{_f(full.get('outside_p99', nan))} / {_f(full.get('burst_written_p99', nan))} ms",
                _mib(full.get("bytes_written", nan)),
                str(counters.get("records_overflowed", "n/a")),
                f"{counters.get('backpressure_waits', 0)} "
                f"({counters.get('backpressure_wait_ms', 0) / 1000:.0f} s)",
                str(full.get("exit_code", "n/a")),
            ]
        )
        + " |",
    ]


def _render_replay(replays: dict[str, dict[str, Any]]) -> list[str]:
    """The real-traffic section: one row per collector."""
    if not replays:
        return []
    first = next(iter(replays.values()))
    nan = float("nan")
    lines = [
        "",
        f"### Real traffic: `{CAPTURE}` replayed flat out",
        "",
        f"`streamer sim --replay {CAPTURE} --speed 0` serves the capture's "
        f"{first.get('events', 0)} USD-M BTCUSDT `depth@0ms` events "
        f"({first.get('levels', 0)} levels, "
        f"{first.get('levels', 0) / max(1, first.get('events', 1)):.0f} per event) as fast as "
        "the collector reads them; the collector runs depth, orderbook (20 levels, 1 s) and "
        "aggtrade (not in the capture) to CSV, flushing every 100 ms. Measured from its first "
        "connection to the simulator (start-up excluded) until every depth row is on disk; "
        "CPU of its whole process tree; medians of the runs.",
        "",
        "| subject | runs | msg/s | levels/s | seconds | CPU s | CPU s per M msgs "
        "| peak RSS (tree) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in replays.items():
        if "rate" not in r:
            lines.append(f"| {label} | failed: `{r.get('error', '?')}` |||||||")
            continue
        n_ok = sum(1 for x in r["runs"] if "rate" in x)
        lines.append(
            f"| {label} | {n_ok}/{len(r['runs'])} | {_f(r['rate'])} | {_f(r['levels_rate'])} "
            f"| {_f(r['seconds'], '.2f')} | {_f(r['cpu_s'], '.2f')} "
            f"| {_f(r['cpu_per_m'], '.1f')} | {_mib(r.get('peak_rss', nan))} |"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    """The generated part of BENCHMARKS.md."""
    m, plan = report["machine"], report["plan"]
    nan = float("nan")
    s = report["summary"]
    med, ratios = s["median"], s["ratios"]
    compare = plan.get("compare")
    lines = [
        START,
        "<!-- Generated by `python bench/run.py`; edit the text outside these markers. -->",
        "",
        f"Measured {m['date']} at commit `{m['commit']}`: {m['nproc']} CPUs ({m['cpu']}), "
        f"{m['mem_gib']} GiB, Python {m['python']}, Linux {m['kernel']}. "
        f"Load average before/after: {report['load_before']} / {report['load_after']}. "
        f"Harness wall time {report['wall_s'] / 60:.1f} min"
        f"{' (--quick: smoke figures, not results)' if plan['quick'] else ''}.",
    ]
    if compare:
        lines += [
            "",
            f"**Before/after.** `collector` is this checkout; `{BEFORE}` is "
            f"`{report.get('compare_rev', compare)}` (commit `{compare[:12]}`), installed in "
            "its own virtual environment and run in the same rounds on the same feed, the two "
            "alternating. Ratios are after / before.",
        ]
    lines += ["", "### Targets (issue 12)", ""]
    rows = target_table(report)
    if compare:
        lines += [
            "| target | goal | before | after | after / before | met (after) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for a, b in rows:
            lines.append(
                f"| {a.label} | {a.goal} | {b.shown() if b else 'n/a'} | {a.shown()} "
                f"| {_ratio(a, b)} | {_verdict_md(a)} |"
            )
    else:
        lines += ["| target | goal | measured | met |", "|---|---|---:|---|"]
        for a, _ in rows:
            lines.append(f"| {a.label} | {a.goal} | {a.shown()} | {_verdict_md(a)} |")
    lines += [
        "",
        f"### The mix, {plan['symbols']} symbols (medians of {plan['runs']} rounds)",
        "",
        "Each round runs the subjects one after the other on the same feed. "
        f"CPU and latency are taken at {plan['measure_rate'] / 1000:.0f}k msg/s held for "
        f"{plan['measure_s']:.0f} s; sustained is the rate at which rows reached the files "
        f"(messages read, for `bare`) in the highest ramp step ({plan['step_s']:.1f} s each) "
        "the subject kept up with. Row latency: `landed` is file mtime minus `receive_time`, "
        "`written` is the wall clock when the harness saw the row minus `E`.",
        "",
        "| subject | sustained msg/s (rows on disk) | read msg/s | CPU s per M msgs "
        "| CPU (cores) | receive lag p50 / p99 | row landed p50 / p99 | row written p50 / p99 "
        "| peak RSS (tree) | bytes written per message | SIGTERM (exit codes, slowest) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("bare", "baseline", "collector", BEFORE):
        if name not in med:
            continue
        x = med[name]
        flag = "" if x.get("sustained_ok_runs", x["runs"]) == x["runs"] else " *"
        at_least = ">= " if x.get("ramp_capped_runs", 0) * 2 > x["runs"] else ""
        sig = f"{x['sigterm_codes']}; {x['sigterm_s']:.1f} s" if x.get("sigterm_runs") else "n/a"
        lines.append(
            f"| {name} | {at_least}{_f(x['sustained'])}{flag} "
            f"| {_f(x.get('sustained_read', nan))} | {_f(x['cpu_per_m'], '.1f')} "
            f"| {_f(x['cpu_share_at_measure'], '.2f')} "
            f"| {_f(x['recv_p50'])} / {_f(x['recv_p99'])} ms "
            f"| {_f(x.get('landed_p50', nan))} / {_f(x.get('landed_p99', nan))} ms "
            f"| {_f(x['written_p50'])} / {_f(x['written_p99'])} ms "
            f"| {_mib(x['peak_rss'])} | {_f(x.get('bytes_per_message', nan))} | {sig} |"
        )
    if any(x.get("ramp_capped_runs", 0) * 2 > x["runs"] for x in med.values()):
        lines += [
            "",
            ">= : the top step of the ramp passed in most rounds, so the limit is higher; the "
            "ratio to it is then an upper bound. Sustained figures are ramp steps, and ratios "
            "between them inherit the steps' granularity.",
        ]
    if any(x.get("sustained_ok_runs", x["runs"]) < x["runs"] for x in med.values()):
        lines += [
            "",
            "\\* In some rounds no step passed, not even the lowest: the figure is what "
            "reached the files while overloaded.",
        ]
    ratio_text = [
        "Ratios (median of the per-round ratios): collector / baseline sustained "
        f"**{_f(ratios['collector_vs_baseline_sustained'], '.2f', 'x')}**; "
        f"collector / bare-receive limit **{_f(ratios['collector_vs_bare_sustained'], '.0%')}**;"
        " baseline CPU per message / collector CPU per message "
        f"**{_f(ratios['baseline_cpu_per_m_vs_collector'], '.2f', 'x')}**."
    ]
    if compare:
        ratio_text.append(
            f"After / before, same rounds: sustained "
            f"**{_f(ratios.get('after_vs_before_sustained', nan), '.2f', 'x')}**, CPU per "
            f"message **{_f(ratios.get('after_vs_before_cpu_per_m', nan), '.2f', 'x')}**; "
            f"before / baseline sustained "
            f"{_f(ratios.get(f'{BEFORE}_vs_baseline_sustained', nan), '.2f', 'x')}."
        )
    lines += ["", " ".join(ratio_text), ""]
    for label, full in full_results(report).items():
        lines += _render_full(label, full)
    lines += _render_replay(report.get("replay_by_label") or {})
    lines += ["", "### Ramps, round by round", ""]
    lines += [
        "Each cell: achieved msg/s, then the CPU (cores) of the subject / the feed / the "
        "harness (tailer and samplers); `BEHIND` marks the step that failed and why.",
        "",
    ]
    for i, rnd in enumerate(report["rounds"], 1):
        for name, res in rnd.items():
            if "steps" not in res:
                lines.append(f"- round {i}, {name}: failed: {res.get('error', '?')}")
                continue
            cells = []
            for st in res["steps"]:
                mark = "" if st["ok"] else f" BEHIND ({st['why']})"
                cells.append(
                    f"{st['rate'] / 1000:.0f}k: {st['achieved'] / 1000:.1f}k "
                    f"{st['cpu_share']:.2f}/{st['feed_cpu_share']:.2f}"
                    f"/{st.get('harness_cpu_share', float('nan')):.2f}{mark}"
                )
            lines.append(f"- round {i}, {name}: " + "; ".join(cells))
    micro = report.get("micro") or []
    if micro:
        lines += ["", "### Micro-benchmarks", ""]
        for mb in micro:
            if mb.get("missing"):
                lines.append(f"- `bench/{mb['script']}`: not present in this checkout")
                continue
            lines += [
                f"`python bench/{' '.join([mb['script'], *mb.get('args', [])])}` "
                f"(exit {mb['rc']}, {mb['seconds']:.0f} s):",
                "",
                "```text",
                *mb["output"].splitlines()[-40:],
                "```",
                "",
            ]
    lines += ["", END]
    return "\n".join(lines)


_SKELETON = """# Benchmarks

How fast and how cheap market-streamer is, measured side by side with the limit of
Python's WebSocket stack and with the earlier design, on one machine, in one run.
Reproduce with `make bench` (`python bench/run.py`; `--quick` for a smoke check).
See `docs/benchmarks.md` for what each subject does and how each figure is measured.

## Results

{results}
"""


def write_markdown(path: Path, section: str) -> None:
    """Replace the generated section of ``path`` (creating the file if needed)."""
    if path.exists():
        text = path.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + section + tail)
            return
        path.write_text(text.rstrip() + "\n\n## Results\n\n" + section + "\n")
        return
    path.write_text(_SKELETON.format(results=section))


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def estimate_seconds(plan: Plan) -> float:
    """A rough wall-time estimate of ``plan`` (for ``--dry-run`` and the budget note)."""
    per_subject = {
        # start, readiness and stop; the 20k step; the ramp as far as each usually gets.
        "bare": 8 + plan.measure_s + 1 + len(plan.ramp) * (plan.step_s + 0.8),
        "baseline": 12 + plan.measure_s + 1 + 3 * (plan.step_s + 0.8),
        "collector": 15
        + plan.measure_s
        + 1
        + min(len(plan.ramp), 6) * (plan.step_s + 0.8)
        + plan.sigterm_hold_s
        + 5,
    }
    per_subject[BEFORE] = per_subject["collector"]
    rounds = plan.runs * sum(per_subject.get(n, 30) for n in plan.labels())
    collectors = 2 if plan.compare else 1
    full = collectors * (plan.full_s + 40) if plan.full else 0
    micro = (20 if plan.quick else 60) if plan.micro else 0
    setup = 90 if plan.compare else 0
    replay = collectors * max(1, plan.runs) * 9 if plan.replay else 0
    return setup + micro + rounds + full + replay


def describe(plan: Plan, compare_rev: str | None = None) -> str:
    """What a run of ``plan`` would do (``--dry-run``)."""
    out = [
        f"plan: {'quick smoke check' if plan.quick else 'full run'}, "
        f"{plan.runs} round(s) on {plan.symbols} symbols, feed {plan.feed}",
    ]
    if plan.compare:
        out.append(
            f"compare: {compare_rev or plan.compare} = commit {plan.compare[:12]} "
            "(temporary git worktree + its own venv, pip install -e)"
        )
    for i in range(plan.runs):
        out.append(f"round {i + 1}: {', '.join(plan.order(i))}")
    out.append(
        f"each subject: {plan.measure_rate / 1000:.0f}k msg/s for {plan.measure_s:.0f} s, then "
        f"ramp {', '.join(f'{r / 1000:g}k' for r in plan.ramp)} ({plan.step_s:.1f} s each); "
        f"collectors: {plan.sigterm_hold_s:.0f} s at the sustained rate, then SIGTERM"
    )
    if plan.full:
        n = 2 if plan.compare else 1
        out.append(
            f"full market: {plan.full_symbols} symbols, {plan.full_s:.0f} s at "
            f"{plan.base_rate / 1000:.0f}k msg/s, {plan.burst_s:.0f} s bursts at "
            f"{plan.burst_rate / 1000:.0f}k every {plan.burst_every:.0f} s, x{n}"
        )
    if plan.replay:
        n = 2 if plan.compare else 1
        out.append(
            f"real traffic: {CAPTURE} (USD-M BTCUSDT depth@0ms) replayed flat out through "
            f"streamer sim, depth + orderbook + aggtrade to CSV, {max(1, plan.runs)} run(s) x{n}"
        )
    out.append(f"micro-benchmarks: {', '.join(MICRO) if plan.micro else 'skipped'}")
    out.append("targets:")
    for t in evaluate_targets({"median": {}, "ratios": {}}, None, asdict(plan), "collector"):
        out.append(f"  {t.label:40s} {t.goal}")
    out.append(
        f"estimated wall time: {estimate_seconds(plan) / 60:.1f} min "
        f"(budget {plan.budget_s / 60:.0f} min)"
    )
    return "\n".join(out)


class CompareError(RuntimeError):
    """``--compare``: the revision cannot be resolved or installed."""


def resolve_rev(rev: str) -> str:
    """The full commit id of ``rev`` in this repository (:class:`CompareError` if none)."""
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    sha = proc.stdout.strip()
    if proc.returncode != 0 or not sha:
        raise CompareError(f"--compare: no commit {rev!r} in this repository")
    return sha


def prepare_before(sha: str, workdir: Path, log: Any) -> tuple[Path, Path]:
    """Check ``sha`` out in a temporary worktree and install it in its own venv.

    Returns ``(worktree, streamer executable)``. The pip cache is shared with every other
    install (no ``--no-cache-dir``), so this takes a minute, not a download.
    """
    tree = workdir / f"before-{sha[:12]}"
    log(f"compare: git worktree add {tree} {sha[:12]}")
    proc = subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), sha],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise CompareError(f"git worktree add failed: {proc.stderr.strip()}")
    venv = tree / ".venv"
    t0 = time.monotonic()
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", str(tree)],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise CompareError(f"{' '.join(cmd[:4])}... failed: {tail}")
    streamer = venv / "bin" / "streamer"
    if not streamer.exists():
        raise CompareError(f"{sha[:12]} installed no 'streamer' command")
    log(f"compare: installed {sha[:12]} in {time.monotonic() - t0:.0f} s")
    return tree, streamer


def remove_worktree(tree: Path) -> None:
    """Remove a worktree made by :func:`prepare_before` (and its registration)."""
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(tree)], capture_output=True, cwd=ROOT
    )
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], capture_output=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description="market-streamer benchmark harness")
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 3 minutes)")
    ap.add_argument("--runs", type=int, help="rounds of the subjects (default 3)")
    ap.add_argument("--symbols", type=int, help="symbols on the mix (default 100)")
    ap.add_argument("--only", help="comma-separated subjects: bare,baseline,collector")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    ap.add_argument("--no-full", action="store_true", help="skip the full-market case")
    ap.add_argument("--no-replay", action="store_true", help="skip the real-traffic replay case")
    ap.add_argument(
        "--feed",
        choices=("sim", "own"),
        default="sim",
        help="sim: streamer.testing high-rate mode (default); own: bench/_feed.py",
    )
    ap.add_argument("--book-interval", help="orderbook snapshot interval (default 1s)")
    ap.add_argument("--workers", type=int, help="collector worker processes (default: auto)")
    ap.add_argument("--full-seconds", type=float, help="length of the full-market case")
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="also measure the collector of git revision REV (before) in the same rounds",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print the plan and the targets; run nothing"
    )
    ap.add_argument("--output", type=Path, help="markdown file to update")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--profile",
        type=float,
        metavar="RATE",
        help="only cProfile the collector's processes at RATE msg/s and print the report",
    )
    args = ap.parse_args(argv)

    plan = Plan.quick_plan() if args.quick else Plan()
    if args.runs is not None:
        if args.runs < 0:
            ap.error("--runs must be >= 0")
        plan.runs = args.runs
    if args.symbols is not None:
        if args.symbols < 1:
            ap.error("--symbols must be >= 1")
        plan.symbols = args.symbols
    if args.only:
        plan.subjects = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(plan.subjects) - set(SUBJECTS)
        if unknown:
            ap.error(f"unknown subject(s): {', '.join(sorted(unknown))}")
    if args.full_seconds:
        plan.full_s = args.full_seconds
    if args.workers is not None:
        plan.workers = args.workers
    plan.feed = args.feed
    if args.book_interval:
        plan.book_interval = args.book_interval
    plan.micro = not args.no_micro
    plan.full = not args.no_full
    plan.replay = not args.no_replay
    if args.compare:
        try:
            plan.compare = resolve_rev(args.compare)
        except CompareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if "collector" not in plan.subjects:
            print("error: --compare needs the collector among the subjects", file=sys.stderr)
            return 2
        # Two collectors per round and two full-market cases: more time, same full case.
        plan.budget_s = 2 * plan.budget_s
    if args.dry_run:
        print(describe(plan, args.compare))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="streamer-bench-"))
    output = args.output or (workdir / "BENCHMARKS.md" if plan.quick else ROOT / "BENCHMARKS.md")
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    report: dict[str, Any] = {
        "machine": machine(),
        "plan": asdict(plan),
        "load_before": _loadavg(),
        "rounds": [],
    }
    if args.compare:
        report["compare_rev"] = args.compare
    log(f"work directory {workdir}; load {report['load_before']}")
    if args.profile:
        print(profile_collector(plan, workdir, args.profile, plan.measure_s * 2, log))
        return 0
    status = 0
    tree: Path | None = None
    try:
        if plan.compare:
            try:
                tree, streamer = prepare_before(plan.compare, workdir, log)
            except CompareError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            plan.before_streamer = str(streamer)
            report["plan"] = asdict(plan)
        if plan.micro:
            log("micro-benchmarks")
            report["micro"] = run_micro(plan.quick, log)
        status = run_rounds(plan, workdir, log, report)
        if plan.replay:
            log(f"real traffic: {CAPTURE} replayed flat out")
            report["replay_by_label"] = run_replay(plan, workdir, log)
            if any("error" in r for r in report["replay_by_label"].values()):
                status = 1
        if plan.full:
            labels = ["collector"]
            if plan.compare:
                labels = [BEFORE, "collector"]
            report["full_by_label"] = {}
            for i, label in enumerate(labels):
                log(f"full market ({label}): {plan.full_symbols} symbols for {plan.full_s:.0f} s")
                # Leave the later full-market runs their share of what is left.
                left = len(labels) - i
                deadline = time.monotonic() + (t_start + plan.budget_s - time.monotonic()) / left
                try:
                    full = full_market(plan, workdir, log, deadline, label)
                except Exception as exc:
                    log(f"  full market FAILED: {exc}")
                    full = {"symbols": plan.full_symbols, "subject": label, "error": str(exc)}
                    status = 1
                report["full_by_label"][label] = full
            report["full"] = report["full_by_label"].get("collector")
    finally:
        if tree is not None and not args.keep:
            remove_worktree(tree)
        report["load_after"] = _loadavg()
        report["wall_s"] = time.monotonic() - t_start
        report["summary"] = summarize(report["rounds"])
        json_path = args.json or workdir / "results.json"
        json_path.write_text(json.dumps(report, indent=1, default=str))
        if report["rounds"] or report.get("full") or report.get("replay_by_label"):
            write_markdown(output, render(report))
        print_summary(report, output, json_path)
        if not args.keep and not plan.quick:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def run_rounds(plan: Plan, workdir: Path, log: Any, report: dict[str, Any]) -> int:
    """The rounds on the mix, appended to ``report["rounds"]``; returns the exit status."""
    status = 0
    if not plan.runs:
        return status
    feed = FeedProcess(plan.symbols, workdir, plan.feed)
    try:
        for i in range(plan.runs):
            log(f"round {i + 1}/{plan.runs} on {plan.symbols} symbols")
            rnd: dict[str, Any] = {}
            for name in plan.order(i):
                for attempt in (1, 2):
                    try:
                        rnd[name] = measure_subject(name, feed, plan, workdir, log)
                        break
                    except NotReady as exc:
                        log(f"  {name}: {exc}")
                        if attempt == 2:
                            rnd[name] = {"subject": name, "error": str(exc)}
                            status = 1
                            break
                        # Once, on a fresh feed: a run must not be lost to one bad start.
                        log(f"  {name}: retrying on a fresh feed")
                        feed.stop()
                        feed = FeedProcess(plan.symbols, workdir, plan.feed)
                    except Exception as exc:  # a failed subject must not lose the others
                        log(f"  {name}: FAILED: {exc}")
                        rnd[name] = {"subject": name, "error": str(exc)}
                        status = 1
                        break
            report["rounds"].append(rnd)
    finally:
        feed.stop()
    return status


def print_summary(report: dict[str, Any], output: Path, json_path: Path) -> None:
    """A few lines on stdout: the medians, then every target with met / MISSED."""
    med = report["summary"]["median"]
    ratios = report["summary"]["ratios"]
    compare = report["plan"].get("compare")
    print("\n== market-streamer benchmark summary ==")
    for name, x in med.items():
        print(
            f"{name:16s} sustained {_f(x['sustained']):>7} msg/s on disk "
            f"(read {_f(x.get('sustained_read', float('nan'))):>7})  "
            f"CPU {_f(x['cpu_per_m'], '.1f'):>5} s/M msgs  "
            f"row landed p99 {_f(x.get('landed_p99', float('nan'))):>5} ms  "
            f"RSS {_mib(x['peak_rss'])}"
        )
    print(
        f"collector/baseline {_f(ratios['collector_vs_baseline_sustained'], '.2f', 'x')}, "
        f"collector/bare {_f(ratios['collector_vs_bare_sustained'], '.0%')}"
    )
    for label, full in full_results(report).items():
        if "cpu_share" in full:
            print(
                f"full market {label} ({full['symbols']} symbols): "
                f"{full['average_rate']:.0f} msg/s avg, {full['cpu_share']:.2f} cores, "
                f"RSS {_mib(full['peak_rss'])}, PSS {_mib(full.get('peak_pss', float('nan')))}"
            )
    for label, r in (report.get("replay_by_label") or {}).items():
        if "rate" in r:
            print(f"replay {label}: {r['rate']:.0f} msg/s, {r['cpu_per_m']:.1f} CPU-s per M msgs")
    rows = target_table(report)
    print("\n== targets (issue 12) ==")
    if compare:
        print(f"{'target':42s} {'goal':20s} {'before':>9s} {'after':>9s} {'ratio':>7s}  met")
        for a, b in rows:
            print(
                f"{a.label:42s} {a.goal:20s} {b.shown() if b else 'n/a':>9s} {a.shown():>9s} "
                f"{_ratio(a, b):>7s}  {a.verdict()}"
            )
    else:
        print(f"{'target':42s} {'goal':20s} {'measured':>9s}  met")
        for a, _ in rows:
            print(f"{a.label:42s} {a.goal:20s} {a.shown():>9s}  {a.verdict()}")
    print(f"report: {output}\nraw results: {json_path}")


if __name__ == "__main__":
    sys.exit(main())
