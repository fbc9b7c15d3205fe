"""The ``nats`` sink against a real JetStream: subjects, both encodings, de-duplication by
``Nats-Msg-Id``, holdings from the stream, and a broker outage (buffer, retry, gap marker)."""

from __future__ import annotations

import asyncio
import logging
import sys

import msgspec
import pytest

from streamer import Counters, Kline, Marker, SinkContext, StreamKey, Trade
from streamer.plugins.sinks import _nats_common as common
from streamer.plugins.sinks.nats_sink import NatsSink, Options

T0 = 1_795_392_000_000


def trade(i: int, symbol: str = "BTCUSDT") -> Trade:
    return Trade("binance", "spot", symbol, i, "93576.01000000", "0.00100000", i, i,
                 T0 + i, i % 2 == 0, True, T0 + i, T0 + i + 1)  # fmt: skip


def kline(open_time: int, closed: bool = True) -> Kline:
    return Kline("binance", "spot", "BTCUSDT", "1m", open_time, open_time + 59_999, "1.0",
                 "2.0", "0.5", "1.5", "10.00", "15.00", 3, "5.00", "7.50", closed,
                 open_time + 59_999, open_time + 60_000)  # fmt: skip


def make_sink(url: str, stream: str, **options) -> NatsSink:
    ctx = SinkContext(name="bus", counters=Counters(), logger=logging.getLogger("t"))
    return NatsSink(Options(url=url, stream=stream, **options), ctx)


async def read_all(url: str, stream: str, subject: str = "md.>") -> list:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=stream)
        msgs = []
        while True:
            try:
                msgs += await sub.fetch(500, timeout=0.5)
            except Exception:
                return msgs
    finally:
        await nc.close()


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_records_round_trip_on_their_subjects_and_redundant_copies_are_dropped(
    nats_server, encoding
):
    stream, prefix = f"SINK_{encoding.upper()}", f"md{encoding}"

    async def scenario():
        first, second = (
            make_sink(nats_server.url, stream, encoding=encoding, subject_prefix=prefix),
            None,
        )
        await first.open()
        records = [trade(i) for i in range(1, 6)] + [kline(T0), kline(T0 + 60_000, False)]
        await first.write(records)
        await first.flush()
        # A redundant collector publishes the same records: JetStream keeps one copy.
        second = make_sink(nats_server.url, stream, encoding=encoding, subject_prefix=prefix)
        await second.open()
        held = await second.holdings()
        await second.write(records)
        await second.flush()
        dup = second.context.counters.total("records_duplicate")
        await first.close()
        await second.close()
        return await read_all(nats_server.url, stream, f"{prefix}.>"), held, dup

    msgs, held, dup = asyncio.run(scenario())
    assert len(msgs) == 7 and dup == 7  # the whole second copy
    assert [m.subject for m in msgs[:2]] == [f"{prefix}.binance.spot.aggtrade.BTCUSDT"] * 2
    assert msgs[5].subject == f"{prefix}.binance.spot.kline_1m.BTCUSDT"
    assert msgs[0].headers["Nats-Msg-Id"] == "binance.spot.BTCUSDT.aggtrade.1"
    assert (msgs[0].data[:1] == b"{") == (encoding == "json")
    decoded = [common.decode(m.data) for m in msgs]
    assert decoded[:5] == [trade(i) for i in range(1, 6)] and decoded[6] == kline(
        T0 + 60_000, False
    )
    # Holdings: the last trade id; the open bar's predecessor for the kline stream.
    assert held[StreamKey("binance", "spot", "BTCUSDT", "aggtrade")] == 5
    assert held[StreamKey("binance", "spot", "BTCUSDT", "kline_1m")] == T0


def test_an_outage_is_buffered_then_overflow_becomes_a_gap_marker(nats_server_factory):
    broker = nats_server_factory()

    async def scenario():
        sink = make_sink(broker.url, "OUTAGE", max_buffered_records=5, publish_timeout=0.5)
        await sink.open()
        await sink.write([trade(1)])
        await sink.flush()
        broker.stop()
        await sink.write([trade(i) for i in range(2, 11)])  # 5 kept, 4 dropped
        await sink.flush()
        pending_during = sink.pending_rows
        counters = sink.context.counters
        broker.start()
        for _ in range(200):
            await sink.flush()
            if not sink.pending_rows:
                break
            await asyncio.sleep(0.05)
        await sink.close()
        return pending_during, counters

    pending, counters = asyncio.run(scenario())
    assert pending == 5
    assert counters.total("records_dropped") == 4 and counters.total("gap_markers") == 1
    msgs = asyncio.run(read_all(broker.url, "OUTAGE"))
    records = [common.decode(m.data) for m in msgs]
    assert [r.trade_id for r in records if type(r) is Trade] == list(range(1, 7))
    (marker,) = [r for r in records if type(r) is Marker]
    assert (marker.kind, marker.first_key, marker.last_key) == ("gap", 7, 10)
    assert msgs[-1].subject == "md.binance.spot.markers.BTCUSDT"


def test_check_refuses_a_missing_driver_and_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="subject_prefix"):
        NatsSink.check(Options(subject_prefix="md.>"))
    with pytest.raises(ValueError, match="url"):
        NatsSink.check(Options(url="http://x"))
    monkeypatch.setitem(sys.modules, "nats", None)  # as if nats-py were not installed
    with pytest.raises(ValueError, match=r"market-streamer\[nats\]"):
        NatsSink.check(Options())
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"encoding": "xml"}, Options)
