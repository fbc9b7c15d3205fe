"""Tests for the recorded-capture readers (streamer.testing.captures)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from streamer.testing.captures import (
    CaptureEvent,
    capture_dir,
    read_capture,
    read_cryptofeed,
    read_hftbacktest,
)

DATA = Path(__file__).resolve().parent / "data"


def test_capture_dir_is_the_checkouts_tests_data(monkeypatch):
    monkeypatch.delenv("STREAMER_CAPTURE_DIR", raising=False)
    assert capture_dir() == DATA


def test_capture_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMER_CAPTURE_DIR", str(tmp_path))
    assert capture_dir() == tmp_path
    monkeypatch.setenv("STREAMER_CAPTURE_DIR", str(tmp_path / "missing"))
    assert capture_dir() is None


def test_cryptofeed_synthetic_merge(tmp_path):
    (tmp_path / "X.ws.1.0").write_text(
        "wss://h/stream?streams=a@aggTrade <-> 1600000000.0\n"
        '1600000001.5: {"stream":"a","data":{"x":1}}\n'
        "\n"
        '1600000003.000001: {"stream":"a","data":{"x":2}}\n'
    )
    (tmp_path / "X.http.0.0").write_text(
        'https://h/api/v3/depth?symbol=A&limit=1000 -> 1600000002.25: {"lastUpdateId":5}\n'
    )
    events = read_cryptofeed("X", tmp_path)
    assert [e.kind for e in events] == ["ws", "rest", "ws"]
    assert events[0].local_time_ns == 1_600_000_001_500_000_000
    assert events[2].local_time_ns == 1_600_000_003_000_001_000
    assert events[1].url == "https://h/api/v3/depth?symbol=A&limit=1000"
    assert events[1].payload == b'{"lastUpdateId":5}'
    assert events[0].url == "wss://h/stream?streams=a@aggTrade"
    assert events[0].payload == b'{"stream":"a","data":{"x":1}}'


def test_cryptofeed_bad_line_is_reported(tmp_path):
    (tmp_path / "X.ws.1.0").write_text("wss://h/stream <-> 1\nno separator here\n")
    with pytest.raises(ValueError, match=r"X\.ws\.1\.0:2"):
        read_cryptofeed("X", tmp_path)


def test_hftbacktest_synthetic(tmp_path):
    with gzip.open(tmp_path / "usdm_x.gz", "wt") as fh:
        fh.write('10 {"stream":"btcusdt@depth@0ms","data":{}}\n20 {"lastUpdateId":7}\n')
    events = read_hftbacktest("usdm_x.gz", tmp_path)
    assert events == [
        CaptureEvent(
            10,
            "ws",
            "wss://fstream.binance.com/stream",
            b'{"stream":"btcusdt@depth@0ms","data":{}}',
        ),
        CaptureEvent(
            20,
            "rest",
            "https://fapi.binance.com/fapi/v1/depth?symbol=BTCUSDT&limit=1000",
            b'{"lastUpdateId":7}',
        ),
    ]


def test_real_binance_futures_capture():
    events = read_cryptofeed("BINANCE_FUTURES", DATA)
    rest = [e for e in events if e.kind == "rest"]
    assert {e.url.split("symbol=")[1].split("&")[0] for e in rest} >= {
        "SUSHIUSDT",
        "AKROUSDT",
        "KEEPUSDT",
        "CTKUSDT",
    }
    times = [e.local_time_ns for e in events]
    assert times == sorted(times)
    sushi = [
        json.loads(e.payload)["data"]["a"]
        for e in events
        if e.kind == "ws" and e.payload.startswith(b'{"stream":"sushiusdt@aggTrade"')
    ]
    assert sushi == list(range(87353230, 87353270))


def test_real_hftbacktest_capture():
    events = read_capture("spot_btcusdt_20240808.gz", DATA)
    rest = [e for e in events if e.kind == "rest"]
    assert len(rest) >= 1
    assert rest[0].url.endswith("/api/v3/depth?symbol=BTCUSDT&limit=1000")
    assert json.loads(rest[0].payload)["lastUpdateId"] == 50093239218
