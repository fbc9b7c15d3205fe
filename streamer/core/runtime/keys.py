"""The writer's generic de-duplication by high-water mark.

Every record belongs to one output stream and most carry an increasing key (the record
vocabulary of :mod:`streamer.core.records`: :func:`~streamer.core.records.stream_name`,
:func:`~streamer.core.records.record_key`). A writer keeps the highest key it has
passed to its sink per stream and drops anything at or below it, so a restarted worker may
overlap what the sink already holds without writing duplicates.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from ..records import Chunk, Kline, Marker, Record, StreamKey, Trade, record_key, stream_name

#: Per stream ``(exchange, market, symbol, stream)``: ``[records, newest event time, last
#: key]`` of what a filter kept (``last key`` is ``None`` while only markers were kept).
Tally = dict[tuple, list]


class HighWater:
    """Per-stream high-water marks and the filter that drops what is already held.

    ``filter`` keeps, in order, the records whose key is above the stream's mark and raises
    the mark as it goes. Markers always pass. An unclosed kline passes when its bar is newer
    than the last closed bar held, but only a closed kline raises the mark (an open bar is
    updated many times before it closes).
    """

    __slots__ = ("_keys", "_marks")

    def __init__(self, marks: dict[StreamKey, int] | None = None) -> None:
        # Hot path: marks are kept under a cheap tuple per record type and symbol, and
        # turned into StreamKeys only when asked for.
        self._marks: dict[tuple, int] = {}
        self._keys: dict[tuple, StreamKey] = {}
        for key, value in (marks or {}).items():
            self._marks[self._intern(key)] = value

    def _intern(self, key: StreamKey) -> tuple:
        fast = (key.exchange, key.market, key.symbol, key.stream)
        self._keys[fast] = key
        return fast

    @property
    def marks(self) -> dict[StreamKey, int]:
        """The current mark of every stream seen or seeded."""
        return {self._keys[fast]: value for fast, value in self._marks.items()}

    def filter(self, batch: list[Record]) -> tuple[list[Record], dict[StreamKey, int]]:
        """Split ``batch`` into records to write and a count of dropped ones per stream."""
        kept, dropped = self.filter_counted(batch, {})
        return kept, dropped

    def filter_counted(
        self, batch: list[Record], tally: Tally
    ) -> tuple[list[Record], dict[StreamKey, int]]:
        """:meth:`filter`, also adding what it keeps to ``tally`` (see :data:`Tally`), so
        the writer counts in the same pass."""
        kept: list[Record] = []
        dropped: dict[tuple, int] = {}
        marks = self._marks
        for record in batch:
            kind = type(record)
            if kind is Trade:
                fast = (record.exchange, record.market, record.symbol, "aggtrade")
                value = record.trade_id
            elif kind is Marker:
                kept.append(record)
                fast = (record.exchange, record.market, record.symbol, record.stream)
                entry = tally.get(fast)
                if entry is None:
                    tally[fast] = [1, 0, None]
                else:
                    entry[0] += 1
                continue
            else:
                fast = (record.exchange, record.market, record.symbol, stream_name(record))
                value = record_key(record)
            mark = marks.get(fast)
            if mark is not None and value <= mark:
                dropped[fast] = dropped.get(fast, 0) + 1
                continue
            if kind is not Kline or record.closed:
                if mark is None and fast not in self._keys:
                    self._keys[fast] = StreamKey(*fast)
                marks[fast] = value
            kept.append(record)
            event_time = record.event_time
            entry = tally.get(fast)
            if entry is None:
                tally[fast] = [1, event_time, value]
            else:
                entry[0] += 1
                entry[2] = value
                if event_time > entry[1]:
                    entry[1] = event_time
        return kept, {self._key(fast): n for fast, n in dropped.items()}

    def filter_chunks(
        self, streams: Sequence[StreamKey], chunks: Sequence[Chunk], tally: Tally
    ) -> tuple[list[Chunk], dict[StreamKey, int]]:
        """Drop the chunks (or the prefix of a chunk, at a record boundary) at or below
        their stream's mark, raise the marks, and count per stream: records dropped
        (returned) and kept (added to ``tally``, one update per chunk)."""
        kept: list[Chunk] = []
        dropped: dict[tuple, int] = {}
        marks = self._marks
        fasts = [(k.exchange, k.market, k.symbol, k.stream) for k in streams]
        for chunk in chunks:
            keys = chunk.keys
            if not keys:
                continue
            fast = fasts[chunk.stream]
            mark = marks.get(fast)
            last = keys[-1]
            if mark is not None and keys[0] <= mark:
                if last <= mark:
                    dropped[fast] = dropped.get(fast, 0) + len(keys)
                    continue
                index = bisect_right(keys, mark)
                dropped[fast] = dropped.get(fast, 0) + index
                chunk = chunk.tail(index)
            elif mark is None and fast not in self._keys:
                self._keys[fast] = streams[chunk.stream]
            marks[fast] = last
            kept.append(chunk)
            entry = tally.get(fast)
            if entry is None:
                tally[fast] = [len(chunk.keys), chunk.event_time, last]
            else:
                entry[0] += len(chunk.keys)
                entry[2] = last
                if chunk.event_time > entry[1]:
                    entry[1] = chunk.event_time
        return kept, {self._key(fast): n for fast, n in dropped.items()}

    def _key(self, fast: tuple) -> StreamKey:
        key = self._keys.get(fast)
        if key is None:
            key = self._keys[fast] = StreamKey(*fast)
        return key
