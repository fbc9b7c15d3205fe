"""Disk usage of a CSV data tree, and a measurement run against the simulator.

``python bench/diskusage.py DATA_DIR`` sums the files of a ``csv`` sink tree
(``<exchange>/<market>/<kind>/<SYMBOL>/...``) per exchange, market, kind and symbol.

``python bench/diskusage.py --measure 120`` collects every built-in stream of
two spot symbols from a local simulator for 120 s, plain and gzip, and prints bytes per row
and the projected bytes per day per symbol at the simulator's rates and at the rates of a
real recorded Binance BTCUSDT capture (``--capture``). The numbers in
``docs/operations.md`` come from this command.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import msgspec

DAY = 86_400.0


class Usage(msgspec.Struct, kw_only=True):
    """Bytes and rows of one ``(exchange, market, kind, symbol)`` in a data tree."""

    exchange: str
    market: str
    kind: str
    symbol: str
    files: int = 0
    bytes: int = 0
    rows: int = 0


def _rows(path: Path) -> int:
    """Data rows of a CSV file (header excluded); counts lines, quoted newlines aside."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        # A gzip file holds one header per member only for new files: one header per file.
        return max(
            0, sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b"")) - 1
        )


def usage(data_dir: str | os.PathLike[str], *, count_rows: bool = True) -> list[Usage]:
    """Per ``(exchange, market, kind, symbol)`` totals of the CSV files under ``data_dir``."""
    root = Path(data_dir)
    totals: dict[tuple[str, str, str, str], Usage] = {}
    for path in sorted(root.rglob("*.csv*")):
        parts = path.relative_to(root).parts
        if len(parts) < 5 or not path.is_file():
            continue
        key = (parts[0], parts[1], parts[2], parts[3])
        row = totals.setdefault(key, Usage(exchange=key[0], market=key[1], kind=key[2],
                                           symbol=key[3]))  # fmt: skip
        row.files += 1
        row.bytes += path.stat().st_size
        if count_rows:
            row.rows += _rows(path)
    return list(totals.values())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def render_usage(rows: list[Usage], seconds: float | None = None) -> str:
    """A table of ``rows``; with ``seconds`` (the collection time) also bytes per day."""
    head = f"{'kind':<12}{'symbol':<12}{'files':>6}{'rows':>10}{'bytes':>12}{'B/row':>8}"
    if seconds:
        head += f"{'per day':>12}"
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.kind, r.symbol)):
        per_row = r.bytes / r.rows if r.rows else 0.0
        line = (
            f"{r.kind:<12}{r.symbol:<12}{r.files:>6}{r.rows:>10}{_human(r.bytes):>12}"
            f"{per_row:>8.1f}"
        )
        if seconds:
            line += f"{_human(r.bytes * DAY / seconds):>12}"
        lines.append(line)
    return "\n".join(lines)


# -- measurement -----------------------------------------------------------------------------
class _Frame(msgspec.Struct):
    stream: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")


class _Diff(msgspec.Struct):
    b: list[tuple[str, str]] = []
    a: list[tuple[str, str]] = []


def capture_rates(path: str | os.PathLike[str]) -> dict[str, float]:
    """Per second in a hftbacktest capture: depth events, depth rows (levels) and trades."""
    frame_decoder = msgspec.json.Decoder(_Frame)
    diff_decoder = msgspec.json.Decoder(_Diff)
    counts: defaultdict[str, int] = defaultdict(int)
    first = last = 0
    with gzip.open(path, "rb") as handle:
        for line in handle:
            stamp, _, body = line.partition(b" ")
            if not body.startswith(b'{"stream"'):
                continue
            frame = frame_decoder.decode(body)
            ts = int(stamp)
            first = first or ts
            last = ts
            if "@depth" in frame.stream:
                diff = diff_decoder.decode(frame.data)
                counts["depth_events"] += 1
                counts["depth_rows"] += max(1, len(diff.b) + len(diff.a))
            elif frame.stream.endswith("@trade") or frame.stream.endswith("@aggTrade"):
                counts["trades"] += 1
    seconds = max(1e-9, (last - first) / 1e9)
    return {name: n / seconds for name, n in counts.items()} | {"seconds": seconds}


def measure(seconds: float, gzip_files: bool, work: Path) -> tuple[list[Usage], float]:
    """Collect from a fresh simulator for ``seconds``; returns the usage and the time."""
    from streamer.core.config import parse_config
    from streamer.core.runtime import run
    from streamer.testing.sim import SimConfig, SimServer

    sim = SimServer(SimConfig(seed=11, spot_symbols=["BTCUSDT", "ETHUSDT"])).start_in_thread()
    data = work / ("gz" if gzip_files else "plain")
    try:
        config = parse_config(
            {
                "pipelines": [
                    {
                        "name": "spot",
                        "exchange": "binance",
                        "options": {"market": "spot", "rest_url": sim.rest_url,
                                    "ws_url": sim.ws_url},
                        "symbols": ["BTCUSDT", "ETHUSDT"],
                        "streams": {"aggtrade": {}, "depth": {}, "orderbook": {},
                                    "kline": {"intervals": ["1m"]}},
                        "sinks": ["csv"],
                    }
                ],
                "sinks": {"csv": {"type": "csv", "path": str(data), "gzip": gzip_files}},
                "runtime": {"state_dir": str(work / "state"), "status_interval": 1.0},
            }
        )  # fmt: skip
        began = time.monotonic()
        run(config, ["binance", "csv"], duration=seconds)
        elapsed = time.monotonic() - began
    finally:
        sim.stop()
    return usage(data), elapsed


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description="Disk usage of a CSV data tree.")
    parser.add_argument("data_dir", nargs="?")
    parser.add_argument("--seconds", type=float, help="collection time, for bytes per day")
    parser.add_argument("--measure", type=float, help="collect from the simulator this long")
    parser.add_argument("--capture", help="hftbacktest .gz capture for real-rate projections")
    args = parser.parse_args(argv)
    if args.measure:
        with tempfile.TemporaryDirectory(prefix="streamer-du-") as tmp:
            for gz in (False, True):
                rows, elapsed = measure(args.measure, gz, Path(tmp))
                print(f"\n{'gzip' if gz else 'plain'} CSV, {elapsed:.0f}s from the simulator:")
                print(render_usage(rows, elapsed))
                if args.capture:
                    _project(rows, capture_rates(args.capture))
        return
    if not args.data_dir:
        parser.error("give a DATA_DIR or --measure SECONDS")
    print(render_usage(usage(args.data_dir), args.seconds))


def _project(rows: list[Usage], rates: dict[str, float]) -> None:
    """Bytes per day for one symbol at the real capture's rates, per kind."""
    per_row: defaultdict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.rows:
            per_row[r.kind].append(r.bytes / r.rows)
    avg = {kind: sum(v) / len(v) for kind, v in per_row.items()}
    real_rows = {
        "aggTrades": rates.get("trades", 0.0),  # @trade: an upper bound for aggTrades
        "depth": rates.get("depth_rows", 0.0),
        "orderbook": 1.0,  # one snapshot per second (interval 1s)
        "klines": 1 / 60,
    }
    print(
        f"projected per symbol per day at the capture's rates "
        f"({rates.get('trades', 0):.1f} trades/s, {rates.get('depth_events', 0):.1f} depth "
        f"events/s with {rates.get('depth_rows', 0):.0f} levels/s, over {rates['seconds']:.0f}s):"
    )
    total = 0.0
    for kind, rate in real_rows.items():
        if kind in avg:
            day = avg[kind] * rate * DAY
            total += day
            print(
                f"  {kind:<10} {avg[kind]:6.1f} B/row x {rate * DAY:>12,.0f} rows = {_human(day)}"
            )
    print(f"  {'total':<10} {_human(total)}")


if __name__ == "__main__":
    main()
