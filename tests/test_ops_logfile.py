"""Size-based log rotation: the byte-stream pump used by the daemon and the logging set-up."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from streamer.core.ops.logfile import RotatingWriter, pump, setup_file_logging


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_rotation_happens_between_lines_and_keeps_the_newest_backups(tmp_path: Path):
    log = tmp_path / "streamer.log"
    writer = RotatingWriter(log, max_bytes=100, backups=2)
    lines = [f"line {i:03d} {'x' * 20}\n".encode() for i in range(20)]  # 30 bytes each
    for line in lines:
        writer.write(line)
    writer.close()
    assert files(log) == ["streamer.log", "streamer.log.1", "streamer.log.2"]
    kept = b"".join((tmp_path / n).read_bytes() for n in ("streamer.log.2", "streamer.log.1",
                                                           "streamer.log"))  # fmt: skip
    # Every kept file holds whole lines, none over the limit, and the newest lines survive.
    for name in files(log):
        data = (tmp_path / name).read_bytes()
        assert len(data) <= 100 and data.endswith(b"\n"), name
    assert kept == b"".join(lines[-len(kept.splitlines()) :])
    assert writer.rotations == 6


def test_a_chunk_spanning_many_lines_is_split_at_newlines(tmp_path: Path):
    log = tmp_path / "a.log"
    writer = RotatingWriter(log, max_bytes=25, backups=10)
    writer.write(b"aaaaaaaaa\nbbbbbbbbb\nccccccccc\nddd")  # the tail has no newline yet
    writer.write(b"dddddd\n")
    writer.close()
    contents = [(tmp_path / n).read_bytes() for n in reversed(files(log)) if n != "a.log"]
    contents.append(log.read_bytes())
    assert b"".join(contents) == b"aaaaaaaaa\nbbbbbbbbb\nccccccccc\nddddddddd\n"
    assert all(len(c) <= 25 for c in contents)


def test_a_line_longer_than_the_limit_is_kept_whole(tmp_path: Path):
    log = tmp_path / "b.log"
    writer = RotatingWriter(log, max_bytes=10, backups=1)
    writer.write(b"short\n")
    writer.write(b"y" * 50 + b"\n")
    writer.close()
    assert (tmp_path / "b.log.1").read_bytes() == b"short\n"
    assert log.read_bytes() == b"y" * 50 + b"\n"


def test_no_rotation_when_disabled_and_appends_to_an_existing_file(tmp_path: Path):
    log = tmp_path / "c.log"
    log.write_bytes(b"old\n")
    writer = RotatingWriter(log, max_bytes=0, backups=3)
    writer.write(b"new\n" * 100)
    writer.close()
    assert files(log) == ["c.log"] and log.read_bytes().startswith(b"old\nnew\n")


def test_pump_copies_a_pipe_until_every_writer_closed_it(tmp_path: Path):
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as w:
        w.write(b"one\ntwo\n")
    writer = RotatingWriter(tmp_path / "d.log", max_bytes=1000, backups=1)
    with os.fdopen(read_fd, "rb") as r:
        pump(r, writer)
    writer.close()
    assert (tmp_path / "d.log").read_bytes() == b"one\ntwo\n"


def test_pump_module_rotates_what_a_child_prints(tmp_path: Path):
    log = tmp_path / "e.log"
    data = b"".join(f"{i:04d}\n".encode() for i in range(100))  # 500 bytes
    subprocess.run(
        [sys.executable, "-m", "streamer.core.ops.logfile", str(log), "--max-bytes", "100",
         "--backups", "9"],
        input=data, check=True, timeout=30,
    )  # fmt: skip
    names = files(log)
    assert names[0] == "e.log" and len(names) == 5  # 5 files of exactly 100 bytes
    joined = b"".join((tmp_path / n).read_bytes() for n in sorted(names[1:], reverse=True))
    assert joined + log.read_bytes() == data


def test_setup_file_logging_writes_greppable_lines_and_rotates(tmp_path: Path):
    log = tmp_path / "logs" / "run.log"
    handler = setup_file_logging(log, level=logging.INFO, max_bytes=300, backups=1)
    try:
        logger = logging.getLogger("streamer.test.ops")
        for i in range(20):
            logger.warning("[overflow] dropped records=%d symbol=BTCUSDT", i)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert files(log) == ["run.log", "run.log.1"]
    last = log.read_text().splitlines()[-1]
    assert "WARNING streamer.test.ops: [overflow] dropped records=19 symbol=BTCUSDT" in last


def test_redirect_to_log_collects_this_process_and_its_children(tmp_path: Path):
    log = tmp_path / "run.log"
    script = (
        "import logging, subprocess, sys\n"
        "from streamer.core.ops.logfile import redirect_to_log\n"
        f"pump = redirect_to_log({str(log)!r}, max_bytes=200, backups=20)\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "for i in range(10):\n"
        "    logging.getLogger('streamer.x').info('parent line=%02d', i)\n"
        "subprocess.run([sys.executable, '-c', \"import sys; print('child says hi', flush=True);"
        " sys.stderr.write('child error\\\\n')\"], check=True)\n"
        "print('parent stdout', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout == b"" and done.stderr == b""
    # The pump exits once every writer closed the pipe; wait for its last write.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (log.exists() and "parent stdout" in log.read_text()):
        time.sleep(0.05)
    names = files(log)
    assert len(names) >= 2  # rotated at 200 bytes
    text = "".join((tmp_path / n).read_text() for n in sorted(names[1:], reverse=True))
    text += log.read_text()
    lines = text.splitlines()
    assert [line for line in lines if "parent line" in line] == [
        f"INFO:streamer.x:parent line={i:02d}" for i in range(10)
    ]
    assert "child says hi" in lines and "child error" in lines and lines[-1] == "parent stdout"
