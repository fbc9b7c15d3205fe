"""The simulator's WebSocket connections: framing, sending, reading, closing, keep-alive.

:class:`Transport` owns every open :class:`Connection` of one simulator. It knows nothing
about streams or markets: the Binance request protocol (:mod:`.protocol`) hands it frames to
send and receives the text messages it reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from streamer import Counters

from . import _wire as wire
from .simconfig import SimConfig
from .streams import StreamSpec

__all__ = ["MARKET_DEFAULTS", "Connection", "Transport", "framed", "route", "to_micro"]

_json = msgspec.json.Encoder()

MARKET_DEFAULTS = {
    # (ping interval s, pong timeout s, incoming messages per second)
    "spot": (20.0, 60.0, 5),
    "usdm": (180.0, 600.0, 10),
}


class Connection:
    """One WebSocket client connection."""

    __slots__ = (
        "close_abrupt",
        "close_after",
        "closing",
        "combined",
        "created",
        "incoming",
        "market",
        "micro",
        "next_ping",
        "path",
        "ping_deadline",
        "ping_payload",
        "route",
        "sent",
        "streams",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, market: str, route: str, path: str) -> None:
        self.transport = transport
        self.market = market
        self.route = route  # "all" (spot), "public" or "market"
        self.path = path
        self.combined = False
        self.micro = False  # spot ``timeUnit=MICROSECOND``
        self.streams: dict[str, StreamSpec | None] = {}
        self.created = time.monotonic()
        self.incoming: deque[float] = deque()
        self.next_ping = 0.0
        self.ping_payload: bytes | None = None
        self.ping_deadline = 0.0
        self.sent = 0
        self.close_after = 0
        self.close_abrupt = False
        self.closing = False


def route(path: str) -> tuple[str, str, str] | None:
    """``(market, route, rest)`` for a WebSocket path, ``None`` if unknown."""
    market, routed = "spot", "all"
    if path.startswith("/fstream"):
        market, routed, path = "usdm", "public", path[len("/fstream") :]
    for prefix in ("/public", "/market"):
        if path.startswith(prefix + "/"):
            market, routed, path = "usdm", prefix[1:], path[len(prefix) :]
            break
    if path == "/stream" or path == "/ws" or path.startswith("/ws/"):
        return market, routed, path
    return None


def framed(head: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """(raw frame, combined frame) for one event payload."""
    wrapped = head + payload + b"}"
    return wire.text_header(len(payload)) + payload, wire.text_header(len(wrapped)) + wrapped


def to_micro(payload: bytes) -> bytes:
    """The same event with its times in µs (spot ``timeUnit=MICROSECOND``)."""
    body = msgspec.json.decode(payload)
    if isinstance(body, dict):
        for key in ("E", "T"):
            if isinstance(body.get(key), int):
                body[key] *= 1000
        k = body.get("k")
        if isinstance(k, dict):
            for key in ("t", "T"):
                k[key] *= 1000
    return _json.encode(body)


class Transport:
    """Every open WebSocket connection of one simulator.

    ``stalled()`` says whether a stall fault is on (no pings then); ``now_ms()`` is the
    simulator clock (ping payloads). :attr:`loop` is set when the server starts.
    """

    def __init__(
        self,
        config: SimConfig,
        counters: Counters,
        stalled: Callable[[], bool],
        now_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.counters = counters
        self._stalled = stalled
        self._now_ms = now_ms
        self.conns: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, conn: Connection) -> None:
        """Start tracking a connection that finished its handshake."""
        self.conns.add(conn)
        self.counters.incr("ws_connections")
        self.counters.set("ws_open_connections", len(self.conns))

    def discard(self, conn: Connection) -> None:
        """Stop tracking a connection that ended."""
        conn.closing = True
        self.conns.discard(conn)
        self.counters.set("ws_open_connections", len(self.conns))

    def send(self, conn: Connection, data: bytes, kind: str, symbol: str) -> None:
        """Write one data frame, counted per symbol and kind; closes a connection that asked
        for it (``close_after``) or whose client reads too slowly."""
        if conn.closing or conn.transport.is_closing():
            # A peer that went away is only reported to the protocol on a later loop turn;
            # writing on meanwhile makes asyncio log "socket.send() raised exception".
            return
        conn.transport.write(data)
        conn.sent += 1
        self.counters.incr("ws_messages_sent", symbol, kind)
        if conn.close_after and conn.sent >= conn.close_after:
            self.counters.incr("fault_close_after_messages")
            self.close(conn, conn.close_abrupt, 1000, "closed by simulator fault")
        elif conn.transport.get_write_buffer_size() > self.config.write_buffer_limit:
            self.counters.incr("ws_slow_client_disconnects")
            self.close(conn, True)

    def reply(self, conn: Connection, body: dict[str, Any]) -> None:
        """Send one JSON text message (a control response)."""
        if not conn.closing:
            conn.transport.write(wire.frame(_json.encode(body)))

    def close(self, conn: Connection, abrupt: bool, code: int = 1000, reason: str = "") -> None:
        """Close with a close frame (the client gets 1 s to answer) or abort at once."""
        if conn.closing:
            return
        conn.closing = True
        if abrupt:
            conn.transport.abort()
            return
        conn.transport.write(wire.close_frame(code, reason))
        loop = self.loop
        if loop is not None:
            # The client answers with its own close frame; do not wait for it forever.
            loop.call_later(1.0, conn.transport.close)

    async def read_loop(
        self,
        conn: Connection,
        reader: asyncio.StreamReader,
        on_message: Callable[[Connection, bytes], None],
    ) -> None:
        """Read frames until the connection ends: answer pings, check pongs, enforce the
        incoming message rate and size, and pass every whole text message to
        ``on_message``."""
        cfg = self.config
        limit = cfg.incoming_limit or MARKET_DEFAULTS[conn.market][2]
        fragments: list[bytes] = []
        while not conn.closing:
            try:
                fin, opcode, payload = await wire.read_frame(reader, cfg.max_frame_bytes)
            except wire.ProtocolError as exc:
                self.counters.incr("ws_protocol_errors")
                self.close(conn, False, exc.code, str(exc))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            now = time.monotonic()
            if opcode != wire.OP_CLOSE:  # pings, pongs and messages count; a goodbye does not
                conn.incoming.append(now)
            while conn.incoming and conn.incoming[0] <= now - 1.0:
                conn.incoming.popleft()
            if len(conn.incoming) > limit:
                self.counters.incr("ws_rate_limit_disconnects")
                self.close(conn, False, 1008, "Too many messages")
                return
            if opcode == wire.OP_PING:
                conn.transport.write(wire.frame(payload, wire.OP_PONG))
            elif opcode == wire.OP_PONG:
                if conn.ping_payload is not None and payload == conn.ping_payload:
                    conn.ping_payload = None
                else:
                    self.counters.incr("ws_unsolicited_pongs")
            elif opcode == wire.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                if not conn.closing:
                    conn.closing = True
                    conn.transport.write(wire.close_frame(code if code != 1005 else 1000))
                conn.transport.close()
                return
            else:
                if opcode != wire.OP_CONT:
                    fragments = []
                fragments.append(payload)
                if sum(map(len, fragments)) > cfg.max_frame_bytes:
                    self.counters.incr("ws_protocol_errors")
                    self.close(conn, False, 1009, "message too big")
                    return
                if fin:
                    message, fragments = b"".join(fragments), []
                    on_message(conn, message)

    async def housekeeping(self) -> None:
        """Forever: close connections past their maximum age or pong deadline; ping."""
        cfg = self.config
        periods = [cfg.max_connection_age_s]
        for market in ("spot", "usdm"):
            periods.append(cfg.ping_interval_s or MARKET_DEFAULTS[market][0])
            periods.append(cfg.pong_timeout_s or MARKET_DEFAULTS[market][1])
        period = min(1.0, max(0.01, min(periods) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled = self._stalled()
            for conn in list(self.conns):
                if conn.closing:
                    continue
                if now - conn.created >= cfg.max_connection_age_s:
                    self.counters.incr("ws_max_age_closes")
                    self.close(conn, False, 1000, "max connection age")
                    continue
                if conn.ping_payload is not None and now > conn.ping_deadline:
                    self.counters.incr("ws_pong_timeouts")
                    self.close(conn, False, 1008, "pong timeout")
                    continue
                if stalled or now < conn.next_ping:
                    continue
                conn.next_ping = now + (cfg.ping_interval_s or MARKET_DEFAULTS[conn.market][0])
                if conn.ping_payload is None:
                    conn.ping_payload = str(self._now_ms()).encode()
                    conn.ping_deadline = now + (
                        cfg.pong_timeout_s or MARKET_DEFAULTS[conn.market][1]
                    )
                    conn.transport.write(wire.frame(conn.ping_payload, wire.OP_PING))
                    self.counters.incr("ws_pings_sent")
