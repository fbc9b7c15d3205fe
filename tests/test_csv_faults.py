"""CSV sink faults: disk full, permission denied, overflow, files changed under it, LRU."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from streamer.core.api import SinkContext
from streamer.core.counters import Counters
from streamer.core.records import Trade
from streamer.plugins.sinks._csv_files import FileIO
from streamer.plugins.sinks.csv_batch import CsvSink, Options

T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
DAY = 86_400_000
LOG = logging.getLogger("test.csv.faults")


class FaultyIO(FileIO):
    """Real file I/O, plus an error to raise on write/open (after writing half the data)."""

    def __init__(self) -> None:
        self.fail_write: int | None = None
        self.fail_open: int | None = None
        self.fail_truncate = False
        self.opens = 0
        self.open_fds: set[int] = set()
        self.max_open = 0
        self.fsyncs = 0

    def open(self, path: str) -> int:
        if self.fail_open is not None:
            raise OSError(self.fail_open, os.strerror(self.fail_open), path)
        fd = super().open(path)
        self.opens += 1
        self.open_fds.add(fd)
        self.max_open = max(self.max_open, len(self.open_fds))
        return fd

    def close(self, fd: int) -> None:
        self.open_fds.discard(fd)
        super().close(fd)

    def write(self, fd: int, data: bytes) -> None:
        if self.fail_write is not None:
            os.write(fd, data[: len(data) // 2])  # a partial write, as ENOSPC leaves it
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        super().write(fd, data)

    def truncate(self, fd: int, size: int) -> None:
        if self.fail_truncate:
            raise OSError(errno.EIO, "injected truncate failure")
        super().truncate(fd, size)

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        super().fsync(fd)


def make_sink(path: Path, fio: FileIO | None = None, **opts) -> tuple[CsvSink, Counters]:
    counters = Counters()
    ctx = SinkContext(name="csv", counters=counters, logger=LOG)
    return CsvSink(Options(path=str(path), **opts), ctx, io=fio), counters


def trades(symbol: str, first: int, n: int, t0: int = T0, market: str = "usdm") -> list[Trade]:
    return [
        Trade("binance", market, symbol, i, "1.50", "0.001", i, i, t0 + i, i % 2 == 0, None,
              t0 + i, t0 + i + 1)
        for i in range(first, first + n)
    ]  # fmt: skip


def rows_of(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


def trade_file(root: Path, symbol: str = "BTCUSDT", day: str = "2026-11-23") -> Path:
    return root / f"binance/usdm/aggTrades/{symbol}/{symbol}-aggTrades-{day}.csv"


def test_disk_full_keeps_rows_and_retries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 5))
        await sink.flush()
        fio.fail_write = errno.ENOSPC
        for first in (6, 11, 16):
            await sink.write(trades("BTCUSDT", first, 5))
            await sink.flush()
        # Nothing torn on disk while failing: the partial writes were cut back.
        assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == [1, 2, 3, 4, 5]
        assert counters.get("rows_buffered") == 15
        assert sink.pending_rows == 15
        fio.fail_write = None
        await sink.flush()
        await sink.close()

    with caplog.at_level(logging.ERROR, logger=LOG.name):
        asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == list(range(1, 21))
    assert counters.total("write_errors") == 3
    assert counters.get("write_errors", "BTCUSDT", "aggtrade") == 3
    assert counters.get("rows_buffered") == 0
    assert counters.total("rows_dropped") == 0
    disk_full_lines = [r for r in caplog.records if "disk full" in r.getMessage()]
    assert len(disk_full_lines) == 1  # rate-limited: one clear line, not one per flush
    assert "retry buffer" in disk_full_lines[0].getMessage()


def test_overflow_is_dropped_counted_and_reported_as_gap(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, max_buffered_rows=10, flush_rows=5)

    async def scenario():
        fio.fail_write = errno.ENOSPC
        for first in range(1, 26, 5):
            await sink.write(trades("BTCUSDT", first, 5))
            await sink.flush()
        fio.fail_write = None
        await sink.flush()
        await sink.write(trades("BTCUSDT", 26, 2))
        await sink.close()

    asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == [*range(1, 11), 26, 27]
    assert counters.total("rows_dropped") == 15
    assert counters.get("rows_dropped", "BTCUSDT", "aggtrade") == 15
    assert counters.get("gap_markers") == 1
    markers = rows_of(tmp_path / "binance/usdm/markers/BTCUSDT/BTCUSDT-markers-2026-11-23.csv")
    assert markers[1:] == [[str(T0 + 11), "aggtrade", "gap", "11", "25", "disk full"]]


def test_permission_denied_by_hook_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fio = FaultyIO()
    fio.fail_open = errno.EACCES
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 3))
        await sink.flush()
        await sink.flush()
        assert not trade_file(tmp_path).exists()
        fio.fail_open = None
        await sink.write(trades("BTCUSDT", 4, 2))
        await sink.close()

    with caplog.at_level(logging.ERROR, logger=LOG.name):
        asyncio.run(scenario())
    assert "permission denied" in caplog.text
    assert counters.total("write_errors") == 2
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == [1, 2, 3, 4, 5]


NOBODY = 65534


def _as_unprivileged(body) -> None:
    """Run ``body()`` where file permissions apply: as is, or (as root, who ignores them)
    in a forked child that has dropped to the ``nobody`` user."""
    if os.geteuid() != 0:
        body()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged scenario failed (see stderr)"


@pytest.fixture
def open_dir(tmp_path: Path):
    """A data folder the unprivileged user can reach: ``tmp_path``, or as root a fresh
    folder under the system temp dir owned by ``nobody`` (pytest's own is private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="streamer-perm-"))
    base.chmod(0o755)
    os.chown(base, NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_permission_denied_by_chmod(open_dir: Path) -> None:
    def body() -> None:
        folder = trade_file(open_dir).parent
        folder.mkdir(parents=True)
        sink, counters = make_sink(open_dir)

        async def scenario():
            folder.chmod(0o500)
            try:
                await sink.write(trades("BTCUSDT", 1, 3))
                await sink.flush()
                assert counters.total("write_errors") >= 1
                assert sink.pending_rows == 3
            finally:
                folder.chmod(0o700)
            await sink.close()

        asyncio.run(scenario())

    _as_unprivileged(body)
    assert [int(r[0]) for r in rows_of(trade_file(open_dir))[1:]] == [1, 2, 3]


def test_undo_failure_leaves_torn_tail_that_next_open_repairs(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 3))
        await sink.flush()
        fio.fail_write = errno.EIO
        fio.fail_truncate = True
        await sink.write(trades("BTCUSDT", 4, 40))
        await sink.flush()
        assert not trade_file(tmp_path).read_bytes().endswith(b"\n")  # torn, for now
        fio.fail_write = None
        fio.fail_truncate = False
        await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    assert counters.get("torn_repairs") == 1
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == list(range(1, 44))


def test_file_deleted_under_the_sink_starts_a_new_file(tmp_path: Path) -> None:
    sink, counters = make_sink(tmp_path)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 3))
        await sink.flush()
        trade_file(tmp_path).unlink()
        await sink.write(trades("BTCUSDT", 4, 2))
        await sink.close()

    asyncio.run(scenario())
    rows = rows_of(trade_file(tmp_path))
    assert rows[0][0] == "agg_trade_id"
    assert [int(r[0]) for r in rows[1:]] == [4, 5]
    assert counters.get("files_reopened") == 1


def test_file_replaced_under_the_sink_is_adopted(tmp_path: Path) -> None:
    sink, counters = make_sink(tmp_path)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 3))
        await sink.flush()
        path = trade_file(tmp_path)
        lines = path.read_text().splitlines(keepends=True)
        other = path.with_suffix(".tmp")
        other.write_text("".join(lines[:2]) + lines[2][:7])  # e.g. restored from a backup
        os.replace(other, path)
        await sink.write(trades("BTCUSDT", 4, 2))
        await sink.close()

    asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == [1, 4, 5]
    assert counters.get("files_reopened") == 1
    assert counters.get("torn_repairs") == 1


def test_foreign_file_with_other_header_is_moved_aside(tmp_path: Path) -> None:
    path = trade_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("a,b,c\n1,2,3\n")
    sink, counters = make_sink(tmp_path)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 2))
        await sink.close()

    asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(path)[1:]] == [1, 2]
    aside = [p for p in path.parent.iterdir() if ".conflict-" in p.name]
    assert len(aside) == 1 and aside[0].read_text() == "a,b,c\n1,2,3\n"
    assert counters.get("files_conflict") == 1


def test_foreign_gz_file_is_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "binance/usdm/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not gzip at all\n")
    sink, counters = make_sink(tmp_path, gzip=True)
    asyncio.run(sink.open())
    assert path.read_bytes() == b"not gzip at all\n"
    assert counters.get("torn_repairs") == 0


def test_lru_cache_bounds_open_files_with_many_symbols(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, max_open_files=8)
    symbols = [f"SYM{i:03d}USDT" for i in range(120)]

    async def scenario():
        for round_ in range(3):
            batch = []
            for s in symbols:
                batch += trades(s, 1 + 2 * round_, 2)
            await sink.write(batch)
            await sink.flush()
            assert counters.get("files_open") <= 8
        await sink.close()

    asyncio.run(scenario())
    assert fio.max_open <= 8
    assert fio.opens >= 3 * len(symbols)  # evicted files were reopened
    assert not fio.open_fds  # close() released every descriptor
    for s in symbols:
        rows = rows_of(trade_file(tmp_path, s))
        assert rows[0][0] == "agg_trade_id"
        assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "policy,expected",
    [("never", 0), ("flush", 3 * 2), ("rotation", 2 + 2)],
)
def test_fsync_policy(tmp_path: Path, policy: str, expected: int) -> None:
    fio = FaultyIO()
    sink, _ = make_sink(tmp_path, fio, fsync=policy)

    async def scenario():
        # Two symbols; three flushes; the third moves both to the next UTC day.
        for n, t0 in ((1, T0), (3, T0), (5, T0 + DAY)):
            await sink.write(trades("AAAUSDT", n, 2, t0) + trades("BBBUSDT", n, 2, t0))
            await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    # flush: every file written at every flush; rotation: both day-1 files when the day
    # changed, then both day-2 files at close.
    assert fio.fsyncs == expected


def test_rotation_closes_past_files_of_every_stream(tmp_path: Path) -> None:
    from streamer.core.records import Marker

    sink, counters = make_sink(tmp_path)

    async def scenario():
        for day in range(5):
            t0 = T0 + day * DAY
            batch = trades("AAAUSDT", 1 + 10 * day, 3, t0) + trades("BBBUSDT", 1 + 10 * day, 3, t0)
            batch.append(Marker("binance", "usdm", "AAAUSDT", "aggtrade", "gap", 1, 2, t0, "x"))
            await sink.write(batch)
            await sink.flush()
            # Only the current day's files stay open: trades of 2 symbols + 1 markers file.
            assert counters.get("files_open") == 3
        await sink.close()

    asyncio.run(scenario())
    assert counters.get("files_open") == 0
    assert len(list((tmp_path / "binance/usdm/markers/AAAUSDT").iterdir())) == 5
    assert len(list((tmp_path / "binance/usdm/aggTrades/BBBUSDT").iterdir())) == 5


def test_disk_full_with_gzip_cuts_the_partial_member(tmp_path: Path) -> None:
    import gzip

    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, gzip=True)
    path = tmp_path / "binance/usdm/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv.gz"

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 5))
        await sink.flush()
        fio.fail_write = errno.ENOSPC
        await sink.write(trades("BTCUSDT", 6, 5))
        await sink.flush()
        text = gzip.decompress(path.read_bytes()).decode()  # still a valid gzip file
        assert [int(line.split(",")[0]) for line in text.splitlines()[1:]] == [1, 2, 3, 4, 5]
        fio.fail_write = None
        await sink.close()

    asyncio.run(scenario())
    text = gzip.decompress(path.read_bytes()).decode()
    assert [int(line.split(",")[0]) for line in text.splitlines()[1:]] == list(range(1, 11))
    assert counters.total("write_errors") == 1


def test_buffer_bound_in_bytes(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, max_buffered_mb=1)

    async def scenario():
        fio.fail_write = errno.ENOSPC
        for first in range(1, 40_001, 5000):  # about 3 MB of rows
            await sink.write(trades("BTCUSDT", first, 5000))
            await sink.flush()
        assert sink.pending_rows < 20_000
        fio.fail_write = None
        await sink.close()

    asyncio.run(scenario())
    written = [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]]
    assert written == list(range(1, len(written) + 1))
    assert counters.total("rows_dropped") == 40_000 - len(written) > 0
    markers = rows_of(tmp_path / "binance/usdm/markers/BTCUSDT/BTCUSDT-markers-2026-11-23.csv")
    assert markers[1][2:] == ["gap", str(len(written) + 1), "40000", "disk full"]


def test_out_of_descriptors_closes_half_and_retries(tmp_path: Path) -> None:
    class LimitedIO(FaultyIO):
        def open(self, path: str) -> int:
            if len(self.open_fds) >= 4:
                raise OSError(errno.EMFILE, "Too many open files", path)
            return super().open(path)

    fio = LimitedIO()
    sink, counters = make_sink(tmp_path, fio, max_open_files=50)

    async def scenario():
        batch = []
        for i in range(10):
            batch += trades(f"S{i}USDT", 1, 3)
        await sink.write(batch)
        await sink.close()

    asyncio.run(scenario())
    assert counters.get("fd_limit_hits") >= 1
    assert counters.total("write_errors") == 0
    for i in range(10):
        assert len(rows_of(trade_file(tmp_path, f"S{i}USDT"))) == 4


def test_failed_fsync_is_counted_and_never_rewrites_rows(tmp_path: Path) -> None:
    class NoSyncIO(FaultyIO):
        def fsync(self, fd: int) -> None:
            raise OSError(errno.EIO, "injected fsync failure")

    sink, counters = make_sink(tmp_path, NoSyncIO(), fsync="flush")

    async def scenario():
        for first in (1, 4):
            await sink.write(trades("BTCUSDT", first, 3))
            await sink.flush()
        await sink.close()

    asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == [1, 2, 3, 4, 5, 6]
    assert counters.get("fsync_errors") == 2
    assert counters.total("write_errors") == 0


def test_batch_larger_than_the_buffer_without_disk_errors(tmp_path: Path) -> None:
    sink, counters = make_sink(tmp_path, max_buffered_rows=10, flush_rows=10)

    async def scenario():
        await sink.write(trades("BTCUSDT", 1, 4))  # pending, then flushed to make room
        await sink.write(trades("BTCUSDT", 5, 8))
        await sink.write(trades("BTCUSDT", 13, 25))  # more than the bound at once
        await sink.close()

    asyncio.run(scenario())
    assert [int(r[0]) for r in rows_of(trade_file(tmp_path))[1:]] == list(range(1, 23))
    assert counters.total("rows_dropped") == 15
    markers = rows_of(tmp_path / "binance/usdm/markers/BTCUSDT/BTCUSDT-markers-2026-11-23.csv")
    assert markers[1][2:] == ["gap", "23", "37", "buffer full"]
