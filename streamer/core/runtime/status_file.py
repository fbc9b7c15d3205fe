"""The status file: what a running ``streamer run`` publishes for ``streamer status``.

Every child sends its :class:`~streamer.core.counters.Counters` snapshot to the supervisor
every ``runtime.status_interval`` seconds (and once more when it stops). The supervisor
merges them and atomically replaces ``<runtime.state_dir>/status.json`` (written to a
temporary file, then renamed, so a reader never sees a torn file). Its shape::

    {
      "pid": 1234,                      # the supervisor
      "started_at": 1764000000000,      # ms since the epoch
      "updated_at": 1764000005000,
      "state": "running",               # "running", "stopping" or "stopped"
      "exit_code": null,                # set when state is "stopped"
      "pipelines": {
        "spot": {
          "exchange": "binance", "market": "spot", "symbols": ["BTCUSDT", ...],
          "totals": {"records_emitted": 123, ...},            # summed over everything
          "streams": {"BTCUSDT": {"aggtrade": {"records_emitted": 60}}},
          "process": {"batches_sent": 12, ...}                # counters not tied to a symbol
        }
      },
      "sinks": {
        "csv": {"type": "csv", "writers": 1, "totals": {...}, "streams": {...}, "process": {...},
                "markets": {"binance/spot": {"BTCUSDT": {"aggtrade": {"records_written": 60,
                                                                     "records_flushed": 58,
                                                                     "written_event_time": ...}}}},
                "high_water": {"binance/spot/BTCUSDT/aggtrade": 4711}}
      },
      "children": {
        "spot.worker0": {"kind": "worker", "pid": 1240, "alive": true, "incarnation": 1,
                         "restarts": 0, "last_exit_code": null, "uptime": 4.9,
                         "info": {"queue_depths": {"csv": 0}, "pending_records": 3,
                                  "held_bytes": 41200, "buffer_bytes": 33554432,
                                  "reading_paused": false, "read_pauses": 0, ...}}
      }
    }

A sink running as several writers (children ``sink.<name>#<i>``, each with a ``sink``
field) has their counters merged under ``sinks.<name>`` (summed; ``last_flush_time`` is the
oldest of its writers') and their high-water marks united.

Counters restart from zero when a child restarts (its ``restarts`` says how often); the
totals are those of the current incarnations. Counter names used by the runtime:
workers ``records_emitted``, ``batches_sent``, ``backpressure_waits``,
``backpressure_wait_ms``, ``records_overflowed``, ``read_pauses``, ``records_unrouted``,
``reconnects``;
writers ``batches_received``, ``records_received``, ``records_written``,
``records_flushed``, ``duplicates_dropped``, ``batches_corrupt``, ``backpressure_waits``,
``flushes`` and the gauges ``written_event_time`` (per stream: exchange time of the newest
record known to be in the sink's files), ``last_flush_time`` (epoch ms), ``rows_pending``
and ``flush_interval_ms``. Plugins add their own through the same ``Counters``.

A counter whose symbol is market-qualified (:func:`~streamer.core.counters.market_symbol`,
as the writers key theirs: a sink receives the same symbol from spot and futures
pipelines) lands in ``markets`` under ``"<exchange>/<market>"`` and, summed over markets,
in ``streams`` as before.
"""

from __future__ import annotations

import operator
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from ..counters import split_market_symbol
from .channels import CounterRow

STATUS_FILE = "status.json"


#: Gauges that are merged by taking the largest value, not the sum: times, and figures every
#: process reads from the same shared source (Binance reports the IP's used REST weight).
MAX_MERGED = frozenset(
    {
        "last_event_time",
        "rest_weight_used",
        "written_event_time",
        "last_flush_time",
        "flush_interval_ms",
        "held_for_ms",
    }
)


def merge_counters(row_sets: Iterable[Iterable[CounterRow]]) -> dict[str, Any]:
    """Merge counter rows of several children into ``totals``, ``streams`` and ``process``
    (and ``markets`` when some symbols are market-qualified).

    Counters are summed; the gauges in :data:`MAX_MERGED` take the largest value.
    """
    totals: defaultdict[str, int] = defaultdict(int)
    process: defaultdict[str, int] = defaultdict(int)
    streams: dict[str, dict[str, dict[str, int]]] = {}
    markets: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    for rows in row_sets:
        for name, symbol, stream, value in rows:
            combine = max if name in MAX_MERGED else operator.add
            totals[name] = combine(totals[name], value)
            if not symbol and not stream:
                process[name] = combine(process[name], value)
                continue
            qualified = split_market_symbol(symbol)
            if qualified is not None:
                market, symbol = qualified
                per = (
                    markets.setdefault(market, {})
                    .setdefault(symbol, {})
                    .setdefault(stream or "*", {})
                )
                per[name] = combine(per.get(name, 0), value)
            per = streams.setdefault(symbol or "*", {}).setdefault(stream or "*", {})
            per[name] = combine(per.get(name, 0), value)
    merged: dict[str, Any] = {
        "totals": dict(sorted(totals.items())),
        "streams": streams,
        "process": dict(process),
    }
    if markets:
        merged["markets"] = markets
    return merged


def write_status(state_dir: str | Path, status: dict[str, Any]) -> Path:
    """Atomically replace ``<state_dir>/status.json`` with ``status``; returns its path."""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / STATUS_FILE
    tmp = directory / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(status), indent=2))
    os.replace(tmp, target)
    return target


def read_status(state_dir: str | Path) -> dict[str, Any]:
    """The last published status (raises ``FileNotFoundError`` when none was written)."""
    return msgspec.json.decode((Path(state_dir) / STATUS_FILE).read_bytes())
