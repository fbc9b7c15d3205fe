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
#: Scripts run with ``--quick`` even in a full run, to keep ``make bench`` under 15 minutes.
MICRO_ALWAYS_QUICK = ("bench_decode.py",)
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
    #: Whole-run budget in seconds (``make bench`` must stay under 15 minutes): the
    #: full-market case is shortened (to no less than 30 s) when the rounds ran long.
    budget_s: float = 12 * 60

    @classmethod
    def quick_plan(cls) -> Plan:
        """A smoke check: one round, short steps, a small full-market case."""
        return cls(
            quick=True,
            runs=1,
            measure_s=3.0,
            step_s=1.5,
            ramp=(40_000, 60_000, 90_000, 130_000),
            full_symbols=400,
            full_s=16.0,
            burst_s=4.0,
            burst_every=10.0,
        )


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
    queues still absorb it).
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


def measure_subject(
    name: str, feed: FeedProcess, plan: Plan, workdir: Path, log: Any
) -> dict[str, Any]:
    """Start one subject on ``feed``, take the 20k step and the ramp, stop it."""
    if name == "collector":
        subject: Subject = CollectorSubject(
            feed, plan.symbols, workdir, workers=plan.workers, book_interval=plan.book_interval
        )
    else:
        subject = SUBJECTS[name](feed, plan.symbols, workdir)
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
        # Sustained = what the best passing step achieved. When no step passed, what the
        # measuring step achieved while overloaded (an upper bound, flagged as such).
        result["sustained"] = best.achieved if best else at.achieved
        result["sustained_ok"] = best is not None
        # Even the top of the ramp passed: the subject's limit is higher still.
        result["ramp_capped"] = upward and all(st.ok for st in steps)
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


def _step_line(s: Step) -> str:
    return (
        f"{s.achieved:8.0f}/s {'ok ' if s.ok else 'BEHIND'} cpu {s.cpu_share:.2f} "
        f"({s.cpu_per_m:.1f} s/M) feed {s.feed_cpu_share:.2f} harness {s.harness_cpu_share:.2f} "
        f"lag p50/p99 "
        f"{s.recv_p50:.0f}/{s.recv_p99:.0f} ms row {s.written_p50:.0f}/{s.written_p99:.0f} ms"
        + (f"  [{s.why}]" if s.why else "")
    )


def full_market(
    plan: Plan, workdir: Path, log: Any, deadline: float = float("inf")
) -> dict[str, Any]:
    """The collector on ``full_symbols`` symbols: base rate with periodic bursts.

    The measurement is cut short (to no less than 30 s) so that it ends 30 s before the
    monotonic ``deadline``, leaving time to stop the collector.
    """
    feed = FeedProcess(plan.full_symbols, workdir, plan.feed)
    subject = CollectorSubject(
        feed,
        plan.full_symbols,
        workdir / "full",
        workers=plan.workers,
        book_interval=plan.book_interval,
    )
    (workdir / "full").mkdir(exist_ok=True)
    result: dict[str, Any] = {"symbols": plan.full_symbols}
    sampler = None
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
                rate = want
            max_backlog = max(max_backlog, feed.stats()["backlog"])
            time.sleep(0.25)
        t1 = time.monotonic()
        s1 = feed.stats()
        usage = sampler.usage()
        feed.set_rate(0)
        delivered = s1["generated"] - s0["generated"]
        burst_written = [x for b0, b1 in bursts for x in subject.written(b0, b1 + 1.5)]
        written = subject.written(t0, t1)
        recv = subject.received(t0, t1)
        result.update(
            seconds=t1 - t0,
            average_rate=delivered / (t1 - t0),
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
            written_p50=percentile(written, 0.5),
            written_p99=percentile(written, 0.99),
            burst_written_p99=percentile(burst_written, 0.99),
            recv_p99=percentile(recv, 0.99),
            counters=subject.status(),
        )
        log(
            f"  full market {plan.full_symbols} symbols: {result['average_rate']:.0f}/s avg, "
            f"cpu {result['cpu_share']:.2f} cores, rss {usage.peak_rss / 2**20:.0f} MiB, "
            f"row p99 {result['written_p99']:.0f} ms (bursts {result['burst_written_p99']:.0f})"
        )
    finally:
        result["exit_code"] = subject.stop()
        if sampler is not None:
            sampler.stop()
            result["lifetime_peak_rss"] = sampler.lifetime_peak_rss
        result["bytes_written"] = dir_bytes(str(subject.out))
        shutil.rmtree(subject.out, ignore_errors=True)
        feed.stop()
    return result


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
            elif quick:
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
    """Medians per subject and medians of the per-round ratios."""
    med: dict[str, dict[str, float]] = {}
    names = sorted({n for r in rounds for n in r})
    for name in names:
        rs = [r[name] for r in rounds if name in r and "at_measure" in r[name]]
        if not rs:
            continue
        at = [r["at_measure"] for r in rs]
        med[name] = {
            "sustained": _median([r["sustained"] for r in rs]),
            "sustained_ok_runs": sum(1 for r in rs if r.get("sustained_ok")),
            "ramp_capped_runs": sum(1 for r in rs if r.get("ramp_capped")),
            "cpu_per_m": _median([a["cpu_per_m"] for a in at]),
            "cpu_share_at_measure": _median([a["cpu_share"] for a in at]),
            "recv_p50": _median([a["recv_p50"] for a in at]),
            "recv_p99": _median([a["recv_p99"] for a in at]),
            "written_p50": _median([a["written_p50"] for a in at]),
            "written_p99": _median([a["written_p99"] for a in at]),
            "peak_rss": _median([r["peak_rss"] for r in rs]),
            "bytes_written": _median([r.get("bytes_written", float("nan")) for r in rs]),
            "bytes_per_message": _median([r.get("bytes_per_message", float("nan")) for r in rs]),
            "runs": len(rs),
        }

    def ratio(a: str, b: str, key: str, invert: bool = False) -> float:
        values = []
        for r in rounds:
            if a in r and b in r and "at_measure" in r[a] and "at_measure" in r[b]:
                x = r[a][key] if key == "sustained" else r[a]["at_measure"][key]
                y = r[b][key] if key == "sustained" else r[b]["at_measure"][key]
                if x and y:
                    values.append(y / x if invert else x / y)
        return _median(values)

    ratios = {
        "collector_vs_baseline_sustained": ratio("collector", "baseline", "sustained"),
        "collector_vs_bare_sustained": ratio("collector", "bare", "sustained"),
        "baseline_cpu_per_m_vs_collector": ratio("collector", "baseline", "cpu_per_m", True),
    }
    return {"median": med, "ratios": ratios}


def _f(value: float, fmt: str = ".0f", unit: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:{fmt}}{unit}"


def _mib(value: float) -> str:
    return _f(value / 2**20, ".0f", " MiB") if value == value else "n/a"


def render(report: dict[str, Any]) -> str:
    """The generated part of BENCHMARKS.md."""
    m, plan = report["machine"], report["plan"]
    nan = float("nan")
    s = report["summary"]
    med, ratios = s["median"], s["ratios"]
    lines = [
        START,
        "<!-- Generated by `python bench/run.py`; edit the text outside these markers. -->",
        "",
        f"Measured {m['date']} at commit `{m['commit']}`: {m['nproc']} CPUs ({m['cpu']}), "
        f"{m['mem_gib']} GiB, Python {m['python']}, Linux {m['kernel']}. "
        f"Load average before/after: {report['load_before']} / {report['load_after']}. "
        f"Harness wall time {report['wall_s'] / 60:.1f} min"
        f"{' (--quick: smoke figures, not results)' if plan['quick'] else ''}.",
        "",
        f"### The mix, {plan['symbols']} symbols (medians of {plan['runs']} rounds)",
        "",
        f"Each round runs the three subjects one after the other on the same feed. "
        f"CPU and latency are taken at {plan['measure_rate'] / 1000:.0f}k msg/s held for "
        f"{plan['measure_s']:.0f} s; sustained is the highest ramp step "
        f"({plan['step_s']:.1f} s each) the subject kept up with.",
        "",
        "| subject | sustained msg/s | CPU s per M msgs | CPU (cores) | receive lag p50 / p99 "
        "| row written p50 / p99 | peak RSS (tree) | bytes written per message |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("bare", "baseline", "collector"):
        if name not in med:
            continue
        x = med[name]
        flag = "" if x.get("sustained_ok_runs", x["runs"]) == x["runs"] else " *"
        at_least = ">= " if x.get("ramp_capped_runs", 0) * 2 > x["runs"] else ""
        lines.append(
            f"| {name} | {at_least}{_f(x['sustained'])}{flag} | {_f(x['cpu_per_m'], '.1f')} "
            f"| {_f(x['cpu_share_at_measure'], '.2f')} "
            f"| {_f(x['recv_p50'])} / {_f(x['recv_p99'])} ms "
            f"| {_f(x['written_p50'])} / {_f(x['written_p99'])} ms "
            f"| {_mib(x['peak_rss'])} | {_f(x.get('bytes_per_message', float('nan')))} |"
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
            "the subject received while overloaded, an upper bound.",
        ]
    lines += [
        "",
        "Ratios (median of the per-round ratios): collector / baseline sustained "
        f"**{_f(ratios['collector_vs_baseline_sustained'], '.2f', 'x')}**; "
        f"collector / bare-receive limit **{_f(ratios['collector_vs_bare_sustained'], '.0%')}**;"
        " baseline CPU per message / collector CPU per message "
        f"**{_f(ratios['baseline_cpu_per_m_vs_collector'], '.2f', 'x')}**.",
        "",
    ]
    c = med.get("collector", {})
    full = report.get("full") or {}
    flush_ms = 1000
    targets = [
        ("sustained on the mix", ">= 60k msg/s", c.get("sustained"), lambda v: v >= 60_000, ""),
        (
            "vs baseline",
            ">= 4x",
            ratios["collector_vs_baseline_sustained"],
            lambda v: v >= 4,
            ".2f",
        ),
        (
            "vs bare receive",
            ">= 50%",
            ratios["collector_vs_bare_sustained"],
            lambda v: v >= 0.5,
            ".0%",
        ),
        ("CPU per M msgs", "< 25 s", c.get("cpu_per_m"), lambda v: v < 25, ".1f"),
        (
            f"row p99 at {plan['measure_rate'] / 1000:.0f}k msg/s",
            f"< flush interval + 50 = {flush_ms + 50} ms",
            c.get("written_p99"),
            lambda v: v < flush_ms + 50,
            "",
        ),
        (
            "full market CPU",
            "< 0.5 core",
            full.get("cpu_share"),
            lambda v: v < 0.5,
            ".2f",
        ),
        (
            "full market memory",
            "< 1 GB (RSS summed)",
            full.get("peak_rss", float("nan")) / 1e9 if full else None,
            lambda v: v < 1,
            ".2f",
        ),
    ]
    lines += ["| target | goal | measured | met |", "|---|---|---:|---|"]
    for label, goal, value, test, fmt in targets:
        if value is None or value != value:
            lines.append(f"| {label} | {goal} | n/a | not measured |")
            continue
        lines.append(
            f"| {label} | {goal} | {value:{fmt or '.0f'}} | {'yes' if test(value) else '**no**'} |"
        )
    if full.get("error"):
        lines += ["", "### Full market: failed", "", f"`{full['error']}`"]
    elif full:
        counters = full.get("counters") or {}
        sync = (
            ""
            if full.get("ready", True)
            else f" Not every book had synced when measuring began: {full.get('not_ready')}."
        )
        lines += [
            "",
            f"### Full market: {full['symbols']} symbols, collector only",
            "",
            f"{full.get('seconds', 0):.0f} s at {full.get('base_rate', 0) / 1000:.0f}k msg/s with "
            f"{full.get('bursts', 0)} bursts of {full.get('burst_s', 0):.0f} s at "
            f"{full.get('burst_rate', 0) / 1000:.0f}k msg/s (start-up and book sync excluded: "
            f"{_f(full.get('ready_s', float('nan')))} s).{sync}",
            "",
            "| average msg/s | CPU (cores) | CPU s per M | peak RSS (tree) | peak PSS | processes "
            "| max feed backlog | row p50 / p99 | row p99 in bursts | bytes written "
            "| records overflowed | backpressure waits |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            "| "
            + " | ".join(
                [
                    _f(full.get("average_rate", nan)),
                    _f(full.get("cpu_share", nan), ".2f"),
                    _f(full.get("cpu_per_m", nan), ".1f"),
                    _mib(full.get("peak_rss", nan)),
                    _mib(full.get("peak_pss", nan)),
                    str(full.get("processes", "n/a")),
                    str(full.get("max_backlog", "n/a")),
                    f"{_f(full.get('written_p50', nan))} / {_f(full.get('written_p99', nan))} ms",
                    f"{_f(full.get('burst_written_p99', nan))} ms",
                    _mib(full.get("bytes_written", nan)),
                    str(counters.get("records_overflowed", 0)),
                    f"{counters.get('backpressure_waits', 0)} "
                    f"({counters.get('backpressure_wait_ms', 0) / 1000:.0f} s)",
                ]
            )
            + " |",
        ]
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description="market-streamer benchmark harness")
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 2 minutes)")
    ap.add_argument("--runs", type=int, help="rounds of the three subjects (default 3)")
    ap.add_argument("--symbols", type=int, help="symbols on the mix (default 100)")
    ap.add_argument("--only", help="comma-separated subjects: bare,baseline,collector")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    ap.add_argument("--no-full", action="store_true", help="skip the full-market case")
    ap.add_argument(
        "--feed",
        choices=("sim", "own"),
        default="sim",
        help="sim: streamer.testing high-rate mode (default); own: bench/_feed.py",
    )
    ap.add_argument("--book-interval", help="orderbook snapshot interval (default 1s)")
    ap.add_argument("--workers", type=int, help="collector worker processes (default: auto)")
    ap.add_argument("--full-seconds", type=float, help="length of the full-market case")
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
        plan.runs = args.runs
    if args.symbols:
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
    log(f"work directory {workdir}; load {report['load_before']}")
    if args.profile:
        print(profile_collector(plan, workdir, args.profile, plan.measure_s * 2, log))
        return 0
    status = 0
    try:
        if plan.micro:
            log("micro-benchmarks")
            report["micro"] = run_micro(plan.quick, log)
        feed = FeedProcess(plan.symbols, workdir, plan.feed)
        try:
            for i in range(plan.runs):
                log(f"round {i + 1}/{plan.runs} on {plan.symbols} symbols")
                rnd: dict[str, Any] = {}
                # Rotate the order so no subject always runs on a warmer machine.
                order = list(plan.subjects[i % len(plan.subjects) :]) + list(
                    plan.subjects[: i % len(plan.subjects)]
                )
                for name in order:
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
        if plan.full:
            log(f"full market: {plan.full_symbols} symbols for {plan.full_s:.0f} s")
            try:
                deadline = t_start + plan.budget_s
                report["full"] = full_market(plan, workdir, log, deadline)
            except Exception as exc:
                log(f"  full market FAILED: {exc}")
                report["full"] = {"symbols": plan.full_symbols, "error": str(exc)}
                status = 1
    finally:
        report["load_after"] = _loadavg()
        report["wall_s"] = time.monotonic() - t_start
        report["summary"] = summarize(report["rounds"])
        json_path = args.json or workdir / "results.json"
        json_path.write_text(json.dumps(report, indent=1, default=str))
        if report["rounds"] or report.get("full"):
            write_markdown(output, render(report))
        print_summary(report, output, json_path)
        if not args.keep and not plan.quick:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def print_summary(report: dict[str, Any], output: Path, json_path: Path) -> None:
    """A few lines on stdout."""
    med = report["summary"]["median"]
    ratios = report["summary"]["ratios"]
    print("\n== market-streamer benchmark summary ==")
    for name, x in med.items():
        print(
            f"{name:9s} sustained {_f(x['sustained']):>7} msg/s  "
            f"CPU {_f(x['cpu_per_m'], '.1f'):>5} s/M msgs  "
            f"row p99 {_f(x['written_p99']):>5} ms  RSS {_mib(x['peak_rss'])}"
        )
    print(
        f"collector/baseline {_f(ratios['collector_vs_baseline_sustained'], '.2f', 'x')}, "
        f"collector/bare {_f(ratios['collector_vs_bare_sustained'], '.0%')}"
    )
    full = report.get("full") or {}
    if "cpu_share" in full:
        print(
            f"full market ({full['symbols']} symbols): {full['average_rate']:.0f} msg/s avg, "
            f"{full['cpu_share']:.2f} cores, peak RSS {_mib(full['peak_rss'])}"
        )
    print(f"report: {output}\nraw results: {json_path}")


if __name__ == "__main__":
    sys.exit(main())
