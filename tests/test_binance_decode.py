"""FrameDecoder and REST decoders: protocol-reference examples and the recorded captures."""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import pytest

from streamer.core.records import BookSnapshot, DepthUpdate, Kline, Trade
from streamer.plugins.exchanges.binance.decode import (
    BookTickerEvent,
    ControlError,
    ControlResponse,
    FrameDecoder,
    FrameError,
    ServerShutdown,
    TradeEvent,
    decode_agg_trades,
    decode_depth_snapshot,
    decode_exchange_info,
    decode_klines,
    decode_rest_error,
)

DATA = Path(__file__).resolve().parent / "data"
CF = DATA / "cryptofeed_sample_data"

SPOT_AGG = (
    '{"e":"aggTrade","E":1735689600123,"s":"BTCUSDT","a":3345678901,"p":"93576.00000000",'
    '"q":"0.00120000","f":4321098765,"l":4321098767,"T":1735689600122,"m":false,"M":true}'
)
USDM_AGG = (
    '{"e":"aggTrade","E":1735689600210,"s":"BTCUSDT","a":2456789012,"p":"93540.10","q":"0.125",'
    '"nq":"0.125","f":5987654321,"l":5987654325,"T":1735689600208,"m":true}'
)
SPOT_DEPTH = (
    '{"e":"depthUpdate","E":1735689600140,"s":"BTCUSDT","U":58123456701,"u":58123456789,'
    '"b":[["93575.99000000","1.20431000"],["93570.00000000","0.00000000"]],'
    '"a":[["93576.00000000","0.35210000"]]}'
)
USDM_DEPTH = (
    '{"e":"depthUpdate","E":1735689600250,"T":1735689600248,"s":"BTCUSDT","U":6543210987654,'
    '"u":6543210988123,"pu":6543210987601,"b":[["93540.00","4.213"],["93530.50","0"]],'
    '"a":[["93540.10","1.870"]]}'
)
KLINE = (
    '{"e":"kline","E":1735689660001,"s":"BTCUSDT","k":{"t":1735689600000,"T":1735689659999,'
    '"s":"BTCUSDT","i":"1m","f":4321098700,"L":4321099912,"o":"93576.00000000",'
    '"c":"93610.12000000","h":"93640.00000000","l":"93550.01000000","v":"12.48311000","n":1213,'
    '"x":true,"q":"1168554.23780150","V":"6.90215000","Q":"646112.45711020","B":"0"}}'
)


def wrap(stream: str, data: str) -> str:
    return f'{{"stream":"{stream}","data":{data}}}'


def test_spot_aggtrade_keeps_exact_strings_and_best_match():
    rec = FrameDecoder("spot").decode(wrap("btcusdt@aggTrade", SPOT_AGG), 42)
    assert rec == Trade(
        "binance", "spot", "BTCUSDT", 3345678901, "93576.00000000", "0.00120000", 4321098765,
        4321098767, 1735689600122, False, True, 1735689600123, 42,
    )  # fmt: skip


def test_usdm_aggtrade_without_m_and_with_nq():
    rec = FrameDecoder("usdm").decode(wrap("btcusdt@aggTrade", USDM_AGG).encode(), 1)
    assert isinstance(rec, Trade)
    assert rec.is_best_match is None and rec.price == "93540.10" and rec.quantity == "0.125"
    assert rec.is_buyer_maker is True and rec.trade_id == 2456789012


def test_microsecond_times_are_normalised_to_ms():
    us = SPOT_AGG.replace('"E":1735689600123', '"E":1735689600123456').replace(
        '"T":1735689600122', '"T":1735689600122987'
    )
    rec = FrameDecoder("spot").decode(wrap("btcusdt@aggTrade", us), 1)
    assert (rec.event_time, rec.transact_time) == (1735689600123, 1735689600122)
    k_us = (
        KLINE.replace("1735689600000", "1735689600000000")
        .replace("1735689659999", "1735689659999999")
        .replace("1735689660001", "1735689660001000")
    )
    kl = FrameDecoder("spot").decode(wrap("btcusdt@kline_1m", k_us), 1)
    assert (kl.open_time, kl.close_time, kl.event_time) == (
        1735689600000,
        1735689659999,
        1735689660001,
    )


def test_spot_and_usdm_diff_depth():
    spot = FrameDecoder("spot").decode(wrap("btcusdt@depth@100ms", SPOT_DEPTH), 1)
    assert isinstance(spot, DepthUpdate)
    assert spot.prev_update_id is None and spot.transact_time is None
    assert spot.bids[1] == ("93570.00000000", "0.00000000")
    fut = FrameDecoder("usdm").decode(wrap("btcusdt@depth", USDM_DEPTH), 1)
    assert (fut.first_update_id, fut.last_update_id, fut.prev_update_id) == (
        6543210987654,
        6543210988123,
        6543210987601,
    )
    assert fut.transact_time == 1735689600248 and fut.bids[1] == ("93530.50", "0")


def test_partial_depth_told_by_stream_name_not_event_type():
    spot_partial = (
        '{"lastUpdateId":58123456789,"bids":[["93575.99000000","1.20431000"]],'
        '"asks":[["93576.00000000","0.35210000"]]}'
    )
    snap = FrameDecoder("spot").decode(wrap("btcusdt@depth5@100ms", spot_partial), 7)
    assert snap == BookSnapshot(
        "binance", "spot", "BTCUSDT", 58123456789, 0, 7, [("93575.99000000", "1.20431000")],
        [("93576.00000000", "0.35210000")],
    )  # fmt: skip
    # USD-M partials carry e=depthUpdate; only the stream name says "partial".
    fut = FrameDecoder("usdm").decode(wrap("btcusdt@depth5@100ms", USDM_DEPTH), 7)
    assert isinstance(fut, BookSnapshot) and fut.last_update_id == 6543210988123
    diff = FrameDecoder("usdm").decode(wrap("btcusdt@depth@100ms", USDM_DEPTH), 7)
    assert isinstance(diff, DepthUpdate)


def test_kline_fields():
    rec = FrameDecoder("spot").decode(wrap("btcusdt@kline_1m", KLINE), 3)
    assert rec == Kline(
        "binance", "spot", "BTCUSDT", "1m", 1735689600000, 1735689659999, "93576.00000000",
        "93640.00000000", "93550.01000000", "93610.12000000", "12.48311000", "1168554.23780150",
        1213, "6.90215000", "646112.45711020", True, 1735689660001, 3,
    )  # fmt: skip


def test_non_data_events_are_exposed_not_returned():
    d = FrameDecoder("spot")
    assert d.decode('{"result":null,"id":1}', 1) is None
    assert d.event == ControlResponse(1, None)
    assert d.decode('{"result":["btcusdt@aggTrade"],"id":"abc"}', 1) is None
    assert d.event == ControlResponse("abc", ["btcusdt@aggTrade"])
    assert d.decode('{"code":2,"msg":"Invalid request: too many parameters","id":5}', 1) is None
    assert d.event == ControlError(2, "Invalid request: too many parameters", 5)
    shutdown = '{"e":"serverShutdown","E":1770123456789}'
    assert d.decode(wrap("!serverShutdown", shutdown), 1) is None
    assert d.event == ServerShutdown(1770123456789)
    assert d.decode(shutdown, 1) is None and isinstance(d.event, ServerShutdown)
    spot_bt = (
        '{"u":58123456789,"s":"BTCUSDT","b":"93575.99000000","B":"1.20431000",'
        '"a":"93576.00000000","A":"0.35210000"}'
    )
    assert d.decode(wrap("btcusdt@bookTicker", spot_bt), 1) is None
    assert isinstance(d.event, BookTickerEvent) and d.event.e is None
    fut_bt = (
        '{"e":"bookTicker","u":6543210988123,"E":1735689600251,"T":1735689600248,"s":"BTCUSDT",'
        '"b":"93540.00","B":"4.213","a":"93540.10","A":"1.870"}'
    )
    assert FrameDecoder("usdm").decode(wrap("btcusdt@bookTicker", fut_bt), 1) is None
    trade = (
        '{"e":"trade","E":1735689600123,"s":"BTCUSDT","t":4321098767,"p":"93576.00000000",'
        '"q":"0.00050000","T":1735689600122,"m":false,"M":true}'
    )
    assert d.decode(wrap("btcusdt@trade", trade), 1) is None
    assert isinstance(d.event, TradeEvent) and d.event.t == 4321098767


def test_raw_unwrapped_events_decode():
    d = FrameDecoder("spot")
    assert isinstance(d.decode(SPOT_AGG, 1), Trade)
    assert isinstance(d.decode(SPOT_DEPTH, 1), DepthUpdate)
    assert isinstance(d.decode(KLINE, 1), Kline)


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTr', "json"),
        (b"not json at all", "json"),
        (b"[1,2,3]", "schema"),
        (b"{}", "schema"),
        (wrap("btcusdt@aggTrade", '{"e":"aggTrade","E":1}').encode(), "schema"),
        (
            wrap("btcusdt@aggTrade", SPOT_AGG.replace('"p":"93576.00000000"', '"p":93576.0')),
            "schema",
        ),
        (wrap("btcusdt@markPrice", "{}").encode(), "unknown_stream"),
        (wrap("nosymbol", "{}").encode(), "unknown_stream"),
        (b'{"e":"somethingNew","E":1}', "unknown_event"),
    ],
)
def test_malformed_frames_raise_frame_error_with_kind(frame, kind):
    with pytest.raises(FrameError) as info:
        FrameDecoder("spot").decode(frame, 1)
    assert info.value.kind == kind


def test_unknown_market_rejected():
    with pytest.raises(ValueError, match="unknown Binance market"):
        FrameDecoder("coinm")


def test_rest_decoders():
    snap = decode_depth_snapshot(
        b'{"lastUpdateId":1027024,"bids":[["4.00000000","431.00000000"]],'
        b'"asks":[["4.00000200","12.00000000"]]}', "BNBBTC", "spot", 9,
    )  # fmt: skip
    assert snap.last_update_id == 1027024 and snap.bids == [("4.00000000", "431.00000000")]
    trades = decode_agg_trades(
        b'[{"a":26129,"p":"0.01633102","q":"4.70443515","f":27781,"l":27781,'
        b'"T":1498793709153,"m":true,"M":true},{"a":26130,"p":"0.1","q":"1","f":27782,'
        b'"l":27783,"T":1498793709154,"m":false}]', "BNBBTC", "usdm", 9,
    )  # fmt: skip
    assert [t.trade_id for t in trades] == [26129, 26130]
    assert trades[0].price == "0.01633102" and trades[1].is_best_match is None
    klines = decode_klines(
        b'[[1499040000000,"0.01634790","0.80000000","0.01575800","0.01577100",'
        b'"148976.11427815",1499644799999,"2434.19055334",308,"1756.87402397",'
        b'"28.46694368","0"]]', "BNBBTC", "1m", "spot", 9,
    )  # fmt: skip
    assert klines[0].open_time == 1499040000000 and klines[0].close == "0.01577100"
    assert klines[0].closed and klines[0].event_time == 1499644799999
    err = decode_rest_error(b'{"code":-1121,"msg":"Invalid symbol."}')
    assert err is not None and err.code == -1121
    assert decode_rest_error(b"<html>") is None


# --------------------------------------------------------------------------- captures


def _capture_frames(name: str) -> tuple[str, list[tuple[float, str]]]:
    path = CF / f"{name}.ws.1.0"
    lines = path.read_text().splitlines()
    frames = []
    for line in lines[1:]:
        if not line.strip():
            continue
        ts, _, frame = line.partition(": ")
        frames.append((float(ts), frame))
    return lines[0], frames


def _replay(name: str, market: str):
    _, frames = _capture_frames(name)
    decoder = FrameDecoder(market)
    out = []
    for ts, frame in frames:
        rec = decoder.decode(frame, int(ts * 1000))
        out.append(rec if rec is not None else decoder.event)
    return frames, out


@pytest.mark.parametrize(
    ("name", "market"),
    [("BINANCE", "spot"), ("BINANCE_US", "spot"), ("BINANCE_FUTURES", "usdm"),
     ("BINANCE_DELIVERY", "usdm")],
)  # fmt: skip
def test_capture_every_frame_decodes_and_aggtrades_match_exactly(name, market):
    frames, out = _replay(name, market)
    assert len(out) == len(frames)
    raw_aggs = []
    for _, frame in frames:
        env = msgspec.json.decode(frame)
        if env["stream"].endswith("@aggTrade"):
            raw_aggs.append(env["data"])
    trades = [r for r in out if isinstance(r, Trade)]
    assert len(trades) == len(raw_aggs) > 0
    for rec, raw in zip(trades, raw_aggs, strict=True):
        assert (rec.symbol, rec.trade_id, rec.price, rec.quantity) == (
            raw["s"],
            raw["a"],
            raw["p"],
            raw["q"],
        )
        assert (rec.first_trade_id, rec.last_trade_id, rec.transact_time) == (
            raw["f"],
            raw["l"],
            raw["T"],
        )
        assert rec.is_buyer_maker == raw["m"] and rec.is_best_match == raw.get("M")
    by_symbol: dict[str, list[int]] = {}
    for t in trades:
        by_symbol.setdefault(t.symbol, []).append(t.trade_id)
    for symbol, ids in by_symbol.items():
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"{name} {symbol} ids not contiguous"


def test_capture_futures_golden_aggtrade_ranges_and_closed_klines():
    _, out = _replay("BINANCE_FUTURES", "usdm")
    trades = [r for r in out if isinstance(r, Trade)]
    sushi = [t.trade_id for t in trades if t.symbol == "SUSHIUSDT"]
    assert (sushi[0], sushi[-1], len(sushi)) == (87353230, 87353269, 40)
    assert len([t for t in trades if t.symbol == "CTKUSDT"]) == 38
    closed = [r for r in out if isinstance(r, Kline) and r.closed]
    assert sorted(k.symbol for k in closed) == ["AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT"]
    sushi_k = next(k for k in closed if k.symbol == "SUSHIUSDT")
    assert (sushi_k.open_time, sushi_k.close, sushi_k.volume, sushi_k.count) == (
        1626992700000,
        "7.6170",
        "3005",
        113,
    )


def test_capture_spot_us_closed_kline_and_depth_counts():
    frames, out = _replay("BINANCE_US", "spot")
    closed = [r for r in out if isinstance(r, Kline) and r.closed]
    assert [k.symbol for k in closed] == ["OMGBUSD"]
    depth_frames = sum(1 for _, f in frames if "@depth@100ms" in f)
    assert sum(isinstance(r, DepthUpdate) for r in out) == depth_frames


def test_capture_rest_snapshots_decode():
    path = CF / "BINANCE_FUTURES.http.0.0"
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        url, _, rest = line.partition(" -> ")
        _, _, body = rest.partition(": ")
        symbol = url.split("symbol=")[1].split("&")[0]
        snap = decode_depth_snapshot(body.encode(), symbol, "usdm", 0)
        assert snap.last_update_id > 0 and snap.event_time > 0 and len(snap.bids) > 0


def test_capture_exchange_info_decodes():
    path = CF / "BINANCE_FUTURES.0"
    first = path.read_text().splitlines()[0]
    body = first.partition(" -> ")[2].partition(": ")[2]
    info = decode_exchange_info(body.encode())
    assert info.request_weight_per_minute() == 2400
    symbols = {s.symbol: s for s in info.symbols}
    assert symbols["SUSHIUSDT"].status == "TRADING" and symbols["SUSHIUSDT"].quoteAsset == "USDT"


def test_hftbacktest_spot_frames_decode():
    path = DATA / "hftbacktest_examples/spot_btcusdt_20240808.gz"
    decoder = FrameDecoder("spot")
    counts = {"depth": 0, "trade": 0, "ticker": 0, "snapshot": 0}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            _, _, frame = line.rstrip("\n").partition(" ")
            if frame.startswith('{"lastUpdateId"'):
                decode_depth_snapshot(frame.encode(), "BTCUSDT", "spot", 0)
                counts["snapshot"] += 1
                continue
            rec = decoder.decode(frame, 0)
            if isinstance(rec, DepthUpdate):
                counts["depth"] += 1
            elif isinstance(decoder.event, TradeEvent):
                counts["trade"] += 1
            elif isinstance(decoder.event, BookTickerEvent):
                counts["ticker"] += 1
    assert counts["snapshot"] >= 1 and counts["trade"] > 0 and counts["ticker"] > 0
    # README golden: 2 dropped before the snapshot + 3449 applied (there may be more after).
    assert counts["depth"] >= 3451
