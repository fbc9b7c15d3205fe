"""Offline CPU profile of the worker -> writer stretch, records vs worker-side encoder.

One process, no sockets, no event loop: the simulator's high-rate frames (100 symbols,
50 % depth 20+20 / 45 % aggTrade / 5 % kline) are decoded once with a fixed clock, then
batched (``--batch`` records) and pushed through what the worker does after its stream
types (counting + encoding per sink) and what the writer does with a payload
(``Writer._write``: decode, high-water filter, counting, ``CsvSink.write``/``write_chunks``,
a flush every ``--rate`` messages), timed per side with ``time.process_time``.

    python bench/prof_encoder.py --mode records      # the record path (also on old code)
    python bench/prof_encoder.py --mode chunks       # the CSV sink's worker-side encoder
    python bench/prof_encoder.py --mode chunks --gc default   # without the GC tuning

For load-independent figures run it under ``valgrind --tool=callgrind`` with ``--side``
(``worker`` or ``writer`` runs only that side's work after the common set-up; subtract a
``--side none`` run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import shutil
import tempfile
import time
from types import SimpleNamespace

from streamer.core.api import SinkContext
from streamer.core.config import parse_config
from streamer.core.counters import Counters
from streamer.core.records import encode_batch
from streamer.core.runtime.bootstrap import ChildSpec, PluginSelection
from streamer.core.runtime.keys import HighWater
from streamer.core.runtime.worker import Worker
from streamer.core.runtime.writer import Writer
from streamer.plugins.exchanges.binance.decode import FrameDecoder
from streamer.plugins.sinks.csv_batch import CsvSink, Options
from streamer.testing.highrate import HighRateSource

_log = logging.getLogger("prof")


def records(n: int, symbols: int) -> list:
    class Conn:
        combined = True

    conn = Conn()
    protocol = SimpleNamespace(version=1, subs={})
    source = HighRateSource(
        1000, symbols, 1, {}, SimpleNamespace(snapshot_hook=None), protocol, None, Counters(), None
    )
    protocol.subs = {("spot", name): [conn] for name in source.streams()}
    decode = FrameDecoder("spot").decode
    now = time.time_ns() // 1_000_000
    out = []
    while len(out) < n:
        for data in source._build(min(4000, n - len(out)))[conn]:
            out.append(decode(data[data.index(b"{") :], now))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--rate", type=int, default=30_000, help="messages per simulated second")
    ap.add_argument("--mode", choices=["records", "chunks"], default="chunks")
    ap.add_argument("--gc", choices=["default", "tuned"], default="tuned")
    ap.add_argument("--side", choices=["both", "worker", "writer", "none"], default="both")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    recs = records(args.messages, args.symbols)
    batches = [recs[i : i + args.batch] for i in range(0, len(recs), args.batch)]
    del recs
    root = tempfile.mkdtemp(prefix="prof-encoder-")
    config = parse_config(
        {"pipelines": [{"name": "p", "exchange": "binance", "symbols": ["X"],
                        "streams": {"aggtrade": {}}, "sinks": ["csv"]}],
         "sinks": {"csv": {"type": "csv", "path": root}},
         "runtime": {"state_dir": root + "/state"}}
    )  # fmt: skip
    spec = ChildSpec(
        kind="writer", child="sink.csv", incarnation=1, plugins=PluginSelection(),
        config=config, control_path="", log_level=40, sink_paths={}, sink="csv",
    )  # fmt: skip
    opts = Options(path=root + "/csv", flush_interval="1h", flush_rows=1_000_000)
    sink = CsvSink(opts, SinkContext(name="csv", counters=Counters(), logger=_log))
    writer = Writer(spec)
    writer._sink = sink
    worker = SimpleNamespace(counters=Counters())
    for name in ("_count", "_count_encoded", "_publish_counts"):
        if hasattr(Worker, name):
            setattr(worker, name, getattr(Worker, name).__get__(worker))
    encoder = None
    if args.mode == "chunks":
        from streamer.core.api import EncoderContext
        from streamer.core.records import encode_encoded
        from streamer.plugins.sinks._csv_encoder import CsvEncoder

        context = EncoderContext(sink="csv", pipeline="p", counters=worker.counters, logger=_log)
        encoder = CsvEncoder(opts, context)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sink.open())
    writer._high_water = HighWater(loop.run_until_complete(sink.holdings()))
    gc.collect()
    if args.gc == "tuned":
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    runs = [0]
    gc.callbacks.append(lambda phase, info: phase == "start" and runs.__setitem__(0, runs[0] + 1))
    clock = time.process_time
    t_worker = t_writer = 0.0
    since_flush = 0
    sent = 0
    for batch in batches:
        t0 = clock()
        if args.side in ("both", "worker"):
            if encoder is None:
                worker._count(batch)
                payload = encode_batch(batch)
            else:
                out = encoder.encode(batch)
                worker._count_encoded(out)
                payload = encode_encoded(out)
        elif args.side == "writer":  # the worker's work, untimed
            payload = (
                encode_batch(batch) if encoder is None else encode_encoded(encoder.encode(batch))
            )
        else:
            continue
        t1 = clock()
        sent += len(payload)
        if args.side in ("both", "writer"):
            loop.run_until_complete(writer._write(sink, bytes(payload)))
            since_flush += len(batch)
            if since_flush >= args.rate:
                since_flush = 0
                loop.run_until_complete(sink.flush())
        t2 = clock()
        t_worker += t1 - t0
        t_writer += t2 - t1
    loop.run_until_complete(sink.close())
    n = sum(len(b) for b in batches)
    print(f"mode={args.mode} gc={args.gc} messages={n} batch={args.batch}")
    print(f"  worker (count + encode)         {t_worker / n * 1e6:7.2f} µs/msg CPU")
    print(f"  writer (decode..sink, flushes)  {t_writer / n * 1e6:7.2f} µs/msg CPU")
    print(f"  bytes per message on the socket {sent / n:7.0f}")
    print(f"  rows written                    {sink.context.counters.total('rows_written')}")
    print(f"  gc collections                  {runs[0]}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"  max RSS                         {rss} MB")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
