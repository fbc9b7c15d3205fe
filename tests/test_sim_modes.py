"""High-rate mode, thread mode, the pytest fixture and the ``streamer sim`` command."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from typer.testing import CliRunner

from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_high_rate_mix_ids_and_latency_field():
    cfg = SimConfig(high_rate=20_000, high_rate_symbols=10)
    async with SimServer(cfg) as sim:
        streams = sim.high_rate.streams()
        assert len(streams) == 30
        url = f"{sim.ws_url}/stream?streams=" + "/".join(streams)
        async with websockets.connect(url, max_queue=None) as ws:
            msgs = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(4000)]
        async with httpx.AsyncClient(base_url=sim.rest_url) as client:
            info = (await client.get("/api/v3/exchangeInfo")).json()
            snap = (await client.get("/api/v3/depth", params={"symbol": "S0003USDT"})).json()
    kinds = [m["stream"].split("@")[1] for m in msgs]
    assert 0.45 <= kinds.count("depth") / len(kinds) <= 0.55
    assert 0.40 <= kinds.count("aggTrade") / len(kinds) <= 0.50
    assert 0.03 <= kinds.count("kline_1m") / len(kinds) <= 0.07
    now = time.time_ns() // 1_000_000
    assert all(now - 10_000 < m["data"]["E"] <= now for m in msgs)
    by_stream: dict[str, list[dict]] = {}
    for m in msgs:
        by_stream.setdefault(m["stream"], []).append(m["data"])
    for name, events in by_stream.items():
        if "@depth" in name:
            assert all(len(e["b"]) == 20 and len(e["a"]) == 20 for e in events)
            assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(events))
        elif "@aggTrade" in name:
            assert all(b["a"] == a["a"] + 1 for a, b in itertools.pairwise(events))
    assert "S1999USDT" not in {s["symbol"] for s in info["symbols"]}
    assert "S0009USDT" in {s["symbol"] for s in info["symbols"]}
    depth3 = by_stream["s0003usdt@depth@100ms"]
    assert snap["lastUpdateId"] >= depth3[-1]["u"]  # chains with the stream


def test_start_in_thread_serves_sync_clients():
    sim = SimServer(SimConfig(seed=3, spot_symbols=["SOLUSDT"], usdm_symbols=[])).start_in_thread()
    try:
        r = httpx.get(f"{sim.rest_url}/api/v3/depth", params={"symbol": "SOLUSDT", "limit": 5})
        assert r.status_code == 200 and len(r.json()["bids"]) == 5
        sim.faults.rest_error(503)
        assert httpx.get(f"{sim.rest_url}/api/v3/ping").status_code == 503
        assert sim.truth.counters()[("fault_rest", "", "503")] == 1
        assert sim.truth.last_update_id("spot", "SOLUSDT") > 0
    finally:
        sim.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.rest_url}/api/v3/ping", timeout=2)


def test_start_in_thread_reports_bind_errors():
    first = SimServer().start_in_thread()
    try:
        with pytest.raises(OSError):
            SimServer(SimConfig(port=first.port)).start_in_thread()
    finally:
        first.stop()


def test_binance_sim_fixture_defaults(binance_sim):
    r = httpx.get(f"{binance_sim.rest_url}/fapi/v1/exchangeInfo")
    assert {"BTCUSDT", "ETHUSDT"} <= {s["symbol"] for s in r.json()["symbols"]}
    assert binance_sim.config.seed == 1


@pytest.mark.binance_sim(seed=9, spot_symbols=["XRPUSDT"])
def test_binance_sim_fixture_marker(binance_sim):
    r = httpx.get(f"{binance_sim.rest_url}/api/v3/exchangeInfo")
    assert "XRPUSDT" in {s["symbol"] for s in r.json()["symbols"]}
    assert binance_sim.config.seed == 9


def test_replay_of_missing_capture_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="NOPE"):
        SimServer(SimConfig(replay="NOPE", data_dir=str(tmp_path))).start_in_thread()


def test_plugin_module_is_cheap_and_registers_sim():
    code = (
        "import sys, streamer.testing.plugin as p; "
        "assert 'streamer.testing.sim' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr
    from streamer.cli import build_app

    result = CliRunner().invoke(build_app(), ["sim", "--help"])
    assert result.exit_code == 0
    for flag in ("--port", "--seed", "--replay", "--close-every", "--drop-depth-every", "--rate"):
        assert flag in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamer_sim_command_serves_rest_and_ws():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "sim", "--port", str(port), "--seed", "4",
         "--symbols", "BTCUSDT", "--drop-aggtrade-every", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v3/ping", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "streamer sim did not start"
                time.sleep(0.1)
        assert r.json() == {}

        async def _one() -> dict:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/btcusdt@depth@100ms") as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 5))

        assert asyncio.run(_one())["e"] == "depthUpdate"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tick_ms", 0), ("trade_probability", 2.0), ("replay_speed", -1), ("high_rate_symbols", 0)],
)
def test_bad_config_is_rejected_with_a_clear_message(field, value):
    with pytest.raises(ValueError, match=f"SimConfig: {field}"):
        SimConfig(**{field: value})


def test_cli_reports_bad_options_without_traceback():
    from streamer.cli import build_app

    result = CliRunner().invoke(build_app(), ["sim", "--port", "0", "--tick-ms", "0"])
    assert result.exit_code != 0
    assert "tick_ms must be >= 1" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_port_in_use_and_missing_capture(tmp_path):
    from streamer.cli import build_app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(build_app(), ["sim", "--port", str(port)])
    assert result.exit_code == 1 and "error:" in result.output
    result = CliRunner().invoke(
        build_app(), ["sim", "--port", "0", "--replay", "NOPE", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "capture 'NOPE' not found" in result.output
