"""Cache administration: what the cache holds, how much, eviction on demand, pins and fsck.

One implementation behind both the `mirror cache …` / `mirror fsck` commands (which open a data
directory directly, also while a mirror serves it: SQLite in WAL mode and diskcache take
writers from several processes, blob files are only ever renamed into place or unlinked, and
an unlinked file stays whole for whoever has it open) and the admin HTTP API.

A running mirror learns of changes made here at its next eviction pass (it re-reads the usage
and the pins); fills in flight are never touched (their partial files are not in the index).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from mirror import errors
from mirror.cache import Cache
from mirror.config import PIN_FORM, is_pin
from mirror.eviction.passes import PassReport
from mirror.oci.reference import Digest
from mirror.store.index import Entry
from mirror.store.keys import TagKey
from mirror.store.pins import reachable_blobs
from mirror.store.reconcile import reconcile
from mirror.store.tags import TagRecord

#: A partial file older than this is a crash's leftover, not a live fill (fsck --repair).
STALE_PARTIAL = 3600.0


@dataclass(frozen=True)
class Image:
    """One cached tag: what `cache ls` shows."""

    upstream: str
    repository: str
    tag: str
    digest: str
    size: int
    last_pulled: float
    tiers: list[str]


@dataclass
class FsckReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    records_without_files: list[str] = field(default_factory=list)
    files_without_records: list[str] = field(default_factory=list)
    stale_partials: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.corrupt
            or self.records_without_files
            or self.files_without_records
            or self.stale_partials
        )


class Admin:
    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._tiers = cache.tiers
        self._manifests = cache.manifests
        self._tags = cache.coordinator.tags
        self._index = cache.index

    async def _records(self) -> dict[TagKey, TagRecord]:
        return dict(await asyncio.to_thread(lambda: list(self._tags.all())))

    async def _entries(self) -> dict[Digest, dict[str, Entry]]:
        """digest → tier → entry, for every blob the index holds."""
        found: dict[Digest, dict[str, Entry]] = {}
        for tier in ("warm", "cold"):
            for entry in await self._index.call(
                lambda t=tier: list(self._index.ordered(t, "last_access"))
            ):
                found.setdefault(entry.digest, {})[tier] = entry
        return found

    async def catalog(self, limit: int | None = None) -> list[Image]:
        """Every cached tag (the first `limit`, by name) with the size of what it references
        and where that lives."""
        tags = dict(sorted((await self._records()).items())[:limit])
        pulled = await self._index.call(self._index.tags_pulled)
        entries = await self._entries()
        images = []
        for key, record in sorted(tags.items()):
            blobs = await asyncio.to_thread(reachable_blobs, self._manifests, [record.digest])
            held = [entries[d] for d in blobs if d in entries]
            size = sum(next(iter(by_tier.values())).size for by_tier in held)
            tiers = sorted({t for by_tier in held for t in by_tier})
            last = max(
                [pulled.get(key, record.checked)]
                + [e.last_access for b in held for e in b.values()]
            )
            images.append(Image(*key, str(record.digest), size, last, tiers))
        return images

    async def recent(self, limit: int) -> list[Image]:
        """The `limit` tags pulled most recently, with the size of what each references and
        where that lives: the status page's table. Bounded work whatever the cache holds: it
        reads `limit` pull rows and tag records and the index rows of their blobs only."""
        images = []
        await self._tiers.flush_accesses()  # pulls counted since the last flush count too
        for key, pulled in await self._index.call(self._index.recent_tags, limit):
            record = await self._tags.get(key)
            if record is None:
                continue
            blobs = await asyncio.to_thread(reachable_blobs, self._manifests, [record.digest])
            by_tier = {
                t: await self._index.call(self._index.select, t, blobs) for t in ("warm", "cold")
            }
            sizes = {e.digest: e.size for entries in by_tier.values() for e in entries}
            tiers = sorted(t for t, entries in by_tier.items() if entries)
            images.append(Image(*key, str(record.digest), sum(sizes.values()), pulled, tiers))
        return images

    async def usage(self) -> dict[str, Any]:
        """Bytes and blobs per tier, and per upstream (a blob shared by two upstreams' images
        counts in both)."""
        per_tier = await self._cache.usage.refresh()
        entries = await self._entries()
        roots: dict[str, list[Digest]] = {}
        for key, record in (await self._records()).items():
            roots.setdefault(key.upstream, []).append(record.digest)
        per_upstream = {}
        for upstream, digests in sorted(roots.items()):
            blobs = await asyncio.to_thread(reachable_blobs, self._manifests, digests)
            held = [entries[d] for d in blobs if d in entries]
            per_upstream[upstream] = {
                "bytes": sum(next(iter(b.values())).size for b in held),
                "blobs": len(held),
            }
        return {
            "tiers": {t: {"bytes": b, "blobs": n} for t, (b, n) in per_tier.items()},
            "upstreams": per_upstream,
        }

    async def tiers(self) -> dict[str, tuple[int, int]]:
        """(bytes, objects) per tier, memory included: what the status page and /metrics show."""
        per_tier = await self._cache.usage.refresh()
        hot = self._tiers.hot
        return {"hot": (hot.used, len(hot)), **per_tier}

    async def unwritable(self) -> str | None:
        """Why the store cannot take writes now, or None (readiness)."""
        blobs = self._cache.blobs
        return await blobs.run(blobs.unwritable)

    async def evict(
        self, dry_run: bool = False, older_than: float | None = None, repo: str | None = None
    ) -> list[Entry]:
        """Warm blobs unused for `older_than` seconds and/or held by repositories matching
        `repo` (`<upstream>/<repository glob>`), never pinned ones or ones in use. They go
        the way any eviction goes (to cold when there is one)."""
        candidates = await self._index.call(
            lambda: list(self._index.ordered("warm", "last_access"))
        )
        if older_than is not None:
            before = time.time() - older_than
            candidates = [e for e in candidates if e.last_access < before]
        if repo is not None:
            roots = [
                r.digest
                for key, r in (await self._records()).items()
                if fnmatchcase(f"{key.upstream}/{key.repo}", repo)
            ]
            held = await asyncio.to_thread(reachable_blobs, self._manifests, roots)
            candidates = [e for e in candidates if e.digest in held]
        evictions = self._cache.evictions
        protected = await evictions.protected()
        victims = [e for e in candidates if e.digest not in protected]
        if not dry_run and victims:
            await evictions.leave_warm(victims, PassReport(), "manual")
        return victims

    async def pin(self, pattern: str) -> None:
        if not is_pin(pattern):
            raise errors.InvalidRequest(f"a pin is {PIN_FORM}, got {pattern!r}")
        await self._index.call(self._index.pin, pattern)

    async def unpin(self, pattern: str) -> bool:
        return await self._index.call(self._index.unpin, pattern)

    async def pins(self) -> list[str]:
        return await self._index.call(self._index.pins)

    async def fsck(self, repair: bool = False) -> FsckReport:
        """Re-hash every warm blob; compare the index with the files; find crash leftovers.
        With `repair`: drop corrupt blobs (record first, then file), adopt files without
        records and drop records without files (as a restart does), remove stale partials."""
        report = FsckReport()
        blobs = self._cache.blobs
        files = await blobs.run(blobs.scan)
        known = await self._index.call(self._index.digests, "warm")
        report.records_without_files = sorted(map(str, known - files.keys()))
        report.files_without_records = sorted(map(str, files.keys() - known))
        corrupt = []
        for digest in sorted(files, key=str):
            report.checked += 1
            if not await blobs.run(blobs.verify, digest):
                corrupt.append(digest)
        report.corrupt = [str(d) for d in corrupt]
        stale = await blobs.run(blobs.partials, STALE_PARTIAL)
        report.stale_partials = sorted(p.name for p in stale)
        if repair and not report.clean:
            await self._index.call(self._index.forget_many, "warm", corrupt)
            await blobs.run(blobs.remove, corrupt)
            for path in stale:
                await blobs.run(blobs.discard, path)
            await reconcile(blobs, self._index, self._cache.usage)
            report.repaired = True
        return report
