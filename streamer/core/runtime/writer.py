"""The sink writer process: one per sink instance, or several for a sink that can be
partitioned (:attr:`~streamer.core.api.Sink.multi_writer`): writer ``i`` of ``N`` runs its
own sink instance for the symbols :func:`~streamer.core.api.writer_of` maps to ``i``,
listens on its own socket and reports only those symbols' holdings.

It opens the sink, reports the sink's ``holdings()`` to the supervisor (``Ready``), then
accepts one data connection per worker. Each connection's frames go through one queue
bounded in bytes (``writer_buffer``) and in batches (``queue_batches``); a full queue is
counted as ``backpressure_waits`` and the connections are not read meanwhile, which pushes
back on the workers through their sockets. A single loop decodes, drops what is
already held (:class:`~streamer.core.runtime.keys.HighWater`, seeded from the holdings),
calls ``sink.write`` (records) and ``sink.write_chunks`` (ready bytes from the sink's
worker-side encoder, de-duplicated chunk by chunk and cut at a record boundary when partly
held), and ``sink.flush`` every flush interval (the sink's ``flush_interval`` option when
it has one, else one second). Counting is done by the filters as they go: once per chunk,
once per kept record on the record path.

A worker may ask for flush receipts on its connection (``streamer store`` does, to
acknowledge its source only once every sink flushed: :data:`~.channels.WANT_RECEIPTS`):
the writer counts that connection's frames as it writes them and, after a flush tick that
leaves the sink with nothing pending, sends a :class:`~.channels.Flushed` with the count.
When such a worker ends its side of the connection (closing), the writer writes what it
received, flushes at once and sends the last receipt before closing the connection.

On ``Stop`` (sent once every worker has exited) it stops accepting, reads every connection
to its end, drains the queue, flushes, closes the sink and exits 0. Rows the sink still
holds after ``close`` are lost: they are counted as ``rows_lost_at_close`` in the final
status, and the supervisor turns that into a non-zero exit.

A sink whose ``open`` (or ``holdings``) raises cannot work: the writer reports why in a
status message (``info["fatal"]``) and exits with :data:`EXIT_SINK_FAILED`, which the
supervisor never restarts; it ends the run instead.

What it publishes about its progress (per stream, keyed by
:func:`~streamer.core.counters.market_symbol` so spot and futures rows of one symbol stay
apart): ``records_written`` (handed to the sink), ``records_flushed`` and the gauge
``written_event_time`` (exchange time of the newest record known to be in the files: after
a flush that left nothing pending, or once the sink's holdings reach the stream's last
key); process-wide the gauges ``last_flush_time`` (epoch ms of the last flush tick that
found the sink flushed or flushed it), ``rows_pending`` and ``flush_interval_ms``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import anyio
import msgspec
from anyio.abc import ByteStream

from ..api import Sink, SinkContext, StreamKey
from ..config import validate_components
from ..counters import Counters, market_symbol
from ..logs import RateLimitedLog
from ..records import Chunk, decode_batch, decode_encoded, is_encoded
from ..units import parse_duration
from .bootstrap import ChildSpec, paths_of
from .channels import (
    WANT_RECEIPTS,
    Flushed,
    FrameReader,
    Hello,
    Ready,
    Status,
    encode_control,
)
from .child import ChildLoop, SupervisorGone, leave_socket_dir, tune_gc
from .keys import HighWater, Tally
from .worker import connect_unix_retry

DEFAULT_FLUSH_INTERVAL = 1.0
#: Exit code of a writer whose sink could not open: the supervisor stops the run.
EXIT_SINK_FAILED = 3


class _Receipts:
    """A data connection whose worker wants :class:`Flushed` receipts."""

    __slots__ = ("ended", "reported", "stream", "written")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.written = 0  # data frames handed to the sink (or dropped as held)
        self.reported = 0  # the count last sent
        self.ended = anyio.Event()  # the worker's end was flushed and answered


def flush_interval_of(options: object) -> float:
    """The sink's ``flush_interval`` option in seconds, or the runtime default."""
    value = getattr(options, "flush_interval", None)
    if value is None:
        return DEFAULT_FLUSH_INTERVAL
    return parse_duration(value)


class Writer(ChildLoop):
    """One sink writer; :meth:`run` returns after a clean stop."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.runtime = spec.config.runtime
        self.counters = Counters()
        self.logger = logging.getLogger(f"streamer.writer.{spec.sink}")
        self._rate_log = RateLimitedLog(self.logger, interval=10.0)
        self._stop = anyio.Event()
        self._high_water = HighWater()
        self._send, self._receive = anyio.create_memory_object_stream[
            tuple[bytes | None, _Receipts | None]
        ](self.runtime.queue_batches)  # (None, receipts): that worker ended its side
        #: Connections that asked for flush receipts.
        self._receipts: list[_Receipts] = []
        self._connections = 0
        #: Bytes of the payloads in the queue, bounded by ``writer_buffer``.
        self._queued_bytes = 0
        self._budget = self.runtime.writer_buffer_bytes
        self._room: anyio.Event | None = None
        self._dirty = False
        self._sink: Sink | None = None
        self._fatal = ""
        #: Per (exchange, market, symbol, stream): [records, newest event time, last key]
        #: handed to the sink and not yet known to be flushed.
        self._unflushed: dict[tuple[str, str, str, str], list] = {}
        #: Newest event time known flushed, per stream (what ``written_event_time`` shows).
        self._flushed_time: dict[tuple[str, str, str, str], int] = {}

    def _build(self) -> tuple[Sink, float]:
        registry = self.spec.plugins.registry()
        _, sinks = validate_components(self.spec.config, registry)
        type_name, options = sinks[self.spec.sink]
        sink_cls = registry.sink(type_name)
        context = SinkContext(
            name=self.spec.sink,
            counters=self.counters,
            logger=self.logger,
            writer=self.spec.writer,
            writers=self.spec.writers,
        )
        self._context = context
        sink = sink_cls(options, context)
        return sink, flush_interval_of(options)

    async def _serve(self, listener) -> None:
        async with anyio.create_task_group() as conns:
            async with anyio.create_task_group() as accepting:
                accepting.start_soon(self._accept, listener, conns)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            # No new connections; the open ones are read to their end (their workers
            # have exited or are about to).
            await listener.aclose()
        await self._send.aclose()

    async def _accept(self, listener, conns) -> None:
        while True:
            stream = await listener.accept()
            self._connections += 1
            conns.start_soon(self._read, stream, self._send.clone())

    async def _read(self, stream: ByteStream, send) -> None:
        reader = FrameReader(stream)
        receipts: _Receipts | None = None
        first = True
        async with stream, send:
            try:
                while True:
                    payload = await reader.receive()
                    if payload is None:
                        if receipts is not None:
                            # Closing: flush what it sent and answer before closing.
                            await send.send((None, receipts))
                            with anyio.move_on_after(30):
                                await receipts.ended.wait()
                        return
                    if first:
                        first = False
                        if payload == WANT_RECEIPTS:
                            receipts = _Receipts(stream)
                            self._receipts.append(receipts)
                            continue
                    self.counters.incr("batches_received")
                    size = len(payload)
                    waited = False
                    # A payload bigger than the whole budget still goes through alone.
                    while self._queued_bytes and self._queued_bytes + size > self._budget:
                        waited = True
                        if self._room is None:
                            self._room = anyio.Event()
                        await self._room.wait()
                    self._queued_bytes += size
                    item = (payload, receipts)
                    try:
                        send.send_nowait(item)
                    except anyio.WouldBlock:
                        waited = True
                        await send.send(item)
                    if waited:
                        self.counters.incr("backpressure_waits")
            finally:
                self._connections -= 1
                if receipts is not None:
                    self._receipts.remove(receipts)

    async def _consume(self, sink: Sink, flush_every: float) -> None:
        # Writes and timed flushes share a lock so the sink never sees them concurrently;
        # the receive itself is never cancelled (a cancelled receive can lose its item).
        lock = anyio.Lock()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flush_timer, sink, flush_every, lock)
            async for payload, receipts in self._receive:
                async with lock:
                    if payload is None:
                        await self._flush_ended(sink, receipts)
                        continue
                    self._dirty = await self._write(sink, payload) or self._dirty
                    if receipts is not None:
                        receipts.written += 1
                self._queued_bytes -= len(payload)
                if self._room is not None:
                    self._room.set()
                    self._room = None
            tg.cancel_scope.cancel()

    async def _flush_timer(self, sink: Sink, flush_every: float, lock: anyio.Lock) -> None:
        while True:
            await anyio.sleep(flush_every)
            async with lock:
                # A sink still holding rows (say, after a failed write) is retried on the
                # interval even when no new batch arrives.
                if self._dirty or sink.pending_rows:
                    await sink.flush()
                    self.counters.incr("flushes")
                    self._dirty = False
                await self._flushed(sink)
                if self._receipts and not sink.pending_rows:
                    await self._send_receipts()

    async def _flush_ended(self, sink: Sink, receipts: _Receipts | None) -> None:
        """A worker that wants receipts ended its side: flush now and answer it."""
        if self._dirty or sink.pending_rows:
            await sink.flush()
            self.counters.incr("flushes")
            self._dirty = False
        await self._flushed(sink)
        if not sink.pending_rows:
            await self._send_receipts()
        if receipts is not None:
            receipts.ended.set()

    async def _send_receipts(self) -> None:
        """Tell each worker that asked how many of its frames are now flushed."""
        for receipts in list(self._receipts):
            if receipts.written <= receipts.reported:
                continue
            receipts.reported = receipts.written
            try:
                with anyio.CancelScope(shield=True):
                    await receipts.stream.send(encode_control(Flushed(receipts.written)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.counters.incr("receipts_undelivered")

    async def _flushed(self, sink: Sink, *, closed: bool = False) -> None:
        """After a flush tick: publish its time and what is now known to be in the files."""
        self.counters.set("last_flush_time", time.time_ns() // 1_000_000)
        if not self._unflushed:
            return
        if not sink.pending_rows:
            done = list(self._unflushed)
        elif closed:
            return  # rows lost at close: nothing more becomes durable
        else:
            # Some rows wait for a retry: a stream is flushed once the sink holds its last key.
            held = await sink.holdings()
            done = [
                key
                for key, (_, _, last) in self._unflushed.items()
                if last is not None and held.get(StreamKey(*key), last - 1) >= last
            ]
        counters = self.counters
        for key in done:
            n, event_time, _ = self._unflushed.pop(key)
            symbol = market_symbol(key[0], key[1], key[2])
            counters.incr("records_flushed", symbol, key[3], n)
            if event_time > self._flushed_time.get(key, 0):
                self._flushed_time[key] = event_time
                counters.set("written_event_time", event_time, symbol, key[3])

    async def _write(self, sink: Sink, payload: bytes) -> bool:
        encoded = is_encoded(payload)
        try:
            if encoded:
                batch = decode_encoded(payload)
                records = batch.records
            else:
                records = decode_batch(payload)
        except msgspec.DecodeError as exc:
            self.counters.incr("batches_corrupt")
            self._rate_log.error("corrupt_batch", "dropping an undecodable batch: %s", exc)
            return False
        # Per stream: [records, newest event time, last key], counted by the filters as they
        # go (one update per chunk on the encoded path).
        tally: Tally = {}
        received = len(records)
        kept, dropped = self._high_water.filter_counted(records, tally)
        chunks: list[Chunk] = []
        if encoded:
            received += sum([len(c.keys) for c in batch.chunks])
            chunks, dropped_chunks = self._high_water.filter_chunks(
                batch.streams, batch.chunks, tally
            )
            for key, n in dropped_chunks.items():
                dropped[key] = dropped.get(key, 0) + n
        self.counters.incr("records_received", n=received)
        for key, n in dropped.items():
            symbol = market_symbol(key.exchange, key.market, key.symbol)
            self.counters.incr("duplicates_dropped", symbol, key.stream, n)
        if not kept and not chunks:
            return False
        if kept:
            await sink.write(kept)
        if chunks:
            await sink.write_chunks(batch.streams, chunks)
        unflushed = self._unflushed
        for key, (n, event_time, last_key) in tally.items():
            self.counters.incr("records_written", market_symbol(key[0], key[1], key[2]), key[3], n)
            pending = unflushed.get(key)
            if pending is None:
                unflushed[key] = [n, event_time, last_key]
            else:
                pending[0] += n
                if event_time > pending[1]:
                    pending[1] = event_time
                if last_key is not None:
                    pending[2] = last_key
        return True

    def _status(self, final: bool = False) -> Status:
        if self._sink is not None:
            self.counters.set("rows_pending", self._sink.pending_rows)
        return Status(
            counters=[(n, s, t, v) for (n, s, t), v in self.counters.snapshot().items()],
            info={
                "queue_depth": self._receive.statistics().current_buffer_used,
                "queued_bytes": self._queued_bytes,
                "held_bytes": self._queued_bytes,
                "buffer_bytes": self._budget,
                "connections": self._connections,
                "status_time": time.time_ns() // 1_000_000,
            },
            high_water=_marks(self._high_water.marks),
            final=final,
        )

    async def _opened(self, sink: Sink, ctl: ByteStream) -> dict[StreamKey, int] | None:
        """Open the sink and read its holdings, publishing status and honouring Stop
        meanwhile (a sink may retry for long, say while its database is down); ``None``
        when it cannot start (reported) or was stopped first."""
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._control, ctl)
            tg.start_soon(self._publish, ctl)
            tg.start_soon(self._signals)
            with anyio.CancelScope() as opening:
                tg.start_soon(_cancel_on, self._stop, opening)
                try:
                    await sink.open()
                    holdings = await sink.holdings()
                    if (
                        self.spec.writers > 1
                    ):  # only what this writer owns (the union is the sink's)
                        owns = self._context.owns
                        holdings = {k: v for k, v in holdings.items() if owns(k.symbol)}
                except Exception as exc:  # a third-party sink may raise anything here
                    failed = exc
            tg.cancel_scope.cancel()
        if opening.cancelled_caught:
            return None
        if (exc := failed) is not None:
            if isinstance(exc, OSError):
                detail = exc.strerror or str(exc)
                if exc.filename:
                    detail = f"{exc.filename}: {detail}"
            else:
                detail = f"{type(exc).__name__}: {exc}"
            message = f"cannot open: {detail}"
            self.logger.debug("sink %s failed to open", self.spec.sink, exc_info=exc)
            self._fatal = message
            await self._tell(ctl, Status(counters=[], info={"fatal": message}, final=True))
            return None
        return holdings

    async def run(self) -> int:
        """Serve until stopped, then drain, flush and close the sink; returns the exit code."""
        sink, flush_every = self._build()
        self._sink = sink
        self.counters.set("flush_interval_ms", round(flush_every * 1000))
        self.counters.set("last_flush_time", time.time_ns() // 1_000_000)
        path = paths_of(self.spec.sink_paths[self.spec.sink])[self.spec.writer]
        if os.path.exists(path):
            os.unlink(path)
        listener = await anyio.create_unix_listener(path)
        ctl = await connect_unix_retry(self.spec.control_path, timeout=30)
        await self._tell(ctl, Hello(self.spec.child, self.spec.incarnation, os.getpid()))
        holdings = await self._opened(sink, ctl)
        if holdings is None:
            await listener.aclose()
            if self._fatal:
                await ctl.aclose()
                return EXIT_SINK_FAILED
            with anyio.CancelScope(shield=True):  # stopped while opening
                await sink.close()
            await self._send_final(ctl)
            await ctl.aclose()
            return 0
        closed = False
        tune_gc()  # start-up is over: what exists now lives for the whole run
        try:
            self._high_water = HighWater(holdings)
            await self._tell(ctl, Ready(_marks(holdings)))
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._control, ctl)
                outer.start_soon(self._publish, ctl)
                outer.start_soon(self._signals)
                async with anyio.create_task_group() as data:
                    data.start_soon(self._serve, listener)
                    await self._consume(sink, flush_every)
                closed = True
                await sink.close()
                self.counters.incr("flushes")
                lost = sink.pending_rows
                if lost:
                    self.counters.incr("rows_lost_at_close", n=lost)
                await self._flushed(sink, closed=True)
                await self._send_final(ctl)
                outer.cancel_scope.cancel()
        finally:
            if not closed:
                with anyio.CancelScope(shield=True):
                    try:
                        await sink.close()
                    except Exception:
                        self.logger.exception("closing sink %s after an error", self.spec.sink)
        return 0


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _marks(marks: dict[StreamKey, int]) -> list[tuple[str, str, str, str, int]]:
    return [(k.exchange, k.market, k.symbol, k.stream, v) for k, v in sorted(marks.items())]


def writer_main(spec: ChildSpec) -> None:
    """Entry point of a spawned writer process."""
    from .bootstrap import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    setup_logging(spec.log_level)
    code = 0
    try:
        code = anyio.run(Writer(spec).run)
    except* SupervisorGone:
        logging.getLogger(f"streamer.writer.{spec.sink}").warning("the supervisor is gone; exiting")
    finally:
        leave_socket_dir(spec)
    if code:
        sys.exit(code)
