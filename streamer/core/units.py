"""Parsing of human-friendly durations used in configuration (``"100ms"``, ``"1s"``, ``"10m"``)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``text``: a number of seconds or a string such as ``"250ms"``, ``"1m"``.

    Raises ``ValueError`` with the accepted forms when ``text`` is not a duration.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: use a number of seconds or e.g. '100ms', '1s', '10m', '1h'"
        )
    return float(match["value"]) * _SECONDS[match["unit"]]
