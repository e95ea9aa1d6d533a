"""The journals: every event in a line (record.py; a run of pulls shares one), appended by
the process that emitted it to a journal of its own under the data directory. They are the queues too: each consumer
(a webhook, the audit log) reads them forward from a cursor of its own (feed.py).

    events.journal/<n>                 a single serving process's (`mirror serve`)
    events.journal/worker-<i>/<n>      worker i's, with several serving processes
    events.journal/command-<pid>-<r>/  an admin command's, until what it emitted is read
    …/lock                             flock: held by the process writing that journal

Exactly one process writes a journal: it holds the journal's lock from its start to its
close, and the kernel releases it when that process dies. A worker started in a dead one's
place (the same index) takes the lock and appends on; a start that cannot take its own
journal's lock within CLAIM_SECONDS stops, since another process serves as that.

A file is numbered by when it was opened (nanoseconds since the epoch, and always above
the numbers there already), so numbers only grow, whoever writes the journal next and
whatever was deleted: a cursor's place stays true across restarts. Its first line is
`#\t<random token>`: an event's id is that token and its line's offset (record.py). The writer leaves a file
for a new one past FILE_BYTES; files wholly behind every cursor are deleted (feed.py), the
one being written only once its writer is gone.

The append is the deliberate syscall on the event loop: one write(2) of whole lines (one,
or those that came close together: events/__init__.py) to a file opened O_APPEND, a copy
into the page cache, no fsync. Once it returns the lines are in the kernel: they survive a
kill -9 (a power loss may take what was not yet flushed). A disk that will not take them
(full, gone read-only) costs those events (the caller logs and counts them), never the
pull. The one way it could hold the
loop is the kernel throttling a writer of too many dirty pages, which a journal's few
megabytes a minute do not reach.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from mirror.locks import FileLock

#: A journal file is left for a new one once it has this many bytes.
FILE_BYTES = 4 * 1024 * 1024
#: The name of a single serving process's journal (its files are in the root itself).
SINGLE = ""
#: A worker's journal: its index after this.
WORKER_PREFIX = "worker-"
#: An admin command's journal: its pid and a random part after this (never reused).
COMMAND_PREFIX = "command-"
LOCK_NAME = "lock"
#: The kind field of a file's first line, which no event has.
HEADER = "#"
#: How long a start waits for its own journal's lock (a deliverer may be deleting a dead
#: writer's consumed files under it, a matter of milliseconds) before it gives up.
CLAIM_SECONDS = 5.0

#: A place in a journal: (file number, byte offset); (0, 0) is its beginning.
Position = tuple[int, int]


def journal_name(worker: int | None) -> str:
    """The name of a serving process's journal: worker `i`'s, or a single process's."""
    return SINGLE if worker is None else f"{WORKER_PREFIX}{worker}"


def command_name() -> str:
    """A journal name for an admin command, one no other process ever takes."""
    return f"{COMMAND_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def directory_of(root: Path, name: str) -> Path:
    return root / name if name else root


def journal_names(root: Path) -> list[str]:
    """Blocking: the journals under `root` (a single process's first, whether or not it
    holds anything)."""
    try:
        found = [p.name for p in root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        found = []
    return [SINGLE, *sorted(found)]


def file_numbers(directory: Path) -> list[int]:
    """Blocking: a journal's file numbers, oldest first."""
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return []


class Journal:
    """This process's journal, the writing side. Blocking at start (`claim`); `append` is the
    one call made on the event loop (see the module docstring)."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.directory = directory_of(root, name)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.directory / LOCK_NAME)
        self._number = 0
        self._fd = -1
        self._size = 0

    def claim(self, seconds: float = CLAIM_SECONDS) -> bool:
        """Take the lock, waiting up to `seconds` for a deliverer that holds it meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._lock.try_take():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # ok: a start waiting its turn, before anything is served
        self._number = max(file_numbers(self.directory), default=0)
        return True

    def append(self, line: bytes) -> None:
        """Append whole lines in one write(2); OSError when the disk will not take them (a
        short write, the disk full, is one too: the line cut short is skipped by readers)."""
        if self._fd < 0 or self._size >= FILE_BYTES:
            self._next_file()
        written = os.write(self._fd, line)
        self._size += written
        if written != len(line):
            self._size = FILE_BYTES  # what follows goes to a new file, after the cut line
            raise OSError(f"short write to the event journal ({written} of {len(line)} bytes)")

    def _next_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        number = max(time.time_ns(), self._number + 1)
        path = self.directory / str(number)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._number = number
        self._size = os.write(self._fd, header())

    def close(self) -> None:
        """Close the file and release the journal (the next writer of this name may start).
        A command that emitted nothing removes its journal, which no reader would ever
        remove (nothing in it to read to its end) and no process takes the name of again."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.name.startswith(COMMAND_PREFIX) and self._lock.held and not self._number:
            remove_journal(self.directory)
        self._lock.close()


def header() -> bytes:
    """A new file's first line: the token its events' ids start with (16 random hex)."""
    return f"{HEADER}\t{secrets.token_hex(8)}\n".encode()


def try_hold(root: Path, name: str) -> FileLock | None:
    """Blocking: the lock of a journal nobody writes, taken (None when a process writes it)."""
    lock = FileLock(directory_of(root, name) / LOCK_NAME)
    try:
        if lock.try_take():
            return lock
    except FileNotFoundError:
        pass
    lock.close()
    return None


def delete_files(directory: Path, numbers: list[int]) -> None:
    """Blocking: delete these files of a journal (consumed by everyone)."""
    for number in numbers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / str(number))


def remove_abandoned(root: Path, name: str, now: float) -> bool:
    """Blocking: remove a command journal found with no file, whose command died before it
    emitted anything (killed: it never closed it), telling whether it did. One younger than
    CLAIM_SECONDS is left alone: its command may be between making it and taking its lock."""
    directory = directory_of(root, name)
    try:
        if now - directory.stat().st_mtime < CLAIM_SECONDS:
            return False
    except FileNotFoundError:
        return False
    lock = try_hold(root, name)
    if lock is None:
        return False  # its command runs still
    try:
        remove_journal(directory)
    finally:
        lock.close()
    return True


def remove_journal(directory: Path) -> None:
    """Blocking: remove a finished command's journal (held: nobody writes it, and no process
    ever takes its name again)."""
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
