"""Binance's WebSocket request protocol and stream fan-out, for the simulator.

:class:`StreamProtocol` validates stream names, keeps who subscribed to what, answers the
control requests (``SUBSCRIBE``, ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY``,
``GET_PROPERTY``) with Binance's error codes and messages, and publishes each event to the
subscribers of its stream (raw or combined, ms or µs) with the per-message faults applied.
What the events are is the data sources' business (:mod:`.synthetic`, :mod:`.replay`,
:mod:`.highrate`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from typing import Any

import msgspec

from streamer import Counters

from . import _wire as wire
from .faults import Faults
from .simconfig import SimConfig
from .streams import StreamSpec, parse_stream
from .transport import Connection, Transport, framed, to_micro

__all__ = ["StreamProtocol"]

_ID_STR = re.compile(r"^[A-Za-z0-9_\-]{1,36}$")
_JSON_POS = re.compile(r"byte (\d+)")
_ANY_STREAM = re.compile(r"^[a-z0-9_.\-!]+@[A-Za-z0-9_@]+$")
_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")


class StreamProtocol:
    """Subscriptions, control requests and fan-out of one simulator.

    ``known`` holds the ``(market, symbol)`` pairs that have a market; a stream of another
    symbol is accepted but gets nothing, unless ``serve_unknown`` (the high-rate source,
    whose symbols are not markets). ``parse_names=False`` (a replay) accepts any well-formed
    stream name without interpreting it. ``on_added(market, name, spec)`` and
    ``on_removed(market, name)`` tell the data source when a stream gains its first
    subscriber and loses its last one.
    """

    def __init__(
        self,
        config: SimConfig,
        counters: Counters,
        faults: Faults,
        transport: Transport,
        known: Container[tuple[str, str]],
    ) -> None:
        self.config = config
        self.counters = counters
        self.faults = faults
        self.transport = transport
        self.known = known
        self.parse_names = True
        self.serve_unknown = False
        self.on_added: Callable[[str, str, StreamSpec], None] | None = None
        self.on_removed: Callable[[str, str], None] | None = None
        #: Subscribers per ``(market, stream name)``.
        self.subs: dict[tuple[str, str], set[Connection]] = {}
        #: Subscribed streams per ``(market, symbol)``, parsed.
        self.active: dict[tuple[str, str], dict[str, StreamSpec]] = {}
        #: Bumped on every (un)subscription, so sources can cache who wants what.
        self.version = 0
        #: True while a stall fault holds the synthetic market's events back.
        self.stalled = False
        self._held: dict[tuple[str, str], list[bytes]] = {}

    # -- subscriptions ----------------------------------------------------------------------

    def validate(self, market: str, names: list[str], existing: int) -> str:
        """Binance's error message for subscribing to ``names``, or ``""`` if valid."""
        if existing + len(names) > self.config.max_streams:
            return f"Invalid request: too many streams (max {self.config.max_streams})"
        for name in names:
            if not self.parse_names:
                if not _ANY_STREAM.match(name):
                    return f"Invalid request: invalid stream name {name!r}"
            elif parse_stream(name, market) is None:
                return f"Invalid request: invalid stream name {name!r}"
        return ""

    def subscribe(self, conn: Connection, names: list[str]) -> None:
        """Subscribe ``conn`` to ``names`` (already validated)."""
        self.version += 1
        for name in names:
            if name in conn.streams:
                continue
            spec = parse_stream(name, conn.market) if self.parse_names else None
            conn.streams[name] = spec
            if spec is not None and conn.route != "all" and spec.route != conn.route:
                # Binance accepts it but never delivers: wrong route for this stream kind.
                self.counters.incr("ws_unrouted_streams", spec.symbol, spec.kind)
                continue
            if spec is not None and (conn.market, spec.symbol) not in self.known:
                self.counters.incr("ws_unknown_symbol_streams", spec.symbol)
                if not self.serve_unknown:
                    continue
            subs = self.subs.setdefault((conn.market, name), set())
            subs.add(conn)
            if spec is not None:
                self.active.setdefault((conn.market, spec.symbol), {})[name] = spec
                if self.on_added is not None:
                    self.on_added(conn.market, name, spec)

    def unsubscribe(self, conn: Connection, names: list[str]) -> None:
        """Unsubscribe ``conn`` from ``names`` (unknown names are ignored)."""
        self.version += 1
        for name in names:
            spec = conn.streams.pop(name, None)
            subs = self.subs.get((conn.market, name))
            if subs is None or conn not in subs:
                continue
            subs.discard(conn)
            if not subs:
                del self.subs[(conn.market, name)]
                self._held.pop((conn.market, name), None)
                if self.on_removed is not None:
                    self.on_removed(conn.market, name)
                if spec is not None:
                    active = self.active.get((conn.market, spec.symbol), {})
                    active.pop(name, None)
                    if not active:
                        self.active.pop((conn.market, spec.symbol), None)

    def drop(self, conn: Connection) -> None:
        """Forget a connection that ended, with all its subscriptions."""
        conn.closing = True
        self.unsubscribe(conn, list(conn.streams))
        self.transport.discard(conn)

    # -- control requests -------------------------------------------------------------------

    def _error(self, conn: Connection, code: int, msg: str, req_id: Any = None) -> None:
        self.counters.incr("ws_control_errors", "", str(code))
        self.transport.reply(conn, {"code": code, "msg": msg, "id": req_id})

    def _valid_id(self, market: str, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if market == "usdm":
            return isinstance(value, int) and 0 <= value < 1 << 64
        if value is None:
            return True
        if isinstance(value, int):
            return -(1 << 63) <= value < 1 << 63
        return isinstance(value, str) and bool(_ID_STR.match(value))

    def control(self, conn: Connection, message: bytes) -> None:
        """Answer one control request read from ``conn``."""
        self.counters.incr("ws_control_messages")
        try:
            req = msgspec.json.decode(message)
        except msgspec.DecodeError as exc:
            m = _JSON_POS.search(str(exc))
            col = int(m.group(1)) + 1 if m else 1
            self._error(conn, 3, f"Invalid JSON: expected value at line 1 column {col}")
            return
        if not isinstance(req, dict):
            self._error(conn, 2, "Invalid request: expected a JSON object")
            return
        req_id = req.get("id")
        if "method" not in req:
            self._error(conn, 2, "Invalid request: missing field `method`", req_id)
            return
        method = req["method"]
        if method not in _METHODS:
            self._error(
                conn,
                2,
                f"Invalid request: unknown variant `{method}`, expected one of "
                + ", ".join(f"`{m}`" for m in _METHODS),
                req_id,
            )
            return
        if "id" not in req or not self._valid_id(conn.market, req_id):
            self._error(conn, 2, "Invalid request: request ID must be an unsigned integer")
            return
        params = req.get("params", [])
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self._error(conn, 2, "Invalid request: params must be stream names", req_id)
                return
            if method == "SUBSCRIBE":
                new = [p for p in dict.fromkeys(params) if p not in conn.streams]
                error = self.validate(conn.market, new, len(conn.streams))
                if error:
                    self._error(conn, 2, error, req_id)
                    return
                self.subscribe(conn, new)
            else:
                self.unsubscribe(conn, params)
            self.transport.reply(conn, {"result": None, "id": req_id})
        elif method == "LIST_SUBSCRIPTIONS":
            if params:
                self._error(conn, 2, "Invalid request: too many parameters", req_id)
                return
            self.transport.reply(conn, {"result": list(conn.streams), "id": req_id})
        else:
            want = 2 if method == "SET_PROPERTY" else 1
            if not isinstance(params, list) or len(params) > want:
                self._error(conn, 2, "Invalid request: too many parameters", req_id)
                return
            if not params or not isinstance(params[0], str):
                self._error(conn, 2, "Invalid request: property name must be a string", req_id)
                return
            if params[0] != "combined":
                self._error(conn, 0, "Unknown property", req_id)
                return
            if method == "GET_PROPERTY":
                self.transport.reply(conn, {"result": conn.combined, "id": req_id})
                return
            if len(params) < 2 or not isinstance(params[1], bool):
                self._error(conn, 1, "Invalid value type: expected Boolean", req_id)
                return
            conn.combined = params[1]
            self.transport.reply(conn, {"result": None, "id": req_id})

    # -- fan-out ----------------------------------------------------------------------------

    def publish(self, market: str, name: str, kind: str, symbol: str, payload: bytes) -> None:
        """Send one event of stream ``name`` to every subscriber (raw or combined, ms or µs)."""
        subs = self.subs.get((market, name))
        if not subs or self.stalled:
            return
        head = b'{"stream":"' + name.encode() + b'","data":'
        variants = framed(head, payload)
        if any(conn.micro for conn in subs):
            variants += framed(head, to_micro(payload))
        fault = self.faults.take_message_fault()
        send = self.transport.send
        if fault:
            self.counters.incr(f"fault_{fault}", symbol, kind)
            if fault == "malformed":
                junk = head + b'{"e":'
                bad = wire.text_header(len(junk)) + junk
                for conn in list(subs):
                    send(conn, bad, "malformed", symbol)
            elif fault == "reorder":
                # Hold this message back; it goes out right after the next one.
                self._held[(market, name)] = list(variants)
                return
        frames = [variants]
        if fault == "duplicate":
            frames.append(variants)
        held = self._held.pop((market, name), None)
        if held is not None:
            frames.append(tuple(held))
        for conn in list(subs):
            index = (2 if conn.micro else 0) + (1 if conn.combined else 0)
            for variant in frames:
                if index < len(variant):
                    send(conn, variant[index], kind, symbol)
