"""Write a synthetic csv tree of N symbols x 1 day for timing ``streamer report``.

    python bench/report_tree.py /tmp/tree --symbols 2000
    /usr/bin/time -v streamer report /tmp/tree -o /tmp/r.html --json /tmp/r.json

Per symbol, one UTC day (2026-01-01) of spot data in the csv sink's layout: an aggTrade
every 20 s, a depth event of two rows every 30 s, every 1m kline, a 5-level book every
2 minutes (12,160 rows). Every 100th symbol loses an hour of aggTrades (an ``unfillable``
marker says so) and every 50th a depth event without a marker, so the report has gaps to
show. Real full-market output is far denser; the report's memory depends on the number of
streams and days, its time on the number of rows (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import calendar
import os

T0 = calendar.timegm((2026, 1, 1, 0, 0, 0)) * 1000
DAY = "2026-01-01"
AGG = ("agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
       "is_buyer_maker,is_best_match,event_time,receive_time\n")  # fmt: skip
DEPTH = ("event_time,transact_time,first_update_id,last_update_id,prev_update_id,side,price,"
         "quantity,receive_time\n")  # fmt: skip
KLINE = ("open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
         "taker_buy_quote_volume,event_time,receive_time\n")  # fmt: skip
BOOK = (
    "last_update_id,event_time,receive_time,"
    + ",".join(f"bid_price_{i},bid_qty_{i},ask_price_{i},ask_qty_{i}" for i in range(5))
    + "\n"
)
MARKERS = "time,stream,kind,first_key,last_key,reason\n"


def _file(root: str, parts: list[str], name: str, header: str, rows: list[str]) -> int:
    folder = os.path.join(root, *parts)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.write(header)
        f.writelines(rows)
    return len(rows)


def write_symbol(root: str, n: int) -> int:
    sym = f"S{n:04d}USDT"
    base = ["binance", "spot"]
    lost = range(1000, 1180) if n % 100 == 7 else range(0)  # one hour of ids
    agg = [
        f"{i},100.{i % 97:02d},0.{i % 13 + 1},{i * 3},{i * 3 + 2},{T0 + i * 20_000},"
        f"{'true' if i % 2 else 'false'},true,{T0 + i * 20_000 + 1},{T0 + i * 20_000 + 4 + i % 9}\n"
        for i in range(4320)
        if i not in lost
    ]
    rows = _file(root, [*base, "aggTrades", sym], f"{sym}-aggTrades-{DAY}.csv", AGG, agg)
    skip = 1400 if n % 50 == 3 else -1
    depth = []
    for j in range(2880):
        if j == skip:
            continue
        t, u = T0 + j * 30_000, 10_000 + 3 * j
        depth.append(f"{t},,{u},{u + 2},,b,99.{j % 90:02d},1.{j % 7},{t + 6}\n")
        depth.append(f"{t},,{u},{u + 2},,a,100.{j % 90:02d},2.{j % 5},{t + 6}\n")
    rows += _file(root, [*base, "depth", sym], f"{sym}-depth-{DAY}.csv", DEPTH, depth)
    klines = [
        f"{T0 + k * 60_000},100.1,100.9,99.2,100.4,12.5,{T0 + k * 60_000 + 59_999},1250.7,31,"
        f"6.1,612.2,{T0 + k * 60_000 + 60_000},{T0 + k * 60_000 + 60_003}\n"
        for k in range(1440)
    ]
    rows += _file(root, [*base, "klines", sym, "1m"], f"{sym}-1m-{DAY}.csv", KLINE, klines)
    levels = ",".join(f"99.{i},1.{i},100.{i},2.{i}" for i in range(5))
    book = [
        f"{20_000 + b},{T0 + b * 120_000},{T0 + b * 120_000 + 2},{levels}\n" for b in range(720)
    ]
    rows += _file(root, [*base, "orderbook", sym], f"{sym}-orderbook-{DAY}.csv", BOOK, book)
    if lost:
        marker = [f"{T0 + 1180 * 20_000},aggtrade,unfillable,1000,1179,rest gave nothing\n"]
        _file(root, [*base, "markers", sym], f"{sym}-markers-{DAY}.csv", MARKERS, marker)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--symbols", type=int, default=2000)
    args = ap.parse_args()
    rows = sum(write_symbol(args.root, n) for n in range(args.symbols))
    print(f"{args.root}: {args.symbols} symbols, {rows} rows")


if __name__ == "__main__":
    main()
