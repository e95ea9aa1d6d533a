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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from mirror import errors
from mirror.eviction import PassReport
from mirror.oci.reference import parse_digest
from mirror.store.index import Entry
from mirror.store.manifests import ManifestStore, TagKey
from mirror.store.pins import reachable_blobs
from mirror.store.tiers import Tiers

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
    def __init__(self, tiers: Tiers, manifests: ManifestStore) -> None:
        self._tiers = tiers
        self._manifests = manifests
        self._index = tiers.index

    async def _tags(self) -> dict[TagKey, Any]:
        return dict(await asyncio.to_thread(lambda: list(self._manifests.iter_tags())))

    async def _entries(self) -> dict[str, dict[str, Entry]]:
        """digest → tier → entry, for every blob the index holds."""
        found: dict[str, dict[str, Entry]] = {}
        for tier in ("warm", "cold"):
            for entry in await self._index.call(
                lambda t=tier: list(self._index.ordered(t, "last_access"))
            ):
                found.setdefault(entry.digest, {})[tier] = entry
        return found

    async def catalog(self, limit: int | None = None) -> list[Image]:
        """Every cached tag (the first `limit`, by name) with the size of what it references
        and where that lives."""
        tags = dict(sorted((await self._tags()).items())[:limit])
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
            images.append(Image(*key, record.digest, size, last, tiers))
        return images

    async def usage(self) -> dict[str, Any]:
        """Bytes and blobs per tier, and per upstream (a blob shared by two upstreams' images
        counts in both)."""
        per_tier = await self._tiers.refresh_usage()
        entries = await self._entries()
        roots: dict[str, list[str]] = {}
        for (upstream, _, _), record in (await self._tags()).items():
            roots.setdefault(upstream, []).append(record.digest)
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
                for (u, name, _), r in (await self._tags()).items()
                if fnmatchcase(f"{u}/{name}", repo)
            ]
            held = await asyncio.to_thread(reachable_blobs, self._manifests, roots)
            candidates = [e for e in candidates if e.digest in held]
        protected = await self._tiers.protected()
        victims = [e for e in candidates if e.digest not in protected]
        if not dry_run and victims:
            await self._tiers.leave_warm(victims, PassReport(), "manual")
        return victims

    async def pin(self, pattern: str) -> None:
        if "/" not in pattern or ":" not in pattern.rpartition("/")[2]:
            raise errors.InvalidRequest(
                f"a pin is <upstream>/<repository>:<tag pattern>, got {pattern!r}"
            )
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
        blobs = self._tiers.blobs
        files = await blobs.run(blobs.scan)
        known = await self._index.call(self._index.digests, "warm")
        report.records_without_files = sorted(known - files.keys())
        report.files_without_records = sorted(files.keys() - known)
        for digest in sorted(files):
            report.checked += 1
            if not await blobs.run(blobs.verify, parse_digest(digest)):
                report.corrupt.append(digest)
        now = time.time()
        report.stale_partials = sorted(
            p.name for p in blobs.layout.tmp.iterdir() if now - p.stat().st_mtime > STALE_PARTIAL
        )
        if repair and not report.clean:
            await self._index.call(self._index.forget_many, "warm", report.corrupt)
            await blobs.run(blobs.remove, report.corrupt)
            for name in report.stale_partials:
                (blobs.layout.tmp / name).unlink(missing_ok=True)
            await self._tiers.reconcile()
            report.repaired = True
        return report


def as_json(value: Any) -> Any:
    """Dataclasses and entries as plain JSON values."""
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        out = asdict(value)
        if isinstance(value, FsckReport):
            out["clean"] = value.clean
        return out
    return value


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def table(rows: Iterable[Iterable[object]], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(lines)
