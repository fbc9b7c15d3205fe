"""Fault injection for the simulator: per run (:class:`FaultPlan`) or live (:class:`Faults`).

Live controls are thread-safe: tests may call them from any thread while the server runs in
its own loop. "Count" faults apply to the next ``count`` matching items and then stop;
"every" faults (from the plan / CLI) apply to every N-th matching item for the whole run.
Every injected fault increments a ``fault_*`` counter in ``sim.counters``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from streamer import Counters

from . import _wire as wire

__all__ = ["ConnectionFaults", "FaultPlan", "Faults", "RestFault"]

_json = msgspec.json.Encoder()


class FaultPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults applied for a whole run (the ``streamer sim`` fault flags).

    ``*_every`` = N acts on every N-th matching message (0 = off). Times are seconds.
    """

    close_every_s: float = 0.0
    close_after_messages: int = 0
    abrupt: bool = False
    drop_depth_every: int = 0
    drop_aggtrade_every: int = 0
    duplicate_every: int = 0
    reorder_every: int = 0
    malformed_every: int = 0
    stall_after_s: float = 0.0
    stall_for_s: float = 30.0
    rest_429_every: int = 0
    rest_5xx_every: int = 0
    slow_snapshot_s: float = 0.0
    shutdown_every_s: float = 0.0


class RestFault(msgspec.Struct):
    """One pending REST fault: answer ``status`` (0 = hang for ``delay_s`` and drop)."""

    status: int
    retry_after: int | None = None
    delay_s: float = 0.0
    path: str = ""


class Faults:
    """Live fault control of a running simulator (``sim.faults``)."""

    def __init__(self, plan: FaultPlan, schedule: Callable[[Callable[[], None]], None]) -> None:
        self.plan = plan
        self._lock = threading.Lock()
        self._schedule = schedule
        self._drop_agg: dict[str, int] = {}
        self._drop_depth: dict[str, int] = {}
        self._duplicate = 0
        self._reorder = 0
        self._malformed = 0
        self._rest: list[RestFault] = []
        self._slow_snapshot_s = plan.slow_snapshot_s
        self._slow_snapshot_count = -1  # -1 = unlimited while the delay is set
        self.stalled_until = 0.0
        self._seen: dict[str, int] = {}
        # Set by the server: actions that must run on its loop.
        self.on_close: Callable[[bool, str], None] = lambda abrupt, match: None
        self.on_shutdown: Callable[[float], None] = lambda grace: None
        self.on_close_after: Callable[[int, bool], None] = lambda n, abrupt: None

    # -- live controls ----------------------------------------------------------------------

    def close_connections(self, abrupt: bool = False, path_contains: str = "") -> None:
        """Close every open WebSocket connection now (TCP reset when ``abrupt``).

        ``path_contains`` limits it to connections whose request path contains the text.
        """
        self._schedule(lambda: self.on_close(abrupt, path_contains))

    def close_after_messages(self, count: int, abrupt: bool = False) -> None:
        """Close each currently open connection after it has sent ``count`` more messages."""
        self._schedule(lambda: self.on_close_after(count, abrupt))

    def drop_aggtrades(self, symbol: str, count: int = 1) -> None:
        """Do not stream the next ``count`` aggTrades of ``symbol`` (REST still serves them)."""
        with self._lock:
            self._drop_agg[symbol.upper()] = self._drop_agg.get(symbol.upper(), 0) + count

    def drop_depth(self, symbol: str, count: int = 1) -> None:
        """Do not stream the next ``count`` diff-depth events of ``symbol`` (a sequence gap)."""
        with self._lock:
            self._drop_depth[symbol.upper()] = self._drop_depth.get(symbol.upper(), 0) + count

    def duplicate(self, count: int = 1) -> None:
        """Send each of the next ``count`` data messages twice."""
        with self._lock:
            self._duplicate += count

    def reorder(self, count: int = 1) -> None:
        """Swap each of the next ``count`` data messages with the one after it (same stream)."""
        with self._lock:
            self._reorder += count

    def malformed_frames(self, count: int = 1) -> None:
        """Send an invalid-JSON text frame before each of the next ``count`` data messages."""
        with self._lock:
            self._malformed += count

    def stall(self, seconds: float) -> None:
        """Send nothing (no data, no pings) on any connection for ``seconds``; keep them open."""
        with self._lock:
            self.stalled_until = time.monotonic() + seconds

    def rest_error(
        self, status: int, count: int = 1, retry_after: int | None = None, path: str = ""
    ) -> None:
        """Answer the next ``count`` REST requests (whose path contains ``path``) with
        ``status`` (429, 418, 403, 5xx...) and a Binance error body; ``Retry-After`` if set."""
        with self._lock:
            self._rest.extend(RestFault(status, retry_after, 0.0, path) for _ in range(count))

    def rest_timeout(self, seconds: float, count: int = 1, path: str = "") -> None:
        """Hold the next ``count`` REST requests for ``seconds``, then drop the connection."""
        with self._lock:
            self._rest.extend(RestFault(0, None, seconds, path) for _ in range(count))

    def slow_snapshots(self, seconds: float, count: int = -1) -> None:
        """Delay depth snapshot responses by ``seconds`` (the next ``count``; -1 = until reset).

        The snapshot is taken when the request arrives, so it is stale when delivered.
        """
        with self._lock:
            self._slow_snapshot_s = seconds
            self._slow_snapshot_count = count

    def server_shutdown(self, grace_s: float = 0.2) -> None:
        """Send ``serverShutdown`` on every connection, then close them after ``grace_s``."""
        self._schedule(lambda: self.on_shutdown(grace_s))

    def clear(self) -> None:
        """Cancel every pending live fault (the run's :class:`FaultPlan` stays)."""
        with self._lock:
            self._drop_agg.clear()
            self._drop_depth.clear()
            self._duplicate = self._reorder = self._malformed = 0
            self._rest.clear()
            self._slow_snapshot_s = self.plan.slow_snapshot_s
            self._slow_snapshot_count = -1
            self.stalled_until = 0.0

    # -- checks used by the server (loop thread) --------------------------------------------

    def _every(self, key: str, n: int) -> bool:
        if n <= 0:
            return False
        seen = self._seen.get(key, 0) + 1
        self._seen[key] = seen
        return seen % n == 0

    def take_drop_aggtrade(self, symbol: str) -> bool:
        """True if this aggTrade of ``symbol`` must not be streamed."""
        if self._drop_agg:
            with self._lock:
                left = self._drop_agg.get(symbol, 0)
                if left:
                    self._drop_agg[symbol] = left - 1
                    return True
        return self._every("agg", self.plan.drop_aggtrade_every)

    def take_drop_depth(self, symbol: str) -> bool:
        """True if this diff-depth event of ``symbol`` must not be streamed."""
        if self._drop_depth:
            with self._lock:
                left = self._drop_depth.get(symbol, 0)
                if left:
                    self._drop_depth[symbol] = left - 1
                    return True
        return self._every("depth", self.plan.drop_depth_every)

    def take_message_fault(self) -> str:
        """``""``, ``"duplicate"``, ``"reorder"`` or ``"malformed"`` for the next data message."""
        if self._duplicate or self._reorder or self._malformed:
            with self._lock:
                for name in ("_duplicate", "_reorder", "_malformed"):
                    left = getattr(self, name)
                    if left:
                        setattr(self, name, left - 1)
                        return name[1:]
        plan = self.plan
        if not (plan.duplicate_every or plan.reorder_every or plan.malformed_every):
            return ""
        # Each cadence counts every message on its own; the first that fires wins.
        fired = [
            name
            for name, n in (
                ("duplicate", plan.duplicate_every),
                ("reorder", plan.reorder_every),
                ("malformed", plan.malformed_every),
            )
            if self._every(name, n)
        ]
        return fired[0] if fired else ""

    def take_rest_fault(self, path: str) -> RestFault | None:
        """The fault for this REST request, if any."""
        if self._rest:
            with self._lock:
                for i, fault in enumerate(self._rest):
                    if fault.path in path:
                        del self._rest[i]
                        return fault
        if self._every("r429", self.plan.rest_429_every):
            return RestFault(429, 1)
        if self._every("r5xx", self.plan.rest_5xx_every):
            return RestFault(503)
        return None

    def take_snapshot_delay(self) -> float:
        """Seconds to hold this depth snapshot response."""
        with self._lock:
            if self._slow_snapshot_s <= 0 or self._slow_snapshot_count == 0:
                return 0.0
            if self._slow_snapshot_count > 0:
                self._slow_snapshot_count -= 1
            return self._slow_snapshot_s

    def stalled(self) -> bool:
        """True while a stall is in force."""
        return self.stalled_until > time.monotonic()


class _Connections(Protocol):
    """What :class:`ConnectionFaults` needs of the simulator's transport."""

    conns: set[Any]
    loop: asyncio.AbstractEventLoop | None

    def close(self, conn: Any, abrupt: bool, code: int = 1000, reason: str = "") -> None: ...


class ConnectionFaults:
    """What the connection faults do to the open WebSocket connections: close them (all or
    by path, now or after N more messages), announce a server shutdown, and run the
    :class:`FaultPlan`'s periodic ones. Wired to :class:`Faults`' live controls."""

    def __init__(
        self,
        faults: Faults,
        connections: _Connections,
        counters: Counters,
        now_ms: Callable[[], int],
    ) -> None:
        self.faults = faults
        self.connections = connections
        self.counters = counters
        self.now_ms = now_ms
        faults.on_close = self.close_matching
        faults.on_shutdown = self.shutdown_all
        faults.on_close_after = self.close_after

    def close_matching(self, abrupt: bool, match: str) -> None:
        """Close every connection whose request path contains ``match``."""
        for conn in list(self.connections.conns):
            if match in conn.path:
                self.counters.incr("fault_connections_closed")
                self.connections.close(conn, abrupt, 1000, "closed by simulator fault")

    def close_after(self, count: int, abrupt: bool) -> None:
        """Close each open connection after it has sent ``count`` more messages."""
        for conn in list(self.connections.conns):
            conn.close_after = conn.sent + count
            conn.close_abrupt = abrupt

    def shutdown_all(self, grace_s: float) -> None:
        """Send Binance's ``serverShutdown`` event, then close every connection (1001)."""
        now = self.now_ms()
        payload = _json.encode({"e": "serverShutdown", "E": now})
        wrapped = b'{"stream":"!serverShutdown","data":' + payload + b"}"
        conns = [c for c in self.connections.conns if not c.closing]
        for conn in conns:
            conn.transport.write(wire.frame(wrapped if conn.combined else payload))
        self.counters.incr("server_shutdowns")
        loop = self.connections.loop
        assert loop is not None

        def _later() -> None:
            for conn in conns:
                self.connections.close(conn, False, 1001, "server shutdown")

        loop.call_later(grace_s, _later)

    async def run_plan(self, shutdown_grace_s: float) -> None:
        """Forever: the plan's periodic closes and shutdowns, and its one stall."""
        plan = self.faults.plan
        start = time.monotonic()
        stall_done = False
        next_close = start + plan.close_every_s if plan.close_every_s else math.inf
        next_shutdown = start + plan.shutdown_every_s if plan.shutdown_every_s else math.inf
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now >= next_close:
                next_close += plan.close_every_s
                self.close_matching(plan.abrupt, "")
            if now >= next_shutdown:
                next_shutdown += plan.shutdown_every_s
                self.shutdown_all(shutdown_grace_s)
            if plan.stall_after_s and not stall_done and now - start >= plan.stall_after_s:
                stall_done = True
                self.counters.incr("fault_stalls")
                self.faults.stall(plan.stall_for_s)
