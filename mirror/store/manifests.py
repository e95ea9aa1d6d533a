"""Manifests by digest and cached list answers, on disk with a memory copy.

The disk copy is a diskcache (SQLite) under meta/, shared with the tag records
(store/tags.py): each write is one transaction, so an entry is either whole or absent after a
crash. Manifests are written only after their bytes were hashed to their digest. The hot tier
(store/hot.py) keeps a copy that answers the hot path without an executor hop; it is a copy,
never the only one.

On disk (kept as it always was, so a cache from an earlier version opens as it is):
    ("m", "<digest>")                 → (media type, bytes)
    ("l", upstream, repo, "tags/list", "")  → (body, content type, Link, stored): a whole
                                       tag list (pages and referrers stay in memory)
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import diskcache

from mirror.oci.reference import Digest
from mirror.store.hot import HotTier
from mirror.store.keys import ListKey, ManifestKey
from mirror.store.offload import offload


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class CachedList:
    """A cached tags/list or referrers answer."""

    body: bytes
    content_type: str
    link: str | None
    stored: float
    #: Referrers only: the filters upstream applied (OCI-Filters-Applied).
    filters: str | None = None


class ManifestStore:
    """Manifests and list answers. Async methods may touch the disk (executor); `cached`
    answers from memory only, for the hot path; `load` is blocking, for background work."""

    def __init__(self, disk: diskcache.Cache, executor: Executor, hot: HotTier) -> None:
        self._disk = disk
        self._executor = executor
        self._hot = hot

    def cached(self, digest: Digest) -> StoredManifest | None:
        found: StoredManifest | None = self._hot.get(ManifestKey(digest))
        return found

    async def get(self, digest: Digest) -> StoredManifest | None:
        found = self.cached(digest)
        if found is None:
            found = await offload(self._executor, self.load, digest)
            if found is not None:
                self._hot.put(ManifestKey(digest), found, len(found.data))
        return found

    async def put(self, manifest: StoredManifest) -> StoredManifest:
        """Keep a manifest whose bytes the caller has verified against its digest; the one
        kept first stays (a digest is one document, served as one type). Returns the kept one."""
        kept = await offload(self._executor, self._add, manifest)
        self._hot.put(ManifestKey(kept.digest), kept, len(kept.data))
        return kept

    def _add(self, manifest: StoredManifest) -> StoredManifest:
        key = ("m", str(manifest.digest))
        if self._disk.add(key, (manifest.media_type, manifest.data)):
            return manifest
        return self.load(manifest.digest) or manifest

    def load(self, digest: Digest) -> StoredManifest | None:
        """Blocking: the manifest from disk (pins, catalog, export run this in a thread)."""
        raw = self._disk.get(("m", str(digest)))
        return StoredManifest(digest, raw[0], raw[1]) if raw is not None else None

    async def listing(self, key: ListKey, shared: bool = False) -> CachedList | None:
        """A kept list answer; `shared`: as the disk has it now, past this process's copy in
        memory (another worker process may have fetched it since)."""
        found: CachedList | None = None if shared else self._hot.get(key)
        if found is None and key.durable:
            raw = await offload(self._executor, self._disk.get, _list_key(key))
            found = CachedList(*raw) if raw is not None else None
            if found is not None and shared:
                self._hot.put(key, found, len(found.body))
        return found or (self._hot.get(key) if shared else None)

    async def put_listing(self, key: ListKey, value: CachedList) -> None:
        """Keep a list answer: in memory, and on disk when `key.durable`."""
        self._hot.put(key, value, len(value.body))
        if key.durable:
            row = (value.body, value.content_type, value.link, value.stored)
            await offload(self._executor, self._disk.set, _list_key(key), row)


def _list_key(key: ListKey) -> tuple[str, ...]:
    return ("l", key.upstream, key.repo, key.suffix, key.query)
