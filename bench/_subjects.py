"""The feed process and the three subjects the harness measures on it.

* :class:`FeedProcess` runs ``_feed.py`` in its own process and talks to its control
  endpoints (rate, stats).
* :class:`BareSubject` (``bare_receive.py``), :class:`BaselineSubject`
  (``baseline_collector.py``) and :class:`CollectorSubject` (``streamer run --plugins
  binance,csv`` with every stream type and the order book) are started on the feed, report
  their receive lag and, where they write CSV, the latency to the row appearing on disk and
  the rate at which aggTrade rows reach the files (converted to messages with the mix's
  aggTrade share, :data:`AGGTRADE_SHARE`).

``CollectorSubject(streamer=...)`` runs another checkout's ``streamer`` executable (the
``--compare`` revision's virtual environment) on the same feed, under another ``label``.

Every subject runs in its own process tree so that :class:`_proc.TreeSampler` can charge
it exactly its own CPU and memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from _client import STREAM_SUFFIXES, symbol_names
from _tail import CsvTailer, RowCounter

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
#: aggTrade's share of the mix (9 in 20 for the simulator's pattern, 90 in 200 for
#: ``_feed.py``): messages whose rows reached the files = aggTrade rows / this share.
AGGTRADE_SHARE = 0.45


class FeedProcess:
    """A feed in a subprocess, serving REST and WebSocket on one loopback port.

    ``kind="sim"``: the package's simulator in high-rate mode (``_simfeed.py``);
    ``kind="own"``: the harness's own generator (``_feed.py``). Both take the same control
    requests (rate, stats) and serve the same symbols and mix.
    """

    def __init__(self, symbols: int, workdir: Path, kind: str = "sim") -> None:
        self.symbols = symbols
        self.kind = kind
        log = open(workdir / f"feed-{kind}-{symbols}.log", "ab")  # noqa: SIM115
        if kind == "sim":
            cmd = [PYTHON, str(BENCH / "_simfeed.py"), "--symbols", str(symbols)]
        elif kind == "own":
            cmd = [PYTHON, str(BENCH / "_feed.py"), "--symbols", str(symbols), "--rate", "0"]
        else:
            raise ValueError(f"unknown feed {kind!r} (expected 'sim' or 'own')")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"feed failed to start: {line!r} (see {log.name})")
        ports = line.split()[1:]
        self.port = int(ports[0])
        self.control = f"http://127.0.0.1:{ports[-1]}"
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.control + path, timeout=10) as resp:
            return json.loads(resp.read())

    def set_rate(self, rate: float) -> None:
        """Change the generated events per second (the schedule restarts now)."""
        self._get(f"/_bench/rate?value={rate:.0f}")

    def stats(self) -> dict[str, Any]:
        """``generated``, ``backlog``, ``connections``, ``bytes_sent``..."""
        return self._get("/_bench/stats")

    def stop(self) -> None:
        """Terminate the feed process."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def connections_for(symbols: int, per_conn: int = 200) -> int:
    """Connections a subject opens for ``symbols`` symbols (three streams per symbol)."""
    return -(-symbols * len(STREAM_SUFFIXES) // per_conn)


class Subject:
    """Base: a process tree measured on the feed."""

    name = "subject"
    writes_csv = True

    def __init__(self, feed: FeedProcess, symbols: int, workdir: Path) -> None:
        self.feed = feed
        self.symbols = symbols
        self.workdir = workdir
        self.out = workdir / f"{self.name}-out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tailer: CsvTailer | None = None
        #: Counts the aggTrade rows of every symbol reaching the files.
        self.counter: RowCounter | None = None

    @property
    def pid(self) -> int:
        """The root of the subject's process tree."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the process(es); returns once launched (see :meth:`wait_ready`)."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once every connection is open (and books are synced, for the collector)."""
        return self.feed.stats()["connections"] >= connections_for(self.symbols)

    def received(self, t0: float, t1: float) -> list[int]:
        """Receive lag samples (ms, receive time minus ``E``) seen in ``[t0, t1)``."""
        if self.tailer is None:
            return []
        return [s.received for s in self.tailer.window(t0, t1)]

    def written(self, t0: float, t1: float) -> list[int]:
        """Row-on-disk latency samples (ms, poll wall clock minus ``E``) in ``[t0, t1)``."""
        if self.tailer is None:
            return []
        return [s.written for s in self.tailer.window(t0, t1)]

    def landed(self, t0: float, t1: float) -> list[int]:
        """Receipt-to-file latency samples (ms, file mtime minus ``receive_time``)."""
        if self.tailer is None:
            return []
        return [s.landed for s in self.tailer.window(t0, t1)]

    def rows_rate(self, t0: float, t1: float) -> float:
        """Messages per second whose rows reached the files in ``[t0, t1)`` (NaN: unknown)."""
        if self.counter is None:
            return float("nan")
        return self.counter.rate(t0, t1) / AGGTRADE_SHARE

    def _start_counting(self, pattern: str, event_col: int, receive_col: int) -> None:
        self.tailer = CsvTailer(pattern, event_col, receive_col).start()
        self.counter = RowCounter(pattern).start()

    def alive(self) -> bool:
        """True while the root process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (drain and flush), then SIGKILL after ``timeout``; returns the exit code."""
        self.terminate(signal.SIGINT, timeout)
        return None if self.proc is None else self.proc.returncode

    def terminate(self, sig: int, timeout: float) -> tuple[int | None, float]:
        """Send ``sig`` and wait up to ``timeout`` s for the exit, then SIGKILL the group.

        Returns the exit code (``None`` when it had to be killed) and the seconds it took.
        """
        t0 = time.monotonic()
        if self.proc is None:
            return None, 0.0
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                code = None
        else:
            code = self.proc.returncode
        elapsed = time.monotonic() - t0
        if self.tailer is not None:
            self.tailer.stop()
        if self.counter is not None:
            self.counter.stop()
        return code, elapsed


class _ClientSubject(Subject):
    """A reference client printing ``_client.Reporter`` lines on stdout."""

    script = ""

    def __init__(self, feed: FeedProcess, symbols: int, workdir: Path) -> None:
        super().__init__(feed, symbols, workdir)
        self._lags: list[tuple[float, list[int]]] = []
        self._lock = threading.Lock()

    def _args(self) -> list[str]:
        return ["--url", self.feed.ws, "--symbols", str(self.symbols)]

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / self.script), *self._args()],
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / f"{self.name}.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self._lags.append((time.monotonic(), report["lag"]))

    def received(self, t0: float, t1: float) -> list[int]:
        with self._lock:
            return [lag for t, lags in self._lags if t0 <= t < t1 for lag in lags]


class BareSubject(_ClientSubject):
    """The limit: receive only."""

    name = "bare"
    writes_csv = False
    script = "bare_receive.py"


class BaselineSubject(_ClientSubject):
    """The earlier design: json.loads, a log line per update, pandas to_csv per batch."""

    name = "baseline"
    script = "baseline_collector.py"

    def _args(self) -> list[str]:
        return [*super()._args(), "--out", str(self.out)]

    def start(self) -> None:
        super().start()
        # aggTrades columns match the collector's: event_time 8, receive_time 9.
        self._start_counting(str(self.out / "*" / "*-aggTrades.csv"), 8, 9)


class CollectorSubject(Subject):
    """``streamer run --plugins binance,csv`` with aggtrade, depth, kline 1m and orderbook.

    ``streamer`` is the executable to run (default: the one next to this Python, i.e. the
    checkout under test); ``label`` names the subject in reports and file names.
    """

    name = "collector"

    def __init__(
        self,
        feed: FeedProcess,
        symbols: int,
        workdir: Path,
        workers: int = 0,
        env: dict[str, str] | None = None,
        book_interval: str = "1s",
        streamer: Path | None = None,
        label: str = "collector",
    ) -> None:
        self.name = label
        super().__init__(feed, symbols, workdir)
        self.workers = workers
        self.env = env
        self.book_interval = book_interval
        self.streamer = streamer or Path(PYTHON).with_name("streamer")
        self.state = workdir / f"{self.name}-state"
        self.config = workdir / f"{self.name}-{symbols}.yaml"

    def write_config(self) -> Path:
        """The YAML pipeline (JSON is valid YAML) pointing the adapter at the feed."""
        config = {
            "pipelines": [
                {
                    "name": "bench",
                    "exchange": "binance",
                    "options": {
                        "market": "spot",
                        "rest_url": self.feed.http,
                        "ws_url": self.feed.ws,
                        # The feed is local: let every book sync at once instead of
                        # pacing snapshots at Binance's 6000 weight per minute.
                        "rest_weight_limit": 1_000_000,
                    },
                    "symbols": symbol_names(self.symbols),
                    "streams": {
                        "aggtrade": {},
                        "depth": {},
                        "kline": {"intervals": ["1m"]},
                        "orderbook": {
                            "levels": 20,
                            "interval": self.book_interval,
                            "snapshot_limit": 100,
                        },
                    },
                    "sinks": ["csv"],
                    "workers": self.workers,
                }
            ],
            "sinks": {"csv": {"type": "csv", "path": str(self.out)}},
            "runtime": {"state_dir": str(self.state), "status_interval": 0.5},
        }
        self.config.write_text(json.dumps(config, indent=1))
        return self.config

    def start(self) -> None:
        self.write_config()
        cmd = [str(self.streamer), "run", "--config", str(self.config), "--plugins", "binance,csv"]
        self.command = " ".join(["streamer", *cmd[1:]])
        self.proc = subprocess.Popen(
            [*cmd, "--quiet"],
            stdout=open(self.workdir / f"{self.name}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        pattern = self.out / "binance" / "spot" / "aggTrades" / "*" / "*.csv"
        # Spot aggTrades columns: event_time 8, receive_time 9.
        self._start_counting(str(pattern), 8, 9)

    def status(self) -> dict[str, Any]:
        """The runtime's merged counters (``{}`` before the first publication)."""
        try:
            status = json.loads((self.state / "status.json").read_bytes())
        except (OSError, ValueError):
            return {}
        totals = dict(status.get("pipelines", {}).get("bench", {}).get("totals", {}))
        for key, value in status.get("sinks", {}).get("csv", {}).get("totals", {}).items():
            totals[f"csv.{key}"] = value
        return totals

    def ready(self) -> bool:
        if not super().ready():
            return False
        status = self.status()
        if "snapshots_fetched" not in status and status:
            # A runtime that no longer publishes this counter: ready once rows land.
            return self.counter is not None and self.counter.rows > 0
        # 98%: one book that keeps resyncing must not hold the whole benchmark back.
        return status.get("snapshots_fetched", 0) >= 0.98 * self.symbols
