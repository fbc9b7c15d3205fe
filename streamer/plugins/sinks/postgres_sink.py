"""The ``postgres`` sink: market data straight into PostgreSQL, exactly once.

Tables, keys and types are described in :mod:`._pg_schema` (and the README, section
``PostgreSQL``). The driver is asyncpg, an extra: ``pip install 'market-streamer[postgres]'``.
We chose it over psycopg 3 because it is asyncio-native like the sink writer's event loop
and its ``copy_to_table`` streams an async iterable of bytes. Prices and quantities travel as
the exchange's strings in COPY's text format; the server parses them into ``numeric``
exactly (measured cheaper end to end than binary COPY, which needs ``Decimal`` objects).

How it writes: :meth:`PostgresSink.write` drops what it already accepted (keys grow per
stream) and buffers the records per stream. :meth:`PostgresSink.flush` (also run from
``write`` every ``flush_rows``) writes everything buffered in ONE transaction: first it
locks the ``heads`` rows of the streams it touches (last key per stream; inserted if
missing, then ``SELECT ... FOR UPDATE`` in key order, so two collectors on the same streams
queue without deadlocks). Every writer advances a stream's head in the transaction that
writes its rows, so while the lock is held every committed row of the stream lies at or
below the head: records above it are COPYed straight into the table (no conflict check),
records at or below it (a second collector filling a hole, a retry after a commit whose
answer was lost) go through a temporary staging table and ``INSERT ... ON CONFLICT DO
NOTHING`` (counted ``rows_staged``). Then the heads advance (``GREATEST``). A unique
violation on the direct COPY (rows put in by something that keeps no heads) retries the
flush with every row staged. So a restart, a retried flush or a second collector never
doubles a row, and ``heads`` (what :meth:`holdings` reads) never claims a row that is not
committed.

Faults: a database that is down at start-up is retried with a capped backoff (counters
``connect_errors``, gauge ``db_connected``); a connection lost mid-run keeps every row in
the buffer and reconnects with backoff; a server-side error (disk full, permission
denied, read-only...) rolls back, counts ``write_errors`` and retries. Rows beyond
``max_buffered_rows`` are dropped, counted (``rows_dropped``) and written as a ``gap``
marker (``markers`` table) once writing works again, like the CSV sink. Rows still
unwritten at close are logged with their key ranges and reported as lost
(``pending_rows``); their streams were never advanced in ``heads``, so the next run
backfills what the exchange can serve again.

A database holds no directory: :meth:`claims` is empty, and several collectors may write
into one database at once (the primary keys make that safe).
"""

from __future__ import annotations

import asyncio
import bisect
import decimal
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec

from streamer import (
    BookSnapshot,
    DepthUpdate,
    Duration,
    Kline,
    Marker,
    RateLimitedLog,
    Record,
    Sink,
    SinkContext,
    StreamKey,
    Trade,
    check_duration,
    hookimpl,
    kline_stream,
    parse_duration,
)

from . import _pg_schema as schema

__all__ = ["Options", "PostgresSink"]

INSTALL = "pip install 'market-streamer[postgres]'"


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``postgres`` sink (the ``sinks.<name>`` section of the YAML config)."""

    #: ``postgresql://user:password@host:port/database?sslmode=...``; empty: the libpq
    #: environment (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``...).
    dsn: str = ""
    #: Schema of the tables (created when ``create_tables`` and missing).
    schema: str = "public"
    #: Prefix of every table name (``md_`` gives ``md_aggtrade``...).
    table_prefix: str = ""
    #: Create the tables and apply newer schema versions at start; off: they must exist.
    create_tables: bool = True
    #: ``flush`` runs at least this often (the writer's timer).
    flush_interval: Duration = "1s"
    #: ``write`` also flushes once this many rows are buffered.
    flush_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 50_000
    #: Rows kept for retry while the database fails; beyond it rows are dropped and reported.
    max_buffered_rows: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 1_000_000
    #: Time allowed to connect once.
    connect_timeout: Duration = "5s"
    #: Time allowed for one flush transaction before the connection is dropped.
    write_timeout: Duration = "60s"
    #: Longest wait between two attempts while the database fails (starts at 0.25 s).
    retry_backoff_max: Duration = "5s"
    #: At close, keep retrying a failing database this long before rows count as lost.
    close_timeout: Duration = "10s"

    def __post_init__(self) -> None:
        for name in ("flush_interval", "connect_timeout", "write_timeout", "retry_backoff_max"):
            check_duration(name, getattr(self, name), positive=True)
        check_duration("close_timeout", self.close_timeout)
        if self.flush_rows > self.max_buffered_rows:
            raise ValueError("flush_rows: must not exceed max_buffered_rows")
        schema.check_identifier("schema", self.schema)
        schema.check_identifier("table_prefix", self.table_prefix, empty=True)
        if self.dsn:
            scheme = urlsplit(self.dsn).scheme
            if scheme not in ("postgres", "postgresql"):
                raise ValueError("dsn: must be a postgresql://... URL (or empty for PG* variables)")


def _driver() -> Any:
    """The asyncpg module, or a one-line ``ValueError`` naming the extra to install."""
    try:
        import asyncpg
    except ImportError as exc:
        raise ValueError(f"the postgres sink needs asyncpg ({exc}): {INSTALL}") from None
    return asyncpg


def _where(dsn: str) -> str:
    """``host:port/database`` of ``dsn`` for messages (never the password)."""
    if not dsn:
        return "the PG* environment's server"
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


class SchemaError(Exception):
    """The tables are missing or newer than this version knows: a configuration problem."""


#: SQLSTATE classes of errors that mean "this connection is gone, make a new one".
_CONNECTION_STATES = ("08", "57P")
#: SQLSTATEs of a transaction that lost a race and can simply be retried.
_RETRY_STATES = ("40001", "40P01")
#: SQLSTATEs that no retry fixes at start-up (credentials, missing database).
_FATAL_AT_OPEN = ("28000", "28P01", "3D000", "3F000", "42501")


#: What the driver raises client-side for a value it cannot encode (``Decimal("x")``).
_ENCODE_ERRORS = (decimal.InvalidOperation, ValueError, TypeError)


def _sqlstate(exc: BaseException) -> str:
    return getattr(exc, "sqlstate", None) or ""


def _text(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """A short cause: what markers and status show."""
    state = _sqlstate(exc)
    if state in ("53100",):
        return "disk full"
    if state in ("42501",):
        return "permission denied"
    if state in ("25006",):
        return "read-only database"
    text = _text(exc)
    if state.startswith(_CONNECTION_STATES) or isinstance(exc, OSError | TimeoutError):
        return f"database unreachable: {text}"
    if state:
        return f"database error {state}: {text}"
    return f"{type(exc).__name__}: {text}"


class _Drop:
    """Rows of one stream dropped while the database failed, reported as a gap marker."""

    __slots__ = ("first_key", "last_key", "reason", "rows", "time")

    def __init__(self, first_key: int, time_ms: int, reason: str) -> None:
        self.first_key = first_key
        self.last_key = first_key
        self.time = time_ms
        self.reason = reason
        self.rows = 0


class _Pending:
    """What one stream has buffered: rows, first and last key, time of the first."""

    __slots__ = ("first_key", "first_time", "last_key", "rows")

    def __init__(self, first_key: int, first_time: int) -> None:
        self.first_key = first_key
        self.first_time = first_time
        self.last_key = first_key
        self.rows = 0


class PostgresSink(Sink):
    """Writes records to PostgreSQL tables; see the module docstring.

    Counters (in ``context.counters``): per (market symbol, stream) ``rows_written``,
    ``rows_dropped``, ``rows_duplicate``; process-wide ``write_errors`` (failed flush
    transactions), ``connect_errors``, ``flush_retries`` (lost races retried),
    ``copy_batches``, ``records_invalid``, ``klines_unclosed``, ``gap_markers``,
    ``rows_dropped`` (unwritten at close); gauges ``db_connected`` (0/1), ``rows_buffered``
    (rows waiting for a retry while the database fails).
    """

    Options = Options

    @classmethod
    def check(cls, options: Options) -> None:
        """Refuse to start without the driver (looks, connects nowhere)."""
        _driver()

    def __init__(self, options: Options, context: SinkContext) -> None:
        super().__init__(options, context)
        self._opts = options
        self._pg = _driver()
        self._counters = context.counters
        self._log = RateLimitedLog(context.logger, interval=30.0)
        self._tables = schema.table_names(options.schema, options.table_prefix)
        self._where = _where(options.dsn)
        self._connect_timeout = parse_duration(options.connect_timeout)
        self._write_timeout = parse_duration(options.write_timeout)
        self._backoff_max = parse_duration(options.retry_backoff_max)
        self._close_timeout = parse_duration(options.close_timeout)
        self._conn: Any = None
        self._migrated = False
        #: Buffered records per data kind: (stream, records in key order) in arrival order.
        self._chunks: dict[str, list[tuple[StreamKey, list]]] = {k: [] for k in schema.DATA}
        #: Buffered markers (undated ones stamped with the time they arrived).
        self._markers: list[Marker] = []
        #: After a unique violation on a direct COPY (rows above a head that some other
        #: writer put in without advancing ``heads``): the next try stages every row.
        self._stage_all = False
        self._streams: dict[StreamKey, _Pending] = {}
        self._pending_rows = 0
        #: Last key accepted per stream (de-duplication) and last key committed (holdings).
        self._accepted: dict[StreamKey, int] = {}
        self._durable: dict[StreamKey, int] = {}
        self._failing = False
        self._failure_reason: str | None = None
        self._next_try = 0.0
        self._backoff = 0.0
        self._drops: dict[tuple[StreamKey, str], _Drop] = {}
        self._opened = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (retrying with backoff while the server is unreachable), apply the
        schema versions and read the heads. Raises for what no retry fixes: bad
        credentials, a missing database, missing or newer tables."""
        if self._opened:
            return
        delay = 0.25
        while True:
            try:
                await self._connection()
                await self._read_heads()
                break
            except SchemaError:
                raise
            except Exception as exc:
                if not self._transient(exc) or _sqlstate(exc) in _FATAL_AT_OPEN:
                    raise RuntimeError(f"{self._where}: {_reason(exc)} ({_text(exc)})") from None
                self._counters.incr("connect_errors")
                self._counters.set("db_connected", 0)
                self._log.warning(
                    "connect_failed",
                    "cannot reach PostgreSQL at %s (%s); retrying every %.1f s or less",
                    self._where,
                    _reason(exc),
                    self._backoff_max,
                )
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
        self._opened = True

    async def holdings(self) -> dict[StreamKey, int]:
        """Last committed key per stream, from the ``heads`` table (aggTrade id, closed
        kline open time, depth/orderbook ``last_update_id``)."""
        if not self._opened:
            await self.open()
        return dict(self._durable)

    async def write(self, batch: Sequence[Record]) -> None:
        """Buffer one batch (in order); flushes once ``flush_rows`` rows are buffered."""
        self._accept(batch)
        if self._pending_rows >= self._opts.flush_rows and not self._failing:
            await self.flush()

    async def flush(self) -> None:
        """Write everything buffered in one transaction; never raises for database errors
        (rows stay buffered and are retried after a backoff)."""
        if not self._pending_rows and not self._markers and not self._drops:
            return
        if self._failing and time.monotonic() < self._next_try:
            return
        await self._flush_once()

    async def close(self) -> None:
        """Flush (retrying a failing database up to ``close_timeout``), then disconnect."""
        if self._closed:
            return
        deadline = time.monotonic() + self._close_timeout
        await self.flush()
        while (self._pending_rows or self._markers) and self._failing:
            wait = self._next_try - time.monotonic()
            if time.monotonic() + max(wait, 0) > deadline:
                break
            await asyncio.sleep(max(wait, 0.01))
            await self.flush()
        if self._pending_rows:
            self._mark_lost()
        await self._drop_connection()
        self._closed = True

    @property
    def pending_rows(self) -> int:
        """Rows buffered and not yet committed (after close: the rows lost)."""
        return self._pending_rows

    # --- connection ------------------------------------------------------------------

    def _transient(self, exc: BaseException) -> bool:
        pg = self._pg
        if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | pg.InterfaceError):
            return True
        state = _sqlstate(exc)
        return state.startswith(_CONNECTION_STATES) or state == "53300"

    async def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        conn = await self._pg.connect(
            self._opts.dsn or None,
            timeout=self._connect_timeout,
            server_settings={"application_name": "market-streamer"},
        )
        try:
            if not self._migrated:
                await self._migrate(conn)
                self._migrated = True
            for kind in schema.KINDS:
                stage = schema.stage_name(self._opts.table_prefix, kind)
                await conn.execute(schema.stage_ddl(kind, stage, self._tables[kind]))
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self._counters.set("db_connected", 1)
        return conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._counters.set("db_connected", 0)
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2)
        except Exception:
            conn.terminate()

    async def _migrate(self, conn: Any) -> None:
        """Apply the schema versions this database lacks (one advisory lock per schema and
        prefix, so two collectors starting together do it once)."""
        opts = self._opts
        t = self._tables
        async with conn.transaction():
            lock = f"market-streamer:{opts.schema}:{opts.table_prefix}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock)
            exists = await conn.fetchval("SELECT to_regclass($1)", t[schema.MIGRATIONS_TABLE])
            current = 0
            if exists is not None:
                current = await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {t[schema.MIGRATIONS_TABLE]}"
                )
            if current > schema.LATEST:
                raise SchemaError(
                    f"{self._where}: tables of schema version {current} in {opts.schema}, "
                    f"this streamer knows up to {schema.LATEST}: upgrade market-streamer"
                )
            if current == schema.LATEST:
                return
            if not opts.create_tables:
                raise SchemaError(
                    f"{self._where}: tables {opts.schema}.{opts.table_prefix}* are at schema "
                    f"version {current}, not {schema.LATEST}, and create_tables is off"
                )
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1", opts.schema
            ):
                await conn.execute(f'CREATE SCHEMA "{opts.schema}"')
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t[schema.MIGRATIONS_TABLE]} ("
                "version integer PRIMARY KEY, description text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, description, statements in schema.MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements(t):
                    await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {t[schema.MIGRATIONS_TABLE]} (version, description) "
                    "VALUES ($1, $2)",
                    version,
                    description,
                )
                self.context.logger.info(
                    "postgres sink %s: applied schema version %d (%s)",
                    self.context.name,
                    version,
                    description,
                )

    async def _read_heads(self) -> None:
        conn = await self._connection()
        rows = await conn.fetch(
            f"SELECT exchange, market, symbol, stream, last_key FROM {self._tables[schema.HEADS]}"
        )
        for r in rows:
            sk = StreamKey(r[0], r[1], r[2], r[3])
            self._durable[sk] = max(self._durable.get(sk, r[4]), r[4])
            if self._accepted.get(sk, -1) < self._durable[sk]:
                self._accepted[sk] = self._durable[sk]

    # --- accept ----------------------------------------------------------------------

    def _accept(self, batch: Sequence[Record]) -> None:
        trades: list[Trade] = []
        klines: list[Kline] = []
        depths: list[DepthUpdate] = []
        books: list[BookSnapshot] = []
        markers: list[Marker] = []
        unclosed = invalid = 0
        for r in batch:
            cls = r.__class__
            if cls is Trade:
                trades.append(r)
            elif cls is DepthUpdate:
                depths.append(r)
            elif cls is Kline:
                if r.closed:
                    klines.append(r)
                else:
                    unclosed += 1
            elif cls is BookSnapshot:
                books.append(r)
            elif cls is Marker:
                markers.append(r)
            else:
                invalid += 1
        if unclosed:
            self._counters.incr("klines_unclosed", n=unclosed)
        if invalid:
            self._counters.incr("records_invalid", n=invalid)
            self._log.warning("invalid_record", "ignored %d records of unknown type", invalid)
        if trades:
            kept = self._dedupe(trades, "aggtrade", "trade_id", "transact_time")
            self._buffer(schema.AGGTRADE, kept)
        if klines:
            kept = self._dedupe(klines, None, "open_time", "open_time")
            self._buffer(schema.KLINE, kept)
        if depths:
            kept = self._dedupe(depths, "depth", "last_update_id", "event_time")
            self._buffer(schema.DEPTH, kept)
        if books:
            # Levels become array literals: a price that is no number could split a level.
            good = [b for b in books if not schema.bad_numbers(schema.ORDERBOOK, b)]
            if len(good) != len(books):
                self._invalid(len(books) - len(good))
            kept = self._dedupe(good, "orderbook", "last_update_id", "event_time")
            self._buffer(schema.ORDERBOOK, kept)
        if markers:
            self._add_markers(markers)

    def _add_markers(self, markers: list[Marker]) -> None:
        now = time.time_ns() // 1_000_000
        self._markers += [m if m.time else msgspec.structs.replace(m, time=now) for m in markers]

    def _invalid(self, n: int) -> None:
        self._counters.incr("records_invalid", n=n)
        self._log.error(
            "invalid_number", "dropped %d records whose price or quantity is no number", n
        )

    def _dedupe(
        self, records: list, stream: str | None, key_attr: str, time_attr: str
    ) -> list[tuple[StreamKey, list]]:
        """Group ``records`` by stream, keeping only keys above what was accepted."""
        groups: dict[StreamKey, list] = {}
        accepted = self._accepted
        last_group: list | None = None
        last_ident: tuple | None = None
        for r in records:
            ident = (r.exchange, r.market, r.symbol, r.interval if stream is None else stream)
            if ident != last_ident:
                sk = StreamKey(
                    r.exchange, r.market, r.symbol, kline_stream(r.interval) if stream is None
                    else stream
                )  # fmt: skip
                last_group = groups.setdefault(sk, [])
                last_ident = ident
            last_group.append(r)
        out = []
        for sk, group in groups.items():
            last = accepted.get(sk, -1)
            kept = []
            for r in group:
                k = getattr(r, key_attr)
                if k > last:
                    kept.append(r)
                    last = k
            if len(kept) != len(group):
                self._counters.incr("rows_duplicate", _msym(sk), sk.stream, len(group) - len(kept))
            if kept:
                accepted[sk] = last
                out.append((sk, kept, key_attr, time_attr))
        return out

    def _buffer(self, kind: str, groups: list) -> None:
        for sk, records, key_attr, time_attr in groups:
            if kind == schema.DEPTH:
                n = sum([schema.depth_row_count(r) for r in records])
            else:
                n = len(records)
            if self._pending_rows + n > self._opts.max_buffered_rows:
                room = max(0, self._opts.max_buffered_rows - self._pending_rows)
                records, n = self._drop_overflow(sk, kind, records, n, room, key_attr, time_attr)
                if not records:
                    continue
            first = records[0]
            p = self._streams.get(sk)
            if p is None:
                p = self._streams[sk] = _Pending(
                    getattr(first, key_attr), getattr(first, time_attr) or first.receive_time
                )
            p.last_key = getattr(records[-1], key_attr)
            p.rows += n
            self._chunks[kind].append((sk, records))
            self._pending_rows += n

    def _drop_overflow(self, sk, kind, records, rows, room, key_attr, time_attr):
        """Keep the records whose ``rows`` fit in ``room``; count the rest as dropped.
        Returns the records kept and their rows."""
        if kind == schema.DEPTH:
            cut = used = 0
            for r in records:
                n = schema.depth_row_count(r)
                if used + n > room:
                    break
                used += n
                cut += 1  # noqa: SIM113 - counts only the records that fit
        else:
            cut = used = min(room, len(records))
        dropped = records[cut:]
        lost = rows - used
        first = dropped[0]
        reason = self._failure_reason or "buffer full"
        drop = self._drops.get((sk, reason))
        if drop is None:
            t = getattr(first, time_attr) or first.receive_time
            drop = self._drops[(sk, reason)] = _Drop(getattr(first, key_attr), t, reason)
        drop.last_key = getattr(dropped[-1], key_attr)
        drop.rows += lost
        self._counters.incr("rows_dropped", _msym(sk), sk.stream, lost)
        self._log.error(
            "rows_dropped",
            "retry buffer full (%d rows, max_buffered_rows): dropped %d rows of %s %s; a gap "
            "marker follows once writing works again",
            self._pending_rows,
            lost,
            sk.symbol,
            sk.stream,
        )
        return records[:cut], used

    # --- flush -----------------------------------------------------------------------

    async def _flush_once(self) -> None:
        if self._drops:
            self._report_drops()  # into the same transaction as the rows
        for _attempt in range(3):
            try:
                conn = await self._connection()
                async with asyncio.timeout(self._write_timeout):
                    await self._transaction(conn)
            except Exception as exc:
                state = _sqlstate(exc)
                if state in _RETRY_STATES:
                    self._counters.incr("flush_retries")
                    continue
                if state == "23505" and not self._stage_all:
                    # A row above a head is there already: written by something that
                    # does not keep the heads. Stage every row of this flush instead.
                    self._stage_all = True
                    self._counters.incr("flush_retries")
                    continue
                refused = state.startswith("22") or isinstance(exc, _ENCODE_ERRORS)
                if refused and self._drop_invalid():
                    continue
                await self._failed(exc)
                return
            self._committed()
            return
        await self._failed(RuntimeError("transaction kept losing races"))

    async def _transaction(self, conn: Any) -> None:
        """One flush: lock the heads, COPY what lies above them straight into the tables,
        stage and ``ON CONFLICT DO NOTHING`` what does not, advance the heads."""
        heads = sorted(self._streams.items())
        async with conn.transaction():
            old = await self._lock_heads(conn, [sk for sk, _ in heads]) if heads else {}
            for kind in schema.DATA:
                direct, staged = self._split(kind, old)
                if direct:
                    await self._copy(conn, kind, direct, self._opts.schema,
                                     self._opts.table_prefix + kind)  # fmt: skip
                if staged:
                    await self._copy_staged(conn, kind, staged)
                    self._counters.incr("rows_staged", n=len(staged))
            if self._markers:
                await self._copy_staged(conn, schema.MARKERS, self._markers)
            if heads:
                await conn.execute(
                    f"UPDATE {self._tables[schema.HEADS]} AS h SET last_key = "
                    "GREATEST(h.last_key, n.last_key), updated_at = now() FROM unnest($1::text[], "
                    "$2::text[], $3::text[], $4::text[], $5::bigint[]) AS n(exchange, market, "
                    "symbol, stream, last_key) WHERE (h.exchange, h.market, h.symbol, h.stream) = "
                    "(n.exchange, n.market, n.symbol, n.stream)",
                    *_columns([sk for sk, _ in heads]),
                    [p.last_key for _, p in heads],
                )

    async def _lock_heads(self, conn: Any, streams: list[StreamKey]) -> dict[StreamKey, int]:
        """Lock the ``heads`` rows of ``streams`` (sorted) and return their last keys.

        Missing rows are inserted first (``-1``: nothing held; the same transaction raises
        them before it commits), then every row is locked ``FOR UPDATE`` in key order, so
        two writers of the same streams queue instead of deadlocking. While they are
        locked no other writer can commit a row of these streams (every writer takes the
        lock before its rows and advances the head with them), and every row committed so
        far has a key at or below its stream's head: a row above it cannot be in the table.
        """
        t = self._tables[schema.HEADS]
        cols = _columns(streams)
        await conn.execute(
            f"INSERT INTO {t} (exchange, market, symbol, stream, last_key) SELECT *, -1 FROM "
            "unnest($1::text[], $2::text[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
            *cols,
        )
        rows = await conn.fetch(
            f"SELECT exchange, market, symbol, stream, last_key FROM {t} WHERE (exchange, "
            "market, symbol, stream) IN (SELECT * FROM unnest($1::text[], $2::text[], "
            "$3::text[], $4::text[])) ORDER BY exchange, market, symbol, stream FOR UPDATE",
            *cols,
        )
        return {StreamKey(r[0], r[1], r[2], r[3]): r[4] for r in rows}

    def _split(self, kind: str, old: dict[StreamKey, int]) -> tuple[list, list]:
        """The buffered records of ``kind`` above their stream's head (straight into the
        table) and at or below it (through the staging table)."""
        key = schema.KEY_ATTR[kind]
        direct: list = []
        staged: list = []
        for sk, records in self._chunks[kind]:
            head = old.get(sk, -1)
            if self._stage_all:
                staged += records
            elif getattr(records[0], key) > head:
                direct += records
            elif getattr(records[-1], key) <= head:
                staged += records
            else:
                cut = bisect.bisect_right(records, head, key=lambda r: getattr(r, key))
                staged += records[:cut]
                direct += records[cut:]
        return direct, staged

    async def _copy(self, conn: Any, kind: str, records: list, schema_name, table: str) -> None:
        """COPY (text format) ``records`` into ``table``, built piece by piece so the server
        parses one piece while the next is built."""

        async def pieces():
            now = time.time_ns() // 1_000_000
            for i in range(0, len(records), _PIECE):
                part = records[i : i + _PIECE]
                if kind == schema.MARKERS:
                    lines = schema.marker_text(part, now)
                else:
                    lines = schema.TEXT[kind](part)
                yield schema.copy_text(kind, lines, part, now)

        await conn.copy_to_table(
            table, source=pieces(), columns=schema.COLUMNS[kind], schema_name=schema_name,
            format="text",
        )  # fmt: skip
        self._counters.incr("copy_batches")

    async def _copy_staged(self, conn: Any, kind: str, records: list) -> None:
        stage = schema.stage_name(self._opts.table_prefix, kind)
        await self._copy(conn, kind, records, None, stage)
        await conn.execute(schema.insert_sql(kind, stage, self._tables[kind]))

    def _committed(self) -> None:
        counters = self._counters
        for sk, p in self._streams.items():
            counters.incr("rows_written", _msym(sk), sk.stream, p.rows)
            if p.last_key > self._durable.get(sk, -1):
                self._durable[sk] = p.last_key
        self._streams = {}
        self._chunks = {k: [] for k in schema.DATA}
        self._markers = []
        self._pending_rows = 0
        self._stage_all = False
        if self._failing:
            self._failing = False
            self._failure_reason = None
            self._log.log(logging.INFO, "write_recovered", "writing to %s works again", self._where)
        self._backoff = 0.0
        counters.set("rows_buffered", 0)

    async def _failed(self, exc: BaseException) -> None:
        reason = _reason(exc)
        self._failure_reason = reason
        self._failing = True
        self._counters.incr("write_errors")
        self._counters.set("rows_buffered", self._pending_rows)
        self._backoff = min(max(self._backoff * 2, 0.25), self._backoff_max)
        self._next_try = time.monotonic() + self._backoff
        if self._transient(exc) or not isinstance(exc, self._pg.PostgresError):
            # Anything but a clean server-side error may leave the connection unusable.
            await self._drop_connection()
        self._log.error(
            reason.split(":")[0].replace(" ", "_"),
            "cannot write to PostgreSQL at %s (%s: %s); %d rows wait in the retry buffer "
            "(max_buffered_rows %d), next try in %.2f s",
            self._where,
            reason,
            _text(exc),
            self._pending_rows,
            self._opts.max_buffered_rows,
            self._backoff,
        )

    def _drop_invalid(self) -> bool:
        """After a data error: drop the records whose numbers ``numeric`` refuses. True
        when some were dropped (then the flush is retried)."""
        dropped = 0
        for kind in schema.DATA:
            chunks = []
            for sk, records in self._chunks[kind]:
                good = []
                for r in records:
                    if schema.bad_numbers(kind, r):
                        rows = schema.row_count(kind, r)
                        dropped += 1
                        self._pending_rows -= rows
                        self._streams[sk].rows -= rows
                    else:
                        good.append(r)
                if good:
                    chunks.append((sk, good))
            self._chunks[kind] = chunks
        if dropped:
            self._invalid(dropped)
        return dropped > 0

    def _report_drops(self) -> None:
        drops, self._drops = self._drops, {}
        markers = [
            Marker(sk.exchange, sk.market, sk.symbol, sk.stream, "gap", d.first_key,
                   d.last_key, d.time, d.reason)
            for (sk, _), d in drops.items()
        ]  # fmt: skip
        self._counters.incr("gap_markers", n=len(markers))
        self._add_markers(markers)

    def _mark_lost(self) -> None:
        """Rows that cannot be written before exit: count and log their key ranges (the
        database is what failed, so no marker can go there); ``pending_rows`` then counts
        exactly the lost rows."""
        ranges = []
        for sk, p in self._streams.items():
            self._counters.incr("rows_dropped", _msym(sk), sk.stream, p.rows)
            ranges.append(f"{sk.market} {sk.symbol} {sk.stream} {p.first_key}..{p.last_key}")
        self.context.logger.error(
            "postgres sink %s: closing with %d rows not written (%s): %s",
            self.context.name,
            self._pending_rows,
            self._failure_reason or "write error",
            "; ".join(ranges),
        )


#: Records per piece of a COPY (see :meth:`PostgresSink._copy`).
_PIECE = 2000


def _columns(streams: list[StreamKey]) -> tuple[list[str], list[str], list[str], list[str]]:
    """``streams`` as four arrays (exchange, market, symbol, stream) for ``unnest``."""
    return (
        [sk.exchange for sk in streams],
        [sk.market for sk in streams],
        [sk.symbol for sk in streams],
        [sk.stream for sk in streams],
    )


def _msym(sk: StreamKey) -> str:
    """The writer-style counter symbol (``@exchange/market/SYMBOL``)."""
    return f"@{sk.exchange}/{sk.market}/{sk.symbol}"


@hookimpl
def register_sinks(register) -> None:
    """Register the ``postgres`` sink."""
    register("postgres", PostgresSink)
