"""The ``nats`` sink: records to NATS JetStream, for storage nodes and live consumers.

Each record is one message on ``<subject_prefix>.<exchange>.<market>.<stream>.<symbol>``
(markers: ``...<market>.markers.<symbol>``), encoded as MessagePack or JSON and carrying a
``Nats-Msg-Id`` built from its key (see :mod:`._nats_common` for both), so JetStream keeps
one copy of what redundant collectors of the same symbols publish within the stream's
``duplicate_window``.

How it writes: :meth:`NatsSink.write` encodes records into an in-memory, ordered buffer
and publishes them at once, pipelined (at most ``publish_batch`` messages awaiting their
acknowledgement), so a record reaches the broker as soon as the writer has it;
:meth:`NatsSink.flush` (every ``flush_interval``) waits for the acknowledgements of what is
in flight, oldest first, and publishes what is still buffered: a record counts as flushed
once JetStream acknowledged it. A failure (broker down, a timeout) puts the unacknowledged
rest back in the buffer, in order, publishing from ``write`` pauses, and the next flush
retries it (re-publishing with the same message id is harmless). Beyond
``max_buffered_records`` (buffered and in flight) new records are dropped, counted per
stream (``records_dropped``) and reported as ``gap`` markers once publishing works again,
as the CSV sink does. Rows still unacknowledged at close are counted as lost; the next
collector run resumes from :meth:`NatsSink.holdings` (the last key of each stream in
JetStream) and backfills them.

Holdings: at open, the last message of every subject under the prefix (one direct read per
subject), so a restarted collector (or a second one) resumes from what the stream holds;
afterwards the newest acknowledged key per stream.

Counters, per (symbol, stream): ``records_published``, ``records_duplicate`` (JetStream
already had them: another collector, or a retry), ``records_dropped``; process-wide:
``publish_errors``, ``publish_batches``, ``gap_markers``; gauge ``records_buffered``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import anyio
import msgspec

from streamer import (
    AGGTRADE_STREAM,
    DEPTH_STREAM,
    KLINE_STREAM_PREFIX,
    ORDERBOOK_STREAM,
    Duration,
    Kline,
    Marker,
    RateLimitedLog,
    Record,
    Sink,
    SinkContext,
    StreamKey,
    check_duration,
    hookimpl,
    interval_ms,
    record_key,
    record_time,
    stream_key,
)

from . import _nats_common as common

__all__ = ["NatsSink", "Options"]


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``nats`` sink (the ``sinks.<name>`` section of the YAML config)."""

    #: Server URL (several: comma-separated).
    url: str = "nats://127.0.0.1:4222"
    #: JetStream stream; created for ``<subject_prefix>.>`` when missing.
    stream: str = "MARKET"
    #: First subject token(s).
    subject_prefix: str = "md"
    #: Payload encoding: ``msgpack`` (compact) or ``json`` (for other languages).
    encoding: Literal["msgpack", "json"] = "msgpack"
    #: How often the writer waits for acknowledgements (and retries what failed).
    flush_interval: Duration = "100ms"
    #: Messages published whose acknowledgement has not arrived yet, at most.
    publish_batch: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4000
    #: Seconds to wait for a batch's acknowledgements before retrying it later.
    publish_timeout: Duration = "5s"
    #: Records kept while the broker is unreachable; beyond it they are dropped and reported.
    max_buffered_records: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 1_000_000
    #: A created stream's de-duplication window (redundant collectors, retries).
    duplicate_window: Duration = "2m"
    #: A created stream's message age limit (0: none).
    max_age: Duration = "7d"
    #: A created stream's size limit in MB (0: none).
    max_mb: Annotated[int, msgspec.Meta(ge=0)] = 10_000

    def __post_init__(self) -> None:
        check_duration("flush_interval", self.flush_interval, positive=True)
        check_duration("publish_timeout", self.publish_timeout, positive=True)
        check_duration("duplicate_window", self.duplicate_window, positive=True)
        check_duration("max_age", self.max_age)


_HELD_STREAMS = (AGGTRADE_STREAM, DEPTH_STREAM, ORDERBOOK_STREAM)

_Entry = tuple[str, bytes, dict[str, str], StreamKey | None, int | None]


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: ``{"stream", "seq", "duplicate"}`` or an error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: Any = None


#: An answer that is not a publish acknowledgement (no responders, garbage).
_NO_ACK = _PubAck(error={"description": "no acknowledgement (is the stream there?)"})
_ack_decoder = msgspec.json.Decoder(_PubAck)


class _Drop:
    __slots__ = ("first_key", "last_key", "time")

    def __init__(self, first_key: int, time_ms: int) -> None:
        self.first_key = first_key
        self.last_key = first_key
        self.time = time_ms


class NatsSink(Sink):
    """Publishes records to JetStream; see the module docstring."""

    Options = Options

    @classmethod
    def check(cls, options: Options) -> None:
        """The driver is installed, and the URL, stream and prefix are well formed."""
        common.check_common(options.url, options.stream, options.subject_prefix)

    def __init__(self, options: Options, context: SinkContext) -> None:
        super().__init__(options, context)
        self._opts = options
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger, interval=30.0)
        self._timeout = common.seconds(options.publish_timeout)
        #: (subject, payload, headers, stream key or None, key or None), oldest first.
        self._buffer: deque[_Entry] = deque()
        #: Published, acknowledgement awaited: (entry, publish id), oldest first; all
        #: older than what is in ``_buffer``.
        self._inflight: deque[tuple[_Entry, int]] = deque()
        #: Acknowledgements received (publish id -> ack), and the publish ids: each
        #: publish asks for its acknowledgement on ``<reply prefix><id>``.
        self._acks: dict[int, _PubAck] = {}
        self._next_id = 0
        self._live_from = 0  # acknowledgements of older ids (given up on) are ignored
        self._ack_event = anyio.Event()
        self._reply_prefix = ""
        #: Set by a failure: ``write`` stops publishing until a flush succeeds.
        self._failing = False
        self._held: dict[StreamKey, int] = {}
        self._drops: dict[StreamKey, _Drop] = {}
        self._nc: Any = None
        self._js: Any = None
        self._holdings_read = False
        self._lost = 0

    async def _connect(self) -> None:
        import nats

        self._nc = await nats.connect(
            servers=[u.strip() for u in self._opts.url.split(",")],
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            name=f"streamer-sink-{self.context.name}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
        )
        self._js = self._nc.jetstream(timeout=self._timeout)
        await common.ensure_stream(self._js, self._opts)
        # Publish acknowledgements come back on one wildcard inbox, read by one callback
        # (nats-py's publish_async costs a future, a semaphore and an id per message).
        self._reply_prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(self._reply_prefix + "*", cb=self._on_ack)

    async def _on_ack(self, msg: Any) -> None:
        try:
            publish_id = int(msg.subject[len(self._reply_prefix) :])
        except ValueError:
            return
        if publish_id < self._live_from:
            return
        try:
            ack = _ack_decoder.decode(msg.data) if msg.data else _NO_ACK
        except msgspec.DecodeError:
            ack = _NO_ACK
        self._acks[publish_id] = ack
        self._ack_event.set()

    async def _on_error(self, exc: Exception) -> None:
        self._log.warning("nats_error", "nats: %s", exc)

    async def _on_disconnect(self) -> None:
        self._counters.incr("disconnects")

    async def open(self) -> None:
        """Connect and create the stream when missing (raising ends the run)."""
        await self._connect()

    async def holdings(self) -> dict[StreamKey, int]:
        """The last key per stream in JetStream (read once), then what was acknowledged."""
        if not self._holdings_read and self._js is not None:
            self._holdings_read = True
            for key, value in (await self._read_holdings()).items():
                self._held[key] = max(value, self._held.get(key, value))
        return dict(self._held)

    async def _read_holdings(self) -> dict[StreamKey, int]:
        info = await self._js.stream_info(
            self._opts.stream, subjects_filter=f"{self._opts.subject_prefix}.>"
        )
        held: dict[StreamKey, int] = {}
        for subject in sorted(info.state.subjects or {}):
            stream = subject.split(".")[-2]
            if stream not in _HELD_STREAMS and not stream.startswith(KLINE_STREAM_PREFIX):
                continue
            msg = await self._js.get_last_msg(self._opts.stream, subject)
            try:
                record = common.decode(msg.data or b"")
            except (msgspec.DecodeError, ValueError):
                continue
            key = record_key(record)
            if key is None:
                continue
            if type(record) is Kline and not record.closed:
                key -= interval_ms(record.interval)  # the bar before it is the last closed
            held[stream_key(record)] = key
        return held

    async def write(self, batch: Sequence[Record]) -> None:
        """Encode ``batch`` into the buffer (publishing happens in :meth:`flush`)."""
        encoding = self._opts.encoding
        prefix = self._opts.subject_prefix
        cap = self._opts.max_buffered_records - len(self._inflight)
        buffer = self._buffer
        for record in batch:
            is_marker = type(record) is Marker
            if len(buffer) >= cap and not is_marker:
                self._drop(record)
                continue
            headers = {"Nats-Msg-Id": common.msg_id(record)}
            sk = None if is_marker else stream_key(record)
            key = None
            if not is_marker and (type(record) is not Kline or record.closed):
                key = record_key(record)
            subject = common.subject_of(prefix, record)
            buffer.append((subject, common.encode(record, encoding), headers, sk, key))
        if not self._failing and self._nc is not None and self._nc.is_connected:
            self._harvest()
            await self._send()
        self._counters.set("records_buffered", self.pending_rows)

    async def _send(self) -> None:
        """Publish buffered messages, oldest first, while fewer than ``publish_batch`` are
        in flight; a failure leaves the rest buffered (the next flush deals with it)."""
        buffer, inflight = self._buffer, self._inflight
        room = self._opts.publish_batch - len(inflight)
        publish = self._nc.publish
        prefix = self._reply_prefix
        try:
            while buffer and room > 0:
                entry = buffer[0]
                publish_id = self._next_id
                await publish(entry[0], entry[1], reply=f"{prefix}{publish_id}", headers=entry[2])
                self._next_id = publish_id + 1
                buffer.popleft()
                inflight.append((entry, publish_id))
                room -= 1
        except Exception as exc:  # connection lost, outbound buffer full...
            self._failing = True
            self._failed(exc)

    def _harvest(self) -> None:
        """Count the acknowledgements already received, oldest first (no waiting)."""
        inflight, acks = self._inflight, self._acks
        while inflight:
            entry, publish_id = inflight[0]
            ack = acks.get(publish_id)
            if ack is None or ack.error is not None:
                return
            del acks[publish_id]
            inflight.popleft()
            self._acked(entry, ack)

    def _acked(self, entry: _Entry, ack: Any) -> None:
        _, _, _, sk, key = entry
        if sk is None:
            return
        held = self._held
        if key is not None and key > held.get(sk, key - 1):
            held[sk] = key
        name = "records_duplicate" if ack.duplicate else "records_published"
        self._counters.incr(name, sk.symbol, sk.stream)

    def _drop(self, record: Record) -> None:
        sk = stream_key(record)
        key = record_key(record) or 0
        drop = self._drops.get(sk)
        if drop is None:
            drop = self._drops[sk] = _Drop(key, record_time(record))
        drop.last_key = max(drop.last_key, key)
        self._counters.incr("records_dropped", sk.symbol, sk.stream)
        self._log.error(
            "dropped",
            "publish buffer full (%d records, max_buffered_records): dropping records; a gap "
            "marker follows once publishing works again",
            self.pending_rows,
        )

    async def flush(self) -> None:
        """Wait for what is in flight, then publish and settle the buffer; a failure puts
        the unacknowledged rest back in the buffer, in order, for the next flush."""
        if not self._buffer and not self._inflight and not self._drops:
            return
        if self._js is None:
            try:
                await self._connect()
            except Exception as exc:
                self._failed(exc)
                return
        ok = await self._settle()
        while ok and self._buffer:
            await self._send()
            ok = not self._failing and await self._settle()
        if ok and self._drops:
            await self._report_drops()
        self._counters.set("records_buffered", self.pending_rows)

    async def _settle(self) -> bool:
        """Wait for every acknowledgement in flight (``publish_timeout`` in all); True when
        all came, else the unacknowledged ones go back to the front of the buffer."""
        inflight = self._inflight
        error: BaseException | None = None
        if inflight:
            try:
                with anyio.fail_after(self._timeout):
                    while inflight:
                        self._harvest()
                        if not inflight:
                            break
                        ack = self._acks.get(inflight[0][1])
                        if ack is not None:  # an error
                            raise RuntimeError(f"publish refused: {ack.error}")
                        self._ack_event = anyio.Event()
                        if self._acks.get(inflight[0][1]) is None:
                            await self._ack_event.wait()
            except Exception as exc:  # timeout, connection lost, stream error...
                error = exc
            self._counters.incr("publish_batches")
        if error is None:
            self._failing = False
            return True
        for entry, _ in reversed(inflight):
            self._buffer.appendleft(entry)
        inflight.clear()
        self._acks.clear()
        self._live_from = self._next_id
        self._failing = True
        self._failed(error)
        return False

    def _failed(self, exc: BaseException) -> None:
        self._counters.incr("publish_errors")
        self._log.error(
            "publish",
            "publishing to %s failed (%s: %s); %d records buffered, retrying",
            self._opts.url,
            type(exc).__name__,
            exc,
            self.pending_rows,
        )

    async def _report_drops(self) -> None:
        drops, self._drops = self._drops, {}
        now = time.time_ns() // 1_000_000
        markers: list[Record] = [
            Marker(sk.exchange, sk.market, sk.symbol, sk.stream, "gap", d.first_key,
                   d.last_key, d.time or now, "nats unreachable: publish buffer full")
            for sk, d in sorted(drops.items())
        ]  # fmt: skip
        self._counters.incr("gap_markers", n=len(markers))
        await self.write(markers)
        ok = await self._settle()
        while ok and self._buffer:
            await self._send()
            ok = not self._failing and await self._settle()

    async def close(self) -> None:
        """Publish what is buffered; what cannot be published is counted as lost."""
        await self.flush()
        self._lost = self.pending_rows
        if self._lost:
            self._log.error(
                "lost",
                "closing with %d records that could not be published; the next run "
                "resumes from what the stream holds",
                self._lost,
            )
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    @property
    def pending_rows(self) -> int:
        """Records buffered or in flight, not yet acknowledged by JetStream."""
        return len(self._buffer) + len(self._inflight)


@hookimpl
def register_sinks(register) -> None:
    """Register the ``nats`` sink."""
    register("nats", NatsSink)


@hookimpl
def register_sources(register) -> None:
    """Register the ``nats`` source (``streamer store``)."""
    from ._nats_source import NatsSource

    register("nats", NatsSource)
