"""The source worker of a storage node (``streamer store``): a bus instead of an exchange.

It is a collector worker (:class:`~.worker.Worker`: the same batcher, sink encoders,
bounded queues, senders, status and shutdown) whose records come from a
:class:`~streamer.core.api.Source` instead of an exchange adapter and stream types::

    Source.receive(limit) -> emit (in order) -> batches -> every sink writer
    writer: Flushed(frames) receipts --> ack the source up to what every sink flushed

Acknowledgement: the worker asks every writer for flush receipts
(:data:`~.channels.WANT_RECEIPTS`). Each batch goes to every sink, so batch ``i`` is frame
``i`` on every connection; once every writer reported frame ``i`` flushed, every record
emitted up to the end of batch ``i`` is durable everywhere and the newest source token
covering them is acknowledged (:meth:`Source.ack`). Nothing is acknowledged earlier, so a
store killed at any moment gets the unacknowledged records again after its restart; the
writers drop what their sinks already hold (their marks come from the sinks' holdings).
On a clean stop the worker, once it sent its last batch, ends its side of each data
connection; the writer then flushes at once and sends the last receipt, and the worker
acknowledges what it covers before it exits (waiting at most half of
``runtime.shutdown_timeout``), so the next start does not get it again.

Flow control: the worker holds at most about ``runtime.worker_buffer`` bytes, like a
collector worker, but never drops a record for it: past half the budget it stops asking the
source (counted as ``read_pauses``) until the writers took what it held down to a quarter,
and each request asks for no more records than the room left could hold at
:data:`_RECORD_BYTES` each, so one answer overshoots the budget by little.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import anyio

from ..api import Source, SourceContext
from ..config import validate_components, validate_source
from ..records import Record
from .bootstrap import ChildSpec
from .channels import WANT_RECEIPTS, Flushed, FrameReader, Hello, decode_control, frame
from .worker import SinkLost, Worker, connect_unix_retry, record_weight, run_child

#: Pause before asking again after the source raised (broker down...).
_RETRY = 0.5
#: Bytes a record is assumed to hold at most when sizing a request to the source (a depth
#: update of 68 levels weighs ~13 KB; see :func:`~.worker.record_weight`).
_RECORD_BYTES = 16 * 1024


class SourceWorker(Worker):
    """A worker fed by the store's source; acknowledges only what every sink flushed."""

    def __init__(self, spec: ChildSpec) -> None:
        super().__init__(spec)
        self._source: Source | None = None
        #: Records emitted so far, and per batch sent: (frame number, records emitted by then).
        self._emitted = 0
        self._batched = 0
        self._frames = 0
        self._batch_ends: deque[tuple[int, int]] = deque()
        #: (records emitted once this token's records were, token), oldest first.
        self._tokens: deque[tuple[int, object]] = deque()
        #: Data frames each sink reported flushed.
        self._flushed: dict[str, int] = {}
        self._ack_wake = anyio.Event()
        #: Set when a receipt arrives from that sink.
        self._receipt: dict[str, anyio.Event] = {}
        #: Sinks whose writer closed the connection: no more receipts from them.
        self._receipts_over: set[str] = set()
        #: Set when the pump may ask the source again (reading resumed).
        self._room = anyio.Event()
        self._flow.attach(lambda: None, lambda: self._room.set())

    def _build_source(self) -> Source:
        registry = self.spec.plugins.registry()
        _, sinks = validate_components(self.spec.config, registry)
        self._attach_sinks(registry, sinks, "source")
        type_name, options = validate_source(self.spec.config, registry)
        context = SourceContext(
            name=type_name, counters=self.counters, logger=logging.getLogger("streamer.source")
        )
        return registry.source(type_name)(options, context)

    # -- batches and receipts ------------------------------------------------------------
    def _batch_sent(self, records: int) -> None:
        self._frames += 1
        self._batched += records
        self._batch_ends.append((self._frames, self._batched))

    async def _sender(self, sink: str, path: str, receive) -> None:
        stream = await connect_unix_retry(path)
        self._flushed[sink] = 0
        async with stream, receive, anyio.create_task_group() as tg:
            tg.start_soon(self._read_receipts, sink, stream)
            await stream.send(frame(WANT_RECEIPTS))
            sent = 0
            async for data in receive:
                try:
                    await stream.send(frame(data))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    raise SinkLost(
                        f"lost the connection to sink {sink!r}; exiting so the supervisor "
                        "restarts this worker (the source resumes from its last acknowledgement)"
                    ) from None
                sent += 1
                self._queued_bytes -= len(data)
                self._relieved()
            # Closing: end our side; the writer flushes and reports, and what it reports
            # is acknowledged now rather than delivered again at the next start.
            self._receipt[sink] = anyio.Event()
            try:
                await stream.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            else:
                with anyio.move_on_after(self.runtime.shutdown_timeout / 2):
                    while self._flushed[sink] < sent and sink not in self._receipts_over:
                        await self._receipt[sink].wait()
                        self._receipt[sink] = anyio.Event()
            tg.cancel_scope.cancel()

    async def _read_receipts(self, sink: str, stream) -> None:
        reader = FrameReader(stream)
        while True:
            payload = await reader.receive()
            if payload is None:  # the writer closed the connection
                self._receipts_over.add(sink)
                if sink in self._receipt:
                    self._receipt[sink].set()
                return
            message = decode_control(payload)
            if isinstance(message, Flushed):
                self._flushed[sink] = max(self._flushed[sink], message.frames)
                self._ack_wake.set()
                if sink in self._receipt:
                    self._receipt[sink].set()

    def _ackable(self) -> object | None:
        """The newest token whose records every sink has flushed (popped), or ``None``."""
        if not self._flushed or len(self._flushed) < len(self._queues):
            return None
        done_frames = min(self._flushed.values())
        durable = 0
        while self._batch_ends and self._batch_ends[0][0] <= done_frames:
            durable = self._batch_ends.popleft()[1]
        if not durable:
            return None
        token = None
        while self._tokens and self._tokens[0][0] <= durable:
            token = self._tokens.popleft()[1]
        return token

    async def _acker(self, source: Source) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake = anyio.Event()
            token = self._ackable()
            if token is None:
                continue
            try:
                await source.ack(token)
                self.counters.incr("source_acks")
            except Exception as exc:  # a later token acknowledges this one too
                self.counters.incr("source_ack_errors")
                self._rate_log.error("ack", "acknowledging the source failed: %s", exc)

    async def _ack_flushed(self, source: Source) -> None:
        """At close: acknowledge what the sinks reported flushed (the acker may not have
        run since the last receipts)."""
        token = self._ackable()
        if token is None:
            return
        try:
            with anyio.fail_after(5):
                await source.ack(token)
            self.counters.incr("source_acks")
        except Exception as exc:
            self.counters.incr("source_ack_errors")
            self._rate_log.error("ack", "acknowledging the source at close failed: %s", exc)

    # -- receiving -----------------------------------------------------------------------
    def emit(self, record: Record) -> None:
        """Hold ``record`` for every sink. Unlike a collector's, never drops: past half the
        budget the pump stops asking the source until the writers caught up."""
        weight = record_weight(record)
        self._pending.append(record)
        self._pending_bytes += weight
        if not self._flow.paused and self._pending_bytes + self._queued_bytes > self._pause_at:
            self._pause()
        if len(self._pending) >= self._batch_size or self._pending_bytes >= self._batch_bytes:
            self._wake.set()

    async def _pump(self, source: Source) -> None:
        while True:
            if self._flow.paused:
                self._wake.set()
                await self._room.wait()
                self._room = anyio.Event()
                continue
            held = self._pending_bytes + self._queued_bytes
            room = min(self._batch_size, max(1, (self._cap - held) // _RECORD_BYTES))
            try:
                records, token = await source.receive(room)
            except Exception as exc:  # a third-party source may raise anything
                self.counters.incr("source_errors")
                self._rate_log.error(
                    "receive", "the source failed (%s: %s); retrying", type(exc).__name__, exc
                )
                await anyio.sleep(_RETRY)
                continue
            for record in records:
                self.emit(record)
            self._emitted += len(records)
            if token is not None:
                self._tokens.append((self._emitted, token))
                if not records:
                    self._ack_wake.set()  # nothing new to flush: may be acknowledged now

    async def run(self) -> None:
        """Receive until told to stop, then send everything held and return."""
        source = self._build_source()
        self._source = source
        for sink, lanes in self._lanes.items():
            # One writer per sink (the store plans no more): batch i is frame i on every
            # connection, which the receipts count on.
            if lanes != [sink]:
                raise RuntimeError(f"a storage node runs sink {sink!r} as one writer")
            send, receive = anyio.create_memory_object_stream[bytes](self.runtime.queue_batches)
            self._queues[sink] = (send, receive)
        ctl = await connect_unix_retry(self.spec.control_path, timeout=30)
        await self._tell(ctl, Hello(self.spec.child, self.spec.incarnation, os.getpid()))
        try:
            await source.open()
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._control, ctl)
                outer.start_soon(self._publish, ctl)
                outer.start_soon(self._signals)
                outer.start_soon(self._acker, source)
                async with anyio.create_task_group() as io:
                    for sink, path in self._lane_paths.items():
                        io.start_soon(self._sender, sink, path, self._queues[sink][1])
                    io.start_soon(self._flusher)
                    async with anyio.create_task_group() as reading:
                        reading.start_soon(self._pump, source)
                        await self._stop.wait()
                        reading.cancel_scope.cancel()
                    self._closing = True
                    self._wake.set()
                await self._ack_flushed(source)
                await self._send_final(ctl)
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await source.aclose()


def source_main(spec: ChildSpec) -> None:
    """Entry point of a spawned source worker process."""
    run_child(spec, SourceWorker)
