"""End to end: the collector (supervisor, worker, csv writer) against the simulator.

The issue's acceptance run: 10 symbols with faults (disconnects every few seconds, dropped
aggTrades, rotation, serverShutdown, a 429) must write every aggTrade id and every closed
kline exactly once, compared with ``sim.truth``; and a collector killed with SIGKILL and
started again later must leave no gap and no duplicate. The run length defaults to a few
seconds to keep the suite fast; ``STREAMER_E2E_SECONDS=60`` (and
``STREAMER_E2E_DOWNTIME=10``) gives the full acceptance run.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("streamer.testing.sim", reason="the simulator is not available")

from conftest import write_sim_config

from streamer.core.ops import daemon as d
from streamer.testing.faults import FaultPlan

SYMBOLS = [f"{base}USDT" for base in ("BTC", "ETH", "BNB", "SOL", "XRP", "ADA", "DOGE", "TRX",
                                      "LTC", "DOT")]  # fmt: skip
SECONDS = float(os.environ.get("STREAMER_E2E_SECONDS", "12"))
DOWNTIME = float(os.environ.get("STREAMER_E2E_DOWNTIME", "3"))


def write_config(tmp_path: Path, sim) -> Path:
    return write_sim_config(
        tmp_path,
        sim,
        symbols=SYMBOLS,
        streams={"aggtrade": {}, "kline": {"intervals": ["1s"]}},
        options={
            "max_streams_per_connection": 8,
            "rotate_after": "4s",
            "rotation_overlap": "300ms",
            "no_data_timeout": "3s",
            "reconnect_backoff_max": "1s",
        },
    )


def read_rows(folder: Path, header: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader)[0] == header
            rows.extend(reader)
    return rows


def assert_exactly_once(data: Path, sim) -> tuple[int, int]:
    """Every symbol's aggTrades and 1s klines are a gap-free, duplicate-free truth run."""
    trades = klines = 0
    for symbol in SYMBOLS:
        rows = read_rows(data / "binance/spot/aggTrades" / symbol, "agg_trade_id")
        assert len(rows) > 5, symbol
        ids = [int(r[0]) for r in rows]
        truth = {t.trade_id: t for t in sim.truth.trades("spot", symbol)}
        assert ids == [i for i in sorted(truth) if ids[0] <= i <= ids[-1]], f"{symbol}: ids"
        for row in rows:
            t = truth[int(row[0])]
            assert row[1:3] == [t.price, t.quantity], row
        k_rows = read_rows(data / "binance/spot/klines" / symbol / "1s", "open_time")
        opens = [int(r[0]) for r in k_rows]
        ref = {k.open_time: k for k in sim.truth.closed_klines("spot", symbol, "1s")}
        assert opens == [t for t in sorted(ref) if opens[0] <= t <= opens[-1]], f"{symbol}: kl"
        for row in k_rows:
            k = ref[int(row[0])]
            assert row[1:6] == [k.open, k.high, k.low, k.close, k.volume], row
        markers = read_rows(data / "binance/spot/markers" / symbol, "time") if (
            data / "binance/spot/markers" / symbol).exists() else []  # fmt: skip
        assert not [m for m in markers if "unfillable" in m], markers
        trades += len(ids)
        klines += len(opens)
    return trades, klines


def wait_rows(data: Path, minimum: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(
            sum(1 for _ in (data / "binance/spot/aggTrades" / s).glob("*.csv"))
            for s in SYMBOLS
            if (data / "binance/spot/aggTrades" / s).exists()
        ) and len(list((data / "binance/spot/aggTrades").glob("*"))) == len(SYMBOLS):
            sizes = [sum(p.stat().st_size for p in (data / "binance/spot/aggTrades" / s).glob(
                "*.csv")) for s in SYMBOLS]  # fmt: skip
            if min(sizes) > minimum:
                return
        time.sleep(0.1)
    raise AssertionError("the collector wrote no trades in time")


def inject_faults(sim, stop: threading.Event) -> None:
    step = 0
    while not stop.wait(1.0):
        step += 1
        symbol = SYMBOLS[step % len(SYMBOLS)]
        sim.faults.drop_aggtrades(symbol, 3)
        if step % 4 == 0:
            sim.faults.close_connections(abrupt=step % 8 == 0)
        if step % 5 == 0:
            sim.faults.rest_error(429, retry_after=1, path="aggTrades")
        if step % 7 == 0:
            sim.faults.server_shutdown(grace_s=0.5)


@pytest.mark.timeout(60 + 3 * SECONDS + DOWNTIME)
def test_faulty_run_then_sigkill_and_restart_write_everything_exactly_once(
    tmp_path: Path, binance_sim_factory
):
    sim = binance_sim_factory(seed=11, spot_symbols=SYMBOLS, usdm_symbols=[], tick_ms=20,
                              history_s=30.0, faults=FaultPlan(close_every_s=2.5))  # fmt: skip
    config = write_config(tmp_path, sim)
    paths = d.DaemonPaths.for_state_dir(tmp_path / "state")
    data = tmp_path / "data"
    stop_faults = threading.Event()
    faults = threading.Thread(target=inject_faults, args=(sim, stop_faults), daemon=True)
    try:
        first = d.start(paths, ["--config", str(config)], wait=30)
        assert first.ready, first.message
        faults.start()
        wait_rows(data, 200)
        time.sleep(SECONDS)
        stop_faults.set()
        faults.join()
        info = d.read_pidfile(paths.pidfile)
        assert info is not None
        os.killpg(info.pid, signal.SIGKILL)  # the whole collector, no goodbye
        killed_at = time.monotonic()
        time.sleep(DOWNTIME)  # the market moves on while nothing collects
        paths.pidfile.unlink(missing_ok=True)
        second = d.start(paths, ["--config", str(config)], wait=30)
        assert second.ready, second.message
        # Let the restarted collector backfill from its holdings and catch up with live.
        time.sleep(max(4.0, SECONDS / 3))
        assert d.stop(paths, timeout=30).outcome == "stopped"
        assert time.monotonic() - killed_at >= DOWNTIME
    finally:
        stop_faults.set()
        info = d.read_pidfile(paths.pidfile)
        if info and d.pid_alive(info.pid):
            os.killpg(info.pid, signal.SIGKILL)
    trades, klines = assert_exactly_once(data, sim)
    assert trades > 10 * len(SYMBOLS) and klines > len(SYMBOLS)
    counters = sim.truth.counters()
    assert sum(v for (name, _, _), v in counters.items() if name == "fault_aggtrade_dropped") > 0
