"""The journals read forward: each consumer (a webhook, the audit log) has a cursor, its
place in every journal (journal.py), and takes the lines of the kinds it wants from there,
in big chunks, off the request path.

A line may hold several events (a run of pulls, record.py): what is counted, taken and
passed is events, and a cursor passes a line's events together.

Order: within a journal, the order it was written in; across journals, by when each event
was emitted (the lines read so far of each journal merged by that time), so events of two
processes close in time may come in either order, and a line a process had not yet written
when the others' were taken comes after them.

A consumer moves its cursor past what it took once that is done with (a webhook's 2xx, an
audit write), and past the oldest of what it wants when more than `max_queue` wait
(`trim`): so each webhook keeps at most its newest `max_queue` events. What waits is counted
in the bytes (the kind leads every line) from where the last count ended, not line by line,
with a mark left every MARK_BYTES: a trim passes the whole blocks of the oldest by the marks,
unread, and reads only the last few to pass what is left (exactly, but for a run's
further pulls, which go with their line).
Files wholly behind every cursor are deleted (`collect`), so the journals hold at most about
`max_queue` lines per journal behind the slowest consumer, and one file's bytes
(FILE_BYTES) more.

Every method is blocking: the deliver thread's (delivery.py), or an admin command's.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import os
import time
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
    remove_abandoned,
    remove_journal,
    try_hold,
)
from mirror.events.record import RUN, events_in, seconds

log = logging.getLogger("mirror.events")

#: Most bytes read from one journal at a time.
CHUNK = 1024 * 1024
#: Bytes per wanted line a trim reckons with before it counted any (a pull's are about 250).
SPACING = 512.0
#: Bytes between the marks a count leaves in a journal, from which a trim passes whole
#: blocks of the oldest lines without reading them again.
MARK_BYTES = 64 * 1024
START: Position = (0, 0)

#: A wanted line read: (emitted at, journal, its end, the line without its newline).
Wanted = tuple[float, str, Position, bytes]
_at = itemgetter(0)
_HEAD = HEADER.encode() + b"\t"
_RUN = RUN.encode()


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
        #: Whether it wants pulls, whose lines may hold several (record.py: RUN).
        self._runs = b"pull" in self.kinds
        self.cursor = dict(cursor)
        #: Per journal: how far it was counted, and the wanted events from the cursor to there.
        self._counted: dict[str, tuple[Position, int]] = {}
        #: Per journal: its bytes per wanted line, as last counted (what a trim reads).
        self._spacing: dict[str, float] = {}
        #: Per journal: the wanted events counted in it so far, from wherever counting began.
        self._seen: dict[str, int] = {}
        #: Per journal, ahead of the cursor, oldest first: the place after each block the
        #: count read, `_seen` there, and the latest time of a line before it.
        self._marks: dict[str, list[tuple[Position, int, int]]] = {}

    def _count(self, name: str, start: Position, data: bytes) -> int:
        """The wanted events of `data` (read from `start`), counted block by block, with a
        mark left after each block."""
        marks = self._marks.setdefault(name, [])
        seen = self._seen.get(name, 0)
        latest = marks[-1][2] if marks else 0
        found = at = 0
        while at < len(data):
            end = data.rfind(b"\n", at, at + MARK_BYTES) + 1
            if end <= at:  # a line longer than a block, or the last block
                end = data.find(b"\n", at + MARK_BYTES) + 1 or len(data)
            count = self._wanted_between(data, at, end)
            found += count
            seen += count
            latest = max(latest, _time_at(data, data.rfind(b"\n", at, end - 1) + 1))
            marks.append(((start[0], start[1] + end), seen, latest))
            at = end
        self._seen[name] = seen
        return found

    def depth(self, journals: Journals) -> int:
        """The wanted events from the cursor to the journals' ends (counting only the bytes
        written since the last count)."""
        total = 0
        for name in journals.files:
            place, ahead = self._counted.get(name, (self.cursor.get(name, START), 0))
            cursor = self.cursor.get(name, START)
            self._marks[name] = [m for m in self._marks.get(name, ()) if m[0] > cursor]
            while True:
                start, data = journals.chunk(name, place)
                if not data:
                    place = max(place, start)
                    break
                found = self._count(name, start, data)
                if found:
                    self._spacing[name] = len(data) / found
                ahead += found
                place = (start[0], start[1] + len(data))
            self._counted[name] = (place, ahead)
            total += ahead
        return total

    def take(self, journals: Journals, limit: int) -> Taken:
        """The oldest lines wanted, merged across journals by when they were emitted (see the
        module docstring), holding `limit` events or a few fewer (a line's events go
        together; at least one line); the cursor stays until `advance`."""
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
            events = 0
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
                    events += events_in(raw)
                    if events >= limit:
                        break
            ends[name] = (file, offset)
            if mine:
                per.append(mine)
            else:
                taken.after[name] = (file, offset)  # nothing wanted in it: skipped
        merged = per[0] if len(per) == 1 else heapq.merge(*per, key=_at)
        events = 0
        for line in merged:
            events += events_in(line[3])
            if events > limit and taken.lines:
                break  # a line's events go together: the next take begins with it
            taken.lines.append(line)
            if events >= limit:
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
        returns how many wanted events it passed that it had not passed before."""
        passed = 0
        for _, name, end, line in taken.lines:
            if end > self.cursor.get(name, START):
                events = events_in(line)
                passed += events
                counted = self._counted.get(name)
                if counted is not None and end <= counted[0]:
                    self._counted[name] = (counted[0], counted[1] - events)
        for name, place in taken.after.items():
            if place > self.cursor.get(name, START):
                self.cursor[name] = place
                counted = self._counted.get(name)
                if counted is not None and counted[0] < place:
                    self._counted[name] = (place, 0)  # counted again from here
        return passed

    def trim(self, journals: Journals, most: int) -> int:
        """Pass the oldest wanted events beyond the newest `most`; returns how many."""
        dropped = 0
        excess = self.depth(journals) - most
        if excess > 0:
            dropped = self._skip(excess)
            excess -= dropped
        while excess > 0:
            passed, moved = self._drop(journals, excess)
            if not moved:
                break
            dropped += passed
            excess -= passed
        return dropped

    def _skip(self, excess: int) -> int:
        """Pass, by the marks the count left and reading nothing, the blocks of the oldest
        wanted events that the oldest `excess` surely hold: those whose lines are all no later
        than T, T the latest time of a mark at which the lines that may be no later than it
        (up to each journal's first mark past T) are at most `excess`. `_drop` then passes
        the rest exactly, reading only from there. Returns how many it passed."""
        ahead: dict[str, list[tuple[Position, int, int]]] = {}  # (place, lines to it, time)
        times_of: dict[str, list[int]] = {}
        for name, marks in self._marks.items():
            counted = self._counted.get(name)
            if counted is None:
                continue
            cursor = self.cursor.get(name, START)
            behind = self._seen.get(name, 0) - counted[1]  # `_seen` at the cursor
            live = [(m[0], m[1] - behind, m[2]) for m in marks if m[0] > cursor]
            if live:
                ahead[name] = live
                times_of[name] = [m[2] for m in live]
        if not ahead:
            return 0
        cap = min(marks[-1][2] for marks in ahead.values())  # later lines are not counted

        def upper(at: int) -> int:
            total = 0
            for name, marks in ahead.items():
                i = bisect.bisect_right(times_of[name], at)
                total += marks[i][1] if i < len(marks) else self._counted[name][1]
            return total

        times = sorted({m[2] for marks in ahead.values() for m in marks if m[2] <= cap})
        low, high = -1, len(times)  # upper(times[low]) <= excess < upper(times[high])
        while high - low > 1:
            mid = (low + high) // 2
            if upper(times[mid]) <= excess:
                low = mid
            else:
                high = mid
        if low < 0:
            return 0
        passed = 0
        for name, marks in ahead.items():
            i = bisect.bisect_right(times_of[name], times[low])
            if not i:
                continue
            place, lines, _ = marks[i - 1]
            self.cursor[name] = place
            counted = self._counted[name]
            self._counted[name] = (counted[0], counted[1] - lines)
            passed += lines
        return passed

    def _drop(self, journals: Journals, excess: int) -> tuple[int, bool]:
        """Pass the oldest of `excess` wanted events, merged across journals by when they were
        emitted: every line up to a time T, T the latest that passes no more than `excess`,
        and of the lines emitted at the very next nanosecond, in turn, what makes up the rest.
        Each journal is read for about its share of the excess (by its bytes per wanted line
        as counted); one read in part caps T at its last line's time (what follows in it is
        later), and the caller goes on for what is left. T is found by bisection over time,
        each journal's place for a time by bisection over its bytes (a journal's lines are in
        the order of their times), and what a place passes counted in the bytes: nothing is
        made per line. Returns how many wanted events it passed, and whether a cursor moved."""
        names = [n for n in journals.files if not self.at_end(journals, n)]
        share = -(-excess // max(len(names), 1))
        spans: dict[str, _Span] = {}
        cap: int | None = None
        for name in names:
            want = int(share * self._spacing.get(name, SPACING) * 1.25) + 4096
            start, data = journals.chunk(name, self.cursor.get(name, START), min(want, CHUNK))
            if not data:
                continue
            spans[name] = _Span(start, data)
            if not journals.ends_with(name, start, data):
                last = _time_at(data, spans[name].last())
                cap = last if cap is None else min(cap, last)
        if not spans:
            return 0, False
        low = min(_time_at(span.data, 0) for span in spans.values()) - 1  # passes nothing
        high = cap if cap is not None else max(_time_at(s.data, s.last()) for s in spans.values())
        for span in spans.values():
            span.hi = _after(span.data, high, 0, len(span.data))
            span.hi_n = self._wanted_between(span.data, 0, span.hi)
        if sum(span.hi_n for span in spans.values()) <= excess:
            for span in spans.values():
                span.lo, span.lo_n = span.hi, span.hi_n
        else:  # low passes at most `excess`, high more
            while high - low > 1:
                mid = (low + high) // 2
                probes = []
                for span in spans.values():
                    cut = _after(span.data, mid, span.lo, span.hi)
                    probes.append((cut, span.lo_n + self._wanted_between(span.data, span.lo, cut)))
                if sum(n for _, n in probes) <= excess:
                    low = mid
                    for span, (cut, n) in zip(spans.values(), probes, strict=True):
                        span.lo, span.lo_n = cut, n
                else:
                    high = mid
                    for span, (cut, n) in zip(spans.values(), probes, strict=True):
                        span.hi, span.hi_n = cut, n
            rest = excess - sum(span.lo_n for span in spans.values())
            for span in spans.values():  # lines emitted at the very same time: in turn
                while rest > 0 and span.lo_n < span.hi_n:  # a line's events pass together
                    wanted = span.data.startswith(self._heads, span.lo)
                    end = span.data.index(b"\n", span.lo) + 1
                    if wanted:
                        events = self._wanted_between(span.data, span.lo, end)
                        span.lo_n += events
                        rest -= events
                    span.lo = end
        passed, moved = 0, False
        for name, span in spans.items():
            if not span.lo:
                continue
            place = (span.start[0], span.start[1] + span.lo)
            counted = self._counted.get(name)
            if counted is not None:
                self._counted[name] = (
                    (counted[0], counted[1] - span.lo_n) if counted[0] >= place else (place, 0)
                )
            self.cursor[name] = place
            passed += span.lo_n
            moved = True
        return passed, moved

    def _wanted_between(self, data: bytes, start: int, end: int) -> int:
        """The wanted events of the lines of `data` that begin in [start, end) (both where lines
        begin): a line's pattern (its newline before, its kind, a tab) lies within, a line
        being longer than its kind, and so does each RUN of a pull line's further pulls."""
        if start >= end:
            return 0
        found = sum(data.count(p, start - 1 if start else 0, end) for p in self._patterns)
        if self._runs:  # a pull line's further pulls (RUN is in no other line)
            found += data.count(_RUN, start, end)
        return found + (1 if start == 0 and data.startswith(self._heads) else 0)

    def forget(self, name: str) -> None:
        """A journal removed: nothing of it waits any more."""
        self.cursor.pop(name, None)
        self._counted.pop(name, None)
        self._marks.pop(name, None)
        self._seen.pop(name, None)

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


@dataclass
class _Span:
    """What a trim read of one journal: from `start`, `data` (whole lines); `lo`, `hi` where
    lines begin in it, with the wanted events before each (`lo_n`, `hi_n`), bracketing the
    place of the time sought."""

    start: Position
    data: bytes
    lo: int = 0
    lo_n: int = 0
    hi: int = 0
    hi_n: int = 0

    def last(self) -> int:
        """Where its last line begins."""
        return self.data.rfind(b"\n", 0, len(self.data) - 1) + 1


def _time_at(data: bytes, start: int) -> int:
    """The emitted-at (ns) of the line beginning at `start`; 0 for a line cut short (the
    oldest: passed first)."""
    end = data.find(b"\n", start)
    tab = data.find(b"\t", start, end)
    second = data.find(b"\t", tab + 1, end)
    if tab < 0 or second < 0:
        return 0
    field = data[tab + 1 : second]
    if len(field) == 19 and field.isdigit():
        return int(field)
    try:  # an older version's seconds
        return int(seconds(field) * 1e9)
    except ValueError:
        return 0


def _after(data: bytes, at: int, lo: int, hi: int) -> int:
    """Where the first line emitted after `at` begins among the lines of `data` that begin
    in [lo, hi) (`hi` if none is), lines being in the order of their times."""
    while lo < hi:
        mid = (lo + hi) // 2
        start = data.rfind(b"\n", lo, mid) + 1 or lo  # the line holding byte `mid`
        if _time_at(data, start) <= at:
            lo = data.index(b"\n", start) + 1
        else:
            hi = start
    return lo


def collect(journals: Journals, consumers: list[Consumer]) -> list[str]:
    """Delete the journal files wholly behind every cursor, and, once every consumer read it
    to its end, the rest of a journal nobody writes any more (a finished command's goes
    whole, and so does one whose command was killed before it emitted anything); returns
    the journals removed (their cursors are to be forgotten)."""
    removed = []
    now = time.time()
    for name, numbers in journals.files.items():
        if not numbers:
            if name.startswith(COMMAND_PREFIX) and remove_abandoned(journals.root, name, now):
                removed.append(name)
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
