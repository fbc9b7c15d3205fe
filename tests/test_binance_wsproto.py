"""The sans-I/O receive path (``ws_impl: protocol``) and what both paths must share.

Servers here are driven by hand with websockets' sans-I/O ``ServerProtocol`` on asyncio
streams, so a test can misbehave exactly (refuse the upgrade, send frames with the 101,
fragment a message, never answer pings, close with a code, stop reading). TLS uses a
self-signed certificate for 127.0.0.1 committed under ``tests/data/tls`` (neither
``cryptography`` nor ``trustme`` is a dependency).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from streamer.core.counters import Counters
from streamer.core.records import Trade
from streamer.plugins.exchanges.binance._wsproto import HandshakeError, WsClient, open_client
from streamer.plugins.exchanges.binance.connections import (
    ConnectionManager,
    ConnectionRateLimiter,
    ConnectionSettings,
    build_groups,
)

LOG = logging.getLogger("test.binance.wsproto")
TLS = Path(__file__).parent / "data" / "tls"
IMPLS = ["protocol", "connection"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def agg(i: int) -> bytes:
    body = f'"a":{i},"p":"1.0","q":"2.0","f":{i},"l":{i},"T":1,"m":true,"M":true'
    return (
        '{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1,"s":"BTCUSDT",' + body + "}}"
    ).encode()


class Peer:
    """The server end of one connection, after (or instead of) the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.proto = ServerProtocol()
        self.request: Request | None = None

    async def read_request(self) -> Request:
        while self.request is None:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("client went away before its request")
            self.proto.receive_data(data)
            for event in self.proto.events_received():
                if isinstance(event, Request):
                    self.request = event
        return self.request

    def accept_bytes(self) -> bytes:
        assert self.request is not None
        self.proto.send_response(self.proto.accept(self.request))
        return b"".join(self.proto.data_to_send())

    def frame(self, data: bytes, opcode: Opcode = Opcode.TEXT, fin: bool = True) -> bytes:
        return Frame(opcode, data, fin).serialize(mask=False)

    def close_frame(self, code: int, reason: str = "") -> bytes:
        return self.frame(code.to_bytes(2, "big") + reason.encode(), Opcode.CLOSE)

    async def client_frames(self) -> list[Frame]:
        """Frames the client sent until it closed its side (or 5 s passed)."""
        got: list[Frame] = []
        with anyio.move_on_after(5):
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.proto.receive_data(data)
                got += [e for e in self.proto.events_received() if isinstance(e, Frame)]
                self.writer.write(b"".join(x for x in self.proto.data_to_send() if x))
        return got


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """A loopback server calling ``handler(peer)`` for each connection (optionally TLS)."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.peers: list[Peer] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for peer in self.peers:
            peer.writer.transport.abort()

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


class Run:
    """A :class:`ConnectionManager` over one group, collecting trade ids and reconnects."""

    def __init__(self, url: str, impl: str, **settings) -> None:
        (group,) = build_groups(url, ["btcusdt@aggTrade"], 10)
        self.ids: list[int] = []
        self.times: list[int] = []
        self.reconnects: list[str] = []
        self.counters = Counters()
        defaults = {"backoff_base": 0.05, "backoff_max": 0.2, "no_data_timeout": 30.0}
        self.manager = ConnectionManager(
            [group],
            ConnectionSettings(market="spot", ws_impl=impl, **{**defaults, **settings}),
            on_record=self.on_record,
            on_reconnect=lambda symbols, reason: self.reconnects.append(reason),
            counters=self.counters,
            logger=LOG,
            limiter=ConnectionRateLimiter(),
        )

    def on_record(self, record) -> None:
        assert isinstance(record, Trade)
        self.ids.append(record.trade_id)
        self.times.append(record.receive_time)

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.manager.run)
            with anyio.fail_after(timeout):
                while not condition():
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- the handshake


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_a_refused_upgrade_is_a_clear_counted_error_and_is_retried(impl, caplog):
    body = b'{"code":-1121,"msg":"Invalid symbol."}'

    async def refuse(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await peer.writer.drain()
        await peer.reader.read()

    caplog.set_level(logging.WARNING, logger=LOG.name)
    async with Server(refuse) as server:
        run = Run(server.url, impl)
        await run.until(lambda: run.counters.get("ws_connect_failures") >= 2)
    assert run.ids == [] and run.counters.get("ws_connects") >= 2
    (line,) = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert "403" in line
    if impl == "protocol":
        assert "HandshakeError: HTTP 403 Forbidden: " + body.decode() in line


@pytest.mark.anyio
async def test_open_client_names_the_failure():
    async def not_websocket(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        await peer.reader.read()

    async def garbage(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await peer.reader.read()

    async def silent(peer: Peer) -> None:
        await peer.reader.read()

    async with Server(not_websocket) as server:
        with pytest.raises(HandshakeError, match=r"^HTTP 200 OK: hi$"):
            await open_client(server.url + "/stream")
    async with Server(garbage) as server:
        with pytest.raises(HandshakeError, match="did not receive a valid HTTP response"):
            await open_client(server.url + "/stream")
    async with Server(silent) as server:
        with pytest.raises(TimeoutError, match=r"no WebSocket handshake within 0\.2 s"):
            await open_client(server.url + "/stream", open_timeout=0.2)


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_frames_sent_with_the_101_response_and_fragmented_messages_arrive(impl):
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        # The upgrade response and two messages in one write: one socket read for the client.
        peer.writer.write(peer.accept_bytes() + peer.frame(agg(1)) + peer.frame(agg(2)))
        whole = agg(3)
        peer.writer.write(
            peer.frame(whole[:10], fin=False)
            + peer.frame(whole[10:50], Opcode.CONT, fin=False)
            + peer.frame(whole[50:], Opcode.CONT)
            + peer.frame(agg(4))
        )
        await peer.reader.read()

    async with Server(handler) as server:
        run = Run(server.url, impl)
        await run.until(lambda: len(run.ids) >= 4)
    assert run.ids == [1, 2, 3, 4]
    assert run.counters.total("malformed_frames") == 0


# --------------------------------------------------------------------------- pings and closes


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_server_pings_get_their_payload_back_and_an_unanswered_keepalive_ends_it(impl):
    pongs: list[bytes] = []
    pings: list[bytes] = []

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(peer.accept_bytes() + peer.frame(agg(1)))
        peer.writer.write(peer.frame(b"are you there", Opcode.PING))
        if not pongs:
            # Read until the pong (and the client's own keep-alive ping) came back.
            while not (pongs and pings):
                data = await peer.reader.read(65536)
                if not data:
                    return
                peer.proto.receive_data(data)
                for event in peer.proto.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.PONG:
                        pongs.append(bytes(event.data))
                    if isinstance(event, Frame) and event.opcode is Opcode.PING:
                        pings.append(bytes(event.data))
        # From now on this server reads nothing: the client's next ping is never answered.
        await anyio.sleep_forever()

    async with Server(handler) as server:
        run = Run(server.url, impl, ping_interval=0.2, ping_timeout=0.3)
        await run.until(lambda: len(run.reconnects) >= 1)
    assert pongs[0] == b"are you there"
    assert len(pings[0]) == 4
    assert run.counters.get("ws_reconnects") >= 1
    if impl == "protocol":
        assert run.reconnects[0] == "keepalive timeout"


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("code", "reason"), [(1000, "disconnect"), (1008, "close 1008")])
async def test_a_server_close_frame_is_echoed_and_its_code_is_the_reason(impl, code, reason):
    echoed: list[int] = []

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if len(server.peers) > 1:
            peer.writer.write(peer.accept_bytes() + peer.frame(agg(9)))
            await peer.reader.read()
            return
        peer.writer.write(peer.accept_bytes() + peer.frame(agg(1)) + peer.close_frame(code, "bye"))
        frames = await peer.client_frames()
        echoed.extend(int.from_bytes(f.data[:2], "big") for f in frames if f.opcode is Opcode.CLOSE)

    async with Server(handler) as server:
        run = Run(server.url, impl)
        await run.until(lambda: run.ids == [1, 9])
    assert echoed == [code], "the client answers the close frame with the same code"
    assert run.counters.get("ws_reconnects") == 1 and run.counters.get("ws_disconnects") >= 1
    if impl == "protocol":
        assert run.reconnects == [reason]
    else:
        assert len(run.reconnects) == 1


# --------------------------------------------------------------------------- the receive path


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        pass


@pytest.mark.anyio
async def test_one_callback_and_one_timestamp_per_socket_read():
    client = WsClient(parse_uri("ws://127.0.0.1:1/stream"), ping_interval=None)
    transport = FakeTransport()
    client.connection_made(transport)
    server = ServerProtocol()
    server.receive_data(b"".join(transport.written))
    (request,) = server.events_received()
    server.send_response(server.accept(request))
    calls: list[tuple[list[bytes], int]] = []
    client.start(lambda payloads, ns: calls.append(([bytes(p) for p in payloads], ns)))
    client.data_received(b"".join(server.data_to_send()))
    assert client.handshake.done() and client.handshake.exception() is None
    for n in (1, 3):
        for i in range(n):
            server.send_text(agg(i))
        server.send_ping(b"p")
        data = b"".join(server.data_to_send())
        client.data_received(data[:-3])  # a read may end inside a frame...
        client.data_received(data[-3:])  # ...which completes with the next read
    assert [len(p) for p, _ in calls] == [1, 3]
    assert calls[1][0] == [agg(0), agg(1), agg(2)]
    assert calls[0][1] < calls[1][1], "the timestamp is the read's, taken per read"
    # Both pings were answered with their payload.
    server.receive_data(b"".join(transport.written[1:]))
    pongs = [e.data for e in server.events_received() if e.opcode is Opcode.PONG]
    assert pongs == [b"p", b"p"]
    client.pause_reading()
    assert client.paused and not transport.reading
    client.resume_reading()
    assert not client.paused and transport.reading


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_a_failing_record_handler_ends_only_that_connection(impl, caplog):
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        base = 100 * len(server.peers)
        peer.writer.write(
            peer.accept_bytes() + b"".join(peer.frame(agg(base + i)) for i in range(3))
        )
        await peer.reader.read()

    async with Server(handler) as server:
        run = Run(server.url, impl)
        inner = run.on_record

        def on_record(record) -> None:
            if record.trade_id == 101:
                raise ValueError("a bug downstream")
            inner(record)

        run.manager._on_record = on_record
        await run.until(lambda: 200 in run.ids)
    assert run.ids[:2] == [100, 200], "the rest of the bad read is dropped, then reconnected"
    assert run.reconnects[0] == "disconnect (ValueError)"


@pytest.mark.anyio
async def test_pause_reading_stops_the_socket_until_resumed():
    blocked = anyio.Event()

    async def flood(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(peer.accept_bytes())
        peer.writer.transport.set_write_buffer_limits(high=64 * 1024)
        i = 0
        while True:
            peer.writer.write(b"".join(peer.frame(agg(i + k)) for k in range(50)))
            i += 50
            if peer.writer.transport.get_write_buffer_size() > 64 * 1024:
                blocked.set()  # the client stopped reading: the kernel buffers are full
            await peer.writer.drain()

    async with Server(flood) as server:
        run = Run(server.url, "protocol")
        manager = run.manager
        at_pause: list[int] = []

        async def scenario() -> None:
            await wait(lambda: len(run.ids) > 1000)
            manager.pause_reading()
            with anyio.fail_after(10):
                await blocked.wait()
            for _ in range(100):
                await anyio.sleep(0)  # what was read before the pause is still handed over
            at_pause.append(len(run.ids))
            for _ in range(100):
                await anyio.sleep(0)  # event loop turns: a reading socket would deliver
            at_pause.append(len(run.ids))
            manager.resume_reading()
            await wait(lambda: len(run.ids) > at_pause[1] + 1000)

        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.run)
            await scenario()
            tg.cancel_scope.cancel()
    assert at_pause[0] == at_pause[1], "nothing was read while paused"
    assert run.ids == list(range(len(run.ids))), "nothing lost across the pause"
    assert run.counters.get("ws_read_pauses") == 1 and run.counters.get("ws_stalls") == 0


async def wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_each_socket_read_returns_to_the_event_loop():
    """While frames keep arriving, another task runs after every single read."""
    reads_between_turns: list[int] = []

    async def flood(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(peer.accept_bytes())
        i = 0
        while True:
            peer.writer.write(b"".join(peer.frame(agg(i + k)) for k in range(200)))
            i += 200
            await peer.writer.drain()

    async with Server(flood) as server:
        run = Run(server.url, "protocol")

        async def ticker() -> None:
            await wait(lambda: len(run.ids) > 1000)
            client = run.manager.live[0].ws
            assert isinstance(client, WsClient)
            last = client.reads
            while len(run.ids) < 50_000:
                await anyio.sleep(0)
                reads_between_turns.append(client.reads - last)
                last = client.reads

        async with anyio.create_task_group() as tg:
            tg.start_soon(run.manager.run)
            with anyio.fail_after(20):
                await ticker()
            tg.cancel_scope.cancel()
    assert max(reads_between_turns) == 1, "never two reads without another task's turn"
    assert sum(reads_between_turns) > 10


# --------------------------------------------------------------------------- TLS


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(TLS / "localhost.pem", TLS / "localhost.key")
    client = ssl.create_default_context(cafile=TLS / "localhost.pem")
    return server, client


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_wss_with_a_trusted_certificate(impl):
    server_ctx, client_ctx = _tls_contexts()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(peer.accept_bytes() + peer.frame(agg(1)) + peer.frame(agg(2)))
        peer.writer.write(peer.frame(b"tls ping", Opcode.PING))
        frames = await peer.client_frames()
        assert any(f.opcode is Opcode.PONG and f.data == b"tls ping" for f in frames)

    async with Server(handler, tls=server_ctx) as server:
        assert server.url.startswith("wss://")
        run = Run(server.url, impl, ssl=client_ctx)
        await run.until(lambda: run.ids == [1, 2])


@pytest.mark.anyio
@pytest.mark.parametrize("impl", IMPLS)
async def test_wss_refuses_an_untrusted_certificate(impl, caplog):
    server_ctx, _ = _tls_contexts()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.write(peer.accept_bytes() + peer.frame(agg(1)))

    caplog.set_level(logging.WARNING, logger=LOG.name)
    async with Server(handler, tls=server_ctx) as server:
        run = Run(server.url, impl, ssl=ssl.create_default_context())  # system CAs only
        await run.until(lambda: run.counters.get("ws_connect_failures") >= 1)
    assert run.ids == []
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_a_big_read_is_handed_over_in_turns_with_reading_held():
    """A read of 300 messages: 128 now, 128 and 44 on the next loop turns (other tasks run
    in between), socket reading held until the last turn, order and timestamp kept."""
    from streamer.plugins.exchanges.binance import _wsproto

    client = WsClient(parse_uri("ws://127.0.0.1:1/stream"), ping_interval=None)
    transport = FakeTransport()
    client.connection_made(transport)
    server = ServerProtocol()
    server.receive_data(b"".join(transport.written))
    (request,) = server.events_received()
    server.send_response(server.accept(request))
    client.data_received(b"".join(server.data_to_send()))
    calls: list[tuple[list[bytes], int, bool]] = []
    client.start(lambda p, ns: calls.append(([bytes(x) for x in p], ns, transport.reading)))
    for i in range(300):
        server.send_text(agg(i))
    client.data_received(b"".join(server.data_to_send()))
    assert _wsproto.TURN_MESSAGES == 128
    assert [len(c[0]) for c in calls] == [128] and not transport.reading
    await asyncio.sleep(0)
    assert [len(c[0]) for c in calls] == [128, 128] and not transport.reading
    await asyncio.sleep(0)
    assert [len(c[0]) for c in calls] == [128, 128, 44] and transport.reading
    assert [m for c in calls for m in c[0]] == [agg(i) for i in range(300)]
    assert len({c[1] for c in calls}) == 1, "one read, one receive time"
