"""Live consumer: print one symbol's trades and order-book snapshots from JetStream.

The collectors publish with the ``nats`` sink; this reads the same stream as a storage
node does, but live and without acknowledging anything (an ephemeral ordered consumer
that starts at new messages)::

    python examples/live_consumer.py --symbol BTCUSDT
    python examples/live_consumer.py --url nats://10.0.0.5:4222 --symbol ETHUSDT --market usdm

Needs ``pip install 'market-streamer[nats]'``. Subjects are
``<prefix>.<exchange>.<market>.<stream>.<symbol>``; payloads are decoded whatever their
encoding (MessagePack or JSON), so this works with either sink option. A consumer in
another language reads the JSON encoding: one object per message, ``"k"`` the kind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import msgspec
import nats

from streamer import BookSnapshot, Marker, Record, Trade

_msgpack = msgspec.msgpack.Decoder(Record)


def decode(payload: bytes) -> Record | dict:
    if payload[:1] == b"{":  # the json encoding
        return msgspec.json.decode(payload)
    return _msgpack.decode(payload)


def show(record: Record | dict) -> str:
    if isinstance(record, dict):
        return f"{record.get('k')}: {record}"
    if isinstance(record, Trade):
        side = "sell" if record.is_buyer_maker else "buy "
        return f"trade {record.trade_id} {side} {record.quantity} @ {record.price}"
    if isinstance(record, BookSnapshot):
        bid = record.bids[0] if record.bids else ("-", "-")
        ask = record.asks[0] if record.asks else ("-", "-")
        return f"book  {record.last_update_id} bid {bid[1]} @ {bid[0]} | ask {ask[1]} @ {ask[0]}"
    if isinstance(record, Marker):
        return f"marker {record.kind} {record.stream} {record.first_key}..{record.last_key}"
    return repr(record)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="MARKET")
    parser.add_argument("--prefix", default="md")
    parser.add_argument("--exchange", default="binance")
    parser.add_argument("--market", default="spot")
    parser.add_argument("--symbol", default="BTCUSDT")
    args = parser.parse_args()

    connected = False

    async def quiet(exc: Exception) -> None:  # connection trouble: nats-py reconnects
        if connected:
            print(f"nats: {exc}", file=sys.stderr, flush=True)

    try:
        nc = await asyncio.wait_for(
            nats.connect(args.url, connect_timeout=2, max_reconnect_attempts=-1,
                         error_cb=quiet),
            timeout=10,
        )  # fmt: skip
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        sys.exit(f"error: cannot reach NATS at {args.url} ({type(exc).__name__})")
    connected = True
    js = nc.jetstream()
    base = f"{args.prefix}.{args.exchange}.{args.market}"
    try:
        subs = [
            await js.subscribe(f"{base}.{stream}.{args.symbol}", stream=args.stream,
                               ordered_consumer=True,
                               deliver_policy=nats.js.api.DeliverPolicy.NEW)
            for stream in ("aggtrade", "orderbook", "markers")
        ]  # fmt: skip
    except nats.js.errors.NotFoundError:
        await nc.close()
        sys.exit(
            f"error: no stream {args.stream!r} on {args.url}: start a collector with a nats "
            "sink first (or pass --stream)"
        )

    async def pump(sub) -> None:
        async for msg in sub.messages:
            print(show(decode(msg.data)), flush=True)

    try:
        await asyncio.gather(*(pump(sub) for sub in subs))
    finally:
        await nc.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
