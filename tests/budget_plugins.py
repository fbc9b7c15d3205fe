"""A CSV sink that writes slowly (``delay`` seconds per batch, 0.25 by default), loaded by
spawned writers: the simplest way to make a collector's buffer fill up against the simulator."""

from __future__ import annotations

import anyio

from streamer.core.hookspecs import hookimpl
from streamer.plugins.sinks.csv_batch import CsvSink, Options


class SlowOptions(Options, forbid_unknown_fields=True, kw_only=True):
    delay: float = 0.25


class SlowCsvSink(CsvSink):
    Options = SlowOptions

    async def write(self, batch) -> None:
        await anyio.sleep(self.options.delay)
        await super().write(batch)

    async def write_chunks(self, streams, chunks) -> None:
        await anyio.sleep(self.options.delay)
        await super().write_chunks(streams, chunks)


@hookimpl
def register_sinks(register):
    register("slowcsv", SlowCsvSink)
