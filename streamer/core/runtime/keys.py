"""The writer's generic de-duplication by high-water mark.

Every record belongs to one output stream and most carry an increasing key (the record
vocabulary of :mod:`streamer.core.records`: :func:`~streamer.core.records.stream_name`,
:func:`~streamer.core.records.record_key`). A writer keeps the highest key it has
passed to its sink per stream and drops anything at or below it, so a restarted worker may
overlap what the sink already holds without writing duplicates.
"""

from __future__ import annotations

from ..records import Kline, Marker, Record, StreamKey, Trade, record_key, stream_name


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
        return kept, {self._key(fast): n for fast, n in dropped.items()}

    def _key(self, fast: tuple) -> StreamKey:
        key = self._keys.get(fast)
        if key is None:
            key = self._keys[fast] = StreamKey(*fast)
        return key
