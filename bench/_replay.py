"""The real-traffic case: a recorded USD-M BTCUSDT capture replayed flat out.

``streamer sim --replay usdm_btcusdt_20240808.gz --speed 0`` (always this checkout's
simulator, a fresh one per run: the n-th REST request gets the n-th recorded snapshot) serves
the capture's ``btcusdt@depth@0ms`` events (68 levels per event on average) as fast as the
collector reads them, from the moment it subscribes. The collector under test (this checkout,
or the ``--compare`` revision's) runs one pipeline on usdm BTCUSDT with depth, orderbook
(20 levels, 1 s) and aggtrade (the capture records ``@trade``, not ``@aggTrade``, so that
subscription stays silent) into CSV.

Measured: the CPU of the collector's process tree from its first connection to the
simulator (start-up and imports excluded: nothing is replayed before it connects) until every
depth row of the capture is on disk, and the messages in that window (the capture's depth
events, a known count): msg/s and CPU-s per million messages.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from _proc import TreeSampler
from _subjects import PYTHON, CollectorSubject
from _tail import RowCounter, dir_bytes

ROOT = Path(__file__).resolve().parent.parent
CAPTURE = "usdm_btcusdt_20240808.gz"
#: The CSV sink's flush interval in this case: short, so the end of the replay is seen
#: within 100 ms of the last row being ready (it is only a few seconds long).
FLUSH_INTERVAL = "100ms"


def capture_counts(data_dir: Path = ROOT / "tests" / "data") -> dict[str, int]:
    """Depth events and depth levels (= depth CSV rows) of the capture."""
    from streamer.testing.captures import read_hftbacktest

    events = levels = 0
    for ev in read_hftbacktest(CAPTURE, data_dir):
        if ev.kind != "ws" or b"@depth" not in ev.payload[:40]:
            continue
        data = json.loads(ev.payload)["data"]
        events += 1
        levels += len(data["b"]) + len(data["a"])
    return {"events": events, "levels": levels}


class ReplayFeed:
    """``streamer sim --replay CAPTURE --speed 0`` on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.log = workdir / "replay-sim.log"
        self.proc = subprocess.Popen(
            [
                str(Path(PYTHON).with_name("streamer")),
                "sim",
                "--replay",
                CAPTURE,
                "--speed",
                "0",
                "--port",
                "0",
                "--data-dir",
                str(ROOT / "tests" / "data"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        found = re.search(r"on (http://\S+) and (ws://\S+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"replay simulator failed to start: {line.strip()!r}")
        self.http, self.ws = found.group(1), found.group(2)
        self.port = int(self.http.rsplit(":", 1)[1])

    def connected(self) -> bool:
        """True once any TCP connection to the simulator is established."""
        port = f":{self.port:04X} "
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for row in lines:
                cols = row.split()
                if len(cols) > 3 and (cols[1] + " ").endswith(port) and cols[3] == "01":
                    return True
        return False

    def stop(self) -> None:
        """Terminate the simulator."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ReplayCollector(CollectorSubject):
    """The collector on usdm BTCUSDT: depth@0ms, orderbook 20 levels every 1 s, aggtrade."""

    def write_config(self) -> Path:
        config = {
            "pipelines": [
                {
                    "name": "bench",
                    "exchange": "binance",
                    "options": {
                        "market": "usdm",
                        "rest_url": self.feed.http,
                        "ws_url": self.feed.ws,
                        "rest_weight_limit": 1_000_000,
                    },
                    "symbols": ["BTCUSDT"],
                    "streams": {
                        "aggtrade": {},
                        "depth": {"speed": "0ms"},
                        "orderbook": {
                            "speed": "0ms",
                            "levels": 20,
                            "interval": self.book_interval,
                            "snapshot_limit": 1000,
                        },
                    },
                    "sinks": ["csv"],
                }
            ],
            "sinks": {
                "csv": {"type": "csv", "path": str(self.out), "flush_interval": FLUSH_INTERVAL}
            },
            "runtime": {"state_dir": str(self.state), "status_interval": 0.5},
        }
        self.config.write_text(json.dumps(config, indent=1))
        return self.config

    def start(self) -> None:
        super().start()
        if self.counter is not None:  # replace the spot aggTrades counter with usdm depth
            self.counter.stop()
        if self.tailer is not None:
            self.tailer.stop()
        self.tailer = None
        pattern = self.out / "binance" / "usdm" / "depth" / "*" / "*.csv"
        self.counter = RowCounter(str(pattern), interval=0.02).start()


def replay_case(
    label: str,
    workdir: Path,
    expected: dict[str, int],
    streamer: Path | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """One replay of the capture through the collector ``label``; its figures."""
    feed = ReplayFeed(workdir)
    folder = workdir / f"replay-{label}"
    folder.mkdir(exist_ok=True)
    subject = ReplayCollector(feed, 1, folder, streamer=streamer, label=label)  # type: ignore[arg-type]
    result: dict[str, Any] = {"subject": label, "messages": expected["events"]}
    sampler = None
    try:
        subject.start()
        sampler = TreeSampler(subject.pid, interval=0.05).start()
        deadline = time.monotonic() + timeout
        while not feed.connected():
            if not subject.alive():
                raise RuntimeError(f"{label} exited before connecting (see {folder})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not connect to the replay in {timeout:.0f} s")
            time.sleep(0.01)
        sampler.mark()
        t0 = time.monotonic()
        assert subject.counter is not None
        while subject.counter.rows < expected["levels"]:
            if not subject.alive():
                raise RuntimeError(f"{label} exited during the replay (see {folder})")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{label}: {subject.counter.rows}/{expected['levels']} depth rows after "
                    f"{timeout:.0f} s"
                )
            time.sleep(0.02)
        t1 = time.monotonic()
        usage = sampler.stop()  # with a last sample: the CPU up to now
        sampler = None
        counters = subject.status()
        seconds = t1 - t0
        result.update(
            seconds=seconds,
            rate=expected["events"] / seconds,
            levels_rate=expected["levels"] / seconds,
            cpu_s=usage.cpu_seconds,
            cpu_per_m=usage.cpu_seconds / expected["events"] * 1e6,
            peak_rss=usage.peak_rss,
            depth_rows=subject.counter.rows,
            ws_messages=counters.get("ws_messages"),
        )
    finally:
        result["exit_code"] = subject.stop()
        if sampler is not None:
            sampler.stop()
        result["bytes_written"] = dir_bytes(str(subject.out))
        feed.stop()
    return result
