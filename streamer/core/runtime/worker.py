"""The collector worker process: an exchange adapter, its stream types and the batcher.

Data path inside the worker (one anyio event loop)::

    adapter.stream(subs, inbox) -> _Inbox.on_record -> StreamType.on_record -> emit
    emit -> pending list -> _flush (every batch_size records or batch_interval seconds)
         -> per sink: split by writer when the sink runs as N writers (each symbol's
            writer from writer_of, cached per symbol; no split with one writer)
         -> per writer with records: its SinkEncoder's ready bytes (encode_encoded), or
            else encode_batch (once per part, shared by every sink without an encoder)
         -> one bounded queue per writer ("lane") -> sender task -> that writer's socket

The first byte of a payload tells the writer which it is (``records.ENCODED_TAG``).
Counting what was emitted (``records_emitted``, ``last_event_time``) takes one update per
chunk when an encoder ran, one per record otherwise.

``emit`` never blocks. What the worker holds for the sinks is bounded in bytes
(``runtime.worker_buffer``): records not yet sent, weighed by :func:`record_weight` (an
estimate of their Python objects from their type and number of levels), plus the encoded
payloads queued for the writers (their length). When a sink's queue is full the flusher
waits (counted as ``backpressure_waits``) and the held bytes grow:

* past half the budget the worker asks the adapter to stop reading its sockets
  (:class:`~streamer.core.api.ReadFlow`, counted as ``read_pauses``), so the exchange's
  TCP stream backs up instead of this process's memory; below a quarter it resumes;
* past the whole budget (an adapter that cannot pause, or output on a clock) records are
  dropped, counted as ``records_overflowed`` and reported to the sinks as ``overflow``
  markers, never silently.

On stop the adapter is cancelled first (no more reading), then everything held is
encoded and sent. Records still unsent after half of ``shutdown_timeout`` (a writer far
slower than the budget assumes) become ``overflow`` markers, so the writers get the rest
of the timeout to write what was queued and those markers. With the defaults the budget
drains in well under that: 32 MB per worker (at most ~4k depth records of 40 levels as
objects, or 32 MB of encoded CSV rows) plus the writer's 32 MB queue is 64 MB, which a CSV
writer appending ready rows at 20 MB/s or more (it does several times that) writes in about
3 s, a fifth of the default 15 s ``shutdown_timeout``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence

import anyio
from anyio.abc import ByteStream

from ..api import (
    EncoderContext,
    ExchangeAdapter,
    ExchangeContext,
    ReadFlow,
    SinkEncoder,
    StreamContext,
    StreamKey,
    StreamType,
    writer_of,
)
from ..config import validate_components
from ..counters import Counters
from ..logs import RateLimitedLog
from ..records import (
    BookSnapshot,
    DepthUpdate,
    EncodedBatch,
    Kline,
    Marker,
    Record,
    Trade,
    encode_batch,
    encode_encoded,
    record_key,
    stream_name,
)
from ..units import parse_duration
from .bootstrap import ChildSpec, paths_of
from .channels import Hello, Status, frame
from .child import ChildLoop, SupervisorGone, leave_socket_dir, supervisor_gone, tune_gc

_CHANNEL_OF = {Trade: "trade", DepthUpdate: "depth", Kline: "kline"}
_CONNECT_RETRY = 0.05

# Bytes of Python objects per record as decoded from Binance frames (measured with
# tracemalloc: a 40-level depth update is ~7.9 KB, an aggTrade ~470 B, a kline ~890 B).
_LEVEL_WEIGHT = 190
_BOOK_WEIGHT = 400
_WEIGHT = {Trade: 480, Kline: 900, Marker: 500}
_OTHER_WEIGHT = 1000
#: Fractions of ``worker_buffer``: pause reading above, resume at or below, and the most one
#: batch may weigh (a batch is cut there even below ``batch_size`` records).
_PAUSE_AT, _RESUME_AT, _BATCH_SHARE = 0.5, 0.25, 0.125
#: Share of ``shutdown_timeout`` a stopping worker spends sending what it holds; what is
#: unsent by then becomes overflow markers.
_DRAIN_SHARE = 0.5


def record_weight(record: Record) -> int:
    """Estimated bytes of ``record``'s Python objects (what holding it costs)."""
    cls = record.__class__
    if cls is DepthUpdate or cls is BookSnapshot:
        return _BOOK_WEIGHT + _LEVEL_WEIGHT * (len(record.bids) + len(record.asks))
    return _WEIGHT.get(cls, _OTHER_WEIGHT)


async def connect_unix_retry(path: str, timeout: float | None = None) -> ByteStream:
    """Connect to the Unix socket ``path``, retrying while its listener is not up yet.

    Raises :class:`~.child.SupervisorGone` instead of retrying once the supervisor died.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return await anyio.connect_unix(path)
        except OSError:
            if supervisor_gone():
                raise SupervisorGone(f"cannot reach {os.path.basename(path)}") from None
            if deadline is not None and time.monotonic() > deadline:
                raise
            await anyio.sleep(_CONNECT_RETRY)


class _Inbox:
    """Routes adapter records to the stream types subscribed to their channel."""

    def __init__(self, streams: Sequence[StreamType], counters: Counters) -> None:
        self._routes: dict[type, list[StreamType]] = {}
        for kind, channel in _CHANNEL_OF.items():
            self._routes[kind] = [s for s in streams if channel in s.channels]
        self._streams = list(streams)
        self._counters = counters

    def on_record(self, record: Record) -> None:
        targets = self._routes.get(type(record))
        if not targets:
            self._counters.incr("records_unrouted")
            return
        for target in targets:
            target.on_record(record)

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:
        self._counters.incr("reconnects")
        for stream in self._streams:
            stream.on_reconnect(symbols, reason)


class SinkLost(Exception):
    """A writer went away: what the worker still holds for it cannot be delivered."""


class Worker(ChildLoop):
    """One collector worker; :meth:`run` returns when stopped and everything is sent."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.runtime = spec.config.runtime
        # A storage node's source worker (:mod:`.source`) has no pipeline.
        self.pipeline = (
            spec.config.pipelines[spec.pipeline_index] if spec.pipeline_index >= 0 else None
        )
        self.counters = Counters()
        name = self.pipeline.name if self.pipeline is not None else spec.child
        self.logger = logging.getLogger(f"streamer.worker.{name}")
        self._rate_log = RateLimitedLog(self.logger, interval=10.0)
        self._pending: list[Record] = []
        self._batch_size = max(1, self.runtime.batch_size)
        # The byte budget (see the module docstring): estimated bytes of the pending
        # records, bytes of the payloads queued for the writers.
        budget = self.runtime.worker_buffer_bytes
        self._cap = budget
        self._pause_at = int(budget * _PAUSE_AT)
        self._resume_at = int(budget * _RESUME_AT)
        self._batch_bytes = int(budget * _BATCH_SHARE)
        self._pending_bytes = 0
        self._queued_bytes = 0
        self._flow = ReadFlow()
        self._drain_deadline = float("inf")
        self._overflow_reason = "runtime queue overflow"
        self._read_pauses = 0
        # StreamKey -> [first dropped key, last dropped key] awaiting an overflow marker.
        self._overflow: dict[StreamKey, list[int]] = {}
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._closing = False
        #: Lane -> (send, receive): one queue per writer fed; a lane is the sink's name,
        #: or ``<sink>#<i>`` for writer ``i`` of a sink running as several.
        self._queues: dict[str, tuple] = {}
        #: Sink -> its lanes (index = writer) and socket paths; set by :meth:`_build`.
        self._lanes: dict[str, list[str]] = {}
        self._lane_paths: dict[str, str] = {}
        #: Per writer count: symbol -> its writer (computed once per symbol).
        self._owner: dict[int, dict[str, int]] = {}
        #: Worker-side encoders of the sinks that have one (sink name -> encoder).
        self._encoders: dict[str, SinkEncoder] = {}
        #: Seconds between outputs of streams that emit on a clock (an ``interval`` option),
        #: published so ``streamer status`` judges their lag by their own cadence.
        self._cadence: dict[str, float] = {}

    # -- emit / batching -------------------------------------------------------------
    def emit(self, record: Record) -> None:
        """Queue one record for every sink of the pipeline; never blocks."""
        weight = record_weight(record)
        held = self._pending_bytes + self._queued_bytes + weight
        if held > self._pause_at:
            # Markers are rare and must not be lost: they may exceed the cap; so may a
            # record bigger than the whole budget when nothing else is held.
            if held > self._cap and record.__class__ is not Marker and held > weight:
                self._drop(record)
                return
            if not self._flow.paused:
                self._pause()
        pending = self._pending
        pending.append(record)
        self._pending_bytes += weight
        if len(pending) >= self._batch_size or self._pending_bytes >= self._batch_bytes:
            self._wake.set()

    def _pause(self) -> None:
        self._flow.pause()
        self._read_pauses += 1
        self.counters.incr("read_pauses")
        self._wake.set()

    def _relieved(self) -> None:
        """Resume reading once what is held fell to the low-water mark."""
        if (
            self._flow.paused
            and not self._closing
            and self._pending_bytes + self._queued_bytes <= self._resume_at
        ):
            self._flow.resume()

    def _take_batch(self) -> tuple[list[Record], int]:
        """The next batch off the pending list (at most ``batch_size`` records and about
        ``worker_buffer / 8`` bytes) and its weight."""
        if self._closing and time.monotonic() > self._drain_deadline:
            self._abandon()
        pending = self._pending
        limit = self._batch_bytes
        weight = 0
        n = 0
        for record in pending[: self._batch_size]:
            weight += record_weight(record)
            n += 1
            if weight >= limit:
                break
        batch = pending[:n]
        del pending[:n]
        return batch, weight

    def _abandon(self) -> None:
        """Stopping took too long: the records still pending become overflow markers."""
        records = [r for r in self._pending if r.__class__ is not Marker]
        if not records:
            return
        self._overflow_reason = "not sent before the shutdown timeout"
        self._pending = [r for r in self._pending if r.__class__ is Marker]
        self._pending_bytes = sum(map(record_weight, self._pending))
        self.logger.error(
            "could not send %d records within %.1f s of stopping; recording them as "
            "overflow markers",
            len(records),
            self.runtime.shutdown_timeout * _DRAIN_SHARE,
        )
        for record in records:
            self._drop(record)

    def _drop(self, record: Record) -> None:
        key = StreamKey(record.exchange, record.market, record.symbol, stream_name(record))
        value = record_key(record) or 0
        span = self._overflow.get(key)
        if span is None:
            self._overflow[key] = [value, value]
        else:
            span[0] = min(span[0], value)
            span[1] = max(span[1], value)
        self.counters.incr("records_overflowed", key.symbol, key.stream)
        self._rate_log.error(
            "overflow",
            "sinks are not keeping up: dropping records (%d pending, %d bytes held); see "
            "records_overflowed",
            len(self._pending),
            self._pending_bytes + self._queued_bytes,
        )

    def _overflow_markers(self) -> list[Record]:
        now = time.time_ns() // 1_000_000
        markers: list[Record] = [
            Marker(
                k.exchange,
                k.market,
                k.symbol,
                k.stream,
                "overflow",
                a,
                b,
                now,
                self._overflow_reason,
            )
            for k, (a, b) in sorted(self._overflow.items())
        ]
        self._overflow.clear()
        return markers

    async def _flusher(self) -> None:
        interval = max(0.001, self.runtime.batch_interval)
        while True:
            with anyio.move_on_after(interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self._flush()
            if self._closing:
                await self._flush()  # anything emitted while the last flush waited
                for send, _ in self._queues.values():
                    await send.aclose()
                return

    async def _flush(self) -> None:
        while self._pending or self._overflow:
            batch, weight = self._take_batch()
            taken = len(batch)
            if self._overflow:
                batch = self._overflow_markers() + batch
            counted = False
            plain: dict[tuple[int, int], bytes] = {}
            splits: dict[int, list[list[Record]]] = {}
            for sink, lanes in self._lanes.items():
                writers = len(lanes)
                if writers == 1:
                    parts: Sequence[list[Record]] = (batch,)
                else:
                    parts = splits.get(writers) or splits.setdefault(
                        writers, self._split(batch, writers)
                    )
                encoder = self._encoders.get(sink)
                count = encoder is not None and not counted
                for i, part in enumerate(parts):
                    if not part:
                        continue  # nothing for that writer in this batch
                    data: bytes | bytearray | None = None
                    if encoder is not None:
                        encoded = self._encode(sink, encoder, part)
                        if encoded is not None:
                            if count:
                                self._count_encoded(encoded)
                            data = encode_encoded(encoded)
                        elif count:
                            self._count(part)
                    if data is None:
                        data = plain.get((writers, i))
                        if data is None:
                            data = plain[(writers, i)] = encode_batch(part)
                    send = self._queues[lanes[i]][0]
                    await self._enqueue(send, data)
                counted = counted or count
            if not counted:
                self._count(batch)
            self.counters.incr("batches_sent")
            self._pending_bytes -= weight
            self._relieved()
            self._batch_sent(taken)

    async def _enqueue(self, send, data: bytes | bytearray) -> None:
        """Queue ``data`` for a sender (counted in the held bytes until it is sent)."""
        self._queued_bytes += len(data)
        try:
            send.send_nowait(data)
        except anyio.WouldBlock:
            self.counters.incr("backpressure_waits")
            started = time.monotonic()
            await send.send(data)
            waited = int((time.monotonic() - started) * 1000)
            self.counters.incr("backpressure_wait_ms", n=waited)

    def _split(self, batch: list[Record], writers: int) -> list[list[Record]]:
        """``batch`` split by the writer owning each record's symbol, order kept."""
        owner = self._owner.get(writers)
        if owner is None:
            owner = self._owner[writers] = {}
        parts: list[list[Record]] = [[] for _ in range(writers)]
        for record in batch:
            symbol = record.symbol
            i = owner.get(symbol)
            if i is None:
                i = owner[symbol] = writer_of(symbol, writers)
            parts[i].append(record)
        return parts

    def _batch_sent(self, records: int) -> None:
        """One more batch (``records`` emitted records) was queued for every sink."""

    def _encode(self, sink: str, encoder: SinkEncoder, batch: list[Record]) -> EncodedBatch | None:
        """``encoder``'s output, or ``None`` (counted, logged) when it failed: that batch
        then goes to the sink as records."""
        try:
            return encoder.encode(batch)
        except Exception as exc:  # a third-party encoder may raise anything
            self.counters.incr("encoder_errors")
            self._rate_log.error(
                f"encoder_{sink}",
                "the encoder of sink %r failed (%s: %s); sent the batch as records instead",
                sink,
                type(exc).__name__,
                exc,
            )
            self.logger.debug("encoder of sink %s failed", sink, exc_info=True)
            return None

    def _count(self, batch: list[Record]) -> None:
        tally: dict[tuple[str, str], list[int]] = {}
        for record in batch:
            cls = record.__class__
            if cls is Trade:
                key = (record.symbol, "aggtrade")
            elif cls is DepthUpdate:
                key = (record.symbol, "depth")
            else:
                key = (record.symbol, stream_name(record))
            # Markers carry ``time`` instead; they say nothing about the feed's freshness.
            event_time = 0 if cls is Marker else record.event_time
            entry = tally.get(key)
            if entry is None:
                tally[key] = [1, event_time]
            else:
                entry[0] += 1
                if event_time > entry[1]:
                    entry[1] = event_time
        self._publish_counts(tally)

    def _count_encoded(self, encoded: EncodedBatch) -> None:
        """Like :meth:`_count`, one update per chunk (plus the records left as records)."""
        tally: dict[tuple[str, str], list[int]] = {}
        if encoded.records:
            self._count(encoded.records)
        streams = encoded.streams
        for chunk in encoded.chunks:
            key = streams[chunk.stream]
            short = (key.symbol, key.stream)
            entry = tally.get(short)
            if entry is None:
                tally[short] = [len(chunk.keys), chunk.event_time]
            else:
                entry[0] += len(chunk.keys)
                if chunk.event_time > entry[1]:
                    entry[1] = chunk.event_time
        self._publish_counts(tally)

    def _publish_counts(self, tally: dict[tuple[str, str], list[int]]) -> None:
        counters = self.counters
        for (symbol, stream), (n, event_time) in tally.items():
            counters.incr("records_emitted", symbol, stream, n)
            if event_time:
                counters.set("last_event_time", event_time, symbol, stream)

    async def _sender(self, lane: str, path: str, receive) -> None:
        stream = await connect_unix_retry(path)
        async with stream, receive:
            async for data in receive:
                try:
                    await stream.send(frame(data))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    raise SinkLost(
                        f"lost the connection to sink {lane!r}; exiting so the supervisor "
                        "restarts this worker (it resumes from what the sinks hold)"
                    ) from None
                self._queued_bytes -= len(data)
                self._relieved()

    # -- lifecycle ---------------------------------------------------------------------
    def _attach_sinks(self, registry, sinks: dict, pipeline: str) -> None:
        """The lanes (one per writer process) and the worker-side encoders of the sinks
        this worker feeds; ``sinks`` as :func:`validate_components` returns them."""
        for sink, value in self.spec.sink_paths.items():
            paths = paths_of(value)
            lanes = [sink] if len(paths) == 1 else [f"{sink}#{i}" for i in range(len(paths))]
            self._lanes[sink] = lanes
            self._lane_paths.update(zip(lanes, paths, strict=True))
            type_name, sink_options = sinks[sink]
            encoder_cls = registry.sink(type_name).Encoder
            if encoder_cls is not None:
                self._encoders[sink] = encoder_cls(
                    sink_options,
                    EncoderContext(
                        sink=sink,
                        pipeline=pipeline,
                        counters=self.counters,
                        logger=logging.getLogger(f"streamer.encoder.{sink}"),
                    ),
                )

    def _build(self) -> tuple[ExchangeAdapter, list[StreamType]]:
        registry = self.spec.plugins.registry()
        pipelines, sinks = validate_components(self.spec.config, registry)
        resolved = pipelines[self.spec.pipeline_index]
        self._attach_sinks(registry, sinks, self.pipeline.name)
        adapter_cls = registry.exchange(self.pipeline.exchange)
        adapter = adapter_cls(
            resolved.exchange_options,
            ExchangeContext(
                pipeline=self.pipeline.name,
                counters=self.counters,
                logger=self.logger,
                flow=self._flow,
            ),
        )
        streams = []
        for name, options in resolved.stream_options.items():
            stream_cls = registry.stream(name)
            context = StreamContext(
                pipeline=self.pipeline.name,
                exchange=adapter,
                symbols=list(self.spec.symbols),
                emit=self.emit,
                counters=self.counters,
                logger=logging.getLogger(f"streamer.stream.{name}"),
                resume=dict(self.spec.resume),
            )
            streams.append(stream_cls(options, context))
            cadence = _cadence_of(options)
            if cadence:
                self._cadence[name] = cadence
        return adapter, streams

    def _status(self, final: bool = False) -> Status:
        depths = {
            sink: sum(
                self._queues[lane][1].statistics().current_buffer_used
                for lane in lanes
                if lane in self._queues
            )
            for sink, lanes in self._lanes.items()
        }
        return Status(
            counters=[(n, s, t, v) for (n, s, t), v in self.counters.snapshot().items()],
            info={
                "queue_depths": depths,
                "pending_records": len(self._pending),
                "pending_bytes": self._pending_bytes,
                "queued_bytes": self._queued_bytes,
                "held_bytes": self._pending_bytes + self._queued_bytes,
                "buffer_bytes": self._cap,
                "reading_paused": self._flow.paused,
                "read_pauses": self._read_pauses,
                "symbols": list(self.spec.symbols),
                "cadence": self._cadence,
                "status_time": time.time_ns() // 1_000_000,
            },
            final=final,
        )

    async def run(self) -> None:
        """Stream until told to stop, then send everything held and return."""
        adapter, streams = self._build()
        subscriptions = sorted({sub for s in streams for sub in s.subscriptions()})
        inbox = _Inbox(streams, self.counters)
        for lane in self._lane_paths:
            send, receive = anyio.create_memory_object_stream[bytes](self.runtime.queue_batches)
            self._queues[lane] = (send, receive)
        ctl = await connect_unix_retry(self.spec.control_path, timeout=30)
        await self._tell(ctl, Hello(self.spec.child, self.spec.incarnation, os.getpid()))
        tune_gc()  # start-up is over: what exists now lives for the whole run
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._control, ctl)
                outer.start_soon(self._publish, ctl)
                outer.start_soon(self._signals)
                async with anyio.create_task_group() as io:
                    for lane, path in self._lane_paths.items():
                        io.start_soon(self._sender, lane, path, self._queues[lane][1])
                    io.start_soon(self._flusher)
                    async with anyio.create_task_group() as reading:
                        reading.start_soon(adapter.stream, subscriptions, inbox)
                        for stream in streams:
                            reading.start_soon(stream.run)
                        await self._stop.wait()
                        reading.cancel_scope.cancel()  # stop reading first, then drain
                    self._closing = True
                    self._drain_deadline = (
                        time.monotonic() + self.runtime.shutdown_timeout * _DRAIN_SHARE
                    )
                    self._wake.set()
                await self._send_final(ctl)
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await adapter.aclose()


def _cadence_of(options: object) -> float | None:
    """A stream type's output period from its ``interval`` option, when it has a positive
    duration one (an order book every ``1s``); ``None`` otherwise."""
    value = getattr(options, "interval", None)
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError):
        return None  # e.g. "update"
    return seconds if seconds > 0 and seconds == seconds and seconds != float("inf") else None


def worker_main(spec: ChildSpec) -> None:
    """Entry point of a spawned worker process."""
    run_child(spec, Worker)


def run_child(spec: ChildSpec, worker_cls: type[Worker]) -> None:
    """Run a spawned worker of class ``worker_cls`` (a collector or a store's source)."""
    from .bootstrap import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    setup_logging(spec.log_level)
    logger = logging.getLogger(f"streamer.worker.{spec.child}")
    try:
        anyio.run(worker_cls(spec).run)
    except* SupervisorGone:
        # Orphaned before it could connect (or a sink it feeds went with the supervisor).
        logger.warning("the supervisor is gone; exiting")
    except* SinkLost as group:
        lost: BaseException = group
        while isinstance(lost, BaseExceptionGroup):  # task groups nest the error
            lost = lost.exceptions[0]
        logger.error("%s", lost)
        raise SystemExit(3) from None
    finally:
        leave_socket_dir(spec)
