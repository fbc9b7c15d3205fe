"""Logging helpers that keep the hot path free of log calls.

A malformed frame or a dropped message may happen thousands of times a second; logging
each costs more than the work. :class:`RateLimitedLog` logs the first occurrence of a kind
and then at most once per ``interval`` seconds with the count suppressed in between.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Log at most once per ``interval`` seconds per kind, reporting what was suppressed."""

    __slots__ = ("_interval", "_logger", "_state")

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._state: dict[str, tuple[float, int]] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` under ``kind`` unless one was logged recently.

        Returns True when the message was emitted. ``kind`` is a short stable key such as
        ``"malformed_frame"``; it is included in the output so logs can be grepped.
        """
        now = time.monotonic()
        last, suppressed = self._state.get(kind, (-1e18, 0))
        if now - last < self._interval:
            self._state[kind] = (last, suppressed + 1)
            return False
        self._state[kind] = (now, 0)
        if suppressed:
            msg = f"{msg} ({suppressed} similar suppressed)"
        self._logger.log(level, "[%s] " + msg, kind, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """Shorthand for :meth:`log` at WARNING level."""
        return self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: object) -> bool:
        """Shorthand for :meth:`log` at ERROR level."""
        return self.log(logging.ERROR, kind, msg, *args)
