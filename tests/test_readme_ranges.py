"""README's configuration reference states the range of every numeric and duration option,
and each stated range is exactly what the options accept (issue 11).

Every number or duration field of the runtime, pipeline, Binance, stream type and csv
``Options`` must have a row whose ``accepted`` cell reads ``LOW to HIGH`` (``> LOW`` when
``LOW`` itself is refused) or ``LOW or more``; both ends are then tried through the config
loader (in and just out of range). Lists of values the exchange serves (depth speeds, kline
intervals, snapshot caps) are compared with the adapter's own tables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamer.core.config import ConfigError, PipelineConfig, RuntimeConfig, convert_options
from streamer.core.units import parse_duration
from streamer.plugins.exchanges.binance.adapter import (
    DEPTH_SPEEDS,
    KLINE_INTERVALS,
    BinanceAdapter,
    BinanceOptions,
    valid_intervals,
)
from streamer.plugins.sinks.csv_batch import Options as CsvOptions
from streamer.plugins.streams.aggtrade import AggTradeOptions
from streamer.plugins.streams.depth import DepthOptions
from streamer.plugins.streams.kline import INTERVALS, KlineOptions
from streamer.plugins.streams.orderbook import OrderBookOptions

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

#: (README table, Options class, options every value is tried with)
PIPELINE = {"name": "p", "exchange": "x", "symbols": ["A"], "streams": {"s": {}}, "sinks": ["c"]}
CLASSES: dict[str, tuple[type[msgspec.Struct], dict[str, Any]]] = {
    "runtime": (RuntimeConfig, {}),
    "pipeline": (PipelineConfig, PIPELINE),
    "binance": (BinanceOptions, {}),
    "csv": (CsvOptions, {"path": "x", "max_buffered_rows": 1_000_000_000, "flush_rows": 1}),
    "aggtrade": (AggTradeOptions, {}),
    "kline": (KlineOptions, {}),
    "depth": (DepthOptions, {}),
    "orderbook": (OrderBookOptions, {"snapshot_limit": 5000, "levels": 1}),
}


def _table(header: str, after: str) -> list[list[str]]:
    """Rows (cells without backticks) of the first table with ``header`` after ``after``."""
    start = README.index(after)
    lines = README[start:].splitlines()
    first = lines.index(header)
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def documented() -> dict[str, dict[str, str]]:
    """``{table: {option: accepted cell}}`` from README."""
    keyed = "| key | default | accepted | meaning |"
    option = "| option | default | accepted | meaning |"
    tables = {
        "runtime": _table(keyed, "### Runtime"),
        "pipeline": _table(keyed, "### Pipeline"),
        "binance": _table(option, "### Binance exchange options"),
        "csv": _table(option, "## Output files: the `csv` sink"),
    }
    out = {name: {row[0].strip("`"): row[2] for row in rows} for name, rows in tables.items()}
    for stream, key, _default, accepted in _table(
        "| stream | option | default | accepted |", "### Stream types"
    ):
        out.setdefault(stream.strip("`"), {})[key.strip("`")] = accepted
    return out


DOCS = documented()
_RANGE = re.compile(r"^(?P<gt>> )?(?P<lo>[\d.]+[a-z]*) to (?P<hi>[\d.]+[a-z]*)\b")
_OPEN = re.compile(r"^(?P<lo>\d+) or more$")


def _kind(cls: type[msgspec.Struct], field: msgspec.structs.FieldInfo) -> str | None:
    """``int``, ``float`` or ``duration`` for a numeric/duration option, else None."""
    info = msgspec.inspect.type_info(field.type)
    if isinstance(info, msgspec.inspect.UnionType):
        kinds = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        info = kinds[0] if len(kinds) == 1 else info
    if isinstance(info, msgspec.inspect.IntType):
        return "int"
    if isinstance(info, msgspec.inspect.FloatType):
        return "float"
    if isinstance(field.default, str) and field.default:
        try:
            parse_duration(field.default)
        except ValueError:
            return None
        return "duration"
    return None


def numeric_fields() -> list[tuple[str, str, str]]:
    return [
        (table, field.name, kind)
        for table, (cls, _) in CLASSES.items()
        for field in msgspec.structs.fields(cls)
        if (kind := _kind(cls, field)) is not None
    ]


def test_every_numeric_and_duration_option_has_a_documented_range():
    missing = [
        f"{table}.{name}"
        for table, name, _ in numeric_fields()
        if not (_RANGE.match(DOCS[table].get(name, "")) or _OPEN.match(DOCS[table].get(name, "")))
    ]
    assert missing == []
    assert len(numeric_fields()) >= 35  # the detection itself works


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms" if seconds >= 0 else f"-{round(-seconds * 1000)}ms"


def _accepts(table: str, name: str, value: Any) -> bool:
    cls, base = CLASSES[table]
    try:
        convert_options({**base, name: value}, cls, table)
    except ConfigError as exc:
        assert name in str(exc), str(exc)  # refused for this option's sake
        return False
    return True


@pytest.mark.parametrize(("table", "name", "kind"), numeric_fields(), ids=lambda v: str(v))
def test_the_documented_range_is_the_accepted_one(table, name, kind):
    cell = DOCS[table][name]
    if match := _OPEN.match(cell):
        low = int(match["lo"])
        assert _accepts(table, name, low) and _accepts(table, name, 10**9)
        assert not _accepts(table, name, low - 1)
        return
    match = _RANGE.match(cell)
    assert match, cell
    exclusive = bool(match["gt"])
    if kind == "duration":
        low, high = parse_duration(match["lo"]), parse_duration(match["hi"])
        inside, below, above = _ms(low + 0.001), _ms(low - 0.001), _ms(high + 0.001)
        lowest, highest = _ms(low), match["hi"]
    else:
        number = int if kind == "int" else float
        low, high = number(match["lo"]), number(match["hi"])
        step = 1 if kind == "int" else 0.001
        inside, below, above = low + step, low - step, high + step
        lowest, highest = low, high
    assert _accepts(table, name, highest), f"{highest} is documented but refused"
    assert not _accepts(table, name, above), f"{above} is accepted but not documented"
    assert _accepts(table, name, inside)
    if exclusive:
        assert not _accepts(table, name, lowest), f"{lowest} is accepted but documented as not"
    else:
        assert _accepts(table, name, lowest), f"{lowest} is documented but refused"
        assert not _accepts(table, name, below), f"{below} is accepted but not documented"


def _quoted(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def test_depth_speeds_kline_intervals_and_snapshot_caps_are_the_exchanges():
    spot, usdm = DOCS["binance"]["depth_speed"].split(";")
    assert tuple(_quoted(spot)) == DEPTH_SPEEDS["spot"]
    assert tuple(_quoted(usdm)) == DEPTH_SPEEDS["usdm"]
    speeds = DOCS["depth"]["speed"]
    assert f"spot {', '.join(f'`{s}`' for s in DEPTH_SPEEDS['spot'])};" in speeds
    assert f"usdm {', '.join(f'`{s}`' for s in DEPTH_SPEEDS['usdm'])}" in speeds

    spot, usdm = DOCS["kline"]["intervals"].split(";")
    assert tuple(_quoted(spot)) == KLINE_INTERVALS == INTERVALS == valid_intervals("spot")
    assert "without `1s`" in usdm
    assert valid_intervals("usdm") == tuple(i for i in KLINE_INTERVALS if i != "1s")

    caps = re.search(r"Binance spot (\d+), usdm (\d+)", DOCS["orderbook"]["snapshot_limit"])
    assert caps, DOCS["orderbook"]["snapshot_limit"]
    rule = BinanceAdapter.sequence_rule.fget
    for market, cap in zip(("spot", "usdm"), caps.groups(), strict=True):
        adapter = type("A", (), {"market": market})()
        assert rule(adapter).max_snapshot_limit == int(cap)


def test_every_duration_takes_a_number_of_seconds_as_the_readme_says():
    assert "or a plain number of seconds (`0.25`)" in README
    durations = [(t, n) for t, n, kind in numeric_fields() if kind == "duration"]
    assert len(durations) >= 10
    assert [(t, n) for t, n in durations if not _accepts(t, n, 2)] == []
    assert [(t, n) for t, n in durations if not _accepts(t, n, "2s")] == []


@pytest.mark.parametrize(
    ("value", "ok"), [("00:00", True), ("23:59:59", True), ("24:00", False), ("12:60", False)]
)
def test_rotate_at_range(value, ok):
    assert "00:00 to 23:59:59" in DOCS["binance"]["rotate_at"]
    assert _accepts("binance", "rotate_at", value) is ok
