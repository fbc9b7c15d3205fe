"""A receive-only WebSocket client: websockets' sans-I/O protocol on a plain asyncio protocol.

:class:`WsClient` is an :class:`asyncio.Protocol` that owns a
:class:`websockets.client.ClientProtocol`. Every socket read goes
``data_received -> ClientProtocol.receive_data -> events_received`` and the whole messages
it completed are handed to one callback, ``on_messages(payloads, receive_ns)``, with one
``time.time_ns()`` taken when the read arrived. There is no message queue, no future and no
task switch per message: one callback per read, then control returns to the event loop, so
other tasks run between reads by construction however fast frames arrive.

What it does besides delivering messages:

* the opening handshake (``ClientProtocol.connect`` / ``send_request``; the response is
  checked by the protocol); a refusal raises :class:`HandshakeError` with the HTTP status,
  reason and the start of the body; redirects are not followed;
* pings from the server are answered by the protocol (its queued pong is written after every
  read); a keep-alive ping every ``ping_interval``, and the connection fails with 1011 if its
  pong does not arrive within ``ping_timeout`` (not counted while reading is paused);
* close frames from the server are echoed and the server's TCP close awaited for
  ``close_timeout``; :meth:`close` starts the closing handshake; :attr:`close_code` and
  :meth:`end_reason` say how it ended;
* :meth:`pause_reading` / :meth:`resume_reading` stop and restart socket reads (TCP
  backpressure onto the server; a paused connection answers nothing, so keep pauses well
  below the server's pong timeout).

``wss://`` runs the same protocol over asyncio's TLS transport (``loop.create_connection``
with an SSL context). Proxies are not supported here (the caller falls back to the
``websockets`` connection object when one is configured).
"""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import OPEN
from websockets.uri import WebSocketURI, parse_uri

__all__ = ["HandshakeError", "WsClient", "open_client", "proxy_for"]

#: ``on_messages(payloads, receive_ns)``: every whole message of one socket read, in order.
OnMessages = Callable[[list[Any], int], None]

_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_PONG = Opcode.PONG
_OK_CODES = (1000, 1001)
#: Most messages handed over per event-loop turn. A 256 KiB socket read holds ~400 mix
#: messages (~10 ms of decoding and book work); the rest of a bigger read follows on the
#: next turns, reading held meanwhile, so the worker's flush and send tasks get a turn at
#: least this often (0: the whole read at once). See bench/bench_receive.py --starvation.
TURN_MESSAGES = 128
_default_ssl: ssl_module.SSLContext | None = None


class HandshakeError(ConnectionError):
    """The server answered the opening handshake with something other than a WebSocket."""


def proxy_for(url: str) -> str | None:
    """The proxy the environment configures for ``url`` (``websockets`` >= 15), else None."""
    try:
        from websockets.proxy import get_proxy
    except ImportError:  # older websockets: its connect() knows no proxies either
        return None
    return get_proxy(parse_uri(url))


def _describe(exc: BaseException, response: Response | None) -> str:
    if isinstance(exc, InvalidStatus) or (response is not None and response.status_code != 101):
        r = exc.response if isinstance(exc, InvalidStatus) else response
        assert r is not None
        text = f"HTTP {r.status_code} {r.reason_phrase}".rstrip()
        if 300 <= r.status_code < 400:
            text += f" (redirect to {r.headers.get('Location', '?')} not followed)"
        body = bytes(r.body[:200]).decode("utf-8", "replace").strip()
        return f"{text}: {body}" if body else text
    cause = exc.__cause__
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return f"{exc}{detail}"


class WsClient(asyncio.Protocol):
    """One client WebSocket connection; see the module docstring."""

    def __init__(
        self,
        uri: WebSocketURI,
        *,
        max_size: int | None = 2**22,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 2.0,
    ) -> None:
        self.uri = uri
        self.protocol = ClientProtocol(uri, max_size=max_size)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        #: True while socket reads are paused by :meth:`pause_reading`.
        self.paused = False
        #: Socket reads handed to the protocol, and whole messages delivered.
        self.reads = 0
        self.messages = 0
        #: An exception raised by ``on_messages`` (the connection was aborted because of it).
        self.error: BaseException | None = None
        self._open = False
        self._on_messages: OnMessages | None = None
        self._early: list[tuple[list[Any], int]] = []
        self._fragments: list[bytes] | None = None
        self._lost_exc: BaseException | None = None
        self._ping_payload: bytes | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive_failed = False
        self._rest: list[Any] = []  # messages of the last read still to hand over
        self._rest_ns = 0

    # ------------------------------------------------------------------ public

    def start(self, on_messages: OnMessages) -> None:
        """Deliver messages to ``on_messages`` from now on (and any that came with the
        handshake response, first)."""
        self._on_messages = on_messages
        early, self._early = self._early, []
        for payloads, receive_ns in early:
            if not self._deliver(on_messages, payloads, receive_ns):
                return

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (1006 when none); None while not closed."""
        return self.protocol.close_code

    def end_reason(self) -> str:
        """Why the connection ended, for logs and ``on_reconnect``."""
        if self.error is not None:
            return f"disconnect ({type(self.error).__name__})"
        if self._keepalive_failed:
            return "keepalive timeout"
        proto = self.protocol
        if proto.close_rcvd is not None:
            code = proto.close_rcvd.code
            return "disconnect" if code in _OK_CODES else f"close {code}"
        cause = proto.parser_exc or self._lost_exc
        if cause is not None and not isinstance(cause, EOFError):
            return f"disconnect ({type(cause).__name__})"
        return "disconnect (no close frame)"

    def pause_reading(self) -> None:
        """Stop reading the socket until :meth:`resume_reading` (idempotent)."""
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again (idempotent); the keep-alive deadline starts over."""
        if self.paused:
            self.paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing() and not self._rest:
                self.transport.resume_reading()
            if self._ping_payload is not None:
                self._arm_pong_deadline()

    async def close(self, code: int = 1000) -> None:
        """Start the closing handshake and wait until the connection is closed.

        The server's answer is awaited for ``close_timeout``; then the socket is aborted.
        """
        proto = self.protocol
        if self.transport is not None and proto.state is OPEN:
            proto.send_close(code)
            self._flush()
            self._arm_close_timer()
        elif self.transport is not None and not self.closed.done():
            self._arm_close_timer()
        await asyncio.shield(self.closed)

    def abort(self) -> None:
        """Drop the connection at once (no closing handshake)."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Return when the TCP connection is gone."""
        await asyncio.shield(self.closed)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.protocol.connect()
        request.headers["User-Agent"] = USER_AGENT
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        receive_ns = time.time_ns()  # one clock read per socket read, not per message
        proto = self.protocol
        self.reads += 1
        proto.receive_data(data)
        events = proto.events_received()
        writes = proto.data_to_send()
        if writes:
            self._write(writes)
        if not self._open:
            events = self._handshake_events(events)
        if events:
            payloads = []
            append = payloads.append
            for event in events:
                if event.fin and (event.opcode is _TEXT or event.opcode is _BINARY):
                    append(event.data)
                else:
                    self._other_frame(event, payloads)
            if payloads:
                self.messages += len(payloads)
                on_messages = self._on_messages
                if on_messages is None:
                    self._early.append((payloads, receive_ns))
                elif TURN_MESSAGES and len(payloads) > TURN_MESSAGES:
                    self._rest, self._rest_ns = payloads[TURN_MESSAGES:], receive_ns
                    if not self.paused and self.transport is not None:
                        self.transport.pause_reading()
                    self.loop.call_soon(self._next_turn)
                    if not self._deliver(on_messages, payloads[:TURN_MESSAGES], receive_ns):
                        return
                elif not self._deliver(on_messages, payloads, receive_ns):
                    return
        if proto.state is not OPEN and proto.close_expected():
            self._arm_close_timer()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self.protocol.events_received()
        self._flush()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_exc = exc
        self.protocol.receive_eof()  # idempotent; the protocol is CLOSED afterwards
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._close_timer = None
        if not self.handshake.done():
            error = self.protocol.handshake_exc or exc
            message = _describe(error, None) if error is not None else "closed by the server"
            self.handshake.set_exception(
                HandshakeError(f"connection lost during the handshake: {message}")
            )
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------------ internals

    def _handshake_events(self, events: list[Any]) -> list[Any]:
        """Handle the handshake response at the head of ``events``; return the frames."""
        proto = self.protocol
        if not events:
            return events
        response = events[0]
        if not isinstance(response, Response):  # pragma: no cover - protocol guarantees it
            return events
        if proto.handshake_exc is not None:
            if not self.handshake.done():
                self.handshake.set_exception(
                    HandshakeError(_describe(proto.handshake_exc, response))
                )
            self._arm_close_timer()
            return []
        self._open = True
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self.ping_interval:
            self._ping_timer = self.loop.call_later(self.ping_interval, self._keepalive)
        return events[1:]

    def _next_turn(self) -> None:
        rest = self._rest
        on_messages = self._on_messages
        if not rest or on_messages is None or self.error is not None:
            self._rest = []
            return
        if len(rest) > TURN_MESSAGES:
            self._rest = rest[TURN_MESSAGES:]
            self.loop.call_soon(self._next_turn)
            self._deliver(on_messages, rest[:TURN_MESSAGES], self._rest_ns)
            return
        self._rest = []
        transport = self.transport
        if not self.paused and transport is not None and not transport.is_closing():
            transport.resume_reading()
        self._deliver(on_messages, rest, self._rest_ns)

    def _deliver(self, on_messages: OnMessages, payloads: list[Any], receive_ns: int) -> bool:
        try:
            on_messages(payloads, receive_ns)
            return True
        except Exception as exc:  # a bug downstream ends this connection only
            self.error = exc
            self.abort()
            return False

    def _other_frame(self, frame: Any, payloads: list[Any]) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:  # first fragment of a message
            self._fragments = [frame.data]
        elif opcode is _CONT:
            if self._fragments is not None:
                self._fragments.append(frame.data)
                if frame.fin:
                    payloads.append(b"".join(self._fragments))
                    self._fragments = None
        elif opcode is _PONG and self._ping_payload == bytes(frame.data):
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
        # PING was answered by the protocol; CLOSE was echoed by it (state CLOSING).

    def _write(self, writes: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in writes:
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # the protocol's end of stream: half-close
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):
                    transport.close()
            else:  # TLS cannot half-close
                transport.close()

    def _flush(self) -> None:
        writes = self.protocol.data_to_send()
        if writes:
            self._write(writes)

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self.closed.done():
            self._close_timer = self.loop.call_later(self.close_timeout, self.abort)

    def _keepalive(self) -> None:
        self._ping_timer = None
        if self.protocol.state is not OPEN:
            return
        if self._ping_payload is None:
            self._ping_payload = random.getrandbits(32).to_bytes(4, "big")
            self.protocol.send_ping(self._ping_payload)
            self._flush()
            if not self.paused:
                self._arm_pong_deadline()
        assert self.ping_interval
        self._ping_timer = self.loop.call_later(self.ping_interval, self._keepalive)

    def _arm_pong_deadline(self) -> None:
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None
        if self.ping_timeout:
            self._pong_timer = self.loop.call_later(self.ping_timeout, self._pong_missing)

    def _pong_missing(self) -> None:
        self._pong_timer = None
        if self.paused or self._ping_payload is None or self.protocol.state is not OPEN:
            return
        self._keepalive_failed = True
        self.protocol.fail(1011, "keepalive ping timeout")
        self._flush()
        self._arm_close_timer()


def _ssl_context(uri: WebSocketURI, ssl: ssl_module.SSLContext | None):
    global _default_ssl
    if not uri.secure:
        return None
    if ssl is not None:
        return ssl
    if _default_ssl is None:
        _default_ssl = ssl_module.create_default_context()
    return _default_ssl


async def open_client(
    url: str,
    *,
    open_timeout: float = 10.0,
    ssl: ssl_module.SSLContext | None = None,
    **options: Any,
) -> WsClient:
    """Connect to ``url`` (``ws://`` or ``wss://``) and complete the opening handshake.

    Raises ``OSError`` when the TCP/TLS connection fails, :class:`HandshakeError` when the
    server refuses the upgrade, ``TimeoutError`` after ``open_timeout``. ``options`` go to
    :class:`WsClient`.
    """
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    context = _ssl_context(uri, ssl)
    client: WsClient | None = None

    def factory() -> WsClient:
        nonlocal client
        client = WsClient(uri, **options)
        return client

    try:
        async with asyncio.timeout(open_timeout):
            await loop.create_connection(
                factory,
                uri.host,
                uri.port,
                ssl=context,
                server_hostname=uri.host if context is not None else None,
            )
            assert client is not None
            await asyncio.shield(client.handshake)
    except TimeoutError:
        _discard(client)
        raise TimeoutError(f"no WebSocket handshake within {open_timeout:g} s") from None
    except BaseException:
        _discard(client)
        raise
    return client


def _discard(client: WsClient | None) -> None:
    if client is None:
        return
    client.abort()
    if not client.handshake.done():
        client.handshake.cancel()  # nobody waits for it any more
    elif not client.handshake.cancelled():
        client.handshake.exception()  # retrieved: no "never retrieved" warning
