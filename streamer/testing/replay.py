"""Replay of a recorded capture through the simulator (``SimConfig(replay=...)``).

Every WebSocket connection gets its own playback from the start of the capture, at the
recorded pace divided by ``speed`` (``speed <= 0``: as fast as possible), and receives the
recorded frames of the streams it subscribed to, byte for byte (raw connections get the
``data`` part of the recorded envelope). REST depth requests are answered with the recorded
snapshots of that path and symbol: the n-th request gets the n-th recorded snapshot (the last
one repeats), so a client that fetches once after connecting sees exactly the first snapshot,
as the golden numbers in the data README assume.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import msgspec

from streamer import Counters

from . import _wire as wire
from .captures import CaptureEvent, capture_dir, read_capture
from .faults import Faults
from .transport import Connection, Transport

__all__ = ["ReplayFrame", "ReplaySource"]


class _Envelope(msgspec.Struct):
    stream: str
    data: msgspec.Raw


_env_decoder = msgspec.json.Decoder(_Envelope)


@dataclass(frozen=True)
class ReplayFrame:
    """One recorded stream message, pre-encoded as raw and combined frames."""

    time_ns: int
    stream: str
    symbol: str
    kind: str
    raw_frame: bytes
    combined_frame: bytes


@dataclass
class ReplaySource:
    """Recorded frames and REST answers of one capture."""

    name: str
    speed: float
    frames: list[ReplayFrame]
    rest: dict[tuple[str, str], list[bytes]]
    skipped: int = 0
    _served: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    _held: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str, data_dir: str | None, speed: float = 1.0) -> ReplaySource:
        """Read capture ``name`` (see :func:`streamer.testing.captures.read_capture`)."""
        base = Path(data_dir) if data_dir else capture_dir()
        events = read_capture(name, base)
        source = cls.from_events(name, events, speed)
        if base is not None:
            source._load_exchange_info(base, name)
        return source

    def _load_exchange_info(self, base: Path, name: str) -> None:
        """Serve the exchangeInfo a cryptofeed capture recorded in ``<name>.0``, if any."""
        folder = base / "cryptofeed_sample_data"
        path = (folder if folder.is_dir() else base) / f"{name}.0"
        if not path.is_file():
            return
        with path.open("rb") as fh:
            first = fh.readline().rstrip(b"\r\n")
        url, sep, rest = first.partition(b" -> ")
        _, sep2, body = rest.partition(b": ")
        if sep and sep2 and body.startswith(b"{"):
            self.rest[(urlsplit(url.decode()).path, "")] = [body]

    @classmethod
    def from_events(cls, name: str, events: list[CaptureEvent], speed: float) -> ReplaySource:
        """Build a source from already-read capture events."""
        frames: list[ReplayFrame] = []
        rest: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        skipped = 0
        for ev in events:
            if ev.kind == "rest":
                parts = urlsplit(ev.url)
                symbol = dict(parse_qsl(parts.query)).get("symbol", "")
                rest[(parts.path, symbol)].append(ev.payload)
                continue
            try:
                env = _env_decoder.decode(ev.payload)
            except msgspec.DecodeError:
                skipped += 1  # not a stream envelope (e.g. a control response)
                continue
            data = bytes(env.data)
            symbol, _, kind = env.stream.partition("@")
            frames.append(
                ReplayFrame(
                    ev.local_time_ns,
                    env.stream,
                    symbol.upper(),
                    kind.split("@")[0],
                    wire.text_header(len(data)) + data,
                    wire.text_header(len(ev.payload)) + ev.payload,
                )
            )
        return cls(name, speed, frames, dict(rest), skipped)

    def streams(self) -> list[str]:
        """Every stream name present in the capture, in first-seen order."""
        return list(dict.fromkeys(f.stream for f in self.frames))

    def count(self, streams: list[str] | set[str]) -> int:
        """How many frames a connection subscribed to ``streams`` will receive."""
        wanted = set(streams)
        return sum(1 for f in self.frames if f.stream in wanted)

    def rest_answer(self, path: str, query: list[tuple[str, str]]) -> bytes | None:
        """The recorded body for this REST request, or ``None`` if none was recorded."""
        symbol = dict(query).get("symbol", "")
        bodies = self.rest.get((path, symbol))
        if not bodies:
            return None
        n = self._served[(path, symbol)]
        self._served[(path, symbol)] = n + 1
        return bodies[min(n, len(bodies) - 1)]

    async def play(
        self, conn: Connection, transport: Transport, faults: Faults, counters: Counters
    ) -> None:
        """Send the capture to ``conn`` at the configured pace, then keep it open."""
        if not self.frames:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        t0 = self.frames[0].time_ns
        for frame in self.frames:
            if conn.closing:
                return
            if self.speed > 0:
                due = start + (frame.time_ns - t0) / 1e9 / self.speed
                delay = due - loop.time()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            if frame.stream not in conn.streams or faults.stalled():
                continue
            data = frame.combined_frame if conn.combined else frame.raw_frame
            self._send_with_faults(conn, frame, data, transport.send, faults, counters)
            if conn.transport.get_write_buffer_size() > 1 << 20:
                # Let a slow client catch up instead of buffering the whole capture.
                await asyncio.sleep(0.001)
        counters.incr("replay_finished")

    def _send_with_faults(
        self,
        conn: Connection,
        frame: ReplayFrame,
        data: bytes,
        send: Callable[[Connection, bytes, str, str], None],
        faults: Faults,
        counters: Counters,
    ) -> None:
        """Send one recorded frame, applying the same stream faults as the synthetic market."""
        if frame.kind == "aggTrade" and faults.take_drop_aggtrade(frame.symbol):
            counters.incr("fault_aggtrade_dropped", frame.symbol)
            return
        if frame.kind == "depth" and faults.take_drop_depth(frame.symbol):
            counters.incr("fault_depth_dropped", frame.symbol)
            return
        fault = faults.take_message_fault()
        if fault:
            counters.incr(f"fault_{fault}", frame.symbol, frame.kind)
        if fault == "reorder":
            self._held[id(conn)] = data
            return
        if fault == "malformed":
            junk = b'{"stream":"' + frame.stream.encode() + b'","data":{"e":'
            send(conn, wire.text_header(len(junk)) + junk, "malformed", frame.symbol)
        send(conn, data, frame.kind, frame.symbol)
        if fault == "duplicate":
            send(conn, data, frame.kind, frame.symbol)
        held = self._held.pop(id(conn), None)
        if held is not None:
            send(conn, held, frame.kind, frame.symbol)
