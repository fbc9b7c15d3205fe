"""Running ``streamer run`` in the background: pidfile, start, stop, restart, state.

Layout under the state directory (each path can be overridden)::

    <state_dir>/streamer.pid    pidfile (JSON, see :class:`PidInfo`)
    <state_dir>/streamer.log    combined output of the collector and its children, rotated
    <state_dir>/status.json     published by the runtime every ``status_interval`` seconds
    <state_dir>/daemon.lock     held while a start or stop is in progress

Start spawns the collector with ``start_new_session=True`` (its own session and process
group, no controlling terminal), its output piped into a separate log pump
(:mod:`streamer.core.ops.logfile`) that rotates the log by size and outlives the collector
until every child has closed its output. The pidfile records the pid, the process start
time (``/proc/<pid>/stat`` field 22) and the command line, so a pidfile left by a crash is
recognised as stale even after the pid was reused by an unrelated process.

Stop sends SIGTERM to the supervisor (which drains, flushes and exits 0), waits up to a
timeout, then SIGKILLs the whole process group and reports that it had to. It signals only
a process proven to be the collector it started: same start time *and* same command line.
A pidfile naming anything else (a bare pid written by hand, pid 1, a live process whose
command differs) is refused with one line and left in place; one naming a dead or reused
pid is stale, reported and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from .logfile import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, pump_command
from .processes import group_alive, pid_alive, process_cmdline, process_start_ticks
from .status_view import StatusError, load_status

PIDFILE_NAME = "streamer.pid"
LOGFILE_NAME = "streamer.log"
STATUS_NAME = "status.json"
LOCK_NAME = "daemon.lock"
#: Copy of the last started pidfile, kept after stop so ``restart`` knows the command.
LAST_START_NAME = "daemon.last.json"

#: Seconds ``start`` waits for the collector to report all children running.
DEFAULT_START_WAIT = 60.0
#: Seconds ``stop`` waits for a graceful drain before killing the process group.
DEFAULT_STOP_TIMEOUT = 30.0
_POLL = 0.1


class DaemonError(Exception):
    """A daemon command cannot proceed; the message says why and what to do."""


class PidInfo(msgspec.Struct, kw_only=True):
    """What the pidfile holds about the running collector."""

    pid: int
    #: Process start time in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    #: ``None`` where ``/proc`` is unavailable.
    start_ticks: int | None = None
    #: Wall-clock time of the start, seconds since the epoch.
    started: float = 0.0
    #: The command that was started (``restart`` reuses it).
    argv: list[str] = msgspec.field(default_factory=list)
    cwd: str = ""
    log_file: str = ""
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_backups: int = DEFAULT_BACKUPS
    #: The log pump's pid (informational; it exits by itself).
    pump_pid: int = 0


class DaemonPaths(msgspec.Struct, kw_only=True):
    """Where a daemon keeps its files; build with :meth:`for_state_dir`."""

    state_dir: Path
    pidfile: Path
    log_file: Path
    status_file: Path

    @classmethod
    def for_state_dir(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        pidfile: str | os.PathLike[str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> DaemonPaths:
        """Default file names under ``state_dir``; all paths are made absolute."""
        base = Path(state_dir).expanduser().absolute()
        return cls(
            state_dir=base,
            pidfile=Path(pidfile).expanduser().absolute() if pidfile else base / PIDFILE_NAME,
            log_file=Path(log_file).expanduser().absolute() if log_file else base / LOGFILE_NAME,
            status_file=base / STATUS_NAME,
        )


State = Literal["running", "stale", "stopped", "foreign"]


class DaemonState(msgspec.Struct, kw_only=True):
    """Outcome of :func:`check`: ``running`` (the pidfile's process is proven ours),
    ``stale`` (its process is gone or the pid now belongs to a later process), ``foreign``
    (a live process that cannot be proven ours: never signalled) or ``stopped`` (no
    pidfile). ``reason`` explains a stale or foreign verdict."""

    state: State
    info: PidInfo | None = None
    reason: str = ""


class StartResult(msgspec.Struct, kw_only=True):
    """Outcome of :func:`start`. ``ready`` is False when the collector did not come up in
    time (it may still be running: see ``running``); ``message`` is for the operator.

    ``error``: when the collector exited during start-up, the one line it printed as
    ``error: ...`` in this start's output (without the prefix; "" when there is none, e.g.
    it crashed or was killed): the refusal ``streamer run`` would print in a terminal.
    """

    pid: int
    ready: bool
    running: bool
    message: str
    recovered_stale: str = ""
    error: str = ""


class StopResult(msgspec.Struct, kw_only=True):
    """Outcome of :func:`stop`: ``stopped`` (graceful), ``forced`` (killed after the
    timeout) or ``not-running``; ``seconds`` is how long the stop took."""

    outcome: Literal["stopped", "forced", "not-running"]
    pid: int = 0
    seconds: float = 0.0
    message: str = ""


# -- /proc helpers ---------------------------------------------------------------------------
def read_pidfile(path: Path) -> PidInfo | None:
    """The pidfile's content; None when absent. A corrupt file raises :class:`DaemonError`
    only if it cannot be read at all; unparsable content yields a pid of 0 (stale)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DaemonError(f"cannot read pidfile {path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(raw, type=PidInfo)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # A bare pid (written by hand or by another tool) is still useful.
        text = raw.decode(errors="replace").strip()
        return PidInfo(pid=int(text)) if text.isdigit() else PidInfo(pid=0)


def write_pidfile(path: Path, info: PidInfo) -> None:
    """Write the pidfile atomically (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(info) + b"\n")
    os.replace(tmp, path)


def check(paths: DaemonPaths) -> DaemonState:
    """Is the daemon of ``paths`` running? Never modifies anything."""
    info = read_pidfile(paths.pidfile)
    if info is None:
        return DaemonState(state="stopped")
    if info.pid <= 0:
        return DaemonState(state="stale", info=info, reason="the pidfile is unreadable")
    if not pid_alive(info.pid):
        return DaemonState(state="stale", info=info, reason=f"pid {info.pid} is not running")
    state, reason = identify(info)
    return DaemonState(state=state, info=info, reason=reason)


def identify(info: PidInfo) -> tuple[State, str]:
    """Is the live process ``info.pid`` the one this pidfile was written for?

    ``running`` only when both its start time and its command line match what the pidfile
    recorded; ``stale`` when the start time differs (the pid was reused); ``foreign`` for
    anything that cannot be proven ours (a bare pid, pid 1, a different command, no
    ``/proc``). ``foreign`` processes are never signalled.
    """
    pid = info.pid
    if pid <= 1:
        return "foreign", f"pid {pid} is the init process, never a collector"
    if info.start_ticks is None:
        return "foreign", (
            f"pid {pid} is alive but the pidfile does not record its start time, so it "
            "cannot be proven to be the collector"
        )
    ticks = process_start_ticks(pid)
    if ticks is None:
        return "foreign", f"cannot read /proc/{pid}/stat to prove pid {pid} is the collector"
    if ticks != info.start_ticks:
        return "stale", f"pid {pid} now belongs to another process (start time differs)"
    cmdline = process_cmdline(pid)
    if not info.argv:
        return "foreign", f"the pidfile records no command line to prove pid {pid} is ours"
    if cmdline != info.argv:
        shown = " ".join(cmdline)[:80] or "an unreadable command line"
        return "foreign", f"pid {pid} runs {shown!r}, not the command the pidfile recorded"
    return "running", ""


def _still_ours(info: PidInfo) -> bool:
    return pid_alive(info.pid, info.start_ticks) and identify(info)[0] == "running"


def _refusal(paths: DaemonPaths, state: DaemonState) -> DaemonError:
    return DaemonError(
        f"refusing to signal: {state.reason}; remove {paths.pidfile} if no collector runs"
    )


@contextlib.contextmanager
def _locked(paths: DaemonPaths) -> Iterator[None]:
    """Serialise start/stop of one state directory across processes."""
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.state_dir / LOCK_NAME, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise DaemonError(
                f"another 'streamer daemon' command is working on {paths.state_dir}; retry"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of ``path`` ("" when missing); reads at most 64 KiB."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def default_run_argv(run_args: Sequence[str], command: str = "run") -> list[str]:
    """The command that runs ``streamer run RUN_ARGS`` (or ``streamer store RUN_ARGS``, a
    storage node: same state directory, status and shutdown) with this interpreter."""
    return [sys.executable, "-m", "streamer", command, *run_args]


ReadyCheck = Callable[[DaemonPaths, int, float], tuple[bool, str]]


def status_ready(paths: DaemonPaths, pid: int, since: float) -> tuple[bool, str]:
    """Default readiness: a status document newer than ``since`` from ``pid`` in which
    every child process is running. Returns ``(ready, what is missing)``."""

    try:
        view = load_status(paths.status_file)
    except StatusError as exc:
        return False, str(exc)
    if view.published and view.published < since - 1.0:
        return False, "status.json is left over from an earlier run"
    if view.pid and view.pid != pid:
        return False, f"status.json was written by pid {view.pid}, not {pid}"
    if not view.children:
        return False, "no child process reported yet"
    waiting = [c.name for c in view.children if c.state != "running"]
    if waiting:
        return False, "children not running yet: " + ", ".join(waiting)
    return True, ""


def _foreground_collector(paths: DaemonPaths) -> int:
    """Pid of a live collector publishing to this state dir outside the daemon, else 0."""

    try:
        view = load_status(paths.status_file)
    except StatusError:
        return 0
    if not view.pid or view.pid == os.getpid() or not pid_alive(view.pid):
        return 0
    cmdline = process_cmdline(view.pid)
    # A reused pid of some unrelated program does not count.
    if not cmdline or any("streamer" in part for part in cmdline):
        return view.pid
    return 0


def start(
    paths: DaemonPaths,
    run_args: Sequence[str] = (),
    *,
    argv: Sequence[str] | None = None,
    wait: float = DEFAULT_START_WAIT,
    log_max_bytes: int = DEFAULT_MAX_BYTES,
    log_backups: int = DEFAULT_BACKUPS,
    ready: ReadyCheck = status_ready,
    env: dict[str, str] | None = None,
) -> StartResult:
    """Start the collector in the background and wait until ``ready`` says it is up.

    ``argv`` is the full command (default: ``streamer run RUN_ARGS`` with this interpreter).
    Raises :class:`DaemonError` when one is already running for the state directory (a
    stale pidfile is replaced and reported in ``recovered_stale``). When the collector exits
    during start-up, or is not ready after ``wait`` seconds, the result has ``ready=False``
    and a message ending with the tail of its log. ``wait <= 0`` returns right after
    spawning.
    """
    command = list(argv) if argv is not None else default_run_argv(run_args)
    with _locked(paths):
        current = check(paths)
        recovered = ""
        if current.state == "running":
            assert current.info is not None
            raise DaemonError(
                f"already running: pid {current.info.pid} since "
                f"{_fmt_time(current.info.started)} (state dir {paths.state_dir}); "
                "use 'streamer daemon stop' or 'streamer daemon restart'"
            )
        if current.state == "foreign":
            raise DaemonError(
                f"the pidfile {paths.pidfile} names a live process that is not a collector "
                f"started here ({current.reason}); remove it if no collector runs"
            )
        if current.state == "stale":
            recovered = f"removed a stale pidfile {paths.pidfile}: {current.reason}"
            paths.pidfile.unlink(missing_ok=True)
        other = _foreground_collector(paths)
        if other:
            raise DaemonError(
                f"a collector (pid {other}) is already running for state dir "
                f"{paths.state_dir} outside the daemon; stop it first"
            )
        paths.log_file.parent.mkdir(parents=True, exist_ok=True)
        log_start = _log_position(paths.log_file)
        since = time.time()
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        child_env["STREAMER_DAEMON"] = "1"
        pump = subprocess.Popen(
            pump_command(paths.log_file, log_max_bytes, log_backups),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip
        assert pump.stdin is not None
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=pump.stdin,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=child_env,
            )
        except OSError as exc:
            pump.stdin.close()
            raise DaemonError(f"cannot start {command[0]}: {exc.strerror}") from None
        finally:
            # Only the collector (and its children) hold the pipe now: EOF ends the pump.
            pump.stdin.close()
        info = PidInfo(
            pid=proc.pid,
            start_ticks=process_start_ticks(proc.pid),
            started=since,
            argv=command,
            cwd=os.getcwd(),
            log_file=str(paths.log_file),
            log_max_bytes=log_max_bytes,
            log_backups=log_backups,
            pump_pid=pump.pid,
        )
        write_pidfile(paths.pidfile, info)
        write_pidfile(paths.state_dir / LAST_START_NAME, info)
    return _await_ready(paths, proc, pump, since, wait, ready, recovered, log_start)


def _await_ready(paths, proc, pump, since, wait, ready, recovered, log_start) -> StartResult:
    if wait <= 0:
        return StartResult(
            pid=proc.pid, ready=False, running=True, message=f"started pid {proc.pid}",
            recovered_stale=recovered,
        )  # fmt: skip
    deadline = time.monotonic() + wait
    why = "no status published yet"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pump.wait(timeout=3)
            paths.pidfile.unlink(missing_ok=True)
            return StartResult(
                pid=proc.pid,
                ready=False,
                running=False,
                message=_with_log(
                    f"the collector exited with code {code} during start-up", paths.log_file
                ),
                recovered_stale=recovered,
                error=_collector_error(paths.log_file, log_start),
            )
        ok, why = ready(paths, proc.pid, since)
        if ok:
            return StartResult(
                pid=proc.pid,
                ready=True,
                running=True,
                message=f"started pid {proc.pid}; log {paths.log_file}",
                recovered_stale=recovered,
            )
        time.sleep(_POLL)
    return StartResult(
        pid=proc.pid,
        ready=False,
        running=True,
        message=_with_log(
            f"pid {proc.pid} is running but not ready after {wait:g}s ({why}); "
            "see 'streamer daemon status' or stop it with 'streamer daemon stop'",
            paths.log_file,
        ),
        recovered_stale=recovered,
    )


def _log_position(path: Path) -> tuple[int, int]:
    """``(inode, size)`` of the log before a start ((0, 0) when missing): where this
    start's output begins."""
    try:
        st = path.stat()
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


#: A log record at ERROR or above, as the runtime formats them (``LOG_FORMAT``):
#: ``<date> <time> <process> ERROR <logger>: <message>``.
_LOGGED_ERROR = re.compile(r"^\S+ \S+ \S+ (?:ERROR|CRITICAL) [\w.]+: (.+)$")


def _collector_error(path: Path, start: tuple[int, int]) -> str:
    """Why the collector refused to start, from what it wrote since ``start``: its last
    ``error: ...`` line (the CLI's refusal, without the prefix), else its last ERROR log
    record's message (a sink that could not open is logged by the supervisor), else "".
    A log rotated meanwhile (another inode, or shorter) is read whole."""
    inode, offset = start
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            if st.st_ino != inode or st.st_size < offset:
                offset = 0
            handle.seek(max(offset, st.st_size - 65536))
            data = handle.read(65536)
    except OSError:
        return ""
    lines = data.decode(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :].strip()
    for line in reversed(lines):
        match = _LOGGED_ERROR.match(line)
        if match:
            return match[1].strip()
    return ""


def _with_log(message: str, log_file: Path) -> str:
    lines = tail(log_file)
    if not lines:
        return f"{message}; the log {log_file} is empty"
    return f"{message}; last lines of {log_file}:\n{lines}"


def _fmt_time(epoch: float) -> str:
    if not epoch:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _wait_dead(pid: int, ticks: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, ticks):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def stop(paths: DaemonPaths, *, timeout: float = DEFAULT_STOP_TIMEOUT) -> StopResult:
    """SIGTERM the collector, wait up to ``timeout`` seconds, then SIGKILL its process group.

    Only a process proven to be the collector (:func:`identify`) is signalled; anything
    else raises :class:`DaemonError` and leaves the pidfile alone. The pidfile is removed
    in every other case. Children left in the process group after the supervisor exited
    are killed too (and said so in the message).
    """
    began = time.monotonic()
    with _locked(paths):
        current = check(paths)
        if current.state == "foreign":
            raise _refusal(paths, current)
        if current.state != "running":
            message = "not running"
            if current.state == "stale":
                paths.pidfile.unlink(missing_ok=True)
                message = f"not running (removed a stale pidfile: {current.reason})"
            return StopResult(outcome="not-running", message=message)
        info = current.info
        assert info is not None
        pid, ticks = info.pid, info.start_ticks
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        graceful = _wait_dead(pid, ticks, timeout)
        notes = []
        if not graceful:
            # Proven ours a moment ago; prove it again right before the SIGKILL.
            if _still_ours(info):
                _kill_group(pid)
            _wait_dead(pid, ticks, 5.0)
            notes.append(f"did not exit within {timeout:g}s: killed its process group")
        elif group_alive(pid):
            # The supervisor is gone but some child of it is not: give it a moment. While
            # a member lives, its group id cannot be handed to a new process.
            deadline = time.monotonic() + 3.0
            while group_alive(pid) and time.monotonic() < deadline:
                time.sleep(_POLL)
            if group_alive(pid):
                _kill_group(pid)
                notes.append("killed children left behind by the supervisor")
        paths.pidfile.unlink(missing_ok=True)
    seconds = time.monotonic() - began
    outcome: Literal["stopped", "forced"] = "stopped" if graceful else "forced"
    message = f"{'stopped' if graceful else 'forced stop of'} pid {pid} in {seconds:.1f}s"
    if notes:
        message += " (" + "; ".join(notes) + ")"
    return StopResult(outcome=outcome, pid=pid, seconds=seconds, message=message)


def _kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid``: never group 0/1 nor the caller's own group."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def restart(
    paths: DaemonPaths,
    run_args: Sequence[str] | None = None,
    *,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    **start_options,
) -> tuple[StopResult, StartResult]:
    """Stop (if running) and start again. Without ``run_args`` the command line of the last
    start (pidfile, else ``daemon.last.json``) is reused with its log settings."""
    previous = read_pidfile(paths.pidfile) or read_pidfile(paths.state_dir / LAST_START_NAME)
    stopped = stop(paths, timeout=stop_timeout)
    if run_args is None and "argv" not in start_options:
        if previous is None or not previous.argv:
            raise DaemonError(
                f"no previous command line recorded in {paths.pidfile}; "
                "use 'streamer daemon start' with run options"
            )
        start_options["argv"] = previous.argv
        start_options.setdefault("log_max_bytes", previous.log_max_bytes)
        start_options.setdefault("log_backups", previous.log_backups)
    started = start(paths, run_args or (), **start_options)
    return stopped, started
