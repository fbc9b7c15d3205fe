"""Base classes that plugins implement: exchange adapters, stream types and sinks.

The data path is plain method calls on these objects inside one process; pluggy hooks are
only used to discover the classes (see :mod:`streamer.core.hookspecs`).

Flow inside a collector worker::

    ExchangeAdapter.stream(subscriptions, inbox)  --inbox.on_record-->  StreamType.on_record
                                                                        |  ctx.emit(record)
                                                                        v
                                                  batches of records --> sink writer process
                                                                        Sink.write(batch)

A sink may also encode in the worker (opt-in, :attr:`Sink.Encoder`): the worker turns each
batch into ready bytes with the sink's :class:`SinkEncoder` and the writer hands them to
:meth:`Sink.write_chunks` (what the encoder leaves as records still goes to ``write``).

Each component class declares an ``Options`` msgspec Struct; the config loader validates
the component's section of the YAML file against it, so bad options fail at start-up with
the exact path of the offending key.
"""

from __future__ import annotations

import logging
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import ClassVar, Literal, Protocol

import msgspec

from .counters import Counters
from .quality import Progress, StreamFacts
from .records import BookSnapshot, Chunk, EncodedBatch, Kline, Record, StreamKey, Trade

Channel = Literal["trade", "depth", "kline"]


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of a component that takes none."""


class Subscription(msgspec.Struct, frozen=True, order=True):
    """One market-data channel for one symbol, as requested by a stream type.

    ``param`` refines the channel: the kline interval (``"1m"``) or the depth update
    speed (``"100ms"``); empty for the adapter's default.
    """

    symbol: str
    channel: Channel
    param: str = ""


class SymbolInfo(msgspec.Struct, frozen=True):
    """A tradable instrument as listed by an exchange."""

    symbol: str
    status: str
    base_asset: str
    quote_asset: str

    @property
    def trading(self) -> bool:
        """True when the exchange reports the symbol as trading normally."""
        return self.status == "TRADING"


class SequenceRule(msgspec.Struct, frozen=True):
    """How an exchange's depth updates chain together (see ``binance-protocol.md`` §4).

    ``style="spot"``: drop buffered events with ``u <= L``; the first applied event has
    ``U <= L + 1 <= u``; afterwards ``U == prev_u + 1`` (a gap when ``U > local + 1``).
    ``style="futures"``: drop ``u < L``; the first applied event has ``U <= L <= u``;
    afterwards ``pu == prev_u``.
    ``max_snapshot_limit`` is the deepest REST snapshot the exchange serves;
    ``snapshot_limits`` the values its REST API accepts (empty: any up to the maximum).
    """

    style: Literal["spot", "futures"]
    max_snapshot_limit: int
    snapshot_limits: tuple[int, ...] = ()


class Inbox(Protocol):
    """Where an exchange adapter delivers what it receives (implemented by the runtime)."""

    def on_record(self, record: Record) -> None:
        """Called for every normalised record, in the order received; must not block."""

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:
        """Called after a connection carrying ``symbols`` was replaced; data may be missing."""


class ReadFlow:
    """Backpressure from the runtime to an adapter's socket reads.

    The runtime calls :meth:`pause` when the worker holds more than it should for the
    sinks (``runtime.worker_buffer``) and :meth:`resume` once the writers caught up. An
    adapter that can stop reading (so the exchange's TCP stream backs up instead of the
    worker's memory) registers its handlers with :meth:`attach` while it streams; the
    handlers run synchronously and must not block. An adapter that does not attach keeps
    reading, and what exceeds the budget is dropped as ``overflow`` markers.
    """

    def __init__(self) -> None:
        #: True between :meth:`pause` and :meth:`resume`.
        self.paused = False
        self._handlers: list[tuple[Callable[[], None], Callable[[], None]]] = []

    @property
    def attached(self) -> bool:
        """True while an adapter honours the pauses."""
        return bool(self._handlers)

    def attach(self, pause: Callable[[], None], resume: Callable[[], None]) -> Callable[[], None]:
        """Call ``pause``/``resume`` on every change from now on (``pause`` at once when
        paused already); returns the function that detaches them."""
        entry = (pause, resume)
        self._handlers.append(entry)
        if self.paused:
            pause()

        def detach() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return detach

    def pause(self) -> None:
        """Ask the adapter to stop reading (idempotent; runtime side)."""
        if not self.paused:
            self.paused = True
            for pause, _ in list(self._handlers):
                pause()

    def resume(self) -> None:
        """Undo :meth:`pause` (idempotent; runtime side)."""
        if self.paused:
            self.paused = False
            for _, resume in list(self._handlers):
                resume()


class ExchangeContext(msgspec.Struct, kw_only=True):
    """What the runtime hands an exchange adapter.

    ``http_client`` lets tests inject an ``httpx.AsyncClient`` (for example with a mock
    transport); when ``None`` the adapter creates its own. ``flow`` carries the runtime's
    requests to stop and restart reading (see :class:`ReadFlow`).
    """

    pipeline: str
    counters: Counters
    logger: logging.Logger
    http_client: object | None = None
    flow: ReadFlow = msgspec.field(default_factory=ReadFlow)


class ExchangeAdapter(ABC):
    """Connects to one exchange market; registered by name via ``register_exchanges``.

    Contract:

    * ``__init__`` must not do I/O. Options arrive already validated against ``Options``.
    * :meth:`stream` runs until cancelled. It owns every connection, reconnects forever with
      capped backoff, and calls ``inbox.on_reconnect`` whenever data may have been missed.
    * REST methods share one rate-limit budget per adapter and never burst.
    * While streaming it should honour ``context.flow`` (:class:`ReadFlow`): stop reading
      its sockets when the runtime asks, so a slow sink backs up into TCP, not memory.
    * Prices and quantities in the records it produces are the exchange's exact strings.
    """

    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: Short market name used in records and output paths (``"spot"``, ``"usdm"``).
    market: str
    #: Exchange name used in records and output paths (``"binance"``).
    exchange: str

    def __init__(self, options: msgspec.Struct, context: ExchangeContext) -> None:
        self.options = options
        self.context = context

    @abstractmethod
    async def list_symbols(self) -> list[SymbolInfo]:
        """Every instrument of the configured market, trading or not."""

    async def resolve_symbols(self, requested: Sequence[str]) -> list[str]:
        """Validate ``requested`` against :meth:`list_symbols` and return what to collect.

        ``["all"]`` means every trading symbol. Symbols that exist but are not trading are
        skipped with a warning; an unknown symbol raises ``ValueError`` naming it.
        """
        listed = {info.symbol: info for info in await self.list_symbols()}
        if list(requested) == ["all"]:
            return sorted(s for s, info in listed.items() if info.trading)
        unknown = list(dict.fromkeys(s for s in requested if s not in listed))
        if unknown:
            shown = ", ".join(s if len(s) <= 30 else s[:27] + "..." for s in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(
                f"unknown symbol(s) on {self.exchange} {self.market}: {shown}{more} "
                f"({len(unknown)} of {len(requested)} requested)"
            )
        chosen = [s for s in requested if listed[s].trading]
        idle = [f"{s} ({listed[s].status})" for s in requested if not listed[s].trading]
        if idle:
            more = f" and {len(idle) - 5} more" if len(idle) > 5 else ""
            self.context.logger.warning(
                "skipping %d symbol(s) that are not TRADING: %s%s",
                len(idle), ", ".join(idle[:5]), more,
            )  # fmt: skip
        return chosen

    def check_subscriptions(self, subscriptions: Sequence[Subscription]) -> None:  # noqa: B027
        """Raise ``ValueError`` (one line) when a subscription asks for something this
        market does not serve: a depth speed, a kline interval, a channel...

        ``streamer config check`` and ``streamer run`` call it with what each stream type
        asks for, before anything starts, so a value :meth:`stream` would refuse is
        refused up front instead of in a restart loop. No I/O; the symbols may be a
        placeholder, so judge only channels and params. Default: accept everything.
        """

    @abstractmethod
    async def stream(self, subscriptions: Sequence[Subscription], inbox: Inbox) -> None:
        """Receive ``subscriptions`` forever, delivering records to ``inbox``."""

    @property
    def sequence_rule(self) -> SequenceRule:
        """How depth updates chain; adapters that serve depth must override this."""
        raise NotImplementedError(f"{type(self).__name__} does not serve order books")

    async def fetch_book_snapshot(self, symbol: str, limit: int) -> BookSnapshot:
        """A REST order-book snapshot of ``limit`` levels per side, paced by the budget."""
        raise NotImplementedError(f"{type(self).__name__} does not serve book snapshots")

    def backfill_trades(
        self, symbol: str, from_id: int, to_id: int | None = None
    ) -> AsyncIterator[list[Trade]]:
        """Yield trades with ids ``from_id..to_id`` (inclusive; open-ended when ``None``).

        Pages come in id order. The iterator stops at ``to_id`` or at the newest trade.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot backfill trades")

    def backfill_klines(
        self, symbol: str, interval: str, start_time: int, end_time: int
    ) -> AsyncIterator[list[Kline]]:
        """Yield closed klines with ``start_time <= open_time <= end_time``, oldest first."""
        raise NotImplementedError(f"{type(self).__name__} cannot backfill klines")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections and clients. Called once, even after errors."""


class StreamContext(msgspec.Struct, kw_only=True):
    """What the runtime hands a stream type.

    ``emit`` queues a record for the pipeline's sinks (never blocks; the runtime batches).
    ``resume`` maps the streams this worker owns to the last key the sinks hold
    (aggTrade id, kline open time, book update id), so a restart continues from there.
    """

    pipeline: str
    exchange: ExchangeAdapter
    symbols: list[str]
    emit: Callable[[Record], None]
    counters: Counters
    logger: logging.Logger
    resume: dict[StreamKey, int] = msgspec.field(default_factory=dict)


class StreamType(ABC):
    """Turns what an exchange delivers into output records; registered via ``register_streams``.

    Contract:

    * :meth:`subscriptions` says which channels it needs for each symbol.
    * :meth:`on_record` is the hot path: synchronous, no I/O, no logging per call. It sees
      every record of the channels it subscribed to (other stream types may share them).
    * :meth:`run` holds its background work (snapshots, backfills) and runs until cancelled.
    * It de-duplicates by the record's key, since connections may overlap during rotation.
    """

    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: Channels whose records :meth:`on_record` wants.
    channels: ClassVar[frozenset[Channel]] = frozenset()

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        self.options = options
        self.context = context

    @abstractmethod
    def subscriptions(self) -> list[Subscription]:
        """Channels to subscribe for ``context.symbols``."""

    @abstractmethod
    def on_record(self, record: Record) -> None:
        """Process one record from a subscribed channel, emitting output via ``context.emit``."""

    def on_reconnect(self, symbols: Sequence[str], reason: str) -> None:  # noqa: B027
        """Data for ``symbols`` may have been missed; schedule whatever repairs it."""

    async def run(self) -> None:  # noqa: B027 - optional background work
        """Background work, started once the adapter is streaming; runs until cancelled."""


def writer_of(symbol: str, writers: int) -> int:
    """The writer (``0..writers-1``) that owns ``symbol`` when a sink runs as ``writers``
    processes: ``zlib.crc32`` of the symbol's UTF-8 modulo ``writers``, stable across runs,
    processes and Python's hash seed."""
    if writers <= 1:
        return 0
    return zlib.crc32(symbol.encode()) % writers


class SinkContext(msgspec.Struct, kw_only=True):
    """What the runtime hands a sink (in its own writer process).

    ``writer``/``writers``: this instance is writer ``writer`` of ``writers`` processes of
    the same sink (see :attr:`Sink.multi_writer`); it owns the symbols :meth:`owns` accepts.
    """

    name: str
    counters: Counters
    logger: logging.Logger
    writer: int = 0
    writers: int = 1

    def owns(self, symbol: str) -> bool:
        """Whether this writer process owns ``symbol`` (always true with one writer)."""
        return self.writers <= 1 or writer_of(symbol, self.writers) == self.writer


class EncoderContext(msgspec.Struct, kw_only=True):
    """What the runtime hands a sink's worker-side encoder (in a collector worker).

    ``counters`` are the worker's (published under the pipeline, not the sink).
    """

    sink: str
    pipeline: str
    counters: Counters
    logger: logging.Logger


class SinkEncoder(ABC):
    """Turns batches of records into a sink's ready bytes inside a collector worker.

    Opt-in, for sinks whose formatting is the expensive part of writing: set
    :attr:`Sink.Encoder` to a subclass. Each worker builds one instance per sink from the
    sink's validated ``Options`` (the same object the sink gets) and calls :meth:`encode`
    with every batch bound for that sink; the writer de-duplicates the chunks by key and
    passes them to :meth:`Sink.write_chunks`.

    Invariants an encoder must keep (the writer relies on them for crash safety and
    de-duplication):

    * **No I/O**, no blocking, no state that depends on files: it runs on the worker's hot
      path, and the files belong to the writer (anything that depends on what is on disk,
      such as a header decided by an existing file, stays a record).
    * **Whole rows**: each record's bytes end where the next record's begin
      (``Chunk.offsets``), so a chunk can be cut at any record boundary.
    * **Every record accounted for exactly once**: in one chunk (``keys``/``times``/
      ``offsets`` carry one entry per record) or in ``EncodedBatch.records``.
    * **Keys per record strictly increasing** within a stream, across the stream's chunks
      in the order returned. Only records that count as held go into chunks (never an
      unclosed kline): every key in a written chunk raises the stream's mark. When a
      stream's keys do not increase, leave that stream's records of the batch as records.
    * Records left as records are written before the chunks; keep a stream either in
      chunks or in records within one batch (unclosed klines excepted: they never raise
      the mark).
    * Raising is a bug: the worker counts ``encoder_errors``, logs it and sends that batch
      as records instead.
    """

    def __init__(self, options: msgspec.Struct, context: EncoderContext) -> None:
        self.options = options
        self.context = context

    @abstractmethod
    def encode(self, batch: Sequence[Record]) -> EncodedBatch:
        """Ready bytes per output unit for ``batch`` (in order), plus the records left over."""


class Sink(ABC):
    """Durable storage for records; registered via ``register_sinks``.

    Contract:

    * One instance per configured sink, living in its own writer process.
    * :meth:`write` takes one batch and may buffer; :meth:`flush` makes everything written
      so far durable (to the sink's fsync policy) and is when the runtime counts rows as
      flushed. A failing write must not lose rows silently: keep them, retry, and report
      what overflows as a gap marker.
    * :meth:`holdings` reports the last key held per stream so a restart never writes a
      duplicate and backfills exactly what is missing.
    * :meth:`check` (a classmethod) looks at the storage ``options`` name before anything
      starts: ``streamer config check`` and ``streamer run`` both call it and print what it
      raises (``ValueError``, one line) as ``error: sinks.<name>: ...``, exit code 1.
    * :meth:`claims` (a classmethod) names the directories this sink writes and no other
      collector may: the supervisor holds an OS lock (``flock`` on a ``.streamer.lock``
      file inside each) for the whole run, so a second run on the same path is refused
      with the holder's pid and state dir; the lock dies with the process.
    * :meth:`open` raising ends the run (exit code 1, one line naming the sink): a sink
      that cannot open its storage is a configuration problem, not something a restart
      fixes.
    * Rows still counted by :attr:`pending_rows` after :meth:`close` are lost: the run
      reports how many and exits non-zero. Record the lost key ranges where the next run
      sees them (the CSV sink writes ``gap`` markers); streams the next run can backfill
      are re-fetched from :meth:`holdings` anyway, since lost rows never advanced them.
    * :meth:`verify` (a classmethod, optional) checks the files a sink of this type wrote;
      ``streamer verify PATH --sink TYPE`` dispatches to it (passing ``progress=``, a
      :class:`~streamer.core.quality.Progress`, on a terminal when it accepts that keyword).
    * :meth:`report_facts` (a classmethod, optional) describes those files, stream by
      stream, for ``streamer report PATH --sink TYPE``.
    * :attr:`Encoder` (optional): a :class:`SinkEncoder` subclass that builds the sink's
      bytes in the collector workers. The sink then gets most data through
      :meth:`write_chunks` (chunks already de-duplicated by key against the writer's
      marks, possibly cut at a record boundary) and the rest through :meth:`write`; it
      must accept both, and treat a chunk's records like records it was given (the last
      key of a written chunk is held). A sink without an encoder gets only :meth:`write`.
    * :attr:`multi_writer` (optional): the sink may run as several writer processes
      (``writers: N`` on its config, or automatic), each with its own instance owning the
      symbols ``context.owns(symbol)`` accepts (:func:`writer_of`). Every record of a
      symbol reaches that one instance. Such a sink must touch only its own symbols'
      storage in :meth:`open` and :meth:`holdings` (no repair or scan of another writer's
      files: that writer may be writing them). :meth:`claims` is still taken once per
      sink by the supervisor, so its writers do not lock each other out.
    """

    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: Worker-side encoder of this sink type; ``None``: records travel to :meth:`write`.
    Encoder: ClassVar[type[SinkEncoder] | None] = None
    #: Whether instances may run as several writer processes, one per symbol partition
    #: (see the class docstring); ``False``: always one writer, ``writers`` above 1 refused.
    multi_writer: ClassVar[bool] = False

    @classmethod
    def verify(cls, path: str | os.PathLike[str], *, as_json: bool = False) -> tuple[str, int]:
        """Check the data a sink of this type wrote at ``path`` (its configured location).

        Returns the report to print (a table, or JSON with ``as_json``) and the exit code:
        0 when the data is complete and consistent (or every problem is explained by a gap
        marker), 1 otherwise. Raises ``ValueError`` for a ``path`` that is not such data
        (the command prints ``error: ...`` and exits 2). The default raises
        ``NotImplementedError``: the sink type has no checker.
        """
        raise NotImplementedError(f"sink type {cls.__name__} cannot check its data")

    @classmethod
    def report_facts(
        cls,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        end: int | None = None,
        symbols: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[StreamFacts]:
        """Describe the data a sink of this type wrote at ``path``, for ``streamer report``:
        one :class:`~streamer.core.quality.StreamFacts` per stream (its gaps with causes,
        per-day counts per minute, latency histograms), read streaming (bounded memory).

        ``start``/``end`` (ms, end exclusive) and ``symbols`` narrow what is read;
        ``progress`` (when given) is told what is read. Raises ``ValueError`` for a
        ``path`` that is not such data. The default raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"sink type {cls.__name__} cannot describe its data")

    def __init__(self, options: msgspec.Struct, context: SinkContext) -> None:
        self.options = options
        self.context = context

    @classmethod  # noqa: B027 - optional, no-op by default
    def check(cls, options: msgspec.Struct) -> None:
        """Raise ``ValueError`` (one line) when the storage ``options`` name cannot work:
        a path that is a file, not writable, on a read-only file system...

        Runs in the supervisor (and in ``streamer config check``) before any process is
        spawned. Look, do not touch: create nothing here.
        """

    @classmethod
    def claims(cls, options: msgspec.Struct) -> list[str]:
        """Directories this sink instance writes and no other collector may share.

        The supervisor creates each one if missing and locks it for the whole run (see the
        class docstring). Default: none (for example a database sink).
        """
        return []

    async def open(self) -> None:  # noqa: B027 - optional
        """Prepare storage (create directories, repair torn files). Called once; raising
        ends the run (see the class docstring)."""

    @abstractmethod
    async def write(self, batch: Sequence[Record]) -> None:
        """Accept one batch of records, in order."""

    async def write_chunks(self, streams: Sequence[StreamKey], chunks: Sequence[Chunk]) -> None:
        """Accept ready bytes made by this sink's :attr:`Encoder`, in order.

        ``streams`` is the batch's stream table (``streams[chunk.stream]``). Only called
        for sinks with an encoder; the default raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no worker-side encoder")

    @abstractmethod
    async def flush(self) -> None:
        """Make everything accepted so far durable."""

    async def close(self) -> None:
        """Flush and release resources. Called once on shutdown."""
        await self.flush()

    async def holdings(self) -> dict[StreamKey, int]:
        """Last key held per stream (aggTrade id, kline open time, book update id)."""
        return {}

    @property
    def pending_rows(self) -> int:
        """Rows accepted but not yet durable; the runtime keeps flushing while non-zero.

        After :meth:`close`: the rows that could not be written (lost)."""
        return 0


class SourceContext(msgspec.Struct, kw_only=True):
    """What the runtime hands a source (in the storage node's source worker)."""

    name: str
    counters: Counters
    logger: logging.Logger


class Source(ABC):
    """Feeds a storage node (``streamer store``) with records from a bus instead of an
    exchange; registered via ``register_sources``.

    Contract:

    * One instance in the store's source worker process; ``__init__`` does no I/O.
    * :meth:`check` (a classmethod) looks at the options before anything starts (one-line
      ``ValueError``: a missing driver, a malformed URL).
    * :meth:`open` connects; raising ends that worker (the supervisor restarts it).
    * :meth:`receive` returns the next records, in the bus's order, at most ``limit`` of
      them, and an opaque token for them (``None`` when nothing arrived within about a
      second, so the worker can see a stop request).
    * :meth:`ack` is called with a token once every record received up to and including
      that token's batch has been **flushed by every sink**: the source may then tell the
      bus they are done. Tokens arrive in order; a token acknowledges everything before it.
      Whatever was received but never acknowledged (a killed store) must come again from
      :meth:`receive` after a restart, in order; the sinks drop what they already hold.
    """

    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: msgspec.Struct, context: SourceContext) -> None:
        self.options = options
        self.context = context

    @classmethod  # noqa: B027 - optional, no-op by default
    def check(cls, options: msgspec.Struct) -> None:
        """Raise ``ValueError`` (one line) when ``options`` cannot work; no I/O."""

    async def open(self) -> None:  # noqa: B027 - optional
        """Connect and position at the first record not yet acknowledged."""

    @abstractmethod
    async def receive(self, limit: int) -> tuple[list[Record], object | None]:
        """Up to ``limit`` records in order and their token (``None``: nothing arrived)."""

    async def ack(self, token: object) -> None:  # noqa: B027 - optional
        """Every record up to ``token``'s batch is durable in every sink."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections. Called once, even after errors."""
