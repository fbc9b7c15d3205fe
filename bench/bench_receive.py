"""Receive + decode cost of the Binance adapter's two WebSocket paths, against the bare limit.

A feed process offers more than a client can read: by default a replay server that sends
pre-built frames of the benchmark mix (50 % depth 20+20 / 45 % aggTrade / 5 % kline over
``--symbols`` symbols, bench_decode's payloads) to every connection as fast as it reads, so
the client, not the generator, is the limit; ``--feed sim`` uses the simulator's high-rate
mode (``bench/_simfeed.py``) instead, which on a loaded 2-core machine generates less than a
client reads. This process then runs the clients one after another,
in rounds (A B C D, A B C D, ...), each for ``--seconds`` on the same connections' worth
of streams, and measures its own main-thread CPU time per message:

* ``protocol``: ``ConnectionManager`` with ``ws_impl="protocol"`` (sans-I/O), decoding every
  frame into a record (counted and dropped);
* ``connection``: the same with ``ws_impl="connection"`` (websockets' connection object);
* ``bare+decode``: websockets ``recv()`` plus the same ``FrameDecoder.decode`` call, no manager;
* ``bare``: websockets ``recv()`` and a count (``bench/bare_receive.py``: the limit).

Figures are medians over rounds; the ratios are within one run, which is what a shared,
noisy machine allows (never compare a lone figure with another run's).

``--starvation`` adds the worker's batching in front of each managed client: records go to
a pending list, every ``batch_size`` records wake a flusher task (or every
``batch_interval``), which hands the batch to a sender task writing it to a socket drained
by a thread (like the worker's ``_flusher``/``_sender`` pair). It reports the age of the
oldest record of each batch when the sender wrote it (p50/p99/max) and the adapter's
``ws_loop_lag_ms`` gauge: a receive path that keeps the event loop busy without yielding
shows as batches that grow old before they are sent.

Usage: ``python bench/bench_receive.py [--rounds 5] [--seconds 3] [--symbols 100]
[--rate 300000] [--starvation]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from _client import STREAM_SUFFIXES, stream_urls, symbol_names
from websockets.asyncio.client import connect

from streamer.core.counters import Counters
from streamer.plugins.exchanges.binance.connections import (
    ConnectionManager,
    ConnectionRateLimiter,
    ConnectionSettings,
    build_groups,
)
from streamer.plugins.exchanges.binance.decode import FrameDecoder

BENCH = Path(__file__).resolve().parent
LOG = logging.getLogger("bench.receive")


class Batcher:
    """The worker's emit -> pending -> flusher -> sender path, with batch ages."""

    def __init__(self, batch_size: int = 2000, batch_interval: float = 0.05) -> None:
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.pending: list[object] = []
        self.starts: deque[float] = deque()  # when each batch-sized slot got its first record
        self.wake = asyncio.Event()
        self.queue: asyncio.Queue[tuple[float, int]] = asyncio.Queue(maxsize=256)
        self.ages: list[float] = []
        self.delays: list[float] = []  # from the batch being due (full) to written
        self.stages: list[tuple[float, float]] = []  # (due -> flusher took it, took -> written)
        self.full: deque[float] = deque()  # when each full slot filled up
        self.peak_pending = 0
        self.left, self.right = socket.socketpair()
        self.left.setblocking(False)
        self._drain = threading.Thread(target=self._drain_socket, daemon=True)
        self._drain.start()

    def emit(self, record: object) -> None:
        pending = self.pending
        if len(pending) % self.batch_size == 0:
            self.starts.append(time.monotonic())
        pending.append(record)
        if len(pending) % self.batch_size == 0:
            self.full.append(time.monotonic())
        if len(pending) >= self.batch_size:
            self.wake.set()

    async def flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch_interval):
                    await self.wake.wait()
            self.wake.clear()
            self.peak_pending = max(self.peak_pending, len(self.pending))
            while self.pending:
                n = min(len(self.pending), self.batch_size)
                del self.pending[:n]
                now = time.monotonic()
                due = self.full.popleft() if self.full and n == self.batch_size else now
                await self.queue.put((self.starts.popleft(), due, now, n))

    async def sender(self) -> None:
        loop = asyncio.get_running_loop()
        payload = b"x" * (577 * self.batch_size)  # msgpack bytes per message
        while True:
            oldest, due, taken, n = await self.queue.get()
            await loop.sock_sendall(self.left, memoryview(payload)[: 577 * n])
            now = time.monotonic()
            self.ages.append(now - oldest)
            self.delays.append(now - due)
            self.stages.append((taken - due, now - taken))

    def _drain_socket(self) -> None:
        with contextlib.suppress(OSError):
            while self.right.recv(1 << 20):
                pass

    def close(self) -> None:
        self.left.close()
        self.right.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _measure(run_for, seconds: float) -> tuple[float, int, float]:
    """Run ``run_for(count)`` until cancelled; return (CPU s, messages, wall s) of the window
    after a 0.5 s warm-up."""
    count = [0]
    task = asyncio.create_task(run_for(count))
    try:
        deadline = time.monotonic() + 15
        while count[0] == 0:
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("no message within 15 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        c0, n0, t0 = time.thread_time(), count[0], time.monotonic()
        await asyncio.sleep(seconds)
        c1, n1, t1 = time.thread_time(), count[0], time.monotonic()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return c1 - c0, n1 - n0, t1 - t0


def _managed(impl: str, base: str, symbols: int, batcher: Batcher | None, extra: dict):
    streams = [s.lower() + suffix for s in symbol_names(symbols) for suffix in STREAM_SUFFIXES]
    groups = build_groups(base, streams, 200)

    async def run_for(count: list[int]) -> None:
        counters = Counters()
        emit = batcher.emit if batcher is not None else None

        def on_record(record) -> None:
            count[0] += 1
            if emit is not None:
                emit(record)

        manager = ConnectionManager(
            groups,
            ConnectionSettings(market="spot", ws_impl=impl, no_data_timeout=30.0),
            on_record=on_record,
            on_reconnect=lambda symbols, reason: None,
            counters=counters,
            logger=LOG,
            limiter=ConnectionRateLimiter(),
        )
        extra["counters"] = counters
        tasks = [asyncio.create_task(manager.run())]
        if batcher is not None:
            tasks += [asyncio.create_task(batcher.flusher()), asyncio.create_task(batcher.sender())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return run_for


def _bare(base: str, symbols: int, decode: bool):
    async def one(url: str, count: list[int]) -> None:
        ws = await connect(url, compression=None, max_size=2**22, proxy=None)
        decoder = FrameDecoder("spot").decode
        try:
            while True:
                raw = await ws.recv(decode=False)
                if decode:
                    decoder(raw, time.time_ns() // 1_000_000)
                count[0] += 1
        finally:
            ws.transport.abort()

    async def run_for(count: list[int]) -> None:
        await asyncio.gather(*(one(u, count) for u in stream_urls(base, symbols)))

    return run_for


def _mix_blob(symbols: int, count: int = 20_000) -> bytes:
    """``count`` combined-stream text frames in the benchmark mix (10 depth 20+20 : 9 aggTrade
    : 1 kline), round-robin over ``symbols`` symbols, as one buffer to send again and again."""
    from bench_decode import AGG, DEPTH, KLINE
    from websockets.frames import Frame, Opcode

    names = symbol_names(symbols)
    pattern = [DEPTH] * 10 + [AGG] * 9 + [KLINE]
    frames = []
    for i in range(count):
        sym = names[i % len(names)]
        raw = (
            pattern[i % 20]
            .replace(b"BTCUSDT", sym.encode())
            .replace(b"btcusdt", sym.lower().encode())
        )
        frames.append(Frame(Opcode.TEXT, raw).serialize(mask=False))
    return b"".join(frames)


async def _serve_replay(symbols: int) -> None:
    """A WebSocket server that sends the mix to every client as fast as it reads."""
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    blob = _mix_blob(symbols)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proto = ServerProtocol()
        request = None
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while request is None:
                data = await reader.read(65536)
                if not data:
                    return
                proto.receive_data(data)
                request = next((e for e in proto.events_received() if isinstance(e, Request)), None)
            proto.send_response(proto.accept(request))
            writer.write(b"".join(proto.data_to_send()))
            while True:
                writer.write(blob)
                await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"READY {server.sockets[0].getsockname()[1]} 0", flush=True)
    async with server:
        await server.serve_forever()


def _start_feed(feed: str, symbols: int) -> tuple[subprocess.Popen, int, int]:
    if feed == "sim":
        cmd = [sys.executable, str(BENCH / "_simfeed.py"), "--symbols", str(symbols)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--symbols", str(symbols)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        proc.kill()
        raise RuntimeError("the feed did not start")
    return proc, int(line[1]), int(line[2])


async def _set_rate(control: int, rate: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", control)
    writer.write(f"GET /_bench/rate?value={rate} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.read()
    writer.close()


async def main_async(args: argparse.Namespace) -> int:
    proc, port, control = _start_feed(args.feed, args.symbols)
    base = f"ws://127.0.0.1:{port}"
    try:
        if args.feed == "sim":
            await _set_rate(control, args.rate)
        subjects = {
            "protocol": lambda b, x: _managed("protocol", base, args.symbols, b, x),
            "connection": lambda b, x: _managed("connection", base, args.symbols, b, x),
        }
        if not args.starvation:
            subjects["bare+decode"] = lambda b, x: _bare(base, args.symbols, True)
            subjects["bare"] = lambda b, x: _bare(base, args.symbols, False)
        cpu: dict[str, list[float]] = {name: [] for name in subjects}
        rate: dict[str, list[float]] = {name: [] for name in subjects}
        ages: dict[str, list[float]] = {name: [] for name in subjects}
        delays: dict[str, list[float]] = {name: [] for name in subjects}
        stages: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}
        lags: dict[str, list[int]] = {name: [] for name in subjects}
        peaks: dict[str, list[int]] = {name: [] for name in subjects}
        for r in range(args.rounds):
            for name, make in subjects.items():
                batcher = Batcher() if args.starvation else None
                extra: dict = {}
                used, n, wall = await _measure(make(batcher, extra), args.seconds)
                cpu[name].append(used / n * 1e6)
                rate[name].append(n / wall)
                if batcher is not None:
                    ages[name] += batcher.ages
                    delays[name] += batcher.delays
                    stages[name] += batcher.stages
                    peaks[name].append(batcher.peak_pending)
                    batcher.close()
                if "counters" in extra:
                    lags[name].append(extra["counters"].get("ws_loop_lag_ms"))
                print(f"  round {r + 1} {name:<12} {used / n * 1e6:6.2f} µs CPU/msg "
                      f"{n / wall / 1000:6.1f}k msg/s  cpu {used / wall:4.0%}",
                      flush=True)  # fmt: skip
        feed = args.feed + (f" at {args.rate / 1000:.0f}k msg/s" if args.feed == "sim" else "")
        print(f"\nreceive + decode, main-thread CPU per message, median of {args.rounds} rounds "
              f"x {args.seconds:g} s ({args.symbols} symbols, feed {feed}):")  # fmt: skip
        med = {name: statistics.median(v) for name, v in cpu.items()}
        for name in subjects:
            msgs = statistics.median(rate[name]) / 1000
            print(f"  {name:<12} {med[name]:6.2f} µs/msg  {msgs:6.1f}k msg/s")
        print("ratios (per-round medians):")
        pairs = [("connection", "protocol")]
        if "bare" in med:
            pairs += [("protocol", "bare+decode"), ("connection", "bare+decode"),
                      ("protocol", "bare"), ("connection", "bare")]  # fmt: skip
        for a, b in pairs:
            per_round = statistics.median(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
            print(f"  {a} / {b}: {per_round:.2f}x")
        if args.starvation:
            print("batch age when written by the sender (worker emulation), ms:")
            for name in subjects:
                a = [x * 1000 for x in ages[name]]
                print(f"  {name:<12} p50 {_pct(a, 0.5):7.1f}  p99 {_pct(a, 0.99):7.1f}  "
                      f"max {max(a, default=float('nan')):7.1f}  batches {len(a)}  "
                      f"peak pending {max(peaks[name])}  ws_loop_lag_ms {lags[name]}")  # fmt: skip
            print("delay from a batch being due (full) to written, ms "
                  "[due -> flusher took it | took -> written, p50/p99]:")  # fmt: skip
            for name in subjects:
                d = [x * 1000 for x in delays[name]]
                took = [x[0] * 1000 for x in stages[name]]
                sent = [x[1] * 1000 for x in stages[name]]
                print(f"  {name:<12} p50 {_pct(d, 0.5):7.1f}  p99 {_pct(d, 0.99):7.1f}  "
                      f"max {max(d, default=float('nan')):7.1f}  [{_pct(took, 0.5):.1f}/"
                      f"{_pct(took, 0.99):.1f} | {_pct(sent, 0.5):.1f}/"
                      f"{_pct(sent, 0.99):.1f}]")  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--rate", type=int, default=300_000, help="offered msg/s")
    ap.add_argument("--starvation", action="store_true", help="add the worker's batching")
    ap.add_argument(
        "--feed", choices=("replay", "sim"), default="replay",
        help="replay: pre-built mix frames sent as fast as read (default); sim: _simfeed.py",
    )  # fmt: skip
    ap.add_argument(
        "--turn", type=int, default=None,
        help="messages per event-loop turn on the protocol path (_wsproto.TURN_MESSAGES)",
    )  # fmt: skip
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.turn is not None:
        from streamer.plugins.exchanges.binance import _wsproto

        _wsproto.TURN_MESSAGES = args.turn
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_replay(args.symbols))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
