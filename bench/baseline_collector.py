"""The baseline: the earlier collector's design choices, rebuilt for a side-by-side run.

What it reproduces (``/work/shared/design.md`` §1 and §5):

* a ``websockets`` client whose messages are parsed with stdlib ``json.loads``;
* a ``logging`` call for every update, to a file handler;
* an order book per symbol in a dict (float keys: the earlier design's own choice was
  slower), with a 20-level snapshot per symbol per second;
* rows built as dicts and shipped in batches over a ``multiprocessing`` queue (pickled) to a
  writer process that appends each batch with pandas ``DataFrame.to_csv``, one file per
  symbol and data type, flushing every second.

It writes the same rows as the collector (aggTrades, per-level depth, klines, orderbook),
with ``event_time`` and ``receive_time`` in the same columns of the aggTrades file, so the
latency tailer works on both.

Usage: ``python bench/baseline_collector.py --url ws://... --symbols 100 --out DIR``;
runs until SIGINT/SIGTERM, printing progress lines (see ``_client.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import defaultdict
from typing import Any

from _client import Reporter, run_until_signalled, stream_urls
from websockets.asyncio.client import ClientConnection, connect

FLUSH_INTERVAL = 1.0
BOOK_LEVELS = 20

Batch = dict[tuple[str, str], list[dict[str, Any]]]


def _writer(queue: mp.Queue, out: str) -> None:
    """Writer process: append every batch with pandas, one ``to_csv`` per file."""
    import pandas as pd  # only the writer pays for pandas, as in the earlier design

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: set[str] = set()
    while True:
        batch: Batch | None = queue.get()
        if batch is None:
            return
        for (symbol, kind), rows in batch.items():
            folder = os.path.join(out, symbol)
            path = os.path.join(folder, f"{symbol}-{kind}.csv")
            if path not in seen:
                os.makedirs(folder, exist_ok=True)
            pd.DataFrame(rows).to_csv(path, mode="a", header=path not in seen, index=False)
            seen.add(path)


class _Collector:
    def __init__(self, queue: mp.Queue, log: logging.Logger) -> None:
        self.queue = queue
        self.log = log
        self.rows: Batch = defaultdict(list)
        self.books: dict[str, tuple[dict[float, str], dict[float, str]]] = {}
        self.book_meta: dict[str, tuple[int, int]] = {}

    def on_message(self, raw: str | bytes, receive_time: int) -> int:
        msg = json.loads(raw)
        data = msg["data"]
        kind = data["e"]
        symbol = data["s"]
        self.log.info("%s %s E=%s", kind, symbol, data["E"])
        if kind == "aggTrade":
            self.rows[(symbol, "aggTrades")].append(
                {
                    "agg_trade_id": data["a"],
                    "price": data["p"],
                    "quantity": data["q"],
                    "first_trade_id": data["f"],
                    "last_trade_id": data["l"],
                    "transact_time": data["T"],
                    "is_buyer_maker": data["m"],
                    "is_best_match": data.get("M"),
                    "event_time": data["E"],
                    "receive_time": receive_time,
                }
            )
        elif kind == "depthUpdate":
            bids, asks = self.books.setdefault(symbol, ({}, {}))
            rows = self.rows[(symbol, "depth")]
            for side, levels, book in (("b", data["b"], bids), ("a", data["a"], asks)):
                for price, qty in levels:
                    if float(qty) == 0.0:
                        book.pop(float(price), None)
                    else:
                        book[float(price)] = price + "," + qty
                    rows.append(
                        {
                            "event_time": data["E"],
                            "first_update_id": data["U"],
                            "last_update_id": data["u"],
                            "side": side,
                            "price": price,
                            "quantity": qty,
                            "receive_time": receive_time,
                        }
                    )
            self.book_meta[symbol] = (data["u"], data["E"])
        elif kind == "kline" and data["k"]["x"]:
            # Closed bars only, like the collector's kline stream.
            k = data["k"]
            self.rows[(symbol, "1m")].append(
                {
                    "open_time": k["t"],
                    "open": k["o"],
                    "high": k["h"],
                    "low": k["l"],
                    "close": k["c"],
                    "volume": k["v"],
                    "close_time": k["T"],
                    "quote_volume": k["q"],
                    "count": k["n"],
                    "taker_buy_volume": k["V"],
                    "taker_buy_quote_volume": k["Q"],
                    "event_time": data["E"],
                    "receive_time": receive_time,
                }
            )
        return data["E"]

    def snapshot_books(self, now: int) -> None:
        for symbol, (bids, asks) in self.books.items():
            last_id, event_time = self.book_meta.get(symbol, (0, 0))
            row: dict[str, Any] = {
                "last_update_id": last_id,
                "event_time": event_time,
                "receive_time": now,
            }
            top_bids = sorted(bids, reverse=True)[:BOOK_LEVELS]
            top_asks = sorted(asks)[:BOOK_LEVELS]
            for i, (b, a) in enumerate(zip(top_bids, top_asks, strict=False)):
                row[f"bid_{i}"] = bids[b]
                row[f"ask_{i}"] = asks[a]
            self.rows[(symbol, "orderbook")].append(row)

    def flush(self) -> None:
        if self.rows:
            self.queue.put(dict(self.rows))
            self.rows = defaultdict(list)


async def _receive(url: str, col: _Collector, rep: Reporter, opened: list[ClientConnection]):
    ws = await connect(url, compression=None, max_size=2**22, proxy=None)
    opened.append(ws)
    every = rep.sample_every
    while True:
        raw = await ws.recv()
        now = time.time_ns() // 1_000_000
        event = col.on_message(raw, now)
        rep.count += 1
        if rep.count % every == 0:
            rep.lags.append(now - event)
            rep.maybe_report()


async def _flusher(col: _Collector) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        col.snapshot_books(time.time_ns() // 1_000_000)
        col.flush()


async def run(url: str, n_symbols: int, out: str) -> None:
    """Collect every stream of ``n_symbols`` symbols into ``out`` until SIGINT/SIGTERM."""
    os.makedirs(out, exist_ok=True)
    log = logging.getLogger("baseline")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(os.path.join(out, "collector.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False

    queue: mp.Queue = mp.get_context("spawn").Queue()
    writer = mp.get_context("spawn").Process(target=_writer, args=(queue, out), daemon=True)
    writer.start()
    col = _Collector(queue, log)
    rep = Reporter()
    await run_until_signalled(
        lambda opened: [
            *(_receive(u, col, rep, opened) for u in stream_urls(url, n_symbols)),
            _flusher(col),
        ],
        rep.report,
    )
    col.flush()
    queue.put(None)
    await asyncio.to_thread(writer.join, 30)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="the earlier design, for comparison")
    ap.add_argument("--url", required=True)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    asyncio.run(run(args.url, args.symbols, args.out))


if __name__ == "__main__":
    main()
