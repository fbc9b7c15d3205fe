"""End to end through NATS JetStream (issue 15), against the simulator, with faults.

Two collectors publish the same symbols to JetStream (hot-hot); one is SIGKILLed mid-run
and started again. One storage node (``streamer store``) writes CSV from a durable
consumer; it is SIGKILLed and started again once, and the broker itself is restarted
mid-run. Every aggTrade id and every closed kline must be on disk exactly once, equal to
the simulator's truth, and ``streamer verify`` must pass.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import wait_for

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]


def _collector_config(tmp_path: Path, name: str, sim, nats_url: str) -> Path:
    data = {
        "pipelines": [
            {
                "name": "spot",
                "exchange": "binance",
                "options": {
                    "market": "spot",
                    "rest_url": sim.rest_url,
                    "ws_url": sim.ws_url,
                    "reconnect_backoff_max": "1s",
                },
                "symbols": SYMBOLS,
                "streams": {"aggtrade": {}, "kline": {"intervals": ["1s"]}},
                "sinks": ["bus"],
            }
        ],
        "sinks": {"bus": {"type": "nats", "url": nats_url, "stream": "E2E",
                          "flush_interval": 0.1, "publish_timeout": 2}},
        "runtime": {"state_dir": str(tmp_path / f"state-{name}"), "status_interval": 0.2,
                    "shutdown_timeout": 20, "restart_backoff_max": 1},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _store_config(tmp_path: Path, nats_url: str) -> Path:
    data = {
        "source": {"type": "nats", "url": nats_url, "stream": "E2E", "durable": "store-1"},
        "sinks": {"csv": {"type": "csv", "path": str(tmp_path / "data"), "flush_interval": 0.2}},
        "runtime": {"state_dir": str(tmp_path / "state-store"), "status_interval": 0.2,
                    "shutdown_timeout": 20, "restart_backoff_max": 1},
    }  # fmt: skip
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamer", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL takes every child
        )


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(40)


def _rows(folder: Path) -> list[list[str]]:
    rows: list[list[str]] = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            next(reader)
            rows.extend(reader)
    return rows


def _trade_rows(data: Path) -> int:
    return sum(len(_rows(data / "binance/spot/aggTrades" / s)) for s in SYMBOLS)


def _consumer_done(url: str) -> bool:
    """The store's consumer has every message of the stream acknowledged."""

    async def check() -> bool:
        import nats

        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            stream = await js.stream_info("E2E")
            info = await js.consumer_info("E2E", "store-1")
            return info.ack_floor.stream_seq >= stream.state.last_seq > 0
        finally:
            await nc.close()

    try:
        return asyncio.run(check())
    except Exception:
        return False


@pytest.mark.timeout(240)
def test_two_collectors_a_store_and_faults_write_everything_exactly_once(
    tmp_path: Path, binance_sim_factory, nats_server_factory
):
    broker = nats_server_factory()
    sim = binance_sim_factory(seed=15, spot_symbols=SYMBOLS, usdm_symbols=[], tick_ms=20,
                              history_s=30.0)  # fmt: skip
    a_cfg = _collector_config(tmp_path, "a", sim, broker.url)
    b_cfg = _collector_config(tmp_path, "b", sim, broker.url)
    store_cfg = _store_config(tmp_path, broker.url)
    data = tmp_path / "data"
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "store")}
    procs: list[subprocess.Popen] = []
    try:
        a = _start(["run", "--config", str(a_cfg)], logs["a"])
        b = _start(["run", "--config", str(b_cfg)], logs["b"])
        store = _start(["store", "--config", str(store_cfg)], logs["store"])
        procs += [a, b, store]
        wait_for(lambda: _trade_rows(data) > 100, 60, "the store's first rows")

        _kill(a)  # collector A dies; B carries on alone
        first = _trade_rows(data)
        wait_for(lambda: _trade_rows(data) > first + 50, 30, "rows while A is down")
        a = _start(["run", "--config", str(a_cfg)], logs["a"])
        procs.append(a)

        broker.stop()  # the broker goes away: both collectors buffer, the store waits
        time.sleep(1.5)  # the market moves on meanwhile (a fault's duration, not a wait)
        broker.start()
        second = _trade_rows(data)
        wait_for(lambda: _trade_rows(data) > second + 50, 60, "rows after the broker restart")

        _kill(store)  # the store dies with unacknowledged messages in flight
        time.sleep(1.0)
        store = _start(["store", "--config", str(store_cfg)], logs["store"])
        procs.append(store)
        third = _trade_rows(data)
        wait_for(lambda: _trade_rows(data) > third + 50, 60, "rows after the store restart")

        assert _stop(a) == 0, logs["a"].read_text()[-3000:]
        assert _stop(b) == 0, logs["b"].read_text()[-3000:]
        wait_for(lambda: _consumer_done(broker.url), 60, "the store to drain the stream")
        assert _stop(store) == 0, logs["store"].read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)

    trades = klines = 0
    for symbol in SYMBOLS:
        rows = _rows(data / "binance/spot/aggTrades" / symbol)
        ids = [int(r[0]) for r in rows]
        truth = {t.trade_id: t for t in sim.truth.trades("spot", symbol)}
        assert ids == [i for i in sorted(truth) if ids[0] <= i <= ids[-1]], f"{symbol}: ids"
        for row in rows:
            assert row[1:3] == [truth[int(row[0])].price, truth[int(row[0])].quantity], row
        k_rows = _rows(data / "binance/spot/klines" / symbol / "1s")
        opens = [int(r[0]) for r in k_rows]
        ref = {k.open_time: k for k in sim.truth.closed_klines("spot", symbol, "1s")}
        assert opens == [t for t in sorted(ref) if opens[0] <= t <= opens[-1]], f"{symbol}: kl"
        for row in k_rows:
            k = ref[int(row[0])]
            assert row[1:6] == [k.open, k.high, k.low, k.close, k.volume], row
        trades += len(ids)
        klines += len(opens)
    assert trades > 300 and klines > 4 * len(SYMBOLS)
    verify = subprocess.run(
        [sys.executable, "-m", "streamer", "verify", str(data)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
