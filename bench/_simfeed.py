"""The package's simulator in high-rate mode, in its own process, under harness control.

``streamer.testing.sim.SimServer`` with ``SimConfig(high_rate=...)`` generates the benchmark
mix from pre-encoded frames (``streamer/testing/highrate.py``). Its rate is fixed when it
starts; the harness needs to ramp it live and to see how far generation fell behind, so
this wrapper adds a small control server on a second port with the same endpoints as
``_feed.py``: ``/_bench/rate?value=N`` restarts the generator at ``N`` msg/s (0 pauses it),
``/_bench/stats`` reports ``generated``, ``backlog`` (events due since the last rate change
but not generated: the simulator skips what it could not send rather than bursting, so a
subject that cannot keep up shows as a growing backlog) and ``connections``.

Usage: ``python bench/_simfeed.py --symbols 100`` prints ``READY <sim port> <control port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from streamer.testing.sim import SimConfig, SimServer


class Control:
    """Rate control and counters over one running :class:`SimServer`."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.source = server.high_rate
        self.rate = 0.0
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0
        self._t0 = time.monotonic()
        self._gen0 = 0
        # The server started the generator at the configured rate: take it over.
        for task in list(getattr(server, "_tasks", [])):
            if getattr(task.get_coro(), "__qualname__", "") == "HighRateSource.run":
                task.cancel()

    def set_rate(self, rate: float) -> None:
        """Restart the generator at ``rate`` msg/s (its schedule and burst cap follow)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.rate = max(0.0, rate)
        self._t0 = time.monotonic()
        self._gen0 = self.source.generated
        if self.rate >= 1:
            self.source.rate = int(self.rate)
            self._task = asyncio.get_running_loop().create_task(self.source.run())

    async def watchdog(self) -> None:
        """Restart the generator if it died, so one simulator bug cannot stall a run.

        (Seen: ``HighRateSource`` keeps its round-robin cursor when a new client subscribes
        fewer streams than the previous one, and its task ends with an ``IndexError``.)
        """
        while True:
            await asyncio.sleep(0.1)
            task = self._task
            if task is None or not task.done() or task.cancelled():
                continue
            exc = task.exception()
            self.restarts += 1
            if self.restarts <= 3:
                print(f"high-rate generator died ({exc!r}); restarting", file=sys.stderr)
            self._task = asyncio.get_running_loop().create_task(self.source.run())

    def stats(self) -> dict[str, Any]:
        """Counters in the shape of ``_feed.Feed.stats``."""
        generated = self.source.generated
        due = int(self.rate * (time.monotonic() - self._t0))
        return {
            "rate": self.rate,
            "generated": generated,
            "backlog": max(0, due - (generated - self._gen0)),
            "connections": len(getattr(self.server, "_conns", ())),
            "stalled_ticks": self.source.backpressure,
            "generator_restarts": self.restarts,
            "time_ms": time.time_ns() // 1_000_000,
        }


async def _serve_control(control: Control, host: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            target = request.split(b" ", 2)[1].decode()
            parts = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path == "/_bench/rate":
                control.set_rate(float(query.get("value", control.rate)))
                status, body = 200, {"rate": control.rate}
            elif parts.path == "/_bench/stats":
                status, body = 200, control.stats()
            else:
                status, body = 404, {"error": f"unknown path {parts.path}"}
            data = json.dumps(body).encode()
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(data), data)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, 0)


async def run(symbols: int, seed: int, host: str) -> None:
    """Serve until cancelled."""
    config = SimConfig(
        seed=seed,
        host=host,
        high_rate=1,
        high_rate_symbols=symbols,
        # Books of every symbol sync at start-up instead of being paced by Binance's
        # 6000 weight per minute (measured separately: it is not what this run measures).
        weight_limit_spot=1_000_000_000,
    )
    async with SimServer(config) as server:
        control = Control(server)
        control_server = await _serve_control(control, host)
        port = control_server.sockets[0].getsockname()[1]
        print(f"READY {server.port} {port}", flush=True)
        async with control_server:
            await control.watchdog()


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="simulator in high-rate mode, rate-controlled")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.symbols, args.seed, args.host))


if __name__ == "__main__":
    main()
