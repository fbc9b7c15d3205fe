"""What every child process (collector worker, sink writer) does beside its own work.

A child keeps one control connection to the supervisor: it publishes its status there
every ``runtime.status_interval`` seconds and stops when told to, when SIGTERM arrives, or
when the connection drops (the supervisor is gone; running orphaned would only lose data
later).
"""

from __future__ import annotations

import logging
import signal

import anyio
from anyio.abc import ByteStream

from ..config import RuntimeConfig
from .channels import FrameReader, Status, Stop, decode_control, encode_control


class ChildLoop:
    """Base of :class:`~.worker.Worker` and :class:`~.writer.Writer`: stop and status plumbing.

    Subclasses set ``runtime``, ``logger`` and ``_stop`` and implement :meth:`_status`.
    """

    runtime: RuntimeConfig
    logger: logging.Logger
    _stop: anyio.Event

    def _status(self, final: bool = False) -> Status:
        raise NotImplementedError

    async def _control(self, ctl: ByteStream) -> None:
        reader = FrameReader(ctl)
        while True:
            payload = await reader.receive()
            if payload is None:
                self.logger.warning("control connection lost; stopping")
                self._stop.set()
                return
            if isinstance(decode_control(payload), Stop):
                self._stop.set()

    async def _publish(self, ctl: ByteStream) -> None:
        while True:
            await anyio.sleep(self.runtime.status_interval)
            await ctl.send(encode_control(self._status()))

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                self._stop.set()
