"""Test plugins for the monitoring tests: a CSV sink whose disk can be made "full".

``full_csv`` is the real CSV sink with its system calls replaced: while the file
``<path>.full`` exists every write fails with ``ENOSPC``, as on a full disk. Spawned
writers import this module through ``STREAMER_PLUGIN_MODULES`` (the tests directory is on
their ``sys.path``).
"""

from __future__ import annotations

import errno
import os

from streamer import hookimpl
from streamer.plugins.sinks import _csv_files as files
from streamer.plugins.sinks.csv_batch import CsvSink


class _DiskFullIO(files.FileIO):
    def __init__(self, flag: str) -> None:
        self._flag = flag

    def write(self, fd: int, data: bytes) -> None:
        if os.path.exists(self._flag):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(fd, data)


class DiskFullCsvSink(CsvSink):
    """The CSV sink on a disk that is full while ``<path>.full`` exists."""

    def __init__(self, options, context) -> None:
        super().__init__(options, context, io=_DiskFullIO(options.path.rstrip("/") + ".full"))


@hookimpl
def register_sinks(register):
    register("full_csv", DiskFullCsvSink)
