"""Sinks that fail on purpose, loaded by spawned writers through ``--plugin-module``.

* ``broken``: its ``open`` raises, as a sink whose storage is gone would.
* ``csvfail``: the CSV sink, except that writes to aggTrades files fail with EACCES while
  a file named ``<path>.fail`` exists (marker files keep working).
"""

from __future__ import annotations

import errno
import os

import msgspec

from streamer.core.api import Sink
from streamer.core.hookspecs import hookimpl
from streamer.plugins.sinks._csv_files import FileIO
from streamer.plugins.sinks.csv_batch import CsvSink


class BrokenOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str = ""


class BrokenSink(Sink):
    Options = BrokenOptions

    async def open(self) -> None:
        raise OSError(errno.EIO, "Input/output error", self.options.path)

    async def write(self, batch) -> None:
        raise AssertionError("never opened")

    async def flush(self) -> None:
        pass


class _FlagIO(FileIO):
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def open(self, path: str) -> int:
        if "aggTrades" in path and os.path.exists(self.flag):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return super().open(path)

    def write(self, fd: int, data: bytes) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "aggTrades" in name and os.path.exists(self.flag):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        super().write(fd, data)


class FailingCsvSink(CsvSink):
    def __init__(self, options, context) -> None:
        super().__init__(options, context, io=_FlagIO(os.path.abspath(options.path) + ".fail"))


@hookimpl
def register_sinks(register):
    register("broken", BrokenSink)
    register("csvfail", FailingCsvSink)
