"""Stable symbol hashing and shards: ``streamer run --shard K/N`` (issue 15).

A shard keeps the symbols whose stable hash falls in it, so N collectors given ``1/N`` ..
``N/N`` split a market with no coordination, and every symbol lands in exactly one shard.
The hash is ``zlib.crc32`` of the symbol's UTF-8 bytes: the same on every machine, Python
version and run (Python's ``hash`` of a string is salted per process, so it cannot be used).

``K`` is **1-based**: ``1/4``, ``2/4``, ``3/4``, ``4/4``. Symbol ``s`` is in shard ``K/N``
when ``stable_hash(s) % N == K - 1``.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["in_shard", "parse_shard", "stable_hash"]

_SHARD = re.compile(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*")


def stable_hash(text: str) -> int:
    """A hash of ``text`` that never changes: CRC-32 of its UTF-8 bytes (0 .. 2**32-1)."""
    return zlib.crc32(text.encode("utf-8"))


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)`` with ``1 <= K <= N``; ``ValueError`` (one line) otherwise."""
    match = _SHARD.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected 'K/N' (shard K of N, K from 1 to N), got {text!r:.40}")
    k, n = int(match[1]), int(match[2])
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: K must be between 1 and N (N >= 1)")
    return k, n


def in_shard(symbol: str, shard: tuple[int, int]) -> bool:
    """True when ``symbol`` belongs to shard ``(K, N)``."""
    k, n = shard
    return stable_hash(symbol) % n == k - 1
