"""File-level operations of the CSV sink (private to :mod:`.csv_batch`).

* :class:`FileIO` is every system call the sink makes while writing; tests replace it to
  inject disk-full or permission errors, or to tear a write in half before a SIGKILL.
* :func:`inspect` reads only the head and the tail of a file: its header, its last whole
  row and where the valid data ends, for plain and gzip files alike.
* :func:`gzip_member` builds one self-contained gzip member per flush, so the last
  member (found by searching backwards for the gzip magic) holds the last rows and a
  torn member from a crash can be cut off without reading the whole file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

#: Header of every gzip member we write: magic, deflate, no flags, mtime 0, xfl 0, OS unknown
#: (fixed, so that equal data gives equal bytes).
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_MAGIC = GZIP_HEADER[:3]
_FIRST_WINDOW = 64 * 1024


def gzip_member(data: bytes, level: int) -> bytes:
    """``data`` as one complete gzip member (readable on its own or concatenated)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(data) + comp.flush()
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return GZIP_HEADER + body + trailer


class FileIO:
    """The system calls the sink uses to write files. Subclass to inject faults in tests.

    Every method raises ``OSError`` on failure, like the ``os`` functions it wraps.
    """

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents (no error if it exists)."""
        os.makedirs(path, exist_ok=True)

    def open(self, path: str) -> int:
        """Open ``path`` for appending, creating it (mode 0644 minus umask) if missing."""
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data``; on error, part of it may have reached the file."""
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def truncate(self, fd: int, size: int) -> None:
        """Cut the file back to ``size`` bytes (undoing a partial write)."""
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        """Make the file's data durable."""
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        """Make a directory entry (a newly created file) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, fd: int) -> None:
        """Close a descriptor returned by :meth:`open`."""
        os.close(fd)


@dataclass
class Tail:
    """What :func:`inspect` found in a file.

    ``valid_size``: bytes up to the end of the last whole row (plain) or the last whole
    gzip member (gzip); anything after it is torn. ``header``: the first line (with its
    newline) or ``None`` if there is no whole line. ``last_line``: the last whole line,
    which is the header itself when the file holds no rows.
    """

    size: int
    valid_size: int
    header: bytes | None
    last_line: bytes | None
    #: A ``.gz`` path holding no gzip data at all: someone else's file, never truncated.
    foreign: bool = False

    @property
    def torn(self) -> bool:
        """True when the file ends with a partial row or member."""
        return self.valid_size < self.size and not self.foreign


def inspect(path: str, gz: bool) -> Tail:
    """Head and tail of ``path`` without reading the whole file (``OSError`` if unreadable)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return Tail(0, 0, None, None)
        if gz:
            valid, last = _gzip_tail(f, size)
            header = _gzip_header_line(f, valid) if valid else None
            if not valid:
                f.seek(0)
                if f.read(len(_MAGIC)) != _MAGIC[: min(size, len(_MAGIC))]:
                    return Tail(size, 0, None, None, foreign=True)
        else:
            valid, last = _plain_tail(f, size)
            header = _plain_header_line(f) if valid else None
        return Tail(size, valid, header, last)


def repair(path: str, gz: bool) -> Tail:
    """:func:`inspect`, then cut a torn tail off (never append to a torn row)."""
    tail = inspect(path, gz)
    if tail.torn and not tail.foreign:
        os.truncate(path, tail.valid_size)
    return tail


def _plain_tail(f, size: int) -> tuple[int, bytes | None]:
    window = _FIRST_WINDOW
    while True:
        start = max(0, size - window)
        f.seek(start)
        buf = f.read(size - start)
        end = buf.rfind(b"\n")
        if end < 0:
            if start == 0:
                return 0, None
            window *= 4
            continue
        begin = buf.rfind(b"\n", 0, end)
        if begin < 0 and start > 0:
            window *= 4
            continue
        return start + end + 1, buf[begin + 1 : end + 1]


def _plain_header_line(f) -> bytes | None:
    f.seek(0)
    chunks = []
    while True:
        chunk = f.read(_FIRST_WINDOW)
        if not chunk:
            return None
        nl = chunk.find(b"\n")
        if nl >= 0:
            chunks.append(chunk[: nl + 1])
            return b"".join(chunks)
        chunks.append(chunk)


def _last_magic_before(f, end: int) -> int:
    """Offset of the last gzip magic (a possible member start) ending before ``end``, or -1."""
    window = _FIRST_WINDOW
    while end >= len(_MAGIC):
        start = max(0, end - window)
        f.seek(start)
        buf = f.read(end - start)
        pos = buf.rfind(_MAGIC)
        if pos >= 0:
            return start + pos
        if start == 0:
            return -1
        # Overlap windows so a magic split across a boundary is still found.
        end = start + len(_MAGIC) - 1
        window *= 4
    return -1


def _gzip_tail(f, size: int) -> tuple[int, bytes | None]:
    """Find the last complete member ending in a newline by trying candidate starts from
    the end backwards; the bytes after that member are a torn member from a crash."""
    end = size
    while True:
        off = _last_magic_before(f, end)
        if off < 0:
            return 0, None
        f.seek(off)
        raw = f.read(size - off)
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = dec.decompress(raw)
        except zlib.error:
            out = b""
        if dec.eof and out.endswith(b"\n"):
            begin = out.rfind(b"\n", 0, len(out) - 1)
            return size - len(dec.unused_data), out[begin + 1 :]
        # Not a whole member from here (torn, or magic bytes inside compressed data):
        # try the previous candidate.
        end = off + len(_MAGIC) - 1


def _gzip_header_line(f, valid: int) -> bytes | None:
    # The header row is at the start of the first member: inflate just enough of it.
    f.seek(0)
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    got = b""
    remaining = valid
    while remaining > 0 and not dec.eof:
        chunk = f.read(min(_FIRST_WINDOW, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        try:
            got += dec.decompress(chunk)
        except zlib.error:
            return None
        nl = got.find(b"\n")
        if nl >= 0:
            return got[: nl + 1]
    return None
