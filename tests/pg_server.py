"""A real, throw-away PostgreSQL server for the tests of the ``postgres`` sink.

:class:`PgServer` runs ``initdb``/``pg_ctl`` in a fresh temporary directory and listens on
127.0.0.1 only (a free port). The server binaries come from, in order:

1. ``STREAMER_PG_BINDIR`` (a folder holding ``initdb``, ``pg_ctl`` and ``postgres``);
2. the PyPI package ``pgserver`` (it ships the binaries; ``make test`` installs it);
3. Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``) or ``initdb``
   on ``PATH``.

PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (``setpriv``);
binaries that ``nobody`` cannot reach (a package inside root's home) are copied into the
temporary directory first. Nothing is skipped: no binaries is a loud failure that says
how to install them.

Fixtures (registered from ``conftest.py``): ``pg_server`` (one server for the session,
stopped and deleted after it) and ``pg_dsn`` (a new, empty database per test).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = (
    "no PostgreSQL server binaries found: run `make test` (it installs the `pgserver` "
    "package into .venv), or `pip install pgserver`, or `apt-get install postgresql`, "
    "or point STREAMER_PG_BINDIR at a folder with initdb and pg_ctl"
)

_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def _usable(bindir: Path) -> bool:
    return all(os.access(bindir / p, os.X_OK) for p in _PROGRAMS)


def find_bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``/``postgres`` (see the module docstring)."""
    given = os.environ.get("STREAMER_PG_BINDIR")
    if given:
        if not _usable(Path(given)):
            raise RuntimeError(f"STREAMER_PG_BINDIR={given} holds no initdb/pg_ctl/postgres")
        return Path(given)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        bindir = Path(spec.origin).parent / "pginstall" / "bin"
        if _usable(bindir):
            return bindir
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bindir in reversed(debian):
        if _usable(bindir):
            return bindir
    found = shutil.which("initdb")
    if found and _usable(Path(found).resolve().parent):
        return Path(found).resolve().parent
    raise RuntimeError(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster in a temporary directory; :meth:`start`/:meth:`stop` may be
    called again (a test stops the server mid-run and starts it on the same port)."""

    def __init__(self, bindir: Path | None = None, *, fsync: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="streamer-pg-"))
        self.bindir = bindir or find_bindir()
        self.port = _free_port()
        self.fsync = fsync
        self._as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._as = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                        "--clear-groups", "--"]  # fmt: skip
            os.chmod(self.root, 0o755)
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            if not self._runs(self.bindir / "initdb", "--version"):
                # The binaries sit where nobody cannot reach them: take a private copy
                # (with the wheel's bundled libraries, which its RPATH finds as
                # ``$ORIGIN/../../../<package>.libs``).
                install = self.bindir.parent
                base = self.root / "pkg"
                copy = base / install.parent.name / install.name
                shutil.copytree(install, copy, symlinks=True)
                for libs in install.parent.parent.glob("*.libs"):
                    shutil.copytree(libs, base / libs.name, symlinks=True)
                for path in [base, *base.rglob("*")]:
                    if not path.is_symlink():
                        os.chmod(path, path.stat().st_mode | 0o555)
                self.bindir = copy / "bin"
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        try:
            self._init()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _runs(self, *argv: object) -> bool:
        done = subprocess.run([*self._as, *map(str, argv)], capture_output=True, timeout=30)
        return done.returncode == 0

    def _run(self, *argv: object, timeout: float = 60) -> str:
        done = subprocess.run(
            [*self._as, *map(str, argv)], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(map(str, argv))} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{log}"
            )
        return done.stdout

    def _init(self) -> None:
        self._run(
            self.bindir / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if self._as:
            # The log file is written by the server's user.
            self.log.touch()
            nobody = pwd.getpwnam("nobody")
            os.chown(self.log, nobody.pw_uid, nobody.pw_gid)

    def start(self) -> None:
        settings = [
            "listen_addresses=127.0.0.1",
            f"port={self.port}",
            f"unix_socket_directories={self.data}",
            f"fsync={'on' if self.fsync else 'off'}",
            "max_connections=60",
            "shared_buffers=64MB",
        ]
        opts = " ".join(f"-c {s}" for s in settings)
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._runs(self.bindir / "pg_ctl", "-D", self.data, "status")

    def wait_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.5),
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"PostgreSQL on port {self.port} does not accept connections")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` through ``psql`` when available, else through asyncpg."""
        import asyncio

        import asyncpg

        async def go() -> str:
            conn = await asyncpg.connect(self.dsn_for(database))
            try:
                await conn.execute(sql)
            finally:
                await conn.close()
            return ""

        return asyncio.run(go())

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (fails loudly when none can be started)."""
    try:
        server = PgServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The DSN of a new, empty database on the session's server."""
    if not pg_server.running():
        pg_server.start()  # a test that stopped it failed before starting it again
    name = f"t{os.getpid()}_{next(_databases)}"
    pg_server.psql(f"CREATE DATABASE {name}")
    return pg_server.dsn_for(name)
