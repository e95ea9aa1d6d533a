"""Where a blob is answered from, and what the tiers are told when one arrives or goes bad.

    hot   HotTier (memory): small blobs here; manifests and tag records keep theirs there too.
          Always a copy of something warm holds.
    warm  BlobStore files + BlobIndex rows (tier "warm"); budget and watermarks from [warm]
    cold  a ColdBackend (object storage or a slower volume) + rows (tier "cold"); optional.
          A cold copy is never served directly: a fill promotes it to warm, verified.
          Shared by a cluster's replicas (`shared`): then each blob a replica fetched from
          upstream is uploaded there once committed, and a miss looks there whatever this
          replica's own index says, since another replica may have put it there.

A lookup counts a hit (in memory; written to the index in batches) and holds a warm blob
against eviction until the caller closes it. How tiers shrink is eviction/'s business; how
full they are, usage.py's.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror import errors
from mirror.body import BlobBody
from mirror.config import HotConfig
from mirror.events import Events
from mirror.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.store.blobs import BlobStore, Corrupt, OpenBlob
from mirror.store.hot import HotTier
from mirror.store.index import Accesses, BlobIndex
from mirror.store.keys import BlobKey
from mirror.store.usage import Usage

log = logging.getLogger("mirror.tiers")

#: Uploads to a shared cold tier running at once: enough to keep up with fills, few enough
#: that they do not take the uplink from the fills themselves.
UPLOADS = 4
#: Uploads waiting for their turn at most; past it one is skipped (logged and counted):
#: eviction's demotion puts the blob there later, or a miss on another replica fetches it.
UPLOADS_WAITING = 1000
#: Seconds a shared cold tier that failed a lookup is left alone: every miss would ask it,
#: and an unreachable store can take seconds to say so (its connect timeout) on each.
COLD_PAUSE = 10.0
#: A failed upload is tried again after this many seconds, doubling, UPLOAD_TRIES times in all
#: (2 s to 4 min: an object store restarted or a network cut mended is caught up on).
UPLOAD_RETRY_FIRST = 2.0
UPLOAD_TRIES = 8


class ColdBackend(Protocol):
    """What the tiers need of cold storage (store/cold.py implements it)."""

    async def put_file(self, digest: Digest, path: Path) -> None: ...

    async def open(self, digest: Digest) -> BlobBody | None: ...

    async def size(self, digest: Digest) -> int | None: ...

    async def delete(self, digest: Digest) -> None: ...


@dataclass(frozen=True, slots=True)
class Found:
    """A blob found in hot or warm, and which one."""

    blob: OpenBlob
    tier: str


class Tiers:
    def __init__(
        self,
        hot_config: HotConfig,
        blobs: BlobStore,
        hot: HotTier,
        index: BlobIndex,
        usage: Usage,
        metrics: Metrics,
        events: Events,
        cold: ColdBackend | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        self._small = hot_config.small_blob_bytes
        self.blobs = blobs
        self.hot = hot
        self.index = index
        self.usage = usage
        self.cold = cold
        #: Cold is the tier every replica of a cluster reads (and writes).
        self.shared = shared and cold is not None
        self._uploads: set[asyncio.Task[None]] = set()
        #: Failed uploads waiting for their next try, by digest.
        self._retrying: dict[Digest, asyncio.TimerHandle] = {}
        self._upload_turn = asyncio.Semaphore(UPLOADS)
        #: Until when (monotonic) a shared cold tier that failed is not asked.
        self._cold_paused = 0.0
        self._metrics = metrics
        self.events = events
        self._clock = clock
        self.accesses = Accesses(index, clock)
        self._serving: Counter[Digest] = Counter()

    # -- lookup ----------------------------------------------------------------------------

    async def open(self, digest: Digest) -> Found | None:
        """A blob from hot or warm; counted as a hit there; held against eviction until the
        caller closes it. A warm file that no longer matches its digest is dropped and
        reported as absent, so the request becomes a verified fill."""
        data: bytes | None = self.hot.get(BlobKey(digest))
        if data is not None:
            self.accesses.hit(digest)
            return Found(OpenBlob(-1, len(data), data), "hot")
        try:
            stored = await self.blobs.run(self.blobs.open, digest)
        except Corrupt as bad:
            await self._drop_corrupt(bad)
            return None
        if stored is None:
            return None
        self.accesses.hit(digest)
        if stored.data is not None and len(stored.data) <= self._small:
            self.hot.put(BlobKey(digest), stored.data, len(stored.data))
        else:
            self._serving[digest] += 1
            stored.release = lambda: self._release(digest)
        return Found(stored, "warm")

    def in_use(self) -> set[Digest]:
        """Warm blobs being sent right now (no pass evicts them)."""
        return set(self._serving)

    def _release(self, digest: Digest) -> None:
        self._serving[digest] -= 1
        if self._serving[digest] <= 0:
            del self._serving[digest]

    @asynccontextmanager
    async def from_cold(self, digest: Digest) -> AsyncIterator[BlobBody | None]:
        """The cold copy as a fill source (the fill verifies and promotes it to warm), or None
        when cold does not hold it or cannot be read (the caller then goes upstream).

        A cold tier of this mirror's own is asked only for what the index says it holds (a
        miss costs no object-store request). A shared one is asked every time: another
        replica may have put the blob there, and one GET that finds nothing costs far less
        than the upstream transfer it may save. One that failed is not asked again for
        COLD_PAUSE seconds: misses go upstream meanwhile, without waiting on it."""
        if self.cold is None or time.monotonic() < self._cold_paused:
            yield None
            return
        try:
            if self.shared:
                found = await self.cold.open(digest)
            else:
                held = await self.index.call(self.index.tiers_of, digest)
                found = await self.cold.open(digest) if "cold" in held else None
        except errors.StoreUnavailable as e:
            if self.shared:
                self._cold_paused = time.monotonic() + COLD_PAUSE
            log.warning("cold tier unreadable for %s, going upstream: %s", digest, e)
            found = None
        yield found

    # -- recording -------------------------------------------------------------------------

    async def committed(self, digest: Digest, size: int) -> None:
        """A fill (or an import) put a verified blob into warm. If the index cannot take the
        record (a full disk), the blob is served all the same and reconcile adopts it at the
        next start."""
        try:
            await self.index.call(self.index.record, digest, "warm", size, self._clock())
        except sqlite3.OperationalError as e:
            log.warning("index cannot record %s (%s); the next start adopts it", digest, e)
        self.usage.added(size)

    async def share(self, digest: Digest, size: int, source: str) -> None:
        """A fill committed into warm, in a cluster with a shared cold tier: a blob fetched
        from upstream is uploaded there in the background, so that no replica fetches it from
        upstream again; one promoted from there is recorded as held there (its eviction from
        warm then uploads nothing). A blob streamed from another replica is that replica's to
        upload. Nothing for a cold tier of this mirror's own: eviction fills that one."""
        if not self.shared:
            return
        if source == "cold":
            await self._record_cold(digest, size)
        elif source == "upstream":
            self.upload_soon(digest, size)

    def upload_soon(self, digest: Digest, size: int, attempt: int = 0) -> None:
        """Copy a committed warm blob to cold off the request path, at most UPLOADS at once.
        A failed upload is logged and counted and tried again later (UPLOAD_RETRY_FIRST,
        doubling, while this process runs and the blob is warm); after UPLOAD_TRIES the blob
        stays warm only, and eviction's demotion (or a later miss's fill elsewhere) puts it in
        cold later."""
        if len(self._uploads) >= UPLOADS_WAITING:
            log.warning(
                "cold tier: %d uploads waiting, not uploading %s", len(self._uploads), digest
            )
            self._metrics.cold_upload("skipped")
            return
        self._serving[digest] += 1  # no eviction pass takes the file while it is read
        task = asyncio.ensure_future(self._upload(digest, size, attempt))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _upload(self, digest: Digest, size: int, attempt: int) -> None:
        try:
            async with self._upload_turn:
                assert self.cold is not None
                if attempt and not await self.blobs.run(self.blobs.exists, digest):
                    return  # evicted from warm while it waited: nothing left to copy
                await self.cold.put_file(digest, self.blobs.path(digest))
        except errors.StoreUnavailable as e:
            self._upload_failed(digest, size, attempt, str(e))
            return
        except Exception as e:  # a background task: nobody else would hear of it
            log.exception("cold tier: uploading %s failed", digest)
            self._upload_failed(digest, size, attempt, type(e).__name__)
            return
        finally:
            self._release(digest)
        await self._record_cold(digest, size)
        self._metrics.cold_upload("ok")
        log.info("uploaded %s to the shared cold tier", digest)

    def _upload_failed(self, digest: Digest, size: int, attempt: int, reason: str) -> None:
        """Counted, and tried again later unless this was the last try."""
        self._metrics.cold_upload("failed")
        if attempt + 1 >= UPLOAD_TRIES:
            log.warning(
                "cold tier: uploading %s failed %d times, it stays in warm only: %s",
                digest,
                UPLOAD_TRIES,
                reason,
            )
            return
        delay = UPLOAD_RETRY_FIRST * 2**attempt
        log.warning(
            "cold tier: uploading %s failed, trying again in %.0fs: %s", digest, delay, reason
        )
        self._retrying[digest] = asyncio.get_running_loop().call_later(
            delay, self._retry, digest, size, attempt + 1
        )

    def _retry(self, digest: Digest, size: int, attempt: int) -> None:
        self._retrying.pop(digest, None)
        self.upload_soon(digest, size, attempt)

    async def _record_cold(self, digest: Digest, size: int) -> None:
        try:
            await self.index.call(self.index.record, digest, "cold", size, self._clock())
        except sqlite3.OperationalError as e:
            log.warning("index cannot record %s in cold (%s)", digest, e)

    async def finish_uploads(self, seconds: float) -> None:
        """At shutdown: let uploads in flight finish for at most `seconds`, then cancel the
        rest (those blobs stay warm; eviction demotes them later), and those waiting to be
        tried again with them."""
        for handle in self._retrying.values():
            handle.cancel()
        self._retrying.clear()
        pending = set(self._uploads)
        if not pending:
            return
        log.info("waiting up to %.0fs for %d uploads to the cold tier", seconds, len(pending))
        _, late = await asyncio.wait(pending, timeout=seconds)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _drop_corrupt(self, bad: Corrupt) -> None:
        """A warm file that no longer matches its digest: record first, then file (the
        index's order), so the request becomes a miss and a fresh verified fill replaces it."""
        log.error(
            "blob %s in the warm tier does not match its digest (altered on disk); dropped, "
            "it will be fetched again",
            bad.digest,
        )
        await self.index.call(self.index.forget, bad.digest, "warm")
        await self.blobs.run(self.blobs.remove, [bad.digest])
        self._metrics.evicted("warm", "corrupt", 1, bad.size)
        self.events.blob_evicted(
            tier="warm", reason="corrupt", digests=[bad.digest], nbytes=bad.size, to=None
        )

    async def drop_cold(self, digest: Digest) -> None:
        """Forget a cold copy that failed verification (record first, then the object)."""
        log.error("cold copy of %s does not match its digest: dropped", digest)
        await self.index.call(self.index.forget, digest, "cold")
        self._metrics.evicted("cold", "corrupt", 1, 0)
        self.events.blob_evicted(tier="cold", reason="corrupt", digests=[digest], nbytes=0, to=None)
        if self.cold is not None:
            try:
                await self.cold.delete(digest)
            except errors.StoreUnavailable as e:
                log.warning("could not delete the bad cold copy of %s: %s", digest, e)

    # -- access counts ---------------------------------------------------------------------

    async def flush_forever(self, interval: float) -> None:
        """Write counted hits to the index every `interval` seconds (a background task)."""
        while True:
            await asyncio.sleep(interval)
            await self.flush_accesses()

    async def flush_accesses(self) -> None:
        """Write counted hits to the index; a store that cannot take the write (read-only,
        full) costs those counts and a log line, never the caller."""
        try:
            await self.accesses.flush()
        except sqlite3.Error as e:
            log.warning("writing access times to the index failed (%s); those counts are lost", e)
        except Exception:
            log.exception("writing access times to the index failed")
