"""Operations commands: ``daemon start|stop|status|restart``, ``status``, ``health``,
``metrics``. :func:`add_commands` adds them to the ``streamer`` typer app.

Every command finds the state directory by the one rule of
:func:`streamer.core.config.resolve_state_dir`: ``--state-dir``, else the
``runtime.state_dir`` of ``--config``, else ``$STREAMER_STATE_DIR``, else ``.streamer``
(relative paths are relative to the current directory), exactly as ``streamer run`` does.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated

import anyio
import msgspec
import typer

from ..config import DEFAULT_STATE_DIR, STATE_DIR_ENV, resolve_state_dir
from . import daemon as d
from .health import check_health, render_report
from .status_view import (
    StatusError,
    StatusHistory,
    Thresholds,
    build_view,
    read_document,
    render_json,
    render_summary,
    render_table,
    sample,
)

__all__ = ["DEFAULT_STATE_DIR", "STATE_DIR_ENV", "add_commands"]
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory (default: runtime.state_dir of --config, else "
        "$STREAMER_STATE_DIR, else .streamer).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration (to find its state dir)."),
]
SilentOpt = Annotated[
    float, typer.Option(help="Flag a stream silent after this many seconds without data.")
]
LagOpt = Annotated[
    float, typer.Option(help="Flag a stream lagging when its last event is this old (s).")
]
ResyncOpt = Annotated[
    float, typer.Option(help="Flag an order book stuck in resync after this many seconds.")
]
StaleOpt = Annotated[float, typer.Option(help="Status older than this many seconds is down.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _load(config: Path):
    """The parsed ``--config`` file (bad input: one ``error:`` line, exit code 2)."""
    from ..config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _state_dir(state_dir: Path | None, config: Path | None) -> Path:
    """Flag > config > ``$STREAMER_STATE_DIR`` > ``.streamer``, as ``streamer run`` resolves it."""
    return resolve_state_dir(state_dir, _load(config) if config else None)


def _paths(
    state_dir: Path | None,
    config: Path | None,
    pidfile: Path | None = None,
    log_file: Path | None = None,
) -> d.DaemonPaths:
    return d.DaemonPaths.for_state_dir(
        _state_dir(state_dir, config), pidfile=pidfile, log_file=log_file
    )


def _thresholds(silent: float, lag: float, resync: float, stale: float) -> Thresholds:
    return Thresholds(silent_after=silent, lag_after=lag, resync_after=resync, stale_after=stale)


# -- daemon ----------------------------------------------------------------------------------
def _start_args(
    state_dir: Path | None, config: Path | None, forwarded: list[str]
) -> tuple[d.DaemonPaths, list[str]]:
    """Where the run will publish, and the ``streamer run`` arguments to get it there.

    The state directory is resolved here (same rule as ``run``) and passed on as an
    absolute ``--state-dir``, so the run publishes exactly where this command (and a later
    ``restart`` from another directory or environment) looks.
    """
    paths = d.DaemonPaths.for_state_dir(_state_dir(state_dir, config))
    run_args = (["--config", str(config)] if config else []) + forwarded
    return paths, [*run_args, "--state-dir", str(paths.state_dir)]


StoreOpt = Annotated[
    bool,
    typer.Option("--store", help="Start 'streamer store' (a storage node) instead of 'run'."),
]


def _argv(store: bool, run_args: list[str] | None) -> list[str] | None:
    return d.default_run_argv(run_args or [], "store") if store else None


def _echo_start(result: d.StartResult) -> None:
    if result.recovered_stale:
        typer.echo(result.recovered_stale)
    if result.ready:
        typer.echo(result.message)
    else:
        # The collector refused to start: its own one line says why, as `run` would.
        typer.echo(f"error: {result.error or result.message}", err=True)
        raise typer.Exit(1)


def _daemon_start(
    ctx: typer.Context,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    pidfile: Annotated[
        Path | None, typer.Option(help="Pidfile (default: STATE_DIR/streamer.pid).")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Log file (default: STATE_DIR/streamer.log).")
    ] = None,
    log_max_bytes: Annotated[
        int, typer.Option(help="Rotate the log at this size (0: never).")
    ] = d.DEFAULT_MAX_BYTES,
    log_backups: Annotated[
        int, typer.Option(help="Rotated log files to keep.")
    ] = d.DEFAULT_BACKUPS,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for every child to run (0: don't wait).")
    ] = d.DEFAULT_START_WAIT,
    store: StoreOpt = False,
) -> None:
    """Start 'streamer run' in the background; other options are passed to 'streamer run'
    (with --store: 'streamer store', a storage node).

    Returns once every child process reports running, or prints why not (with the end of
    the log) and exits 1. Refuses to start twice for one state directory.
    """
    paths, run_args = _start_args(state_dir, config, list(ctx.args))
    paths = d.DaemonPaths.for_state_dir(paths.state_dir, pidfile=pidfile, log_file=log_file)
    try:
        extra = {"argv": _argv(store, run_args)} if store else {}
        result = d.start(
            paths,
            run_args,
            wait=wait,
            log_max_bytes=log_max_bytes,
            log_backups=log_backups,
            **extra,
        )
    except d.DaemonError as exc:
        raise _fail(str(exc)) from None
    _echo_start(result)


def _stop_timeout(paths: d.DaemonPaths) -> float:
    """The run's own shutdown_timeout plus a margin, when its config can be found."""
    info = d.read_pidfile(paths.pidfile)
    argv = info.argv if info else []
    if "--config" in argv[:-1]:
        config = Path(argv[argv.index("--config") + 1])
        if not config.is_absolute() and info and info.cwd:
            config = Path(info.cwd) / config
        with contextlib.suppress(typer.Exit):
            return _load(config).runtime.shutdown_timeout + 15.0
    return d.DEFAULT_STOP_TIMEOUT


def _daemon_stop(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    pidfile: Annotated[
        Path | None, typer.Option(help="Pidfile (default: STATE_DIR/streamer.pid).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for a clean drain before killing "
            "(default: shutdown_timeout + 15)."
        ),
    ] = None,
) -> None:
    """Stop the background collector: SIGTERM, wait for the drain, kill after the timeout.

    Exit code 0 after a clean stop or when it was not running, 1 when it had to be killed.
    """
    paths = _paths(state_dir, config, pidfile)
    try:
        result = d.stop(paths, timeout=timeout if timeout is not None else _stop_timeout(paths))
    except d.DaemonError as exc:
        raise _fail(str(exc)) from None
    typer.echo(result.message)
    if result.outcome == "stopped":
        with contextlib.suppress(StatusError):
            typer.echo(_final_line(build_view(read_document(paths.status_file), check_pid=False)))
    if result.outcome == "forced":
        raise typer.Exit(1)


def _final_line(view) -> str:
    """What the last status says about the run that just ended."""
    written = ", ".join(
        f"{s.name} {s.written} written/{'-' if s.flushed is None else s.flushed} flushed"
        for s in view.sinks
    )
    messages = sum(p.messages for p in view.pipelines)
    ended = "exit code " + ("?" if view.exit_code is None else str(view.exit_code))
    if view.state != "stopped":
        ended = f"last status says {view.state!r}"
    return f"final: {messages} records produced; {written or 'no sink'}; {ended}"


def _daemon_status(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    pidfile: Annotated[
        Path | None, typer.Option(help="Pidfile (default: STATE_DIR/streamer.pid).")
    ] = None,
) -> None:
    """Is the background collector running? Exit codes as LSB init scripts:
    0 running, 1 dead but the pidfile exists, 3 not running, 4 unknown (the pidfile names
    a live process that cannot be proven to be the collector)."""
    paths = _paths(state_dir, config, pidfile)
    state = d.check(paths)
    if state.state == "stopped":
        typer.echo(f"not running (no pidfile {paths.pidfile})")
        raise typer.Exit(3)
    if state.state == "stale":
        typer.echo(f"dead: {state.reason}; stale pidfile {paths.pidfile}")
        raise typer.Exit(1)
    if state.state == "foreign":
        typer.echo(f"unknown: {state.reason} (pidfile {paths.pidfile})")
        raise typer.Exit(4)
    assert state.info is not None
    up = time.time() - state.info.started if state.info.started else 0.0
    typer.echo(f"running: pid {state.info.pid}, up {up:.0f}s, log {state.info.log_file}")
    try:
        view = build_view(read_document(paths.status_file))
        typer.echo(render_summary(view))
        for problem in view.problems:
            typer.echo(f"  - {problem}")
    except StatusError as exc:
        typer.echo(f"no status yet: {exc}")


def _daemon_restart(
    ctx: typer.Context,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop timeout (default: shutdown_timeout + 15).")
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for every child to run.")
    ] = d.DEFAULT_START_WAIT,
    store: StoreOpt = False,
) -> None:
    """Stop and start again. Without run options the previous command line is reused."""
    forwarded = list(ctx.args)
    if config or forwarded:
        paths, run_args = _start_args(state_dir, config, forwarded)
    else:
        paths, run_args = _paths(state_dir, None), None
    try:
        extra = {"argv": _argv(store, run_args)} if store and run_args is not None else {}
        stopped, started = d.restart(
            paths,
            run_args,
            stop_timeout=timeout if timeout is not None else _stop_timeout(paths),
            wait=wait,
            **extra,
        )
    except d.DaemonError as exc:
        raise _fail(str(exc)) from None
    typer.echo(stopped.message)
    _echo_start(started)


# -- status / health / metrics ---------------------------------------------------------------
def _status(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch).")] = 2.0,
    count: Annotated[
        int, typer.Option(help="With --watch: stop after N refreshes (0: never).")
    ] = 0,
    window: Annotated[
        float, typer.Option(help="Seconds to wait for a second publication to measure rates.")
    ] = 1.5,
    silent_after: SilentOpt = 60.0,
    lag_after: LagOpt = 10.0,
    resync_after: ResyncOpt = 60.0,
    stale_after: StaleOpt = 15.0,
) -> None:
    """Show what the running collector publishes: pipelines, sinks, streams, processes.

    Flags streams that are silent, lagging or stuck in resync. Exit code 1 when there is
    no status to show.
    """
    paths = _paths(state_dir, config)
    th = _thresholds(silent_after, lag_after, resync_after, stale_after)
    if not watch:
        try:
            view = sample(paths.status_file, window=window, thresholds=th)
        except StatusError as exc:
            raise _fail(str(exc)) from None
        typer.echo(render_json(view) if json_out else render_table(view))
        return
    _watch(paths, th, json_out, interval, count)


def _watch(paths: d.DaemonPaths, th: Thresholds, json_out: bool, interval: float, count: int):
    history = StatusHistory()
    prev = None
    shown = 0
    tty = sys.stdout.isatty()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            try:
                doc = read_document(paths.status_file)
                view = build_view(doc, prev=prev, thresholds=th, history=history)
                prev = doc
                text = render_json(view).replace("\n", "") if json_out else render_table(view)
            except StatusError as exc:
                text = (
                    msgspec.json.encode({"health": "down", "problems": [str(exc)]}).decode()
                    if json_out
                    else f"waiting: {exc}"
                )
            if tty and not json_out:
                sys.stdout.write("\x1b[H\x1b[2J")
            typer.echo(text)
            shown += 1
            if count and shown >= count:
                return
            time.sleep(interval)


def _health(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    window: Annotated[
        float, typer.Option(help="Seconds to wait for a second publication (rates).")
    ] = 1.5,
    silent_after: SilentOpt = 60.0,
    lag_after: LagOpt = 10.0,
    resync_after: ResyncOpt = 60.0,
    stale_after: StaleOpt = 15.0,
) -> None:
    """Exit 0 when healthy, 1 when degraded, 2 when down (for systemd or containers)."""
    paths = _paths(state_dir, config)
    th = _thresholds(silent_after, lag_after, resync_after, stale_after)
    report = check_health(paths.status_file, thresholds=th, window=window)
    typer.echo(msgspec.json.encode(report).decode() if json_out else render_report(report))
    raise typer.Exit(report.code)


def _metrics(
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    port: Annotated[
        int, typer.Option(help="TCP port (default: runtime.metrics_port, else 9108).")
    ] = 0,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve /metrics (Prometheus text) from the status file until Ctrl-C."""
    from .prometheus import file_source, serve_metrics

    paths = _paths(state_dir, config)
    if not port and config:
        port = _load(config).runtime.metrics_port
    port = port or 9108
    typer.echo(f"serving http://{host}:{port}/metrics from {paths.status_file}", err=True)
    try:
        anyio.run(serve_metrics, file_source(paths.status_file), port, host)
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    except KeyboardInterrupt:
        return


def add_commands(app: typer.Typer) -> None:
    """Add ``daemon start|stop|status|restart``, ``status``, ``health`` and ``metrics``."""
    daemon_app = typer.Typer(
        help="Run the collector in the background (pidfile, rotated log).", no_args_is_help=True
    )
    daemon_app.command("start", context_settings=_EXTRA)(_daemon_start)
    daemon_app.command("stop")(_daemon_stop)
    daemon_app.command("status")(_daemon_status)
    daemon_app.command("restart", context_settings=_EXTRA)(_daemon_restart)
    app.add_typer(daemon_app, name="daemon")
    app.command("status")(_status)
    app.command("health")(_health)
    app.command("metrics")(_metrics)
