"""``streamer report --sink parquet``: the same records written through the csv and the
parquet sink give the same report facts (gaps and causes, coverage, counts per minute,
latency, klines); only bytes, file counts and file locations differ."""

from __future__ import annotations

import asyncio
import calendar
import io
import json
import logging
from pathlib import Path

import pytest
from test_report import _Checker
from typer.testing import CliRunner

from streamer.cli import build_app
from streamer.core.api import SinkContext
from streamer.core.counters import Counters
from streamer.core.quality import Progress
from streamer.core.records import BookSnapshot, DepthUpdate, Kline, Marker, Trade
from streamer.plugins.sinks import _parquet_verify, csv_batch, parquet_sink

T0 = calendar.timegm((2026, 11, 23, 0, 0, 0)) * 1000
MK, SYM = "usdm", "BTCUSDT"
#: Keys that name or measure the files (and the time of the report): they differ.
FILE_KEYS = {"bytes", "files", "where", "root", "generated"}


def _trade(i: int) -> Trade:
    t = T0 - 40_000 + (i - 1) * 1000  # ids 1-40 on the day before T0
    return Trade("binance", MK, SYM, i, f"{100 + i}.5", "0.001", 3 * i, 3 * i + 2, t,
                 i % 2 == 0, None, t + 1, t + 1 + (i % 7) * 4)  # fmt: skip


def _depth(i: int) -> DepthUpdate:
    shift = 100 if i >= 15 else 0  # a break after event 14, a restart marker explains it
    u = 10 * (i + 1) + shift
    t = T0 + i * 500
    bids = [] if i == 7 else [("99.5", "1.25"), ("99.25", "3")]
    asks = [] if i == 7 else [("100.75", "0.5")]
    return DepthUpdate("binance", MK, SYM, t, t, u - 9, u, u - 10, bids, asks, t + 2 + i % 3)


def _kline(k: int) -> Kline:
    o = T0 + k * 60_000
    return Kline("binance", MK, SYM, "1m", o, o + 59_999, "1.5", "2.25", "1", "2", "10",
                 "20.5", 7, "4", "8.125", True, o + 60_005, o + 60_020)  # fmt: skip


def _book(i: int) -> BookSnapshot:
    t = T0 + i * 1000 + (30_000 if i >= 20 else 0)  # 31 s without a book after the 20th
    return BookSnapshot("binance", MK, SYM, 1000 + i, t, t + 3,
                        [("99.5", "1"), ("99.25", "2")], [("100.75", "1.5")])  # fmt: skip


def _marker(stream: str, kind: str, first: int, last: int, t: int, reason: str) -> Marker:
    return Marker("binance", MK, SYM, stream, kind, first, last, t, reason)  # type: ignore[arg-type]


def records() -> tuple[list, list]:
    """Two write sessions: the second one's files stay open (a running collector)."""
    trades = [_trade(i) for i in range(1, 101) if not (30 <= i <= 34 or 60 <= i <= 69)]
    first = [
        *trades,
        *(_depth(i) for i in range(30)),
        *(_kline(k) for k in range(10) if k != 5),  # 5: a missing bar, no marker
        *(_book(i) for i in range(40)),
        _marker("aggtrade", "filled", 10, 12, T0 - 20_000, "backfilled from REST"),
        _marker("aggtrade", "unfillable", 30, 34, T0 - 5_000, "REST window expired"),
        _marker("depth", "gap", 151, 250, T0 + 8_000, "rows lost at restart"),
        _marker("orderbook", "resync", 1020, 0, T0 + 50_000, "sequence gap"),
    ]
    second = [_trade(i) for i in range(101, 111)]
    return first, second


def write_both(root: Path) -> tuple[Path, Path]:
    csv_root, pq_root = root / "csv", root / "pq"
    first, second = records()

    def ctx() -> SinkContext:
        return SinkContext(name="s", counters=Counters(), logger=logging.getLogger("test"))

    def sinks():
        return [
            csv_batch.CsvSink(csv_batch.Options(path=str(csv_root)), ctx()),
            parquet_sink.ParquetSink(parquet_sink.Options(path=str(pq_root)), ctx()),
        ]

    async def scenario():
        for sink in sinks():
            await sink.open()
            await sink.write(first)
            await sink.close()
        for sink in sinks():
            await sink.open()
            await sink.write(second)
            await sink.flush()  # not closed: the parquet rows stay in an open segment

    asyncio.run(scenario())
    assert list(pq_root.rglob("_open-*.arrows")) and list(pq_root.rglob("part-*.parquet"))
    return csv_root, pq_root


def report(tmp_path: Path, data: Path, *args: str) -> tuple[int, str, str, dict | None, str]:
    out_html, out_json = tmp_path / f"{data.name}.html", tmp_path / f"{data.name}.json"
    result = CliRunner().invoke(
        build_app(), ["report", str(data), *args, "-o", str(out_html), "--json", str(out_json)]
    )
    doc = json.loads(out_json.read_text()) if out_json.exists() else None
    page = out_html.read_text() if out_html.exists() else ""
    return result.exit_code, result.stdout, result.stderr, doc, page


def data_facts(doc):
    """``doc`` without what names or measures the files."""
    if isinstance(doc, dict):
        return {k: data_facts(v) for k, v in doc.items() if k not in FILE_KEYS}
    if isinstance(doc, list):
        return [data_facts(v) for v in doc]
    return doc


def stream(doc: dict, name: str) -> dict:
    (found,) = [s for s in doc["streams"] if s["stream"] == name]
    return found


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    return write_both(tmp_path)


def test_parquet_report_facts_equal_the_csv_reports(tmp_path: Path, trees) -> None:
    csv_root, pq_root = trees
    code, _, err, want, _ = report(tmp_path, csv_root)
    assert code == 0, err
    code, out, err, got, page = report(tmp_path, pq_root, "--sink", "parquet")
    assert code == 0, err
    assert data_facts(got) == data_facts(want)

    # The facts compared are the ones the records were built to show.
    agg = stream(got, "aggtrade")
    assert [(g["kind"], g["cause"], g["first_key"], g["last_key"]) for g in agg["gaps"]] == [
        ("marker", "filled", 10, 12),
        ("gap", "unfillable", 30, 34),
        ("gap", "unexplained", 60, 69),
    ]
    assert [d["rows"] for d in agg["days"]] == [35, 60]  # both days, the open segment's too
    assert agg["days"][1]["latency_ms"][0]["samples"] == 60
    depth = stream(got, "depth")
    assert [(g["kind"], g["cause"]) for g in depth["gaps"]] == [("break", "restart")]
    day = {d["day"]: d for d in depth["days"]}["2026-11-23"]
    assert day["rows"] == 29 * 3 + 1 and day["messages"] == 30  # an empty event: one row
    kline = stream(got, "kline_1m")
    assert [g["kind"] for g in kline["gaps"]] == ["gap"]
    assert [d["klines"]["closed"] for d in kline["days"]] == [0, 9]
    book = stream(got, "orderbook")
    assert [g["cause"] for g in book["gaps"]] == ["resync"]
    assert got["summary"]["unexplained"] == 2

    # Bytes are the parquet files' own.
    on_disk = sum(p.stat().st_size for p in pq_root.rglob("*") if p.is_file()
                  and "stream=markers" not in str(p))  # fmt: skip
    assert got["summary"]["bytes"] == on_disk != want["summary"]["bytes"]

    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == [] and page.startswith("<!DOCTYPE html>")
    assert "60-69" in page and "unexplained" in page
    assert "complete:" in out


def test_small_batches_give_the_same_facts(tmp_path: Path, trees, monkeypatch) -> None:
    """Read 3 rows at a time, gaps and markers fall across batch boundaries."""
    _, pq_root = trees
    _, _, err, whole, _ = report(tmp_path, pq_root, "--sink", "parquet")
    monkeypatch.setattr(_parquet_verify, "_BATCH_ROWS", 3)
    code, _, err, small, _ = report(tmp_path, pq_root, "--sink", "parquet")
    assert code == 0, err
    assert small is not None and whole is not None
    small.pop("generated"), whole.pop("generated")
    assert small == whole


def test_from_to_and_symbols_narrow_a_parquet_report(tmp_path: Path, trees) -> None:
    csv_root, pq_root = trees
    narrow = ["--symbols", "btcusdt", "--from", "2026-11-23T00:00", "--to", "2026-11-23T00:01"]
    _, _, err, want, _ = report(tmp_path, csv_root, *narrow)
    code, _, err, got, _ = report(tmp_path, pq_root, "--sink", "parquet", *narrow)
    assert code == 0, err
    assert data_facts(got) == data_facts(want)
    assert got["window"]["to_ms"] == T0 + 60_000
    assert [d["rows"] for d in stream(got, "aggtrade")["days"]] == [50]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "a parquet sink's tree (exchange=... folders), not a csv one: add --sink parquet"),
        (["--sink", "parquet", "--symbols", "ETHUSDT"],
         "no files for symbol(s) ETHUSDT (the tree holds BTCUSDT)"),
        (["--sink", "parquet", "--from", "2027-01-01"], "no files in the period asked for"),
    ],
)  # fmt: skip
def test_wrong_sink_or_filters_give_one_clear_line(tmp_path, trees, args, message) -> None:
    _, pq_root = trees
    code, out, err, doc, _ = report(tmp_path, pq_root, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in out + err and doc is None


def test_empty_folder_as_parquet_tree_gives_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err, doc, _ = report(tmp_path, tmp_path / "empty", "--sink", "parquet")
    assert code == 2 and doc is None
    assert err.startswith("error: ") and "no files of the parquet sink's layout" in err


def test_progress_counts_every_parquet_file_row_and_byte(trees) -> None:
    _, pq_root = trees
    progress = Progress(io.StringIO(), interval=0.0)
    facts = list(parquet_sink.ParquetSink.report_facts(pq_root, progress=progress))
    files = [p for p in pq_root.rglob("*") if p.name.startswith(("part-", "_open-"))]
    assert progress.total_files == progress.files == len(files) == 8
    assert progress.total_bytes == progress.bytes == sum(p.stat().st_size for p in files)
    assert progress.rows == sum(f.rows for f in facts) == 95 + 88 + 9 + 40
