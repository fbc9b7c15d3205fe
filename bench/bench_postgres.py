"""Benchmark of the postgres sink: rows/s into a real PostgreSQL, and the collector's CPU
with the postgres sink next to the csv sink.

Run: ``python bench/bench_postgres.py [--rows 500000] [--batch 2000] [--seconds 20]``

Needs the server binaries the tests use (``make test`` installs them; see
``tests/pg_server.py``): it starts a throw-away server (``fsync=on``, default settings but
``shared_buffers=64MB``) on 127.0.0.1 in a temporary directory and removes it afterwards.

1. Sink throughput: ``--rows`` aggTrade records, and depth events of 10 levels (one row per
   level), handed to ``PostgresSink.write`` in batches of ``--batch`` as the writer process
   does, then ``flush``/``close``; rows/s = rows / wall seconds until everything is
   committed; and, steadier on a shared machine, rows per CPU second of the sink's
   process, of the server backend serving its connection (``/proc/<pid>/stat``), and of
   both together (the throughput of one idle core doing all the work).
2. Collector CPU: ``streamer run --duration --seconds`` against the bundled simulator
   (spot, ``--symbols`` symbols, aggtrade + depth + 1s klines), once with a csv sink and
   once with a postgres sink, in the same run; CPU = user + system seconds of the
   collector's process tree (``RUSAGE_CHILDREN``; the PostgreSQL server is not included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pg_server import PgServer

from streamer import Counters, DepthUpdate, SinkContext, Trade
from streamer.plugins.sinks.postgres_sink import Options, PostgresSink

T0 = 1_795_392_000_000


def trades(n: int) -> list[Trade]:
    out = []
    for i in range(n):
        t = T0 + i * 3
        price = f"9{i % 10000:04d}.{i % 97:02d}000000"
        qty = f"0.{(i * 7919) % 100000000:08d}"
        first = 4_000_000_000 + 2 * i
        out.append(Trade("binance", "spot", "BTCUSDT", 3_000_000_000 + i, price, qty, first,
                         first + 1, t, i % 2 == 0, True, t + 1, t + 4))  # fmt: skip
    return out


def depths(n: int, levels: int = 10) -> list[DepthUpdate]:
    out = []
    for i in range(n):
        bids = [(f"{95000 - k}.{i % 100:02d}", f"{k}.{i % 1000:03d}00") for k in range(levels // 2)]
        asks = [(f"{95001 + k}.{i % 100:02d}", f"{k}.{i % 1000:03d}00") for k in range(levels // 2)]
        out.append(DepthUpdate("binance", "spot", "BTCUSDT", T0 + i * 100, None, 10 * i + 1,
                               10 * i + 10, None, bids, asks, T0 + i * 100 + 3))  # fmt: skip
    return out


async def push(dsn: str, records: list, batch: int) -> tuple[float, float]:
    ctx = SinkContext(name="bench", counters=Counters(), logger=logging.getLogger("bench"))
    sink = PostgresSink(Options(dsn=dsn), ctx)
    await sink.open()
    await sink.holdings()
    backend = await sink._conn.fetchval("SELECT pg_backend_pid()")  # the server's process
    wall, cpu, server = time.perf_counter(), time.process_time(), _cpu_of(backend)
    for i in range(0, len(records), batch):
        await sink.write(records[i : i + batch])
    await sink.flush()
    server = _cpu_of(backend) - server
    await sink.close()
    assert sink.pending_rows == 0
    return time.perf_counter() - wall, time.process_time() - cpu, server


def _cpu_of(pid: int) -> float:
    """user + system CPU seconds of ``pid`` so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sink_throughput(server: PgServer, rows: int, batch: int) -> None:
    print(f"sink throughput ({rows} rows per kind, batches of {batch}):")
    for name, records, per in (
        ("aggTrade", trades(rows), 1),
        ("depth (10 levels)", depths(rows // 10), 10),
    ):
        db = f"bench_{name.split()[0].lower()}"
        server.psql(f"CREATE DATABASE {db}")
        wall, cpu, backend = asyncio.run(push(server.dsn_for(db), records, batch))
        n = len(records) * per
        print(f"  {name:18} {n / wall:>9,.0f} rows/s wall; per CPU second: sink "
              f"{n / cpu:>9,.0f} rows, server backend {n / backend:>9,.0f} rows, both "
              f"{n / (cpu + backend):>9,.0f} rows")  # fmt: skip


def collector_cpu(server: PgServer, seconds: float, symbols: int) -> None:
    from streamer.testing.sim import SimConfig, SimServer

    names = [f"S{i:03d}USDT" for i in range(symbols)]
    sim = SimServer(SimConfig(seed=1, spot_symbols=names, usdm_symbols=[], tick_ms=10))
    sim.start_in_thread()
    server.psql("CREATE DATABASE bench_collector")
    print(f"collector CPU ({seconds:g} s, {symbols} spot symbols, aggtrade + depth + kline 1s):")
    try:
        for sink in ("csv", "postgres", "csv", "postgres"):
            with tempfile.TemporaryDirectory() as tmp:
                spec = (
                    {"type": "csv", "path": f"{tmp}/data"}
                    if sink == "csv"
                    else {"type": "postgres", "dsn": server.dsn_for("bench_collector")}
                )
                config = {
                    "pipelines": [{
                        "name": "spot", "exchange": "binance",
                        "options": {"market": "spot", "rest_url": sim.rest_url,
                                    "ws_url": sim.ws_url},
                        "symbols": names,
                        "streams": {"aggtrade": {}, "depth": {}, "kline": {"intervals": ["1s"]}},
                        "sinks": ["out"],
                    }],
                    "sinks": {"out": spec},
                    "runtime": {"state_dir": f"{tmp}/state"},
                }  # fmt: skip
                path = Path(tmp) / "c.yaml"
                path.write_text(yaml.safe_dump(config))
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                done = subprocess.run(
                    [sys.executable, "-m", "streamer", "run", "--config", str(path),
                     "--duration", str(seconds)],
                    capture_output=True, text=True, timeout=seconds + 120,
                )  # fmt: skip
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if done.returncode:
                    raise SystemExit(f"collector failed: {done.stderr[-2000:]}")
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                print(f"  {sink:9} {cpu:6.2f} CPU s  ({cpu / seconds * 100:5.1f} % of one core)")
    finally:
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--skip-collector", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = PgServer(fsync=True)
    try:
        server.start()
        print(f"PostgreSQL from {server.bindir} on 127.0.0.1:{server.port}; {os.cpu_count()} CPUs")
        sink_throughput(server, args.rows, args.batch)
        if not args.skip_collector:
            collector_cpu(server, args.seconds, args.symbols)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
