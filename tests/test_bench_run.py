"""``bench/run.py`` (``make bench``): its plan, targets, report and row accounting.

These run nothing long: ``--dry-run`` plans a run without starting a process, and the
pieces that turn samples into figures are fed made-up samples.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# bench/ is a folder of scripts, not a package: load by path (run.py puts bench/ on sys.path
# for its own imports, so _tail is importable by name once it is loaded).
run = _load("bench_run", BENCH / "run.py")
tail = sys.modules["_tail"]

TARGET_LABELS = [
    "mix: sustained, rows on disk",
    "mix: CPU per M msgs (tree)",
    "mix: vs seed-style baseline",
    "mix: vs bare websockets receiver",
    "mix: row p99 at 20k (receive to file)",
    "mix: SIGTERM at sustained rate",
    "full: average CPU",
    "full: summed RSS (peak, MB)",
    "full: summed PSS (peak, MB)",
    "full: row p99 outside bursts",
    "full: row p99 inside bursts",
    "full: records overflowed",
    "real traffic: USD-M BTCUSDT replay",
    "real traffic: replay CPU per M msgs (tree)",
]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "run.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


# --------------------------------------------------------------------------- planning


def test_dry_run_plans_the_default_run_and_lists_every_target():
    proc = _bench("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in TARGET_LABELS:
        assert label in out
    assert "round 3: " in out
    assert "full market: 2000 symbols" in out
    assert "real traffic: usdm_btcusdt_20240808.gz" in out and "flat out" in out
    minutes = float(out.split("estimated wall time: ")[1].split()[0])
    assert minutes <= 12.5  # the default `make bench` stays within its budget


def test_dry_run_quick_compare_resolves_the_revision_without_running():
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    proc = _bench("--quick", "--dry-run", "--compare", "HEAD")
    assert proc.returncode == 0, proc.stderr
    assert f"commit {head[:12]}" in proc.stdout
    assert "round 1: bare, collector, baseline, collector@before" in proc.stdout
    assert "x2" in proc.stdout  # a full-market case for each revision


def test_compare_with_an_unknown_revision_is_one_error_line():
    proc = _bench("--dry-run", "--compare", "no-such-revision-xyz")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --compare: no commit 'no-such-revision-xyz' in this repository"
    ]


def test_compare_rounds_alternate_before_and_after():
    plan = run.Plan(compare="0" * 40)
    firsts = []
    for i in range(plan.runs):
        order = plan.order(i)
        assert sorted(order) == sorted(["bare", "baseline", "collector", run.BEFORE])
        firsts.append(order.index("collector") < order.index(run.BEFORE))
    assert True in firsts and False in firsts
    # Only the collector runs twice; without --compare it runs once.
    assert run.Plan().labels() == ("bare", "baseline", "collector")


# --------------------------------------------------------------------------- row accounting


def test_landing_rate_groups_a_flush_spread_over_several_polls():
    # A writer flushing once a second at 1000 rows/s; each flush is seen over two polls.
    samples = [(0.0, 0)]
    rows = 0
    for k in range(1, 6):
        rows += 400
        samples.append((k + 0.00, rows))
        rows += 600
        samples.append((k + 0.05, rows))
    assert tail.landing_rate(samples, 0.5, 5.5) == 1000.0
    # A window holding a single flush cannot tell a rate.
    assert tail.landing_rate(samples, 1.5, 2.5) != tail.landing_rate(samples, 1.5, 2.5)


def test_landing_rate_of_continuous_appends():
    samples = [(0.0, 0)] + [(i * 0.1, i * 50) for i in range(1, 40)]
    assert abs(tail.landing_rate(samples, 0.5, 3.5) - 500.0) < 1e-6


def test_row_counter_counts_rows_of_every_file_not_headers_or_torn_lines(tmp_path: Path):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a = tmp_path / "A" / "2026-01-01.csv"
    a.write_bytes(b"id,price\n1,2\n2,3\n3,")
    counter = tail.RowCounter(str(tmp_path / "*" / "*.csv"))
    try:
        assert counter.poll() == 2
        with a.open("ab") as fh:
            fh.write(b"4\n4,5\n")
        (tmp_path / "B" / "2026-01-01.csv").write_bytes(b"7,8\n")  # no header
        assert counter.poll() == 3
        assert counter.rows == 5
        assert counter.poll() == 0
    finally:
        counter.close()


def test_tailer_takes_the_landing_time_from_the_file_mtime(tmp_path: Path):
    folder = tmp_path / "S0000USDT"
    folder.mkdir()
    path = folder / "x.csv"
    # columns as the collector's aggTrades: event_time 8, receive_time 9
    path.write_bytes(
        b"h0,h1,h2,h3,h4,h5,h6,h7,event_time,receive_time\n1,2,3,4,5,6,7,8,1000,1250\n"
    )
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))  # mtime 2000 ms
    tailer = tail.CsvTailer(str(tmp_path / "*" / "*.csv"), 8, 9)
    tailer.stop()  # never started: one poll
    [sample] = tailer.samples
    assert (sample.event, sample.received, sample.landed) == (1000, 250, 750)
    assert tailer.by_event(1000, 1001) == [sample]
    assert tailer.by_event(0, 1000) == []


def test_rows_of_events_during_or_just_after_a_burst_are_inside_it():
    rows = [tail.Sample(0, 0, 0, 0, e) for e in (500, 1000, 1500, 3000 + run.BURST_TAIL_MS, 9000)]
    inside, outside = run.split_bursts(rows, [(1000, 3000)])
    assert [r.event for r in inside] == [1000, 1500]
    assert [r.event for r in outside] == [500, 3000 + run.BURST_TAIL_MS, 9000]


# --------------------------------------------------------------------------- report


def _round(collector: dict, before: dict | None = None) -> dict:
    def subject(sustained, cpu, landed=300.0, sig=None):
        res = {
            "sustained": sustained,
            "sustained_ok": True,
            "steps": [],
            "peak_rss": 100 * 2**20,
            "at_measure": {
                "cpu_per_m": cpu,
                "cpu_share": 0.5,
                "recv_p50": 1,
                "recv_p99": 2,
                "written_p50": 200,
                "written_p99": 900,
                "landed_p50": 150,
                "landed_p99": landed,
            },
        }
        if sig is not None:
            res["sigterm"] = sig
        return res

    rnd = {
        "bare": subject(200_000, 7.0),
        "baseline": subject(10_000, 100.0),
        "collector": subject(**collector),
    }
    if before is not None:
        rnd[run.BEFORE] = subject(**before)
    return rnd


def _full(cpu, rss, outside, inside, overflow):
    return {
        "symbols": 2000,
        "cpu_share": cpu,
        "peak_rss": rss,
        "peak_pss": rss * 0.9,
        "outside_p99": outside,
        "burst_written_p99": inside,
        "counters": {"records_overflowed": overflow},
        "average_rate": 15_000,
        "seconds": 120,
    }


def _plan(compare: str | None = None) -> dict:
    from dataclasses import asdict

    return asdict(run.Plan(compare=compare))


def test_targets_are_met_or_missed_from_the_measured_figures():
    ok_sig = {"ok": True, "seconds": 3.0, "exit_code": 0}
    bad_sig = {"ok": False, "seconds": 30.0, "exit_code": None}
    good = run.summarize([_round({"sustained": 80_000, "cpu": 18.0, "sig": ok_sig})])
    bad = run.summarize(
        [_round({"sustained": 30_000, "cpu": 45.0, "landed": 1500, "sig": bad_sig})]
    )
    met = {
        t.label: t.verdict()
        for t in run.evaluate_targets(good, _full(0.5, 600e6, 1500, 4000, 0), _plan(), "collector")
    }
    missed = {
        t.label: t.verdict()
        for t in run.evaluate_targets(bad, _full(1.3, 2.4e9, 15e3, 38e3, 9), _plan(), "collector")
    }
    judged = [label for label in TARGET_LABELS if met[label] in ("met", "MISSED")]
    assert len(judged) == 10
    assert all(met[label] == "met" for label in judged)
    assert all(missed[label] == "MISSED" for label in judged)
    assert met["mix: vs seed-style baseline"] == "met"  # 80k / 10k = 8x
    # Nothing measured: no verdict either way.
    empty = run.evaluate_targets({"median": {}, "ratios": {}}, None, _plan(), "collector")
    assert {t.verdict() for t in empty} <= {
        "n/a",
        "info",
        "not measured",
    }


def test_replay_figures_reach_the_targets_and_the_report():
    replay = {
        "events": 6551,
        "levels": 443521,
        "runs": [{"rate": 5000.0}],
        "rate": 5000.0,
        "levels_rate": 338_000.0,
        "seconds": 1.31,
        "cpu_s": 1.2,
        "cpu_per_m": 183.2,
        "peak_rss": 200e6,
    }
    targets = {
        t.label: t
        for t in run.evaluate_targets(
            {"median": {}, "ratios": {}}, None, _plan(), "collector", replay
        )
    }
    assert targets["real traffic: USD-M BTCUSDT replay"].shown() == "5000"
    assert targets["real traffic: replay CPU per M msgs (tree)"].shown() == "183.2"
    report = {
        "machine": run.machine(),
        "plan": _plan("a" * 40),
        "load_before": "0",
        "load_after": "0",
        "wall_s": 60,
        "rounds": [],
        "summary": run.summarize([]),
        "replay_by_label": {"collector": replay, run.BEFORE: {**replay, "rate": 2500.0}},
    }
    section = run.render(report)
    assert "| real traffic: USD-M BTCUSDT replay | msg/s (reported) | 2500 | 5000 | 2.00x |" in (
        section
    )
    assert "| collector | 1/1 | 5000 | 338000 |" in section


def test_compare_report_shows_before_after_and_keeps_the_profile_section(tmp_path: Path):
    sha = "a" * 40
    rounds = [
        _round({"sustained": 75_000, "cpu": 19.0}, {"sustained": 30_000, "cpu": 45.0}),
        _round({"sustained": 70_000, "cpu": 20.0}, {"sustained": 25_000, "cpu": 50.0}),
    ]
    summary = run.summarize(rounds)
    assert summary["ratios"]["after_vs_before_sustained"] == (75 / 30 + 70 / 25) / 2
    assert summary["ratios"]["collector@before_vs_baseline_sustained"] == 2.75
    report = {
        "machine": run.machine(),
        "plan": _plan(sha),
        "compare_rev": "main",
        "load_before": "0",
        "load_after": "0",
        "wall_s": 60,
        "rounds": rounds,
        "summary": summary,
        "full_by_label": {
            "collector": _full(0.5, 600e6, 1500, 4000, 0),
            run.BEFORE: _full(1.3, 2.4e9, 15e3, 38e3, 9),
        },
    }
    section = run.render(report)
    assert "| target | goal | before | after | after / before | met (after) |" in section
    assert "| mix: sustained, rows on disk | >= 70000 msg/s | 27500 | 72500 | 2.64x | met |" in (
        section
    )
    assert "| full: records overflowed | 0 | 9 | 0 | 0.00x | met |" in section
    assert "### Full market: 2000 symbols, collector@before" in section
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        f"# Benchmarks\n\n{run.START}\nold\n{run.END}\n\n## Where the time goes\n\nkept\n"
    )
    run.write_markdown(md, section)
    text = md.read_text()
    assert "old" not in text
    assert text.endswith(f"{run.END}\n\n## Where the time goes\n\nkept\n")
    assert text.count(run.START) == 1


def test_tree_sampler_rescans_the_machine_only_every_few_samples(monkeypatch):
    proc = sys.modules["_proc"]
    scans = []
    real = proc.descendants

    def counting(root):
        scans.append(root)
        return real(root)

    monkeypatch.setattr(proc, "descendants", counting)
    sampler = proc.TreeSampler(os.getpid(), rescan_every=3)
    for _ in range(6):
        sampler._sample()
    assert len(scans) == 2
    usage = sampler.usage()
    assert usage.processes >= 1 and usage.samples == 6 and usage.peak_rss > 0
