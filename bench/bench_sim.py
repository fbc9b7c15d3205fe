"""Throughput of the simulator's high-rate mode against a plain websockets server.

Run: ``python bench/bench_sim.py [--seconds 3] [--repeat 3]``.

Each case starts a server in its own process and measures, in this process, how many
WebSocket messages per second arrive over loopback, with a counting client that parses frame
headers only (so the client is not the bottleneck). Cases:

* ``baseline``: a ``websockets`` server sending one pre-encoded depth message per
  ``await ws.send()`` as fast as it can (the usual way to write a test server);
* ``sim rate=R symbols=N``: ``streamer sim --rate R --rate-symbols N`` with every stream of
  every symbol subscribed (``ceil(3N/1024)`` connections, ~50% depth 20+20 levels, 45%
  aggTrade, 5% kline), R = a target or "max".

Reports the median msgs/s over the repeats, the ratio to the baseline measured in the same
run, and the median latency (receive time minus the event time ``E`` the sim stamps at send).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlsplit

_E = re.compile(rb'"E":(\d{13})')

_BASELINE = textwrap.dedent(
    """
    import asyncio, sys
    from websockets.asyncio.server import serve
    levels = ",".join('["%d.00000000","1.00000000"]' % (60000 - i) for i in range(20))
    MSG = ('{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1,"s":"BTCUSDT",'
           '"U":1,"u":2,"b":[' + levels + '],"a":[' + levels + ']}}')
    async def handler(ws):
        while True:
            await ws.send(MSG)
    async def main():
        async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None,
                         write_limit=1 << 20):
            await asyncio.Event().wait()
    asyncio.run(main())
    """
)


class _Counter(asyncio.Protocol):
    """Counts server frames after the handshake; samples ``E`` every 512th frame."""

    def __init__(self, request: bytes, latencies: list[int]) -> None:
        self.request = request
        self.buf = bytearray()
        self.handshaken = False
        self.frames = 0
        self.latencies = latencies
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(buf[:200].decode(errors="replace"))
            self.handshaken = True
            pos = end + 4
        n = len(buf)
        frames = self.frames
        while pos + 2 <= n:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if pos + 4 > n:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if pos + 10 > n:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if pos + head + length > n:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 0x1:
                frames += 1
                if frames % 512 == 0:
                    m = _E.search(buf, pos + head, min(pos + head + 200, n))
                    if m:
                        self.latencies.append(time.time_ns() // 1_000_000 - int(m.group(1)))
            elif opcode == 0x9 and self.transport is not None:  # answer pings (masked pong)
                payload = bytes(buf[pos + head : pos + head + length])
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            pos += head + length
        self.frames = frames
        del buf[:pos]


def _request(url: str) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _measure(urls: list[str], seconds: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    latencies: list[int] = []
    protos = []
    for url in urls:
        parts = urlsplit(url)
        _, proto = await loop.create_connection(
            lambda url=url: _Counter(_request(url), latencies), parts.hostname, parts.port
        )
        protos.append(proto)
    await asyncio.sleep(0.5)  # warm-up
    start_frames = sum(p.frames for p in protos)
    latencies.clear()
    t0 = loop.time()
    await asyncio.sleep(seconds)
    rate = (sum(p.frames for p in protos) - start_frames) / (loop.time() - t0)
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    return rate, statistics.median(latencies) if latencies else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def _run_case(cmd: list[str], port: int, urls: list[str], seconds: float) -> tuple[float, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        return asyncio.run(_measure(urls, seconds))
    finally:
        proc.terminate()
        proc.wait(10)


def _sim_urls(port: int, symbols: int) -> list[str]:
    names = [
        f"s{i:04d}usdt@{kind}"
        for i in range(symbols)
        for kind in ("depth@100ms", "aggTrade", "kline_1m")
    ]
    return [
        f"ws://127.0.0.1:{port}/stream?streams=" + "/".join(names[i : i + 1024])
        for i in range(0, len(names), 1024)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cases: list[tuple[str, int, int]] = [
        ("baseline websockets send()", 0, 0),
        ("sim rate=100k symbols=100", 100_000, 100),
        ("sim rate=max symbols=100", 10_000_000, 100),
        ("sim rate=100k symbols=2000", 100_000, 2000),
        ("sim rate=max symbols=2000", 10_000_000, 2000),
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for _ in range(args.repeat):
        for name, rate, symbols in cases:
            port = _free_port()
            if rate == 0:
                cmd = [sys.executable, "-c", _BASELINE, str(port)]
                urls = [f"ws://127.0.0.1:{port}/"]
            else:
                cmd = [
                    sys.executable, "-m", "streamer", "sim", "--port", str(port),
                    "--rate", str(rate), "--rate-symbols", str(symbols),
                ]  # fmt: skip
                urls = _sim_urls(port, symbols)
            results[name].append(_run_case(cmd, port, urls, args.seconds))

    base = statistics.median(r for r, _ in results[cases[0][0]])
    print(f"{'case':32} {'median msg/s':>13} {'vs baseline':>12} {'median latency ms':>18}")
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        lat = statistics.median(lat for _, lat in runs)
        lat_text = "-" if name.startswith("baseline") else f"{lat:.0f}"
        print(f"{name:32} {rate:13,.0f} {rate / base:11.2f}x {lat_text:>18}")


if __name__ == "__main__":
    main()
