"""Counters every component updates and the runtime publishes as status.

A counter is identified by ``(name, symbol, stream)``; ``symbol`` and ``stream`` are empty
for process-wide counters. Incrementing is a dict update, cheap enough to do per message;
logging is not (see :mod:`streamer.core.logs`).

The same symbol can trade on several markets (``BTCUSDT`` on spot and on USD-M futures). A
process that sees records of several markets (a sink writer) keys its per-stream counters
by :func:`market_symbol`, which the status merge splits back into ``(market, symbol)``.
"""

from __future__ import annotations

from collections import defaultdict

CounterKey = tuple[str, str, str]

#: First character of a market-qualified symbol (see :func:`market_symbol`).
MARKET_MARK = "@"


def market_symbol(exchange: str, market: str, symbol: str) -> str:
    """``symbol`` qualified by its exchange and market: ``"@binance/spot/BTCUSDT"``.

    Use it as the ``symbol`` of a counter when one process counts the same symbol of
    several markets; :func:`split_market_symbol` undoes it.
    """
    return f"{MARKET_MARK}{exchange}/{market}/{symbol}"


def split_market_symbol(symbol: str) -> tuple[str, str] | None:
    """``("binance/spot", "BTCUSDT")`` for a :func:`market_symbol`, ``None`` for a bare one."""
    if not symbol.startswith(MARKET_MARK):
        return None
    parts = symbol[1:].split("/", 2)
    if len(parts) != 3:
        return None
    return f"{parts[0]}/{parts[1]}", parts[2]


class Counters:
    """A bag of integer counters and gauges owned by one process.

    Counters only grow (``incr``); gauges are overwritten (``set``). :meth:`snapshot`
    returns a plain dict suitable for msgspec encoding and merging in the supervisor.
    """

    __slots__ = ("_gauges", "_values")

    def __init__(self) -> None:
        self._values: defaultdict[CounterKey, int] = defaultdict(int)
        self._gauges: dict[CounterKey, int] = {}

    def incr(self, name: str, symbol: str = "", stream: str = "", n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` for ``(symbol, stream)``."""
        self._values[(name, symbol, stream)] += n

    def set(self, name: str, value: int, symbol: str = "", stream: str = "") -> None:
        """Set the gauge ``name`` for ``(symbol, stream)`` to ``value``."""
        self._gauges[(name, symbol, stream)] = value

    def get(self, name: str, symbol: str = "", stream: str = "") -> int:
        """Current value of a counter or gauge (0 when never touched)."""
        key = (name, symbol, stream)
        if key in self._gauges:
            return self._gauges[key]
        return self._values.get(key, 0)

    def total(self, name: str) -> int:
        """Sum of counter ``name`` over every symbol and stream."""
        return sum(v for (n, _, _), v in self._values.items() if n == name)

    def snapshot(self) -> dict[CounterKey, int]:
        """A copy of every counter and gauge."""
        out = dict(self._values)
        out.update(self._gauges)
        return out
