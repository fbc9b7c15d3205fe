"""The limit: a bare ``websockets`` client that only receives.

It opens the same combined-stream connections as the collector and does nothing with a
message but count it (and read ``E`` from every 16th, for the lag). No decoding, no
storage. Whatever the collector does costs something on top of this.

Usage: ``python bench/bare_receive.py --url ws://127.0.0.1:PORT --symbols 100``; runs until
SIGINT/SIGTERM, printing progress lines (see ``_client.py``).
"""

from __future__ import annotations

import argparse
import asyncio

from _client import Reporter, run_until_signalled, stream_urls
from websockets.asyncio.client import ClientConnection, connect


async def _receive(url: str, rep: Reporter, opened: list[ClientConnection]) -> None:
    ws = await connect(url, compression=None, max_size=2**22, proxy=None)
    opened.append(ws)
    every = rep.sample_every
    while True:
        raw = await ws.recv(decode=False)
        rep.count += 1
        if rep.count % every == 0:
            rep.sample(raw)
            rep.maybe_report()


async def run(url: str, n_symbols: int) -> None:
    """Receive every stream of ``n_symbols`` symbols until cancelled."""
    rep = Reporter()
    await run_until_signalled(
        lambda opened: [_receive(u, rep, opened) for u in stream_urls(url, n_symbols)],
        rep.report,
    )


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="bare websockets receive (the limit)")
    ap.add_argument("--url", required=True)
    ap.add_argument("--symbols", type=int, default=100)
    args = ap.parse_args()
    asyncio.run(run(args.url, args.symbols))


if __name__ == "__main__":
    main()
