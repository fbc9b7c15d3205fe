"""Benchmark of the CSV sink against pandas ``to_csv`` on the same batches.

Run: ``python bench/bench_csv.py [--rows 200000] [--batch 2000] [--runs 5]``

For aggTrade rows and top-20 orderbook rows it times, per batch, what a writer process
does: encode the batch and append it to its file (the sink: ``write`` + ``flush``, one
``write(2)`` per file). The baselines, on the same records, are what the earlier
collector did: build a DataFrame and ``to_csv(mode="a")`` (``pandas frame+to_csv``), and,
more favourable to pandas, ``to_csv`` alone on a frame built outside the timer
(``pandas to_csv``). Every figure is the median of ``--runs`` runs in this process
(``--clock cpu`` times CPU seconds instead of wall seconds, which is steadier on a shared
machine); ratios are against the baselines measured in the same run. pandas is only needed
here and in tests, never by the package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from streamer.core.api import SinkContext
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, Trade
from streamer.plugins.sinks.csv_batch import CsvSink, Options

T0 = 1_795_392_000_000
_clock = time.perf_counter


def make_trades(n: int, seed: int) -> list[Trade]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = T0 + i * 3
        out.append(
            Trade("binance", "spot", "BTCUSDT", 3_000_000_000 + i,
                  f"{rng.randint(90000, 99999)}.{rng.randint(0, 99):02d}000000",
                  f"0.{rng.randint(0, 99999999):08d}", 4_000_000_000 + 2 * i,
                  4_000_000_001 + 2 * i, t, rng.random() < 0.5, True, t + 1, t + 4)
        )  # fmt: skip
    return out


def make_books(n: int, levels: int, seed: int) -> list[BookSnapshot]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        mid = rng.randint(9_000_000, 9_999_999)
        bids = [(f"{(mid - k) / 100:.2f}", f"{rng.random() * 3:.8f}") for k in range(1, levels + 1)]
        asks = [(f"{(mid + k) / 100:.2f}", f"{rng.random() * 3:.8f}") for k in range(levels)]
        out.append(
            BookSnapshot("binance", "spot", "BTCUSDT", 50_000_000_000 + i * 11, T0 + i * 100,
                         T0 + i * 100 + 3, bids, asks)
        )  # fmt: skip
    return out


def batches(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def time_sink(root: Path, chunks: list[list], gz: bool) -> tuple[float, int]:
    """Seconds to write every batch through the sink (write + flush each), and bytes."""
    shutil.rmtree(root, ignore_errors=True)
    counters = Counters()
    ctx = SinkContext(name="bench", counters=counters, logger=logging.getLogger("bench"))
    sink = CsvSink(Options(path=str(root), gzip=gz, fsync="never", gzip_level=1), ctx)

    async def go() -> float:
        await sink.open()
        start = _clock()
        for chunk in chunks:
            await sink.write(chunk)
            await sink.flush()
        elapsed = _clock() - start
        await sink.close()
        return elapsed

    elapsed = asyncio.run(go())
    return elapsed, counters.get("bytes_written")


def trade_frame_rows(chunk: list[Trade]) -> list[tuple]:
    return [
        (r.trade_id, r.price, r.quantity, r.first_trade_id, r.last_trade_id, r.transact_time,
         r.is_buyer_maker, r.is_best_match, r.event_time, r.receive_time)
        for r in chunk
    ]  # fmt: skip


TRADE_COLUMNS = [
    "agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id", "transact_time",
    "is_buyer_maker", "is_best_match", "event_time", "receive_time",
]  # fmt: skip


def book_frame_rows(chunk: list[BookSnapshot], levels: int) -> list[list]:
    rows = []
    for r in chunk:
        row: list = [r.last_update_id, r.event_time, r.receive_time]
        for i in range(levels):
            bp, bq = r.bids[i] if i < len(r.bids) else ("", "")
            ap, aq = r.asks[i] if i < len(r.asks) else ("", "")
            row += [bp, bq, ap, aq]
        rows.append(row)
    return rows


def book_column_names(levels: int) -> list[str]:
    cols = ["last_update_id", "event_time", "receive_time"]
    for i in range(levels):
        cols += [f"bid_price_{i}", f"bid_qty_{i}", f"ask_price_{i}", f"ask_qty_{i}"]
    return cols


def time_pandas(
    path: Path, chunks: list[list], to_rows: Callable[[list], list], columns: list[str]
) -> tuple[float, float]:
    """(frame+to_csv seconds, to_csv-only seconds) appending every batch to one file."""
    import pandas as pd

    path.unlink(missing_ok=True)
    start = _clock()
    for i, chunk in enumerate(chunks):
        frame = pd.DataFrame(to_rows(chunk), columns=columns)
        frame.to_csv(path, mode="a", header=i == 0, index=False)
    with_frame = _clock() - start
    frames = [pd.DataFrame(to_rows(chunk), columns=columns) for chunk in chunks]
    path.unlink()
    start = _clock()
    for i, frame in enumerate(frames):
        frame.to_csv(path, mode="a", header=i == 0, index=False)
    only = _clock() - start
    return with_frame, only


LABELS = (
    ("csv sink", "sink"),
    ("csv sink gzip (level 1)", "gz"),
    ("pandas frame+to_csv", "frame"),
    ("pandas to_csv (prebuilt)", "csv"),
)


def measure(name: str, chunks: list[list], rows: int, runs: int, tmp: Path, to_rows, columns):
    sink_s, gz_s, frame_s, csv_s, size = [], [], [], [], 0
    for _ in range(runs):
        elapsed, size = time_sink(tmp / "sink", chunks, gz=False)
        sink_s.append(elapsed)
        gz_s.append(time_sink(tmp / "sinkgz", chunks, gz=True)[0])
        with_frame, only = time_pandas(tmp / "pandas.csv", chunks, to_rows, columns)
        frame_s.append(with_frame)
        csv_s.append(only)
    med = {k: statistics.median(v) for k, v in
           (("sink", sink_s), ("gz", gz_s), ("frame", frame_s), ("csv", csv_s))}  # fmt: skip
    mb = size / 1e6
    print(f"\n{name}: {rows} rows in batches of {len(chunks[0])}, {mb:.1f} MB, median of {runs}")
    print(f"  {'':26s} {'rows/s':>12s} {'MB/s':>8s} {'ms/batch':>9s}")
    for label, key in LABELS:
        s = med[key]
        print(f"  {label:26s} {rows / s:12,.0f} {mb / s:8.1f} {1000 * s / len(chunks):9.3f}")
    print(f"  ratio sink vs pandas frame+to_csv: {med['frame'] / med['sink']:.1f}x")
    print(f"  ratio sink vs pandas to_csv only : {med['csv'] / med['sink']:.1f}x")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="aggTrade rows per run")
    parser.add_argument("--book-rows", type=int, default=20_000, help="orderbook rows per run")
    parser.add_argument("--batch", type=int, default=2000, help="records per batch")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (steadier when other work shares the machine)",
    )
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}")
    with tempfile.TemporaryDirectory(prefix="bench_csv_") as tmpdir:
        tmp = Path(tmpdir)
        trades = batches(make_trades(args.rows, seed=1), args.batch)
        t = measure("aggTrade", trades, args.rows, args.runs, tmp, trade_frame_rows,
                    TRADE_COLUMNS)  # fmt: skip
        books = batches(make_books(args.book_rows, 20, seed=2), args.batch)
        b = measure("orderbook top-20", books, args.book_rows, args.runs, tmp,
                    lambda c: book_frame_rows(c, 20), book_column_names(20))  # fmt: skip
    print("\nsummary")
    print(f"  aggTrade rows/s: {args.rows / t['sink']:,.0f} (target >= 1,000,000)")
    print(f"  orderbook top-20 vs pandas to_csv: {b['csv'] / b['sink']:.1f}x (target >= 20x), "
          f"vs frame+to_csv: {b['frame'] / b['sink']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
