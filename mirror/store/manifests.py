"""Manifests by digest, tag → digest records and cached tag lists, on disk with a memory copy.

The disk copy is a diskcache (SQLite) under meta/: each write is one transaction, so a record
is either whole or absent after a crash. Manifests are written only after their bytes were
hashed to their digest. The hot tier (store/hot.py) keeps a copy that answers the hot path
without an executor hop; it is a copy, never the only one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import diskcache

from mirror.store.hot import HotTier
from mirror.store.layout import Layout


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


TagKey = tuple[str, str, str]


class ManifestStore:
    """Manifests, tag records and list answers. Async methods may touch the disk (executor);
    `*_cached` methods answer from memory only, for the hot path."""

    def __init__(self, layout: Layout, executor: ThreadPoolExecutor, hot: HotTier) -> None:
        self._disk = diskcache.Cache(str(layout.meta), eviction_policy="none", size_limit=2**62)
        self._executor = executor
        self._hot = hot

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._disk.close()

    def manifest_cached(self, digest: str) -> StoredManifest | None:
        found: StoredManifest | None = self._hot.get(("m", digest))
        return found

    async def manifest(self, digest: str) -> StoredManifest | None:
        found = self.manifest_cached(digest)
        if found is None:
            raw = await self._run(self._disk.get, ("m", digest))
            if raw is not None:
                found = StoredManifest(digest, raw[0], raw[1])
                self._hot.put(("m", digest), found, len(found.data))
        return found

    async def put_manifest(self, manifest: StoredManifest) -> None:
        """Keep a manifest whose bytes the caller has verified against its digest."""
        await self._run(
            self._disk.set, ("m", manifest.digest), (manifest.media_type, manifest.data)
        )
        self._hot.put(("m", manifest.digest), manifest, len(manifest.data))

    def tag_cached(self, key: TagKey) -> TagRecord | None:
        found: TagRecord | None = self._hot.get(("t", *key))
        return found

    async def tag(self, key: TagKey) -> TagRecord | None:
        found = self.tag_cached(key)
        if found is None:
            raw = await self._run(self._disk.get, ("t", *key))
            if raw is not None:
                found = TagRecord(*raw)
                self._hot.put(("t", *key), found)
        return found

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        self._hot.put(("t", *key), record)
        await self._run(
            self._disk.set, ("t", *key), (record.digest, record.media_type, record.checked)
        )

    async def drop_tag(self, key: TagKey) -> None:
        """Forget a tag upstream says is gone; its manifest and blobs stay."""
        self._hot.drop(("t", *key))
        await self._run(self._disk.delete, ("t", *key))

    async def listing(self, key: tuple[str, ...]) -> CachedList | None:
        raw = await self._run(self._disk.get, ("l", *key))
        return CachedList(*raw) if raw is not None else None

    async def put_listing(self, key: tuple[str, ...], value: CachedList) -> None:
        await self._run(
            self._disk.set, ("l", *key), (value.body, value.content_type, value.link, value.stored)
        )

    # -- blocking reads for background work (pins, catalog, export): run them in an executor --

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Every tag record on disk."""
        for key in self._disk.iterkeys():
            if isinstance(key, tuple) and len(key) == 4 and key[0] == "t":
                raw = self._disk.get(key)
                if raw is not None:
                    yield (key[1], key[2], key[3]), TagRecord(*raw)

    def load_manifest(self, digest: str) -> StoredManifest | None:
        raw = self._disk.get(("m", digest))
        return StoredManifest(digest, raw[0], raw[1]) if raw is not None else None
