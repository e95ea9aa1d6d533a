"""The pull-through policy: the only module that sees both the upstream and the store.

Manifests
    by digest: memory → disk → one coalesced upstream GET, kept only if its bytes hash to
    the digest. By tag: a record tag → digest is trusted for the upstream's `tag_ttl`; then
    one coalesced HEAD revalidates it (HEAD does not count toward Docker Hub's pull limit)
    and the manifest is fetched again only when the digest moved. If upstream is down, slow,
    5xx or 429, the cached answer is served stale; a 404 on revalidation drops the tag record
    (never blobs) and is passed on.
Blobs
    a committed file is served as is; otherwise ONE detached fill per digest
    (`coalesce.Flights` + `fill.Fill`) that every requester follows from byte 0.
Lists (tags/list, referrers)
    passed through with a short cache, served stale when upstream fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from mirror import errors
from mirror.coalesce import Flights
from mirror.fill import BlobBody, BlobSource, Fill
from mirror.metrics import Metrics
from mirror.oci import mediatypes
from mirror.oci.manifest import references
from mirror.oci.mediatypes import AcceptSet
from mirror.oci.reference import Digest, Reference, parse_digest
from mirror.oci.verify import Verifier, digest_of, verified
from mirror.store.blobs import OpenBlob
from mirror.store.manifests import (
    CachedList,
    ManifestStore,
    StoredManifest,
    TagKey,
    TagRecord,
)
from mirror.store.tiers import Tiers
from mirror.upstream.client import UpstreamClient, UpstreamManifest
from mirror.upstream.routing import Target

log = logging.getLogger("mirror.service")

#: Upstream failures that a cached answer may stand in for.
STALE_OK = (errors.UpstreamError, errors.TooManyRequests)
#: Blob fills that pull-ahead runs at once (clients' own fills are not limited by it).
PULL_AHEAD_PARALLEL = 4
#: Manifests remembered as pulled ahead (then forgotten all at once).
PULL_AHEAD_REMEMBERED = 10_000
#: Blobs remembered as too big for the disk (then forgotten all at once).
TOO_BIG_REMEMBERED = 1000


class Outcome(StrEnum):
    """How a request was answered; reported in the X-Mirror-Cache header, logs and metrics."""

    HIT = "hit"
    MISS = "miss"
    COALESCED = "coalesced"
    REVALIDATED = "revalidated"
    STALE = "stale"
    PASS_THROUGH = "pass-through"


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: StoredManifest
    outcome: Outcome


@dataclass(slots=True)
class BlobAnswer:
    """Either an open committed blob (and the tier it came from) or a fill to follow."""

    outcome: Outcome
    stored: OpenBlob | None = None
    fill: Fill | None = None
    tier: str = "upstream"


@dataclass(frozen=True, slots=True)
class _Verified:
    size: int | None
    _chunks: AsyncIterator[bytes]

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks


class MirrorService:
    """Answers registry reads from the cache, going upstream only on a miss."""

    def __init__(
        self,
        upstream: UpstreamClient,
        tiers: Tiers,
        manifests: ManifestStore,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        max_fills: int = 0,
    ) -> None:
        self._max_fills = max_fills
        self._upstream = upstream
        self._metrics = metrics or Metrics()
        self._tiers = tiers
        self._blobs = tiers.blobs
        self._manifests = manifests
        self._clock = clock
        self._fills: Flights[str, Fill, None] = Flights()
        self._manifest_flights: Flights[tuple[str, ...], None, ManifestAnswer] = Flights()
        self._list_flights: Flights[tuple[str, ...], None, CachedList] = Flights()
        tiers.in_flight = self._fills.keys
        self._pulled_ahead: set[str] = set()
        self._background: set[asyncio.Future[None]] = set()
        self._pull_ahead_gate = asyncio.Semaphore(PULL_AHEAD_PARALLEL)
        self._too_big: dict[str, int] = {}

    # -- manifests ---------------------------------------------------------------------------

    async def manifest(self, target: Target, ref: Reference, accept: AcceptSet) -> ManifestAnswer:
        """The manifest for a tag or digest, of a media type the client accepts."""
        if ref.digest is not None:
            answer = await self._by_digest(target, ref.digest)
        else:
            assert ref.tag is not None
            answer = await self._by_tag(target, ref.tag)
            if not accept.allows(answer.manifest.media_type):
                answer = await self._by_tag_for(target, ref.tag, accept)
        if not accept.allows(answer.manifest.media_type):
            raise errors.ManifestUnknown(
                f"manifest is a {answer.manifest.media_type}, which the Accept header excludes",
                detail={"mediaType": answer.manifest.media_type},
            )
        self.pull_ahead(target, answer.manifest)
        return answer

    def manifest_hot(self, target: Target, tag: str) -> StoredManifest | None:
        """The fast path: a fresh tag record and its manifest, both in memory, no await."""
        key = (target.upstream.name, target.repo, tag)
        record = self._manifests.tag_cached(key)
        if record is None or self._clock() - record.checked >= target.upstream.tag_ttl:
            return None
        found = self._manifests.manifest_cached(record.digest)
        if found is not None:
            self._tiers.accesses.tag_pulled(key)
        return found

    async def _by_digest(self, target: Target, digest: Digest) -> ManifestAnswer:
        found = await self._manifests.manifest(str(digest))
        if found is not None:
            return ManifestAnswer(found, Outcome.HIT)
        key = ("digest", target.upstream.name, str(digest))
        answer, followed = await self._manifest_flights.run(
            key, lambda: self._fetch_digest(target, digest)
        )
        return ManifestAnswer(answer.manifest, Outcome.COALESCED) if followed else answer

    async def _fetch_digest(self, target: Target, digest: Digest) -> ManifestAnswer:
        got = await self._upstream.manifest(target, str(digest), mediatypes.UPSTREAM_ACCEPT)
        return ManifestAnswer(await self._keep(got, digest), Outcome.MISS)

    async def _by_tag(self, target: Target, tag: str) -> ManifestAnswer:
        key: TagKey = (target.upstream.name, target.repo, tag)
        self._tiers.accesses.tag_pulled(key)
        record = await self._manifests.tag(key)
        if record is not None and self._clock() - record.checked < target.upstream.tag_ttl:
            found = await self._manifests.manifest(record.digest)
            if found is not None:
                return ManifestAnswer(found, Outcome.HIT)
        answer, followed = await self._manifest_flights.run(
            ("tag", *key), lambda: self._refresh(target, key, record)
        )
        return ManifestAnswer(answer.manifest, Outcome.COALESCED) if followed else answer

    async def _refresh(
        self, target: Target, key: TagKey, record: TagRecord | None
    ) -> ManifestAnswer:
        """Revalidate a held tag with HEAD, or fetch an unknown one with GET."""
        held = await self._manifests.manifest(record.digest) if record is not None else None
        if record is None or held is None:
            return await self._fetch_tag(target, key)
        if self._upstream.conserving(target.upstream):
            log.info("pull budget of %s low: serving %s/%s:%s as cached, unrevalidated", *key, *key)
            return ManifestAnswer(held, Outcome.STALE)
        try:
            head = await self._upstream.manifest(
                target, key[2], mediatypes.UPSTREAM_ACCEPT, method="HEAD", retry=False
            )
        except STALE_OK as e:
            log.log(
                logging.DEBUG if isinstance(e, errors.Offline) else logging.WARNING,
                "serving stale tag %s/%s:%s: %s",
                *key,
                e.message,
                extra={"upstream": key[0], "code": e.code},
            )
            return ManifestAnswer(held, Outcome.STALE)
        except errors.ManifestUnknown:
            await self._manifests.drop_tag(key)
            raise
        if head.digest is None:
            return await self._fetch_tag(target, key)
        if head.digest == record.digest:
            await self._manifests.put_tag(
                key, TagRecord(record.digest, record.media_type, self._clock())
            )
            return ManifestAnswer(held, Outcome.REVALIDATED)
        moved = await self._by_digest(target, parse_digest(head.digest))
        await self._remember(key, moved.manifest)
        return ManifestAnswer(moved.manifest, Outcome.MISS)

    async def _fetch_tag(self, target: Target, key: TagKey) -> ManifestAnswer:
        got = await self._upstream.manifest(target, key[2], mediatypes.UPSTREAM_ACCEPT)
        manifest = await self._keep(got, None)
        await self._remember(key, manifest)
        return ManifestAnswer(manifest, Outcome.MISS)

    async def _by_tag_for(self, target: Target, tag: str, accept: AcceptSet) -> ManifestAnswer:
        """A client whose Accept excludes the cached type: ask upstream with its own Accept
        (an old client may get a single-platform manifest instead of an index)."""
        key = ("accept", target.upstream.name, target.repo, tag, accept.header)

        async def fetch() -> ManifestAnswer:
            got = await self._upstream.manifest(target, tag, accept.header)
            return ManifestAnswer(await self._keep(got, None), Outcome.MISS)

        answer, _ = await self._manifest_flights.run(key, fetch)
        return answer

    async def _remember(self, key: TagKey, manifest: StoredManifest) -> None:
        await self._manifests.put_tag(
            key, TagRecord(manifest.digest, manifest.media_type, self._clock())
        )

    async def _keep(self, got: UpstreamManifest, expected: Digest | None) -> StoredManifest:
        """Verify a manifest's bytes against the digest asked for (or upstream's header) and
        store it; a mismatch is a lying upstream and nothing is kept."""
        claimed = expected or (parse_digest(got.digest) if got.digest else None)
        actual = digest_of(got.data, claimed.algorithm if claimed else "sha256")
        if claimed is not None and actual != claimed:
            self._metrics.digest_mismatches.labels("upstream").inc()
            raise errors.UpstreamBadResponse(
                "upstream manifest does not match its digest",
                detail={"expected": str(claimed), "actual": str(actual)},
            )
        if not got.media_type:
            raise errors.UpstreamBadResponse("upstream manifest has no Content-Type")
        manifest = StoredManifest(str(actual), got.media_type, got.data)
        await self._manifests.put_manifest(manifest)
        return manifest

    def pull_ahead(self, target: Target, manifest: StoredManifest) -> None:
        """`pull_ahead` upstreams: fetch what this manifest references in the background,
        through the same single-flight fills as clients (so a client asking meanwhile joins
        the fill rather than starting another). Cheap to call on every manifest answer."""
        if not target.upstream.pull_ahead or manifest.digest in self._pulled_ahead:
            return
        if len(self._pulled_ahead) >= PULL_AHEAD_REMEMBERED:
            self._pulled_ahead.clear()
        self._pulled_ahead.add(manifest.digest)
        digests = references(manifest.data).blobs
        if digests:
            self._background.add(task := asyncio.ensure_future(self._pull(target, digests)))
            task.add_done_callback(self._background.discard)

    async def fetch_all(self, target: Target, manifest: StoredManifest) -> None:
        """Everything a manifest needs, cached: an index's manifests (every platform) and each
        one's config and layers, through the shared fills (for the sync list)."""
        refs = references(manifest.data)
        await self._pull(target, refs.blobs)
        for child in refs.manifests:
            answer = await self._by_digest(target, parse_digest(child))
            await self.fetch_all(target, answer.manifest)

    async def _pull(self, target: Target, digests: tuple[str, ...]) -> None:
        for text in digests:
            digest = parse_digest(text)
            if await self._blobs.run(self._blobs.exists, digest):
                continue
            async with self._pull_ahead_gate:
                _, task, _ = self._join_fill(target, digest)
                await asyncio.wait([task])

    # -- blobs -------------------------------------------------------------------------------

    async def blob(self, target: Target, digest: Digest) -> BlobAnswer:
        """An open cached blob (hot or warm), or the (possibly just started) fill that will
        bring it from cold or upstream."""
        found = await self._tiers.open(digest)
        if found is not None:
            return BlobAnswer(Outcome.HIT, stored=found.blob, tier=found.tier)
        if await self._still_too_big(str(digest)):
            return BlobAnswer(Outcome.PASS_THROUGH)
        if (
            self._max_fills
            and len(self._fills) >= self._max_fills
            and str(digest) not in self._fills
        ):
            raise errors.TooManyRequests(
                "the mirror is at its limit of concurrent fills", retry_after="1"
            )
        fill, task, started = self._join_fill(target, digest)
        if fill.error is not None:  # failed, still winding down (removing its partial file):
            await asyncio.wait([task])  # a new request gets a new try, not the old error
            fill, _, started = self._join_fill(target, digest)
        return BlobAnswer(Outcome.MISS if started else Outcome.COALESCED, fill=fill)

    def _join_fill(self, target: Target, digest: Digest) -> tuple[Fill, asyncio.Task[None], bool]:
        """The fill of `digest` in flight, or a new one; the bool says whether this started it."""
        return self._fills.join(
            str(digest), lambda: Fill(digest), lambda f: self._fill(f, target, digest)
        )

    async def _fill(self, fill: Fill, target: Target, digest: Digest) -> None:
        started = time.monotonic()
        committed = await fill.run(
            self._blobs,
            self._source(fill, target, digest),
            self._tiers.make_room,
            target.upstream.max_blob_bytes,
        )
        self._metrics.fill_done(
            fill.source, fill.error is None, time.monotonic() - started, fill.followers
        )
        if isinstance(fill.error, errors.UpstreamBadResponse):
            self._metrics.digest_mismatches.labels(fill.source).inc()
        if committed:
            await self._tiers.committed(digest, fill.written)
        elif fill.source == "cold" and isinstance(fill.error, errors.UpstreamBadResponse):
            await self._tiers.drop_cold(digest)
        elif isinstance(fill.error, errors.DiskFull) and fill.size is not None:
            if len(self._too_big) >= TOO_BIG_REMEMBERED:
                self._too_big.clear()
            self._too_big[str(digest)] = fill.size

    async def _still_too_big(self, digest: str) -> bool:
        """A blob that found no room lately goes straight through while there is still none
        (a free-space check), instead of a fill that would open upstream only to give up."""
        size = self._too_big.get(digest)
        if size is None:
            return False
        if await self._tiers.room() >= size:
            del self._too_big[digest]
            return False
        return True

    def _source(self, fill: Fill, target: Target, digest: Digest) -> BlobSource:
        """Cold first (a promotion, verified like any fill; a cold copy that fails the check
        is dropped, so the next request goes upstream), else upstream."""

        @contextlib.asynccontextmanager
        async def source() -> AsyncIterator[BlobBody]:
            async with self._tiers.from_cold(digest) as cold:
                if cold is not None:
                    log.info("promoting %s from cold", digest)
                    fill.source = "cold"
                    yield cold
                    return
            async with self._upstream.blob(target, str(digest)) as stream:
                yield stream

        return source

    @contextlib.asynccontextmanager
    async def pass_through(self, target: Target, digest: Digest) -> AsyncIterator[BlobBody]:
        """The disk cannot take this blob: stream it from upstream to one client, verified
        (the last bytes are held until the digest checks out) and kept nowhere."""
        log.warning(
            "the store cannot keep %s (disk full or read-only): streaming it through", digest
        )
        async with self._upstream.blob(target, str(digest)) as stream:
            yield _Verified(stream.size, verified(stream.chunks(), Verifier(digest, stream.size)))

    async def blob_size(self, target: Target, digest: Digest) -> tuple[int | None, Outcome]:
        """A blob's size for HEAD, without fetching it."""
        found = await self._tiers.open(digest)
        if found is not None:
            found.blob.close()
            return found.blob.size, Outcome.HIT
        return await self._upstream.blob_size(target, str(digest)), Outcome.MISS

    async def drain(self, seconds: float) -> None:
        """At shutdown: let fills in flight finish (each is one upstream transfer already
        paid for), for at most `seconds`."""
        tasks = self._fills.tasks()
        if tasks:
            log.info("waiting up to %.0fs for %d fills in flight", seconds, len(tasks))
            await asyncio.wait(tasks, timeout=seconds)

    def fills_in_flight(self) -> int:
        return len(self._fills)

    # -- lists -------------------------------------------------------------------------------

    async def listing(
        self, target: Target, suffix: str, query: Mapping[str, str]
    ) -> tuple[CachedList, Outcome]:
        """tags/list or referrers: fresh within list_ttl, else upstream, else stale."""
        key = (
            target.upstream.name,
            target.repo,
            suffix,
            "&".join(f"{k}={v}" for k, v in sorted(query.items())),
        )
        cached = await self._manifests.listing(key)
        if cached is not None and self._clock() - cached.stored < target.upstream.list_ttl:
            return cached, Outcome.HIT
        try:
            fresh, followed = await self._list_flights.run(
                key, lambda: self._fetch_listing(target, suffix, query, key)
            )
        except STALE_OK as e:
            if cached is None:
                raise
            log.warning("serving stale %s for %s: %s", suffix, target.repo, e.message)
            return cached, Outcome.STALE
        return fresh, Outcome.COALESCED if followed else Outcome.MISS

    async def _fetch_listing(
        self, target: Target, suffix: str, query: Mapping[str, str], key: tuple[str, ...]
    ) -> CachedList:
        not_found: errors.MirrorError = (
            errors.NameUnknown(detail={"name": target.name})
            if suffix == "tags/list"
            else errors.ManifestUnknown()
        )
        got = await self._upstream.raw(target, suffix, query, not_found)
        value = CachedList(got.body, got.content_type, got.link, self._clock())
        await self._manifests.put_listing(key, value)
        return value
