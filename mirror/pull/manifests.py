"""Manifests and lists through the cache.

By digest: memory → disk → one coalesced upstream GET, kept only if its bytes hash to the
digest. By tag: a record tag → digest is trusted for the upstream's `tag_ttl`; then one
coalesced HEAD revalidates it (HEAD does not count toward Docker Hub's pull limit) and the
manifest is fetched again only when the digest moved. If upstream is down, slow, 5xx or 429,
the cached answer is served stale; a 404 on revalidation drops the tag record (never blobs)
and is passed on. Lists (tags/list, referrers) are passed through with a short cache and
served stale when upstream fails.

"Coalesced" means one caller asks upstream while the others wait for its answer: the
coordinator's `once`, so that worker processes and replicas share it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from mirror import errors
from mirror.bounded import Bounded
from mirror.coordination import Coordinator
from mirror.events import Events
from mirror.metrics import Metrics
from mirror.oci import mediatypes
from mirror.oci.manifest import manifest_type
from mirror.oci.mediatypes import AcceptSet
from mirror.oci.reference import Digest, Reference
from mirror.oci.verify import digest_of
from mirror.outcome import Outcome
from mirror.pull.answers import ManifestAnswer
from mirror.pull.holdings import Holdings
from mirror.store.index import Accesses
from mirror.store.keys import AnyTagKey, ListKey, TagKey, VariantKey
from mirror.store.manifests import CachedList, ManifestStore, StoredManifest
from mirror.store.tags import TagRecord
from mirror.upstream.client import UpstreamClient, UpstreamManifest
from mirror.upstream.routing import Target

log = logging.getLogger("mirror.pull")


def _accept(key: AnyTagKey) -> str:
    """What upstream is asked with for this record: every type, or the client's own."""
    return key.accept if isinstance(key, VariantKey) else mediatypes.UPSTREAM_ACCEPT


#: Answers "no such manifest" remembered at once (then forgotten all at once): keys are the
#: client's to choose.
MISSING_REMEMBERED = 10_000
#: Upstream failures that a cached answer may stand in for.
STALE_OK = (errors.UpstreamError, errors.TooManyRequests)


class Manifests:
    """Answers manifest and list reads from the cache, going upstream only when it must."""

    def __init__(
        self,
        upstream: UpstreamClient,
        manifests: ManifestStore,
        coordinator: Coordinator,
        accesses: Accesses,
        metrics: Metrics,
        holdings: Holdings,
        events: Events,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._holdings = holdings
        self._events = events
        self._upstream = upstream
        self._manifests = manifests
        self._tags = coordinator.tags
        self._coordinator = coordinator
        self._accesses = accesses
        self._metrics = metrics
        self._clock = clock
        #: Manifests upstream said it does not have, until when that answer stands.
        self._missing: Bounded[tuple[str, str, str], float] = Bounded(MISSING_REMEMBERED)

    async def get(self, target: Target, ref: Reference, accept: AcceptSet) -> ManifestAnswer:
        """The manifest for a tag or digest, of a media type the client accepts."""
        if ref.tag is not None and await self._excluded(target, ref.tag, accept):
            answer = await self._by_tag_for(target, ref.tag, accept)
        else:
            answer = await self._known(target, ref)
            if ref.tag is not None and not accept.allows(answer.manifest.media_type):
                answer = await self._by_tag_for(target, ref.tag, accept)
        if not accept.allows(answer.manifest.media_type):
            raise errors.ManifestUnknown(
                f"manifest is a {answer.manifest.media_type}, which the Accept header excludes",
                detail={"mediaType": answer.manifest.media_type},
            )
        return answer

    async def _excluded(self, target: Target, tag: str, accept: AcceptSet) -> bool:
        """Whether the tag's own record is of a type this client's Accept excludes: then its
        own view is all it needs (the tag's record is not revalidated for it)."""
        record = await self._tags.get(TagKey(target.upstream.name, target.repo, tag))
        return record is not None and not accept.allows(record.media_type)

    async def _known(self, target: Target, ref: Reference) -> ManifestAnswer:
        """By digest or by tag; a 404 from upstream is remembered for the upstream's
        `negative_ttl` and answered again without asking (signature checkers ask for
        `sha256-<hex>.sig` tags and referrers fallback tags on every pull, most of which do
        not exist)."""
        key = (target.upstream.name, target.repo, str(ref))
        until = self._missing.get(key)
        if until is not None and until > self._clock():
            raise errors.ManifestUnknown(detail={"name": target.name, "reference": str(ref)})
        try:
            if ref.digest is not None:
                return await self.by_digest(target, ref.digest)
            assert ref.tag is not None
            return await self._by_tag(target, ref.tag)
        except errors.ManifestUnknown:
            if target.upstream.negative_ttl:
                self._missing.remember(key, self._clock() + target.upstream.negative_ttl)
            raise

    def hot(self, target: Target, tag: str) -> StoredManifest | None:
        """The fast path: a fresh tag record and its manifest, both in memory, no await."""
        key = TagKey(target.upstream.name, target.repo, tag)
        record = self._tags.cached(key)
        if record is None or self._clock() - record.checked >= target.upstream.tag_ttl:
            return None
        found = self._manifests.cached(record.digest)
        if found is not None:
            self._accesses.tag_pulled(key)
        return found

    def hot_digest(self, digest: Digest) -> StoredManifest | None:
        """The fast path by digest: the manifest in memory, no await; None when it is not
        there or a holdings check is due (which `get` makes)."""
        return None if self._holdings.enabled else self._manifests.cached(digest)

    async def by_digest(self, target: Target, digest: Digest) -> ManifestAnswer:
        found = await self._manifests.get(digest)
        if found is not None:
            if self._holdings.enabled:
                await self._holdings.manifest(target, found, fetched=False)
            return ManifestAnswer(found, Outcome.HIT)
        key = ("digest", target.upstream.name, target.repo, digest)
        answer, followed = await self._coordinator.once(
            key, lambda: self._fetch_digest(target, digest)
        )
        return ManifestAnswer(answer.manifest, Outcome.COALESCED) if followed else answer

    async def _fetch_digest(self, target: Target, digest: Digest) -> ManifestAnswer:
        stored = await self._manifests.get(digest)  # fetched by another process meanwhile
        if stored is not None:
            return ManifestAnswer(stored, Outcome.COALESCED)
        got = await self._upstream.manifest(target, str(digest), mediatypes.UPSTREAM_ACCEPT)
        return ManifestAnswer(await self._keep(target, got, digest), Outcome.MISS)

    async def _by_tag(self, target: Target, tag: str, accept: str = "") -> ManifestAnswer:
        """A tag's manifest, from its record while fresh; `accept` (a client's own, narrower
        than what the mirror asks for) keeps a record of that client's view of the tag."""
        up, repo = target.upstream.name, target.repo
        key = VariantKey(up, repo, tag, accept) if accept else TagKey(up, repo, tag)
        record = await self._tags.get(key)
        if record is not None and self._clock() - record.checked < target.upstream.tag_ttl:
            found = await self._manifests.get(record.digest)
            if found is not None:
                self._pulled(key)
                return ManifestAnswer(found, Outcome.HIT)
        answer, followed = await self._coordinator.once(key, lambda: self._refresh(target, key))
        self._pulled(key)  # only a tag that exists: a miss raised above
        return ManifestAnswer(answer.manifest, Outcome.COALESCED) if followed else answer

    def _pulled(self, key: AnyTagKey) -> None:
        if isinstance(key, TagKey):
            self._accesses.tag_pulled(key)

    async def _refresh(self, target: Target, key: AnyTagKey) -> ManifestAnswer:
        """Revalidate a held tag with HEAD, or fetch an unknown one with GET — unless another
        process of the host, or another replica of the cluster, did so while this one waited
        for its turn: the record it stored then stands (one HEAD per TTL per host, or per
        cluster), and a manifest this one does not hold yet is fetched by that digest."""
        record = await self._tags.confirmed(key)
        held = await self._manifests.get(record.digest) if record is not None else None
        fresh = record is not None and self._clock() - record.checked < target.upstream.tag_ttl
        if fresh and held is not None:
            return ManifestAnswer(held, Outcome.COALESCED)
        if fresh and record is not None:  # confirmed by another replica: only bytes are missing
            return await self._fetch_digest(target, record.digest)
        if record is None or held is None:
            return await self._fetch_tag(target, key)
        name = (key.upstream, key.repo, key.tag)
        if await self._upstream.conserving(target.upstream):
            budget = "pull budget of %s low: serving %s/%s:%s as cached, unrevalidated"
            log.info(budget, key.upstream, *name)
            return ManifestAnswer(held, Outcome.STALE)
        try:
            head = await self._upstream.manifest(
                target, key.tag, _accept(key), method="HEAD", retry=False
            )
        except STALE_OK as e:
            level = logging.DEBUG if isinstance(e, errors.Offline) else logging.WARNING
            extra = {"upstream": key.upstream, "code": e.code}
            log.log(level, "serving stale tag %s/%s:%s: %s", *name, e, extra=extra)
            return ManifestAnswer(held, Outcome.STALE)
        except errors.ManifestUnknown:
            await self._tags.drop(key)
            if isinstance(key, TagKey):
                self._accesses.tag_gone(key)
            raise
        if head.digest is None:
            fetched = await self._fetch_tag(target, key)
            if fetched.manifest.digest != record.digest:
                self._moved(key, record.digest, fetched.manifest.digest)
            return fetched
        if head.digest == record.digest:
            await self._tags.put(key, TagRecord(record.digest, record.media_type, self._clock()))
            return ManifestAnswer(held, Outcome.REVALIDATED)
        await self._holdings.record(target, [head.digest])  # upstream just said so
        moved = await self.by_digest(target, head.digest)
        await self._remember(key, moved.manifest)
        self._moved(key, record.digest, moved.manifest.digest)
        return ManifestAnswer(moved.manifest, Outcome.MISS)

    def _moved(self, key: AnyTagKey, old: Digest, new: Digest) -> None:
        self._events.tag_moved(
            upstream=key.upstream, repository=key.repo, tag=key.tag, old=old, new=new
        )

    async def _fetch_tag(self, target: Target, key: AnyTagKey) -> ManifestAnswer:
        got = await self._upstream.manifest(target, key.tag, _accept(key))
        manifest = await self._keep(target, got, None)
        await self._remember(key, manifest)
        return ManifestAnswer(manifest, Outcome.MISS)

    async def _by_tag_for(self, target: Target, tag: str, accept: AcceptSet) -> ManifestAnswer:
        """A client whose Accept excludes the cached type: upstream is asked with its own
        Accept (an old client may get a single-platform manifest instead of an index), and
        that answer gets a record of its own, revalidated and served stale like any tag's
        (not a Docker Hub pull for every such request)."""
        return await self._by_tag(target, tag, accept.header)

    async def _remember(self, key: AnyTagKey, manifest: StoredManifest) -> None:
        await self._tags.put(key, TagRecord(manifest.digest, manifest.media_type, self._clock()))

    async def _keep(
        self, target: Target, got: UpstreamManifest, expected: Digest | None
    ) -> StoredManifest:
        """Verify a manifest's bytes against the digest asked for (or upstream's header), check
        that they are a manifest (a tag answered without a digest header has nothing else to
        vouch for it), and store it; a mismatch is a lying upstream and nothing is kept."""
        claimed = expected or got.digest
        actual = digest_of(got.data, claimed.algorithm if claimed else "sha256")
        if claimed is not None and actual != claimed:
            self._metrics.mismatch("upstream")
            self._events.digest_mismatch(
                what="manifest",
                source="upstream",
                upstream=target.upstream.name,
                repository=target.repo,
                expected=claimed,
                actual=actual,
                detail="upstream manifest does not match its digest",
            )
            raise errors.DigestMismatch(
                "upstream manifest does not match its digest",
                detail={"expected": str(claimed), "actual": str(actual)},
            )
        if got.media_type in mediatypes.SCHEMA1_TYPES:
            raise errors.ManifestInvalid(
                "Docker schema 1 manifests are not served: their digest cannot be verified "
                "over their bytes; use a registry or tag that has a schema 2 or OCI manifest",
                detail={"mediaType": got.media_type},
            )
        kind = manifest_type(got.data, got.media_type)
        if kind is None:
            raise errors.UpstreamBadResponse(
                "upstream answered with something that is no manifest",
                detail={"Content-Type": got.media_type[:100]},
            )
        kept = await self._manifests.put(StoredManifest(actual, kind, got.data))
        await self._holdings.manifest(target, kept, fetched=True)
        return kept

    # -- lists -------------------------------------------------------------------------------

    async def listing(
        self, target: Target, suffix: str, query: Mapping[str, str]
    ) -> tuple[CachedList, Outcome]:
        """tags/list or referrers: fresh within list_ttl, else upstream, else stale."""
        asked = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
        key = ListKey(target.upstream.name, target.repo, suffix, asked)
        cached = await self._manifests.listing(key)
        if cached is not None and self._clock() - cached.stored < target.upstream.list_ttl:
            return cached, Outcome.HIT
        try:
            fresh, followed = await self._coordinator.once(
                key, lambda: self._fetch_listing(target, suffix, query, key)
            )
        except STALE_OK as e:
            if cached is None:
                raise
            log.warning("serving stale %s for %s: %s", suffix, target.repo, e)
            return cached, Outcome.STALE
        return fresh, Outcome.COALESCED if followed else Outcome.MISS

    async def _fetch_listing(
        self, target: Target, suffix: str, query: Mapping[str, str], key: ListKey
    ) -> CachedList:
        stored = await self._manifests.listing(key, shared=True)  # another process's, meanwhile
        if stored is not None and self._clock() - stored.stored < target.upstream.list_ttl:
            return stored
        not_found: errors.MirrorError = (
            errors.NameUnknown(detail={"name": target.name})
            if suffix == "tags/list"
            else errors.ManifestUnknown()
        )
        got = await self._upstream.raw(target, suffix, query, not_found)
        value = CachedList(got.body, got.content_type, got.link, self._clock(), got.filters)
        await self._manifests.put_listing(key, value)
        return value
