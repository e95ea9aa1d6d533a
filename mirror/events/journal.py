"""The serving mirror's events, written ahead of their queues: append-only files under the
data directory, one line per event (`<kind>\\t<emitted at>\\t<CloudEvents text>`; JSON text
holds no raw tab or newline).

What a pull waits for is one write(2) of its batch here, not a SQLite commit: a commit
writes several pages, and its WAL checkpoint stops it for an fsync now and then (tens of
milliseconds, which every pull of the moment would wait out). The queues (queue.py) take
the same batches right after, on a thread of their own, and record how far into the
journal they got in the same transaction; files wholly taken are deleted. A start replays
what the queues had not taken, so an event in the journal reaches its queues exactly once.

Every method but `consumed` runs on the events thread; `consumed` runs on the queue thread
and only deletes files the events thread has moved past. Not for the admin commands: they
write to the queues directly (another process must not append to the serving mirror's
journal).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("mirror.events")

#: A journal file is left for a new one once it has this many bytes.
FILE_BYTES = 8 * 1024 * 1024

#: A place in the journal: (file number, byte offset).
Position = tuple[int, int]
#: What a journal line holds: kind, emitted at, encoded event.
Line = tuple[str, float, str]


class Journal:
    def __init__(self, directory: Path, taken: Position) -> None:
        """`taken`: how far the queues got, as they recorded it."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._taken = taken
        numbers = self._numbers()
        self._number = max([*numbers, taken[0]], default=0) + 1
        self._fd = -1
        self._size = 0

    def _numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def replay(self) -> list[Line]:
        """Blocking, at start: the events the queues had not taken. A line cut short (the
        disk filled mid-write) ends its file."""
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
            self.close()
            self._number, self._size = self._number + 1, 0
        return written

    def consumed(self, upto: Position) -> None:
        """The queues took everything before `upto`: delete the files wholly before it."""
        for number in self._numbers():
            if number < upto[0]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / str(number))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
