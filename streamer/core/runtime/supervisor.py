"""The supervisor: spawns, watches and restarts the workers and writers of a run.

Start-up: every writer is spawned first; a worker is spawned once every writer of its
pipeline has reported ``Ready`` (its sink's holdings), so its ``resume`` marks are known.
A sink may run as several writers (``sink_writers``; children ``sink.<name>#<i>``), each
reporting the holdings of the symbols it owns; the sink's marks are their union, and the
status merges their counters under the sink.

Restarts: a child that dies is restarted after a capped exponential backoff (0.5 s,
doubling, at most ``runtime.restart_backoff_max``; the backoff resets once a child has
lived longer than that cap). When a writer dies, the workers feeding it are killed too and
restarted after it is ready again: whatever the dead writer held in memory is then
backfilled from its sink's holdings on disk. One log line per restart.

Shutdown (first SIGINT/SIGTERM, or the ``duration`` elapsed): workers are told to stop
reading and send what they hold; once they have exited, writers drain, flush and close.
Whatever is still alive after ``runtime.shutdown_timeout`` is killed and the exit code is
1. A second signal kills every child at once (exit code 130).

Sink paths: before anything is spawned, every sink's ``check`` runs and the directories
the sinks ``claims`` are locked (:mod:`.sinklock`) for the whole run; a path another
collector holds refuses the start with ``ValueError``. A writer whose sink cannot open
(exit code ``EXIT_SINK_FAILED``) is not restarted: the run stops with exit code 1 and one
line naming the sink. Rows a writer reports lost at close (``rows_lost_at_close``) also
make the exit code 1, with their count.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteStream

from ..api import StreamKey
from ..config import Config, resolve_state_dir, validate_components
from ..logs import RateLimitedLog
from .bootstrap import ChildSpec, PluginSelection
from .channels import (
    FrameReader,
    Hello,
    Ready,
    Status,
    Stop,
    decode_control,
    encode_control,
    make_socket_dir,
)
from .sinklock import PathLocks, check_sinks
from .source import source_main
from .status_file import merge_counters, write_status
from .worker import worker_main
from .writer import EXIT_SINK_FAILED, writer_main

log = logging.getLogger("streamer.supervisor")

_TICK = 0.05
_FIRST_BACKOFF = 0.5


@dataclass
class PipelinePlan:
    """A pipeline after symbol resolution: who it is and how its symbols are split."""

    index: int
    name: str
    exchange: str
    market: str
    symbols: list[str]
    groups: list[list[str]]
    #: A storage node's source (``streamer store``, index -1): one source worker feeding
    #: ``sinks``, instead of collector workers feeding the pipeline's sinks.
    source: bool = False
    sinks: list[str] = field(default_factory=list)


@dataclass
class _Child:
    name: str
    kind: str  # "worker" | "writer"
    pipeline: int = -1
    symbols: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)  # worker: sinks it feeds
    sink: str = ""  # writer: its sink instance
    writer: int = 0  # writer: which of the sink's writers (owns writer_of(symbol) == writer)
    writers: int = 1  # writer: how many writers the sink runs as
    process: Any = None
    pid: int | None = None
    incarnation: int = 0
    restarts: int = 0
    failures: int = 0
    last_exit_code: int | None = None
    started_at: float = 0.0
    next_start: float | None = 0.0
    conn: ByteStream | None = None
    #: Set when the current incarnation's control connection has been read to its end.
    conn_done: Any = None
    ready: bool = False
    stop_wanted: bool = False
    killed_for: str = ""
    counters: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None


class Supervisor:
    """Runs one configuration until stopped; :meth:`run` returns the exit code."""

    def __init__(
        self,
        config: Config,
        plugins: PluginSelection,
        plans: list[PipelinePlan],
        *,
        sink_types: dict[str, str],
        sink_writers: dict[str, int] | None = None,
        log_level: int = logging.INFO,
        duration: float | None = None,
        on_status: Callable[[dict], None] | None = None,
    ) -> None:
        self.config = config
        self.on_status = on_status
        self.runtime = config.runtime
        self.plugins = plugins
        self.plans = plans
        self.sink_types = sink_types
        self.log_level = log_level
        self.duration = duration
        self._ctx = multiprocessing.get_context("spawn")
        self._children: dict[str, _Child] = {}
        #: Per writer (child name): the last key it holds per stream (its holdings, then
        #: its high-water marks); a sink's marks are the union over its writers.
        self._marks: dict[str, dict[StreamKey, int]] = {}
        #: Writer processes per sink instance (1 unless partitioned).
        self.sink_writers = {name: max(1, (sink_writers or {}).get(name, 1)) for name in sink_types}
        self._stopping = False
        self._force = False
        self._wake = anyio.Event()
        self._state = "running"
        self._exit_code: int | None = None
        self._started_wall = time.time_ns() // 1_000_000
        self._dir = ""
        self._sink_paths: dict[str, list[str]] = {}
        # Resolved once (``streamer run`` already did; library callers may not have).
        self.state_dir = str(resolve_state_dir(None, config))
        self._status_log = RateLimitedLog(log, interval=60.0)
        self._status_errors = 0
        self._status_failing = False
        self._locks = PathLocks(self.state_dir)
        #: Writers whose sink could not open (the run stops; they are not restarted).
        self._failed: list[_Child] = []
        used = {s for p in config.pipelines for s in p.sinks}
        used |= {s for plan in plans for s in plan.sinks}
        for name in sorted(used):
            n = self.sink_writers.get(name, 1)
            for i in range(n):
                self._add(
                    _Child(
                        name=writer_name(name, i, n), kind="writer", sink=name, writer=i, writers=n
                    )
                )
        for plan in plans:
            sinks = list(plan.sinks if plan.source else config.pipelines[plan.index].sinks)
            for i, group in enumerate(plan.groups):
                self._add(
                    _Child(
                        name=f"{plan.name}.source" if plan.source else f"{plan.name}.worker{i}",
                        kind="worker",
                        pipeline=plan.index,
                        symbols=group,
                        sinks=sinks,
                    )
                )

    def _add(self, child: _Child) -> None:
        self._children[child.name] = child

    @property
    def children(self) -> list[_Child]:
        return list(self._children.values())

    def _writers_of(self, sink: str) -> list[_Child]:
        return [c for c in self._children.values() if c.kind == "writer" and c.sink == sink]

    def _marks_of(self, sink: str) -> dict[StreamKey, int]:
        """What the sink holds per stream: the union of its writers' marks (each owns its
        own symbols, so no stream appears twice)."""
        merged: dict[StreamKey, int] = {}
        for writer in self._writers_of(sink):
            merged.update(self._marks.get(writer.name, {}))
        return merged

    # -- spawning ------------------------------------------------------------------------
    def _resume_for(self, child: _Child) -> dict[StreamKey, int]:
        plan = next(p for p in self.plans if p.index == child.pipeline)
        if plan.source:
            return {}  # the source resumes from its own acknowledgements
        wanted = set(child.symbols)
        resume: dict[StreamKey, int] = {}
        for sink in child.sinks:
            for key, value in self._marks_of(sink).items():
                if key.symbol not in wanted:
                    continue
                if plan.exchange and (key.exchange, key.market) != (plan.exchange, plan.market):
                    continue
                resume[key] = min(resume.get(key, value), value)
        return resume

    def _spawn(self, child: _Child) -> None:
        child.incarnation += 1
        child.ready = False
        child.stop_wanted = False
        child.counters = []
        child.info = {}
        if child.kind == "writer":
            paths = {child.sink: self._sink_paths[child.sink]}
            target = writer_main
        else:
            paths = {s: self._sink_paths[s] for s in child.sinks}
            target = source_main if child.pipeline < 0 else worker_main
        spec = ChildSpec(
            kind=child.kind,
            child=child.name,
            incarnation=child.incarnation,
            plugins=self.plugins,
            config=self.config,
            control_path=os.path.join(self._dir, "ctl.sock"),
            log_level=self.log_level,
            sink_paths=paths,
            pipeline_index=child.pipeline,
            symbols=child.symbols,
            resume=self._resume_for(child) if child.kind == "worker" else {},
            sink=child.sink,
            writer=child.writer,
            writers=child.writers,
        )
        process = self._ctx.Process(target=target, args=(spec,), name=child.name, daemon=True)
        process.start()
        child.process = process
        child.pid = process.pid
        child.started_at = time.monotonic()
        child.next_start = None

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.alive or child.next_start is None or now < child.next_start:
                continue
            if child.kind == "worker" and not all(
                w.ready for s in child.sinks for w in self._writers_of(s)
            ):
                continue  # its writers are (re)starting; resume marks come from them
            self._spawn(child)

    def _reap(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None or process.exitcode is None:
                continue
            code = process.exitcode
            process.close()
            child.process = None
            child.conn = None
            child.ready = False
            child.last_exit_code = code
            if child.kind == "writer" and code == EXIT_SINK_FAILED:
                self._sink_failed(child)
                continue
            if self._stopping:
                continue
            child.restarts += 1
            if child.killed_for:
                log.warning(
                    "%s (pid %s) restarts after writer %s restarted (restart %d)",
                    child.name,
                    child.pid,
                    child.killed_for,
                    child.restarts,
                )
                child.killed_for = ""
                child.next_start = now
                continue
            cap = self.runtime.restart_backoff_max
            if now - child.started_at > max(cap, 1.0):
                child.failures = 0
            child.failures += 1
            delay = min(cap, _FIRST_BACKOFF * 2 ** (child.failures - 1))
            log.warning(
                "%s (pid %s) exited with code %s after %.1f s; restarting in %.1f s (restart %d)",
                child.name,
                child.pid,
                code,
                now - child.started_at,
                delay,
                child.restarts,
            )
            child.next_start = now + delay
            if child.kind == "writer":
                for other in self.children:
                    if other.kind == "worker" and child.sink in other.sinks and other.alive:
                        other.killed_for = child.name
                        other.process.kill()

    def _sink_failed(self, child: _Child) -> None:
        child.next_start = None
        if child not in self._failed:
            self._failed.append(child)
        for other in self.children:
            if other.kind == "worker" and child.sink in other.sinks:
                other.next_start = None  # nothing to feed: neither start nor restart
                if other.alive:
                    other.process.kill()
        self.request_stop(f"{child.name} cannot open its sink")

    def _claim_sink_paths(self) -> None:
        """Check every sink and lock the paths of those in use (raises ``ValueError``)."""
        registry = self.plugins.registry()
        _, sinks = validate_components(self.config, registry)
        claims = check_sinks(sinks, registry)
        used = {c.sink for c in self.children if c.kind == "writer"}
        self._locks.acquire({name: paths for name, paths in claims.items() if name in used})

    def _final_code(self, code: int) -> int:
        """The exit code after shutdown: 1 when a sink failed to open or lost rows."""
        for child in self._failed:
            reason = child.info.get("fatal") or f"its writer exited with code {EXIT_SINK_FAILED}"
            log.error("sinks.%s: %s; run stopped", child.sink, reason)
        lost: dict[str, int] = {}
        for c in self.children:
            if c.kind == "writer":
                n = sum(row[3] for row in c.counters if row[0] == "rows_lost_at_close")
                if n:
                    lost[c.sink] = lost.get(c.sink, 0) + n
        if lost:
            log.error(
                "%d rows could not be written before exit (%s); their ranges are recorded as "
                "gap markers where the sink could, and the next run backfills what it can",
                sum(lost.values()),
                ", ".join(f"sinks.{name}: {n}" for name, n in sorted(lost.items())),
            )
        if code == 0 and (self._failed or lost):
            return 1
        if code == 0:
            log.info("stopped cleanly")
        return code

    # -- control connections -----------------------------------------------------------
    async def _serve_control(self, listener) -> None:
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: ByteStream) -> None:
        reader = FrameReader(stream)
        async with stream:
            payload = await reader.receive()
            if payload is None:
                return
            hello = decode_control(payload)
            child = self._children.get(hello.child) if isinstance(hello, Hello) else None
            if child is None or hello.incarnation != child.incarnation:
                return  # a stale incarnation that outlived its restart
            child.conn = stream
            done = child.conn_done = anyio.Event()
            try:
                await self._follow(child, hello, reader)
            finally:
                done.set()

    async def _follow(self, child: _Child, hello: Hello, reader: FrameReader) -> None:
        if child.stop_wanted:
            await self._send_stop(child)
        while True:
            payload = await reader.receive()
            if payload is None or hello.incarnation != child.incarnation:
                return
            message = decode_control(payload)
            if isinstance(message, Ready):
                self._marks[child.name] = _unmark(message.holdings)
                child.ready = True
                self._wake.set()
            elif isinstance(message, Status):
                child.counters = message.counters
                child.info = message.info
                if child.kind == "writer" and message.high_water:
                    self._marks.setdefault(child.name, {}).update(_unmark(message.high_water))

    async def _send_stop(self, child: _Child) -> None:
        child.stop_wanted = True
        if child.conn is not None:
            # If it died meanwhile, the reaper sees it.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await child.conn.send(encode_control(Stop()))

    # -- signals and status --------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Begin a graceful shutdown (a second call forces it)."""
        if self._stopping:
            log.warning("%s again: forcing exit", reason)
            self._force = True
        else:
            log.info("%s: stopping (draining queues; send again to force)", reason)
            self._stopping = True
            self._state = "stopping"
        self._wake.set()

    async def _signals(self) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
            with receiver as signals:
                async for signum in signals:
                    self.request_stop(signal.Signals(signum).name)
        except (ValueError, RuntimeError):
            return  # not the main thread: only duration ends the run

    def status(self) -> dict[str, Any]:
        """The merged status document (see :mod:`streamer.core.runtime.status_file`)."""
        now = time.monotonic()
        pipelines = {}
        for plan in self.plans:
            workers = [c for c in self.children if c.kind == "worker" and c.pipeline == plan.index]
            pipelines[plan.name] = {
                "exchange": plan.exchange,
                "market": plan.market,
                "symbols": plan.symbols,
                **merge_counters(c.counters for c in workers),
            }
        sinks = {}
        for sink in sorted({c.sink for c in self.children if c.kind == "writer"}):
            writers = self._writers_of(sink)
            marks = self._marks_of(sink)
            merged = merge_counters(c.counters for c in writers)
            if len(writers) > 1:
                _oldest_flush(merged, writers)
            sinks[sink] = {
                "type": self.sink_types.get(sink, ""),
                "writers": len(writers),
                **merged,
                "high_water": {
                    f"{k.exchange}/{k.market}/{k.symbol}/{k.stream}": v
                    for k, v in sorted(marks.items())
                },
            }
        children = {
            c.name: {
                "kind": c.kind,
                **({"sink": c.sink} if c.kind == "writer" else {}),
                "pid": c.pid,
                "alive": c.alive,
                "incarnation": c.incarnation,
                "restarts": c.restarts,
                "last_exit_code": c.last_exit_code,
                "uptime": round(now - c.started_at, 3) if c.alive else 0.0,
                "info": c.info,
            }
            for c in self.children
        }
        return {
            "pid": os.getpid(),
            "started_at": self._started_wall,
            "updated_at": time.time_ns() // 1_000_000,
            "state": self._state,
            "exit_code": self._exit_code,
            "pipelines": pipelines,
            "sinks": sinks,
            "children": children,
            # Failed writes of this document (an unwritable state dir): a gap in status.
            "status_write_errors": self._status_errors,
        }

    def _publish(self) -> None:
        doc = self.status()
        try:
            write_status(self.state_dir, doc)
        except OSError as exc:
            # Retried every status_interval, logged at most once a minute.
            self._status_errors += 1
            self._status_failing = True
            self._status_log.error(
                "status_write", "cannot write status to %s: %s", self.state_dir, exc
            )
        else:
            if self._status_failing:
                self._status_failing = False
                log.warning(
                    "status written to %s again after %d failed attempt(s)",
                    self.state_dir,
                    self._status_errors,
                )
        if self.on_status is not None:
            self.on_status(doc)

    async def _status_loop(self) -> None:
        while True:
            self._locks.refresh()
            self._publish()
            await anyio.sleep(self.runtime.status_interval)

    # -- main ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Supervise until stopped; returns 0 after a clean drain.

        Raises ``ValueError`` before spawning anything when a sink's check fails or its
        path is locked by another collector."""
        self._claim_sink_paths()
        try:
            return await self._run()
        finally:
            self._locks.release()

    async def _run(self) -> int:
        # A short private directory: Unix socket paths are limited to about 100 bytes.
        self._dir = make_socket_dir()
        for i, name in enumerate(sorted(self.sink_types)):
            n = self.sink_writers.get(name, 1)
            self._sink_paths[name] = [
                os.path.join(self._dir, f"sink{i}.sock" if n == 1 else f"sink{i}-{j}.sock")
                for j in range(n)
            ]
        listener = await anyio.create_unix_listener(os.path.join(self._dir, "ctl.sock"))
        # ``duration`` counts from when every worker is up (spawning takes a while), but
        # gives up waiting for that after a generous start-up allowance.
        deadline = None
        latest = None if self.duration is None else time.monotonic() + self.duration + 30
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_control, listener)
                tg.start_soon(self._signals)
                tg.start_soon(self._status_loop)
                tg.start_soon(_metrics_endpoint, self.status, self.runtime.metrics_port)
                log.info(
                    "started: %d worker(s), %d writer(s); status in %s",
                    sum(c.kind == "worker" for c in self.children),
                    sum(c.kind == "writer" for c in self.children),
                    os.path.join(self.state_dir, "status.json"),
                )
                while not self._stopping:
                    self._reap()
                    self._start_due()
                    if deadline is None and latest is not None and self._workers_up():
                        deadline = time.monotonic() + self.duration
                    if latest is not None and time.monotonic() >= min(deadline or latest, latest):
                        self.request_stop("duration elapsed")
                        break
                    with anyio.move_on_after(_TICK):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                code = self._final_code(await self._shutdown())
                tg.cancel_scope.cancel()
        finally:
            for child in self.children:
                if child.alive:
                    child.process.kill()
                    child.process.join(5)
            shutil.rmtree(self._dir, ignore_errors=True)
        self._exit_code = code
        self._state = "stopped"
        self._publish()
        return code

    def _workers_up(self) -> bool:
        return all(c.conn is not None for c in self.children if c.kind == "worker")

    async def _shutdown(self) -> int:
        deadline = time.monotonic() + self.runtime.shutdown_timeout
        for kind in ("worker", "writer"):
            group = [c for c in self.children if c.kind == kind]
            for child in group:
                child.next_start = None
                if child.alive:
                    await self._send_stop(child)
            while True:
                self._reap()
                alive = [c for c in group if c.alive]
                if not alive:
                    await self._final_reports(group)
                    break
                if self._force:
                    return self._kill_all("forced exit", 130)
                if time.monotonic() >= deadline:
                    names = ", ".join(c.name for c in alive)
                    return self._kill_all(
                        f"shutdown timed out after {self.runtime.shutdown_timeout:g} s "
                        f"waiting for {names}",
                        1,
                    )
                with anyio.move_on_after(_TICK):
                    await self._wake.wait()
                self._wake = anyio.Event()
        return 0

    async def _final_reports(self, group: list[_Child]) -> None:
        # A child's last status may still be in its socket after it exited.
        with anyio.move_on_after(2):
            for child in group:
                if child.conn_done is not None:
                    await child.conn_done.wait()

    def _kill_all(self, reason: str, code: int) -> int:
        log.error("%s: killing remaining children", reason)
        for child in self.children:
            if child.alive:
                child.process.kill()
                child.process.join(5)
                child.last_exit_code = child.process.exitcode
                child.process.close()
                child.process = None
        return code


async def _metrics_endpoint(source, port: int) -> None:
    # Prometheus /metrics from the live status (streamer.core.ops); off when port is 0.
    if port <= 0:
        return
    from ..ops.prometheus import metrics_endpoint

    await metrics_endpoint(source, port, log)


def writer_name(sink: str, writer: int, writers: int) -> str:
    """The child name of a sink's writer: ``sink.<name>``, or ``sink.<name>#<i>`` when the
    sink runs as several writers."""
    return f"sink.{sink}" if writers == 1 else f"sink.{sink}#{writer}"


def _oldest_flush(merged: dict[str, Any], writers: list[_Child]) -> None:
    """A sink of several writers last flushed when its slowest writer did: one stuck
    writer must show as a stalled sink, not hide behind the others."""
    times = [
        row[3]
        for c in writers
        for row in c.counters
        if row[0] == "last_flush_time" and not row[1] and not row[2]
    ]
    if len(times) == len(writers):
        merged["process"]["last_flush_time"] = min(times)
        merged["totals"]["last_flush_time"] = min(times)


def _unmark(rows) -> dict[StreamKey, int]:
    return {StreamKey(e, m, s, t): v for e, m, s, t, v in rows}
