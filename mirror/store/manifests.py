"""Manifests by digest, tag → digest records and cached tag lists, on disk with a memory copy.

The disk copy is a diskcache (SQLite) under meta/: each write is one transaction, so a record
is either whole or absent after a crash. Manifests are written only after their bytes were
hashed to their digest. The memory copy answers the hot path without an executor hop; it is a
copy, never the only one, bounded here by bytes (manifests) and entries (tags), oldest insert
out first; the hot tier's budgets and LRU replace these bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import diskcache

from mirror.store.layout import Layout

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Bounds of the memory copy (the hot tier's budgets and LRU will replace these).
MEMORY_MANIFEST_BYTES = 32 * 1024 * 1024
MEMORY_TAGS = 100_000


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: str
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What `tag` pointed at when upstream last confirmed it, and when (wall-clock seconds)."""

    digest: str
    media_type: str
    checked: float


@dataclass(frozen=True, slots=True)
class CachedList:
    """A cached tags/list or referrers answer."""

    body: bytes
    content_type: str
    link: str | None
    stored: float


class _Memory(Generic[K, V]):
    """A dict bounded by a total cost (entries, or bytes), dropping the oldest insert first."""

    def __init__(self, budget: int, cost: Callable[[V], int] = lambda _: 1) -> None:
        self._data: dict[K, V] = {}
        self._budget = budget
        self._cost = cost
        self._used = 0

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        self.drop(key)
        self._data[key] = value
        self._used += self._cost(value)
        while self._used > self._budget and len(self._data) > 1:
            self.drop(next(iter(self._data)))

    def drop(self, key: K) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._used -= self._cost(old)


TagKey = tuple[str, str, str]


class ManifestStore:
    """Manifests, tag records and list answers. Async methods may touch the disk (executor);
    `*_cached` methods answer from memory only, for the hot path."""

    def __init__(self, layout: Layout, executor: ThreadPoolExecutor) -> None:
        self._disk = diskcache.Cache(str(layout.meta), eviction_policy="none", size_limit=2**62)
        self._executor = executor
        self._manifests: _Memory[str, StoredManifest] = _Memory(MEMORY_MANIFEST_BYTES, lambda m: len(m.data))
        self._tags: _Memory[TagKey, TagRecord] = _Memory(MEMORY_TAGS)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._disk.close()

    def manifest_cached(self, digest: str) -> StoredManifest | None:
        return self._manifests.get(digest)

    async def manifest(self, digest: str) -> StoredManifest | None:
        found = self._manifests.get(digest)
        if found is None:
            raw = await self._run(self._disk.get, ("m", digest))
            if raw is not None:
                found = StoredManifest(digest, raw[0], raw[1])
                self._manifests.put(digest, found)
        return found

    async def put_manifest(self, manifest: StoredManifest) -> None:
        """Keep a manifest whose bytes the caller has verified against its digest."""
        await self._run(self._disk.set, ("m", manifest.digest), (manifest.media_type, manifest.data))
        self._manifests.put(manifest.digest, manifest)

    def tag_cached(self, key: TagKey) -> TagRecord | None:
        return self._tags.get(key)

    async def tag(self, key: TagKey) -> TagRecord | None:
        found = self._tags.get(key)
        if found is None:
            raw = await self._run(self._disk.get, ("t", *key))
            if raw is not None:
                found = TagRecord(*raw)
                self._tags.put(key, found)
        return found

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        self._tags.put(key, record)
        await self._run(self._disk.set, ("t", *key), (record.digest, record.media_type, record.checked))

    async def drop_tag(self, key: TagKey) -> None:
        """Forget a tag upstream says is gone; its manifest and blobs stay."""
        self._tags.drop(key)
        await self._run(self._disk.delete, ("t", *key))

    async def listing(self, key: tuple[str, ...]) -> CachedList | None:
        raw = await self._run(self._disk.get, ("l", *key))
        return CachedList(*raw) if raw is not None else None

    async def put_listing(self, key: tuple[str, ...], value: CachedList) -> None:
        await self._run(self._disk.set, ("l", *key),
                        (value.body, value.content_type, value.link, value.stored))
