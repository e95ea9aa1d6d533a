"""The audit log: one JSON line per pull and per administrative action (the event's own
CloudEvents text), written from the journals by the deliverer's thread (feed.py), never on
the event loop.

One process writes it at a time, the holder of the delivery lock (a command writes it only
while no mirror holds that lock), and the holder changes when one dies; the file is opened
with O_APPEND and each batch of whole lines goes out in one write(2), so even two writers
of a moment would never interleave inside a line.

It is rotated by size (`audit_max_bytes`: `<path>` → `<path>.1` → … → `<path>.<audit_keep>`,
the oldest removed), or left to logrotate, after which SIGHUP reopens it (`reopen`). With
rotation by size every write takes `<path>.lock` (flock, lock.py) first: a writer that
finds the path naming another file than the one it has open (another process rotated it)
reopens it before it writes, and only the writer that finds the file full rotates it. So no
line goes to a file already rotated away (or removed as the oldest), no file is rotated
twice for one fill, and no file grows past `audit_max_bytes` (unless one batch alone is
bigger: a write of many lines is cut where the file fills). The lock is held for one write
and a stat; with `audit_max_bytes = 0` none is taken.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mirror.locks import FileLock

#: The audit trail names clients and users: readable by its owner and group only.
MODE = 0o640


class AuditFile:
    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path = Path(path)
        self._max = max_bytes
        self._keep = keep
        self._fd = -1
        self._lock = FileLock(Path(f"{path}.lock"), MODE) if max_bytes else None
        self.reopen()

    def reopen(self) -> None:
        """Close and open the path again (after logrotate moved the file away)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def write(self, lines: list[str]) -> None:
        """Append the lines; with rotation by size, under the lock, to the file the path names
        now, rotated first whenever the next lines would take it past its size (each part
        one write)."""
        if not lines:
            return
        if self._lock is None:
            _write_all(self._fd, ("\n".join(lines) + "\n").encode())
            return
        self._lock.take()
        try:
            if not self._current():
                self.reopen()  # another process rotated it
            size = os.fstat(self._fd).st_size
            part: list[bytes] = []
            length = 0
            for line in lines:
                data = line.encode() + b"\n"
                if size + length + len(data) > self._max and (size or part):
                    if part:
                        _write_all(self._fd, b"".join(part))
                    self._rotate()
                    size, part, length = 0, [], 0
                part.append(data)
                length += len(data)
            _write_all(self._fd, b"".join(part))
        finally:
            self._lock.release()

    def _current(self) -> bool:
        """Whether the open file is the one the path names."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def _rotate(self) -> None:
        """Move the files one up (under the lock) and open a new one at the path."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.path}.{self._keep}")
        for n in range(self._keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.rename(self.path, f"{self.path}.1")
        self.reopen()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock is not None:
            self._lock.close()


def _write_all(fd: int, data: bytes) -> None:
    """One write(2) of the whole batch; a short one (the disk filled) is finished with more."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
