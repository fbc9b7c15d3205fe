"""A JSON-lines sink for market-streamer: one object per line, one file per stream.

Each line is the record's fields plus ``"kind"`` (``trade``, ``depth``, ``kline``,
``book`` or ``marker``). Prices and quantities stay the exchange's exact strings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import msgspec

from streamer import (
    BookSnapshot,
    DepthUpdate,
    Duration,
    Kline,
    Marker,
    Record,
    Sink,
    StreamKey,
    Trade,
    hookimpl,
    record_key,
    stream_key,
)

__version__ = "0.1.0"


class JsonLinesOptions(msgspec.Struct, forbid_unknown_fields=True):
    """``path``: root directory; ``flush_interval``: how often the runtime flushes."""

    path: str = "./data-jsonl"
    flush_interval: Duration = "1s"
    #: fsync on every flush (durable across power loss, slower).
    fsync: bool = False


_KIND = {
    Trade: "trade",
    DepthUpdate: "depth",
    Kline: "kline",
    BookSnapshot: "book",
    Marker: "marker",
}


_TYPE = {name: cls for cls, name in _KIND.items()}


def _held_key(line: bytes) -> int | None:
    """The resume key of one written line (``None``: a marker or an unclosed kline)."""
    row = msgspec.json.decode(line)
    record = _TYPE[row.pop("kind")](**row)
    if isinstance(record, Kline) and not record.closed:
        return None  # an open bar is written again until it closes
    return record_key(record)


class JsonLinesSink(Sink):
    """Appends records to ``<path>/<exchange>/<market>/<symbol>/<stream>.jsonl``."""

    Options = JsonLinesOptions

    def __init__(self, options, context) -> None:
        super().__init__(options, context)
        self._files: dict[StreamKey, IO[bytes]] = {}
        self._encoder = msgspec.json.Encoder()

    def _path(self, key: StreamKey) -> Path:
        return Path(self.options.path, key.exchange, key.market, key.symbol, f"{key.stream}.jsonl")

    def _file(self, key: StreamKey) -> IO[bytes]:
        handle = self._files.get(key)
        if handle is None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._files[key] = open(path, "ab")  # noqa: SIM115 - kept open
        return handle

    @classmethod
    def check(cls, options: JsonLinesOptions) -> None:
        """Refuse, before anything starts, a path that cannot hold the files."""
        path = Path(options.path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"path: {path} is not a directory")

    @classmethod
    def claims(cls, options: JsonLinesOptions) -> list[str]:
        """The folder this sink writes: the collector locks it so no second one shares it."""
        return [options.path]

    async def open(self) -> None:
        Path(self.options.path).mkdir(parents=True, exist_ok=True)

    async def write(self, batch: Sequence[Record]) -> None:
        lines: dict[StreamKey, list[bytes]] = {}
        for record in batch:
            key = stream_key(record)
            row = {"kind": _KIND[type(record)], **msgspec.structs.asdict(record)}
            lines.setdefault(key, []).append(self._encoder.encode(row))
        for key, rows in lines.items():
            self._file(key).write(b"\n".join(rows) + b"\n")
        self.context.counters.incr("jsonl_rows", n=len(batch))

    async def flush(self) -> None:
        for handle in self._files.values():
            handle.flush()
            if self.options.fsync:
                os.fsync(handle.fileno())

    async def close(self) -> None:
        await self.flush()
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    async def holdings(self) -> dict[StreamKey, int]:
        held: dict[StreamKey, int] = {}
        root = Path(self.options.path)
        for path in root.glob("*/*/*/*.jsonl"):
            exchange, market, symbol = path.parts[-4:-1]
            key = StreamKey(exchange, market, symbol, path.stem)
            last = None
            with open(path, "rb") as handle:
                for line in handle:
                    try:
                        value = _held_key(line)
                    except msgspec.DecodeError:
                        continue  # a torn last line after a crash
                    if value is not None:
                        last = value if last is None else max(last, value)
            if last is not None:
                held[key] = last
        return held


@hookimpl
def register_sinks(register):
    """Make ``type: jsonl`` available to configuration files."""
    register("jsonl", JsonLinesSink)
