"""Which repository holds which content, so that access control holds by digest too.

Blobs and manifests are kept once, whichever repository (or upstream) brought them. With
`[auth]` on, that must not let a client granted one repository read another's content by
naming its digest, nor learn by a HEAD whether another's content is cached. So a cached digest
is served under (upstream, repository) only when that pair is known to hold it:

- a fill or a manifest fetched from upstream for that pair,
- a manifest that pair serves (its config, layers and child manifests: a registry keeps what
  a repository's manifests reference in that repository),
- or upstream, asked with a HEAD (free on Docker Hub), confirms it.

What is known is kept in the index (`holds`, SQLite) and remembered in memory, so a pair is
confirmed once. A digest the pair does not hold gets exactly the answer of one that is not
cached: upstream's. Without `[auth]` everyone may pull everything anyway, and none of this runs.
"""

from __future__ import annotations

from collections.abc import Iterable

from mirror.bounded import Bounded
from mirror.oci import mediatypes
from mirror.oci.manifest import references
from mirror.oci.reference import Digest
from mirror.store.index import BlobIndex
from mirror.store.manifests import StoredManifest
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Target

#: (upstream, repository, digest) holdings remembered in memory (then forgotten all at once;
#: the index still has them).
REMEMBERED = 65_536


class Holdings:
    def __init__(self, enabled: bool, index: BlobIndex, upstream: UpstreamClient) -> None:
        #: Whether holdings are checked at all (`[auth]` is on).
        self.enabled = enabled
        self._index = index
        self._upstream = upstream
        self._known: Bounded[tuple[str, str, Digest], bool] = Bounded(REMEMBERED)

    async def record(self, target: Target, digests: Iterable[Digest]) -> None:
        """`target`'s repository holds these (upstream said so)."""
        if not self.enabled:
            return
        up, repo = target.upstream.name, target.repo
        new = [d for d in dict.fromkeys(digests) if (up, repo, d) not in self._known]
        if new:
            await self._index.call(self._index.hold, up, repo, new)
            for digest in new:
                self._known.remember((up, repo, digest), True)

    async def check(self, target: Target, digest: Digest, kind: str) -> bool:
        """Return if `target`'s repository holds this cached `kind` ("blob" or "manifest");
        otherwise ask upstream with a HEAD, which raises what a miss would have raised (404
        BLOB_UNKNOWN / MANIFEST_UNKNOWN, or the upstream's failure) when it does not. True
        when this call learnt the holding (it was not remembered in memory)."""
        if not self.enabled:
            return False
        key = (target.upstream.name, target.repo, digest)
        if key in self._known:
            return False
        if await self._index.call(self._index.holds, *key):
            self._known.remember(key, True)
            return True
        if kind == "blob":
            await self._upstream.blob_size(target, digest)
        else:
            accept = mediatypes.UPSTREAM_ACCEPT
            await self._upstream.manifest(target, str(digest), accept, method="HEAD")
        await self.record(target, [digest])
        return True

    async def manifest(self, target: Target, manifest: StoredManifest, fetched: bool) -> None:
        """`target` serves `manifest`: held (checked, unless it was just `fetched` from
        upstream for it), and so is what it references."""
        if not self.enabled:
            return
        learnt = fetched or await self.check(target, manifest.digest, "manifest")
        if learnt:
            refs = references(manifest.data)
            await self.record(target, [manifest.digest, *refs.blobs, *refs.manifests])
