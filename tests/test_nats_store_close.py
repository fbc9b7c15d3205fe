"""``streamer store`` against a real JetStream: a clean stop acknowledges what the sinks
flushed at close, so the next start is not handed it again; the source returns what has
arrived without waiting for a full pull batch."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import load_status, wait_for

from streamer import Counters, SinkContext, SourceContext, Trade
from streamer.plugins.sinks._nats_source import NatsSource, SourceOptions
from streamer.plugins.sinks.nats_sink import NatsSink, Options

T0 = 1_795_392_000_000


def trade(i: int) -> Trade:
    return Trade("binance", "spot", "BTCUSDT", i, "93576.01000000", "0.00100000", i, i,
                 T0 + i, i % 2 == 0, True, T0 + i, T0 + i + 1)  # fmt: skip


async def _publish(url: str, stream: str, ids: range) -> None:
    ctx = SinkContext(name="bus", counters=Counters(), logger=logging.getLogger("t"))
    sink = NatsSink(Options(url=url, stream=stream, subject_prefix=stream.lower()), ctx)
    await sink.open()
    await sink.write([trade(i) for i in ids])
    await sink.close()
    assert ctx.counters.total("records_published") == len(ids)


async def _consumer(url: str, stream: str, durable: str) -> tuple[int, int, int]:
    """(last stream sequence, delivered up to, acknowledged up to)."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        info = await js.consumer_info(stream, durable)
        return last, info.delivered.stream_seq, info.ack_floor.stream_seq
    finally:
        await nc.close()


def _csv_rows(data: Path) -> int:
    return sum(len(p.read_text().splitlines()) - 1 for p in data.rglob("aggTrades/*/*.csv"))


def test_a_clean_stop_acknowledges_what_the_sinks_flushed_at_close(tmp_path, nats_server):
    url, stream = nats_server.url, "CLOSE"
    asyncio.run(_publish(url, stream, range(1, 301)))
    data = tmp_path / "data"
    config = {
        "source": {
            "type": "nats",
            "url": url,
            "stream": stream,
            "durable": "closer",
            "subject_prefix": "close",
        },
        # No timed flush during the test: only the flush at close makes rows durable.
        "sinks": {"csv": {"type": "csv", "path": str(data), "flush_interval": "10m"}},
        "runtime": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 30},
    }
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "store.log"
    with log.open("wb") as out:
        store = subprocess.Popen(
            [sys.executable, "-m", "streamer", "store", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def written() -> bool:
            status = load_status(tmp_path / "state") or {}
            totals = status.get("sinks", {}).get("csv", {}).get("totals", {})
            return totals.get("records_written", 0) >= 300

        wait_for(written, 60, "the store to hand every record to its sink")
        store.send_signal(signal.SIGTERM)
        assert store.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if store.poll() is None:
            store.kill()
            store.wait(10)
    assert _csv_rows(data) == 300
    last, _, acked = asyncio.run(_consumer(url, stream, "closer"))
    assert acked == last, f"acknowledged up to {acked} of {last}"


def test_the_source_returns_what_arrived_without_a_full_batch(nats_server):
    url, stream = nats_server.url, "PARTIAL"

    async def scenario() -> tuple[list[int], Counters]:
        await _publish(url, stream, range(1, 6))
        counters = Counters()
        options = SourceOptions(url=url, stream=stream, subject_prefix="partial",
                                durable="partial", fetch_batch=1000,
                                fetch_expires="60s")  # fmt: skip
        context = SourceContext(name="nats", counters=counters, logger=logging.getLogger("s"))
        source = NatsSource(options, context)
        await source.open()
        got: list[int] = []
        try:
            while len(got) < 5:
                records, token = await source.receive(10_000)
                got += [r.trade_id for r in records]
                if token is not None:
                    await source.ack(token)
            # More arrives while a request is outstanding: delivered on it.
            await _publish(url, stream, range(6, 9))
            while len(got) < 8:
                records, _ = await source.receive(10_000)
                got += [r.trade_id for r in records]
        finally:
            await source.aclose()
        return got, counters

    got, counters = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert got == list(range(1, 9))
    assert counters.total("messages_received") == 8
    assert counters.total("consumer_rebinds") == 1
