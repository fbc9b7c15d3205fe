"""The record vocabulary (stream names, keys, times) and kline intervals of the public API."""

from __future__ import annotations

import pytest

import streamer
from streamer import (
    KLINE_INTERVALS,
    BookSnapshot,
    DepthUpdate,
    Kline,
    Marker,
    StreamKey,
    Trade,
    interval_ms,
    kline_stream,
    next_open_time,
    record_key,
    record_time,
    stream_key,
    stream_name,
)
from streamer.core import api

TRADE = Trade("binance", "spot", "BTCUSDT", 7, "1.0", "2", 5, 6, 1_000, True, None, 1_001, 1_002)
DEPTH = DepthUpdate("binance", "usdm", "ETHUSDT", 2_000, 1_999, 10, 12, 9, [], [], 2_001)
KLINE = Kline(
    "binance", "spot", "BTCUSDT", "1h", 3_600_000, 7_199_999, "1", "2", "0.5", "1.5", "9",
    "10", 3, "4", "5", True, 7_199_999, 7_200_100,
)  # fmt: skip
BOOK = BookSnapshot("binance", "spot", "BTCUSDT", 99, 0, 4_000, [("1", "1")], [("2", "1")])
MARKER = Marker("binance", "spot", "BTCUSDT", "kline_1h", "gap", 1, 2, 5_000, "reconnect")


@pytest.mark.parametrize(
    ("record", "name", "key", "time"),
    [
        (TRADE, "aggtrade", 7, 1_000),
        (DEPTH, "depth", 12, 2_000),
        (KLINE, "kline_1h", 3_600_000, 3_600_000),
        (BOOK, "orderbook", 99, 4_000),  # no event time: the receive time
        (MARKER, "kline_1h", None, 5_000),
    ],
)
def test_each_record_has_one_stream_name_key_and_time(record, name, key, time):
    assert stream_name(record) == name
    assert stream_key(record) == StreamKey(record.exchange, record.market, record.symbol, name)
    assert record_key(record) == key
    assert record_time(record) == time


def test_stream_name_constants_match_the_records():
    assert stream_name(TRADE) == streamer.AGGTRADE_STREAM
    assert stream_name(DEPTH) == streamer.DEPTH_STREAM
    assert stream_name(BOOK) == streamer.ORDERBOOK_STREAM
    assert kline_stream("1h") == stream_name(KLINE)
    assert api.StreamKey is StreamKey  # still importable from its old home


def test_kline_interval_arithmetic():
    assert KLINE_INTERVALS[0] == "1s" and KLINE_INTERVALS[-1] == "1M"
    assert [interval_ms(i) for i in ("1s", "15m", "4h", "3d", "1w")] == [
        1_000, 900_000, 14_400_000, 259_200_000, 604_800_000
    ]  # fmt: skip
    assert interval_ms("1M") is None
    jan_2024 = 1_704_067_200_000
    assert next_open_time(jan_2024, "1M") == jan_2024 + 31 * 86_400_000
    assert next_open_time(jan_2024 + 31 * 86_400_000, "1M") == jan_2024 + 60 * 86_400_000  # leap
    assert next_open_time(jan_2024, "1h") == jan_2024 + 3_600_000
