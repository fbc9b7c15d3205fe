"""Readers for the recorded Binance captures in ``tests/data`` (see its README for each
file's source repository, commit and licence).

Two line formats exist:

* cryptofeed ``<NAME>.ws.1.0``: a first line ``<ws url> <-> <connect_epoch_s>``, then
  ``<receipt_epoch_s_float>: <raw text frame>`` (combined-stream envelopes). The matching
  ``<NAME>.http.0.0`` holds ``<url> -> <epoch_s>: <raw REST body>`` lines.
* hftbacktest ``*.gz`` (gzip text): ``<local_ts_ns> <raw json>``; REST snapshots are bare
  ``{"lastUpdateId":...}`` objects for BTCUSDT.

Both readers return :class:`CaptureEvent` items in local receipt order, with the payload
kept byte for byte as recorded, so replaying them reproduces the original traffic.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import msgspec

__all__ = [
    "CaptureEvent",
    "capture_dir",
    "read_capture",
    "read_cryptofeed",
    "read_hftbacktest",
]

#: Environment variable that overrides where the recorded captures live.
ENV_VAR = "STREAMER_CAPTURE_DIR"


class CaptureEvent(msgspec.Struct, frozen=True):
    """One recorded item.

    ``local_time_ns`` is the recorder's local receipt time in ns since the epoch. ``kind`` is
    ``"ws"`` for a WebSocket text frame (``url`` is the connection URL, ``payload`` the frame,
    ``{"stream","data"}`` envelope kept) or ``"rest"`` for a REST response (``url`` is the
    request URL including its ``symbol`` query, ``payload`` the body).
    """

    local_time_ns: int
    kind: Literal["ws", "rest"]
    url: str
    payload: bytes


def capture_dir() -> Path | None:
    """The folder of recorded captures, or ``None`` when it is not available.

    ``$STREAMER_CAPTURE_DIR`` wins when set; otherwise ``tests/data`` of the checkout this
    package is imported from (absent from an installed wheel).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    path = Path(__file__).resolve().parents[2] / "tests" / "data"
    return path if path.is_dir() else None


def _seconds_to_ns(text: str) -> int:
    """Exact conversion of a decimal seconds string (``"1626992741.06217"``) to ns."""
    whole, _, frac = text.strip().partition(".")
    return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)


def _cryptofeed_dir(data_dir: Path) -> Path:
    sub = data_dir / "cryptofeed_sample_data"
    return sub if sub.is_dir() else data_dir


def read_cryptofeed(name: str, data_dir: Path) -> list[CaptureEvent]:
    """Read a cryptofeed capture (e.g. ``"BINANCE_FUTURES"``) from ``data_dir``.

    Merges ``<name>.ws.1.0`` and ``<name>.http.0.0`` (when present) into one list sorted by
    local time; ties keep file order with REST before WebSocket. ``data_dir`` may be the
    capture folder or its ``cryptofeed_sample_data`` subfolder. Raises
    ``FileNotFoundError`` when the ws file is missing and ``ValueError`` on a bad line.
    """
    folder = _cryptofeed_dir(data_dir)
    events: list[tuple[int, int, int, CaptureEvent]] = []
    ws_path = folder / f"{name}.ws.1.0"
    with ws_path.open("rb") as fh:
        header = fh.readline().decode()
        ws_url, sep, _ = header.partition(" <-> ")
        if not sep:
            raise ValueError(f"{ws_path}: first line is not '<url> <-> <epoch>'")
        for lineno, raw in enumerate(fh, start=2):
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            ts, sep, payload = line.partition(b": ")
            if not sep:
                raise ValueError(f"{ws_path}:{lineno}: expected '<epoch>: <frame>'")
            ev = CaptureEvent(_seconds_to_ns(ts.decode()), "ws", ws_url, payload)
            events.append((ev.local_time_ns, 1, lineno, ev))
    http_path = folder / f"{name}.http.0.0"
    if http_path.exists():
        with http_path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.rstrip(b"\r\n")
                if not line:
                    continue
                url, sep, rest = line.partition(b" -> ")
                ts, sep2, body = rest.partition(b": ")
                if not (sep and sep2):
                    raise ValueError(f"{http_path}:{lineno}: expected '<url> -> <epoch>: <body>'")
                ev = CaptureEvent(_seconds_to_ns(ts.decode()), "rest", url.decode(), body)
                events.append((ev.local_time_ns, 0, lineno, ev))
    events.sort(key=lambda item: item[:3])
    return [item[3] for item in events]


def read_hftbacktest(filename: str, data_dir: Path) -> list[CaptureEvent]:
    """Read an hftbacktest gzip capture (e.g. ``"usdm_btcusdt_20240808.gz"``).

    ``filename`` is looked up in ``data_dir`` and its ``hftbacktest_examples`` subfolder.
    Stream frames become ``kind="ws"`` events; bare REST snapshot lines become
    ``kind="rest"`` with url ``https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000``
    (``fapi.binance.com/fapi/v1`` for ``usdm_`` files). Order is file order (receipt order).
    """
    path = data_dir / filename
    if not path.exists():
        path = data_dir / "hftbacktest_examples" / filename
    usdm = Path(filename).name.startswith("usdm")
    if usdm:
        ws_url = "wss://fstream.binance.com/stream"
        rest_url = "https://fapi.binance.com/fapi/v1/depth?symbol=BTCUSDT&limit=1000"
    else:
        ws_url = "wss://stream.binance.com:9443/stream"
        rest_url = "https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000"
    out: list[CaptureEvent] = []
    with gzip.open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            ts, sep, payload = line.partition(b" ")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected '<ns> <json>'")
            is_rest = payload.startswith(b'{"lastUpdateId"')
            out.append(
                CaptureEvent(
                    int(ts), "rest" if is_rest else "ws", rest_url if is_rest else ws_url, payload
                )
            )
    return out


def read_capture(name: str, data_dir: Path | None = None) -> list[CaptureEvent]:
    """Read a capture by name: a cryptofeed name (``"BINANCE"``), an hftbacktest file name
    (``"spot_btcusdt_20240808.gz"``) or a path to either kind of file.

    ``data_dir`` defaults to :func:`capture_dir`; raises ``FileNotFoundError`` when the
    capture cannot be found.
    """
    candidate = Path(name)
    if candidate.suffix == ".gz" and candidate.exists():
        return read_hftbacktest(candidate.name, candidate.parent)
    if candidate.name.endswith(".ws.1.0") and candidate.exists():
        return read_cryptofeed(candidate.name[: -len(".ws.1.0")], candidate.parent)
    base = data_dir if data_dir is not None else capture_dir()
    if base is None:
        raise FileNotFoundError(f"capture {name!r}: capture folder not found (set ${ENV_VAR})")
    if name.endswith(".gz"):
        return read_hftbacktest(name, base)
    if (_cryptofeed_dir(base) / f"{name}.ws.1.0").exists():
        return read_cryptofeed(name, base)
    raise FileNotFoundError(f"capture {name!r} not found in {base}")
