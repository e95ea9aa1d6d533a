"""Advisory locks between the processes of one host: flock(2) on a file, which the kernel
releases the moment its holder dies (kill -9, the OOM killer), so a lock never outlives the
process that took it and nothing has to be cleaned up after a crash.

Used for what only one process may do at a time: write one journal (journal.py), deliver
webhooks (delivery.py), rotate the audit log and append to it while it rotates by size
(audit.py). The lock is the open file description's: the file is opened with O_CLOEXEC, so
a program the holder starts does not inherit it.

Every method is blocking (an open, a flock): call them on a thread, or at start before the
event loop serves.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileLock:
    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self._mode = mode
        self._fd = -1
        #: Whether this process holds it now.
        self.held = False

    def _open(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._mode)
        return self._fd

    def try_take(self) -> bool:
        """Take it if nobody holds it; never waits."""
        try:
            fcntl.flock(self._open(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def take(self) -> None:
        """Take it, waiting for whoever holds it (a thread's call, never the loop's)."""
        fcntl.flock(self._open(), fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        """Release it and close the file (the file stays: removing it would let two
        processes lock two different files of one name)."""
        self.release()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
