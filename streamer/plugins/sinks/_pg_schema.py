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
#: The tables of keyed streams (a ``heads`` row each); markers are not keyed.
DATA = (AGGTRADE, KLINE, DEPTH, ORDERBOOK)
#: The record attribute holding the stream's key, per data table.
KEY_ATTR = {AGGTRADE: "trade_id", KLINE: "open_time", DEPTH: "last_update_id",
            ORDERBOOK: "last_update_id"}  # fmt: skip

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


def stage_ddl(kind: str, stage: str, table: str) -> str:
    """The session's staging table of ``kind``: rows at or below a stream's head (a late
    fill of a hole, an overlap with another collector) go through it and ``INSERT ... ON
    CONFLICT DO NOTHING``; see :mod:`.postgres_sink`."""
    return f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS"


def insert_sql(kind: str, stage: str, table: str) -> str:
    """``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` from the staging table."""
    names = ", ".join(COLUMNS[kind])
    return f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} ON CONFLICT DO NOTHING"


#: Milliseconds (or microseconds, spot's ``timeUnit=MICROSECOND``) to ``timestamptz``.
#: ``float8`` arithmetic: the same value as a ``numeric`` division (``to_timestamp`` takes
#: a ``float8`` either way) at a fraction of the server's CPU per row.
_TS = (
    "timestamptz GENERATED ALWAYS AS (to_timestamp({c}::float8 / CASE WHEN "
    "{c} >= 100000000000000 THEN 1000000 ELSE 1000 END)) STORED"
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


# --- rows: COPY text format, exchange strings passed through as they are -------------------
#
# One line per row, fields in COLUMNS order separated by tabs, ``\\N`` for null. The
# exchange's strings go in unchanged (the server parses the numbers: exact, scale kept);
# :func:`copy_text` checks that no string carried a tab, newline, carriage return or
# backslash and otherwise rebuilds the lines with every string escaped. Order book levels
# become array literals, so the sink refuses books whose prices or quantities are not
# plain numbers before they get here (a ``,`` would split a level silently).

_B = {True: "t", False: "f", None: "\\N"}


def _n(v: object) -> object:
    return "\\N" if v is None else v


def trade_text(records: Sequence[Trade]) -> list[str]:
    b = _B
    return [
        f"{r.exchange}\t{r.market}\t{r.symbol}\t{r.trade_id}\t{r.price}\t{r.quantity}\t"
        f"{r.first_trade_id}\t{r.last_trade_id}\t{r.transact_time}\t{b[r.is_buyer_maker]}\t"
        f"{b[r.is_best_match]}\t{r.event_time}\t{r.receive_time}\n"
        for r in records
    ]


def kline_text(records: Sequence[Kline]) -> list[str]:
    return [
        f"{r.exchange}\t{r.market}\t{r.symbol}\t{r.interval}\t{r.open_time}\t{r.close_time}\t"
        f"{r.open}\t{r.high}\t{r.low}\t{r.close}\t{r.volume}\t{r.quote_volume}\t{r.count}\t"
        f"{r.taker_buy_volume}\t{r.taker_buy_quote_volume}\t{r.event_time}\t{r.receive_time}\n"
        for r in records
    ]


def depth_row_count(r: DepthUpdate) -> int:
    """Rows a depth event becomes: one per level, or one empty row for an empty event (so
    the chain of update ids stays complete, as in the CSV files)."""
    return len(r.bids) + len(r.asks) or 1


def depth_text(records: Sequence[DepthUpdate]) -> list[str]:
    """One row per changed level, bids (``b``) then asks (``a``), ``pos`` counting from 0."""
    out: list[str] = []
    add = out.append
    for r in records:
        head = (
            f"{r.exchange}\t{r.market}\t{r.symbol}\t{r.event_time}\t{_n(r.transact_time)}\t"
            f"{r.first_update_id}\t{r.last_update_id}\t{_n(r.prev_update_id)}\t"
        )
        tail = f"\t{r.receive_time}\n"
        pos = 0
        for p, q in r.bids:
            add(f"{head}{pos}\tb\t{p}\t{q}{tail}")
            pos += 1
        for p, q in r.asks:
            add(f"{head}{pos}\ta\t{p}\t{q}{tail}")
            pos += 1
        if not pos:
            add(f"{head}0\t\\N\t\\N\t\\N{tail}")
    return out


def book_text(records: Sequence[BookSnapshot]) -> list[str]:
    """Levels as ``numeric[]`` literals, best first."""
    return [
        f"{r.exchange}\t{r.market}\t{r.symbol}\t{r.last_update_id}\t{r.event_time}\t"
        f"{r.receive_time}\t{{{','.join([p for p, _ in r.bids])}}}\t"
        f"{{{','.join([q for _, q in r.bids])}}}\t{{{','.join([p for p, _ in r.asks])}}}\t"
        f"{{{','.join([q for _, q in r.asks])}}}\n"
        for r in records
    ]


def marker_text(records: Sequence[Marker], now_ms: int) -> list[str]:
    return [
        f"{r.exchange}\t{r.market}\t{r.symbol}\t{r.stream}\t{r.kind}\t{r.first_key}\t"
        f"{r.last_key}\t{r.time or now_ms}\t{r.reason}\n"
        for r in records
    ]


#: Row builder per kind (markers take the time to stamp undated ones with, see above).
TEXT = {AGGTRADE: trade_text, KLINE: kline_text, DEPTH: depth_text, ORDERBOOK: book_text}

_SPECIAL = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _escaped(value: object) -> object:
    return value.translate(_SPECIAL) if isinstance(value, str) else value


def _nulls(kind: str, records: Sequence) -> int:
    """How many ``\\N`` (null) fields the lines of ``records`` hold."""
    if kind == AGGTRADE:
        return sum([r.is_best_match is None for r in records])
    if kind == DEPTH:
        return sum([(r.transact_time is None) + (r.prev_update_id is None)
                    + (0 if r.bids or r.asks else 3) for r in records])  # fmt: skip
    return 0


def copy_text(kind: str, lines: list[str], records: Sequence, now_ms: int = 0) -> bytes:
    """``lines`` (built by :data:`TEXT` from ``records``) as one COPY buffer; rebuilt from
    escaped copies of ``records`` when an exchange string held a special character (a
    backslash beyond the nulls' own, a tab, a newline or a carriage return)."""
    data = "".join(lines)
    fields = len(COLUMNS[kind])
    if (
        data.count("\\") == _nulls(kind, records)
        and "\r" not in data
        and data.count("\n") == len(lines)
        and data.count("\t") == len(lines) * (fields - 1)
    ):
        return data.encode()
    return "".join(_rebuild(kind, records, now_ms)).encode()


def _rebuild(kind: str, records: Sequence, now_ms: int) -> list[str]:
    """The lines of ``records`` with every string field escaped for COPY's text format."""
    out = []
    for r in records:
        fields = {f: _escaped(getattr(r, f)) for f in r.__struct_fields__}
        if "bids" in fields:
            fields["bids"] = [tuple(_escaped(x) for x in lv) for lv in r.bids]
            fields["asks"] = [tuple(_escaped(x) for x in lv) for lv in r.asks]
        clean = type(r)(**fields)
        out += marker_text([clean], now_ms) if kind == MARKERS else TEXT[kind]([clean])
    return out


def row_count(kind: str, r: object) -> int:
    """Rows one record becomes in the table of ``kind``."""
    return depth_row_count(r) if kind == DEPTH else 1


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]*)?|-?\.[0-9]+")


def bad_numbers(kind: str, r: object) -> bool:
    """True when a price/quantity of record ``r`` is no decimal number (``numeric``
    refuses it; ``NaN`` and other words are refused here too)."""
    if kind == AGGTRADE:
        values = (r.price, r.quantity)
    elif kind == KLINE:
        values = (r.open, r.high, r.low, r.close, r.volume, r.quote_volume,
                  r.taker_buy_volume, r.taker_buy_quote_volume)  # fmt: skip
    elif kind in (DEPTH, ORDERBOOK):
        values = [x for lv in (*r.bids, *r.asks) for x in lv]
    else:
        return False
    return any(not isinstance(v, str) or _NUMBER.fullmatch(v) is None for v in values)
