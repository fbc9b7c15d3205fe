"""Start-up checks and exclusive locks for the paths sinks write (see :class:`~streamer.Sink`).

:func:`check_sinks` runs every configured sink's ``check`` classmethod and collects what
each ``claims``; ``streamer config check`` and the supervisor both call it, so they agree
on every message. :class:`PathLocks` is held by the supervisor for the whole run: one
``flock`` per claimed directory on a ``.streamer.lock`` file inside it, recording who holds
it. The kernel drops the lock when the process dies (even by SIGKILL), so a lock is never
stale; the file left behind is only read for the message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Mapping

import msgspec

LOCK_NAME = ".streamer.lock"

log = logging.getLogger("streamer.supervisor")


def check_sinks(sinks: Mapping[str, tuple[str, msgspec.Struct]], registry) -> dict[str, list[str]]:
    """Check every sink; return the absolute paths each one claims.

    ``sinks`` maps a sink instance name to (type name, validated options), as
    ``validate_components`` returns them. Raises ``ValueError`` with one line naming the
    sink (``sinks.<name>: ...``) for the first problem, and when two sinks claim one path.
    """
    claimed: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in sorted(sinks):
        type_name, options = sinks[name]
        sink_cls = registry.sink(type_name)
        try:
            sink_cls.check(options)
            paths = [os.path.abspath(p) for p in sink_cls.claims(options)]
        except ValueError as exc:
            raise ValueError(f"sinks.{name}: {exc}") from None
        for path in paths:
            real = os.path.realpath(path)
            other = owner.setdefault(real, name)
            if other != name:
                raise ValueError(
                    f"sinks.{other} and sinks.{name} both write {path}; give each sink its own path"
                )
        claimed[name] = paths
    return claimed


class _Held:
    __slots__ = ("fd", "identity", "path", "sink")

    def __init__(self, sink: str, path: str, fd: int) -> None:
        self.sink = sink
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)


class PathLocks:
    """Exclusive OS locks on the directories sinks claim, held by one process."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._held: list[_Held] = []
        self._warned: set[str] = set()

    def acquire(self, claims: Mapping[str, list[str]]) -> None:
        """Create and lock every claimed directory, or raise ``ValueError`` (one line)
        naming the collector that holds it; nothing stays locked after a refusal."""
        try:
            for sink, paths in sorted(claims.items()):
                for path in paths:
                    self._held.append(_Held(sink, path, self._lock(sink, path)))
        except BaseException:
            self.release()
            raise

    def _lock(self, sink: str, path: str) -> int:
        lock_path = os.path.join(path, LOCK_NAME)
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ValueError(f"sinks.{sink}: cannot use {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"sinks.{sink}: cannot lock {lock_path}: {exc}") from None
            raise ValueError(f"{path} is in use by {_holder(lock_path)}") from None
        info = LockHolder(pid=os.getpid(), state_dir=self.state_dir, started=self.started)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, msgspec.json.encode(info) + b"\n", 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, the message says less
        return fd

    def refresh(self) -> None:
        """Lock again any lock file removed under us (say, the data dir was deleted), so a
        second collector started afterwards is still refused. Cheap: one stat per path."""
        for held in self._held:
            try:
                st = os.stat(os.path.join(held.path, LOCK_NAME))
                if (st.st_dev, st.st_ino) == held.identity:
                    continue
            except OSError:
                pass
            try:
                fd = self._lock(held.sink, held.path)
            except ValueError as exc:
                if held.path not in self._warned:
                    self._warned.add(held.path)
                    log.error("lock file of %s was removed and cannot be restored: %s",
                              held.path, exc)  # fmt: skip
                continue
            os.close(held.fd)
            held.fd = fd
            st = os.fstat(fd)
            held.identity = (st.st_dev, st.st_ino)
            self._warned.discard(held.path)
            log.warning("lock file of %s was removed; locked it again", held.path)

    def release(self) -> None:
        """Drop every lock (the files stay: removing one would race a new holder)."""
        held, self._held = self._held, []
        for h in held:
            with contextlib.suppress(OSError):
                os.close(h.fd)

    @property
    def paths(self) -> list[str]:
        """The directories locked now."""
        return [h.path for h in self._held]


class LockHolder(msgspec.Struct):
    """What a lock file records about the collector holding it."""

    pid: int
    state_dir: str
    started: str


_holder_decoder = msgspec.json.Decoder(LockHolder)


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path, "rb") as f:
            info = _holder_decoder.decode(f.read(4096))
        return f"pid {info.pid} (state dir {info.state_dir}, since {info.started})"
    except (OSError, msgspec.DecodeError):
        return "another collector (its pid is not recorded yet)"
