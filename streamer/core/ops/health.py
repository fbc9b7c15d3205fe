"""``streamer health``: one verdict and an exit code for systemd, Docker or Kubernetes.

Exit codes (stable; scripts depend on them):

====  =========  ==========================================================================
0     healthy    the collector publishes fresh status, every child runs, no stream flagged
1     degraded   running, but a child is down, restarted recently or unresponsive, a
                 stream is silent, lagging, behind or stuck in resync (thresholds follow
                 each stream's cadence), or a sink reports write errors or dropped rows or
                 stopped flushing while rows wait for it
2     down       no status, a stale status, a stopped collector or a dead supervisor
====  =========  ==========================================================================

(Typer itself exits with 2 on a usage error, which a health check also treats as down.)
"""

from __future__ import annotations

import os

import msgspec

from .status_view import StatusError, StatusView, Thresholds, sample

HEALTHY = 0
DEGRADED = 1
DOWN = 2

EXIT_CODES = {"healthy": HEALTHY, "degraded": DEGRADED, "down": DOWN}


class HealthReport(msgspec.Struct, kw_only=True):
    """The verdict, its exit code and the reasons behind it."""

    health: str
    code: int
    problems: list[str] = msgspec.field(default_factory=list)
    pid: int = 0
    age: float | None = None


def report_of(view: StatusView) -> HealthReport:
    """The health report of an already built view."""
    return HealthReport(
        health=view.health,
        code=EXIT_CODES[view.health],
        problems=list(view.problems),
        pid=view.pid,
        age=round(view.age, 3),
    )


def check_health(
    status_file: str | os.PathLike[str],
    *,
    thresholds: Thresholds | None = None,
    window: float = 1.5,
    check_pid: bool = True,
) -> HealthReport:
    """Read ``status_file`` (twice within ``window`` seconds, for rates) and judge it.

    Never raises for a missing or broken status: that is a ``down`` verdict with the reason.
    """
    try:
        view = sample(status_file, window=window, thresholds=thresholds, check_pid=check_pid)
    except StatusError as exc:
        return HealthReport(health="down", code=DOWN, problems=[str(exc)])
    return report_of(view)


def render_report(report: HealthReport) -> str:
    """``HEALTHY``/``DEGRADED``/``DOWN`` plus one line per problem."""
    head = report.health.upper()
    if report.pid:
        head += f" (pid {report.pid}, status {report.age or 0:.1f}s old)"
    return "\n".join([head, *(f"  - {p}" for p in report.problems)])
