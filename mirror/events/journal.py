"""Each serving process's events, written ahead of their queues: append-only files under the
data directory, one line per event (`<kind>\\t<emitted at>\\t<CloudEvents text>`; JSON text
holds no raw tab or newline).

    events.journal/<n>             a single serving process's (`mirror serve`), as before
    events.journal/worker-<i>/<n>  worker i's, with several serving processes
    …/lock                         flock: held by the process writing that journal

What a pull waits for is one write(2) of its batch here, not a SQLite commit: a commit
writes several pages, and its WAL checkpoint stops it for an fsync now and then (tens of
milliseconds, which every pull of the moment would wait out). The queues (queue.py) take
the same batches right after, on a thread of their own, and record how far into this
journal they got (under its name) in the same transaction; files wholly taken are deleted.
A start replays what the queues had not taken, so an event in a journal reaches its queues
exactly once.

Exactly one process writes a journal: it holds the journal's lock from its start to its
close, and the kernel releases it when that process dies. A worker started in a dead one's
place (the same index) takes the lock and commits what the dead one had journaled; any
serving process that starts also commits the journals nobody holds (a single process's left
from before workers, a worker's whose index is no longer run), holding their locks while it
does. The admin commands have no journal: they write to the queues directly.

Every method is blocking. After the start, `write` runs on the events thread and
`consumed` on the queue thread (it only deletes files the events thread has moved past).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from mirror.locks import FileLock

log = logging.getLogger("mirror.events")

#: A journal file is left for a new one once it has this many bytes.
FILE_BYTES = 8 * 1024 * 1024
#: The name of a single serving process's journal (its files are in the root itself).
SINGLE = ""
#: A worker's journal: its index after this.
WORKER_PREFIX = "worker-"
LOCK_NAME = "lock"
#: How long a start waits for its own journal's lock (another start may be committing
#: what it held, a matter of milliseconds) before it gives up.
CLAIM_SECONDS = 5.0

#: A place in a journal: (file number, byte offset).
Position = tuple[int, int]
#: What a journal line holds: kind, emitted at, encoded event.
Line = tuple[str, float, str]


def journal_name(worker: int | None) -> str:
    """The name of a serving process's journal: worker `i`'s, or a single process's."""
    return SINGLE if worker is None else f"{WORKER_PREFIX}{worker}"


def journal_names(root: Path) -> list[str]:
    """Blocking: the journals under `root` (a single process's first, whether or not it
    holds anything)."""
    try:
        found = [p.name for p in root.iterdir() if p.name.startswith(WORKER_PREFIX)]
    except FileNotFoundError:
        found = []
    return [SINGLE, *sorted(found)]


class Journal:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.directory = root / name if name else root
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.directory / LOCK_NAME)
        self._taken: Position = (0, 0)
        self._number = 1
        self._fd = -1
        self._size = 0

    def try_claim(self) -> bool:
        """Take the journal's lock if no process holds it."""
        return self._lock.try_take()

    def claim(self, seconds: float = CLAIM_SECONDS) -> bool:
        """Take the lock, waiting up to `seconds` for a start that commits it meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._lock.try_take():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # ok: a start waiting its turn, before anything is served
        return True

    def start(self, taken: Position) -> None:
        """Once claimed: `taken` is how far the queues got, as they recorded it (read under
        the lock, so the last writer's commits are in it)."""
        self._taken = taken
        self._number = max([*self._numbers(), taken[0]], default=0) + 1

    def _numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def replay(self) -> list[Line]:
        """At start: the events the queues had not taken. A line cut short (the disk filled
        mid-write) ends its file."""
        found: list[Line] = []
        start_file, start_offset = self._taken
        for number in self._numbers():
            if number < start_file or number >= self._number:
                continue
            data = (self.directory / str(number)).read_bytes()
            data = data[start_offset:] if number == start_file else data
            for raw in data.split(b"\n")[:-1]:
                kind, at, body = raw.decode().split("\t", 2)
                found.append((kind, float(at), body))
        return found

    @property
    def position(self) -> Position:
        """Where the next write lands: everything before it is written."""
        return self._number, self._size

    def write(self, lines: list[Line]) -> Position:
        """Append the lines in one write(2); returns the position after them."""
        if self._fd < 0:
            path = self.directory / str(self._number)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._size = 0
        data = "".join(f"{kind}\t{at!r}\t{body}\n" for kind, at, body in lines).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)
        written = self.position
        if self._size >= FILE_BYTES:
            self._close_file()
            self._number, self._size = self._number + 1, 0
        return written

    def consumed(self, upto: Position) -> None:
        """The queues took everything before `upto`: delete the files wholly before it."""
        for number in self._numbers():
            if number < upto[0]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / str(number))

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Close the file and release the journal (the next writer of this name may start)."""
        self._close_file()
        self._lock.close()
