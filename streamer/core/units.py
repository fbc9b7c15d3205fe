"""Parsing of human-friendly durations used in configuration (``"100ms"``, ``"1s"``, ``"10m"``)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
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
