"""Benchmark of Binance frame decoding and of one adapter process's receive rate.

1. Decode cost per message, one core, for a spot aggTrade, a 20+20-level diff-depth event
   and a kline update, each in its combined-stream envelope, into the same normalised
   record:

   * ``msgspec typed``: :class:`streamer.plugins.exchanges.binance.decode.FrameDecoder`
   * ``json.loads``: the stdlib baseline (``json.loads`` then the record built from dicts)

   Median of ``--repeat`` runs of ``--count`` messages; the ratio is baseline / ours.

2. Messages per second one adapter process sustains: the simulator's high-rate mode
   (``SimConfig(high_rate=..., high_rate_symbols=...)``) runs in a separate process and
   offers more than the adapter can take (50% depth 20+20, 45% aggTrade, 5% kline, over
   ``--symbols`` symbols); the adapter process receives, decodes and routes every message
   (a) to a counting inbox and (b) through the aggtrade/depth/kline stream types (their
   output counted and dropped), for ``--seconds``. The figure is messages handled per
   wall-clock second (median of runs).

Usage: ``python bench/bench_decode.py [--quick] [--repeat 5] [--count 100000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time

from streamer.core.records import DepthUpdate, Kline, Trade
from streamer.plugins.exchanges.binance.decode import FrameDecoder

AGG = (
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1735689600123,"s":"BTCUSDT",'
    b'"a":3345678901,"p":"93576.00000000","q":"0.00120000","f":4321098765,"l":4321098767,'
    b'"T":1735689600122,"m":false,"M":true}}'
)
_LEVELS = ",".join(f'["{93575 - i}.{i:02d}000000","{i}.20431000"]' for i in range(20))
DEPTH = (
    '{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1735689600140,'
    f'"s":"BTCUSDT","U":58123456701,"u":58123456789,"b":[{_LEVELS}],"a":[{_LEVELS}]}}}}'
).encode()
KLINE = (
    b'{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1735689660001,"s":"BTCUSDT",'
    b'"k":{"t":1735689600000,"T":1735689659999,"s":"BTCUSDT","i":"1m","f":4321098700,'
    b'"L":4321099912,"o":"93576.00000000","c":"93610.12000000","h":"93640.00000000",'
    b'"l":"93550.01000000","v":"12.48311000","n":1213,"x":false,"q":"1168554.23780150",'
    b'"V":"6.90215000","Q":"646112.45711020","B":"0"}}}'
)


def json_baseline(raw: bytes, receive_time: int):
    """What a stdlib collector does: json.loads, then build the record from dicts."""
    env = json.loads(raw)
    stream, d = env["stream"], env["data"]
    if stream.endswith("@aggTrade"):
        return Trade("binance", "spot", d["s"], d["a"], d["p"], d["q"], d["f"], d["l"], d["T"],
                     d["m"], d.get("M"), d["E"], receive_time)  # fmt: skip
    if "@depth" in stream:
        return DepthUpdate("binance", "spot", d["s"], d["E"], d.get("T"), d["U"], d["u"],
                           d.get("pu"), [tuple(x) for x in d["b"]], [tuple(x) for x in d["a"]],
                           receive_time)  # fmt: skip
    k = d["k"]
    return Kline("binance", "spot", d["s"], k["i"], k["t"], k["T"], k["o"], k["h"], k["l"],
                 k["c"], k["v"], k["q"], k["n"], k["V"], k["Q"], k["x"], d["E"],
                 receive_time)  # fmt: skip


def _time_per_message(fn, frame: bytes, count: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(count):
        fn(frame, 0)
    return (time.perf_counter_ns() - t0) / count / 1000.0


def bench_decode(repeat: int, count: int) -> None:
    ours = FrameDecoder("spot").decode
    assert ours(AGG, 0) == json_baseline(AGG, 0)
    assert ours(DEPTH, 0) == json_baseline(DEPTH, 0)
    assert ours(KLINE, 0) == json_baseline(KLINE, 0)
    print(f"decode, µs per message (median of {repeat} x {count}):")
    print(f"  {'payload':<22} {'msgspec typed':>14} {'json.loads':>12} {'ratio':>7}")
    for name, frame in (("aggTrade", AGG), ("depth 20+20", DEPTH), ("kline", KLINE)):
        a = statistics.median(_time_per_message(ours, frame, count) for _ in range(repeat))
        b = statistics.median(_time_per_message(json_baseline, frame, count) for _ in range(repeat))
        print(f"  {name:<22} {a:>14.2f} {b:>12.2f} {b / a:>6.1f}x")


# --------------------------------------------------------------------------- throughput


def _serve(rate: int, symbols: int, port_queue, stop_event) -> None:
    import asyncio

    from streamer.testing.sim import SimConfig, SimServer

    async def main() -> None:
        sim = SimServer(SimConfig(seed=1, high_rate=rate, high_rate_symbols=symbols,
                                  spot_symbols=[], usdm_symbols=[]))  # fmt: skip
        await sim.start()
        port_queue.put(sim.port)
        while not stop_event.is_set():
            await asyncio.sleep(0.1)
        await sim.aclose()

    asyncio.run(main())


def _throughput(port: int, symbols: int, seconds: float, with_streams: bool) -> float:
    import anyio
    import msgspec

    from streamer.core.api import ExchangeContext, StreamContext
    from streamer.core.counters import Counters
    from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
    from streamer.plugins.streams.aggtrade import AggTradeOptions, AggTradeStream
    from streamer.plugins.streams.depth import DepthOptions, DepthStream
    from streamer.plugins.streams.kline import KlineOptions, KlineStream
    from streamer.testing.highrate import high_rate_symbols

    names = high_rate_symbols(symbols)
    counters = Counters()
    log = logging.getLogger("bench")
    adapter = BinanceAdapter(
        msgspec.convert({"rest_url": f"http://127.0.0.1:{port}",
                         "ws_url": f"ws://127.0.0.1:{port}", "no_data_timeout": "30s"},
                        BinanceOptions),
        ExchangeContext(pipeline="bench", counters=counters, logger=log),
    )  # fmt: skip
    emitted = [0]

    def emit(record) -> None:
        # Count and drop: batching and IPC are the runtime's cost, measured elsewhere.
        emitted[0] += 1

    def ctx():
        return StreamContext(pipeline="bench", exchange=adapter, symbols=names, emit=emit,
                             counters=counters, logger=log)  # fmt: skip

    streams = [AggTradeStream(AggTradeOptions(backfill=False), ctx()),
               DepthStream(DepthOptions(speed="100ms"), ctx()),
               KlineStream(KlineOptions(all_updates=True, backfill=False), ctx())]  # fmt: skip
    routes = {Trade: [streams[0]], DepthUpdate: [streams[1]], Kline: [streams[2]]}
    handled = [0]

    class Inbox:
        def on_record(self, record) -> None:
            handled[0] += 1
            if with_streams:
                for s in routes[type(record)]:
                    s.on_record(record)

        def on_reconnect(self, symbols, reason) -> None:
            pass

    subs = sorted({s for st in streams for s in st.subscriptions()})

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(adapter.stream, subs, Inbox())
            while handled[0] == 0:  # connected and flowing
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # warm-up
            start_n, t0 = handled[0], time.perf_counter()
            await anyio.sleep(seconds)
            rate = (handled[0] - start_n) / (time.perf_counter() - t0)
            tg.cancel_scope.cancel()
        await adapter.aclose()
        return rate

    return anyio.run(main)


def bench_throughput(runs: int, seconds: float, symbols: int, rate: int) -> None:
    try:
        import streamer.testing.highrate  # noqa: F401
    except ImportError:
        print("throughput: skipped (the simulator's high-rate mode is not available)")
        return
    print(f"adapter throughput, offered {rate / 1000:.0f}k msg/s over {symbols} symbols "
          f"(simulator in its own process), median of {runs} x {seconds:.0f} s:")  # fmt: skip
    for label, with_streams in (("decode + count", False), ("+ aggtrade/depth/kline", True)):
        rates = []
        for _ in range(runs):
            # A fresh simulator per run: each measurement starts from the same state.
            ctx = mp.get_context("spawn")
            port_queue, stop = ctx.Queue(), ctx.Event()
            server = ctx.Process(target=_serve, args=(rate, symbols, port_queue, stop), daemon=True)
            server.start()
            try:
                port = port_queue.get(timeout=30)
                rates.append(_throughput(port, symbols, seconds, with_streams))
            finally:
                stop.set()
                server.join(10)
                if server.is_alive():
                    server.terminate()
        print(f"  {label:<24} {statistics.median(rates) / 1000:>7.1f}k msg/s "
              f"(runs: {', '.join(f'{r / 1000:.1f}k' for r in rates)})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--rate", type=int, default=300_000, help="offered msg/s")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.count, args.runs, args.seconds = 3, 20_000, 1, 2.0
    logging.basicConfig(level=logging.WARNING)
    bench_decode(args.repeat, args.count)
    bench_throughput(args.runs, args.seconds, args.symbols, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
