"""Units: human-friendly durations used in configuration (``"100ms"``, ``"1s"``, ``"10m"``),
sizes in bytes (``"64MB"``) and kline interval arithmetic (``"1m"``, ``"1h"``, ``"1M"``)."""

from __future__ import annotations

import math
import re
from calendar import monthrange
from datetime import UTC, datetime

_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: The type of a duration option: a string such as ``"250ms"`` or ``"1h"``, or a number of
#: seconds (``0.25``). Read it with :func:`parse_duration` / :func:`check_duration`.
Duration = str | float

#: Longest duration accepted (ten years): beyond it, clocks and date arithmetic overflow.
MAX_DURATION = 10 * 365 * 86400.0


def _show(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def parse_duration(text: str | float | int, *, positive: bool = False) -> float:
    """Seconds in ``text``: a number of seconds or a string such as ``"250ms"``, ``"1m"``.

    Accepts ``0 <= seconds <= MAX_DURATION`` (``0 < seconds`` with ``positive=True``).
    Raises ``ValueError`` saying why otherwise: not a duration, ``nan``/``inf``, negative,
    zero where a positive duration is required, or longer than ten years.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"invalid duration {_show(text)}: use a number of seconds or e.g. '1s'")
    if isinstance(text, str):
        match = _DURATION.match(text)
        if not match and _DURATION.match(text.strip().removeprefix("-")):
            raise ValueError(f"invalid duration {_show(text)}: must not be negative")
        if not match:
            raise ValueError(
                f"invalid duration {_show(text)}: use a number of seconds or e.g. "
                "'100ms', '1s', '10m', '1h'"
            )
        seconds = float(match["value"]) * _SECONDS[match["unit"]]
    else:
        try:
            seconds = float(text)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if not math.isfinite(seconds):
            raise ValueError(f"invalid duration {_show(text)}: must be a finite number of seconds")
        if seconds < 0:
            raise ValueError(f"invalid duration {_show(text)}: must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {_show(text)}: longer than ten years")
    if positive and seconds <= 0:
        raise ValueError(f"invalid duration {_show(text)}: must be greater than 0")
    return seconds


def check_duration(name: str, value: str | float | int, *, positive: bool = False) -> float:
    """:func:`parse_duration` for the option ``name``: errors read ``name: invalid ...``.

    Raised from an ``Options.__post_init__``, the config loader turns the message into
    ``pipelines[0].streams.kline.gap_grace: invalid duration ...``.
    """
    try:
        return parse_duration(value, positive=positive)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


# --- sizes ------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?i?b?)\s*$", re.IGNORECASE)
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: The type of a size option: a string such as ``"64MB"`` or a number of bytes.
#: Read it with :func:`parse_size` / :func:`check_size`.
Size = str | int

#: Largest size accepted (1 TB): a size beyond it is a typo, not a memory budget.
MAX_SIZE = 1 << 40


def parse_size(text: str | int, *, minimum: int = 0) -> int:
    """Bytes in ``text``: a number of bytes or a string such as ``"512KB"``, ``"64MB"``,
    ``"1GB"`` (binary multiples: ``KB`` = ``KiB`` = 1024; the ``B`` is optional).

    Accepts ``minimum <= bytes <= MAX_SIZE``; raises ``ValueError`` saying why otherwise.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"invalid size {_show(text)}: use a number of bytes or e.g. '64MB'")
    if isinstance(text, str):
        match = _SIZE.match(text)
        if match and match["unit"].lower() in ("i", "ib"):
            match = None  # "5i": a binary prefix without a unit
        if not match:
            if text.strip().startswith("-") and _SIZE.match(text.strip()[1:]):
                raise ValueError(f"invalid size {_show(text)}: must not be negative")
            raise ValueError(
                f"invalid size {_show(text)}: use a number of bytes or e.g. '512KB', '64MB', '1GB'"
            )
        unit = match["unit"].lower().rstrip("b").rstrip("i")
        size = int(float(match["value"]) * _BYTES[unit])
    else:
        size = text
        if size < 0:
            raise ValueError(f"invalid size {_show(text)}: must not be negative")
    if size > MAX_SIZE:
        raise ValueError(f"invalid size {_show(text)}: larger than 1TB")
    if size < minimum:
        raise ValueError(f"invalid size {_show(text)}: must be at least {format_size(minimum)}")
    return size


def check_size(name: str, value: str | int, *, minimum: int = 0) -> int:
    """:func:`parse_size` for the option ``name``: errors read ``name: invalid size ...``."""
    try:
        return parse_size(value, minimum=minimum)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def format_size(size: int) -> str:
    """``size`` bytes for people: ``"64MB"``, ``"1.5KB"``, ``"800B"``."""
    for unit, factor in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f}".removesuffix(".0") + unit
    return f"{size}B"


# --- kline intervals ------------------------------------------------------------------------

#: Kline interval names (Binance's spelling, shared by the exchanges; ``1M`` is a month).
KLINE_INTERVALS: tuple[str, ...] = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d",
    "1w", "1M",
)  # fmt: skip
_INTERVAL_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def interval_ms(interval: str) -> int | None:
    """Length of a fixed kline interval in ms (``"1h"`` -> 3600000); ``None`` for the calendar
    month ``1M``. Raises ``KeyError``/``ValueError`` on a name not in :data:`KLINE_INTERVALS`."""
    if interval == "1M":
        return None
    return int(interval[:-1]) * _INTERVAL_UNIT_MS[interval[-1]]


def next_open_time(open_time: int, interval: str) -> int:
    """Open time (ms) of the bar after the one opening at ``open_time`` (UTC calendar months)."""
    step = interval_ms(interval)
    if step is not None:
        return open_time + step
    dt = datetime.fromtimestamp(open_time / 1000, tz=UTC)
    days = monthrange(dt.year, dt.month)[1]
    return open_time + days * 86_400_000
