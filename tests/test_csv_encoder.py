"""The CSV sink's worker-side encoder: the bytes it ships equal what the writer would build.

Every comparison runs one batch sequence twice through the real writer step
(``Writer._write``: decode, high-water filter, counting, ``Sink.write``/``write_chunks``):
once as records (``encode_batch``, the path of sinks without an encoder) and once as the
worker's encoder output (``encode_encoded``), then compares the file trees byte for byte
and the counters ``streamer status`` shows.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import anyio
import msgspec
import pytest
from conftest import REPO, synth_config
from test_csv_realdata import load

import streamer
from streamer.core.api import EncoderContext, SinkContext, StreamKey
from streamer.core.config import parse_config
from streamer.core.counters import Counters
from streamer.core.records import (
    BookSnapshot,
    Chunk,
    DepthUpdate,
    EncodedBatch,
    Kline,
    Marker,
    Trade,
    decode_batch,
    decode_encoded,
    encode_batch,
    encode_encoded,
    is_encoded,
)
from streamer.core.runtime.bootstrap import ChildSpec, PluginSelection
from streamer.core.runtime.keys import HighWater
from streamer.core.runtime.worker import Worker
from streamer.core.runtime.writer import Writer
from streamer.plugins.sinks import _csv_files as files
from streamer.plugins.sinks._csv_encoder import CsvEncoder
from streamer.plugins.sinks.csv_batch import CsvSink, Options

T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
NOW = T0 + 5_000  # the fixed receive clock of the simulator frames


def _writer(tmp_path: Path) -> Writer:
    spec = ChildSpec(
        kind="writer", child="sink.csv", incarnation=1, plugins=PluginSelection(),
        config=parse_config(synth_config(tmp_path)), control_path="", log_level=20,
        sink_paths={}, sink="csv",
    )  # fmt: skip
    return Writer(spec)


class Run(SimpleNamespace):
    """The outcome of one path: the files, the sink's and the writer's counters."""

    tree: dict[str, bytes]
    sink: Counters
    writer: Counters


def tree_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".streamer.lock"
    }


def run_path(
    root: Path,
    batches: list[list],
    encoded: bool,
    *,
    io: files.FileIO | None = None,
    flushes: bool = False,
    on_open=None,
    **options,
) -> Run:
    """Feed ``batches`` through the writer step into a CSV sink at ``root``, then close."""
    opts = Options(path=str(root), **{"flush_interval": "1h", **options})
    counters = Counters()
    sink = CsvSink(opts, SinkContext(name="csv", counters=counters, logger=_log), io=io)
    encoder = CsvEncoder(opts, EncoderContext(sink="csv", pipeline="p", counters=Counters(),
                                              logger=_log))  # fmt: skip
    writer = _writer(root.parent / f"state-{root.name}")
    writer._sink = sink
    if on_open is not None:
        on_open(counters)

    async def main() -> None:
        await sink.open()
        writer._high_water = HighWater(await sink.holdings())
        for batch in batches:
            if callable(batch):  # a step of the scenario between batches
                batch()
                continue
            payload = encode_encoded(encoder.encode(batch)) if encoded else encode_batch(batch)
            assert is_encoded(payload) is encoded
            await writer._write(sink, bytes(payload))
            if flushes:
                await sink.flush()
        await sink.close()
        await writer._flushed(sink, closed=True)

    asyncio.run(main())
    return Run(tree=tree_of(root), sink=counters, writer=writer.counters)


_log = logging.getLogger("test.encoder")


def both(tmp_path: Path, batches: list[list], **kw) -> tuple[Run, Run]:
    plain = run_path(tmp_path / "records", batches, False, **kw)
    chunks = run_path(tmp_path / "chunks", batches, True, **kw)
    return plain, chunks


def assert_same(plain: Run, chunks: Run, *names: str) -> None:
    assert plain.tree, "nothing was written"
    assert list(plain.tree) == list(chunks.tree)
    for name, data in plain.tree.items():
        assert chunks.tree[name] == data, f"{name} differs"
    shown = ("rows_written", "bytes_written", "rows_duplicate", "rows_quoted", "rows_dropped",
             "klines_unclosed", "gap_markers", *names)  # fmt: skip
    for name in shown:
        assert plain.sink.total(name) == chunks.sink.total(name), name
    for name in ("records_written", "records_flushed", "records_received", "duplicates_dropped"):
        assert plain.writer.total(name) == chunks.writer.total(name), name
    a, b = plain.writer.snapshot(), chunks.writer.snapshot()
    for key in a.keys() | b.keys():
        if key[0] in ("records_written", "records_flushed", "written_event_time",
                      "duplicates_dropped"):  # fmt: skip
            assert a.get(key) == b.get(key), key


def batched(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


# -- records ----------------------------------------------------------------------------------


def trade(i: int, symbol: str = "BTCUSDT", market: str = "spot", t: int = T0, **kw) -> Trade:
    fields = dict(price="93576.00000000", quantity="0.00100000", best=True)
    fields.update(kw)
    return Trade("binance", market, symbol, i, fields["price"], fields["quantity"], i, i + 1,
                 t + i, i % 3 == 0, fields["best"] if market == "spot" else None, t + i + 1,
                 NOW + i)  # fmt: skip


def depth(u: int, levels: int, symbol: str = "BTCUSDT", t: int = T0, market: str = "spot"):
    bids = [(f"{100 - k}.{u % 7}0", f"0.{k}01") for k in range(levels)]
    asks = [(f"{101 + k}.{u % 5}0", f"1.{k}0") for k in range(levels // 2)]
    futures = market == "usdm"
    return DepthUpdate("binance", market, symbol, t + u, t + u - 1 if futures else None,
                       u * 10 + 1, u * 10 + 5, u * 10 if futures else None, bids, asks,
                       NOW + u)  # fmt: skip


def kline(open_time: int, closed: bool, interval: str = "1m", symbol: str = "BTCUSDT") -> Kline:
    return Kline("binance", "spot", symbol, interval, open_time, open_time + 59_999, "1.5",
                 "2.5", "1.0", "2.0", "10", "20", 7, "5", "10", closed, open_time + 60_000,
                 NOW)  # fmt: skip


def book(u: int, levels: int, symbol: str = "BTCUSDT") -> BookSnapshot:
    side = [(f"{100 - k}.0", "0.5") for k in range(levels)]
    return BookSnapshot("binance", "spot", symbol, u * 10 + 5, T0 + u, NOW, side, side[:2])


def marker(symbol: str = "BTCUSDT") -> Marker:
    return Marker("binance", "spot", symbol, "aggtrade", "gap", 3, 9, T0 + 1, "reconnect, 2 s")


def sim_records(n: int) -> list:
    """The benchmark mix: ``n`` frames of the simulator's high-rate source (20 symbols,
    depth 20+20 / aggTrade / kline updates), decoded with a fixed receive clock."""
    from streamer.plugins.exchanges.binance.decode import FrameDecoder
    from streamer.testing.highrate import HighRateSource

    class Conn:
        combined = True

    conn = Conn()
    protocol = SimpleNamespace(version=1, subs={})
    source = HighRateSource(
        1000, 20, 7, {}, SimpleNamespace(snapshot_hook=None), protocol, None, Counters(), None
    )
    protocol.subs = {("spot", name): [conn] for name in source.streams()}
    decode = FrameDecoder("spot").decode
    records = []
    while len(records) < n:
        for data in source._build(min(2000, n - len(records)))[conn]:
            record = decode(data[data.index(b"{") :], NOW)
            assert record is not None
            records.append(record)
    return records


# -- byte identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("capture,market", [("BINANCE_FUTURES", "usdm"), ("BINANCE", "spot")])
def test_recorded_captures_give_identical_files(tmp_path: Path, capture: str, market: str) -> None:
    records, _ = load(capture, market)
    plain, chunks = both(tmp_path, batched(records, 64))
    assert {n.split("/")[2] for n in plain.tree} >= {"aggTrades", "depth"}
    assert_same(plain, chunks)


def test_simulator_mix_gives_identical_files_and_counts(tmp_path: Path) -> None:
    records = sim_records(6000)
    # The order-book stream's snapshots, a marker and closed bars join the mix as the worker
    # would emit them (they stay records, except the closed bars).
    extra = [book(i, 20, "BTCUSDT") for i in range(5)] + [marker()]
    extra += [kline(T0 - 60_000 * k, True, symbol="ETHUSDT") for k in range(3, 0, -1)]
    mix = records[:3000] + extra + records[3000:]
    plain, chunks = both(tmp_path, batched(mix, 500), flushes=True)
    assert len(plain.tree) > 40
    assert_same(plain, chunks)
    assert chunks.sink.total("rows_written") > 6000


def test_encoder_accounts_for_every_record_and_keeps_what_the_writer_prefers(tmp_path) -> None:
    batch = [trade(1), depth(1, 3), kline(T0, False), kline(T0, True), book(1, 3), marker(),
             trade(2), depth(2, 0)]  # fmt: skip
    encoder = CsvEncoder(Options(path=str(tmp_path)), _encoder_context())
    out = encoder.encode(batch)
    assert out.records == [batch[2], batch[4], batch[5]]  # open bar, book, marker
    assert sum(len(c.keys) for c in out.chunks) + len(out.records) == len(batch)
    by_stream = {out.streams[c.stream].stream: c for c in out.chunks}
    assert by_stream["aggtrade"].keys == [1, 2]
    assert by_stream["depth"].rows == 5 and by_stream["depth"].row_ends == [4, 5]
    assert by_stream["kline_1m"].keys == [T0]
    # It crosses the process boundary intact.
    assert decode_encoded(encode_encoded(out)) == out


def test_worker_counts_the_same_per_chunk_as_per_record(tmp_path) -> None:
    batch = [*sim_records(1500), marker(), book(3, 2), kline(T0, True)]
    out = CsvEncoder(Options(path=str(tmp_path)), _encoder_context()).encode(batch)
    per_record, per_chunk = (
        SimpleNamespace(counters=Counters()),
        SimpleNamespace(counters=Counters()),
    )
    for fake in (per_record, per_chunk):
        fake._publish_counts = Worker._publish_counts.__get__(fake)
        fake._count = Worker._count.__get__(fake)
    per_record._count(batch)
    Worker._count_encoded(per_chunk, out)
    assert per_record.counters.snapshot() == per_chunk.counters.snapshot()
    assert per_chunk.counters.total("records_emitted") == len(batch)


def _encoder_context() -> EncoderContext:
    return EncoderContext(sink="csv", pipeline="p", counters=Counters(), logger=_log)


# -- de-duplication ---------------------------------------------------------------------------


def test_resume_overlap_cuts_the_chunk_at_a_record_boundary(tmp_path: Path) -> None:
    """A restarted worker resends from before what the files hold: the writer keeps only the
    records after the held key, for trades (one row each) and depth (several rows each)."""
    first = [[trade(i) for i in range(1, 11)] + [depth(u, 3) for u in range(1, 6)]]
    again = [[trade(i) for i in range(6, 16)] + [depth(u, 3) for u in range(3, 9)]]
    plain = run_path(tmp_path / "records", first, False)
    chunks = run_path(tmp_path / "chunks", first, True)
    plain = run_path(tmp_path / "records", again, False)
    chunks = run_path(tmp_path / "chunks", again, True)
    assert_same(plain, chunks)
    base = "binance/spot/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv"
    ids = [int(line.split(b",")[0]) for line in chunks.tree[base].splitlines()[1:]]
    assert ids == list(range(1, 16))
    depth_file = chunks.tree["binance/spot/depth/BTCUSDT/BTCUSDT-depth-2026-11-23.csv"]
    last_ids = [int(line.split(b",")[3]) for line in depth_file.splitlines()[1:]]
    assert last_ids == [u * 10 + 5 for u in range(1, 9) for _ in range(4)]
    key = ("duplicates_dropped", "@binance/spot/BTCUSDT")
    assert chunks.writer.get(*key, "aggtrade") == 5 and chunks.writer.get(*key, "depth") == 3


def test_high_water_cuts_chunks_and_raises_the_mark() -> None:
    key = StreamKey("binance", "spot", "BTCUSDT", "aggtrade")
    hw = HighWater({key: 4})
    data = b"".join(b"%d,x\n" % i for i in range(1, 8))
    offsets = [len(b"".join(b"%d,x\n" % i for i in range(1, j + 1))) for j in range(1, 8)]
    chunk = Chunk(0, 1, list(range(1, 8)), [T0] * 7, offsets, 7, [], T0, data)
    tally: dict = {}
    kept, dropped = hw.filter_chunks([key], [chunk, chunk], tally)
    assert [c.data for c in kept] == [b"5,x\n6,x\n7,x\n"]
    assert kept[0].offsets == [4, 8, 12] and kept[0].rows == 3 and kept[0].keys == [5, 6, 7]
    assert dropped == {key: 4 + 7} and hw.marks[key] == 7
    assert tally == {("binance", "spot", "BTCUSDT", "aggtrade"): [3, T0, 7]}


def test_chunk_cuts_keep_byte_offsets_of_multi_byte_rows_and_row_counts() -> None:
    rows = ["1,é\n", "2,a\n2,b\n", "3,ü\n3,c\n3,d\n"]
    data = "".join(rows).encode()
    ends = [len("".join(rows[: i + 1]).encode()) for i in range(3)]
    chunk = Chunk(0, "u", [1, 2, 3], [10, 20, 30], ends, 6, [1, 3, 6], 30, data)
    tail = chunk.tail(1)
    assert tail.data == "".join(rows[1:]).encode() and tail.rows == 5
    assert tail.row_ends == [2, 5] and tail.offsets[-1] == len(tail.data)
    head = chunk.head(2)
    assert head.data == "".join(rows[:2]).encode() and head.rows == 3 and head.times == [10, 20]


# -- what stays as it was ----------------------------------------------------------------------


def test_kline_intervals_hourly_rotation_and_microseconds(tmp_path: Path) -> None:
    hour = 3_600_000
    batches = [
        [kline(T0 + hour * k, True, "1h") for k in range(30)]
        + [kline(T0 + 60_000 * k, k % 2 == 0, "1m") for k in range(90)]
        + [trade(i, t=(T0 - 5) * 1000) for i in range(1, 20)],  # microsecond times
        [kline(T0 + hour * 29, True, "1h"), kline(T0 + hour * 30, False, "1h")],
    ]
    plain, chunks = both(tmp_path, batches, rotation="hourly")
    assert_same(plain, chunks)
    assert "binance/spot/klines/BTCUSDT/1h/BTCUSDT-1h-2026-11-24-05.csv" in chunks.tree
    assert chunks.sink.total("klines_unclosed") == 46


def test_gzip_members_are_identical(tmp_path: Path) -> None:
    batches = batched(sim_records(2000), 300)
    plain, chunks = both(tmp_path, batches, gzip=True, flushes=True)
    assert_same(plain, chunks)
    name = next(n for n in chunks.tree if "aggTrades" in n)
    assert gzip.decompress(chunks.tree[name]).startswith(b"agg_trade_id,")


def test_strings_that_need_quoting_go_to_the_sink_as_records(tmp_path: Path) -> None:
    odd = trade(5, price='9,5"')
    batch = [trade(1), trade(2, symbol="ETHUSDT"), odd, trade(7), depth(1, 2)]
    out = CsvEncoder(Options(path=str(tmp_path)), _encoder_context()).encode(batch)
    # The whole BTCUSDT trade stream of the batch is left to the sink, in order.
    assert out.records == [batch[0], odd, batch[3]]
    plain, chunks = both(tmp_path, [batch])
    assert_same(plain, chunks)
    assert chunks.sink.get("rows_quoted") == 3
    assert (
        b'"9,5"""' in chunks.tree["binance/spot/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv"]
    )


def test_keys_that_do_not_increase_are_left_to_the_sink(tmp_path: Path) -> None:
    # Across a day boundary a late trade repeats an id: the sink's own de-duplication decides.
    late = trade(4, t=T0 - 86_400_000)
    batch = [trade(3), trade(5), late, trade(6), trade(6)]
    out = CsvEncoder(Options(path=str(tmp_path)), _encoder_context()).encode(batch)
    assert out.records == batch and not out.chunks
    plain, chunks = both(tmp_path, [batch])
    assert_same(plain, chunks)


def test_overflow_drops_at_the_same_record_and_reports_the_same_gap(tmp_path: Path) -> None:
    """Writes fail, the retry buffer (max_buffered_rows) fills mid-chunk: the same records
    are dropped, and the gap markers written once the disk is back are identical."""

    class Failing(files.FileIO):
        def __init__(self) -> None:
            self.broken = True

        def write(self, fd, data):
            if self.broken:
                raise OSError(28, "No space left on device")
            super().write(fd, data)

    batches = [[trade(i) for i in range(1, 30)] + [depth(u, 4) for u in range(1, 8)],
               [trade(i) for i in range(30, 60)] + [depth(u, 4) for u in range(8, 20)]]  # fmt: skip
    runs = []
    for encoded in (False, True):
        io = Failing()
        root = tmp_path / ("chunks" if encoded else "records")
        dropped: list[int] = []
        runs_sink: list[Counters] = []

        def disk_is_back(io=io, dropped=dropped, runs_sink=runs_sink) -> None:
            dropped.append(runs_sink[-1].total("rows_dropped"))
            io.broken = False

        scenario = [*batches, disk_is_back, [trade(100), depth(100, 1)]]
        run = run_path(root, scenario, encoded, io=io, flushes=True, flush_rows=10,
                       max_buffered_rows=50, on_open=runs_sink.append)  # fmt: skip
        assert dropped[0] > 0 and run.sink.total("gap_markers") == 2
        runs.append(run)
    plain, chunks = runs
    assert_same(plain, chunks)
    markers = chunks.tree["binance/spot/markers/BTCUSDT/BTCUSDT-markers-2026-11-23.csv"]
    assert b"gap" in markers


# -- the runtime ------------------------------------------------------------------------------


def test_worker_sends_chunks_to_encoder_sinks_and_records_to_the_others(tmp_path: Path) -> None:
    """A pipeline feeding the csv sink (encoder) and a record sink: one payload of each kind."""
    config = parse_config(
        synth_config(
            tmp_path,
            sinks={"files": {"type": "csv", "path": str(tmp_path / "csv")},
                   "a": {"type": "lines", "path": str(tmp_path / "a")}},
            pipeline={"sinks": ["files", "a"]},
        )
    )  # fmt: skip
    spec = ChildSpec(
        kind="worker", child="worker.synth.0", incarnation=1,
        plugins=PluginSelection(extra_modules=("core_plugins",)), config=config,
        control_path="", log_level=20, sink_paths={"files": "", "a": ""}, pipeline_index=0,
        symbols=["AAA"],
    )  # fmt: skip
    batch = [trade(i, symbol="AAA") for i in range(1, 6)] + [marker("AAA")]

    async def main() -> dict:
        worker = Worker(spec)
        worker._build()
        queues = {}
        for sink in ("files", "a"):
            send, receive = anyio.create_memory_object_stream[bytes](4)
            worker._queues[sink] = (send, receive)
            queues[sink] = receive
        for record in batch:
            worker.emit(record)
        await worker._flush()
        return worker, {sink: receive.receive_nowait() for sink, receive in queues.items()}

    worker, payloads = anyio.run(main)
    assert set(worker._encoders) == {"files"}
    assert decode_batch(payloads["a"]) == batch
    out = decode_encoded(payloads["files"])
    assert out.records == [batch[-1]] and out.chunks[0].keys == [1, 2, 3, 4, 5]
    assert worker.counters.get("records_emitted", "AAA", "aggtrade") == 6  # marker too, as before


def test_a_failing_encoder_falls_back_to_records(tmp_path: Path, caplog) -> None:
    class Broken(CsvEncoder):
        def encode(self, batch):
            raise RuntimeError("boom")

    async def main():
        worker = Worker.__new__(Worker)
        worker.counters = Counters()
        worker.logger = _log
        worker._rate_log = streamer.RateLimitedLog(_log)
        return worker, worker._encode("files", Broken(Options(path="x"), _encoder_context()), [])

    worker, out = anyio.run(main)
    assert out is None and worker.counters.get("encoder_errors") == 1
    assert "encoder of sink 'files' failed (RuntimeError: boom)" in caplog.text


def test_sinks_without_an_encoder_keep_the_record_path() -> None:
    sys.path.insert(0, str(REPO / "examples" / "streamer-jsonl"))
    try:
        from streamer_jsonl import JsonLinesSink
    finally:
        sys.path.remove(str(REPO / "examples" / "streamer-jsonl"))
    from core_plugins import LinesSink

    assert JsonLinesSink.Encoder is None and LinesSink.Encoder is None
    assert CsvSink.Encoder is CsvEncoder
    assert {"Chunk", "EncodedBatch", "EncoderContext", "SinkEncoder"} <= set(streamer.__all__)


def test_chunk_frames_never_look_like_record_frames() -> None:
    empty = EncodedBatch([], [], [])
    assert is_encoded(encode_encoded(empty)) and not is_encoded(encode_batch([]))
    assert not is_encoded(encode_batch([trade(1)]))
    with pytest.raises(msgspec.DecodeError):
        decode_encoded(encode_batch([trade(1)]))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("mode", ["tear", "kill"])
def test_sigkill_mid_write_of_chunks_then_repair_and_resume(
    tmp_path: Path, monkeypatch, mode: str, gz: bool
) -> None:
    """test_csv_crash's SIGKILL scenario with the trades arriving as chunks from the encoder
    (the book stays a record): torn rows are repaired, resume has no gap or duplicate.

    The chunks are handed over before the records, so that each flush still writes the
    trades file first, as the scenario (its 5th write tears the trades) expects."""
    import test_csv_crash

    direct = "await sink.write([trade(j) for j in range(i, i + 300)] + [book(i + 299)])"
    via_chunks = (
        "out = CsvEncoder(sink.options, None).encode("
        "[trade(j) for j in range(i, i + 300)] + [book(i + 299)]); "
        "await sink.write_chunks(out.streams, out.chunks); await sink.write(out.records)"
    )
    assert direct in test_csv_crash.CHILD
    child = test_csv_crash.CHILD.replace(direct, via_chunks).replace(
        "from streamer.plugins.sinks.csv_batch import CsvSink, Options",
        "from streamer.plugins.sinks.csv_batch import CsvSink, Options\n"
        "from streamer.plugins.sinks._csv_encoder import CsvEncoder",
    )
    monkeypatch.setattr(test_csv_crash, "CHILD", child)
    test_csv_crash.test_sigkill_mid_write_then_repair_and_resume(tmp_path, mode, gz)


def test_runtime_feeds_the_csv_sink_chunks_and_the_lines_sink_records(tmp_path: Path) -> None:
    """Both kinds of sink in one pipeline of the real runtime get the same trades."""
    from core_plugins import read_lines
    from test_csv_runtime import ids_on_disk

    from streamer.core.runtime import read_status, run

    data = synth_config(
        tmp_path,
        sinks={"files": {"type": "csv", "path": str(tmp_path / "csv"), "flush_interval": "200ms"},
               "a": {"type": "lines", "path": str(tmp_path / "a")}},
        pipeline={"sinks": ["files", "a"]},
    )  # fmt: skip
    code = run(parse_config(data), ["csv"], extra_plugin_modules=["core_plugins"], duration=1.5)
    assert code == 0
    csv_ids = ids_on_disk(tmp_path / "csv")
    lines = {key.symbol: ids for key, ids in read_lines(tmp_path / "a").items()}
    assert csv_ids == lines and all(len(ids) > 10 for ids in csv_ids.values())
    status = read_status(tmp_path / "state")
    written = status["sinks"]["files"]["totals"]
    assert written["rows_written"] == sum(map(len, csv_ids.values()))
    assert written.get("records_written") == status["sinks"]["a"]["totals"]["records_written"]
