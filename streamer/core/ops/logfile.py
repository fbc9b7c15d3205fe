"""Size-based log rotation for a long-running collector.

Two ways in:

* :func:`redirect_to_log` points this process's stdout and stderr (and so those of every
  child it starts afterwards) into a pipe read by a separate pump process that writes
  ``PATH`` and rotates it by size. This is what ``streamer run --log-file PATH`` should
  call: with several processes writing, only one of them may rotate the file, and a
  :class:`logging.handlers.RotatingFileHandler` per process would race.
* :class:`RotatingWriter` + :func:`pump` are that pump (``python -m
  streamer.core.ops.logfile PATH`` runs it on standard input); the daemon starts one too.
  The log then rotates even for output that never goes through :mod:`logging` (tracebacks
  of a dying child, warnings printed by libraries) and even when the supervisor is killed.
* :func:`setup_file_logging` installs a :class:`logging.handlers.RotatingFileHandler` on
  the root logger, for single-process tools.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

#: Rotate the daemon log when it reaches this size ...
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: ... keeping this many old files (``streamer.log.1`` is the newest).
DEFAULT_BACKUPS = 5

#: Format of file logs: one grep-able line per event, time in UTC.
FILE_LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"


def setup_file_logging(
    path: str | os.PathLike[str],
    *,
    level: int = logging.INFO,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
) -> logging.Handler:
    """Send the root logger to ``path``, rotated at ``max_bytes`` keeping ``backups`` files.

    Creates the parent directory. Returns the installed handler (remove it to undo).
    ``max_bytes <= 0`` disables rotation (for an external logrotate with copytruncate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max(0, max_bytes), backupCount=max(0, backups), encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter(FILE_LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return handler


def pump_command(path: str | os.PathLike[str], max_bytes: int, backups: int) -> list[str]:
    """The command line of a log pump writing ``path``."""
    return [
        sys.executable, "-m", "streamer.core.ops.logfile", str(path),
        "--max-bytes", str(max_bytes), "--backups", str(backups),
    ]  # fmt: skip


def redirect_to_log(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
) -> subprocess.Popen[bytes]:
    """Send file descriptors 1 and 2 of this process to a rotated log at ``path``.

    Starts the pump in its own session (a Ctrl-C or a kill of this process group does not
    stop it; it exits when the last writer closes the pipe) and returns it. Children started
    afterwards inherit the redirection, so every process of a run shares one log.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pump_process = subprocess.Popen(
        pump_command(path, max_bytes, backups),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    assert pump_process.stdin is not None
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.dup2(pump_process.stdin.fileno(), 1)
    os.dup2(pump_process.stdin.fileno(), 2)
    pump_process.stdin.close()
    return pump_process


class RotatingWriter:
    """Appends bytes to ``path``; at ``max_bytes`` renames it ``path.1`` (older ones shift).

    Rotation happens only at a line boundary, so a line is never split across files. A
    single line longer than ``max_bytes`` is written whole. ``max_bytes <= 0`` never rotates.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - held open for life
        self._size = self._file.tell()
        self.rotations = 0

    def write(self, data: bytes) -> None:
        """Write ``data`` (any chunk of the stream), rotating between lines when full."""
        while data:
            if self.max_bytes <= 0 or self._size + len(data) <= self.max_bytes:
                self._put(data)
                return
            room = self.max_bytes - self._size
            cut = data.rfind(b"\n", 0, max(0, room)) + 1
            if cut == 0 and self._size == 0:
                # One line bigger than the whole file: keep it intact.
                cut = data.find(b"\n") + 1 or len(data)
            if cut:
                self._put(data[:cut])
                data = data[cut:]
            if data:
                self.rotate()

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def rotate(self) -> None:
        """Close the current file, shift ``path.N`` to ``path.N+1`` and start a new one."""
        self._file.close()
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def pump(source: BinaryIO, writer: RotatingWriter, chunk: int = 65536) -> None:
    """Copy ``source`` to ``writer`` until end of file (every writer of a pipe closed)."""
    read = getattr(source, "read1", source.read)
    while True:
        data = read(chunk)
        if not data:
            return
        writer.write(data)


def main(argv: list[str] | None = None) -> None:
    """``python -m streamer.core.ops.logfile PATH [--max-bytes N] [--backups N]``."""
    parser = argparse.ArgumentParser(description="Copy standard input to a size-rotated file.")
    parser.add_argument("path")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--backups", type=int, default=DEFAULT_BACKUPS)
    args = parser.parse_args(argv)
    # The collector's process group gets SIGINT from a terminal; the pump must outlive it
    # to record the shutdown, so it only ever stops at end of input.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = RotatingWriter(args.path, args.max_bytes, args.backups)
    try:
        pump(sys.stdin.buffer, writer)
    finally:
        writer.close()


if __name__ == "__main__":
    main()
