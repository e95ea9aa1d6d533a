"""The journals read forward: each consumer (a webhook, the audit log) has a cursor, its
place in every journal (journal.py), and takes the lines of the kinds it wants from there,
in big chunks, off the request path.

Order: within a journal, the order it was written in; across journals, by when each event
was emitted (the lines read so far of each journal merged by that time), so events of two
processes close in time may come in either order, and a line a process had not yet written
when the others' were taken comes after them.

A consumer moves its cursor past what it took once that is done with (a webhook's 2xx, an
audit write), and past the oldest of what it wants when more than `max_queue` wait
(`trim`): so each webhook keeps at most its newest `max_queue` events. What waits is counted
in the bytes (the kind leads every line) from where the last count ended, not line by line.
Files wholly behind every cursor are deleted (`collect`), so the journals hold at most about
`max_queue` lines per journal behind the slowest consumer, and one file's bytes
(FILE_BYTES) more.

Every method is blocking: the deliver thread's (delivery.py), or an admin command's.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from mirror.events.journal import (
    COMMAND_PREFIX,
    HEADER,
    Position,
    delete_files,
    directory_of,
    file_numbers,
    journal_names,
    remove_journal,
    try_hold,
)
from mirror.events.record import seconds

log = logging.getLogger("mirror.events")

#: Most bytes read from one journal at a time.
CHUNK = 1024 * 1024
#: Bytes per wanted line a trim reckons with before it counted any (a pull's are about 250).
SPACING = 512.0
START: Position = (0, 0)

#: A wanted line read: (emitted at, journal, its end, the line without its newline).
Wanted = tuple[float, str, Position, bytes]
_at = itemgetter(0)
_HEAD = HEADER.encode() + b"\t"


@dataclass
class Taken:
    """Lines a consumer took, oldest first, and where its cursor goes once they are done
    with (past lines it does not want, too)."""

    lines: list[Wanted]
    after: dict[str, Position] = field(default_factory=dict)


class Journals:
    """The journals under `root`, listed afresh by `refresh`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, list[int]] = {}
        #: (journal, file number) → the token its events' ids start with.
        self._tokens: dict[tuple[str, int], str] = {}

    def refresh(self) -> None:
        self.files = {
            name: file_numbers(directory_of(self.root, name)) for name in journal_names(self.root)
        }
        for key in [k for k in self._tokens if k[1] not in self.files.get(k[0], ())]:
            del self._tokens[key]

    def ident(self, name: str, end: Position, line: bytes) -> str:
        """The id of the event whose line (without its newline) ends at `end`: its file's
        token and where the line starts there."""
        key = (name, end[0])
        token = self._tokens.get(key)
        if token is None:
            token = self._tokens[key] = self._token(name, end[0])
        return f"{token}-{end[1] - len(line) - 1:x}"

    def _token(self, name: str, number: int) -> str:
        try:
            with open(directory_of(self.root, name) / str(number), "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            first = b""
        kind, _, token = first.rstrip(b"\n").partition(b"\t")
        if kind == HEADER.encode() and token:
            return token.decode()
        return f"{number:x}"  # a file with no token (cut short at its start)

    def ends_with(self, name: str, start: Position, data: bytes) -> bool:
        """Whether `data`, read from `start`, reaches the end of what the journal holds now
        (its last file's size)."""
        numbers = self.files.get(name)
        if not numbers or start[0] != numbers[-1]:
            return False
        try:
            size = os.path.getsize(directory_of(self.root, name) / str(start[0]))
        except FileNotFoundError:
            return True
        return start[1] + len(data) >= size

    def chunk(self, name: str, place: Position, limit: int = CHUNK) -> tuple[Position, bytes]:
        """Whole lines from `place` on (at most `limit` bytes, unless one line is longer), and
        where they start: past a file's end when a later file follows it (its writer left it;
        a line cut short there is skipped), and past a file's first line (its token)."""
        file, offset = place
        directory = directory_of(self.root, name)
        for number in self.files.get(name, ()):
            if number < file:
                continue
            start = offset if number == file else 0
            try:
                with open(directory / str(number), "rb") as f:
                    f.seek(start)
                    data = f.read(limit)
                    while data and b"\n" not in data and len(data) % limit == 0:
                        more = f.read(limit)  # a line longer than a chunk
                        if not more:
                            break
                        data += more
            except FileNotFoundError:
                continue
            if start == 0 and data.startswith(_HEAD):
                skip = data.find(b"\n") + 1
                if not skip:
                    place = (number, 0)
                    continue
                start, data = skip, data[skip:]
            cut = data.rfind(b"\n") + 1
            if cut:
                return (number, start), data[:cut]
            place = (number, start)
        return place, b""


class Consumer:
    """One consumer's cursor over every journal, and a count of what waits for it."""

    def __init__(self, name: str, kinds: Iterable[str], cursor: dict[str, Position]) -> None:
        self.name = name
        self.kinds = frozenset(k.encode() for k in kinds)
        self._patterns = [b"\n" + k + b"\t" for k in self.kinds]
        self._heads = tuple(k + b"\t" for k in self.kinds)
        self.cursor = dict(cursor)
        #: Per journal: how far it was counted, and the wanted lines from the cursor to there.
        self._counted: dict[str, tuple[Position, int]] = {}
        #: Per journal: its bytes per wanted line, as last counted (what a trim reads).
        self._spacing: dict[str, float] = {}

    def _wanted_in(self, data: bytes) -> int:
        found = sum(data.count(p) for p in self._patterns)
        return found + (1 if data.startswith(self._heads) else 0)

    def depth(self, journals: Journals) -> int:
        """The wanted lines from the cursor to the journals' ends (counting only the bytes
        written since the last count)."""
        total = 0
        for name in journals.files:
            place, ahead = self._counted.get(name, (self.cursor.get(name, START), 0))
            while True:
                start, data = journals.chunk(name, place)
                if not data:
                    place = max(place, start)
                    break
                found = self._wanted_in(data)
                if found:
                    self._spacing[name] = len(data) / found
                ahead += found
                place = (start[0], start[1] + len(data))
            self._counted[name] = (place, ahead)
            total += ahead
        return total

    def take(self, journals: Journals, limit: int) -> Taken:
        """The oldest `limit` lines wanted, merged across journals by when they were
        emitted (see the module docstring); the cursor stays until `advance`."""
        per: list[list[Wanted]] = []
        taken = Taken([])
        ends: dict[str, Position] = {}
        for name in journals.files:
            start, data = journals.chunk(name, self.cursor.get(name, START))
            if not data:
                if start > self.cursor.get(name, START):
                    taken.after[name] = start  # past a finished file
                continue
            file, offset = start
            mine: list[Wanted] = []
            kinds = self.kinds
            for raw in data.split(b"\n")[:-1]:
                offset += len(raw) + 1
                tab = raw.find(b"\t")
                if raw[:tab] in kinds:
                    second = raw.find(b"\t", tab + 1)
                    try:
                        at = seconds(raw[tab + 1 : second])
                    except ValueError:
                        at = 0.0  # a line cut short: taken, and refused when read
                    mine.append((at, name, (file, offset), raw))
                    if len(mine) == limit:
                        break
            ends[name] = (file, offset)
            if mine:
                per.append(mine)
            else:
                taken.after[name] = (file, offset)  # nothing wanted in it: skipped
        merged = per[0] if len(per) == 1 else heapq.merge(*per, key=_at)
        for line in merged:
            taken.lines.append(line)
            if len(taken.lines) == limit:
                break
        last: dict[str, Position] = {}
        counts: dict[str, int] = {}
        for _, name, end, _ in taken.lines:
            last[name] = end
            counts[name] = counts.get(name, 0) + 1
        for mine in per:
            name = mine[0][1]
            if name in counts:
                # every wanted line read from it taken: the cursor may go past the rest read
                taken.after[name] = ends[name] if counts[name] == len(mine) else last[name]
        return taken

    def advance(self, taken: Taken) -> int:
        """Move the cursor past `taken` (never back: a trim may have passed it meanwhile);
        returns how many wanted lines it passed that it had not passed before."""
        passed = 0
        for _, name, end, _ in taken.lines:
            if end > self.cursor.get(name, START):
                passed += 1
                counted = self._counted.get(name)
                if counted is not None and end <= counted[0]:
                    self._counted[name] = (counted[0], counted[1] - 1)
        for name, place in taken.after.items():
            if place > self.cursor.get(name, START):
                self.cursor[name] = place
                counted = self._counted.get(name)
                if counted is not None and counted[0] < place:
                    self._counted[name] = (place, 0)  # counted again from here
        return passed

    def trim(self, journals: Journals, most: int) -> int:
        """Pass the oldest wanted lines beyond the newest `most`; returns how many."""
        dropped = 0
        excess = self.depth(journals) - most
        while excess > 0:
            passed = self._drop(journals, excess)
            if not passed:
                break
            dropped += passed
            excess -= passed
        return dropped

    def _drop(self, journals: Journals, excess: int) -> int:
        """Pass the oldest of `excess` wanted lines, merged across journals by when they were
        emitted, reading a share of the excess from each journal (a journal read in part caps
        the time dropped up to: what follows in it is later). Balanced journals are done in one
        go, reading each line once; the caller goes on for what is left. The times are
        compared as their text (19 digits: nanoseconds since the epoch), with nothing made per
        line but its slice. Each journal is read for about its share of the excess (by its
        bytes per wanted line as counted), not a whole chunk: a pass reads what it drops."""
        read: dict[str, tuple[Position, bytes, list[bytes], list[int] | None]] = {}
        cap = b"~"  # above every time
        names = [n for n in journals.files if not self.at_end(journals, n)]
        share = -(-excess // max(len(names), 1))
        chunks = {}
        for name in names:
            want = int(share * self._spacing.get(name, SPACING) * 1.25) + 4096
            start, data = journals.chunk(name, self.cursor.get(name, START), min(want, CHUNK))
            if data:
                chunks[name] = (start, data, journals.ends_with(name, start, data))
        for name, (start, data, at_end) in chunks.items():
            ats, ends, whole = self._times(data, share, at_end)
            if not ats:
                continue
            read[name] = (start, data, ats, ends)
            if not whole:
                cap = min(cap, ats[-1])
        candidates = sorted(
            itertools.chain.from_iterable(
                ats[: bisect.bisect_right(ats, cap)] for _, _, ats, _ in read.values()
            )
        )
        take = min(excess, len(candidates))
        if not take:
            return 0
        threshold = candidates[take - 1]
        counts = {name: bisect.bisect_left(r[2], threshold) for name, r in read.items()}
        rest = take - sum(counts.values())
        for name, r in read.items():  # lines emitted at the very same time: in turn
            more = min(rest, bisect.bisect_right(r[2], threshold) - counts[name])
            counts[name] += more
            rest -= more
        passed = 0
        for name, (start, data, _, ends) in read.items():
            k = counts[name]
            if not k:
                continue
            end = len(data) - len(data.split(b"\n", k)[-1]) if ends is None else ends[k - 1]
            place = (start[0], start[1] + end)
            counted = self._counted.get(name)
            if counted is not None:
                self._counted[name] = (
                    (counted[0], counted[1] - k) if counted[0] >= place else (place, 0)
                )
            self.cursor[name] = place
            passed += k
        return passed

    def _times(
        self, data: bytes, most: int, at_end: bool
    ) -> tuple[list[bytes], list[int] | None, bool]:
        """The emitted-at (as 19 digits) of the first `most` wanted lines of `data`, where
        each ends (None: every line is wanted, the n-th ends at the n-th newline), and whether
        that is all the journal holds (`data` being all of it, `at_end`)."""
        lines = data.split(b"\n", most)
        whole = (len(lines) <= most or lines[most] == b"") and at_end
        size = len(data) - len(lines[-1]) if len(lines) > most else len(data)
        lines = lines[:most] if len(lines) > most else lines[:-1]
        for kind in self.kinds:  # every line of one kind: the time at a fixed place
            w = len(kind) + 1
            if lines and lines[0][w + 19 : w + 20] == b"\t" and self._all(data, size, kind, lines):
                return [line[w : w + 19] for line in lines], None, whole
        ats, ends = [], []
        offset = 0
        kinds = self.kinds
        for raw in data.split(b"\n")[:-1]:
            offset += len(raw) + 1
            tab = raw.find(b"\t")
            if raw[:tab] in kinds:
                at = raw[tab + 1 : raw.find(b"\t", tab + 1)]
                if len(at) != 19 or not at.isdigit():
                    try:  # an older version's seconds, or a line cut short
                        at = b"%019d" % int(seconds(at) * 1e9)
                    except ValueError:
                        at = b"0" * 19
                ats.append(at)
                ends.append(offset)
                if len(ats) == most:
                    return ats, ends, False
        return ats, ends, at_end

    @staticmethod
    def _all(data: bytes, size: int, kind: bytes, lines: list[bytes]) -> bool:
        """Whether every one of `lines`, `data`'s first `size` bytes, is of `kind`."""
        head = data.startswith(kind + b"\t")
        return data.count(b"\n" + kind + b"\t", 0, size) + head == len(lines)

    def forget(self, name: str) -> None:
        """A journal removed: nothing of it waits any more."""
        self.cursor.pop(name, None)
        self._counted.pop(name, None)

    def at_end(self, journals: Journals, name: str) -> bool:
        """Whether the cursor is at the end of the journal's last file (by its size)."""
        numbers = journals.files.get(name)
        if not numbers:
            return True
        file, offset = self.cursor.get(name, START)
        if file != numbers[-1]:
            return file > numbers[-1]
        try:
            return os.path.getsize(directory_of(journals.root, name) / str(file)) <= offset
        except FileNotFoundError:
            return True


def collect(journals: Journals, consumers: list[Consumer]) -> list[str]:
    """Delete the journal files wholly behind every cursor, and, once every consumer read it
    to its end, the rest of a journal nobody writes any more (a finished command's goes
    whole); returns the journals removed (their cursors are to be forgotten)."""
    removed = []
    for name, numbers in journals.files.items():
        if not numbers:
            continue
        directory = directory_of(journals.root, name)
        behind = min((c.cursor.get(name, START) for c in consumers), default=START)
        old = [n for n in numbers if n < behind[0]]
        if old:
            delete_files(directory, old)
        if not all(c.at_end(journals, name) for c in consumers):
            continue
        lock = try_hold(journals.root, name)
        if lock is None:
            continue  # its writer is alive: its file stays for what it appends next
        try:
            if name.startswith(COMMAND_PREFIX):
                remove_journal(directory)  # no process takes its name again
                removed.append(name)
            else:  # the next writer of the name numbers its files above these
                delete_files(directory, [n for n in numbers if n >= behind[0]])
        finally:
            lock.close()
    return removed
