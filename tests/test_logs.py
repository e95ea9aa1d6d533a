"""Log lines of several processes on one standard error never mix within a line: every write
is whole lines, at most PIPE_BUF bytes of them, or one longer line alone (mirror/logs.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from mirror import logs

PROJECT = Path(__file__).resolve().parent.parent

#: Lines of 40 B to 3.5 KiB, and some past PIPE_BUF, in an order that fills writes unevenly.
SIZES = [40 + (i * 977) % 3500 for i in range(300)] + [5000, 9000, 20000]

#: A child process: structured records and access lines, all long, under worker=<argv[1]>.
WRITER = r"""
import logging, sys, time
from mirror import logs
worker, count = int(sys.argv[1]), int(sys.argv[2])
running = logs.start("info", "logfmt", worker=worker)
log = logging.getLogger("test.writer")
for i in range(count):
    size = 200 + (i * 7919 + worker * 131) % 3300
    log.info("seq=%d size=%d pad=%s", i, size, "p" * size)
    assert logs.access is not None
    logs.access.add(
        (time.time(), "GET", f"/v2/w{worker}/{i}/" + "a" * size, 200, size, 0.0015, "hit",
         "docker.io", "127.0.0.1")
    )
running.stop()
"""

RECORD = re.compile(
    r'ts=\S+ level=info logger=test\.writer worker=(\d) msg="seq=(\d+) size=(\d+) pad=(p*)"'
)
ACCESS = re.compile(
    r"ts=\S+ level=info logger=mirror\.access worker=(\d) method=GET path=/v2/w(\d)/(\d+)/(a*)"
    r" status=200 bytes=(\d+) duration_ms=1\.5 outcome=hit upstream=docker\.io remote=127\.0\.0\.1"
)


def test_each_write_is_whole_lines_within_pipe_buf_or_one_long_line() -> None:
    """A SOCK_SEQPACKET socket keeps the boundaries of every write(2): each message received
    is what one write sent."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lines = [f"line={i} " + "x" * size for i, size in enumerate(SIZES)]
    writes: list[bytes] = []

    def receive() -> None:
        while message := receiver.recv(1 << 20):
            writes.append(message)

    reader = threading.Thread(target=receive)
    reader.start()
    with sender:
        out = logs.Lines(sender.fileno())
        out.write(lines[:150])
        out.write(lines[150:])
        sender.shutdown(socket.SHUT_WR)
        reader.join()
    receiver.close()

    assert b"".join(writes).decode().splitlines() == lines
    for message in writes:
        assert message.endswith(b"\n")
        assert len(message) <= logs.PIPE_BUF or message.count(b"\n") == 1, len(message)
    assert any(message.count(b"\n") > 1 for message in writes), "short lines share a write"


def test_two_processes_writing_long_lines_to_one_pipe_never_mix_a_line() -> None:
    count = 1500
    read_end, write_end = os.pipe()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(worker), str(count)],
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
        for worker in (0, 1)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()  # until both children have closed their end
    assert [child.wait(60) for child in children] == [0, 0]

    records: dict[int, list[int]] = {0: [], 1: []}
    accesses: dict[int, list[int]] = {0: [], 1: []}
    bad = []
    for line in text.splitlines():
        if m := RECORD.fullmatch(line):
            ok = len(m[4]) == int(m[3])
            records[int(m[1])].append(int(m[2]))
        elif m := ACCESS.fullmatch(line):
            ok = m[1] == m[2] and len(m[4]) == int(m[5])
            accesses[int(m[1])].append(int(m[3]))
        else:
            ok = False
        if not ok:
            bad.append(line[:120])
    assert not bad, f"{len(bad)} lines that are not whole, e.g. {bad[:3]}"
    for worker in (0, 1):
        assert records[worker] == list(range(count))
        assert accesses[worker] == list(range(count))
