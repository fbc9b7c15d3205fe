"""What every child process (collector worker, sink writer) does beside its own work.

A child keeps one control connection to the supervisor: it publishes its status there
every ``runtime.status_interval`` seconds and stops when told to, when SIGTERM arrives, or
when the connection drops (the supervisor is gone; running orphaned would only lose data
later).

When the supervisor was killed (``kill -9``), each child logs one line, finishes what it
holds (workers send their pending records, writers drain and flush them) and exits 0
without a traceback; on its way out it removes its sockets and, the last one out, the
socket folder (:func:`leave_socket_dir`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal

import anyio
from anyio.abc import ByteStream

from ..config import RuntimeConfig
from .bootstrap import ChildSpec, paths_of
from .channels import Control, FrameReader, Status, Stop, decode_control, encode_control

#: What a send on a connection whose peer died raises.
BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


#: Allocations (net, of container objects) between young-generation collections. The data
#: path makes no reference cycles (records, rows and frames are freed by reference
#: counting), so the default 700 only spends time walking batches that are about to be
#: freed anyway: about a fifth of a worker's or writer's CPU on the benchmark mix.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Once start-up is over: collect, move every object alive now out of the collector's
    sight for good (``gc.freeze``: plugins, modules, config live for the whole run), and
    collect the young generation less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


class SupervisorGone(Exception):
    """The supervisor died before this child could reach it."""


def supervisor_gone() -> bool:
    """True when this process was started by ``multiprocessing`` and its parent is dead."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def leave_socket_dir(spec: ChildSpec) -> None:
    """If the supervisor is gone, remove the sockets it and this child own in the socket
    folder, then the folder itself once empty (so the last child out removes it)."""
    if not supervisor_gone():
        return
    owned = [spec.control_path]
    if spec.kind == "writer" and spec.sink in spec.sink_paths:
        paths = paths_of(spec.sink_paths[spec.sink])
        if spec.writer < len(paths):
            owned.append(paths[spec.writer])
    for path in owned:
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(spec.control_path))


class ChildLoop:
    """Base of :class:`~.worker.Worker` and :class:`~.writer.Writer`: stop and status plumbing.

    Subclasses set ``runtime``, ``logger`` and ``_stop`` and implement :meth:`_status`.
    """

    runtime: RuntimeConfig
    logger: logging.Logger
    _stop: anyio.Event
    _orphaned = False

    def _status(self, final: bool = False) -> Status:
        raise NotImplementedError

    def _lost(self) -> None:
        """The control connection is gone: say so once and stop."""
        if not self._orphaned:
            self._orphaned = True
            if supervisor_gone():
                self.logger.warning("the supervisor is gone; finishing what I hold and exiting")
            else:
                self.logger.warning("control connection lost; stopping")
        self._stop.set()

    _ctl_lock: anyio.Lock | None = None

    async def _tell(self, ctl: ByteStream, message: Control) -> bool:
        """Send on the control connection; False (and stop) when it is broken.

        The send is shielded from cancellation and serialised: anyio waits for a Unix
        socket to become writable with a future completed from a writer callback, and a
        send cancelled just as the socket turns writable leaves that callback completing
        a cancelled future (asyncio then logs an ``InvalidStateError`` traceback, seen at
        shutdown after heavy runs). The lock keeps the final status from interleaving
        with a periodic one.
        """
        if self._orphaned:
            return False
        if self._ctl_lock is None:
            self._ctl_lock = anyio.Lock()
        try:
            with anyio.CancelScope(shield=True):
                async with self._ctl_lock:
                    await ctl.send(encode_control(message))
        except BROKEN:
            self._lost()
            return False
        return True

    async def _send_final(self, ctl: ByteStream) -> None:
        """The last status, if the supervisor is still there to read it."""
        await self._tell(ctl, self._status(final=True))

    async def _control(self, ctl: ByteStream) -> None:
        reader = FrameReader(ctl)
        while True:
            payload = await reader.receive()
            if payload is None:
                self._lost()
                return
            if isinstance(decode_control(payload), Stop):
                self._stop.set()

    async def _publish(self, ctl: ByteStream) -> None:
        while True:
            await anyio.sleep(self.runtime.status_interval)
            if not await self._tell(ctl, self._status()):
                return

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                self._stop.set()
