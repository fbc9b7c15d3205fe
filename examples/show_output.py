"""Print what a collector run wrote under a CSV sink's path (used by ``make demo``).

Usage: ``python examples/show_output.py DATA_DIR``
"""

from __future__ import annotations

import gzip
import sys
from collections import Counter
from pathlib import Path


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()


def _show(title: str, path: Path, rows: int = 3, columns: int = 9) -> None:
    lines = _lines(path)
    print(f"\n--- {title}: {path} ({len(lines) - 1} rows), first {rows}:")
    for line in lines[: rows + 1]:
        cells = line.split(",")
        more = f",... (+{len(cells) - columns} columns)" if len(cells) > columns else ""
        print("   ", ",".join(cells[:columns]) + more)


def main(root: Path) -> int:
    files = sorted(p for p in root.rglob("*.csv*") if p.is_file())
    if not files:
        print(f"nothing was written under {root}", file=sys.stderr)
        return 1
    print(f"--- {len(files)} files written under {root}:")
    for path in files:
        rows = len(_lines(path)) - 1
        print(f"{path.stat().st_size:>9} bytes {rows:>6} rows  {path.relative_to(root)}")
    for kind in ("aggTrades", "klines", "orderbook", "depth"):
        found = [p for p in files if f"/{kind}/" in p.as_posix()]
        if found:
            _show(kind, found[0])
    kinds: Counter[str] = Counter()
    for path in files:
        if "/markers/" in path.as_posix():
            lines = _lines(path)
            column = lines[0].split(",").index("kind")
            kinds.update(line.split(",")[column] for line in lines[1:])
    if kinds:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        print(f"\n--- markers (gaps found and what became of them): {summary}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
