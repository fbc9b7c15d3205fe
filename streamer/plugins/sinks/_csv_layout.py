"""Paths, columns and row encoding of the CSV sink (private to :mod:`.csv_batch`).

What every file sink shares (record kinds, column names, periods, path components, grouping
by file) is in :mod:`._sink_layout` and re-exported here. Everything here is pure: no file
I/O. Rows are built by joining the exchange's exact strings; prices and quantities never
pass through ``float``. The row encoders are the hot path, so they are list comprehensions
over f-strings specialised per record type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence

import msgspec

from streamer import BookSnapshot, DepthUpdate, Kline, Marker, Trade

# The shared vocabulary, re-exported: the csv modules use it as ``layout.*``.
from ._sink_layout import (  # noqa: F401
    AGGTRADE,
    AGGTRADE_COLUMNS,
    BOOK_PREFIX_COLUMNS,
    DEPTH,
    DEPTH_COLUMNS,
    KEY_COLUMN,
    KLINE,
    KLINE_COLUMNS,
    MARKER_COLUMNS,
    MARKERS,
    ORDERBOOK,
    FileTarget,
    InvalidComponent,
    PeriodNamer,
    aggtrade_columns,
    check_component,
    depth_rows,
    files_in,
    folders_in,
    group_by_file,
    group_records,
    ms_time,
    stream_name,
)

#: Spelling of booleans in every file (the data.binance.vision futures spelling).
TRUE, FALSE = "true", "false"
_BOOL = (FALSE, TRUE)

DATASET_DIR = {
    AGGTRADE: "aggTrades",
    DEPTH: "depth",
    KLINE: "klines",
    ORDERBOOK: "orderbook",
    MARKERS: "markers",
}
DIR_KIND = {folder: kind for kind, folder in DATASET_DIR.items()}


def book_columns(levels: int) -> tuple[str, ...]:
    """orderbook columns for ``levels`` levels per side, best (index 0) first."""
    cols = list(BOOK_PREFIX_COLUMNS)
    for i in range(levels):
        cols += (f"bid_price_{i}", f"bid_qty_{i}", f"ask_price_{i}", f"ask_qty_{i}")
    return tuple(cols)


def header_line(columns: Sequence[str]) -> bytes:
    """The header row of a file with ``columns``."""
    return (",".join(columns) + "\n").encode()


def book_levels_of_header(header: bytes) -> int | None:
    """Levels per side declared by an orderbook header, or ``None`` if it is not one."""
    cols = header.rstrip(b"\r\n").decode("utf-8", "replace").split(",")
    levels, rest = divmod(len(cols) - len(BOOK_PREFIX_COLUMNS), 4)
    if rest or levels < 0 or tuple(cols) != book_columns(levels):
        return None
    return levels


def expected_header(kind: str, market: str, header: bytes | None) -> bool:
    """True when ``header`` is what this sink writes for ``kind`` in ``market``."""
    if header is None:
        return False
    if kind == ORDERBOOK:
        return book_levels_of_header(header) is not None
    columns = {
        AGGTRADE: aggtrade_columns(market),
        KLINE: KLINE_COLUMNS,
        DEPTH: DEPTH_COLUMNS,
        MARKERS: MARKER_COLUMNS,
    }[kind]
    return header == header_line(columns)


def file_name(kind: str, symbol: str, interval: str, label: str, gz: bool) -> str:
    """``BTCUSDT-aggTrades-2026-11-23.csv``, ``BTCUSDT-1m-2026-11-23.csv``..."""
    tag = interval if kind == KLINE else DATASET_DIR[kind]
    return f"{symbol}-{tag}-{label}.csv{'.gz' if gz else ''}"


def folder_parts(kind: str, exchange: str, market: str, symbol: str, interval: str) -> list[str]:
    """Folder of a stream relative to the sink's root, as path components."""
    parts = [exchange, market, DATASET_DIR[kind], symbol]
    if kind == KLINE:
        parts.append(interval)
    return parts


_PERIOD_LABEL = re.compile(r"-(\d{4}-\d{2}-\d{2})(?:-(\d{2}))?\.csv(?:\.gz)?$")


def period_sort_key(name: str) -> tuple[str, int] | None:
    """Sort key of a file name by its period (newest last), ``None`` for foreign files.

    A daily file sorts after the hourly files of the same day, since it may hold any hour.
    """
    match = _PERIOD_LABEL.search(name)
    if match is None:
        return None
    hour = match.group(2)
    return (match.group(1), 24 if hour is None else int(hour))


# --- row encoders: each returns one str of whole rows, every row ending in "\n" ---------


def trade_rows(records: Sequence[Trade], spot: bool) -> list[str]:
    """aggTrades rows, one str per record (``is_best_match`` column only when ``spot``)."""
    b = _BOOL
    if spot:
        return [
            f"{r.trade_id},{r.price},{r.quantity},{r.first_trade_id},{r.last_trade_id},"
            f"{r.transact_time},{b[r.is_buyer_maker]},"
            f"{'' if r.is_best_match is None else b[r.is_best_match]},"
            f"{r.event_time},{r.receive_time}\n"
            for r in records
        ]
    return [
        f"{r.trade_id},{r.price},{r.quantity},{r.first_trade_id},{r.last_trade_id},"
        f"{r.transact_time},{b[r.is_buyer_maker]},{r.event_time},{r.receive_time}\n"
        for r in records
    ]


def encode_trades(records: Sequence[Trade], spot: bool) -> str:
    """aggTrades rows (``is_best_match`` column only when ``spot``)."""
    return "".join(trade_rows(records, spot))


def kline_rows(records: Sequence[Kline]) -> list[str]:
    """klines rows, one str per record (see :func:`encode_klines`)."""
    return [
        f"{r.open_time},{r.open},{r.high},{r.low},{r.close},{r.volume},{r.close_time},"
        f"{r.quote_volume},{r.count},{r.taker_buy_volume},{r.taker_buy_quote_volume},"
        f"{r.event_time},{r.receive_time}\n"
        for r in records
    ]


def encode_klines(records: Sequence[Kline]) -> str:
    """klines rows in data.binance.vision order, then ``event_time, receive_time``."""
    return "".join(kline_rows(records))


def encode_depth(records: Sequence[DepthUpdate]) -> str:
    """depth rows: one per changed level, bids (``b``) before asks (``a``).

    An event without levels still gets one row with empty side/price/quantity so that the
    chain of update ids stays complete in the file.
    """
    out: list[str] = []
    add = out.append
    for r in records:
        tt = "" if r.transact_time is None else r.transact_time
        pu = "" if r.prev_update_id is None else r.prev_update_id
        head = f"{r.event_time},{tt},{r.first_update_id},{r.last_update_id},{pu},"
        tail = f",{r.receive_time}\n"
        if not r.bids and not r.asks:
            add(f"{head},,{tail}")
            continue
        for p, q in r.bids:
            add(f"{head}b,{p},{q}{tail}")
        for p, q in r.asks:
            add(f"{head}a,{p},{q}{tail}")
    return "".join(out)


def depth_parts(records: Sequence[DepthUpdate]) -> list[str]:
    """The rows of :func:`encode_depth`, joined per record (one str per record)."""
    out: list[str] = []
    add = out.append
    for r in records:
        tt = "" if r.transact_time is None else r.transact_time
        pu = "" if r.prev_update_id is None else r.prev_update_id
        head = f"{r.event_time},{tt},{r.first_update_id},{r.last_update_id},{pu},"
        tail = f",{r.receive_time}\n"
        if r.bids or r.asks:
            rows = [f"{head}b,{p},{q}{tail}" for p, q in r.bids]
            rows += [f"{head}a,{p},{q}{tail}" for p, q in r.asks]
            add("".join(rows))
        else:
            add(f"{head},,{tail}")
    return out


def encode_books(records: Sequence[BookSnapshot], levels: int) -> tuple[str, int]:
    """orderbook rows with ``levels`` levels per side; returns ``(rows, levels truncated)``.

    Thinner sides leave empty cells; deeper books are cut to ``levels`` (and counted).
    """
    pad = ("", "")
    out: list[str] = []
    truncated = 0
    for r in records:
        bids, asks = r.bids, r.asks
        nb, na = len(bids), len(asks)
        if nb != levels:
            if nb > levels:
                truncated += nb - levels
                bids = bids[:levels]
            else:
                bids = [*bids, *([pad] * (levels - nb))]
        if na != levels:
            if na > levels:
                truncated += na - levels
                asks = asks[:levels]
            else:
                asks = [*asks, *([pad] * (levels - na))]
        pairs = zip(bids, asks, strict=True)
        cells = ",".join([f"{bp},{bq},{ap},{aq}" for (bp, bq), (ap, aq) in pairs])
        sep = "," if levels else ""
        out.append(f"{r.last_update_id},{r.event_time},{r.receive_time}{sep}{cells}\n")
    return "".join(out), truncated


def quote(value: str) -> str:
    """RFC 4180 quoting of one cell, only when it needs it."""
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def encode_markers(records: Sequence[Marker]) -> str:
    """markers rows; ``reason`` (free text) is quoted when it holds a comma or quote."""
    return "".join(
        [
            f"{r.time},{quote(r.stream)},{quote(r.kind)},{r.first_key},{r.last_key},"
            f"{quote(r.reason)}\n"
            for r in records
        ]
    )


def quote_record(record: Trade | Kline | DepthUpdate | BookSnapshot) -> object:
    """A copy of ``record`` with every exchange string quoted as CSV needs.

    Slow path, used only when a group's rows did not come out with the expected number of
    separators (an exchange string holding a comma, quote or newline).
    """
    if isinstance(record, Trade):
        return msgspec.structs.replace(
            record, price=quote(record.price), quantity=quote(record.quantity)
        )
    if isinstance(record, Kline):
        return msgspec.structs.replace(
            record, **{f: quote(getattr(record, f)) for f in _KLINE_STRINGS}
        )
    bids = [(quote(p), quote(q)) for p, q in record.bids]
    asks = [(quote(p), quote(q)) for p, q in record.asks]
    return msgspec.structs.replace(record, bids=bids, asks=asks)


_KLINE_STRINGS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)


def stream_folders(
    root: str, subdirs: Callable[[str], list[str]]
) -> Iterator[tuple[str, str, str, str, str, str]]:
    """``(kind, exchange, market, symbol, interval, folder)`` of every stream folder of the
    tree at ``root`` (``interval`` is empty but for klines), in sorted order. ``subdirs``
    lists a folder's sub-folders: the sink skips what it cannot read, verify reports it."""
    for exchange in subdirs(root):
        for market in subdirs(os.path.join(root, exchange)):
            base = os.path.join(root, exchange, market)
            for dataset in subdirs(base):
                kind = DIR_KIND.get(dataset)
                if kind is None:
                    continue
                for symbol in subdirs(os.path.join(base, dataset)):
                    folder = os.path.join(base, dataset, symbol)
                    if kind == KLINE:
                        for interval in subdirs(folder):
                            yield (
                                kind,
                                exchange,
                                market,
                                symbol,
                                interval,
                                os.path.join(folder, interval),
                            )
                    else:
                        yield kind, exchange, market, symbol, "", folder
