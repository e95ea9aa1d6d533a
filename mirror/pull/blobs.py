"""Blobs through the cache: a committed file is served as it is; otherwise ONE detached
fill per digest (the coordinator's `fill` + `fill.Fill`) that every requester follows from
byte 0, from cold (a promotion) or upstream. A Range the fill has not reached yet is asked of
upstream on its own while the fill goes on (lazy pulling): those bytes reach that one client,
unverified, and are kept nowhere. A blob the disk cannot take streams through to its client,
verified and kept nowhere. In a cluster, a fill whose lease another replica holds streams
that replica's fill instead of upstream (peers.py), and `for_peer` is what this replica
answers another one with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mirror import errors
from mirror.body import BlobBody, skipped
from mirror.bounded import Bounded
from mirror.config import LimitsConfig
from mirror.coordination import Coordinator, FillLease, Joined
from mirror.events import Events
from mirror.eviction.passes import Evictions
from mirror.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.oci.verify import Mismatch, Verifier, verified
from mirror.outcome import Outcome
from mirror.pull.answers import BlobAnswer
from mirror.pull.fill import BlobSource, Fill
from mirror.pull.holdings import Holdings
from mirror.pull.peers import Peers
from mirror.store.blobs import OpenBlob
from mirror.store.tiers import Tiers
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Target

log = logging.getLogger("mirror.pull")

#: Blobs remembered as too big for the disk (then forgotten all at once).
TOO_BIG_REMEMBERED = 1000


@dataclass(frozen=True, slots=True)
class _Verified:
    """A pass-through body: verified on the way, its last piece held until it checks out."""

    size: int | None
    _chunks: AsyncIterator[bytes]
    _mismatched: Callable[[Mismatch], None]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except Mismatch as e:
            self._mismatched(e)
            raise errors.DigestMismatch(f"upstream content {e.message}", detail=e.detail) from e


class Blobs:
    """Answers blob reads from the tiers, filling from cold or upstream on a miss."""

    def __init__(
        self,
        upstream: UpstreamClient,
        tiers: Tiers,
        evictions: Evictions,
        coordinator: Coordinator,
        metrics: Metrics,
        limits: LimitsConfig,
        holdings: Holdings,
        events: Events,
        peers: Peers | None = None,
    ) -> None:
        self._peers = peers
        self._holdings = holdings
        self._events = events
        self._upstream = upstream
        self._tiers = tiers
        self._evictions = evictions
        self._coordinator = coordinator
        self._metrics = metrics
        self._limits = limits
        self._too_big: Bounded[Digest, int] = Bounded(TOO_BIG_REMEMBERED)
        #: Abandoned fills being checked for followers in other processes.
        self._checks: set[asyncio.Task[None]] = set()
        #: Fills still running, by the client address that started them.
        self._started: Counter[str] = Counter()

    async def get(
        self, target: Target, digest: Digest, client: str = "", ranged: bool = False
    ) -> BlobAnswer:
        """An open cached blob (hot or warm), or the (possibly just started) fill that will
        bring it from cold or upstream; or neither, when it is to stream through. `client`
        (an address) is who would start the fill, for the per-client limit.

        A `ranged` request (a Range header) makes the fill wanted: it finishes whoever
        follows it, like pull-ahead's. A lazy-pulling client reads a layer a chunk at a time
        and is gone between reads, so `limits.abandoned_fill_bytes` would drop every large
        layer it reads; such a fill still counts against `limits.max_fills_per_client` of
        the client that started it while it runs."""
        found = await self._tiers.open(digest)
        if found is not None:
            if self._holdings.enabled:
                try:
                    await self._holdings.check(target, digest, "blob")
                except BaseException:
                    found.blob.close()
                    raise
            return BlobAnswer(Outcome.HIT, stored=found.blob, tier=found.tier)
        if await self._still_too_big(digest):
            return BlobAnswer(Outcome.PASS_THROUGH)
        self._admit(digest, client)
        fill, task, started = self.join(target, digest, client)
        if fill.error is not None:  # failed, still winding down (removing its partial file):
            await asyncio.wait([task])  # a new request gets a new try, not the old error
            fill, _, started = self.join(target, digest, client)
        if not started:  # another's fill: it may be another repository's
            await self._holdings.check(target, digest, "blob")
        if ranged:
            fill.wanted = True
        return BlobAnswer(Outcome.MISS if started else Outcome.COALESCED, fill=fill)

    def fetching(self) -> int:
        """The fills this process fetches now (it holds their host claim). A fill another
        worker fetches and this one follows is that worker's to count: summed over the
        workers, each fill of the host counts once."""
        coordinator = self._coordinator
        return sum(
            1
            for digest in coordinator.filling()
            if isinstance(state := coordinator.fill_state(digest), Fill) and state.fetched
        )

    def _admit(self, digest: Digest, client: str) -> None:
        """429 for a miss that would start a fill past the limits (joining one never is)."""
        filling = self._coordinator.filling()
        if digest in filling:
            return
        limits = self._limits
        if limits.max_fills and len(filling) >= limits.max_fills:
            raise errors.TooManyRequests(
                "the mirror is at its limit of concurrent fills", retry_after="1"
            )
        if limits.max_fills_per_client and self._started[client] >= limits.max_fills_per_client:
            raise errors.TooManyRequests(
                "this client has as many fills running as it may start", retry_after="1"
            )

    async def committed(self, digest: Digest) -> OpenBlob | None:
        """A blob whose fill has just finished, opened the way every hit is (counted, held
        against eviction); None if it is gone already."""
        found = await self._tiers.open(digest)
        return found.blob if found is not None else None

    def join(self, target: Target, digest: Digest, client: str = "") -> Joined[Fill]:
        """The fill of `digest` in flight, or a new one (started for `client`, counted
        against it while it runs)."""
        joined = self._coordinator.fill(
            digest, lambda: Fill(digest), lambda f: self._fill(f, target, digest)
        )
        if joined.started:
            joined.state.on_abandoned = lambda fill: self._abandoned(fill, joined.task)
            self._started[client] += 1
            joined.task.add_done_callback(lambda _: self._ended(client))
        return joined

    def want(self, target: Target, digest: Digest) -> Joined[Fill]:
        """A fill that is to finish whoever follows it (pull-ahead, the sync list)."""
        joined = self.join(target, digest)
        joined.state.wanted = True
        return joined

    def _ended(self, client: str) -> None:
        self._started[client] -= 1
        if self._started[client] <= 0:
            del self._started[client]

    def _abandoned(self, fill: Fill, task: asyncio.Task[None]) -> None:
        """The last client following `fill` in this process went away: drop it if more than
        the budget is still to come (a client cannot make the mirror fetch large blobs nobody
        reads) and no other worker process follows it either."""
        budget, left = self._limits.abandoned_fill_bytes, fill.remaining
        if budget and (left is None or left > budget):
            check = asyncio.ensure_future(self._drop_unless_followed(fill, task, left))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _drop_unless_followed(
        self, fill: Fill, task: asyncio.Task[None], left: int | None
    ) -> None:
        if await self._tiers.blobs.run(fill.watched_elsewhere) or fill.watchers or task.done():
            return
        log.info("dropping the fill of %s: nobody follows it, %s bytes to go", fill.digest, left)
        task.cancel()

    async def _fill(self, fill: Fill, target: Target, digest: Digest) -> None:
        started = time.monotonic()
        async with self._coordinator.fill_lease(digest) as lease:
            committed = await fill.host(
                self._tiers.blobs,
                lambda: self._coordinator.claim(digest),
                self._source(fill, target, digest, lease),
                self._evictions.make_room,
                target.upstream.max_blob_bytes,
            )
        if not fill.fetched:  # followed another process's fill: that one counts and tells
            return
        seconds = time.monotonic() - started
        self._metrics.fill_done(fill.source, fill.error is None, seconds, fill.followers)
        if isinstance(fill.error, errors.DigestMismatch):
            self._metrics.mismatch(fill.source)
            self._mismatched(target, digest, fill.source, fill.error.message, fill.error.detail)
        if committed:
            await self._tiers.committed(digest, fill.written)
            await self._tiers.share(digest, fill.written, fill.source)
            self._events.blob_cached(
                digest=digest,
                size=fill.written,
                source=fill.source,
                seconds=seconds,
                upstream=target.upstream.name,
                repository=target.repo,
            )
        elif fill.source == "cold" and isinstance(fill.error, errors.DigestMismatch):
            await self._tiers.drop_cold(digest)
        elif isinstance(fill.error, errors.DiskFull) and fill.size is not None:
            self._too_big.remember(digest, fill.size)

    def _mismatched(
        self, target: Target, digest: Digest, source: str, message: str, detail: object
    ) -> None:
        actual = detail.get("actual") if isinstance(detail, dict) else None
        self._events.digest_mismatch(
            what="blob",
            source=source,
            upstream=target.upstream.name,
            repository=target.repo,
            expected=digest,
            actual=actual,
            detail=message,
        )

    async def _still_too_big(self, digest: Digest) -> bool:
        """A blob that found no room lately goes straight through while there is still none
        (a free-space check), instead of a fill that would open upstream only to give up."""
        size = self._too_big.get(digest)
        if size is None:
            return False
        if await self._tiers.usage.room() >= size:
            self._too_big.forget(digest)
            return False
        return True

    def _source(self, fill: Fill, target: Target, digest: Digest, lease: FillLease) -> BlobSource:
        """Cold first (a promotion, verified like any fill; a cold copy that fails the check
        is dropped, so the next request goes upstream), else upstream.

        In a cluster the digest's lease comes before both: another replica's fill in
        progress is streamed from it (its bytes are on their way already, whatever cold
        holds); only the replica holding the lease reads the shared cold tier, then upstream,
        and the others stream that one's fill, so a blob in cold costs no upstream request
        and one cold read per cluster."""

        @contextlib.asynccontextmanager
        async def from_upstream(offset: int) -> AsyncIterator[BlobBody]:
            async with self._upstream.blob(target, digest, offset) as stream:
                await self._holdings.record(target, [digest])
                yield stream

        @contextlib.asynccontextmanager
        async def own(offset: int) -> AsyncIterator[BlobBody]:
            async with self._tiers.from_cold(digest) as cold:
                if cold is not None:
                    await self._holdings.check(target, digest, "blob")  # a hit in disguise
                    log.info("promoting %s from cold", digest)
                    fill.source = "cold"
                    yield skipped(cold, offset)
                    return
            fill.source = "upstream"
            async with from_upstream(offset) as stream:
                yield stream

        async def came_from(kind: str) -> None:
            if kind == "peer":  # another replica's copy: this repository must hold it
                await self._holdings.check(target, digest, "blob")
            fill.source = kind

        if self._peers is None:
            return own
        return self._peers.source(digest, lease, own, came_from)

    @contextlib.asynccontextmanager
    async def for_peer(self, digest: Digest) -> AsyncIterator[BlobAnswer]:
        """What this replica answers another one that streams `digest` from it: the blob if
        committed, else this host's fill in progress (this process's, or another worker
        process's, followed without ever being carried on: a peer's request never makes this
        replica fetch). BLOB_UNKNOWN when this host fills it not."""
        found = await self._tiers.open(digest)
        if found is not None:
            yield BlobAnswer(Outcome.HIT, stored=found.blob, tier=found.tier)
            return
        state = self._coordinator.fill_state(digest)
        if isinstance(state, Fill):
            yield BlobAnswer(Outcome.COALESCED, fill=state)
            return
        fill = Fill(digest)
        watching = asyncio.ensure_future(
            fill.watch(self._tiers.blobs, lambda: self._coordinator.claim(digest))
        )
        try:
            yield BlobAnswer(Outcome.COALESCED, fill=fill)
        finally:
            watching.cancel()
            await asyncio.wait([watching])

    @contextlib.asynccontextmanager
    async def upstream_range(
        self, target: Target, digest: Digest, start: int, end: int
    ) -> AsyncIterator[BlobBody | None]:
        """Bytes [start, end) of a blob being filled, straight from upstream for one Range
        answer, while the fill brings the whole: upstream's bytes, unverified (only a whole
        blob can be checked against its digest) and kept nowhere. None when upstream ignored
        the Range: the caller follows the fill instead (reading the whole blob a second time
        to skip to the range would cost as much as the fill, and slow it down)."""
        async with self._upstream.blob_range(target, digest, start, end) as body:
            yield body

    @contextlib.asynccontextmanager
    async def pass_through(self, target: Target, digest: Digest) -> AsyncIterator[BlobBody]:
        """The disk cannot take this blob: stream it from upstream to one client, verified
        (the last bytes are held until the digest checks out) and kept nowhere."""
        log.warning(
            "the store cannot keep %s (disk full or read-only): streaming it through", digest
        )

        def mismatched(e: Mismatch) -> None:
            self._mismatched(target, digest, "upstream", f"upstream content {e.message}", e.detail)

        async with self._upstream.blob(target, digest) as stream:
            checked = verified(stream.chunks(), Verifier(digest, stream.size))
            yield _Verified(stream.size, checked, mismatched)

    async def size(self, target: Target, digest: Digest) -> tuple[int | None, Outcome]:
        """A blob's size for HEAD, without fetching it."""
        found = await self._tiers.open(digest)
        if found is not None:
            found.blob.close()
            await self._holdings.check(target, digest, "blob")
            return found.blob.size, Outcome.HIT
        size = await self._upstream.blob_size(target, digest)
        await self._holdings.record(target, [digest])
        return size, Outcome.MISS

    async def drain(self, seconds: float) -> None:
        """At shutdown: let fills in flight finish (each is one upstream transfer already
        paid for), for at most `seconds`."""
        tasks = self._coordinator.fill_tasks()
        if tasks:
            log.info("waiting up to %.0fs for %d fills in flight", seconds, len(tasks))
            await asyncio.wait(tasks, timeout=seconds)
