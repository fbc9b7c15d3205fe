"""A bare WebSocket client for protocol tests: it never answers pings by itself and can
send frames no well-behaved client would (unmasked, oversized, unsolicited pongs).

Use ``websockets`` for ordinary clients; use :class:`RawClient` when the test is about the
server's reaction to client misbehaviour.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from urllib.parse import urlsplit

from . import _wire as wire

__all__ = ["RawClient"]


class RawClient:
    """A minimal RFC 6455 client over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, timeout: float = 5.0) -> RawClient:
        """Open ``ws://host:port/path`` and complete the handshake (raises on non-101)."""
        parts = urlsplit(url)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port), timeout
        )
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(b" ", 2)[1]
        if status != b"101":
            writer.close()
            raise ConnectionError(f"handshake failed: {head.decode(errors='replace')}")
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = wire.OP_TEXT, masked: bool = True) -> None:
        """Send one frame (masked unless told otherwise)."""
        n = len(payload)
        first = bytes((0x80 | opcode,))
        mask_bit = 0x80 if masked else 0
        if n < 126:
            head = first + bytes((mask_bit | n,))
        elif n < 65536:
            head = first + bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
        else:
            head = first + bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
        if masked:
            mask = os.urandom(4)
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.writer.write(head + mask + body)
        else:
            self.writer.write(head + payload)

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame as ``(opcode, payload)``; raises ``IncompleteReadError`` at EOF."""

        async def _read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(_read(), timeout)

    async def recv_until(self, opcode: int, timeout: float = 5.0) -> bytes:
        """Skip frames until one with ``opcode`` arrives; return its payload."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            op, payload = await self.recv(max(0.01, deadline - loop.time()))
            if op == opcode:
                return payload

    async def close(self) -> None:
        """Drop the TCP connection."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
