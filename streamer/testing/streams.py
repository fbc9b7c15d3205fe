"""Stream-name grammar of the simulator (what ``/ws/<name>`` and SUBSCRIBE accept).

Spot: ``<s>@aggTrade``, ``<s>@depth`` (1000 ms), ``<s>@depth@100ms``,
``<s>@depth<5|10|20>[@100ms]``, ``<s>@kline_<interval>`` (incl. ``1s``), ``<s>@bookTicker``.
USD-M: ``<s>@aggTrade`` and ``<s>@kline_<interval>`` (route ``/market``);
``<s>@depth`` (250 ms), ``@depth@0ms|100ms|250ms|500ms``, ``@depth<N>[@100ms|@250ms|@500ms]``,
``<s>@bookTicker`` (route ``/public``). Symbols are lowercase in names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .market import SPOT_INTERVALS, USDM_INTERVALS

__all__ = ["StreamSpec", "parse_stream"]

Kind = Literal["aggTrade", "depth", "partial", "kline", "bookTicker"]

_NAME = re.compile(
    r"^(?P<sym>[a-z0-9_.-]{1,30})@(?:"
    r"(?P<agg>aggTrade)|(?P<book>bookTicker)|kline_(?P<interval>\w+)|"
    r"depth(?P<levels>5|10|20)?(?:@(?P<speed>\d+)ms)?)$"
)
_DIFF_SPEEDS = {"spot": (1000, {100, 1000}), "usdm": (250, {0, 100, 250, 500})}
_PARTIAL_SPEEDS = {"spot": (1000, {100, 1000}), "usdm": (250, {100, 250, 500})}


@dataclass(frozen=True)
class StreamSpec:
    """A parsed stream name."""

    name: str
    symbol: str  # uppercase
    kind: Kind
    speed_ms: int = 0
    levels: int = 0
    interval: str = ""

    @property
    def route(self) -> Literal["public", "market"]:
        """USD-M route that serves this stream."""
        return "public" if self.kind in ("depth", "partial", "bookTicker") else "market"


def parse_stream(name: str, market: str) -> StreamSpec | None:
    """Parse ``name`` for ``market`` (``"spot"``/``"usdm"``); ``None`` when it is not a valid
    stream name there (bad grammar, unknown interval, unsupported speed)."""
    m = _NAME.match(name)
    if m is None:
        return None
    sym = m["sym"].upper()
    if m["agg"]:
        return StreamSpec(name, sym, "aggTrade")
    if m["book"]:
        return StreamSpec(name, sym, "bookTicker")
    if m["interval"] is not None:
        intervals = SPOT_INTERVALS if market == "spot" else USDM_INTERVALS
        if m["interval"] not in intervals:
            return None
        return StreamSpec(name, sym, "kline", interval=m["interval"])
    table = _PARTIAL_SPEEDS if m["levels"] else _DIFF_SPEEDS
    default, allowed = table[market]
    speed = default if m["speed"] is None else int(m["speed"])
    if speed not in allowed or (m["speed"] is not None and m["speed"] != str(speed)):
        return None
    if m["levels"]:
        return StreamSpec(name, sym, "partial", speed_ms=speed, levels=int(m["levels"]))
    return StreamSpec(name, sym, "depth", speed_ms=speed)
