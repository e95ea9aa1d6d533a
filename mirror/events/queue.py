"""The events waiting for each webhook, on disk: one SQLite table (WAL) under the data
directory, rows in the order they were emitted, removed only once delivered (or dropped).

Every method is blocking and runs on the queue thread (enqueue.py owns this process's one
connection; every serving process and admin command has its own to the same file).
A commit is a write(2) into the WAL: it survives the process being killed (kill -9, the OOM
killer) the moment it returns; `synchronous=NORMAL` leaves the fsync to the WAL checkpoint,
so a power loss or kernel crash may take the last commits before it.

Each webhook's events are numbered 1, 2, 3, … (`seq`) with no gaps, and are kept as the
batches the events thread committed them in: one row per webhook per commit (`first` to
`last`, the event texts one per line; JSON text holds no raw newline), so a commit costs a
row, not a row per event. `heads` holds where each queue starts: events before it are gone
(delivered, or dropped as the oldest past `max_queue`), rows wholly before it are deleted,
and a row partly before it is read from the head on. A queue is the range [head, last]: its
depth is arithmetic, and keeping `max_queue` moves the head. A new batch is numbered on
from the highest `last` (or the head), read inside the writing transaction, so the admin
commands and the other workers, processes that append to the same queue, number on from it
too (SQLite lets one writer in at a time). `journals` holds how far into each serving
process's journal (journal.py, by its name) the queues got, written in the transaction
that took the events.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mirror.events")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    endpoint TEXT NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    at       REAL NOT NULL,
    bodies   TEXT NOT NULL,
    PRIMARY KEY (endpoint, first)
);
CREATE TABLE IF NOT EXISTS heads (endpoint TEXT PRIMARY KEY, head INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journals (
    name   TEXT PRIMARY KEY,
    file   INTEGER NOT NULL,
    offset INTEGER NOT NULL
) WITHOUT ROWID;
"""
#: Before workers there was one journal, whose place had a table of its own (`journal`,
#: one row): that is the single process's journal's place now.
_MIGRATE = """
INSERT OR IGNORE INTO journals SELECT '', file, offset FROM journal;
DROP TABLE journal;
"""


@dataclass(frozen=True, slots=True)
class Queued:
    """One event waiting for a webhook: its place, when it was emitted (its batch's first
    event, to the millisecond), its encoded text."""

    seq: int
    at: float
    body: str


class EventQueue:
    def __init__(self, path: Path, endpoints: Iterable[str], max_queue: int) -> None:
        self.path = path
        self._endpoints = tuple(endpoints)
        self._max = max_queue
        self._db: sqlite3.Connection | None = None
        #: Events waiting per webhook, as of this process's last write or read of its queue.
        self.depth: dict[str, int] = dict.fromkeys(self._endpoints, 0)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            # opened at start (so that an unwritable queue stops it), then only ever used on
            # the events thread: one thread at a time, never two
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
            self._migrate()
            names = {row[0] for row in db.execute("SELECT DISTINCT endpoint FROM batches")}
            for name in sorted(names - set(self._endpoints)):
                head, last = self._range(name)
                log.warning(
                    "%d events are queued for webhook %r, which is not configured: kept",
                    last - head + 1,
                    name,
                )
            for name in self._endpoints:
                self._measure(name)
        return self._db

    def _migrate(self) -> None:
        """Take an older version's record of how far into its journal the queues got."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # several workers may open it at once: one migrates
        try:
            old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal'"
            if db.execute(old).fetchone() is not None:
                for statement in _MIGRATE.strip().splitlines():
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def open(self) -> None:
        """Open (and create) the database now, so that a start fails on an unwritable one."""
        assert self.db is not None

    def _range(self, endpoint: str) -> tuple[int, int]:
        """[head, last] of a queue (empty when last < head)."""
        db = self.db
        row = db.execute("SELECT head FROM heads WHERE endpoint = ?", (endpoint,)).fetchone()
        head = row[0] if row is not None else 1
        row = db.execute(
            "SELECT last FROM batches WHERE endpoint = ? ORDER BY first DESC LIMIT 1", (endpoint,)
        ).fetchone()
        return head, max(row[0] if row is not None else 0, head - 1)

    def _measure(self, endpoint: str) -> None:
        head, last = self._range(endpoint)
        self.depth[endpoint] = last - head + 1

    def _move_head(self, endpoint: str, head: int) -> None:
        db = self.db
        db.execute(
            "INSERT INTO heads VALUES (?1, ?2) ON CONFLICT (endpoint) DO UPDATE "
            "SET head = MAX(head, ?2)",
            (endpoint, head),
        )
        # rows wholly before the head (read through the key: a row holding the head stays)
        db.execute(
            "DELETE FROM batches WHERE endpoint = ?1 AND first < ?2 AND last < ?2", (endpoint, head)
        )

    def taken(self, journal: str) -> tuple[int, int]:
        """How far into the journal of that name the queues got (journal.py)."""
        row = self.db.execute(
            "SELECT file, offset FROM journals WHERE name = ?", (journal,)
        ).fetchone()
        return (row[0], row[1]) if row is not None else (0, 0)

    def append(
        self,
        rows: dict[str, list[tuple[float, str]]],
        taken: tuple[str, tuple[int, int]] | None = None,
    ) -> Counter[str]:
        """Commit each webhook's (emitted at, body) events as one batch each, in one
        transaction (with `taken`, a journal's name and how far into it they reach), then
        drop the oldest of each queue past `max_queue`; returns how many each lost so."""
        db, dropped = self.db, Counter[str]()
        db.execute("BEGIN IMMEDIATE")
        try:
            if taken is not None:
                name, (file, offset) = taken
                db.execute("INSERT OR REPLACE INTO journals VALUES (?, ?, ?)", (name, file, offset))
            for name, events in rows.items():
                head, last = self._range(name)
                first, last = last + 1, last + len(events)
                db.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                    (name, first, last, events[0][0], "\n".join(body for _, body in events)),
                )
                if last - head + 1 > self._max:
                    dropped[name] = last - self._max + 1 - head
                    head = last - self._max + 1
                    self._move_head(name, head)
                self.depth[name] = last - head + 1
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.depth.clear()
            raise
        return dropped

    def peek(self, endpoint: str, limit: int) -> list[Queued]:
        """The oldest `limit` events waiting for `endpoint`, oldest first."""
        head, _ = self._range(endpoint)
        found: list[Queued] = []
        rows = self.db.execute(  # every row left holds events from the head on
            "SELECT first, at, bodies FROM batches WHERE endpoint = ? ORDER BY first", (endpoint,)
        )
        for first, at, bodies in rows:
            for seq, body in enumerate(bodies.split("\n"), first):
                if seq >= head:
                    found.append(Queued(seq, at, body))
                    if len(found) == limit:
                        rows.close()
                        self._measure(endpoint)
                        return found
        self._measure(endpoint)
        return found

    def ack(self, endpoint: str, upto: int) -> None:
        """Remove `endpoint`'s events up to `seq` `upto` (a delivered or refused batch, and
        anything older dropped meanwhile)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._move_head(endpoint, upto + 1)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._measure(endpoint)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
