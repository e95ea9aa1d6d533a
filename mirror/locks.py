"""Advisory file locks (flock(2)) that the kernel releases when their holder dies.

Every process serving one data directory (worker processes, admin commands, an import) takes
these to share work: a lock is held by an open file description, so two opens in one process
exclude each other as two processes do, and `kill -9` of a holder frees its locks at once —
nothing is ever left locked by a process that is gone. No lock here waits on the event loop:
`try_hold` never blocks, `hold` blocks and is for an executor thread.

A lock file that may be unlinked (a fill's, removed once the blob is committed) is checked
after locking: if the path no longer names the inode just locked, another holder unlinked it
and whoever opens the path now gets a new file, so the lock is dropped and taken again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


class FileLock:
    """One open of a lock file, held exclusively or shared until `release`."""

    __slots__ = ("fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> FileLock:
        """The lock file at `path`, created if need be, not yet held."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return cls(path, fd)

    def try_lock(self, shared: bool = False) -> bool:
        """Take the lock if it is free now; False if another open holds it."""
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        try:
            fcntl.flock(self.fd, flags)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def current(self) -> bool:
        """Whether the path still names the file this lock is on (see the module docstring)."""
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

    def release(self, unlink: bool = False) -> None:
        """Let go (unlinking the file first when asked, while still holding it, so that no
        one locks a file that is about to vanish) and close."""
        if self.fd < 0:
            return
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def try_hold(path: Path) -> tuple[bool, FileLock]:
    """Take the exclusive lock at `path` if it is free now (blocking only on the open).

    (True, the held lock), or (False, an open of that same file, not held), which the caller
    may watch: its `try_lock(shared=True)` succeeds once the holder is gone."""
    while True:
        lock = FileLock.open(path)
        if not lock.try_lock():
            return False, lock
        if lock.current():
            return True, lock
        lock.release()  # unlinked under us by a holder that just finished: a new file now


def hold(path: Path) -> FileLock:
    """Wait for the exclusive lock at `path` and take it (blocking: an executor thread)."""
    while True:
        lock = FileLock.open(path)
        fcntl.flock(lock.fd, fcntl.LOCK_EX)
        if lock.current():
            return lock
        lock.release()
