"""Minimal HTTP/1.1 and RFC 6455 framing for the simulator (server side only).

Hand-rolled so the simulator controls every byte: bulk writes of pre-encoded frames, abrupt
closes, malformed frames, and clients that do not answer pings. Client frames must be
masked; the server never compresses (it ignores ``permessage-deflate`` offers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

MAX_HEADERS = 100


class ProtocolError(Exception):
    """The peer broke HTTP or WebSocket framing; ``code`` is the close code to send."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    """A parsed HTTP request head."""

    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """Percent-decoded path without the query."""
        return unquote(urlsplit(self.target).path)

    @property
    def query(self) -> list[tuple[str, str]]:
        """Decoded query parameters in order (duplicates kept)."""
        return parse_qsl(urlsplit(self.target).query, keep_blank_values=True)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response."""
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    @property
    def is_websocket(self) -> bool:
        """True for a WebSocket upgrade request."""
        return (
            self.headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in self.headers.get("connection", "").lower()
        )


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request head; ``None`` on a clean EOF before any byte.

    Raises :class:`ProtocolError` on a malformed request line or headers.
    """
    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise ProtocolError("request line too long", 414) from exc
    if not line:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError("malformed request line", 400)
    req = Request(parts[0], parts[1], parts[2])
    for _ in range(MAX_HEADERS + 1):
        try:
            raw = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise ProtocolError("header too long", 431) from exc
        if not raw:
            raise ProtocolError("connection closed inside headers", 400)
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise ProtocolError("malformed header", 400)
        req.headers[name.strip().lower()] = value.strip()
    else:
        raise ProtocolError("too many headers", 431)
    length = req.headers.get("content-length")
    if length:
        # GET bodies are meaningless here; read and discard them to keep the stream aligned.
        if not length.isdigit() or int(length) > 1 << 20:
            raise ProtocolError("bad content-length", 400)
        await reader.readexactly(int(length))
    return req


def http_response(
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json;charset=UTF-8",
    keep_alive: bool = True,
) -> bytes:
    """Serialise a complete HTTP/1.1 response."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    lines.extend(f"{k}: {v}" for k, v in headers or ())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def handshake_response(req: Request) -> bytes:
    """The 101 response for a valid upgrade request; raises :class:`ProtocolError` else."""
    key = req.headers.get("sec-websocket-key", "")
    if req.method != "GET":
        raise ProtocolError("WebSocket upgrade needs GET", 400)
    if req.headers.get("sec-websocket-version") != "13":
        raise ProtocolError("unsupported Sec-WebSocket-Version", 426)
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError as exc:
        raise ProtocolError("bad Sec-WebSocket-Key", 400) from exc
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """An unmasked, unfragmented server frame."""
    n = len(payload)
    head = 0x80 | opcode
    if n < 126:
        return bytes((head, n)) + payload
    if n < 65536:
        return bytes((head, 126)) + n.to_bytes(2, "big") + payload
    return bytes((head, 127)) + n.to_bytes(8, "big") + payload


def text_header(n: int) -> bytes:
    """Header bytes of a text frame carrying ``n`` payload bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and a short UTF-8 reason."""
    return frame(code.to_bytes(2, "big") + reason.encode()[:120], OP_CLOSE)


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


async def read_frame(reader: asyncio.StreamReader, max_size: int) -> tuple[bool, int, bytes]:
    """Read one client frame: ``(fin, opcode, payload)``.

    Raises :class:`ProtocolError` (1002 framing, 1009 too big) and ``IncompleteReadError``
    at EOF.
    """
    b0, b1 = await reader.readexactly(2)
    fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x80, b1 & 0x7F
    if b0 & 0x70:
        raise ProtocolError("reserved bits set", 1002)
    if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
        raise ProtocolError(f"unknown opcode {opcode}", 1002)
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    if opcode >= OP_CLOSE and (length > 125 or not fin):
        raise ProtocolError("bad control frame", 1002)
    if not masked:
        raise ProtocolError("client frames must be masked", 1002)
    if length > max_size:
        raise ProtocolError("frame too big", 1009)
    mask = await reader.readexactly(4)
    return fin, opcode, _unmask(await reader.readexactly(length), mask)
