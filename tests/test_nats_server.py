"""The test broker itself: a real nats-server with JetStream, restartable with its data."""

from __future__ import annotations

import asyncio

import nats


async def _publish_and_count(url: str, stream: str, payload: bytes | None) -> int:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        if payload is not None:
            ack = await js.publish(f"{stream.lower()}.x", payload)
            assert ack.stream == stream
        return (await js.stream_info(stream)).state.messages
    finally:
        await nc.close()


def test_session_server_serves_jetstream(nats_server):
    assert asyncio.run(_publish_and_count(nats_server.url, "SELFTEST", b"hello")) == 1


def test_a_restarted_server_keeps_its_stream(nats_server_factory):
    server = nats_server_factory()
    assert asyncio.run(_publish_and_count(server.url, "KEEP", b"one")) == 1
    server.stop()
    server.start()
    assert asyncio.run(_publish_and_count(server.url, "KEEP", None)) == 1
