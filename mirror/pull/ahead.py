"""Fetching what a manifest references before anyone asks: pull-ahead (`pull_ahead` per
upstream, in the background on every manifest answer) and the sync list's "everything an
image needs, every platform". Both go through the same single-flight fills as clients, so a
client asking meanwhile joins the fill rather than starting another."""

from __future__ import annotations

import asyncio

from mirror.bounded import Bounded
from mirror.oci.manifest import references
from mirror.oci.reference import Digest
from mirror.pull.blobs import Blobs
from mirror.pull.manifests import Manifests
from mirror.store.blobs import BlobStore
from mirror.store.manifests import StoredManifest
from mirror.upstream.routing import Target

#: Blob fills that pull-ahead runs at once (clients' own fills are not limited by it).
PULL_AHEAD_PARALLEL = 4
#: Manifests remembered as pulled ahead (then forgotten all at once).
PULL_AHEAD_REMEMBERED = 10_000


class Ahead:
    def __init__(self, manifests: Manifests, blobs: Blobs, store: BlobStore) -> None:
        self._manifests = manifests
        self._blobs = blobs
        self._store = store
        self._done: Bounded[Digest, bool] = Bounded(PULL_AHEAD_REMEMBERED)
        self._background: set[asyncio.Future[None]] = set()
        self._gate = asyncio.Semaphore(PULL_AHEAD_PARALLEL)

    def after(self, target: Target, manifest: StoredManifest) -> None:
        """A manifest was answered: for `pull_ahead` upstreams, fetch what it references in
        the background. Cheap to call on every manifest answer."""
        if not target.upstream.pull_ahead or manifest.digest in self._done:
            return
        self._done.remember(manifest.digest, True)
        digests = references(manifest.data).blobs
        if digests:
            self._background.add(task := asyncio.ensure_future(self._pull(target, digests)))
            task.add_done_callback(self._background.discard)

    async def fetch_all(self, target: Target, manifest: StoredManifest) -> None:
        """Everything a manifest needs, cached: an index's manifests (every platform) and each
        one's config and layers."""
        refs = references(manifest.data)
        await self._pull(target, refs.blobs)
        for child in refs.manifests:
            answer = await self._manifests.by_digest(target, child)
            await self.fetch_all(target, answer.manifest)

    async def _pull(self, target: Target, digests: tuple[Digest, ...]) -> None:
        for digest in digests:
            if await self._store.run(self._store.exists, digest):
                continue
            async with self._gate:
                await asyncio.wait([self._blobs.want(target, digest).task])
