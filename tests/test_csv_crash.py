"""CSV sink crash safety: SIGKILL mid-write, torn gzip members, repair and resume."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from streamer.core.api import SinkContext, StreamKey
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, Trade
from streamer.plugins.sinks.csv_batch import CsvSink, Options

T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
KEY = StreamKey("binance", "spot", "BTCUSDT", "aggtrade")
BOOK_KEY = StreamKey("binance", "spot", "BTCUSDT", "orderbook")

# The child writes continuously: trades and order books, one flush per batch (each flush
# writes the trades file, then the book file). In "tear" mode its 5th write (the trades
# of the third flush) stops half-way (as a crash inside write(2) would leave it), says so,
# and waits to be killed.
CHILD = textwrap.dedent(
    """
    import asyncio, logging, os, sys, time
    from streamer.core.api import SinkContext, StreamKey
    from streamer.core.counters import Counters
    from streamer.core.records import BookSnapshot, Trade
    from streamer.plugins.sinks._csv_files import FileIO
    from streamer.plugins.sinks.csv_batch import CsvSink, Options

    root, mode, gz = sys.argv[1], sys.argv[2], sys.argv[3] == "gz"
    T0 = 1_795_392_000_000

    class TearingIO(FileIO):
        writes = 0

        def write(self, fd, data):
            TearingIO.writes += 1
            if mode == "tear" and TearingIO.writes == 5:
                os.write(fd, data[: len(data) // 2 + 7])  # mid-row
                print("TORN", flush=True)
                time.sleep(120)
            super().write(fd, data)

    def trade(i):
        return Trade("binance", "spot", "BTCUSDT", i, "93576.00000000", "0.00100000",
                     i, i, T0 + i, i % 3 == 0, True, T0 + i, T0 + i + 1)

    def book(i):
        levels = [(f"{100 - k}.0", "0.00100000") for k in range(5)]
        return BookSnapshot("binance", "spot", "BTCUSDT", i, T0 + i, T0 + i + 2,
                            levels, levels[:3])

    async def main():
        ctx = SinkContext(name="csv", counters=Counters(), logger=logging.getLogger("c"))
        sink = CsvSink(Options(path=root, gzip=gz), ctx, io=TearingIO())
        await sink.open()
        held = await sink.holdings()
        i = held.get(StreamKey("binance", "spot", "BTCUSDT", "aggtrade"), 0) + 1
        while True:
            await sink.write([trade(j) for j in range(i, i + 300)] + [book(i + 299)])
            await sink.flush()
            i += 300
            print("FLUSHED", i - 1, flush=True)

    asyncio.run(main())
    """
)


def run_child_until(root: Path, mode: str, gz: bool, stop_after: int) -> int:
    """Start the writer child, SIGKILL it once it tore a write or flushed ``stop_after``
    times; returns the highest id it reported flushed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), mode, "gz" if gz else "plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # a thread, so that waiting for a line has a timeout
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    flushed, last = 0, 0
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("writer child did not reach the kill point in time")
            if not line:
                pytest.fail(f"writer child exited early: {proc.stderr.read()}")
            if line.startswith("FLUSHED"):
                flushed += 1
                last = int(line.split()[1])
            if line.startswith("TORN") or flushed >= stop_after:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return last


def sink_for(root: Path, gz: bool) -> tuple[CsvSink, Counters]:
    counters = Counters()
    ctx = SinkContext(name="csv", counters=counters, logger=logging.getLogger("test.crash"))
    return CsvSink(Options(path=str(root), gzip=gz), ctx), counters


def trade(i: int) -> Trade:
    return Trade("binance", "spot", "BTCUSDT", i, "93576.00000000", "0.00100000", i, i, T0 + i,
                 i % 3 == 0, True, T0 + i, T0 + i + 1)  # fmt: skip


def read_text(path: Path) -> str:
    return (
        gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else (path.read_text())
    )


def paths(root: Path, gz: bool) -> tuple[Path, Path]:
    ext = ".csv.gz" if gz else ".csv"
    base = root / "binance/spot"
    return (
        base / f"aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23{ext}",
        base / f"orderbook/BTCUSDT/BTCUSDT-orderbook-2026-11-23{ext}",
    )


def check_whole_rows(text: str, columns: int) -> list[list[str]]:
    assert text.endswith("\n")
    rows = [line.split(",") for line in text.splitlines()]
    assert all(len(r) == columns for r in rows), "a torn row survived"
    return rows


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("mode", ["tear", "kill"])
def test_sigkill_mid_write_then_repair_and_resume(tmp_path: Path, mode: str, gz: bool) -> None:
    last_reported = run_child_until(tmp_path, mode, gz, stop_after=8)
    trades_path, book_path = paths(tmp_path, gz)
    if mode == "tear":
        raw = trades_path.read_bytes()
        if gz:
            with pytest.raises(EOFError):  # the torn member, before any repair
                gzip.decompress(raw)
        else:
            assert not raw.endswith(b"\n")

    sink, counters = sink_for(tmp_path, gz)

    async def reopen():
        await sink.open()
        held = await sink.holdings()
        # Resume with an overlap, as a restarted collector would.
        start = held[KEY] - 50
        await sink.write([trade(i) for i in range(start, held[KEY] + 101)])
        await sink.close()
        return held

    held = asyncio.run(reopen())
    if mode == "tear":
        assert counters.get("torn_repairs") == 1
    # Holdings are what whole rows hold: at least what the child confirmed as flushed.
    assert held[KEY] >= last_reported > 0
    assert held[BOOK_KEY] % 300 == 0 and held[BOOK_KEY] <= held[KEY]

    rows = check_whole_rows(read_text(trades_path), 10)
    ids = [int(r[0]) for r in rows[1:]]
    assert ids == list(range(1, held[KEY] + 101)), "duplicate or missing ids after resume"
    assert rows[0][0] == "agg_trade_id" and all(r[1] == "93576.00000000" for r in rows[1:])
    book_rows = check_whole_rows(read_text(book_path), 3 + 4 * 5)
    assert int(book_rows[-1][0]) == held[BOOK_KEY]


@pytest.mark.parametrize("cut", ["trailer", "middle", "header"])
def test_gzip_across_flushes_then_torn_member_reads_after_repair(tmp_path: Path, cut: str) -> None:
    pd = pytest.importorskip("pandas")
    sink, _ = sink_for(tmp_path, gz=True)
    trades_path, _ = paths(tmp_path, gz=True)
    sizes = []

    async def write_flushes():
        for n in range(5):
            await sink.write([trade(i) for i in range(n * 100 + 1, n * 100 + 101)])
            await sink.flush()
            sizes.append(trades_path.stat().st_size)
        await sink.close()

    asyncio.run(write_flushes())
    # Five gzip members: readable as one gzip stream, and by pandas.
    assert len(gzip.decompress(trades_path.read_bytes()).splitlines()) == 501
    last_member = sizes[4] - sizes[3]
    keep = {"trailer": sizes[4] - 3, "middle": sizes[3] + last_member // 2,
            "header": sizes[3] + 4}[cut]  # fmt: skip
    os.truncate(trades_path, keep)  # the crash: the last member is torn
    with pytest.raises(EOFError):
        gzip.decompress(trades_path.read_bytes())

    sink, counters = sink_for(tmp_path, gz=True)

    async def reopen():
        held = await sink.holdings()
        await sink.write([trade(i) for i in range(held[KEY] + 1, 601)])
        await sink.close()
        return held

    held = asyncio.run(reopen())
    assert held[KEY] == 400
    assert counters.get("torn_repairs") == 1
    with gzip.open(trades_path, "rt") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("agg_trade_id,") and len(lines) == 601
    frame = pd.read_csv(trades_path, dtype={"price": str, "quantity": str})
    assert list(frame["agg_trade_id"]) == list(range(1, 601))
    assert set(frame["quantity"]) == {"0.00100000"}


def test_torn_first_row_gets_a_header_again(tmp_path: Path) -> None:
    trades_path, _ = paths(tmp_path, gz=False)
    trades_path.parent.mkdir(parents=True)
    trades_path.write_text("agg_trade_id,price,quan")  # crashed inside the very first write
    sink, counters = sink_for(tmp_path, gz=False)

    async def scenario():
        assert await sink.holdings() == {}
        await sink.write([trade(1), trade(2)])
        await sink.close()

    asyncio.run(scenario())
    rows = check_whole_rows(trades_path.read_text(), 10)
    assert rows[0][0] == "agg_trade_id" and [r[0] for r in rows[1:]] == ["1", "2"]
    assert counters.get("torn_repairs") == 1


def test_repair_of_orderbook_keeps_its_levels(tmp_path: Path) -> None:
    _, book_path = paths(tmp_path, gz=False)
    levels = [("2.0", "1"), ("1.0", "1")]
    sink, _ = sink_for(tmp_path, gz=False)
    book = BookSnapshot("binance", "spot", "BTCUSDT", 7, T0, T0, levels, levels)

    async def first():
        await sink.write([book])
        await sink.close()

    asyncio.run(first())
    with book_path.open("a") as f:
        f.write("8,1795392000001,1795392")  # torn
    sink, counters = sink_for(tmp_path, gz=False)
    deeper = BookSnapshot("binance", "spot", "BTCUSDT", 9, T0 + 5, T0 + 5, levels * 3, levels)

    async def second():
        assert (await sink.holdings())[BOOK_KEY] == 7
        await sink.write([deeper])
        await sink.close()

    asyncio.run(second())
    rows = check_whole_rows(book_path.read_text(), 3 + 4 * 2)
    assert [r[0] for r in rows[1:]] == ["7", "9"]
    assert counters.get("torn_repairs") == 1 and counters.get("book_levels_truncated") == 4
