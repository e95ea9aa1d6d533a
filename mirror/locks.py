"""Advisory file locks (flock(2)) between the processes of one host, which the kernel
releases the moment their holder dies (kill -9, the OOM killer): a lock never outlives the
process that took it, and nothing has to be cleaned up after a crash.

Used for what only one process may do at a time: fill a digest (coordination/claims.py),
ask upstream one question for the host, run the periodic evictor (coordination/host.py),
write one events journal, deliver webhooks, rotate the audit log (events/). A lock is held by
an open file description, so two opens in one process exclude each other as two processes do.
Files are opened with O_CLOEXEC: a program the holder starts does not inherit its locks.

Every method blocks (an open, a flock): call them on a thread, or at start before the event
loop serves. A lock file that may be unlinked (a fill's, removed once the blob is committed)
is checked after locking (`try_hold`, `hold`): if the path no longer names the inode just
locked, another holder unlinked it and whoever opens the path now gets a new file, so the lock
is let go and taken again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class FileLock:
    """A lock file, opened on first use, held exclusively or shared until `release`."""

    __slots__ = ("_fd", "_mode", "held", "path")

    def __init__(self, path: Path, mode: int = 0o644) -> None:
        self.path = path
        self._mode = mode
        self._fd = -1
        #: Whether this open holds it now.
        self.held = False

    @property
    def fd(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._mode)
        return self._fd

    def try_take(self, shared: bool = False) -> bool:
        """Take it if no other open holds it (exclusively) now; never waits."""
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def take(self) -> None:
        """Take it, waiting for whoever holds it (a thread's call, never the loop's)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        """Let go; the file stays open (and in place: removing it would let two processes
        lock two different files of one name, unless they check `current`)."""
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False

    def current(self) -> bool:
        """Whether the path still names the file this lock is on."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def read(self) -> bytes:
        """What the holder wrote into the lock file (its announcement)."""
        return os.pread(self.fd, 4096, 0)

    def write(self, data: bytes) -> None:
        """Replace the lock file's content (the holder's announcement to the others)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self, unlink: bool = False) -> None:
        """Let go and close (unlinking the file first when asked, while still holding it, so
        that no one locks a file that is about to vanish without noticing)."""
        if self._fd < 0:
            return
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)  # closing the last descriptor of the open lets the lock go
        self._fd = -1
        self.held = False


def try_hold(path: Path) -> tuple[bool, FileLock]:
    """Take the exclusive lock at `path` if it is free now (blocking only on the open).

    (True, the held lock), or (False, an open of that same file, not held), which the caller
    may watch: its `try_take(shared=True)` succeeds once the holder is gone."""
    while True:
        lock = FileLock(path)
        if not lock.try_take():
            return False, lock
        if lock.current():
            return True, lock
        lock.close()  # unlinked under us by a holder that just finished: a new file now


def hold(path: Path) -> FileLock:
    """Wait for the exclusive lock at `path` and take it (blocking: an executor thread)."""
    while True:
        lock = FileLock(path)
        lock.take()
        if lock.current():
            return lock
        lock.close()


def share(fd: int) -> None:
    """Hold a shared lock on an open file (a follower's partial file: while any process holds
    one, the fill is followed somewhere and not to be dropped as abandoned)."""
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def shared_elsewhere(fd: int) -> bool:
    """Whether another open of this file holds a shared lock on it (the owner's check)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
