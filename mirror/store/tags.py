"""Tag records: what a tag pointed at when upstream last confirmed it, on disk (the diskcache
under meta/ that store/manifests.py shares) with a copy in the hot tier.

This is where a single mirror keeps its tag records; the coordination seam
(mirror/coordination) hands it to the service, so a cluster can keep them elsewhere.

On disk (as it always was): ("t", upstream, repo, tag) → (digest, media type, checked).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import diskcache

from mirror.oci.reference import Digest, parse_digest
from mirror.store.hot import HotTier
from mirror.store.keys import AnyTagKey, TagKey, VariantKey
from mirror.store.offload import offload


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed at when upstream last confirmed it, and when (wall-clock seconds)."""

    digest: Digest
    media_type: str
    checked: float


class TagStore:
    """Tag records. `cached` answers from memory only (the hot path); async methods may
    touch the disk; `all` is blocking, for background work."""

    def __init__(self, disk: diskcache.Cache, executor: Executor, hot: HotTier) -> None:
        self._disk = disk
        self._executor = executor
        self._hot = hot

    def cached(self, key: AnyTagKey) -> TagRecord | None:
        found: TagRecord | None = self._hot.get(key)
        return found

    async def get(self, key: AnyTagKey) -> TagRecord | None:
        found = self.cached(key)
        if found is None and isinstance(key, TagKey):
            raw = await offload(self._executor, self._disk.get, ("t", *key))
            if raw is not None:
                found = _record(raw)
                self._hot.put(key, found)
        return found

    async def confirmed(self, key: AnyTagKey) -> TagRecord | None:
        """The record on disk now (another worker process may have revalidated the tag since
        this one read it), put in memory again; a client's view (memory only) as it is."""
        if not isinstance(key, TagKey):
            return self.cached(key)
        raw = await offload(self._executor, self._disk.get, ("t", *key))
        if raw is None:
            self._hot.drop(key)
            return None
        found = _record(raw)
        self._hot.put(key, found)
        return found

    async def put(self, key: AnyTagKey, record: TagRecord) -> None:
        """Keep a record: a tag's in memory and on disk; a client Accept's view of a tag
        (VariantKey, whose keys clients choose) in memory only, under the hot budget."""
        self._hot.put(key, record, len(key.accept) if isinstance(key, VariantKey) else 0)
        if isinstance(key, TagKey):
            row = (str(record.digest), record.media_type, record.checked)
            await offload(self._executor, self._disk.set, ("t", *key), row)

    async def drop(self, key: AnyTagKey) -> None:
        """Forget a tag (upstream says it is gone, or retention let it go); its manifest and
        blobs stay."""
        self._hot.drop(key)
        if isinstance(key, TagKey):
            await offload(self._executor, self._disk.delete, ("t", *key))

    def all(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Blocking: every tag record on disk."""
        for key in self._disk.iterkeys():
            if isinstance(key, tuple) and len(key) == 4 and key[0] == "t":
                raw = self._disk.get(key)
                if raw is not None:
                    yield TagKey(key[1], key[2], key[3]), _record(raw)


def _record(raw: tuple[str, str, float]) -> TagRecord:
    return TagRecord(parse_digest(raw[0]), raw[1], raw[2])
