"""The daemon, status and health against the real runtime, Binance plugin, CSV sink and the
simulator: start, read status (table and JSON), kill children, stop, and check the files
and the status figures against what the simulator sent."""

from __future__ import annotations

import csv
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import typer
from conftest import write_sim_config
from typer.testing import CliRunner

from streamer.core.ops import daemon as d
from streamer.core.ops.commands import add_commands
from streamer.core.ops.status_view import StatusError, StatusView, read_document

pytest.importorskip("streamer.testing.sim", reason="the simulator is not available")

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def ops_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app with the operations commands."""

    add_commands(app)
    return app


def write_config(tmp_path: Path, sim, **runtime: Any) -> Path:
    streams = {"aggtrade": {}, "depth": {}, "orderbook": {}, "kline": {}}
    return write_sim_config(tmp_path, sim, symbols=SYMBOLS, streams=streams, runtime=runtime)


def wait_status(
    paths: d.DaemonPaths, predicate: Callable[[dict], bool], timeout: float = 20, what: str = ""
) -> dict:
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = read_document(paths.status_file)
            if predicate(doc):
                return doc
        except StatusError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last status: {doc}")


def stream_counter(doc: dict, symbol: str, stream: str, name: str, section="pipelines") -> int:
    body = doc[section]["spot" if section == "pipelines" else "csv"]
    return body["streams"].get(symbol, {}).get(stream, {}).get(name, 0)


def trading(doc: dict) -> bool:
    return all(
        stream_counter(doc, s, "aggtrade", "records_written", "sinks") > 5
        and stream_counter(doc, s, "orderbook", "books_emitted") > 0
        for s in SYMBOLS
    )


def csv_trades(data: Path, symbol: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for path in sorted((data / "binance/spot/aggTrades" / symbol).glob("*.csv")):
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader)[0] == "agg_trade_id"
            rows.extend(reader)
    return rows


def csv_markers(data: Path, symbol: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for path in sorted((data / "binance/spot/markers" / symbol).glob("*.csv")):
        with open(path, newline="") as handle:
            rows.extend(list(csv.reader(handle))[1:])
    return rows


def assert_trades_match_truth(data: Path, sim) -> dict[str, int]:
    """Every symbol's CSV is a gap-free, duplicate-free run of the simulator's trades."""
    counts = {}
    for symbol in SYMBOLS:
        rows = csv_trades(data, symbol)
        assert rows, symbol
        ids = [int(r[0]) for r in rows]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"aggTrade gap in {symbol}"
        truth = {t.trade_id: t for t in sim.truth.trades("spot", symbol)}
        for row in rows:
            t = truth[int(row[0])]
            assert row[1:7] == [
                t.price, t.quantity, str(t.first_trade_id), str(t.last_trade_id),
                str(t.transact_time), "true" if t.is_buyer_maker else "false",
            ], row  # fmt: skip
        bad = [m for m in csv_markers(data, symbol) if m[1] == "aggtrade" and m[2] != "filled"]
        assert not bad, bad
        counts[symbol] = len(rows)
    return counts


@pytest.fixture
def sim_daemon(tmp_path: Path, binance_sim_factory):
    """A simulator and the paths/config of a daemon collecting from it; stopped after."""
    sim = binance_sim_factory(seed=7, spot_symbols=SYMBOLS, usdm_symbols=["BTCUSDT"])
    config = write_config(tmp_path, sim)
    paths = d.DaemonPaths.for_state_dir(tmp_path / "state")
    yield sim, config, paths
    info = d.read_pidfile(paths.pidfile)
    if info and d.pid_alive(info.pid):
        os.killpg(info.pid, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_daemon_status_and_clean_stop_against_the_simulator(sim_daemon, tmp_path: Path):
    sim, config, paths = sim_daemon
    runner = CliRunner()
    app = ops_app()
    started = runner.invoke(app, ["daemon", "start", "-c", str(config), "--wait", "30"])
    assert started.exit_code == 0, started.output
    assert started.output.startswith("started pid")
    again = runner.invoke(app, ["daemon", "start", "-c", str(config)])
    assert again.exit_code == 1 and "error: already running: pid" in again.output
    wait_status(paths, trading, what="trades flowing and books live")

    table = runner.invoke(app, ["status", "-c", str(config)])
    assert table.exit_code == 0, table.output
    for text in ("pipeline", "spot", "BTCUSDT", "ETHUSDT", "aggtrade", "orderbook",
                 "spot.worker0", "sink.csv", "rates over"):  # fmt: skip
        assert text in table.output, text
    as_json = runner.invoke(app, ["status", "-c", str(config), "--json"])
    view = msgspec.json.decode(as_json.stdout, type=StatusView)
    assert view.state == "running" and [p.name for p in view.pipelines] == ["spot"]
    assert {c.name: c.state for c in view.children} == {
        "sink.csv": "running",
        "spot.worker0": "running",
    }
    assert view.pipelines[0].rest_weight_used and view.pipelines[0].rate > 0
    health = runner.invoke(app, ["health", "-c", str(config)])
    assert health.exit_code == 0, health.output

    # Freeze the simulator's sending: once the counts settle they must equal what it sent.
    sim.faults.stall(8)
    time.sleep(0.3)  # frames already in the socket

    def settled(doc: dict, last: list) -> bool:
        key = (doc["pipelines"]["spot"]["totals"].get("ws_messages"), doc["updated_at"])
        last.append(key)
        stable = [k for k in last if k[0] == key[0]]
        return len(stable) >= 2 and key[1] - stable[0][1] >= 1500  # ws_messages: every 1 s

    seen: list = []
    doc = wait_status(paths, lambda doc: settled(doc, seen), what="counters to settle")
    assert doc["pipelines"]["spot"]["totals"]["ws_messages"] == sim.truth.messages_sent()
    for symbol in SYMBOLS:
        sent = sim.truth.counters()[("ws_messages_sent", symbol, "aggTrade")]
        assert stream_counter(doc, symbol, "aggtrade", "records_emitted") == sent, symbol

    stopped = runner.invoke(app, ["daemon", "stop", "-c", str(config)])
    assert stopped.exit_code == 0, stopped.output
    assert stopped.output.startswith("stopped pid") and "exit code 0" in stopped.output
    assert not paths.pidfile.exists()
    final = read_document(paths.status_file)
    assert (final["state"], final["exit_code"]) == ("stopped", 0)
    counts = assert_trades_match_truth(tmp_path / "data", sim)
    for symbol in SYMBOLS:
        # Every record handed to the sink was flushed to the file: none left in memory.
        written = stream_counter(final, symbol, "aggtrade", "records_written", "sinks")
        flushed = stream_counter(final, symbol, "aggtrade", "rows_written", "sinks")
        assert written == flushed == counts[symbol], symbol
    assert "started: 1 worker(s), 1 writer(s)" in d.tail(paths.log_file, 200)


def child_pid(doc: dict, name: str) -> int:
    return doc["children"][name]["pid"]


@pytest.mark.timeout(120)
def test_sigkilled_worker_and_writer_restart_counted_without_an_aggtrade_gap(
    sim_daemon, tmp_path: Path
):
    sim, config, paths = sim_daemon
    result = d.start(paths, ["--config", str(config)], wait=30)
    assert result.ready, result.message
    doc = wait_status(paths, trading, what="trades flowing")

    for name in ("spot.worker0", "sink.csv"):
        pid = child_pid(doc, name)
        os.kill(pid, signal.SIGKILL)
        doc = wait_status(
            paths,
            lambda doc, name=name, pid=pid: (
                doc["children"][name]["restarts"] == 1
                and doc["children"][name]["alive"]
                and doc["children"][name]["pid"] != pid
            ),
            what=f"{name} to restart",
        )
        doc = wait_status(paths, trading, what=f"trades flowing after {name} restarted")

    view = msgspec.json.decode(
        CliRunner().invoke(ops_app(), ["status", "-c", str(config), "--json"]).stdout,
        type=StatusView,
    )
    restarts = {c.name: c.restarts for c in view.children}
    assert restarts["sink.csv"] == 1 and restarts["spot.worker0"] >= 1
    assert view.health == "degraded"  # restarted recently
    assert any("spot.worker0 restarted" in p for p in view.problems)
    health = CliRunner().invoke(ops_app(), ["health", "-c", str(config), "--window", "0"])
    assert health.exit_code == 1 and "restarted" in health.output

    # Let the restarted worker backfill what it missed, then stop and check the files.
    time.sleep(2)
    assert d.stop(paths, timeout=30).outcome == "stopped"
    assert_trades_match_truth(tmp_path / "data", sim)
    # The outages did cost live trades, recovered from REST (not a vacuous check).
    filled = [m for s in SYMBOLS for m in csv_markers(tmp_path / "data", s)
              if m[1:3] == ["aggtrade", "filled"]]  # fmt: skip
    assert filled


@pytest.mark.timeout(120)
def test_a_crashed_daemon_leaves_a_stale_pidfile_that_the_next_start_recovers(
    sim_daemon, tmp_path: Path
):
    sim, config, paths = sim_daemon
    runner = CliRunner()
    app = ops_app()
    first = d.start(paths, ["--config", str(config)], wait=30)
    assert first.ready, first.message
    wait_status(paths, trading, what="trades flowing")
    os.killpg(first.pid, signal.SIGKILL)  # power cut: supervisor and children at once
    d._wait_dead(first.pid, None, 10)

    status = runner.invoke(app, ["daemon", "status", "-c", str(config)])
    assert status.exit_code == 1 and f"dead: pid {first.pid} is not running" in status.output
    health = runner.invoke(app, ["health", "-c", str(config)])
    assert health.exit_code == 2 and f"supervisor pid {first.pid} is not running" in health.output

    started = runner.invoke(app, ["daemon", "start", "-c", str(config), "--wait", "30"])
    assert started.exit_code == 0, started.output
    assert "removed a stale pidfile" in started.output
    wait_status(
        paths,
        lambda doc: doc["pid"] != first.pid and trading(doc),
        what="the new collector to run",
    )
    time.sleep(1.5)  # resume from the CSV holdings and backfill the outage
    assert runner.invoke(app, ["daemon", "stop", "-c", str(config)]).exit_code == 0
    assert_trades_match_truth(tmp_path / "data", sim)
    filled = [m for s in SYMBOLS for m in csv_markers(tmp_path / "data", s)
              if m[1:3] == ["aggtrade", "filled"]]  # fmt: skip
    assert filled  # the outage was backfilled from REST
