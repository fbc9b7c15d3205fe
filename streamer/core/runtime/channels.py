"""Framed byte channels between processes, and the control messages they carry.

Data and control travel over Unix-domain stream sockets, one connection per sending
process, so a child killed mid-write can only ever corrupt its own connection: the reader
sees a truncated frame at EOF and discards it. A frame is a 4-byte big-endian length
followed by the payload. Data frames carry :func:`~streamer.core.records.encode_batch`
bytes (records), or, for a sink with a worker-side encoder,
:func:`~streamer.core.records.encode_encoded` bytes, whose first byte
(:data:`~streamer.core.records.ENCODED_TAG`, never the first byte of MessagePack) tells
them apart; control frames carry one of the msgspec messages below.

Flush receipts (``streamer store``): a worker whose first frame on a data connection is
empty (:data:`WANT_RECEIPTS`; never a valid batch) asks the writer to report back on that
same connection, as :class:`Flushed` control frames, how many of the connection's data
frames (after that first one) the sink has flushed: sent after a flush tick that left the
sink with nothing pending, whenever the count grew. Frames dropped as duplicates or as
corrupt count as flushed. A collector worker never asks, and never reads its data socket.

The sockets live in a private folder of the temporary directory, named
``streamer-<supervisor pid>-<random>`` (:func:`make_socket_dir`). The supervisor removes it
when it exits; after a ``kill -9`` of the supervisor its children remove it on their way
out (:mod:`.child`), and if they were killed too the next run sweeps every such folder
whose supervisor pid is no longer alive.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from typing import Any

import anyio
import msgspec
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

#: Largest frame accepted; anything bigger means a corrupt stream.
MAX_FRAME = 256 * 1024 * 1024

#: ``(exchange, market, symbol, stream, key)``: a high-water mark in transit.
Mark = tuple[str, str, str, str, int]
#: ``(name, symbol, stream, value)``: one counter in transit.
CounterRow = tuple[str, str, str, int]


class Hello(msgspec.Struct, tag="hello"):
    """First message of a child on its control connection."""

    child: str
    incarnation: int
    pid: int


class Ready(msgspec.Struct, tag="ready"):
    """A writer opened its sink and listens for data; ``holdings`` come from the sink."""

    holdings: list[Mark]


class Status(msgspec.Struct, tag="status"):
    """Periodic report of a child: counters, marks (writers) and free-form info."""

    counters: list[CounterRow]
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    high_water: list[Mark] = msgspec.field(default_factory=list)
    final: bool = False


class Stop(msgspec.Struct, tag="stop"):
    """Supervisor to child: finish what you hold and exit 0."""


class Flushed(msgspec.Struct, tag="flushed"):
    """Writer to a worker that asked for receipts: the first ``frames`` data frames it sent
    on this connection are flushed (durable in the sink, or dropped as held)."""

    frames: int


Control = Hello | Ready | Status | Stop | Flushed

#: First frame of a data connection whose worker wants :class:`Flushed` receipts.
WANT_RECEIPTS = b""

_encoder = msgspec.msgpack.Encoder()
_control_decoder = msgspec.msgpack.Decoder(Control)


class OversizedFrame(Exception):
    """A frame header announced an impossible length."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length header."""
    return len(payload).to_bytes(4, "big") + payload


class FrameReader:
    """Reads frames from a byte stream; :meth:`receive` returns ``None`` at a clean EOF.

    A frame cut short by EOF (the sender died mid-write) also returns ``None``.
    """

    def __init__(self, stream: ByteStream) -> None:
        self._buffered = BufferedByteReceiveStream(stream)

    async def receive(self) -> bytes | None:
        """The next frame's payload, or ``None`` when the stream ended."""
        try:
            header = await self._buffered.receive_exactly(4)
            size = int.from_bytes(header, "big")
            if size > MAX_FRAME:
                raise OversizedFrame(f"frame of {size} bytes exceeds the {MAX_FRAME} byte limit")
            return await self._buffered.receive_exactly(size) if size else b""
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            return None


def encode_control(message: Control) -> bytes:
    """A framed control message."""
    return frame(_encoder.encode(message))


def decode_control(payload: bytes) -> Control:
    """Decode a control payload; raises ``msgspec.DecodeError`` if it is not one."""
    return _control_decoder.decode(payload)


SOCKET_DIR_PREFIX = "streamer-"
_SOCKET_DIR = re.compile(r"streamer-(?P<pid>\d+)-\w+")


def make_socket_dir() -> str:
    """A new private socket folder for this process, after sweeping dead runs' folders."""
    sweep_socket_dirs()
    return tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")


def sweep_socket_dirs(parent: str | None = None) -> list[str]:
    """Remove ``streamer-<pid>-*`` folders left behind by runs whose pid is gone.

    Only folders owned by this user that hold nothing but sockets are removed; a folder
    whose pid is alive (the run, or an unrelated process that got the pid) is kept.
    Returns the removed paths.
    """
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = _SOCKET_DIR.fullmatch(entry.name)
        if match is None or _pid_exists(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            inside = list(os.scandir(entry.path))
            if any(not stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode) for e in inside):
                continue
            shutil.rmtree(entry.path)
            removed.append(entry.path)
    return removed


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: keep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
