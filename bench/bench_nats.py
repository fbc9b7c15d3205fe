"""Collector -> NATS JetStream -> store -> CSV, next to the direct collector -> CSV.

Run: ``python bench/bench_nats.py [--rate 20000] [--symbols 50] [--seconds 20]``
(needs ``nats-server`` in the venv, as ``make test`` installs it, and nats-py).

Both cases read the same ``streamer sim --rate R --rate-symbols N`` feed (aggTrade and
depth of every symbol) for ``--seconds``:

* ``direct``: ``streamer run`` with a ``csv`` sink;
* ``nats``: ``streamer run`` with a ``nats`` sink into a local JetStream server, and
  ``streamer store`` writing ``csv`` from a durable consumer.

Reported per case: rows landed in the CSV files per second (aggTrades + depth), the CPU
seconds of each side (user + system of the process tree, from ``wait4``; the broker's
from ``/proc``), and the latency from each aggTrade's event time to the row being seen on
disk (p50/p99, polled every 10 ms by ``bench/_tail.CsvTailer``; same method both cases).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tail import CsvTailer, RowCounter, percentile

from streamer.testing.highrate import high_rate_symbols

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def cpu_of_wait(proc: subprocess.Popen, timeout: float = 120) -> float:
    """Wait for ``proc`` and return the CPU seconds of its tree (children it reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, _status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline(symbols: list[str], port: int, sinks: list[str]) -> dict:
    base = f"127.0.0.1:{port}"
    return {
        "name": "spot",
        "exchange": "binance",
        "options": {"market": "spot", "rest_url": f"http://{base}", "ws_url": f"ws://{base}"},
        "symbols": symbols,
        "streams": {"aggtrade": {}, "depth": {}},
        "sinks": sinks,
    }


def run_case(case: str, args, work: Path) -> dict:
    work.mkdir(parents=True)
    sim_port = free_port()
    sim = spawn([str(BIN / "streamer"), "sim", "--port", str(sim_port), "--rate", str(args.rate),
                 "--rate-symbols", str(args.symbols)], work / "sim.log")  # fmt: skip
    procs = [sim]
    result: dict = {"case": case}
    try:
        wait_port(sim_port)
        symbols = high_rate_symbols(args.symbols)
        data = work / "data"
        csv_sink = {"type": "csv", "path": str(data), "flush_interval": "100ms"}
        runtime = {"state_dir": str(work / "state-c"), "shutdown_timeout": 60}
        if case == "direct":
            collector = {"pipelines": [pipeline(symbols, sim_port, ["csv"])],
                         "sinks": {"csv": csv_sink}, "runtime": runtime}  # fmt: skip
        else:
            nats_port = free_port()
            url = f"nats://127.0.0.1:{nats_port}"
            broker = spawn(
                [
                    str(BIN / "nats-server"),
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(nats_port),
                    "-sd",
                    str(work / "js"),
                ],
                work / "nats.log",
            )
            procs.append(broker)
            wait_port(nats_port)
            collector = {
                "pipelines": [pipeline(symbols, sim_port, ["bus"])],
                "sinks": {"bus": {"type": "nats", "url": url}},
                "runtime": runtime,
            }
            store = {
                "source": {"type": "nats", "url": url, "durable": "bench"},
                "sinks": {"csv": csv_sink},
                "runtime": {"state_dir": str(work / "state-s"), "shutdown_timeout": 60},
            }
            (work / "store.yaml").write_text(yaml.safe_dump(store))
            store_proc = spawn([str(BIN / "streamer"), "store", "--quiet", "--config",
                                str(work / "store.yaml")], work / "store.log")  # fmt: skip
        (work / "collector.yaml").write_text(yaml.safe_dump(collector))
        pattern = str(data / "binance/spot/aggTrades/*/*.csv")
        tail = CsvTailer(pattern, event_col=8, receive_col=9, interval=0.01).start()
        rows = RowCounter(str(data / "binance/spot/*/*/*.csv"), interval=0.1).start()
        col = spawn([str(BIN / "streamer"), "run", "--quiet", "--config",
                     str(work / "collector.yaml"), "--duration", str(args.seconds)],
                    work / "collector.log")  # fmt: skip
        started = time.monotonic()
        result["collector_cpu_s"] = cpu_of_wait(col)
        ended = time.monotonic()
        if case == "nats":
            time.sleep(3)  # let the store drain what is in flight
            result["broker_cpu_s"] = proc_cpu(broker.pid)
            store_proc.send_signal(signal.SIGTERM)
            result["store_cpu_s"] = cpu_of_wait(store_proc)
        tail.stop()
        rows.stop()
        t0, t1 = started + 8, ended - 1  # after start-up (snapshots), before the drain
        result["rows_per_s"] = rows.rate(t0, t1)
        lags = [s.written for s in tail.window(t0, t1)]
        result["lag_p50_ms"] = percentile(lags, 0.5) if lags else float("nan")
        result["lag_p99_ms"] = percentile(lags, 0.99) if lags else float("nan")
        result["seconds"] = ended - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20000)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    try:
        results = [run_case(case, args, root / case) for case in ("direct", "nats")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"sim --rate {args.rate} --rate-symbols {args.symbols}, {args.seconds:g} s, "
          f"aggTrade + depth\n")  # fmt: skip
    print("| case | rows/s on disk | collector CPU | broker CPU | store CPU | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        secs = r["seconds"]
        print(f"| {r['case']} | {r['rows_per_s']:,.0f} | {r['collector_cpu_s'] / secs:.0%} | "
              f"{r.get('broker_cpu_s', 0) / secs:.0%} | {r.get('store_cpu_s', 0) / secs:.0%} | "
              f"{r['lag_p50_ms']:.0f} ms | {r['lag_p99_ms']:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
