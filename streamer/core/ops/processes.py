"""Process identity from ``/proc``: is a pid alive, when did it start, what is it running.

Shared by the daemon commands (which signal only a process proven to be theirs) and the
status view (which flags a collector whose pid is gone).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start ticks)`` of ``pid`` from ``/proc``, or None when unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None (no such process / no /proc)."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_cmdline(pid: int) -> list[str]:
    """Arguments of ``pid`` from ``/proc``, decoded as ``sys.argv`` is (empty when
    unavailable, e.g. a zombie or no ``/proc``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    if not raw:
        return []
    # NUL-terminated arguments; an empty argument is kept as "".
    return [os.fsdecode(part) for part in raw.removesuffix(b"\0").split(b"\0")]


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``start_ticks``."""
    if pid <= 0:
        return False
    # Reap it if it happens to be our own child (tests, ``restart`` in one process).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return start_ticks is None or not Path("/proc/self/stat").exists()
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    return start_ticks is None or ticks == start_ticks


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies: look for a live member.
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


# -- pidfile ---------------------------------------------------------------------------------
