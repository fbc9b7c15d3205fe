"""Status view: rates, flags and rendering from fixture status documents."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamer.core.ops.status_view import (
    BEHIND,
    LAGGING,
    RESTARTED,
    RESYNC,
    SILENT,
    STALLED,
    UNRESPONSIVE,
    LiveSummary,
    StatusError,
    StatusHistory,
    StatusView,
    Thresholds,
    build_view,
    read_document,
    render_json,
    render_summary,
    render_table,
    sample,
)

NOW_MS = 1_764_000_100_000


def make_doc(**changes: Any) -> dict[str, Any]:
    """A status document shaped like the runtime's (streamer/core/runtime/status_file.py)."""
    doc: dict[str, Any] = {
        "pid": 0,
        "started_at": NOW_MS - 100_000,
        "updated_at": NOW_MS,
        "state": "running",
        "exit_code": None,
        "pipelines": {
            "spot": {
                "exchange": "binance",
                "market": "spot",
                "symbols": ["BTCUSDT", "ETHUSDT"],
                "totals": {"records_emitted": 3000, "ws_messages": 3500},
                "streams": {
                    "BTCUSDT": {
                        "aggtrade": {
                            "records_emitted": 1000,
                            "gaps_filled": 2,
                            "trades_backfilled": 40,
                            "gaps_unfillable": 1,
                            "last_event_time": NOW_MS - 500,
                        },
                        "orderbook": {
                            "records_emitted": 100,
                            "books_emitted": 100,
                            "resyncs": 1,
                            "verifications": 4,
                        },
                        "*": {"rest_snapshots": 3},
                    },
                    "ETHUSDT": {"aggtrade": {"records_emitted": 1900}},
                },
                "process": {"ws_reconnects": 2, "rest_weight_used": 120},
            }
        },
        "sinks": {
            "csv": {
                "type": "csv",
                "totals": {"records_written": 2990, "rows_written": 2900},
                "streams": {
                    "BTCUSDT": {"aggtrade": {"records_written": 995, "rows_written": 990}},
                    "ETHUSDT": {"aggtrade": {"records_written": 1895, "rows_written": 1890}},
                },
                "process": {"rows_written": 2900, "write_errors": 0},
                "high_water": {},
            }
        },
        "children": {
            "sink.csv": _child("writer", 11, info={"queue_depth": 2}),
            "spot.worker0": _child("worker", 12, info={"queue_depths": {"csv": 3}}),
        },
    }
    doc.update(changes)
    return doc


def _child(kind: str, pid: int, **changes: Any) -> dict[str, Any]:
    child = {
        "kind": kind,
        "pid": pid,
        "alive": True,
        "incarnation": 1,
        "restarts": 0,
        "last_exit_code": None,
        "uptime": 99.0,
        "info": {},
    }
    child.update(changes)
    return child


def view_of(doc, **kwargs) -> StatusView:
    kwargs.setdefault("now", NOW_MS / 1000 + 0.5)
    kwargs.setdefault("check_pid", False)
    return build_view(doc, **kwargs)


def row(view: StatusView, symbol: str, stream: str):
    return next(r for r in view.streams if (r.symbol, r.stream) == (symbol, stream))


def test_rows_columns_come_from_the_published_counters():
    view = view_of(make_doc())
    assert view.health == "healthy", view.problems
    pipe = view.pipelines[0]
    assert (pipe.name, pipe.messages, pipe.ws_messages) == ("spot", 3000, 3500)
    assert (pipe.reconnects, pipe.rest_weight_used, pipe.queue_depth) == (2, 120, 3)
    assert (pipe.workers, pipe.workers_running) == (1, 1)
    btc = row(view, "BTCUSDT", "aggtrade")
    assert (btc.messages, btc.written, btc.flushed) == (1000, 995, 990)
    assert (btc.gaps_found, btc.gaps_filled, btc.backfilled) == (3, 2, 40)
    assert btc.last_event_time == NOW_MS - 500 and btc.lag == pytest.approx(0.5)
    book = row(view, "BTCUSDT", "orderbook")
    assert (book.resyncs, book.verifications, book.written) == (1, 4, None)
    # "*" (counters of a symbol not tied to a stream) is not a stream row.
    assert [(r.symbol, r.stream) for r in view.streams] == [
        ("BTCUSDT", "aggtrade"),
        ("BTCUSDT", "orderbook"),
        ("ETHUSDT", "aggtrade"),
    ]
    sink = view.sinks[0]
    assert (sink.written, sink.flushed, sink.queue_depth) == (2990, 2900, 2)
    # A sink counting rows only per stream: the sum over its streams.
    doc = make_doc()
    del doc["sinks"]["csv"]["process"]["rows_written"]
    assert view_of(doc).sinks[0].flushed == 990 + 1890


def test_rates_over_two_documents_and_over_the_age_with_one():
    first = make_doc()
    second = copy.deepcopy(first)
    second["updated_at"] = NOW_MS + 2000
    second["pipelines"]["spot"]["totals"]["records_emitted"] = 3400
    second["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]["records_emitted"] = 1300
    second["sinks"]["csv"]["totals"]["records_written"] = 3390
    view = view_of(second, prev=first, now=NOW_MS / 1000 + 2)
    assert view.window == pytest.approx(2.0)
    assert view.pipelines[0].rate == pytest.approx(200.0)
    assert row(view, "BTCUSDT", "aggtrade").rate == pytest.approx(150.0)
    assert view.sinks[0].rate == pytest.approx(200.0)
    single = view_of(first)
    assert single.window == 0
    assert single.pipelines[0].rate == pytest.approx(3000 / 100.0)


def test_a_counter_reset_by_a_restart_gives_a_rate_from_the_new_value():
    first = make_doc()
    second = copy.deepcopy(first)
    second["updated_at"] = NOW_MS + 1000
    second["pipelines"]["spot"]["totals"]["records_emitted"] = 50  # worker restarted
    view = view_of(second, prev=first)
    assert view.pipelines[0].rate == pytest.approx(50.0)


def test_a_stream_without_messages_long_after_start_is_silent():
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["ETHUSDT"]["aggtrade"]["records_emitted"] = 0
    view = view_of(doc)
    assert SILENT in row(view, "ETHUSDT", "aggtrade").flags
    assert view.health == "degraded"
    assert "spot ETHUSDT aggtrade is silent" in view.problems
    # Right after start it is not (yet) silent.
    young = make_doc(started_at=NOW_MS - 5_000)
    young["pipelines"]["spot"]["streams"]["ETHUSDT"]["aggtrade"]["records_emitted"] = 0
    assert row(view_of(young), "ETHUSDT", "aggtrade").flags == []


def test_an_old_last_event_is_lagging_and_silent_when_nothing_arrives():
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]["last_event_time"] = NOW_MS - 30_000
    assert row(view_of(doc), "BTCUSDT", "aggtrade").flags == [LAGGING]
    # The same lag with no new message over the window: idle that long, so silent.
    prev = copy.deepcopy(doc)
    later = copy.deepcopy(doc)
    later["updated_at"] = NOW_MS + 1000
    btc = later["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]
    btc["last_event_time"] = NOW_MS - 90_000
    view = view_of(later, prev=prev)
    assert row(view, "BTCUSDT", "aggtrade").flags == [SILENT]
    th = Thresholds(silent_after=120, lag_after=100)
    assert row(view_of(later, prev=prev, thresholds=th), "BTCUSDT", "aggtrade").flags == []


def test_an_order_book_that_never_synced_is_flagged_resync():
    doc = make_doc()
    book = doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["orderbook"]
    book.update(books_emitted=0, records_emitted=0, updates_buffered=500)
    view = view_of(doc, thresholds=Thresholds(silent_after=1000))
    assert row(view, "BTCUSDT", "orderbook").flags == [RESYNC]
    assert view.health == "degraded"


def test_history_flags_a_book_whose_output_stalls_while_updates_pile_up():
    history = StatusHistory()
    th = Thresholds(resync_after=10, silent_after=1000)
    doc = make_doc()
    book = doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["orderbook"]
    flags = []
    for step in range(4):
        doc = copy.deepcopy(doc)
        doc["updated_at"] = NOW_MS + step * 6000
        book = doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["orderbook"]
        book["updates_buffered"] = 100 * step  # books_emitted stays at 100
        view = view_of(doc, history=history, thresholds=th, now=doc["updated_at"] / 1000)
        flags.append(row(view, "BTCUSDT", "orderbook").flags)
    # Stalled since the first read (t=0): 6 s, 12 s, 18 s.
    assert flags == [[], [], [RESYNC], [RESYNC]]


def test_history_measures_idle_time_of_a_stream():
    history = StatusHistory()
    doc = make_doc()
    idles = []
    for step in range(3):
        doc = copy.deepcopy(doc)
        doc["updated_at"] = NOW_MS + step * 40_000
        view = view_of(doc, history=history, now=doc["updated_at"] / 1000)
        idles.append(row(view, "ETHUSDT", "aggtrade").idle)
    assert idles[0] is None and idles[1:] == [40.0, 80.0]
    assert SILENT in row(view, "ETHUSDT", "aggtrade").flags


def test_children_down_or_restarted_degrade_with_a_reason():
    doc = make_doc()
    doc["children"]["spot.worker0"].update(alive=False, restarts=3, last_exit_code=-9)
    view = view_of(doc)
    assert view.health == "degraded"
    assert view.pipelines[0].flags == ["down"]
    assert "spot.worker0 is down (exit code -9), restarts 3" in view.problems
    doc = make_doc()
    doc["children"]["sink.csv"].update(restarts=1, uptime=12.0)
    view = view_of(doc)
    assert RESTARTED in next(c for c in view.children if c.name == "sink.csv").flags
    assert view.health == "degraded"
    doc["children"]["sink.csv"]["uptime"] = 10_000.0  # long ago: healthy again
    assert view_of(doc).health == "healthy"


def test_sink_write_errors_and_drops_are_problems():
    doc = make_doc()
    doc["sinks"]["csv"]["process"].update(write_errors=2, rows_dropped=7)
    view = view_of(doc)
    assert view.health == "degraded"
    assert "sink csv has 2 write error(s)" in view.problems
    assert "sink csv dropped 7 row(s)" in view.problems


def test_stale_stopped_or_dead_collectors_are_down():
    stale = view_of(make_doc(), now=NOW_MS / 1000 + 60)
    assert stale.health == "down"
    assert "status not updated for 60s (stale after 15s)" in stale.problems
    stopped = view_of(make_doc(state="stopped", exit_code=0))
    assert stopped.health == "down"
    assert stopped.problems[0] == "the collector stopped with exit code 0"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = view_of(make_doc(pid=int(dead.stdout)), check_pid=True)
    assert gone.health == "down" and gone.state == "gone"
    assert "is not running" in gone.problems[0]


def test_unknown_or_missing_fields_do_not_break_the_view():
    doc = {
        "pipelines": {"p": {"streams": {"X": {"s": {"odd": "text"}}}, "totals": []}},
        "children": {"c": {"uptime": "soon", "pid": "x", "alive": 1}, "d": []},
        "sinks": [],
    }
    view = build_view(doc, check_pid=False, now=0)
    assert view.streams[0].messages == 0 and view.streams[0].written is None
    assert view.pipelines[0].name == "p"
    assert [(c.name, c.uptime, c.pid, c.state) for c in view.children] == [
        ("c", 0.0, None, "running")
    ]
    assert "-" in render_table(view)


def test_read_document_errors_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(StatusError, match=r"no status at .*not running"):
        read_document(tmp_path / "status.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(StatusError, match="not valid JSON"):
        read_document(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(StatusError, match="not a streamer status document"):
        read_document(tmp_path / "other.json")


def test_table_json_and_summary_render_every_section():
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["ETHUSDT"]["aggtrade"]["records_emitted"] = 0
    view = view_of(doc)
    table = render_table(view)
    for text in ("health DEGRADED", "pipeline", "rest wt", "BTCUSDT", "orderbook", "sink.csv",
                 "silent", "problems:", "spot ETHUSDT aggtrade is silent"):  # fmt: skip
        assert text in table, text
    back = msgspec.json.decode(render_json(view), type=StatusView)
    assert back == view
    summary = render_summary(view)
    assert summary.startswith("[degraded] up 1.7m")
    assert "procs 2/2" in summary and "gaps 2/3 filled" in summary and "flagged 1" in summary
    assert "backfilled 40" in summary


def test_live_summary_prints_at_most_once_per_interval_and_the_final_state():
    out = io.StringIO()
    live = LiveSummary(out, every=3600)
    live(make_doc())
    live(make_doc())  # too soon: skipped
    live(make_doc(state="stopped", exit_code=0))  # the end is always shown
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[")
    live({"pipelines": "garbage"})  # never raises


def test_sample_measures_rates_between_two_publications(tmp_path: Path):
    path = tmp_path / "status.json"
    first = make_doc(updated_at=int(time.time() * 1000))
    path.write_bytes(msgspec.json.encode(first))

    def publish_next() -> None:
        time.sleep(0.2)
        second = copy.deepcopy(first)
        second["updated_at"] = first["updated_at"] + 500
        second["pipelines"]["spot"]["totals"]["records_emitted"] += 100
        tmp = tmp_path / ".tmp"
        tmp.write_bytes(msgspec.json.encode(second))
        tmp.replace(path)

    thread = threading.Thread(target=publish_next)
    thread.start()
    view = sample(path, window=5, check_pid=False)
    thread.join()
    assert view.window == pytest.approx(0.5)
    assert view.pipelines[0].rate == pytest.approx(200.0)
    # A stopped collector publishes nothing more: no waiting, averages since start.
    path.write_bytes(msgspec.json.encode(make_doc(state="stopped")))
    started = time.monotonic()
    assert sample(path, window=5, check_pid=False).window == 0
    assert time.monotonic() - started < 1


# -- monitoring that tells the truth (issue 11, faults 10-13 and the "behind" figure) --------
def table_cells(table: str, column: str, *key: str) -> dict[str, str]:
    """The cells of the row whose first cells are ``key`` in the table section that has a
    ``column`` header (headers of two words are joined with ``_``)."""
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if column in line.split())
    header = lines[at].replace("last event", "last_event").replace("last flush", "last_flush")
    for line in lines[at + 1 :]:
        if not line.strip():
            break
        if tuple(line.split()[: len(key)]) == key:
            return dict(zip(header.split(), line.split(), strict=False))
    raise AssertionError(f"no row {key!r} under {column!r}")


def test_write_errors_a_sink_counts_per_stream_reach_the_sink_row_and_health():
    """Fault 10: the CSV sink counts ``write_errors`` per stream; the row read only the
    process-wide counter, so a full disk showed 0 errors and a healthy collector."""
    doc = make_doc()
    sink = doc["sinks"]["csv"]
    sink["streams"]["BTCUSDT"]["aggtrade"]["write_errors"] = 3
    sink["streams"]["ETHUSDT"]["aggtrade"]["write_errors"] = 4
    sink["totals"]["write_errors"] = 7
    sink["process"]["rows_buffered"] = 120
    view = view_of(doc)
    assert view.sinks[0].write_errors == 7
    assert view.health == "degraded"
    assert "sink csv has 7 write error(s), 120 row(s) wait for a retry" in view.problems
    cells = table_cells(render_table(view), "dups", "csv")
    assert cells["errors"] == "7"
    # A document without totals: the per-stream and process counts are summed.
    del sink["totals"]["write_errors"]
    sink["process"]["write_errors"] = 1
    assert view_of(doc).sinks[0].write_errors == 8


def _kline_doc(lag_ms: int, interval: str = "1m") -> dict[str, Any]:
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"][f"kline_{interval}"] = {
        "records_emitted": 90,
        "last_event_time": NOW_MS - lag_ms,
    }
    return doc


def test_kline_lag_is_judged_against_its_interval_not_the_trade_threshold():
    """Fault 11: a 1m kline stream writes one bar a minute, so its last event is up to 60 s
    old by design; with a flat 10 s threshold health read DEGRADED most of every minute."""
    for lag_ms in (11_000, 50_000, 65_000):
        view = view_of(_kline_doc(lag_ms))
        assert row(view, "BTCUSDT", "kline_1m").flags == [], lag_ms
        assert view.health == "healthy", (lag_ms, view.problems)
    # One interval plus the grace is too old: the bar did not come.
    assert row(view_of(_kline_doc(75_000)), "BTCUSDT", "kline_1m").flags == [LAGGING]
    # An hourly bar is neither lagging nor silent 30 minutes after the last one...
    prev = _kline_doc(30 * 60_000, "1h")
    later = copy.deepcopy(prev)
    later["updated_at"] = NOW_MS + 1000
    later["pipelines"]["spot"]["streams"]["BTCUSDT"]["kline_1h"]["last_event_time"] -= 1000
    view = view_of(later, prev=prev)
    assert row(view, "BTCUSDT", "kline_1h").cadence == 3600
    assert row(view, "BTCUSDT", "kline_1h").flags == []
    # ... nor right after start, before its first bar closed.
    young = _kline_doc(0, "1h")
    young["started_at"] = NOW_MS - 1_800_000
    young["pipelines"]["spot"]["streams"]["BTCUSDT"]["kline_1h"] = {"records_emitted": 0}
    assert row(view_of(young), "BTCUSDT", "kline_1h").flags == []
    # Trades keep the seconds threshold.
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"]["last_event_time"] = NOW_MS - 11_000
    assert row(view_of(doc), "BTCUSDT", "aggtrade").flags == [LAGGING]


def test_a_stream_with_an_interval_option_is_judged_by_the_published_cadence():
    doc = make_doc()
    book = doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["orderbook"]
    book["last_event_time"] = NOW_MS - 40_000
    assert LAGGING in row(view_of(doc), "BTCUSDT", "orderbook").flags
    # The worker says its order books come every 60 s.
    doc["children"]["spot.worker0"]["info"]["cadence"] = {"orderbook": 60.0}
    book_row = row(view_of(doc), "BTCUSDT", "orderbook")
    assert book_row.cadence == 60.0 and book_row.flags == []


def _stalled_doc(since_flush_ms: int, *, rows_pending: int = 0, queued: int = 0) -> dict:
    doc = make_doc()
    doc["sinks"]["csv"]["process"].update(
        last_flush_time=NOW_MS - since_flush_ms,
        flush_interval_ms=1000,
        rows_pending=rows_pending,
    )
    doc["children"]["sink.csv"]["info"]["queue_depth"] = 0
    doc["children"]["spot.worker0"]["info"]["queue_depths"] = {"csv": queued}
    return doc


def test_a_writer_that_stopped_flushing_with_rows_pending_is_degraded():
    """Fault 12: a stopped writer (SIGSTOP) read HEALTHY: nothing looked at its flushes."""
    view = view_of(_stalled_doc(20_000, queued=8))
    sink = view.sinks[0]
    assert sink.flags == [STALLED] and sink.pending == 8
    assert sink.since_flush == pytest.approx(20.0)
    assert view.health == "degraded"
    assert (
        "sink csv has not flushed for 20s with 8 row(s)/batch(es) pending (flush interval 1s)"
        in view.problems
    )
    assert "stalled" in render_table(view)
    # Rows in the sink itself count too.
    assert view_of(_stalled_doc(20_000, rows_pending=50)).sinks[0].flags == [STALLED]
    # Nothing pending: an idle writer is fine however long ago it flushed.
    assert view_of(_stalled_doc(600_000)).health == "healthy"
    # Pending, but flushed within a few intervals: normal.
    assert view_of(_stalled_doc(3_000, queued=8)).health == "healthy"
    # A long flush interval stretches the allowance (5 intervals).
    slow = _stalled_doc(20_000, queued=8)
    slow["sinks"]["csv"]["process"]["flush_interval_ms"] = 10_000
    assert view_of(slow).health == "healthy"


def test_a_child_whose_own_report_is_old_is_unresponsive():
    doc = make_doc()
    doc["children"]["sink.csv"]["info"]["status_time"] = NOW_MS - 30_000
    doc["children"]["spot.worker0"]["info"]["status_time"] = NOW_MS - 900
    view = view_of(doc)
    sink = next(c for c in view.children if c.name == "sink.csv")
    assert sink.flags == [UNRESPONSIVE] and sink.report_age == pytest.approx(30.0)
    assert view.health == "degraded"
    assert "sink.csv has not reported for 30s (stopped or stuck)" in view.problems


def _two_markets_doc() -> dict[str, Any]:
    """BTCUSDT on spot and on USD-M, written by one CSV sink (its writer keys by market)."""
    doc = make_doc()
    spot = doc["pipelines"]["spot"]
    spot["streams"] = {"BTCUSDT": {"aggtrade": {"records_emitted": 1000}}}
    usdm = copy.deepcopy(spot)
    usdm.update(market="usdm")
    usdm["streams"]["BTCUSDT"]["aggtrade"]["records_emitted"] = 70
    doc["pipelines"]["usdm"] = usdm
    doc["children"]["usdm.worker0"] = _child("worker", 13)
    both = {"records_written": 1070, "records_flushed": 1060}
    doc["sinks"]["csv"] = {
        "type": "csv",
        "totals": {"records_written": 1070, "rows_written": 1060},
        "streams": {"BTCUSDT": {"aggtrade": {**both, "rows_written": 1060}}},
        "markets": {
            "binance/spot": {"BTCUSDT": {"aggtrade": {"records_written": 1000,
                                                      "records_flushed": 995}}},
            "binance/usdm": {"BTCUSDT": {"aggtrade": {"records_written": 70,
                                                      "records_flushed": 65}}},
        },
        "process": {"rows_written": 1060},
        "high_water": {},
    }  # fmt: skip
    return doc


def test_spot_and_usdm_rows_of_one_symbol_keep_their_own_sink_counts():
    """Fault 13: the sink's counts were matched by (symbol, stream) only, so the spot and
    the USD-M rows of BTCUSDT both showed the sum of the two markets."""
    view = view_of(_two_markets_doc())
    rows = {(r.pipeline, r.symbol, r.stream): r for r in view.streams}
    spot, usdm = rows["spot", "BTCUSDT", "aggtrade"], rows["usdm", "BTCUSDT", "aggtrade"]
    assert (spot.messages, spot.written, spot.flushed) == (1000, 1000, 995)
    assert (usdm.messages, usdm.written, usdm.flushed) == (70, 70, 65)
    back = msgspec.json.decode(render_json(view))
    assert [(r["pipeline"], r["written"], r["flushed"]) for r in back["streams"]] == [
        ("spot", 1000, 995),
        ("usdm", 70, 65),
    ]
    cells = table_cells(render_table(view), "behind", "usdm", "BTCUSDT", "aggtrade")
    assert (cells["msgs"], cells["written"], cells["flushed"]) == ("70", "70", "65")
    # Nothing written yet for USD-M: its row must not borrow the spot counts.
    doc = _two_markets_doc()
    del doc["sinks"]["csv"]["markets"]["binance/usdm"]
    usdm = next(r for r in view_of(doc).streams if r.pipeline == "usdm")
    assert (usdm.written, usdm.flushed) == (None, None)


def test_written_output_behind_is_shown_and_judged_per_stream_cadence():
    doc = _two_markets_doc()
    markets = doc["sinks"]["csv"]["markets"]
    doc["sinks"]["csv"]["process"]["flush_interval_ms"] = 1000
    markets["binance/spot"]["BTCUSDT"]["aggtrade"]["written_event_time"] = NOW_MS - 2_000
    markets["binance/usdm"]["BTCUSDT"]["aggtrade"]["written_event_time"] = NOW_MS - 95_000
    view = view_of(doc)
    rows = {r.pipeline: r for r in view.streams}
    assert rows["spot"].behind == pytest.approx(2.0) and rows["spot"].flags == []
    assert rows["usdm"].behind == pytest.approx(95.0) and rows["usdm"].flags == [BEHIND]
    assert rows["usdm"].written_event_time == NOW_MS - 95_000
    assert "usdm BTCUSDT aggtrade is behind: its newest written record is 1.6m old" in (
        view.problems
    )
    assert view.health == "degraded"
    table = render_table(view)
    assert "behind" in table and "1.6m" in table
    # A 1m kline is written once a minute: 65 s behind is on time, 75 s is not.
    for behind_ms, flags in ((65_000, []), (75_000, [BEHIND])):
        doc = _kline_doc(1_000)
        doc["sinks"]["csv"]["process"]["flush_interval_ms"] = 1000
        doc["sinks"]["csv"]["markets"] = {
            "binance/spot": {"BTCUSDT": {"kline_1m": {"written_event_time": NOW_MS - behind_ms}}}
        }
        assert row(view_of(doc), "BTCUSDT", "kline_1m").flags == flags, behind_ms


def test_held_trades_are_shown_when_published_and_nothing_when_not():
    doc = make_doc()
    doc["pipelines"]["spot"]["streams"]["BTCUSDT"]["aggtrade"].update(
        trades_held=250, held_for_ms=4_200
    )
    view = view_of(doc)
    btc, eth = row(view, "BTCUSDT", "aggtrade"), row(view, "ETHUSDT", "aggtrade")
    assert (btc.held, btc.held_for) == (250, pytest.approx(4.2))
    assert (eth.held, eth.held_for, eth.behind) == (None, None, None)
    assert "250/4.2s" in render_table(view)


def test_sink_flushed_counts_records_like_written_not_csv_rows():
    # A depth record is many CSV rows: the sink row must not mix the two units.
    doc = make_doc()
    streams = doc["sinks"]["csv"]["streams"]
    streams["BTCUSDT"]["depth"] = {"records_written": 10, "records_flushed": 9, "rows_written": 400}
    streams["BTCUSDT"]["aggtrade"]["records_flushed"] = 990
    doc["sinks"]["csv"]["process"]["rows_written"] = 3300
    sink = view_of(doc).sinks[0]
    assert sink.flushed == 999
