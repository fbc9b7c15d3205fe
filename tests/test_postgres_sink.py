"""The postgres sink against a real PostgreSQL (started by the tests, see pg_server.py):
tables and types, exactly-once writes, holdings, and its faults."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest
import yaml
from conftest import subprocess_env, wait_for
from pg_server import PgServer

from streamer import (
    BookSnapshot,
    Counters,
    DepthUpdate,
    Kline,
    Marker,
    SinkContext,
    StreamKey,
    Trade,
)
from streamer.plugins.sinks.postgres_sink import Options, PostgresSink

T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
AGG = StreamKey("binance", "spot", "BTCUSDT", "aggtrade")


def make_sink(dsn: str, **opts) -> tuple[PostgresSink, Counters]:
    counters = Counters()
    ctx = SinkContext(name="pg", counters=counters, logger=logging.getLogger("test.pg"))
    opts.setdefault("retry_backoff_max", 0.2)
    return PostgresSink(Options(dsn=dsn, **opts), ctx), counters


def trade(i: int, market: str = "spot", symbol: str = "BTCUSDT") -> Trade:
    return Trade("binance", market, symbol, i, f"93576.{i % 100:02d}000000", "0.00100000", 10 * i,
                 10 * i + 2, T0 + i, i % 3 == 0, True if market == "spot" else None, T0 + i,
                 T0 + i + 1)  # fmt: skip


def kline(i: int, closed: bool = True) -> Kline:
    t = T0 + i * 60_000
    return Kline("binance", "usdm", "ETHUSDT", "1m", t, t + 59_999, "3000.10", "3001.00",
                 "2999.50", "3000.00", "12.345", "37035.1", 42, "6.0", "18000.5", closed,
                 t + 59_999, t + 60_000)  # fmt: skip


def depth(u: int, levels: int = 2) -> DepthUpdate:
    bids = [(f"{100 - k}.5", f"{k}.000") for k in range(levels)]
    return DepthUpdate("binance", "usdm", "ETHUSDT", T0 + u, T0 + u - 1, u - 1, u, u - 2, bids,
                       [("101.0", "0")], T0 + u + 3)  # fmt: skip


def book(u: int) -> BookSnapshot:
    return BookSnapshot("binance", "spot", "BTCUSDT", u, T0 + u, T0 + u + 2,
                        [("99.0", "1.5"), ("98.0", "2")], [("100.0", "0.25")])  # fmt: skip


async def query(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetch(dsn: str, sql: str, *args):
    return asyncio.run(query(dsn, sql, *args))


async def write_all(sink: PostgresSink, *batches, close: bool = True) -> dict:
    await sink.open()
    held = await sink.holdings()
    for batch in batches:
        await sink.write(batch)
    await sink.flush()
    if close:
        await sink.close()
    return held


def test_every_kind_round_trips_exactly_with_numeric_scale_kept(pg_dsn: str) -> None:
    sink, counters = make_sink(pg_dsn)
    empty = DepthUpdate("binance", "usdm", "ETHUSDT", T0 + 9, None, 8, 9, None, [], [], T0 + 10)
    gap = Marker("binance", "spot", "BTCUSDT", "aggtrade", "gap", 5, 6, T0, "reconnect, again")
    batch = [trade(1), trade(2), kline(0), kline(1, closed=False), depth(5), empty, book(7), gap]
    asyncio.run(write_all(sink, batch))
    assert sink.pending_rows == 0
    rows = fetch(pg_dsn, "SELECT agg_trade_id, price::text, quantity::text, is_best_match, "
                 "ts FROM aggtrade ORDER BY 1")  # fmt: skip
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (1, "93576.01000000", "0.00100000", True),
        (2, "93576.02000000", "0.00100000", True),
    ]
    assert int(rows[0][4].timestamp() * 1000) == T0 + 1
    kl = fetch(pg_dsn, "SELECT interval, open_time, open::text, taker_buy_quote_volume::text, "
               "count FROM kline")  # fmt: skip
    assert [tuple(r) for r in kl] == [("1m", T0, "3000.10", "18000.5", 42)]  # the open bar: no
    dp = fetch(pg_dsn, "SELECT last_update_id, pos, side, price::text, quantity::text, "
               "transact_time, prev_update_id FROM depth ORDER BY 1, 2")  # fmt: skip
    assert [tuple(r) for r in dp] == [
        (5, 0, "b", "100.5", "0.000", T0 + 4, 3),
        (5, 1, "b", "99.5", "1.000", T0 + 4, 3),
        (5, 2, "a", "101.0", "0", T0 + 4, 3),
        (9, 0, None, None, None, None, None),
    ]
    ob = fetch(pg_dsn, "SELECT last_update_id, bid_prices::text[], bid_qtys::text[], "
               "ask_prices::text[], ask_qtys[1]::text FROM orderbook")  # fmt: skip
    assert [tuple(r) for r in ob] == [(7, ["99.0", "98.0"], ["1.5", "2"], ["100.0"], "0.25")]
    mk = fetch(pg_dsn, "SELECT stream, kind, first_key, last_key, time, reason FROM markers")
    assert [tuple(r) for r in mk] == [("aggtrade", "gap", 5, 6, T0, "reconnect, again")]
    assert counters.get("klines_unclosed") == 1
    assert counters.get("rows_written", "@binance/usdm/ETHUSDT", "depth") == 4
    versions = fetch(pg_dsn, "SELECT version FROM migrations")
    assert [r[0] for r in versions] == [1]

    again, _ = make_sink(pg_dsn)
    held = asyncio.run(write_all(again))
    assert held == {
        AGG: 2,
        StreamKey("binance", "usdm", "ETHUSDT", "kline_1m"): T0,
        StreamKey("binance", "usdm", "ETHUSDT", "depth"): 9,
        StreamKey("binance", "spot", "BTCUSDT", "orderbook"): 7,
    }


def test_overlapping_writers_and_restarts_keep_one_copy_of_every_row(pg_dsn: str) -> None:
    first, _ = make_sink(pg_dsn, table_prefix="md_", schema="market")
    second, _ = make_sink(pg_dsn, table_prefix="md_", schema="market")

    async def both():
        await first.open()
        await second.open()
        # Interleaved, overlapping ranges of the same stream, as two redundant collectors.
        await first.write([trade(i) for i in range(1, 600)])
        await second.write([trade(i) for i in range(300, 900)])
        await asyncio.gather(first.flush(), second.flush())
        await first.write([trade(i) for i in range(600, 1000)])
        await asyncio.gather(first.close(), second.close())

    asyncio.run(both())
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM market.md_aggtrade ORDER BY 1")]
    assert ids == list(range(1, 1000))
    third, counters = make_sink(pg_dsn, table_prefix="md_", schema="market")
    held = asyncio.run(write_all(third, [trade(i) for i in range(950, 1010)]))
    assert held[AGG] == 999
    assert counters.get("rows_duplicate", "@binance/spot/BTCUSDT", "aggtrade") == 50
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM market.md_aggtrade ORDER BY 1")]
    assert ids == list(range(1, 1010))


def test_rows_above_the_head_are_copied_directly_below_it_through_the_staging_table(
    pg_dsn: str,
) -> None:
    """A second writer that opened before the first advanced the heads: what it holds at
    or below the head fills holes (staged, ON CONFLICT), the rest is COPYed directly."""
    first, _ = make_sink(pg_dsn)
    late, counters = make_sink(pg_dsn)

    async def go():
        await first.open()
        await late.open()
        await first.write([trade(i) for i in (*range(1, 11), *range(20, 31))])
        await first.write([depth(10), depth(30)])
        await first.flush()  # heads: aggtrade 30, depth 30
        await late.write([trade(i) for i in range(11, 41)])  # 11..19 a hole, 20..30 held
        await late.write([depth(20), depth(30), depth(40)])
        await asyncio.gather(first.close(), late.close())

    asyncio.run(go())
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM aggtrade ORDER BY 1")]
    assert ids == list(range(1, 41))
    levels = fetch(pg_dsn, "SELECT last_update_id, count(*) FROM depth GROUP BY 1 ORDER BY 1")
    assert [tuple(r) for r in levels] == [(10, 3), (20, 3), (30, 3), (40, 3)]
    assert counters.get("rows_staged") == 20 + 2  # trades 11..30, depth events 20 and 30
    heads = fetch(pg_dsn, "SELECT stream, last_key FROM heads ORDER BY 1")
    assert [tuple(r) for r in heads] == [("aggtrade", 40), ("depth", 40)]


def test_a_row_above_the_head_already_there_falls_back_to_staging(pg_dsn: str) -> None:
    """Rows put in by something that does not keep ``heads``: the direct COPY meets a
    unique violation, the flush is retried through the staging table, nothing doubles."""
    sink, counters = make_sink(pg_dsn)
    asyncio.run(write_all(sink, [trade(1)]))
    fetch(
        pg_dsn,
        "INSERT INTO aggtrade (exchange, market, symbol, agg_trade_id, price, "
        "quantity, first_trade_id, last_trade_id, transact_time, is_buyer_maker, event_time, "
        "receive_time) VALUES ('binance', 'spot', 'BTCUSDT', 5, 1, 1, 1, 1, 1, true, 1, 1)",
    )
    again, counters = make_sink(pg_dsn)
    asyncio.run(write_all(again, [trade(i) for i in range(2, 9)]))
    assert again.pending_rows == 0 and counters.get("flush_retries") == 1
    rows = fetch(pg_dsn, "SELECT agg_trade_id, price::text FROM aggtrade ORDER BY 1")
    assert [r[0] for r in rows] == list(range(1, 9))
    assert rows[4][1] == "1"  # the row that was there stays


def test_strings_with_copy_special_characters_are_escaped(pg_dsn: str) -> None:
    sink, _ = make_sink(pg_dsn)
    odd = "A\\B\tC\nD\\N"
    asyncio.run(write_all(sink, [Trade("binance", "spot", odd, 1, "1.5", "2", 1, 1, T0, False,
                                       None, T0, T0)]))  # fmt: skip
    rows = fetch(pg_dsn, "SELECT symbol, price::text, is_best_match FROM aggtrade")
    assert [tuple(r) for r in rows] == [(odd, "1.5", None)]


def test_schema_versions_are_checked_never_dropped(pg_dsn: str) -> None:
    off, _ = make_sink(pg_dsn, create_tables=False)
    with pytest.raises(Exception, match="create_tables is off"):
        asyncio.run(off.open())
    sink, _ = make_sink(pg_dsn)
    asyncio.run(write_all(sink, [trade(1)]))
    fetch(pg_dsn, "INSERT INTO migrations (version, description) VALUES (99, 'future')")
    newer, _ = make_sink(pg_dsn)
    with pytest.raises(Exception, match="schema version 99"):
        asyncio.run(newer.open())
    assert fetch(pg_dsn, "SELECT count(*) FROM aggtrade")[0][0] == 1


def test_permission_error_counts_keeps_rows_then_overflow_becomes_a_gap_marker(
    pg_dsn: str,
) -> None:
    fetch(pg_dsn, "CREATE ROLE collector LOGIN")
    fetch(pg_dsn, "GRANT ALL ON SCHEMA public TO collector")
    dsn = pg_dsn.replace("postgres@", "collector@")
    sink, counters = make_sink(dsn, max_buffered_rows=500, flush_rows=100)

    async def scenario():
        await sink.open()  # as collector: it creates (and owns) the tables
        await sink.write([trade(i) for i in range(1, 51)])
        await sink.flush()
        await query(pg_dsn, "REVOKE INSERT ON aggtrade FROM collector")
        await sink.write([trade(i) for i in range(51, 151)])
        await sink.flush()
        assert counters.get("write_errors") >= 1
        assert sink.pending_rows == 100 and counters.get("rows_buffered") == 100
        # More than the buffer holds while it fails: the rest is dropped and counted.
        await sink.write([trade(i) for i in range(151, 701)])
        assert sink.pending_rows == 500
        assert counters.get("rows_dropped", "@binance/spot/BTCUSDT", "aggtrade") == 150
        await query(pg_dsn, "GRANT INSERT ON aggtrade TO collector")
        await asyncio.sleep(0.3)  # past the retry backoff (0.2 s at most)
        await sink.flush()
        assert sink.pending_rows == 0
        await sink.close()

    asyncio.run(scenario())
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM aggtrade ORDER BY 1")]
    assert ids == list(range(1, 551))
    markers = fetch(pg_dsn, "SELECT kind, first_key, last_key, reason FROM markers")
    assert [tuple(m) for m in markers] == [("gap", 551, 700, "permission denied")]
    assert counters.get("gap_markers") == 1


def test_connection_dropped_mid_run_rows_kept_and_written_once(pg_dsn: str) -> None:
    sink, counters = make_sink(pg_dsn)

    async def scenario():
        await sink.open()
        await sink.write([trade(i) for i in range(1, 101)])
        await sink.flush()
        await query(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'market-streamer'")  # fmt: skip
        await sink.write([trade(i) for i in range(101, 201)])
        await sink.flush()
        assert counters.get("write_errors") == 1 and sink.pending_rows == 100
        assert counters.get("db_connected") == 0
        await asyncio.sleep(0.3)
        await sink.write([trade(i) for i in range(201, 301)])
        await sink.flush()
        assert sink.pending_rows == 0 and counters.get("db_connected") == 1
        await sink.close()

    asyncio.run(scenario())
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM aggtrade ORDER BY 1")]
    assert ids == list(range(1, 301))


def test_database_down_at_start_is_retried_until_it_is_up(pg_server: PgServer, pg_dsn: str):
    sink, counters = make_sink(pg_dsn)
    pg_server.stop()

    async def scenario():
        opening = asyncio.ensure_future(sink.open())
        for _ in range(600):
            if counters.get("connect_errors") >= 2:
                break
            await asyncio.sleep(0.05)
        assert not opening.done() and counters.get("db_connected") == 0
        await asyncio.to_thread(pg_server.start)
        await asyncio.wait_for(opening, 30)
        assert counters.get("db_connected") == 1
        await sink.write([trade(1)])
        await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        if not pg_server.running():
            pg_server.start()
    assert fetch(pg_dsn, "SELECT count(*) FROM aggtrade")[0][0] == 1


def test_wrong_credentials_or_database_fail_open_in_one_line(pg_server: PgServer) -> None:
    sink, _ = make_sink(pg_server.dsn_for("no_such_db"))
    with pytest.raises(RuntimeError) as info:
        asyncio.run(sink.open())
    assert "no_such_db" in str(info.value) and "\n" not in str(info.value)


def test_lost_at_close_is_counted_and_logged(pg_server: PgServer, pg_dsn: str, caplog) -> None:
    sink, counters = make_sink(pg_dsn, close_timeout=0.5)

    async def scenario():
        await sink.open()
        await sink.write([trade(i) for i in range(1, 11)])
        await asyncio.to_thread(pg_server.stop)
        await sink.close()

    try:
        with caplog.at_level(logging.ERROR):
            asyncio.run(scenario())
    finally:
        pg_server.start()
    assert sink.pending_rows == 10
    assert counters.get("rows_dropped", "@binance/spot/BTCUSDT", "aggtrade") == 10
    assert "spot BTCUSDT aggtrade 1..10" in caplog.text
    held = asyncio.run(write_all(make_sink(pg_dsn)[0]))
    assert AGG not in held  # never advanced: the next run backfills them


def test_invalid_number_is_dropped_and_counted_not_retried_forever(pg_dsn: str) -> None:
    sink, counters = make_sink(pg_dsn)
    bad = Trade("binance", "spot", "BTCUSDT", 2, "NaN?", "1", 2, 2, T0, True, True, T0, T0)
    asyncio.run(write_all(sink, [trade(1), bad, trade(3)]))
    assert sink.pending_rows == 0 and counters.get("records_invalid") == 1
    ids = [r[0] for r in fetch(pg_dsn, "SELECT agg_trade_id FROM aggtrade ORDER BY 1")]
    assert ids == [1, 3]


# --- the missing driver: one line from `config check` and from `run` ----------------------


def test_missing_driver_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "asyncpg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named asyncpg')\n")
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({
        "pipelines": [{"name": "p", "exchange": "binance", "symbols": ["BTCUSDT"],
                       "streams": {"aggtrade": {}}, "sinks": ["db"]}],
        "sinks": {"db": {"type": "postgres", "dsn": "postgresql://127.0.0.1:1/x"}},
        "runtime": {"state_dir": str(tmp_path / "state")},
    }))  # fmt: skip
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env["PYTHONPATH"]])
    for args in (["config", "check", str(config)], ["run", "--config", str(config)]):
        done = subprocess.run([sys.executable, "-m", "streamer", *args], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode != 0, args
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ") and "market-streamer[postgres]" in lines[0]
        assert "Traceback" not in done.stderr


# --- SIGKILL of the writer mid-COPY --------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from streamer import Counters, SinkContext, StreamKey, Trade
    from streamer.plugins.sinks.postgres_sink import Options, PostgresSink

    T0 = 1_795_392_000_000

    def trade(i):
        return Trade("binance", "spot", "BTCUSDT", i, "93576.00000000", "0.00100000", i, i,
                     T0 + i, i % 3 == 0, True, T0 + i, T0 + i + 1)

    async def main():
        ctx = SinkContext(name="pg", counters=Counters(), logger=logging.getLogger("c"))
        sink = PostgresSink(Options(dsn=sys.argv[1], flush_rows=1_000_000), ctx)
        await sink.open()
        held = await sink.holdings()
        i = held.get(StreamKey("binance", "spot", "BTCUSDT", "aggtrade"), 0) + 1
        while True:
            await sink.write([trade(j) for j in range(i, i + 50_000)])
            print("COPY", i, flush=True)
            await sink.flush()
            i += 50_000
            print("FLUSHED", i - 1, flush=True)

    asyncio.run(main())
    """
)


def kill_mid_copy(dsn: str) -> int:
    """Run the writer child and SIGKILL it while the server runs one of its COPYs (seen in
    ``pg_stat_activity``). Returns the last id the child reported flushed."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, dsn], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    async def watch() -> int:
        conn = await asyncpg.connect(dsn)
        last = 0
        try:
            for line in proc.stdout:
                if line.startswith("FLUSHED"):
                    last = int(line.split()[1])
                if not line.startswith("COPY") or last == 0:
                    continue
                for _ in range(2000):  # while this flush runs
                    if await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                        "'market-streamer' AND state = 'active' AND query LIKE 'COPY%'"
                    ):
                        return last
                    await asyncio.sleep(0.002)
            pytest.fail(f"writer child exited early: {proc.stderr.read()}")
        finally:
            proc.send_signal(signal.SIGKILL)
            await conn.close()
        return last

    try:
        return asyncio.run(watch())
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
        proc.stdout.close()


ALIVE = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'market-streamer'"


@pytest.mark.timeout(180)
def test_sigkill_of_the_writer_mid_copy_then_restart_writes_every_id_once(pg_dsn: str):
    for _round in range(2):  # killed mid-COPY, restarted, killed mid-COPY again
        flushed = kill_mid_copy(pg_dsn)
        assert flushed > 0
        wait_for(lambda: not fetch(pg_dsn, ALIVE), what="the killed session's end")
        count, low, high = fetch(
            pg_dsn, "SELECT count(*), min(agg_trade_id), max(agg_trade_id) FROM aggtrade"
        )[0]
        heads = fetch(pg_dsn, "SELECT last_key FROM heads")[0][0]
        # Whole transactions only: the killed COPY left nothing, heads match the rows.
        assert (count, low, high) == (heads, 1, heads) and heads >= flushed
    sink, _ = make_sink(pg_dsn)
    held = asyncio.run(write_all(sink, [trade(i) for i in range(flushed - 500, flushed + 1000)]))
    assert held[AGG] >= flushed
    count, low, high = fetch(
        pg_dsn, "SELECT count(*), min(agg_trade_id), max(agg_trade_id) FROM aggtrade"
    )[0]
    assert (count, low) == (high, 1) and high == max(held[AGG], flushed + 999)
