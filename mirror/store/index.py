"""Blob metadata: which tier holds a blob, its size, when it was stored and last used, how often
it was hit; the pins added at run time; when each tag was last pulled; and, with `[auth]` on,
which repository is known to hold which digest (pull/holdings.py). SQLite (WAL), so the admin
commands can read and write it safely while a mirror runs.

Every method of `BlobIndex` is blocking and must run on the index's own single thread
(`BlobIndex.call`): one connection, one writer, no lock juggling. The request path never waits
on it: hits are counted in memory by `Accesses` and written in batches off the hot path.

Records follow files, never lead them: a blob is recorded after its file was committed, and its
record goes before its file is deleted, so a crash leaves at worst a file without a record,
which `reconcile` adopts at the next start.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mirror.oci.reference import Digest, parse_digest
from mirror.store.keys import TagKey
from mirror.store.offload import offload

T = TypeVar("T")

TIERS = ("warm", "cold")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT NOT NULL,
    tier        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    stored      REAL NOT NULL,
    last_access REAL NOT NULL,
    hits        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (digest, tier)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (tier, last_access);
CREATE TABLE IF NOT EXISTS usage (tier TEXT PRIMARY KEY, bytes INTEGER NOT NULL, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS usage_add AFTER INSERT ON blobs BEGIN
    INSERT INTO usage VALUES (new.tier, new.size, 1)
        ON CONFLICT (tier) DO UPDATE SET bytes = bytes + new.size, count = count + 1;
END;
CREATE TRIGGER IF NOT EXISTS usage_drop AFTER DELETE ON blobs BEGIN
    UPDATE usage SET bytes = bytes - old.size, count = count - 1 WHERE tier = old.tier;
END;
CREATE TRIGGER IF NOT EXISTS usage_resize AFTER UPDATE OF size ON blobs BEGIN
    UPDATE usage SET bytes = bytes - old.size + new.size WHERE tier = old.tier;
END;
CREATE TABLE IF NOT EXISTS pins (pattern TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (
    upstream    TEXT NOT NULL,
    repo        TEXT NOT NULL,
    tag         TEXT NOT NULL,
    last_access REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_access ON tags (last_access);
CREATE TABLE IF NOT EXISTS holds (
    upstream    TEXT NOT NULL,
    repo        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One blob in one tier, as the eviction policies see it."""

    digest: Digest
    size: int
    stored: float
    last_access: float
    hits: int

    @classmethod
    def of_row(cls, row: tuple[Any, ...]) -> Entry:
        """From (digest, size, stored, last_access, hits); the digest is parsed again, since
        it becomes a file name."""
        return cls(parse_digest(row[0]), *row[1:])


_ENTRY = "SELECT digest, size, stored, last_access, hits FROM blobs"


class BlobIndex:
    def __init__(self, path: Path, orders: Iterable[str] = ()) -> None:
        """`orders`: the eviction policies' `sql` orders in use; each gets an index (kept
        only while in use: every index costs a little on each write), so a pass reads its
        candidates without sorting the whole tier."""
        self.path = path
        self._orders = sorted(set(orders) - {"last_access"})
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="index")
        self._db: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking index method on the index thread."""
        return await offload(self._executor, fn, *args)

    def close(self) -> None:
        """Blocking: finish queued work, then close the connection on its own thread."""
        self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._order_indexes(self._db)
        return self._db

    def _order_indexes(self, db: sqlite3.Connection) -> None:
        wanted = {
            f"blobs_by_{hashlib.sha256(o.encode()).hexdigest()[:12]}": o for o in self._orders
        }
        have = {
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'blobs_by_%'"
            )
        }
        for name in have - wanted.keys() - {"blobs_by_access"}:
            db.execute(f"DROP INDEX {name}")
        for name, order in wanted.items():
            db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON blobs (tier, {order})")

    # -- blocking methods: call them through `call` (or directly from a command-line tool) --

    def record(self, digest: Digest, tier: str, size: int, now: float) -> None:
        """A blob now held by `tier` (after its file or object was committed)."""
        self.db.execute(
            "INSERT INTO blobs (digest, tier, size, stored, last_access) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (digest, tier) DO UPDATE SET size = excluded.size, last_access = excluded.last_access",
            (str(digest), tier, size, now, now),
        )

    def record_many(self, rows: Iterable[tuple[Digest, str, int, float]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, tier, size, stored, last_access) VALUES (?, ?, ?, ?, ?)",
                ((str(d), t, s, now, now) for d, t, s, now in rows),
            )

    def forget(self, digest: Digest, tier: str) -> None:
        self.db.execute("DELETE FROM blobs WHERE digest = ? AND tier = ?", (str(digest), tier))

    def forget_many(self, tier: str, digests: Iterable[Digest]) -> None:
        with self.db:
            self.db.execute(
                "DELETE FROM blobs WHERE tier = ? AND digest IN (SELECT value FROM json_each(?))",
                (tier, _json(digests)),
            )

    def touch(self, tier: str, accesses: Mapping[Digest, tuple[float, int]]) -> None:
        """Apply a batch of (last access, hit count) from `Accesses`, in one transaction."""
        with self.db:
            self.db.executemany(
                "UPDATE blobs SET last_access = max(last_access, ?), hits = hits + ? WHERE digest = ? AND tier = ?",
                ((last, hits, str(d), tier) for d, (last, hits) in accesses.items()),
            )

    def touch_tags(self, pulled: Mapping[TagKey, float]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO tags VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                "SET last_access = max(last_access, excluded.last_access)",
                ((*key, when) for key, when in pulled.items()),
            )

    def tags_pulled(self) -> dict[TagKey, float]:
        """When each tag was last pulled through the mirror."""
        rows = self.db.execute("SELECT upstream, repo, tag, last_access FROM tags")
        return {TagKey(u, r, t): when for u, r, t, when in rows}

    def hold(self, upstream: str, repo: str, digests: Iterable[Digest]) -> None:
        """`<upstream>/<repo>` holds these digests (pull/holdings.py)."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO holds VALUES (?, ?, ?)",
                ((upstream, repo, str(d)) for d in digests),
            )

    def holds(self, upstream: str, repo: str, digest: Digest) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM holds WHERE upstream = ? AND repo = ? AND digest = ?",
            (upstream, repo, str(digest)),
        ).fetchone()
        return row is not None

    def recent_tags(self, limit: int) -> list[tuple[TagKey, float]]:
        """The `limit` tags pulled most recently, and when (reads only those rows)."""
        rows = self.db.execute(
            "SELECT upstream, repo, tag, last_access FROM tags ORDER BY last_access DESC LIMIT ?",
            (limit,),
        )
        return [(TagKey(u, r, t), when) for u, r, t, when in rows]

    def forget_tags(self, keys: Iterable[TagKey]) -> None:
        with self.db:
            self.db.executemany(
                "DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ?", keys
            )

    def select(self, tier: str, digests: Iterable[Digest]) -> list[Entry]:
        """The entries of these digests that `tier` holds."""
        rows = self.db.execute(
            f"{_ENTRY} WHERE tier = ? AND digest IN (SELECT value FROM json_each(?)) "
            "ORDER BY last_access",
            (tier, _json(digests)),
        )
        return [Entry.of_row(row) for row in rows]

    def usage(self) -> dict[str, tuple[int, int]]:
        """Bytes and blob count per tier: kept by triggers, so reading it costs nothing however
        many blobs there are, and writers in other processes (admin commands) are counted."""
        found = dict.fromkeys(TIERS, (0, 0))
        for tier, nbytes, count in self.db.execute("SELECT tier, bytes, count FROM usage"):
            found[tier] = (int(nbytes), int(count))
        return found

    def ordered(self, tier: str, order_sql: str) -> Iterator[Entry]:
        """A tier's blobs in an eviction policy's order (`Policy.sql`, a constant of ours,
        never input), read lazily: a pass stops as soon as it has its victims."""
        for row in self.db.execute(f"{_ENTRY} WHERE tier = ? ORDER BY {order_sql}", (tier,)):
            yield Entry.of_row(row)

    def idle(self, tier: str, before: float, limit: int) -> list[Entry]:
        """Blobs of a tier not used since `before`."""
        rows = self.db.execute(
            f"{_ENTRY} WHERE tier = ? AND last_access < ? ORDER BY last_access LIMIT ?",
            (tier, before, limit),
        )
        return [Entry.of_row(row) for row in rows]

    def tiers_of(self, digest: Digest) -> dict[str, Entry]:
        rows = self.db.execute(
            "SELECT tier, size, stored, last_access, hits FROM blobs WHERE digest = ?",
            (str(digest),),
        )
        return {row[0]: Entry(digest, *row[1:]) for row in rows}

    def digests(self, tier: str) -> set[Digest]:
        rows = self.db.execute("SELECT digest FROM blobs WHERE tier = ?", (tier,))
        return {parse_digest(row[0]) for row in rows}

    def pins(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT pattern FROM pins ORDER BY pattern")]

    def pin(self, pattern: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO pins (pattern) VALUES (?)", (pattern,))

    def unpin(self, pattern: str) -> bool:
        return self.db.execute("DELETE FROM pins WHERE pattern = ?", (pattern,)).rowcount > 0


class Accesses:
    """Hits counted in memory on the request path (a dict update, no I/O) and written to the
    index in one transaction every `[eviction] access_flush` seconds and before each eviction
    pass, so a cache hit costs no disk write."""

    def __init__(self, index: BlobIndex, clock: Callable[[], float] = time.time) -> None:
        self._index = index
        self._clock = clock
        self._pending: dict[Digest, tuple[float, int]] = {}
        self._tags: dict[TagKey, float] = {}
        self._gone: set[TagKey] = set()

    def hit(self, digest: Digest) -> None:
        hits = self._pending.get(digest, (0.0, 0))[1]
        self._pending[digest] = (self._clock(), hits + 1)

    def tag_pulled(self, key: TagKey) -> None:
        """A manifest fetched by tag (for retention's "most recently pulled" and "idle");
        only for a tag that exists, so that requests for made-up tags leave no rows."""
        self._tags[key] = self._clock()
        self._gone.discard(key)

    def tag_gone(self, key: TagKey) -> None:
        """Upstream says the tag is no more: its row goes at the next flush."""
        self._tags.pop(key, None)
        self._gone.add(key)

    async def flush(self) -> int:
        """Write what was counted since the last flush; returns how many blobs and tags."""
        batch, self._pending = self._pending, {}
        tags, self._tags = self._tags, {}
        gone, self._gone = self._gone, set()
        if batch:
            await self._index.call(self._index.touch, "warm", batch)
        if tags:
            await self._index.call(self._index.touch_tags, tags)
        if gone:
            await self._index.call(self._index.forget_tags, list(gone))
        return len(batch) + len(tags) + len(gone)


def _json(digests: Iterable[Digest]) -> str:
    return json.dumps([str(d) for d in digests])
