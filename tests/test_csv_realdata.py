"""CSV sink on real recorded Binance traffic: exact strings and the golden counts survive."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
from pathlib import Path

import pytest

from streamer.core.api import SinkContext, StreamKey
from streamer.core.counters import Counters
from streamer.core.records import DepthUpdate, Kline, Trade
from streamer.plugins.sinks.csv_batch import CsvSink, Options

DATA = Path(__file__).resolve().parent / "data/cryptofeed_sample_data"


def load(capture: str, market: str) -> tuple[list, list[dict]]:
    """Records from a cryptofeed capture (aggTrade, kline, depth) and the raw payloads."""
    path = DATA / f"{capture}.ws.1.0"
    records, raw = [], []
    with path.open() as f:
        next(f)  # the connection line
        for line in f:
            if ": " not in line:
                continue  # a blank line at the end of some captures
            received, frame = line.split(": ", 1)
            data = json.loads(frame)["data"]
            rt = int(float(received) * 1000)
            e = data.get("e")
            if e == "aggTrade":
                records.append(
                    Trade("binance", market, data["s"], data["a"], data["p"], data["q"],
                          data["f"], data["l"], data["T"], data["m"], data.get("M"), data["E"],
                          rt)
                )  # fmt: skip
            elif e == "kline":
                k = data["k"]
                records.append(
                    Kline("binance", market, data["s"], k["i"], k["t"], k["T"], k["o"], k["h"],
                          k["l"], k["c"], k["v"], k["q"], k["n"], k["V"], k["Q"], k["x"],
                          data["E"], rt)
                )  # fmt: skip
            elif e == "depthUpdate":
                records.append(
                    DepthUpdate("binance", market, data["s"], data["E"], data.get("T"), data["U"],
                                data["u"], data.get("pu"), [tuple(x) for x in data["b"]],
                                [tuple(x) for x in data["a"]], rt)
                )  # fmt: skip
            else:
                continue
            raw.append(data)
    return records, raw


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.mark.parametrize("capture,market", [("BINANCE_FUTURES", "usdm"), ("BINANCE", "spot")])
def test_real_capture_roundtrip(tmp_path: Path, capture: str, market: str) -> None:
    records, _ = load(capture, market)
    counters = Counters()
    ctx = SinkContext(name="csv", counters=counters, logger=logging.getLogger("test.real"))
    sink = CsvSink(Options(path=str(tmp_path)), ctx)

    async def scenario():
        await sink.open()
        for i in range(0, len(records), 64):
            await sink.write(records[i : i + 64])
        await sink.close()
        reopened = CsvSink(Options(path=str(tmp_path)), ctx)
        return await reopened.holdings()

    held = asyncio.run(scenario())
    base = tmp_path / "binance" / market
    trades = [r for r in records if isinstance(r, Trade)]
    for symbol in sorted({t.symbol for t in trades}):
        mine = [t for t in trades if t.symbol == symbol]
        (path,) = (base / "aggTrades" / symbol).iterdir()
        got = rows(path)
        assert [(int(r[0]), r[1], r[2]) for r in got] == [
            (t.trade_id, t.price, t.quantity) for t in mine
        ]
        assert held[StreamKey("binance", market, symbol, "aggtrade")] == mine[-1].trade_id
    closed = [r for r in records if isinstance(r, Kline) and r.closed]
    written_klines = sum(len(rows(p)) for p in base.glob("klines/*/1m/*.csv"))
    assert written_klines == len(closed)
    depth = [r for r in records if isinstance(r, DepthUpdate)]
    written_depth = [row for p in sorted(base.glob("depth/*/*.csv")) for row in rows(p)]
    assert len(written_depth) == sum(max(1, len(d.bids) + len(d.asks)) for d in depth)
    levels = {(row[6], row[7]) for row in written_depth}
    assert levels == {lvl for d in depth for lvl in (*d.bids, *d.asks)}
    assert counters.total("rows_duplicate") == 0 and counters.get("rows_quoted") == 0
    if capture == "BINANCE_FUTURES":
        # Golden numbers of the capture (tests/data/README.md).
        sushi = rows(next((base / "aggTrades/SUSHIUSDT").iterdir()))
        assert [int(r[0]) for r in sushi] == list(range(87353230, 87353270))
        assert len(rows(next((base / "aggTrades/CTKUSDT").iterdir()))) == 38
        assert len(closed) == 4  # one closed 1m bar per symbol
        assert all(len(r) == 9 for r in sushi)  # no is_best_match column on USD-M
