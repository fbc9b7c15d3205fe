"""What the ``nats`` sink and source share: subjects, message ids, payloads, the stream.

Subjects: ``<prefix>.<exchange>.<market>.<stream>.<symbol>``, ``<stream>`` being the
record's output stream (``aggtrade``, ``depth``, ``kline_1m``, ``orderbook``); markers go
to ``<prefix>.<exchange>.<market>.markers.<symbol>``. Characters a subject token cannot
hold (``.``, ``*``, ``>``, white space) become ``_``; the payload keeps the true values.

Payloads, one record per message (``encoding``):

* ``msgpack`` (default): the record as the runtime encodes it, a MessagePack array whose
  first element is the record kind (``trade``, ``depth``, ``kline``, ``book``,
  ``marker``) followed by the record's fields in declaration order (see
  ``streamer/core/records.py``);
* ``json``: a JSON object ``{"k": kind, field: value, ...}`` with the same field names.

Prices and quantities are the exchange's exact strings in both. ``Nats-Msg-Id`` is
``<exchange>.<market>.<symbol>.<stream>.<key>`` (the record key: trade id, closed kline
open time, update id), so JetStream drops what a redundant collector publishes again within
the stream's duplicate window; an unclosed kline (``all_updates``) adds ``.u<event_time>``
and a marker is identified by all its fields.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from streamer import (
    BookSnapshot,
    DepthUpdate,
    Kline,
    Marker,
    Record,
    Trade,
    parse_duration,
    record_key,
    stream_name,
)

MARKERS_SUBJECT = "markers"
DRIVER_HINT = "pip install 'market-streamer[nats]'"

_BAD_TOKEN = re.compile(r"[.*>\s]")
_TOKEN_OK = re.compile(r"[A-Za-z0-9_\-]+")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_KINDS: dict[str, type] = {"trade": Trade, "depth": DepthUpdate, "kline": Kline}
_KINDS.update({"book": BookSnapshot, "marker": Marker})
_TAG = {cls: tag for tag, cls in _KINDS.items()}

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(Record)
_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(dict[str, Any])


def require_driver() -> None:
    """``ValueError`` (one line) when nats-py is not installed."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ValueError(f"the nats-py driver is not installed: {DRIVER_HINT}") from None


def check_common(url: str, stream: str, prefix: str) -> None:
    """One-line ``ValueError`` for a URL, stream name or subject prefix that cannot work."""
    require_driver()
    for part in url.split(","):
        if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?", part.strip()):
            raise ValueError(f"url: expected nats://host:port, got {part.strip()!r:.60}")
    if not _STREAM_NAME.fullmatch(stream):
        raise ValueError(f"stream: letters, digits, '-' and '_' only, got {stream!r:.60}")
    tokens = prefix.split(".")
    if not prefix or not all(_TOKEN_OK.fullmatch(t) for t in tokens):
        raise ValueError(f"subject_prefix: dot-separated words, got {prefix!r:.60}")


def token(text: str) -> str:
    """``text`` usable as one subject token."""
    return _BAD_TOKEN.sub("_", text) or "_"


def subject_of(prefix: str, record: Record) -> str:
    stream = MARKERS_SUBJECT if type(record) is Marker else stream_name(record)
    return (
        f"{prefix}.{token(record.exchange)}.{token(record.market)}."
        f"{token(stream)}.{token(record.symbol)}"
    )


def msg_id(record: Record) -> str:
    kind = type(record)
    if kind is Marker:
        r: Any = record
        return (
            f"m.{r.exchange}.{r.market}.{r.symbol}.{r.stream}.{r.kind}."
            f"{r.first_key}.{r.last_key}.{r.time}.{r.reason}"
        )
    base = f"{record.exchange}.{record.market}.{record.symbol}.{stream_name(record)}"
    if kind is Kline and not record.closed:  # type: ignore[union-attr]
        return f"{base}.{record_key(record)}.u{record.event_time}"  # type: ignore[union-attr]
    return f"{base}.{record_key(record)}"


def encode(record: Record, encoding: str) -> bytes:
    if encoding == "json":
        data = msgspec.structs.asdict(record)
        return _json_encoder.encode({"k": _TAG[type(record)], **data})
    return _msgpack_encoder.encode(record)


def decode(payload: bytes) -> Record:
    """A record from either encoding; ``msgspec.DecodeError``/``ValueError`` if corrupt."""
    if payload[:1] == b"{":
        data = _json_decoder.decode(payload)
        cls = _KINDS.get(data.get("k", ""))
        if cls is None:
            raise ValueError(f"unknown record kind {data.get('k')!r:.30}")
        values = [data.get(name) for name in cls.__struct_fields__]
        return msgspec.convert([data["k"], *values], Record)
    return _msgpack_decoder.decode(payload)


def seconds(value: Any) -> float:
    return parse_duration(value)


async def ensure_stream(js: Any, options: Any) -> None:
    """Create the JetStream stream for ``<subject_prefix>.>`` with the options' limits
    when it does not exist (an existing stream is used as it is)."""
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(options.stream)
        return
    except NotFoundError:
        pass
    max_age = seconds(options.max_age)
    config = StreamConfig(
        name=options.stream,
        subjects=[f"{options.subject_prefix}.>"],
        storage=StorageType.FILE,
        duplicate_window=seconds(options.duplicate_window),
        max_age=max_age if max_age > 0 else None,
        max_bytes=options.max_mb * 1_000_000 if options.max_mb > 0 else None,
    )
    await js.add_stream(config)
