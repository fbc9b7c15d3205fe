"""The ``nats`` source of a storage node (``streamer store``): a durable JetStream consumer.

The consumer (``durable``, a pull consumer with ``ack_policy: all``) reads every subject
under ``<subject_prefix>.>`` of the stream in stream order. The store acknowledges a
message only once every sink flushed it (the runtime calls :meth:`NatsSource.ack` then);
one acknowledgement covers every message before it.

Pulling: the source keeps pull requests of ``fetch_batch`` messages outstanding on a private
inbox (one or two at a time, so the broker always has credit while the store processes what
arrived) and :meth:`NatsSource.receive` returns whatever has arrived as soon as it has; it
never waits for a batch to fill. Each request expires after ``fetch_expires`` (the broker
then answers ``408``), and one silently lost (broker restart) is forgotten once it is
older than that, so a new one is sent. (nats-py's ``fetch`` is not used: it waits for the
whole batch or its timeout, which paced a store at ``fetch_batch`` messages per timeout,
and it costs a task per message.)

In order, always: the source remembers the next stream sequence it expects. At open (and
whenever a fetch shows a hole: messages delivered while the connection was down, which
JetStream would only redeliver after ``ack_wait``, behind newer ones) it recreates the
consumer to start exactly there; at start-up that is the first unacknowledged message.
So a killed store node resumes where its sinks stopped, in order, and its sinks drop by key
what they already hold; messages delivered twice in one run are skipped by sequence
(``messages_redelivered``). One store node per durable name.

Counters: ``messages_received``, ``messages_redelivered``, ``messages_undecodable``,
``messages_expired`` (aged out of the stream before this node read them: lost to it),
``consumer_rebinds``, ``fetch_errors``, ``pull_requests``, ``pull_expired``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Annotated, Any

import anyio
import msgspec

from streamer import Duration, RateLimitedLog, Record, Source, SourceContext, check_duration

from . import _nats_common as common


class SourceOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``nats`` source (the ``source`` section of a store config)."""

    #: Durable consumer name: one per storage node.
    durable: str
    url: str = "nats://127.0.0.1:4222"
    stream: str = "MARKET"
    subject_prefix: str = "md"
    #: Messages per pull request (two may be outstanding; none while the store is full).
    fetch_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000
    #: A pull request not filled within this time expires (and another is sent).
    fetch_expires: Duration = "5s"
    #: JetStream redelivers what is not acknowledged within this time.
    ack_wait: Duration = "60s"
    #: The stream is created with these limits when missing (as the sink does).
    duplicate_window: Duration = "2m"
    max_age: Duration = "7d"
    max_mb: Annotated[int, msgspec.Meta(ge=0)] = 10_000

    def __post_init__(self) -> None:
        if not common._STREAM_NAME.fullmatch(self.durable):
            raise ValueError(f"durable: letters, digits, '-' and '_' only, got {self.durable!r}")
        check_duration("ack_wait", self.ack_wait, positive=True)
        check_duration("fetch_expires", self.fetch_expires, positive=True)
        check_duration("duplicate_window", self.duplicate_window, positive=True)
        check_duration("max_age", self.max_age)


class NatsSource(Source):
    """Reads records from JetStream through a durable consumer; see the module docstring."""

    Options = SourceOptions

    @classmethod
    def check(cls, options: SourceOptions) -> None:
        common.check_common(options.url, options.stream, options.subject_prefix)

    def __init__(self, options: SourceOptions, context: SourceContext) -> None:
        super().__init__(options, context)
        self._opts = options
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger, interval=30.0)
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._next_subject = ""
        self._inbox = ""
        #: Messages (and status replies) delivered to the inbox, not yet returned.
        self._arrived: deque[Any] = deque()
        self._arrival = anyio.Event()
        #: Outstanding pull requests, oldest first: [monotonic time sent, messages left].
        self._pulls: deque[list[float]] = deque()
        self._expires = common.seconds(options.fetch_expires)
        #: Stream sequence of the next message to emit (0: from the start).
        self._expected = 0
        #: Where the consumer was last (re)created, to accept a hole there (deleted messages).
        self._bound_at = -1

    async def open(self) -> None:
        import nats

        self._nc = await nats.connect(
            servers=[u.strip() for u in self._opts.url.split(",")],
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            name=f"streamer-store-{self._opts.durable}",
            error_cb=self._on_error,
        )
        self._js = self._nc.jetstream(timeout=10)
        await common.ensure_stream(self._js, self._opts)
        from nats.js.errors import NotFoundError

        try:
            info = await self._js.consumer_info(self._opts.stream, self._opts.durable)
            self._expected = info.ack_floor.stream_seq + 1
        except NotFoundError:
            self._expected = 0
        await self._bind()

    async def _on_error(self, exc: Exception) -> None:
        self._log.warning("nats_error", "nats: %s", exc)

    async def _bind(self) -> None:
        """(Re)create the durable consumer to deliver from ``self._expected`` on."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        opts = self._opts
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(opts.stream, opts.durable)
        config = ConsumerConfig(
            durable_name=opts.durable,
            ack_policy=AckPolicy.ALL,
            ack_wait=common.seconds(opts.ack_wait),
            max_ack_pending=-1,
            filter_subject=f"{opts.subject_prefix}.>",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self._expected else DeliverPolicy.ALL,
            opt_start_seq=self._expected or None,
        )
        await self._js.add_consumer(opts.stream, config)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{opts.stream}.{opts.durable}"
        # A fresh inbox per binding: nothing of an older one can arrive on it.
        self._inbox = self._nc.new_inbox()
        self._arrived.clear()
        self._pulls.clear()
        self._sub = await self._nc.subscribe(
            self._inbox,
            cb=self._on_message,
            pending_msgs_limit=0,  # unbounded: what arrives is bounded by the requests
            pending_bytes_limit=0,
        )
        self._bound_at = self._expected
        self._counters.incr("consumer_rebinds")

    async def _on_message(self, msg: Any) -> None:
        pulls = self._pulls
        if not msg.reply:  # a status: 408 request expired, 409 too many requests...
            if pulls:
                pulls.popleft()
            return
        if pulls:
            pulls[0][1] -= 1
            if pulls[0][1] <= 0:
                pulls.popleft()
        self._arrived.append(msg)
        self._arrival.set()

    async def _pull(self, room: int) -> None:
        """Keep up to two requests of ``fetch_batch`` outstanding, within ``room``."""
        now = time.monotonic()
        pulls = self._pulls
        while pulls and now - pulls[0][0] > self._expires + 1.0:
            pulls.popleft()  # lost (the broker restarted...): it will never answer
            self._counters.incr("pull_expired")
        batch = self._opts.fetch_batch
        credit = sum(int(p[1]) for p in pulls)
        while len(pulls) < 2 and credit <= batch and room - credit - len(self._arrived) > 0:
            n = min(batch, room - credit - len(self._arrived))
            request = b'{"batch":%d,"expires":%d}' % (n, int(self._expires * 1e9))
            await self._nc.publish(self._next_subject, request, reply=self._inbox)
            pulls.append([now, n])
            credit += n
            self._counters.incr("pull_requests")

    async def receive(self, limit: int) -> tuple[list[Record], object | None]:
        if self._sub is None:
            await self._bind()
        try:
            await self._pull(limit)
            if not self._arrived:
                self._arrival = anyio.Event()
                with anyio.move_on_after(min(1.0, self._expires)):
                    await self._arrival.wait()
                if not self._arrived:
                    await self._pull(limit)
                    return [], None
        except Exception:
            self._counters.incr("fetch_errors")
            self._sub = None  # rebind from where we are once the broker answers again
            raise
        records: list[Record] = []
        last = None
        counters = self._counters
        arrived = self._arrived
        taken = received = 0
        while arrived and taken < limit:
            msg = arrived.popleft()
            taken += 1
            seq = _stream_seq(msg.reply)
            if self._expected and seq < self._expected:
                counters.incr("messages_redelivered")
                last = msg
                continue
            if self._expected and seq > self._expected:
                if self._bound_at != self._expected:
                    # A hole: what was delivered while we could not read it would only
                    # come back behind newer messages. Start again from the hole.
                    self._log.warning(
                        "hole",
                        "stream sequence jumped from %d to %d; re-reading from %d",
                        self._expected,
                        seq,
                        self._expected,
                    )
                    await self._bind()
                    break
                counters.incr("messages_expired", n=seq - self._expected)
            self._expected = seq + 1
            self._bound_at = -1
            last = msg
            received += 1
            try:
                records.append(common.decode(msg.data))
            except (msgspec.DecodeError, ValueError, TypeError):
                counters.incr("messages_undecodable")
        counters.incr("messages_received", n=received)
        return records, last

    async def ack(self, token: object) -> None:
        await token.ack()  # type: ignore[attr-defined]  # ack_policy all: and every earlier one

    async def aclose(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)  # the last acknowledgement reaches the broker
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None


def _stream_seq(reply: str) -> int:
    """The stream sequence in a JetStream delivery's reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the
    longer form with a domain and account hash)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])
