"""Tables, versioned DDL and row building of the ``postgres`` sink (private to
:mod:`.postgres_sink`). Pure: no I/O here.

One table per stream kind, named ``<table_prefix><kind>`` in the configured schema, with
the record's key as primary key, so ``INSERT ... ON CONFLICT DO NOTHING`` makes every write
idempotent (a restart, a retried flush whose commit was lost, a second collector):

=============  ===============================================================================
table          primary key
=============  ===============================================================================
aggtrade       exchange, market, symbol, agg_trade_id
kline          exchange, market, symbol, interval, open_time (closed bars only)
depth          exchange, market, symbol, last_update_id, pos (one row per changed level)
orderbook      exchange, market, symbol, last_update_id (levels as arrays, best first)
markers        exchange, market, symbol, stream, kind, first_key, last_key, time, reason
heads          exchange, market, symbol, stream: the last key held (what ``holdings`` reads)
migrations     version: the DDL versions applied (see :data:`MIGRATIONS`)
=============  ===============================================================================

Prices and quantities are ``numeric`` built from the exchange's strings (exact, scale
kept: ``0.00100000`` reads back as ``0.00100000``); ids are ``bigint``; times are the
exchange's ``bigint`` milliseconds plus a generated ``ts timestamptz`` for queries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from streamer import BookSnapshot, DepthUpdate, Kline, Marker, Trade

AGGTRADE, KLINE, DEPTH, ORDERBOOK, MARKERS, HEADS, MIGRATIONS_TABLE = (
    "aggtrade",
    "kline",
    "depth",
    "orderbook",
    "markers",
    "heads",
    "migrations",
)
#: Data tables in the order a flush writes them.
KINDS = (AGGTRADE, KLINE, DEPTH, ORDERBOOK, MARKERS)

#: Columns each kind's rows are built with (the generated ``ts`` is left out).
COLUMNS: dict[str, tuple[str, ...]] = {
    AGGTRADE: (
        "exchange", "market", "symbol", "agg_trade_id", "price", "quantity", "first_trade_id",
        "last_trade_id", "transact_time", "is_buyer_maker", "is_best_match", "event_time",
        "receive_time",
    ),
    KLINE: (
        "exchange", "market", "symbol", "interval", "open_time", "close_time", "open", "high",
        "low", "close", "volume", "quote_volume", "count", "taker_buy_volume",
        "taker_buy_quote_volume", "event_time", "receive_time",
    ),
    DEPTH: (
        "exchange", "market", "symbol", "event_time", "transact_time", "first_update_id",
        "last_update_id", "prev_update_id", "pos", "side", "price", "quantity", "receive_time",
    ),
    ORDERBOOK: (
        "exchange", "market", "symbol", "last_update_id", "event_time", "receive_time",
        "bid_prices", "bid_qtys", "ask_prices", "ask_qtys",
    ),
    MARKERS: (
        "exchange", "market", "symbol", "stream", "kind", "first_key", "last_key", "time",
        "reason",
    ),
}  # fmt: skip

#: Price and quantity columns: ``numeric`` (``numeric[]`` in orderbook) in the tables but
#: ``text`` in the staging tables, so the COPY carries the exchange's strings as they are
#: and the server parses them (cheaper than building ``Decimal`` objects client-side).
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    AGGTRADE: ("price", "quantity"),
    KLINE: ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume",
            "taker_buy_quote_volume"),
    DEPTH: ("price", "quantity"),
    ORDERBOOK: ("bid_prices", "bid_qtys", "ask_prices", "ask_qtys"),
    MARKERS: (),
}  # fmt: skip


def stage_ddl(kind: str, stage: str, table: str) -> list[str]:
    """Statements creating the session's staging table of ``kind`` (see NUMERIC_COLUMNS)."""
    text = "text[]" if kind == ORDERBOOK else "text"
    out = [f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS"]
    out += [f"ALTER TABLE {stage} ALTER COLUMN {c} TYPE {text}" for c in NUMERIC_COLUMNS[kind]]
    return out


def insert_sql(kind: str, stage: str, table: str) -> str:
    """``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` from the staging table."""
    cast = "::numeric[]" if kind == ORDERBOOK else "::numeric"
    numeric = NUMERIC_COLUMNS[kind]
    names = ", ".join(COLUMNS[kind])
    values = ", ".join(c + cast if c in numeric else c for c in COLUMNS[kind])
    return f"INSERT INTO {table} ({names}) SELECT {values} FROM {stage} ON CONFLICT DO NOTHING"


#: Milliseconds (or microseconds, spot's ``timeUnit=MICROSECOND``) to ``timestamptz``.
_TS = (
    "timestamptz GENERATED ALWAYS AS (to_timestamp(CASE WHEN {c} >= 100000000000000 "
    "THEN {c} / 1000000.0 ELSE {c} / 1000.0 END)) STORED"
)


def _v1(t: dict[str, str]) -> list[str]:
    """Version 1: every table of this sink."""
    return [
        f"""CREATE TABLE {t[AGGTRADE]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            agg_trade_id bigint NOT NULL, price numeric NOT NULL, quantity numeric NOT NULL,
            first_trade_id bigint NOT NULL, last_trade_id bigint NOT NULL,
            transact_time bigint NOT NULL, is_buyer_maker boolean NOT NULL,
            is_best_match boolean, event_time bigint NOT NULL, receive_time bigint NOT NULL,
            ts {_TS.format(c="transact_time")},
            PRIMARY KEY (exchange, market, symbol, agg_trade_id))""",
        f"""CREATE TABLE {t[KLINE]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            interval text NOT NULL, open_time bigint NOT NULL, close_time bigint NOT NULL,
            open numeric NOT NULL, high numeric NOT NULL, low numeric NOT NULL,
            close numeric NOT NULL, volume numeric NOT NULL, quote_volume numeric NOT NULL,
            count bigint NOT NULL, taker_buy_volume numeric NOT NULL,
            taker_buy_quote_volume numeric NOT NULL, event_time bigint NOT NULL,
            receive_time bigint NOT NULL, ts {_TS.format(c="open_time")},
            PRIMARY KEY (exchange, market, symbol, interval, open_time))""",
        f"""CREATE TABLE {t[DEPTH]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            event_time bigint NOT NULL, transact_time bigint, first_update_id bigint NOT NULL,
            last_update_id bigint NOT NULL, prev_update_id bigint, pos integer NOT NULL,
            side char(1), price numeric, quantity numeric, receive_time bigint NOT NULL,
            ts {_TS.format(c="event_time")},
            PRIMARY KEY (exchange, market, symbol, last_update_id, pos))""",
        f"""CREATE TABLE {t[ORDERBOOK]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            last_update_id bigint NOT NULL, event_time bigint NOT NULL,
            receive_time bigint NOT NULL, bid_prices numeric[] NOT NULL,
            bid_qtys numeric[] NOT NULL, ask_prices numeric[] NOT NULL,
            ask_qtys numeric[] NOT NULL,
            ts {_TS.format(c="CASE WHEN event_time > 0 THEN event_time ELSE receive_time END")},
            PRIMARY KEY (exchange, market, symbol, last_update_id))""",
        f"""CREATE TABLE {t[MARKERS]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            stream text NOT NULL, kind text NOT NULL, first_key bigint NOT NULL,
            last_key bigint NOT NULL, time bigint NOT NULL, reason text NOT NULL,
            ts {_TS.format(c="time")},
            PRIMARY KEY (exchange, market, symbol, stream, kind, first_key, last_key, time,
                         reason))""",
        f"""CREATE TABLE {t[HEADS]} (
            exchange text NOT NULL, market text NOT NULL, symbol text NOT NULL,
            stream text NOT NULL, last_key bigint NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (exchange, market, symbol, stream))""",
        # Rows arrive in time order: block-range indexes serve time ranges at a fraction
        # of a b-tree's cost per insert (the primary keys serve the per-symbol lookups).
        f"CREATE INDEX ON {t[AGGTRADE]} USING brin (transact_time)",
        f"CREATE INDEX ON {t[DEPTH]} USING brin (event_time)",
        f"CREATE INDEX ON {t[ORDERBOOK]} USING brin (event_time)",
    ]


#: Versioned DDL: ``(version, description, statements(table names))``. Append only: a
#: released version never changes; a new layout is a new version (never a silent drop).
MIGRATIONS = [(1, "aggtrade, kline, depth, orderbook, markers and heads tables", _v1)]
LATEST = MIGRATIONS[-1][0]

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def check_identifier(what: str, value: str, *, empty: bool = False) -> None:
    """Refuse a schema or prefix that would need quoting (lower case, digits, ``_``)."""
    if empty and value == "":
        return
    if not _IDENT.fullmatch(value):
        raise ValueError(
            f"{what} {value!r}: use 1-40 characters of a-z 0-9 _ starting with a letter or _"
        )


def table_names(schema: str, prefix: str) -> dict[str, str]:
    """Qualified name of every table (identifiers checked by :func:`check_identifier`)."""
    kinds = (*KINDS, HEADS, MIGRATIONS_TABLE)
    return {k: f'"{schema}"."{prefix}{k}"' for k in kinds}


def stage_name(prefix: str, kind: str) -> str:
    """The session's temporary staging table of ``kind``."""
    return f"{prefix}stage_{kind}"


# --- rows: tuples in COLUMNS order, exchange strings passed through as they are ---------


def trade_rows(records: Sequence[Trade]) -> list[tuple]:
    return [
        (r.exchange, r.market, r.symbol, r.trade_id, r.price, r.quantity, r.first_trade_id,
         r.last_trade_id, r.transact_time, r.is_buyer_maker, r.is_best_match, r.event_time,
         r.receive_time)
        for r in records
    ]  # fmt: skip


def kline_rows(records: Sequence[Kline]) -> list[tuple]:
    return [
        (r.exchange, r.market, r.symbol, r.interval, r.open_time, r.close_time, r.open, r.high,
         r.low, r.close, r.volume, r.quote_volume, r.count, r.taker_buy_volume,
         r.taker_buy_quote_volume, r.event_time, r.receive_time)
        for r in records
    ]  # fmt: skip


def depth_row_count(r: DepthUpdate) -> int:
    """Rows a depth event becomes: one per level, or one empty row for an empty event (so
    the chain of update ids stays complete, as in the CSV files)."""
    return len(r.bids) + len(r.asks) or 1


def depth_rows(records: Sequence[DepthUpdate]) -> list[tuple]:
    """One row per changed level, bids (``b``) then asks (``a``), ``pos`` counting from 0."""
    out: list[tuple] = []
    add = out.append
    for r in records:
        head = (r.exchange, r.market, r.symbol, r.event_time, r.transact_time,
                r.first_update_id, r.last_update_id, r.prev_update_id)  # fmt: skip
        rt = r.receive_time
        pos = 0
        for p, q in r.bids:
            add((*head, pos, "b", p, q, rt))
            pos += 1
        for p, q in r.asks:
            add((*head, pos, "a", p, q, rt))
            pos += 1
        if not pos:
            add((*head, 0, None, None, None, rt))
    return out


def book_rows(records: Sequence[BookSnapshot]) -> list[tuple]:
    return [
        (r.exchange, r.market, r.symbol, r.last_update_id, r.event_time, r.receive_time,
         [p for p, _ in r.bids], [q for _, q in r.bids], [p for p, _ in r.asks],
         [q for _, q in r.asks])
        for r in records
    ]  # fmt: skip


def marker_rows(records: Sequence[Marker], now_ms: int) -> list[tuple]:
    return [
        (r.exchange, r.market, r.symbol, r.stream, r.kind, r.first_key, r.last_key,
         r.time or now_ms, r.reason)
        for r in records
    ]  # fmt: skip


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]*)?|-?\.[0-9]+")


def bad_numbers(kind: str, row: tuple) -> bool:
    """True when a price/quantity of ``row`` is no decimal number (``numeric`` refuses it)."""
    if kind == AGGTRADE:
        values = row[4:6]
    elif kind == KLINE:
        values = (*row[6:12], row[13], row[14])
    elif kind == DEPTH:
        values = () if row[10] is None else row[10:12]
    elif kind == ORDERBOOK:
        values = [*row[6], *row[7], *row[8], *row[9]]
    else:
        return False
    return any(not isinstance(v, str) or _NUMBER.fullmatch(v) is None for v in values)
