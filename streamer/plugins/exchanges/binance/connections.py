"""WebSocket connection management for Binance combined streams.

A :class:`ConnectionManager` splits stream names into groups of at most
``max_streams`` (Binance allows 1024 per connection) and keeps one connection per group
alive forever:

* reconnect with capped, jittered exponential backoff and unlimited retries (the first
  retry after a drop is immediate);
* at most ``max_new_connections`` new connections per rolling 5 minutes (Binance: 300 per
  IP), shared by every group of the manager;
* a no-data watchdog closes a connection that stays silent for ``no_data_timeout``;
* ``serverShutdown`` and the age limit (``rotate_after`` and/or a time of day) trigger a
  make-before-break replacement: the new connection is receiving before the old one is
  closed, and the stream types drop the duplicates of the overlap by id;
* ``on_reconnect(symbols, reason)`` is called whenever a connection was replaced after
  the old one had already stopped, i.e. whenever data may have been missed.

The server's pings are answered by ``websockets`` with a pong echoing the payload; no
other frames are sent (streams are named in the URL, never SUBSCRIBEd), so the control
message rate limit (5/s spot, 10/s futures) is never approached.

Two receive paths (``ConnectionSettings.ws_impl``, the adapter's ``ws_impl`` option):

* ``protocol`` (default): :mod:`._wsproto`, websockets' sans-I/O ``ClientProtocol`` on a
  plain ``asyncio.Protocol``. Each socket read is parsed and its whole messages decoded
  and delivered in one callback, then the event loop runs other tasks: no per-message
  queue, future or task switch. ``receive_time`` is taken once per socket read (every
  message of one read gets the same millisecond: the time the bytes arrived, which is
  never later than the per-message time of the other path, where a message waits in the
  connection's queue until ``recv()`` takes it). :meth:`ConnectionManager.pause_reading`
  stops reading the sockets (TCP backpressure onto the exchange). A connection whose URL
  goes through a proxy configured in the environment uses the other path.
* ``connection``: the ``websockets.asyncio`` connection object and ``recv()`` per message,
  as before; kept for one release.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK

from streamer import Counters, RateLimitedLog, Record

from ._wsproto import WsClient, open_client, proxy_for
from .decode import ControlError, FrameDecoder, FrameError, ServerShutdown

OnRecord = Callable[[Record], None]
OnReconnect = Callable[[Sequence[str], str], None]


@dataclass(frozen=True)
class StreamGroup:
    """One connection's worth of streams: the URL to open and the symbols it carries."""

    url: str
    streams: tuple[str, ...]
    symbols: tuple[str, ...]


def build_groups(base: str, streams: Sequence[str], max_streams: int) -> list[StreamGroup]:
    """Split lowercase ``streams`` into combined-stream URLs under ``base``.

    ``base`` is the WebSocket base including any route (``wss://host:9443`` for spot,
    ``wss://fstream.binance.com/market`` for USD-M). Streams of one symbol stay together
    where the group size allows, so one reconnect touches as few symbols as possible.
    """
    if not 1 <= max_streams <= 1024:
        raise ValueError(f"max_streams_per_connection must be 1..1024, got {max_streams}")
    ordered = sorted(dict.fromkeys(streams), key=lambda s: (s.partition("@")[0], s))
    groups = []
    for i in range(0, len(ordered), max_streams):
        chunk = tuple(ordered[i : i + max_streams])
        symbols = tuple(sorted({s.partition("@")[0].upper() for s in chunk}))
        url = f"{base.rstrip('/')}/stream?streams={'/'.join(chunk)}"
        groups.append(StreamGroup(url, chunk, symbols))
    return groups


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def _wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(_wait, event)


class ConnectionRateLimiter:
    """At most ``limit`` new connections per rolling ``window`` seconds."""

    def __init__(self, limit: int = 300, window: float = 300.0) -> None:
        self.limit = limit
        self.window = window
        self._opened: deque[float] = deque()
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        """Wait for a free slot in the window and take it."""
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._opened and now - self._opened[0] >= self.window:
                    self._opened.popleft()
                if len(self._opened) < self.limit:
                    self._opened.append(now)
                    return
                await anyio.sleep(self.window - (now - self._opened[0]) + 0.01)


@dataclass
class ConnectionSettings:
    """Tunables of a :class:`ConnectionManager` (the adapter fills them from its options)."""

    market: str
    max_streams: int = 200
    no_data_timeout: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    #: Replace a connection after this many seconds (0 disables); Binance cuts at 24 h.
    rotate_after: float = 23 * 3600.0
    #: Also replace connections daily at this UTC second of day (None disables).
    rotate_at_second: int | None = None
    #: Seconds the old connection stays open after its replacement delivered data.
    overlap: float = 2.0
    open_timeout: float = 10.0
    #: A connection that delivered data for this long was healthy: when it drops, the
    #: reconnect is immediate and the backoff starts over. One that dies younger keeps
    #: backing off (a server that accepts and then drops at once is not hammered; the
    #: connection rate limiter bounds the rest).
    healthy_after: float = 10.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    rng: random.Random = field(default_factory=random.Random)
    #: ``protocol`` (sans-I/O on an asyncio protocol) or ``connection`` (websockets'
    #: connection object, the previous path; kept for one release).
    ws_impl: str = "protocol"
    #: TLS context for ``wss://`` (None: the system's default verification).
    ssl: ssl.SSLContext | None = None


class _Live:
    """One open WebSocket and its reader state."""

    __slots__ = ("data_seen", "ended", "last_data", "opened", "reason", "ws")

    def __init__(self, ws: ClientConnection | WsClient) -> None:
        self.ws = ws
        self.opened = time.monotonic()
        self.last_data = self.opened
        self.data_seen = anyio.Event()
        self.ended = anyio.Event()
        self.reason = ""


class ConnectionManager:
    """Keeps every :class:`StreamGroup` connected and feeds decoded records to ``on_record``."""

    def __init__(
        self,
        groups: Sequence[StreamGroup],
        settings: ConnectionSettings,
        *,
        on_record: OnRecord,
        on_reconnect: OnReconnect,
        counters: Counters,
        logger: logging.Logger,
        limiter: ConnectionRateLimiter,
    ) -> None:
        self.groups = list(groups)
        self.settings = settings
        self._on_record = on_record
        self._on_reconnect = on_reconnect
        self._counters = counters
        self._logger = logger
        self._log = RateLimitedLog(logger, 60.0)
        self._limiter = limiter
        self._messages = 0
        #: Live connections by group index (tests use it to inject faults).
        self.live: dict[int, _Live] = {}
        self._rotate_now: set[int] = set()
        self._wake: dict[int, anyio.Event] = {}
        self._paused = False
        self._proxy_logged = False
        if settings.ws_impl not in ("protocol", "connection"):
            raise ValueError(
                f"ws_impl must be 'protocol' or 'connection', got {settings.ws_impl!r}"
            )

    async def run(self) -> None:
        """Run every group's connection until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publish_counters)
            for index, group in enumerate(self.groups):
                tg.start_soon(self._run_group, index, group)

    def request_rotation(self, index: int | None = None) -> None:
        """Replace group ``index``'s connection (every group when None), make-before-break."""
        targets = range(len(self.groups)) if index is None else [index]
        for i in targets:
            self._rotate_now.add(i)
            event = self._wake.get(i)
            if event is not None:
                event.set()

    @property
    def paused(self) -> bool:
        """True between :meth:`pause_reading` and :meth:`resume_reading`."""
        return self._paused

    def pause_reading(self) -> None:
        """Stop reading every connection's socket (backpressure) until :meth:`resume_reading`.

        Only the ``protocol`` path pauses (the ``connection`` path's own queue manages its
        socket). While paused nothing is read, so server pings go unanswered: keep pauses
        well below the server's pong timeout (60 s spot). The no-data watchdog and the
        keep-alive pong deadline do not count paused time. Connections opened while paused
        start paused.
        """
        if self._paused:
            return
        self._paused = True
        self._counters.incr("ws_read_pauses")
        for live in self.live.values():
            if isinstance(live.ws, WsClient):
                live.ws.pause_reading()

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`."""
        if not self._paused:
            return
        self._paused = False
        now = time.monotonic()
        for live in self.live.values():
            live.last_data = max(live.last_data, now)
            if isinstance(live.ws, WsClient):
                live.ws.resume_reading()

    # ------------------------------------------------------------------ internals

    async def _publish_counters(self) -> None:
        # The message count is kept in a plain int on the hot path and published here,
        # with ``ws_loop_lag_ms``: the most a 0.25 s sleep of this task overslept during
        # the last second, i.e. how long the event loop ran other work without yielding
        # (a receive path that starves the worker's flush and send tasks shows here).
        clock = time.monotonic
        while True:
            worst = 0.0
            for _ in range(4):
                t0 = clock()
                await anyio.sleep(0.25)
                worst = max(worst, clock() - t0 - 0.25)
            self._counters.set("ws_loop_lag_ms", int(worst * 1000))
            self._flush_message_count()

    def _flush_message_count(self) -> None:
        if self._messages:
            self._counters.incr("ws_messages", n=self._messages)
            self._messages = 0

    def _backoff(self, failures: int) -> float:
        if failures <= 1:
            return 0.0
        s = self.settings
        delay = min(s.backoff_max, s.backoff_base * 2 ** (failures - 2))
        return delay * (0.5 + s.rng.random() / 2)

    def _rotation_delay(self, opened_wall: float) -> float:
        s = self.settings
        delays = []
        if s.rotate_after > 0:
            delays.append(s.rotate_after)
        if s.rotate_at_second is not None:
            since_midnight = opened_wall % 86400
            delay = (s.rotate_at_second - since_midnight) % 86400
            delays.append(delay if delay > 60 else delay + 86400)
        return min(delays) if delays else float("inf")

    async def _open(self, group: StreamGroup, failures: int) -> tuple[ClientConnection, int]:
        """Connect, retrying forever; returns the socket and the updated failure count."""
        s = self.settings
        while True:
            delay = self._backoff(failures)
            if delay:
                await anyio.sleep(delay)
            await self._limiter.acquire()
            self._counters.incr("ws_connects")
            try:
                ws: ClientConnection | WsClient
                if s.ws_impl == "protocol" and not self._proxied(group.url):
                    ws = await open_client(
                        group.url,
                        open_timeout=s.open_timeout,
                        ssl=s.ssl,
                        ping_interval=s.ping_interval,
                        ping_timeout=s.ping_timeout,
                        close_timeout=2.0,
                        max_size=2**22,
                    )
                    if self._paused:
                        ws.pause_reading()
                else:
                    tls = {"ssl": s.ssl} if s.ssl is not None and group.url[:4] == "wss:" else {}
                    ws = await connect(
                        group.url,
                        open_timeout=s.open_timeout,
                        ping_interval=s.ping_interval,
                        ping_timeout=s.ping_timeout,
                        close_timeout=2.0,
                        compression=None,
                        max_size=2**22,
                        **tls,
                    )
                return ws, failures
            except Exception as exc:  # any failure to connect is retried forever
                failures += 1
                self._counters.incr("ws_connect_failures")
                self._log.warning(
                    "ws_connect_failed",
                    "cannot connect (%d failures, retrying): %s: %s",
                    failures, type(exc).__name__, exc,
                )  # fmt: skip

    def _proxied(self, url: str) -> bool:
        proxy = proxy_for(url)
        if proxy is not None and not self._proxy_logged:
            self._proxy_logged = True
            self._logger.info("a proxy is configured for %s: using ws_impl 'connection'", url)
        return proxy is not None

    async def _run_group(self, index: int, group: StreamGroup) -> None:
        failures = 0
        current: _Live | None = None
        reason = ""
        async with anyio.create_task_group() as tg:
            while True:
                ws, failures = await self._open(group, failures)
                new = _Live(ws)
                tg.start_soon(self._receive if isinstance(ws, WsClient) else self._read, new, group)
                tg.start_soon(self._watchdog, new)
                old, current = current, new
                self.live[index] = new
                if old is not None:
                    lost = old.ended.is_set()
                    if not lost:
                        # Make-before-break: keep the old one until the new one delivers.
                        with anyio.move_on_after(self.settings.overlap + 10):
                            await _first_of(new.data_seen, new.ended)
                        failed = new.ended.is_set() and not new.data_seen.is_set()
                        if failed and not old.ended.is_set():
                            # The replacement failed: keep the old one and retry.
                            failures += 1
                            current = old
                            self.live[index] = old
                            continue
                        lost = old.ended.is_set()
                        if not lost:
                            with anyio.move_on_after(self.settings.overlap):
                                await old.ended.wait()
                        await self._close(old, "replaced")
                    if lost:
                        # The old connection stopped before this one delivered: data may
                        # be missing, so the stream types must check.
                        self._counters.incr("ws_reconnects")
                        self._on_reconnect(group.symbols, old.reason or reason or "disconnect")
                    else:
                        self._counters.incr("ws_rotations")
                # Wait until this connection ends or must be rotated.
                wake = anyio.Event()
                self._wake[index] = wake
                if index in self._rotate_now:
                    wake.set()
                rotate_in = self._rotation_delay(time.time())
                with anyio.move_on_after(rotate_in):
                    async with anyio.create_task_group() as waiters:

                        async def _ended(live: _Live = new, scope=waiters.cancel_scope) -> None:
                            await live.ended.wait()
                            scope.cancel()

                        async def _woken(event: anyio.Event = wake, scope=waiters.cancel_scope):
                            await event.wait()
                            scope.cancel()

                        waiters.start_soon(_ended)
                        waiters.start_soon(_woken)
                if new.ended.is_set():
                    reason = new.reason or "disconnect"
                    lived = time.monotonic() - new.opened
                    # A connection that died young (or never delivered) keeps backing off.
                    healthy = lived >= self.settings.healthy_after and new.data_seen.is_set()
                    failures = 1 if healthy else failures + 1
                    if reason == "server shutdown":
                        failures = 0
                    continue
                self._rotate_now.discard(index)
                failures = 0
                reason = "rotation"
                self._logger.info("rotating connection %d (%d streams)", index, len(group.streams))

    async def _close(self, live: _Live, reason: str) -> None:
        if not live.reason:
            live.reason = reason
        with anyio.move_on_after(3):
            await live.ws.close()

    async def _watchdog(self, live: _Live) -> None:
        timeout = self.settings.no_data_timeout
        if timeout <= 0:
            return
        tick = min(1.0, timeout / 4)
        while not live.ended.is_set():
            await anyio.sleep(tick)
            if self._paused:  # nothing is read while paused: not a stall
                live.last_data = time.monotonic()
                continue
            if time.monotonic() - live.last_data > timeout and not live.ended.is_set():
                self._counters.incr("ws_stalls")
                self._log.warning("ws_stall", "no data for %.1f s: reconnecting", timeout)
                await self._close(live, "stall")
                return

    def _malformed(self, exc: FrameError) -> None:
        self._counters.incr("malformed_frames", stream=exc.kind)
        self._log.warning(f"malformed_{exc.kind}", "dropped a malformed frame: %s", str(exc)[:300])

    def _control(self, event: object, live: _Live, group: StreamGroup) -> None:
        """A frame that decoded to no record: a server shutdown notice or a control answer."""
        if isinstance(event, ServerShutdown):
            self._counters.incr("ws_server_shutdowns")
            live.reason = "server shutdown"
            # Open the replacement now; this connection keeps reading meanwhile.
            for i, g in enumerate(self.groups):
                if g is group:
                    self.request_rotation(i)
        elif isinstance(event, ControlError):
            self._counters.incr("ws_control_errors")
            self._log.error(
                "ws_control_error", "control request %r failed: %s %s",
                event.id, event.code, event.msg,
            )  # fmt: skip

    async def _receive(self, live: _Live, group: StreamGroup) -> None:
        """The ``protocol`` path: frames arrive in ``WsClient.data_received`` callbacks."""
        client = live.ws
        assert isinstance(client, WsClient)
        decoder = FrameDecoder(self.settings.market)
        decode = decoder.decode
        on_record = self._on_record
        clock = time.monotonic

        def on_messages(payloads: list, receive_ns: int) -> None:
            # One call per socket read: one clock read and one timestamp for all of it.
            live.last_data = clock()
            self._messages += len(payloads)
            receive_ms = receive_ns // 1_000_000
            delivered = False
            for raw in payloads:
                try:
                    record = decode(raw, receive_ms)
                except FrameError as exc:
                    self._malformed(exc)
                    continue
                if record is not None:
                    delivered = True
                    on_record(record)
                else:
                    self._control(decoder.event, live, group)
            if delivered and not live.data_seen.is_set():
                live.data_seen.set()

        try:
            client.start(on_messages)
            await client.wait_closed()
        finally:
            if client.error is not None:
                self._log.error(
                    "ws_record_error", "handling a record failed, reconnecting: %s: %s",
                    type(client.error).__name__, client.error,
                )  # fmt: skip
            if not live.reason:
                live.reason = client.end_reason()
            self._counters.incr("ws_disconnects")
            live.ended.set()
            self._flush_message_count()
            client.abort()  # on cancellation (shutdown) nothing else would release the socket

    async def _read(self, live: _Live, group: StreamGroup) -> None:
        decoder = FrameDecoder(self.settings.market)
        decode = decoder.decode
        on_record = self._on_record
        clock = time.monotonic
        time_ns = time.time_ns
        seen = False
        # recv(decode=False): msgspec parses the UTF-8 bytes itself, so skip str decoding.
        recv = live.ws.recv
        try:
            while True:
                raw = await recv(decode=False)
                live.last_data = clock()
                self._messages += 1
                try:
                    record = decode(raw, time_ns() // 1_000_000)
                except FrameError as exc:
                    self._malformed(exc)
                    continue
                if record is not None:
                    if not seen:
                        seen = True
                        live.data_seen.set()
                    on_record(record)
                    continue
                self._control(decoder.event, live, group)
        except ConnectionClosedOK:
            pass  # a clean close: the reason comes from the close code below
        except Exception as exc:  # a closed or broken socket ends this connection only
            if not live.reason:
                live.reason = f"disconnect ({type(exc).__name__})"
        finally:
            if not live.reason:
                code = live.ws.close_code
                live.reason = "disconnect" if code in (None, 1000, 1001) else f"close {code}"
            self._counters.incr("ws_disconnects")
            live.ended.set()
            self._flush_message_count()
            # On cancellation (shutdown) nothing else would release the socket.
            transport = getattr(live.ws, "transport", None)
            if transport is not None:
                transport.abort()
