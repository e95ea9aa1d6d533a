"""The audit log: one JSON line per pull and per administrative action (the event's own
CloudEvents text), appended by the events thread, never on the event loop.

The file is opened with O_APPEND, and each batch of lines goes out in one write(2) per
piece, so lines from the mirror and from an admin command run meanwhile (another process,
the same file) do not interleave inside a line. It is rotated by size (`audit_max_bytes`:
`<path>` → `<path>.1` → … → `<path>.<audit_keep>`, the oldest removed), or left to
logrotate, after which SIGHUP reopens it (`reopen`). A file another process rotated away is
noticed at the next rotation (its inode is no longer the path's) and reopened, not renamed
again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: The audit trail names clients and users: readable by its owner and group only.
MODE = 0o640


class AuditFile:
    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path = Path(path)
        self._max = max_bytes
        self._keep = keep
        self._fd = -1
        self.reopen()

    def reopen(self) -> None:
        """Close and open the path again (after logrotate moved the file away)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def write(self, lines: list[str]) -> None:
        """Append the lines; rotate first when they would take the file past its size."""
        data = ("\n".join(lines) + "\n").encode()
        if self._max:
            size = os.fstat(self._fd).st_size  # other processes append to it too
            if size and size + len(data) > self._max:
                self._rotate()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _rotate(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
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
