"""Callgrind driver for the order book: one engine, one workload, a given number of events.

Run it twice under ``valgrind --tool=callgrind`` (``EVENTS`` and ``0``) per engine; the
difference of the instruction totals divided by ``EVENTS`` is the engine's instruction
count per depth event, independent of the machine's load::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.new.N \\
        .venv/bin/python bench/cg_book.py new deep 2000

Engines: ``old`` (tests/book_reference.py, the engine before issue 12) and ``new``.
Workloads: ``recorded`` (USD-M BTCUSDT capture), ``near`` and ``deep`` (synthetic, see
bench_book.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_book as bb

from streamer.plugins.streams import _book as B


def main() -> int:
    engine, workload, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if workload == "recorded":
        loaded = bb._recorded()
        assert loaded is not None, "tests/data captures not found"
        snapshot, updates, _, split = loaded
        updates = updates[split:]
    elif workload == "near":
        snapshot, updates, _, _ = bb._synthetic()
    else:
        snapshot, updates = bb._deep()
    cls = B.LocalBook if engine == "new" else bb._reference().LocalBook
    book = cls.from_snapshot(snapshot)
    for u in updates[:events]:
        book.apply(u)
        book.crossed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
