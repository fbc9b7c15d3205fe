"""Benchmark of the parquet sink next to the CSV sink on the same records.

Run: ``python bench/bench_parquet.py [--rows 200000] [--batch 2000] [--runs 3]``

1. Rows/s of what a writer process does with each batch (``write`` + ``flush``) and at the
   end (``close``: the parquet sink compacts its segment into the Parquet file), for
   aggTrade rows, depth rows (one per level change) and top-20 orderbook rows; CSV plain and
   Parquet (decimal, and ``price_type: float``) in the same process, medians of ``--runs``.
2. Bytes per row on disk: Parquet (zstd), CSV and CSV gzip.
3. DuckDB: the query time (median of 5) of a one-day VWAP per minute over one symbol's
   day of aggTrades (``--day-rows`` trades), reading the CSV, the CSV gzip and the
   Parquet file.

Needs pyarrow and duckdb (``pip install -e '.[parquet-test]'``).
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
from pathlib import Path

import duckdb
from bench_csv import make_books, make_trades

from streamer.core.api import SinkContext
from streamer.core.counters import Counters
from streamer.core.records import DepthUpdate
from streamer.plugins.sinks import csv_batch, parquet_sink

T0 = 1_795_392_000_000


def make_depth(n_rows: int, seed: int) -> list[DepthUpdate]:
    """Diff-depth events of 1-15 changed levels each, ``n_rows`` levels in all."""
    rng = random.Random(seed)
    out, rows, uid = [], 0, 60_000_000_000
    while rows < n_rows:
        k = rng.randint(1, 15)
        mid = rng.randint(9_000_000, 9_999_999)
        levels = [(f"{(mid + rng.randint(-500, 500)) / 100:.2f}000000",
                   rng.choice(["0.00000000", f"{rng.random() * 3:.8f}"]))
                  for _ in range(k)]  # fmt: skip
        nb = rng.randint(0, k)
        first, uid = uid + 1, uid + rng.randint(1, 30)
        t = T0 + len(out) * 100
        out.append(DepthUpdate("binance", "spot", "BTCUSDT", t, None, first, uid, None,
                               levels[:nb], levels[nb:], t + 3))  # fmt: skip
        rows += k
    return out


def make_sink(kind: str, root: Path):
    ctx = SinkContext(name=kind, counters=Counters(), logger=logging.getLogger("bench"))
    if kind.startswith("csv"):
        opts = csv_batch.Options(path=str(root), gzip=kind == "csv-gzip", flush_rows=10**6)
        return csv_batch.CsvSink(opts, ctx)
    price_type = "float" if kind == "parquet-float" else "decimal"
    opts = parquet_sink.Options(path=str(root), price_type=price_type, flush_rows=10**6)
    return parquet_sink.ParquetSink(opts, ctx)


def time_sink(kind: str, root: Path, chunks: list[list]) -> tuple[float, int]:
    """Seconds to write every chunk (write + flush) and close; bytes on disk."""
    shutil.rmtree(root, ignore_errors=True)
    sink = make_sink(kind, root)

    async def go() -> float:
        await sink.open()
        start = time.perf_counter()
        for chunk in chunks:
            await sink.write(chunk)
            await sink.flush()
        await sink.close()
        return time.perf_counter() - start

    seconds = asyncio.run(go())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name[0] != ".")
    return seconds, size


KINDS = ("csv", "csv-gzip", "parquet", "parquet-float")


def throughput(rows: int, batch: int, runs: int, tmp: Path) -> dict:
    books = make_books(rows, 20, 3)
    book_rows = rows
    data = {
        "aggTrade": (make_trades(rows, 1), rows),
        "depth": (make_depth(rows, 2), None),
        "orderbook top-20": (books, book_rows),
    }
    out = {}
    for name, (records, n) in data.items():
        if n is None:
            n = sum(len(r.bids) + len(r.asks) or 1 for r in records)
        size = batch if name != "orderbook top-20" else max(1, batch // 20)
        chunks = [records[i : i + size] for i in range(0, len(records), size)]
        results = {}
        for kind in KINDS:
            time_sink(kind, tmp / kind, chunks[:2])  # warm-up: imports, first-use set-up
            times, sizes = [], []
            for _ in range(runs):
                s, b = time_sink(kind, tmp / kind, chunks)
                times.append(s)
                sizes.append(b)
            results[kind] = (n / statistics.median(times), sizes[-1] / n)
        out[name] = results
    return out


def vwap_times(day_rows: int, tmp: Path) -> dict[str, float]:
    """A day of one symbol's trades in each format, then DuckDB's VWAP per minute."""
    step = 86_400_000 // day_rows
    trades = make_trades(day_rows, 7)
    trades = [t.__class__(*[getattr(t, f) for f in t.__struct_fields__[:8]],
                          T0 + i * step, *[getattr(t, f) for f in t.__struct_fields__[9:]])
              for i, t in enumerate(trades)]  # fmt: skip
    paths = {}
    for kind in ("csv", "csv-gzip", "parquet"):
        root = tmp / f"day-{kind}"
        time_sink(kind, root, [trades[i : i + 20_000] for i in range(0, day_rows, 20_000)])
        pattern = "*.parquet" if kind == "parquet" else "*.csv*"
        (paths[kind],) = [p for p in root.rglob(pattern) if "aggTrades" in str(p) or
                          kind == "parquet"]  # fmt: skip
    out = {}
    for kind, path in paths.items():
        if kind == "parquet":
            source = f"read_parquet('{path}')"
        else:
            source = (f"read_csv('{path}', header=true, "
                      "types={'price': 'DECIMAL(38,8)', 'quantity': 'DECIMAL(38,8)'})")  # fmt: skip
        query = (f"SELECT transact_time // 60000 AS minute, "
                 f"sum(price * quantity) / sum(quantity) AS vwap FROM {source} "
                 "GROUP BY minute ORDER BY minute")  # fmt: skip
        con = duckdb.connect()
        con.execute("SET threads TO 1")
        times = []
        for _ in range(5):
            start = time.perf_counter()
            result = con.execute(query).fetchall()
            times.append(time.perf_counter() - start)
        assert 1400 <= len(result) <= 1441, len(result)
        out[kind] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument(
        "--batch", type=int, default=2000, help="records per write+flush (order books: batch // 20)"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--day-rows", type=int, default=1_000_000, help="aggTrades in the VWAP day")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-parquet-"))
    try:
        res = throughput(args.rows, args.batch, args.runs, tmp)
        print(f"rows/s (write+flush per batch of {args.batch} records, then close), "
              f"bytes/row on disk; medians of {args.runs}")  # fmt: skip
        print(f"{'rows':18} " + " ".join(f"{k:>22}" for k in KINDS))
        for name, results in res.items():
            cells = [f"{r:>10,.0f} r/s {b:>6.1f} B" for r, b in results.values()]
            print(f"{name:18} " + " ".join(f"{c:>22}" for c in cells))
        for name, results in res.items():
            ratio = results["parquet"][0] / results["csv"][0]
            print(f"{name}: parquet/csv rows/s {ratio:.2f}x")
        vw = vwap_times(args.day_rows, tmp)
        print(f"DuckDB VWAP per minute over one day ({args.day_rows:,} aggTrades), 1 thread:")
        for kind, s in vw.items():
            print(f"  {kind:10} {s * 1000:8.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
