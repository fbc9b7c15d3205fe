"""``streamer verify``: trees written by the real CSV sink, clean and with each fault."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from streamer import hookimpl
from streamer.cli import build_app
from streamer.core.api import Sink, SinkContext
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, DepthUpdate, Kline, Marker, Trade
from streamer.plugins.sinks import _csv_verify as integrity
from streamer.plugins.sinks._csv_verify import render_table, verify
from streamer.plugins.sinks.csv_batch import CsvSink, Options

DAY = 86_400_000
T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
JAN_2026 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC
SPOT_TRADES = "binance/spot/aggTrades/BTCUSDT"


# -- building trees through the sink ---------------------------------------------------------
def write(root: Path, *records, gzip: bool = False) -> None:
    """Write ``records`` with a fresh csv sink at ``root`` (one batch, flushed, closed)."""
    ctx = SinkContext(name="csv", counters=Counters(), logger=logging.getLogger("test.verify"))
    sink = CsvSink(Options(path=str(root), gzip=gzip), ctx)

    async def go() -> None:
        await sink.open()
        await sink.write(list(records))
        await sink.flush()
        await sink.close()

    asyncio.run(go())


def trades(market: str, ids, t0: int = T0, symbol: str = "BTCUSDT") -> list[Trade]:
    spot = market == "spot"
    return [
        Trade(
            "binance",
            market,
            symbol,
            i,
            f"{100 + i % 7}.50000000",
            "0.01000000",
            3 * i,
            3 * i + 2,
            t0 + n * 1000,
            n % 2 == 0,
            True if spot else None,
            t0 + n * 1000 + 1,
            t0 + n * 1000 + 5,
        )
        for n, i in enumerate(ids)
    ]


def klines(market: str, interval: str, opens: list[int]) -> list[Kline]:
    return [
        Kline(
            "binance",
            market,
            "BTCUSDT",
            interval,
            t,
            t + 59_999,
            "1.0",
            "2.0",
            "0.5",
            "1.5",
            "10",
            "15",
            7,
            "4",
            "6",
            True,
            t + 60_000,
            t + 60_003,
        )
        for t in opens
    ]


def depth(market: str, ids: list[tuple[int, int, int | None]], t0: int = T0) -> list[DepthUpdate]:
    """Events from ``(first_update_id, last_update_id, prev_update_id)`` triples."""
    futures = market == "usdm"
    out = []
    for n, (first, last, pu) in enumerate(ids):
        bids = [("100.5", "1.0"), ("100.4", "0")] if n % 3 else []
        asks = [("100.6", "2.0")] if n % 2 else []
        out.append(
            DepthUpdate(
                "binance",
                market,
                "ETHUSDT",
                t0 + n * 100,
                t0 + n * 100 - 1 if futures else None,
                first,
                last,
                pu if futures else None,
                bids,
                asks,
                t0 + n * 100 + 3,
            )
        )
    return out


def spot_chain(n: int, start: int = 1000) -> list[tuple[int, int, None]]:
    out, last = [], start
    for i in range(n):
        first, last = last + 1, last + 1 + i % 3
        out.append((first, last, None))
    return out


def usdm_chain(n: int, start: int = 1000) -> list[tuple[int, int, int]]:
    # USD-M: first ids jump (many updates per event), only pu == previous u links events.
    out, last = [], start
    for i in range(n):
        first, pu, last = last + 5 + i, last, last + 10 + i
        out.append((first, last, pu))
    return out


def books(market: str, n: int, t0: int = T0, uid0: int = 5000) -> list[BookSnapshot]:
    return [
        BookSnapshot(
            "binance",
            market,
            "BTCUSDT",
            uid0 + 7 * i,
            t0 + i * 1000,
            t0 + i * 1000 + 4,
            [("9.5", "1"), ("9.4", "2")],
            [("10.0", "3"), ("10.1", "4")],
        )
        for i in range(n)
    ]


def marker(market: str, stream: str, kind: str, first: int, last: int, reason: str = "x"):
    return Marker("binance", market, "BTCUSDT", stream, kind, first, last, T0 + 5, reason)


def clean_tree(root: Path, market: str, gz: bool) -> None:
    chain = spot_chain(40) if market == "spot" else usdm_chain(40)
    write(
        root,
        *trades(market, range(100, 160)),
        *trades(market, range(160, 170), t0=T0 + DAY),  # the next day's file
        *klines(market, "1m", [T0 + i * 60_000 for i in range(30)]),
        *depth(market, chain),
        *books(market, 10),
        marker(market, "orderbook", "resync", 0, 0, 'startup, "first"'),
        gzip=gz,
    )


def cli(args: list[str]):
    return CliRunner().invoke(build_app(), ["verify", *args])


def stream(report, market: str, name: str, symbol: str = "BTCUSDT"):
    (found,) = [s for s in report.streams if (s.market, s.symbol, s.stream) == (market, symbol,
                                                                              name)]  # fmt: skip
    return found


def errors(report) -> list[integrity.Problem]:
    return [p for s in report.streams for p in s.problems if not p.explained_by]


# -- clean data ------------------------------------------------------------------------------
@pytest.mark.parametrize("market", ["spot", "usdm"])
@pytest.mark.parametrize("gz", [False, True])
def test_clean_tree_passes_with_stats(tmp_path: Path, market: str, gz: bool) -> None:
    clean_tree(tmp_path, market, gz)
    if gz:
        assert list(tmp_path.rglob("*.csv.gz")) and not list(tmp_path.rglob("*.csv"))
    report = verify(tmp_path)
    assert errors(report) == [] and report.exit_code == 0
    agg = stream(report, market, "aggtrade")
    assert (agg.files, agg.rows, agg.first_key, agg.last_key) == (2, 70, 100, 169)
    assert (agg.first_time, agg.last_time) == (T0, T0 + DAY + 9000)
    kl = stream(report, market, "kline_1m")
    assert (kl.rows, kl.first_key, kl.last_key) == (30, T0, T0 + 29 * 60_000)
    dp = stream(report, market, "depth", "ETHUSDT")
    assert dp.last_key == (spot_chain(40) if market == "spot" else usdm_chain(40))[-1][1]
    assert stream(report, market, "orderbook").rows == 10
    assert stream(report, market, "orderbook").markers == {"resync": 1}

    result = cli([str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 0 and doc["errors"] == 0 and doc["rows"] == report.rows
    table = cli([str(tmp_path)])
    assert table.exit_code == 0
    assert f"binance/{market}/BTCUSDT/aggtrade" in table.stdout and "OK" in table.stdout


def test_hourly_files_are_read_in_period_order(tmp_path: Path) -> None:
    ctx = SinkContext(name="csv", counters=Counters(), logger=logging.getLogger("test.verify"))
    sink = CsvSink(Options(path=str(tmp_path), rotation="hourly"), ctx)
    hour = 3_600_000
    tr = trades("usdm", range(1, 4), t0=T0 + 10 * hour) + trades("usdm", [4, 5], T0 + 11 * hour)

    async def go() -> None:
        await sink.open()
        for t in tr:  # one flush per trade, two hourly files
            await sink.write([t])
            await sink.flush()
        await sink.close()

    asyncio.run(go())
    names = sorted(p.name for p in (tmp_path / "binance/usdm/aggTrades/BTCUSDT").iterdir())
    assert names == ["BTCUSDT-aggTrades-2026-11-23-10.csv", "BTCUSDT-aggTrades-2026-11-23-11.csv"]
    result = cli([str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stdout
    (doc,) = json.loads(result.stdout)["streams"]
    assert (doc["files"], doc["rows"], doc["first_key"], doc["last_key"]) == (2, 5, 1, 5)


def test_json_lists_problems_with_their_explanation(tmp_path: Path) -> None:
    write(
        tmp_path,
        *trades("spot", [1, 2, 5, 6, 9]),
        marker("spot", "aggtrade", "overflow", 3, 4, "runtime queue overflow"),
    )
    result = cli([str(tmp_path), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert (doc["exit_code"], doc["errors"], doc["explained"]) == (1, 1, 1)
    agg = next(s for s in doc["streams"] if s["stream"] == "aggtrade")
    assert agg["markers"] == {"overflow": 1}
    assert [(p["first"], p["last"], p["explained_by"]) for p in agg["problems"]] == [
        (3, 4, "overflow 3-4 (runtime queue overflow)"),
        (7, 8, ""),
    ]


# -- aggTrades -------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_aggtrade_gap_is_an_error_naming_the_range(tmp_path: Path, gz: bool) -> None:
    write(tmp_path, *trades("spot", [*range(100, 105), *range(110, 120)]), gzip=gz)
    result = cli([str(tmp_path)])
    assert result.exit_code == 1
    assert "ERROR: binance/spot/BTCUSDT/aggtrade: gap 105-109 (5 ids missing)" in result.stdout
    ext = ".csv.gz" if gz else ".csv"
    assert f"BTCUSDT-aggTrades-2026-11-23{ext}:7" in result.stdout  # the row after the gap
    (p,) = errors(verify(tmp_path))
    assert (p.kind, p.first, p.last, p.count) == ("gap", 105, 109, 5)


@pytest.mark.parametrize("kind", ["filled", "unfillable"])
def test_gap_covered_by_a_marker_is_explained(tmp_path: Path, kind: str) -> None:
    write(
        tmp_path,
        *trades("usdm", [*range(100, 105), *range(110, 120)]),
        marker("usdm", "aggtrade", kind, 105, 109, "rest gave nothing"),
    )
    result = cli([str(tmp_path)])
    assert result.exit_code == 0, result.stdout
    assert f"explained by {kind} 105-109 (rest gave nothing)" in result.stdout
    report = verify(tmp_path)
    agg = stream(report, "usdm", "aggtrade")
    assert (agg.errors, agg.explained, agg.markers) == (0, 1, {kind: 1})


def test_partial_or_foreign_marker_coverage_is_still_an_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        *trades("spot", [*range(100, 105), *range(110, 120)]),
        marker("spot", "aggtrade", "unfillable", 105, 107),  # misses 108-109
        marker("spot", "depth", "gap", 100, 200),  # another stream
        marker("spot", "aggtrade", "verify_mismatch", 100, 200),  # not a gap kind
    )
    report = verify(tmp_path)
    assert report.exit_code == 1
    assert [(p.first, p.last) for p in errors(report)] == [(105, 109)]
    # Two adjacent markers together cover it.
    write(tmp_path, marker("spot", "aggtrade", "filled", 108, 109))
    report = verify(tmp_path)
    assert report.exit_code == 0
    (p,) = stream(report, "spot", "aggtrade").problems
    assert p.explained_by == "unfillable 105-107 (x); filled 108-109 (x)"


def test_duplicate_ids_across_a_day_boundary(tmp_path: Path) -> None:
    # The sink never writes a key twice itself: the overlap comes from another tree's file.
    write(tmp_path / "a", *trades("spot", range(100, 110), t0=T0 + DAY - 20_000))
    write(tmp_path / "b", *trades("spot", range(105, 115), t0=T0 + DAY))
    day2 = "BTCUSDT-aggTrades-2026-11-24.csv"
    shutil.copy(tmp_path / "b" / SPOT_TRADES / day2, tmp_path / "a" / SPOT_TRADES / day2)
    report = verify(tmp_path / "a")
    assert report.exit_code == 1
    (p,) = errors(report)
    assert (p.kind, p.first, p.last, p.count, p.file, p.line) == ("duplicate", 105, 109, 5, day2, 2)
    assert stream(report, "spot", "aggtrade").rows == 20


def test_small_blocks_and_quoted_cells_keep_the_sequence(tmp_path, monkeypatch) -> None:
    tr = trades("usdm", [*range(1, 200), *range(205, 300)])
    tr[50] = msgspec.structs.replace(tr[50], price="1,5", quantity='2"\n3')  # quoted by the sink
    write(tmp_path, *tr)
    monkeypatch.setattr(integrity, "_BLOCK", 97)  # rows and quoted cells cut across blocks
    report = verify(tmp_path)
    (p,) = errors(report)
    assert (p.kind, p.first, p.last) == ("gap", 200, 204)
    assert stream(report, "usdm", "aggtrade").rows == len(tr)


def test_line_numbers_past_quoted_cells_and_bad_rows(tmp_path: Path) -> None:
    tr = trades("spot", range(1, 11))
    tr[3] = msgspec.structs.replace(tr[3], quantity='2"\n3')  # one row on lines 5-6
    write(tmp_path, *tr)
    (path,) = (tmp_path / SPOT_TRADES).iterdir()
    last = path.read_bytes().rsplit(b"\n", 2)[1]
    with path.open("ab") as f:
        f.write(b"x,y\n" + b"15" + last[2:] + b"\n")  # line 13 malformed, line 14 id 15
    report = verify(tmp_path)
    found = [(p.kind, p.line, p.first, p.last) for p in errors(report)]
    assert found == [("bad_row", 13, 0, 0), ("gap", 14, 11, 14)]
    assert stream(report, "spot", "aggtrade").rows == 11


def test_gzip_members_across_small_blocks(tmp_path: Path, monkeypatch) -> None:
    # Each sink run appends one gzip member per flush to the same day's file.
    write(tmp_path, *trades("spot", range(1, 40)), gzip=True)
    write(tmp_path, *trades("spot", range(40, 90), t0=T0 + 60_000), gzip=True)
    write(tmp_path, *trades("spot", range(95, 120), t0=T0 + 120_000), gzip=True)
    (path,) = (tmp_path / SPOT_TRADES).iterdir()
    assert path.read_bytes().count(b"\x1f\x8b\x08") >= 3
    monkeypatch.setattr(integrity, "_GZ_BLOCK", 37)
    monkeypatch.setattr(integrity, "_GZ_OUT", 101)
    report = verify(tmp_path)
    assert stream(report, "spot", "aggtrade").rows == 39 + 50 + 25
    assert [(p.kind, p.first, p.last) for p in errors(report)] == [("gap", 90, 94)]


# -- klines ----------------------------------------------------------------------------------
def test_kline_gap_and_duplicate_by_open_time(tmp_path: Path) -> None:
    opens = [T0 + i * 60_000 for i in (0, 1, 2, 5, 6)]
    write(tmp_path, *klines("spot", "1m", opens))
    write(tmp_path / "x", *klines("spot", "1m", [T0 + DAY - 60_000]))
    write(tmp_path / "y", *klines("spot", "1m", [T0 + DAY - 60_000, T0 + DAY]))
    report = verify(tmp_path)
    (p,) = errors(report)
    assert (p.kind, p.first, p.last, p.count) == ("gap", T0 + 3 * 60_000, T0 + 4 * 60_000, 2)
    write(tmp_path, marker("spot", "kline_1m", "unfillable", T0 + 3 * 60_000, T0 + 4 * 60_000))
    assert verify(tmp_path).exit_code == 0


def test_monthly_klines_follow_calendar_months(tmp_path: Path) -> None:
    months = [JAN_2026]
    for days in (31, 28, 31, 30):  # Jan, Feb (2026), Mar, Apr
        months.append(months[-1] + days * DAY)
    write(tmp_path / "ok", *klines("usdm", "1M", months))
    assert verify(tmp_path / "ok").exit_code == 0
    write(tmp_path / "gap", *klines("usdm", "1M", [months[0], months[3], months[4]]))
    (p,) = errors(verify(tmp_path / "gap"))
    assert (p.kind, p.first, p.last, p.count) == ("gap", months[1], months[2], 2)


# -- depth -----------------------------------------------------------------------------------
def test_spot_depth_chain_break_and_its_marker(tmp_path: Path) -> None:
    chain = spot_chain(10)
    chain[6] = (chain[6][0] + 3, chain[6][1] + 3, None)  # 3 update ids lost
    chain[7:] = [(f + 3, la + 3, None) for f, la, _ in chain[7:]]
    write(tmp_path, *depth("spot", chain))
    (p,) = errors(verify(tmp_path))
    lost = chain[5][1] + 1
    assert (p.kind, p.first, p.last) == ("break", lost, lost + 2)
    assert f"expected first_update_id {lost}, got first_update_id {lost + 3}" in p.detail
    # The depth stream's own marker for that break (same range) explains it.
    m = Marker("binance", "spot", "ETHUSDT", "depth", "gap", lost, lost + 2, T0, "sequence break")
    write(tmp_path, m)
    report = verify(tmp_path)
    assert report.exit_code == 0 and stream(report, "spot", "depth", "ETHUSDT").explained == 1


def test_depth_break_explained_by_a_marker_of_dropped_events(tmp_path: Path) -> None:
    # The sink's "disk full" and the runtime's overflow markers name the dropped events'
    # last update ids: inside the hole of update ids, not all of it.
    chain = usdm_chain(10)
    dropped = chain[4:6]
    write(tmp_path, *depth("usdm", chain[:4] + chain[6:]))
    (p,) = errors(verify(tmp_path))
    assert (p.kind, p.first, p.last) == ("break", chain[3][1] + 1, chain[6][0] - 1)
    m = Marker("binance", "usdm", "ETHUSDT", "depth", "gap", dropped[0][1], dropped[1][1], T0,
               "disk full")  # fmt: skip
    write(tmp_path, m)
    assert verify(tmp_path).exit_code == 0
    # A marker elsewhere does not.
    other = tmp_path / "other"
    write(other, *depth("usdm", chain[:4] + chain[6:]))
    write(other, msgspec.structs.replace(m, first_key=chain[8][1], last_key=chain[9][1]))
    assert verify(other).exit_code == 1


def test_usdm_depth_links_by_prev_update_id(tmp_path: Path) -> None:
    chain = usdm_chain(10)  # first ids jump: fine on usdm, a break under the spot rule
    write(tmp_path / "ok", *depth("usdm", chain))
    assert verify(tmp_path / "ok").exit_code == 0
    bad = list(chain)
    f, la, pu = bad[4]
    bad[4] = (f, la, pu - 1)  # pu no longer the previous event's last id
    write(tmp_path / "bad", *depth("usdm", bad))
    (p,) = errors(verify(tmp_path / "bad"))
    assert p.kind == "break" and f"expected prev_update_id {pu}, got prev_update_id {pu - 1}" in (
        p.detail
    )


# -- orderbook -------------------------------------------------------------------------------
def test_crossed_book_rows_compare_numerically(tmp_path: Path) -> None:
    bk = books("spot", 4)  # bid "9.5" < ask "10.0": crossed as strings, not as numbers
    bk[2] = msgspec.structs.replace(bk[2], bids=[("10.00", "1")], asks=[("10.0", "1")])
    write(tmp_path, *bk)
    report = verify(tmp_path)
    (p,) = errors(report)
    assert (p.kind, p.first, p.line) == ("crossed", bk[2].last_update_id, 4)
    write(tmp_path, marker("spot", "orderbook", "resync", bk[2].last_update_id, 0, "crossed"))
    report = verify(tmp_path)
    assert report.exit_code == 0
    assert stream(report, "spot", "orderbook").problems[0].explained_by == (
        f"resync {bk[2].last_update_id} (crossed)"
    )


def test_book_update_ids_must_increase(tmp_path: Path) -> None:
    write(tmp_path / "a", *books("usdm", 3, t0=T0 + DAY - 10_000, uid0=9000))
    write(tmp_path / "b", *books("usdm", 2, t0=T0 + DAY, uid0=8000))
    day2 = "BTCUSDT-orderbook-2026-11-24.csv"
    folder = "binance/usdm/orderbook/BTCUSDT"
    shutil.copy(tmp_path / "b" / folder / day2, tmp_path / "a" / folder / day2)
    kinds = [(p.kind, p.first) for p in errors(verify(tmp_path / "a"))]
    assert kinds == [("order", 8000), ("order", 8007)]


# -- files -----------------------------------------------------------------------------------
def test_torn_last_line_plain_and_gzip(tmp_path: Path) -> None:
    write(tmp_path / "plain", *trades("spot", range(1, 11)))
    path = tmp_path / "plain" / SPOT_TRADES / "BTCUSDT-aggTrades-2026-11-23.csv"
    with path.open("ab") as f:
        f.write(b"11,100.5,0.0")  # a crash in the middle of a write
    result = cli([str(tmp_path / "plain")])
    assert result.exit_code == 1
    assert "torn (torn last line (12 bytes))" in result.stdout
    assert stream(verify(tmp_path / "plain"), "spot", "aggtrade").rows == 10

    write(tmp_path / "gz", *trades("spot", range(1, 11)), gzip=True)
    path = tmp_path / "gz" / SPOT_TRADES / "BTCUSDT-aggTrades-2026-11-23.csv.gz"
    write(tmp_path / "more", *trades("spot", range(11, 200)), gzip=True)
    rows = gzip.decompress((tmp_path / "more" / SPOT_TRADES / path.name).read_bytes())
    member = gzip.compress(rows.split(b"\n", 1)[1])  # a later flush, cut by a crash
    with path.open("ab") as f:
        f.write(member[: len(member) // 2])
    (p,) = errors(verify(tmp_path / "gz"))
    assert p.kind == "torn" and p.detail.startswith("torn last gzip member (")


def test_unexpected_header_is_reported_and_skipped(tmp_path: Path) -> None:
    write(tmp_path, *trades("spot", range(1, 5)))
    other = tmp_path / SPOT_TRADES / "BTCUSDT-aggTrades-2026-11-24.csv"
    other.write_text("id,price\n5,1.0\n")
    (p,) = errors(verify(tmp_path))
    assert p.kind == "header" and p.file == other.name and "id,price" in p.detail


def test_missing_or_empty_dir_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "nope", tmp_path / "file", tmp_path):
        result = cli([str(target)])
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output


def test_table_lists_marker_counts(tmp_path: Path) -> None:
    write(
        tmp_path,
        *trades("spot", range(1, 5)),
        marker("spot", "aggtrade", "filled", 10, 20),
        marker("spot", "aggtrade", "filled", 30, 40),
        marker("spot", "aggtrade", "gap", 50, 60),
    )
    table = render_table(verify(tmp_path))
    (line,) = [x for x in table.splitlines() if x.startswith("binance/spot/BTCUSDT/aggtrade")]
    assert line.endswith("filled=2 gap=1")


# -- dispatch to the sink type that wrote the files ------------------------------------------
class _ProbeSink(Sink):
    """A sink type that brings its own checker: reports the path and a fixed exit code."""

    async def write(self, batch) -> None:
        pass

    async def flush(self) -> None:
        pass

    @classmethod
    def verify(cls, path, *, as_json: bool = False) -> tuple[str, int]:
        if not Path(path).is_dir():
            raise ValueError(f"{path}: no probe data here")
        return (json.dumps({"probe": str(path)}) if as_json else f"probe checked {path}"), 1


def _probe_plugin(monkeypatch) -> None:
    """Install an inline plugin module (``verify_probe``) registering sinks ``probe`` and
    ``mute`` (no checker), the way ``STREAMER_PLUGIN_MODULES`` adds development plugins."""
    module = types.ModuleType("verify_probe")

    class _MuteSink(_ProbeSink):
        verify = Sink.verify

    @hookimpl
    def register_sinks(register) -> None:
        register("probe", _ProbeSink)
        register("mute", _MuteSink)

    module.register_sinks = register_sinks  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "verify_probe", module)
    monkeypatch.setenv("STREAMER_PLUGIN_MODULES", "verify_probe")


def test_verify_dispatches_to_the_named_sink_types_checker(tmp_path: Path, monkeypatch) -> None:
    _probe_plugin(monkeypatch)
    result = cli([str(tmp_path), "--sink", "probe"])
    assert (result.exit_code, result.stdout) == (1, f"probe checked {tmp_path}\n")
    result = cli([str(tmp_path), "--sink", "probe", "--json"])
    assert json.loads(result.stdout) == {"probe": str(tmp_path)}
    result = cli([str(tmp_path / "nope"), "--sink", "probe"])  # the checker's ValueError
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"error: {tmp_path / 'nope'}: no probe data here\n"


def test_verify_defaults_to_the_csv_sink(tmp_path: Path, monkeypatch) -> None:
    _probe_plugin(monkeypatch)  # other sink types installed do not change the default
    write(tmp_path, *trades("spot", range(1, 5)))
    result = cli([str(tmp_path)])
    assert result.exit_code == 0 and "binance/spot/BTCUSDT/aggtrade" in result.stdout
    assert cli([str(tmp_path), "--sink", "csv"]).stdout == result.stdout


@pytest.mark.parametrize(
    ("sink", "message"),
    [
        ("mute", "error: sink type 'mute' cannot check its files\n"),
        (
            "nope",
            "error: unknown sink 'nope'; available: csv, mute, nats, parquet, postgres, probe\n",
        ),
    ],
)
def test_verify_with_a_sink_type_that_cannot_check_is_bad_input(
    tmp_path: Path, monkeypatch, sink: str, message: str
) -> None:
    _probe_plugin(monkeypatch)
    result = cli([str(tmp_path), "--sink", sink])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", message)
