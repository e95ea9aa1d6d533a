"""Where a blob is answered from, and what the tiers are told when one arrives or goes bad.

    hot   HotTier (memory): small blobs here; manifests and tag records keep theirs there too.
          Always a copy of something warm holds.
    warm  BlobStore files + BlobIndex rows (tier "warm"); budget and watermarks from [warm]
    cold  a ColdBackend (object storage or a slower volume) + rows (tier "cold"); optional.
          A cold copy is never served directly: a fill promotes it to warm, verified.

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


class ColdBackend(Protocol):
    """What the tiers need of cold storage (store/cold.py implements it)."""

    async def put_file(self, digest: Digest, path: Path) -> None: ...

    async def open(self, digest: Digest) -> BlobBody | None: ...

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
    ) -> None:
        self._small = hot_config.small_blob_bytes
        self.blobs = blobs
        self.hot = hot
        self.index = index
        self.usage = usage
        self.cold = cold
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
        when cold does not hold it or cannot be read (the caller then goes upstream)."""
        if self.cold is None:
            yield None
            return
        try:
            held = await self.index.call(self.index.tiers_of, digest)
            found = await self.cold.open(digest) if "cold" in held else None
        except errors.StoreUnavailable as e:
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
