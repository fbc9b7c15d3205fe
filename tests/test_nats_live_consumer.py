"""``examples/live_consumer.py`` against a real JetStream: it prints the trades published
after it subscribed, and a missing stream is one ``error:`` line, not a traceback."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

from conftest import wait_for

from streamer import Counters, SinkContext, Trade
from streamer.plugins.sinks.nats_sink import NatsSink, Options

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "live_consumer.py"
T0 = 1_795_392_000_000


def _publish(url: str, trade_id: int) -> None:
    async def run() -> None:
        ctx = SinkContext(name="bus", counters=Counters(), logger=logging.getLogger("t"))
        sink = NatsSink(Options(url=url, stream="LIVE", subject_prefix="live"), ctx)
        await sink.open()
        await sink.write([Trade("binance", "spot", "BTCUSDT", trade_id, "93576.01", "0.5",
                                trade_id, trade_id, T0, False, True, T0, T0 + 1)])  # fmt: skip
        await sink.close()

    asyncio.run(run())


def test_the_live_consumer_prints_new_trades(tmp_path, nats_server):
    _publish(nats_server.url, 1)  # the stream exists before the consumer starts
    out = tmp_path / "out.txt"
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--url", nats_server.url, "--stream", "LIVE",
             "--prefix", "live", "--symbol", "BTCUSDT"],
            stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        published = iter(range(2, 10_000))

        def printed() -> bool:
            _publish(nats_server.url, next(published))
            return "trade " in out.read_text()

        wait_for(printed, 60, "the consumer to print a trade")
    finally:
        proc.terminate()
        proc.wait(10)
    first = next(line for line in out.read_text().splitlines() if line.startswith("trade "))
    assert first.endswith("buy  0.5 @ 93576.01") and not first.startswith("trade 1 ")


def test_a_missing_stream_is_one_error_line(nats_server):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", nats_server.url, "--stream", "NOSUCH"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: no stream 'NOSUCH'")
    assert len(result.stderr.strip().splitlines()) == 1
