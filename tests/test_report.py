"""``streamer report``: coverage, gaps with causes, counts, pictures, from a sink's files."""

from __future__ import annotations

import calendar
import csv
import io
import itertools
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import write_sim_config
from typer.testing import CliRunner

from streamer.cli import build_app
from streamer.core.config import load_config
from streamer.core.quality import Progress, percentile
from streamer.core.runtime import run
from streamer.testing.faults import FaultPlan

T0 = calendar.timegm((2026, 1, 1, 0, 0, 0)) * 1000
AGG_HEADER = ("agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
              "is_buyer_maker,is_best_match,event_time,receive_time")  # fmt: skip
DEPTH_HEADER = ("event_time,transact_time,first_update_id,last_update_id,prev_update_id,side,"
                "price,quantity,receive_time")  # fmt: skip
KLINE_HEADER = ("open_time,open,high,low,close,volume,close_time,quote_volume,count,"
                "taker_buy_volume,taker_buy_quote_volume,event_time,receive_time")  # fmt: skip
BOOK_HEADER = "last_update_id,event_time,receive_time,bid_price_0,bid_qty_0,ask_price_0,ask_qty_0"
MARKER_HEADER = "time,stream,kind,first_key,last_key,reason"


def _write(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in [header, *rows]))


def build_tree(root: Path) -> None:
    """Two minutes of spot data with known holes (times: T0 + seconds):

    * AAA aggtrade, one trade a second, ids 1-120 at T0 + (id - 1) s, receive 5 ms later:
      20-22 filled (present), 41-50 missing with an ``unfillable`` marker, 81-85 missing
      with no marker (unexplained);
    * AAA depth, one event a second of two rows (bid, ask), update ids 1000 + 2j..+1; events
      60-61 missing, a ``gap`` marker "restart" over their ids;
    * AAA kline_1m: the two bars of the window;
    * BBB orderbook, one book a second with keys 5000 + j; rows 30-34 missing, a ``resync``
      marker from key 5030 (end unknown).
    """
    day = "2026-01-01"
    spot = root / "binance" / "spot"
    agg = []
    for i in range(1, 121):
        if 41 <= i <= 50 or 81 <= i <= 85:
            continue
        t = T0 + (i - 1) * 1000
        agg.append(f"{i},1.5,2,{i},{i},{t},false,true,{t},{t + 5}")
    _write(spot / f"aggTrades/AAA/AAA-aggTrades-{day}.csv", AGG_HEADER, agg)
    depth = []
    for j in range(120):
        if j in (60, 61):
            continue
        t = T0 + j * 1000
        first, last = 1000 + 2 * j, 1001 + 2 * j
        depth.append(f"{t},,{first},{last},,b,1.0,3,{t + 20}")
        depth.append(f"{t},,{first},{last},,a,1.1,4,{t + 20}")
    _write(spot / f"depth/AAA/AAA-depth-{day}.csv", DEPTH_HEADER, depth)
    klines = [
        f"{T0 + k * 60000},1,1,1,1,1,{T0 + k * 60000 + 59999},1,1,1,1,"
        f"{T0 + k * 60000 + 60000},{T0 + k * 60000 + 60002}"
        for k in (0, 1)
    ]
    _write(spot / f"klines/AAA/1m/AAA-1m-{day}.csv", KLINE_HEADER, klines)
    book = [
        f"{5000 + j},{T0 + j * 1000},{T0 + j * 1000 + 3},1.0,1,1.1,1"
        for j in range(120)
        if not 30 <= j <= 34
    ]
    _write(spot / f"orderbook/BBB/BBB-orderbook-{day}.csv", BOOK_HEADER, book)
    _write(spot / f"markers/AAA/AAA-markers-{day}.csv", MARKER_HEADER, [
        f"{T0 + 21500},aggtrade,filled,20,22,gap",
        f"{T0 + 50500},aggtrade,unfillable,41,50,rest gave nothing",
        f"{T0 + 62500},depth,gap,1120,1123,restart",
    ])  # fmt: skip
    _write(spot / f"markers/BBB/BBB-markers-{day}.csv", MARKER_HEADER,
           [f"{T0 + 29500},orderbook,resync,5030,0,sequence gap"])  # fmt: skip


def report(tmp_path: Path, *args: str) -> tuple[int, str, str, dict | None, str]:
    out_html, out_json = tmp_path / "r.html", tmp_path / "r.json"
    result = CliRunner().invoke(
        build_app(), ["report", *args, "-o", str(out_html), "--json", str(out_json)]
    )
    doc = json.loads(out_json.read_text()) if out_json.exists() else None
    page = out_html.read_text() if out_html.exists() else ""
    return result.exit_code, result.stdout, result.stderr, doc, page


def stream(doc: dict, symbol: str, name: str) -> dict:
    (found,) = [s for s in doc["streams"] if s["symbol"] == symbol and s["stream"] == name]
    return found


def test_known_gaps_give_exactly_those_gaps_causes_and_coverage(tmp_path: Path) -> None:
    build_tree(tmp_path / "data")
    code, out, err, doc, _ = report(tmp_path, str(tmp_path / "data"))
    assert code == 0, err
    window = 119_001  # first row T0 to last row T0 + 119 s, end exclusive
    assert doc["window"]["from_ms"] == T0 and doc["window"]["to_ms"] == T0 + window

    agg = stream(doc, "AAA", "aggtrade")
    got = [(g["kind"], g["cause"], g["first_key"], g["last_key"], g["first_time"],
            g["last_time"], g["explained"], g["missing"]) for g in agg["gaps"]]  # fmt: skip
    assert got == [
        ("marker", "filled", 20, 22, T0 + 19_000, T0 + 21_000, True, False),
        ("gap", "unfillable", 41, 50, T0 + 39_000, T0 + 50_000, True, True),
        ("gap", "unexplained", 81, 85, T0 + 79_000, T0 + 85_000, False, True),
    ]
    assert agg["coverage"] == pytest.approx(1 - (11_000 + 6_000) / window)
    assert agg["unexplained"] == 1
    (day,) = agg["days"]
    assert day["rows"] == day["messages"] == 105 and sum(day["rows_per_minute"]) == 105
    assert day["rows_per_minute"][:2] == [50, 55] and day["complete"] is False
    assert [h["cause"] for h in day["holes"]] == ["unfillable", "unexplained"]
    (hour,) = day["latency_ms"]
    assert hour == {"hour": 0, "samples": 105, "p50": 5, "p99": 5, "max": 5}
    assert day["markers"] == {"filled": 1, "unfillable": 1}

    depth = stream(doc, "AAA", "depth")
    assert [(g["kind"], g["cause"], g["first_key"], g["last_key"], g["first_time"],
             g["last_time"], g["explained"]) for g in depth["gaps"]] == [
        ("break", "restart", 1120, 1123, T0 + 59_000, T0 + 62_000, True)
    ]  # fmt: skip
    assert depth["coverage"] == pytest.approx(1 - 3_000 / window)
    assert depth["days"][0]["rows"] == 236 and depth["days"][0]["messages"] == 118
    assert depth["days"][0]["complete"] is False  # not full coverage, though explained

    kline = stream(doc, "AAA", "kline_1m")
    assert kline["coverage"] == 1.0 and kline["gaps"] == []
    assert kline["days"][0]["klines"] == {"closed": 2, "expected": 2}
    assert kline["days"][0]["complete"] is True

    book = stream(doc, "BBB", "orderbook")
    assert [(g["kind"], g["cause"], g["first_key"], g["last_key"], g["first_time"],
             g["last_time"], g["missing"]) for g in book["gaps"]] == [
        ("marker", "resync", 5030, 0, T0 + 29_000, T0 + 35_000, True)
    ]  # fmt: skip
    assert book["coverage"] == pytest.approx(1 - 6_000 / window)
    assert book["days"][0]["book"]["resyncs"] == 1

    s = doc["summary"]
    assert (s["streams"], s["stream_days"], s["complete_stream_days"]) == (4, 4, 1)
    assert s["unexplained"] == 1 and s["gaps"] == 5
    assert s["by_cause"] == {"filled": 1, "resync": 1, "restart": 1, "unexplained": 1,
                             "unfillable": 1}  # fmt: skip
    assert s["worst_symbols"][0]["symbol"] == "binance/spot/AAA"
    assert s["bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "data").rglob("*.csv") if "markers" not in p.parts
    )
    assert "complete: 1/4 stream-days" in out and "unexplained: 1" in out


class _Checker(HTMLParser):
    """Nesting of elements, and every src/href value."""

    VOID = {"meta", "br", "img", "hr", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.refs: list[str] = []
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        self.svgs += tag == "svg"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_is_valid_self_contained_and_has_the_pictures(tmp_path: Path) -> None:
    build_tree(tmp_path / "data")
    code, _, err, _, page = report(tmp_path, str(tmp_path / "data"))
    assert code == 0, err
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert page.startswith("<!DOCTYPE html>")
    assert checker.svgs >= 4  # worst symbols, coverage, rates, latency
    assert not [r for r in checker.refs if r.startswith(("http:", "https:", "//"))]
    assert "<script" not in page and "<link" not in page
    assert "81-85" in page and "unexplained" in page


def test_many_symbols_get_a_heat_map(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for n in range(60):
        rows = [f"{i},1,1,{i},{i},{T0 + i * 1000},false,true,{T0 + i * 1000},{T0 + i * 1000}"
                for i in range(1, 100) if not (n == 7 and 50 <= i <= 70)]  # fmt: skip
        _write(root / f"binance/spot/aggTrades/S{n:03d}/S{n:03d}-aggTrades-2026-01-01.csv",
               AGG_HEADER, rows)  # fmt: skip
    code, out, err, doc, page = report(tmp_path, str(root))
    assert code == 0, err
    assert "<image" in page and "share of time with data" in page  # imshow, inline data
    assert doc["summary"]["worst_symbols"][0]["symbol"] == "binance/spot/S007"
    assert "binance/spot/S007" in out


def test_from_to_and_symbols_narrow_the_report(tmp_path: Path) -> None:
    build_tree(tmp_path / "data")
    code, _, err, doc, _ = report(
        tmp_path, str(tmp_path / "data"), "--symbols", "aaa", "--from", "2026-01-01T00:00",
        "--to", "2026-01-01T00:01",
    )  # fmt: skip
    assert code == 0, err
    assert {s["symbol"] for s in doc["streams"]} == {"AAA"}
    assert doc["window"]["to_ms"] == T0 + 60_000
    agg = stream(doc, "AAA", "aggtrade")
    assert [g["cause"] for g in agg["gaps"]] == ["filled", "unfillable"]  # 81-85 is later
    assert agg["days"][0]["rows"] == 50


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda root: root.mkdir(), [], "no files of the csv sink's layout found"),
        (lambda root: None, [], "no such directory"),
        (lambda root: _write(root / "binance/spot/aggTrades/AAA/AAA-aggTrades-2026-01-01.csv",
                             AGG_HEADER, []), [], "the files hold no rows"),
        (build_tree, ["--symbols", "ZZZ"], "no files for symbol(s) ZZZ (the tree holds AAA, BBB)"),
        (build_tree, ["--from", "2027-01-01"], "no files in the period asked for"),
        (build_tree, ["--from", "yesterday"], "bad date 'yesterday'"),
        (build_tree, ["--from", "2026-01-02", "--to", "2026-01-01"], "is not after --from"),
    ],
)  # fmt: skip
def test_empty_and_bad_input_give_one_clear_line(tmp_path, setup, args, message) -> None:
    root = tmp_path / "data"
    setup(root)
    code, out, err, doc, _ = report(tmp_path, str(root), *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in out + err and doc is None


def test_partial_tree_reports_what_is_there_and_names_empty_streams(tmp_path: Path) -> None:
    build_tree(tmp_path / "data")
    _write(tmp_path / "data/binance/spot/aggTrades/CCC/CCC-aggTrades-2026-01-01.csv",
           AGG_HEADER, [])  # fmt: skip
    torn = tmp_path / "data/binance/spot/aggTrades/BBB/BBB-aggTrades-2026-01-01.csv"
    _write(torn, AGG_HEADER, [f"1,1,1,1,1,{T0},false,true,{T0},{T0}"])
    torn.write_text(torn.read_text() + "2,1,1")
    code, out, err, doc, _ = report(tmp_path, str(tmp_path / "data"))
    assert code == 0, err
    assert "note: binance/spot/CCC/aggtrade: no rows" in out
    bbb = stream(doc, "BBB", "aggtrade")
    assert [(g["kind"], g["cause"]) for g in bbb["gaps"]] == [("torn", "unexplained")]
    assert stream(doc, "CCC", "aggtrade")["coverage"] == 0.0


def test_without_matplotlib_json_and_text_still_work(tmp_path: Path, monkeypatch) -> None:
    build_tree(tmp_path / "data")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err, doc, page = report(tmp_path, str(tmp_path / "data"))
    assert code == 0, err
    assert "no pictures: pip install 'market-streamer[report]'" in out
    assert doc["summary"]["unexplained"] == 1
    assert "<svg" not in page and "market-streamer[report]" in page


def test_progress_line_counts_files_rows_and_time_left() -> None:
    clock = iter([0.0, 0.0, 2.0, 2.0]).__next__
    out = io.StringIO()
    p = Progress(out, interval=0.0, clock=clock)
    p.begin(4, 1000)
    p.advance(files=1, rows=2_000_000, bytes_=250)
    assert out.getvalue().endswith("files 1/4, 2.0M rows, 1.0M rows/s, 25% read, 6s left")
    p.done()
    assert out.getvalue().endswith("\r")


def test_verify_and_report_are_quiet_when_piped(tmp_path: Path) -> None:
    build_tree(tmp_path / "data")
    result = CliRunner().invoke(build_app(), ["verify", str(tmp_path / "data")])
    assert result.exit_code == 1 and "\r" not in result.stderr + result.stdout
    code, out, err, _, _ = report(tmp_path, str(tmp_path / "data"))
    assert code == 0 and err == "" and "\r" not in out


def test_percentile_is_the_bucket_upper_bound() -> None:
    counts = [0] * 40
    counts[5], counts[10] = 98, 2  # 98 at <= 5 ms, 2 at <= 15 ms
    assert percentile(counts, 0.5) == 5 and percentile(counts, 0.99) == 15
    assert percentile([0] * 40, 0.5) is None


@pytest.mark.timeout(90)
@pytest.mark.binance_sim(trade_probability=1.0, tick_ms=20,
                         faults=FaultPlan(drop_aggtrade_every=9))  # fmt: skip
def test_simulator_dropped_trades_show_as_unfillable_gaps(tmp_path: Path, binance_sim) -> None:
    config = write_sim_config(
        tmp_path, binance_sim, symbols=["BTCUSDT"], streams={"aggtrade": {"backfill": False}}
    )
    assert run(load_config(config), ["binance", "csv"], duration=3.0) == 0
    rows: list[list[str]] = []
    for path in sorted((tmp_path / "data/binance/spot/aggTrades/BTCUSDT").glob("*.csv")):
        rows += list(csv.reader(io.StringIO(path.read_text())))[1:]
    ids = [int(r[0]) for r in rows]
    # transact_time in ms (microseconds when the spot server was asked for them)
    times = {int(r[0]): t // 1000 if (t := int(r[5])) >= 10**14 else t for r in rows}
    holes = [(a + 1, b - 1) for a, b in itertools.pairwise(ids) if b != a + 1]
    assert holes, "the simulator dropped no trade"
    dropped = sum(v for (name, *_), v in binance_sim.truth.counters().items()
                  if name == "fault_aggtrade_dropped")  # fmt: skip
    assert dropped >= len(holes)
    code, _, err, doc, _ = report(tmp_path, str(tmp_path / "data"))
    assert code == 0, err
    agg = stream(doc, "BTCUSDT", "aggtrade")
    assert [(g["first_key"], g["last_key"]) for g in agg["gaps"]] == holes
    assert {(g["kind"], g["cause"], g["explained"]) for g in agg["gaps"]} == {
        ("gap", "unfillable", True)
    }
    assert [(g["first_time"], g["last_time"]) for g in agg["gaps"]] == [
        (times[a - 1], times[b + 1]) for a, b in holes
    ]
    window = doc["window"]["to_ms"] - doc["window"]["from_ms"]
    lost = sum(times[b + 1] - times[a - 1] for a, b in holes)
    assert agg["coverage"] == pytest.approx(1 - lost / window)
    assert doc["summary"]["unexplained"] == 0
