"""The tiers' mechanics: lookup hot → warm (→ cold, through a fill that promotes), recording
what warm and cold hold, budgets, and the eviction pass that demotes or deletes.

    hot   HotTier (memory): small blobs here, manifests and tag records in ManifestStore; a copy
    warm  BlobStore files + BlobIndex rows (tier "warm"); budget and watermarks from [warm]
    cold  a ColdBackend (object storage or a slower volume) + rows (tier "cold"); optional

Protected from eviction: pinned images (resolved through their manifests to every blob), blobs
of fills in flight (not in the index until committed) and blobs being sent right now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror import errors
from mirror.config import Config
from mirror.eviction import POLICIES, PassReport, expired_tags, plan, target_bytes
from mirror.oci.reference import Digest, parse_digest
from mirror.store.blobs import BlobStore, Corrupt, OpenBlob
from mirror.store.cold import ColdStore
from mirror.store.hot import HotTier
from mirror.store.index import Accesses, BlobIndex, Entry
from mirror.store.layout import Layout
from mirror.store.manifests import ManifestStore
from mirror.store.pins import pinned_blobs, reachable_blobs

log = logging.getLogger("mirror.tiers")

#: An eviction pass deletes files in up to REMOVE_LANES store threads, REMOVE_BATCH or more each.
REMOVE_BATCH = 250
REMOVE_LANES = 4


class ColdBlob(Protocol):
    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class ColdBackend(Protocol):
    """What the tiers need of cold storage (store/cold.py implements it)."""

    async def put_file(self, digest: Digest, path: Path) -> None: ...

    async def open(self, digest: Digest) -> ColdBlob | None: ...

    async def delete(self, digest: Digest) -> None: ...


@dataclass(frozen=True, slots=True)
class Found:
    """A blob found in hot or warm, and which one."""

    blob: OpenBlob
    tier: str


class Tiers:
    def __init__(
        self,
        config: Config,
        blobs: BlobStore,
        manifests: ManifestStore,
        hot: HotTier,
        index: BlobIndex,
        cold: ColdBackend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.blobs = blobs
        self._manifests = manifests
        self.hot = hot
        self.index = index
        self.cold = cold
        self._clock = clock
        self.accesses = Accesses(index, clock)
        self._one_pass = asyncio.Lock()
        self._serving: Counter[str] = Counter()
        self.usage: dict[str, tuple[int, int]] = {}
        #: Digests of fills in flight (the service's), never evicted.
        self.in_flight: Callable[[], Collection[str]] = frozenset
        #: Called when warm crosses its high watermark (the evictor's wake).
        self.on_pressure: Callable[[], None] = lambda: None
        #: Pin patterns besides the config's and the index's (the sync list's).
        self.extra_pins: tuple[str, ...] = ()
        #: Told of every batch that leaves a tier: (tier, reason, blobs, bytes).
        self.on_evicted: Callable[[str, str, int, int], None] = lambda *_: None

    # -- lookup ----------------------------------------------------------------------------

    async def open(self, digest: Digest) -> Found | None:
        """A blob from hot or warm; counted as a hit there; held against eviction until the
        caller closes it."""
        key = str(digest)
        data: bytes | None = self.hot.get(("b", key))
        if data is not None:
            self.accesses.hit(key)
            return Found(OpenBlob(-1, len(data), data), "hot")
        try:
            stored = await self.blobs.run(self.blobs.open, digest)
        except Corrupt as bad:
            await self._drop_corrupt(bad)
            return None
        if stored is None:
            return None
        self.accesses.hit(key)
        if stored.data is not None and len(stored.data) <= self._config.hot.small_blob_bytes:
            self.hot.put(("b", key), stored.data, len(stored.data))
        else:
            self._serving[key] += 1
            stored.release = lambda: self._release(key)
        return Found(stored, "warm")

    async def _drop_corrupt(self, bad: Corrupt) -> None:
        """A warm file that no longer matches its digest: record first, then file (the
        index's order), so the request becomes a miss and a fresh verified fill replaces it."""
        key = str(bad.digest)
        log.error(
            "blob %s in the warm tier does not match its digest (altered on disk); dropped, "
            "it will be fetched again",
            key,
        )
        await self.index.call(self.index.forget, key, "warm")
        await self.blobs.run(self.blobs.remove, [key])
        self.on_evicted("warm", "corrupt", 1, bad.size)

    def _release(self, key: str) -> None:
        self._serving[key] -= 1
        if self._serving[key] <= 0:
            del self._serving[key]

    @asynccontextmanager
    async def from_cold(self, digest: Digest) -> AsyncIterator[ColdBlob | None]:
        """The cold copy as a fill source (the fill verifies and promotes it to warm), or None
        when cold does not hold it or cannot be read (the caller then goes upstream)."""
        if self.cold is None:
            yield None
            return
        try:
            held = await self.index.call(self.index.tiers_of, str(digest))
            found = await self.cold.open(digest) if "cold" in held else None
        except errors.StoreUnavailable as e:
            log.warning("cold tier unreadable for %s, going upstream: %s", digest, e.message)
            found = None
        yield found

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

    async def drop_cold(self, digest: Digest) -> None:
        """Forget a cold copy that failed verification (record first, then the object)."""
        log.error("cold copy of %s does not match its digest: dropped", digest)
        await self.index.call(self.index.forget, str(digest), "cold")
        self.on_evicted("cold", "corrupt", 1, 0)
        if self.cold is not None:
            try:
                await self.cold.delete(digest)
            except errors.StoreUnavailable as e:
                log.warning("could not delete the bad cold copy of %s: %s", digest, e.message)

    # -- recording -------------------------------------------------------------------------

    async def committed(self, digest: Digest, size: int) -> None:
        """A fill put a verified blob into warm. If the index cannot take the record (a full
        disk), the blob is served all the same and reconcile adopts it at the next start."""
        try:
            await self.index.call(self.index.record, str(digest), "warm", size, self._clock())
        except sqlite3.OperationalError as e:
            log.warning("index cannot record %s (%s); the next start adopts it", digest, e)
        nbytes, count = self.usage.get("warm", (0, 0))
        self.usage["warm"] = (nbytes + size, count + 1)
        if self._over_high(nbytes + size):
            self.on_pressure()

    def _over_high(self, used: int) -> bool:
        budget = self._config.warm.max_bytes
        return bool(budget) and used > self._config.warm.high_watermark * budget

    async def refresh_usage(self) -> dict[str, tuple[int, int]]:
        self.usage = await self.index.call(self.index.usage)
        return self.usage

    async def reconcile(self) -> tuple[int, int]:
        """At start: adopt warm files the index lacks (a crash between commit and record, or a
        store from before the index) and drop rows whose files are gone. (added, dropped)"""
        files = await self.blobs.run(self.blobs.scan)
        known = await self.index.call(self.index.digests, "warm")
        adopt = [
            (d, "warm", size, ctime)
            for d, (size, ctime) in files.items()
            if d not in known and _valid(d)
        ]
        gone = [d for d in known if d not in files]
        if adopt:
            await self.index.call(self.index.record_many, adopt)
        if gone:
            await self.index.call(self.index.forget_many, "warm", gone)
        await self.refresh_usage()
        if adopt or gone:
            log.info(
                "index reconciled with the store: %d files adopted, %d records dropped",
                len(adopt),
                len(gone),
            )
        return len(adopt), len(gone)

    # -- eviction --------------------------------------------------------------------------

    async def protected(self) -> set[str]:
        """Digests no pass may evict: pins, fills in flight, blobs being sent."""
        patterns = [*self._config.pins, *self.extra_pins, *await self.index.call(self.index.pins)]
        pinned = (
            await asyncio.to_thread(pinned_blobs, self._manifests, patterns) if patterns else set()
        )
        return pinned | set(self.in_flight()) | set(self._serving)

    async def evict_pass(self) -> PassReport:
        """One bounded pass over warm, then cold (passes never overlap)."""
        async with self._one_pass:
            return await self._evict_pass()

    async def _evict_pass(self) -> PassReport:
        await self.accesses.flush()
        await self.refresh_usage()
        report = PassReport()
        protected = await self.protected()
        await self._retention(protected, report)
        await self.refresh_usage()
        await self._evict_warm(protected, report)
        if self.cold is not None:
            await self._evict_cold(protected, report)
        await self.refresh_usage()
        return report

    async def make_room(self, nbytes: int) -> bool:
        """Room on warm's filesystem for `nbytes` more, above the free-space floor, evicting
        (past the watermarks if need be) to get it; False when even that is not enough."""
        if await self.room() >= nbytes:
            return True
        async with self._one_pass:
            await self.accesses.flush()
            await self.refresh_usage()
            report = PassReport()
            await self._evict_warm(await self.protected(), report, reserve=nbytes)
            await self.refresh_usage()
        room = await self.room()
        log.warning(
            "disk full: evicted %d blobs (%d bytes) for %d bytes; %s",
            report.deleted + report.demoted,
            report.freed,
            nbytes,
            "room made" if room >= nbytes else "still no room",
        )
        return room >= nbytes

    async def room(self) -> int:
        """Bytes warm may still take before its filesystem reaches the free-space floor."""
        _, free = await self._disk()
        return free - self._config.warm.min_free_bytes

    async def _disk(self) -> tuple[int, int]:
        """Size and free bytes (for unprivileged users) of warm's filesystem."""
        st = await self.blobs.run(os.statvfs, self.blobs.layout.blobs)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    async def _evict_warm(self, protected: set[str], report: PassReport, reserve: int = 0) -> None:
        """Down to the low watermark, and to the free-space floor with `reserve` bytes taken."""
        warm = self._config.warm
        used = self.usage["warm"][0]
        total, free = await self._disk()
        budgets = [b for b in (warm.max_bytes, int(warm.max_fraction * total)) if b]
        target = target_bytes(
            used,
            min(budgets, default=0),
            free - reserve,
            warm.min_free_bytes,
            warm.high_watermark,
            warm.low_watermark,
        )
        if target is None:
            return
        victims = await self._plan("warm", warm.policy, used, target, protected)
        report.bounded |= len(victims) >= self._config.eviction.max_per_pass
        await self.leave_warm(victims, report, "disk_full" if reserve else "budget")

    async def leave_warm(self, victims: list[Entry], report: PassReport, reason: str) -> None:
        """Demote to cold (when there is one) or delete; a blob cold cannot take stays."""
        if self.cold is not None:
            in_cold = await self.index.call(self.index.digests, "cold")
            moved = [e for e in victims if e.digest in in_cold or await self._demote(e)]
            report.demoted += len(moved)
            await self._drop("warm", moved)
        else:
            moved = victims
            report.deleted += len(victims)
            await self._drop("warm", victims)
        report.freed += sum(e.size for e in moved)
        if moved:
            self.on_evicted("warm", reason, len(moved), sum(e.size for e in moved))

    async def _retention(self, protected: set[str], report: PassReport) -> None:
        """Apply `[[retention]]`: tags past their repository's `keep_tags` or idle past
        `max_idle` leave the cache, and so do their blobs that no kept tag or pin holds."""
        rules = self._config.retention
        if not rules:
            return
        pulled = await self.index.call(self.index.tags_pulled)
        records = dict(await asyncio.to_thread(lambda: list(self._manifests.iter_tags())))
        last = {key: pulled.get(key, record.checked) for key, record in records.items()}
        expired = expired_tags(last, rules, self._clock())
        if not expired:
            return
        kept_roots = [r.digest for key, r in records.items() if key not in expired]
        gone_roots = [records[key].digest for key in expired]

        def doomed() -> set[str]:
            return (
                reachable_blobs(self._manifests, gone_roots)
                - reachable_blobs(self._manifests, kept_roots)
                - protected
            )

        victims = await self.index.call(self.index.select, "warm", await asyncio.to_thread(doomed))
        for key in expired:
            await self._manifests.drop_tag(key)
        await self.index.call(self.index.forget_tags, list(expired))
        report.expired_tags += len(expired)
        await self.leave_warm(victims, report, "retention")

    async def _demote(self, entry: Entry) -> bool:
        """Copy a warm blob to cold and record it there; False (blob stays warm) on failure."""
        assert self.cold is not None
        digest = parse_digest(entry.digest)
        try:
            await self.cold.put_file(digest, self.blobs.layout.blob(digest))
        except (errors.StoreUnavailable, FileNotFoundError) as e:
            log.warning("demoting %s to cold failed, it stays warm: %s", entry.digest, e)
            return False
        await self.index.call(self.index.record, entry.digest, "cold", entry.size, self._clock())
        return True

    async def _evict_cold(self, protected: set[str], report: PassReport) -> None:
        cold = self._config.cold
        idle: list[Entry] = []
        if cold.max_idle:
            before = self._clock() - cold.max_idle
            idle = await self.index.call(
                self.index.idle, "cold", before, self._config.eviction.max_per_pass
            )
            report.bounded |= len(idle) >= self._config.eviction.max_per_pass
            idle = [e for e in idle if e.digest not in protected]
        used = self.usage.get("cold", (0, 0))[0] - sum(e.size for e in idle)
        target = target_bytes(
            used,
            cold.max_bytes,
            1,
            0,
            self._config.warm.high_watermark,
            self._config.warm.low_watermark,
        )
        over = (
            await self._plan(
                "cold", cold.policy, used, target, protected | {e.digest for e in idle}
            )
            if target is not None
            else []
        )
        report.bounded |= len(over) >= self._config.eviction.max_per_pass
        await self._drop("cold", idle + over)
        report.deleted += len(idle) + len(over)
        for reason, gone in (("idle", idle), ("budget", over)):
            if gone:
                self.on_evicted("cold", reason, len(gone), sum(e.size for e in gone))

    async def _plan(
        self, tier: str, policy: str, used: int, target: int, protected: set[str]
    ) -> list[Entry]:
        """Victims chosen on the index thread, reading candidates in policy order."""

        def choose() -> list[Entry]:
            return plan(
                self.index.ordered(tier, POLICIES[policy].sql),
                used,
                target,
                protected,
                self._config.eviction.max_per_pass,
            )

        return await self.index.call(choose)

    async def _drop(self, tier: str, victims: list[Entry]) -> None:
        """Records first, then files: a crash in between leaves files that reconcile adopts.
        On a disk too full for SQLite's journal, files first (freeing the space the records
        need); a crash then leaves records without files, which a lookup treats as a miss and
        reconcile drops."""
        if not victims:
            return
        digests = [e.digest for e in victims]
        try:
            await self.index.call(self.index.forget_many, tier, digests)
        except sqlite3.OperationalError as e:
            log.warning("index cannot write (%s): removing the files first", e)
            await self._remove(tier, digests)
            await self.index.call(self.index.forget_many, tier, digests)
            return
        await self._remove(tier, digests)

    async def _remove(self, tier: str, digests: list[str]) -> None:
        if tier == "warm":
            # unlink releases the GIL: a few store threads at once get through thousands
            # faster; only a few, so that the event loop does not queue behind them for it
            lanes = min(REMOVE_LANES, -(-len(digests) // REMOVE_BATCH))
            await asyncio.gather(
                *(self.blobs.run(self.blobs.remove, digests[i::lanes]) for i in range(lanes))
            )
            for d in digests:
                self.hot.drop(("b", d))
        else:
            assert self.cold is not None
            for digest in digests:
                await self.cold.delete(parse_digest(digest))


def open_tiers(config: Config, pool: ThreadPoolExecutor) -> tuple[Tiers, ManifestStore]:
    """The store of `config.data_dir` with all its tiers, as the server and the admin
    commands open it (blocking work runs in `pool`)."""
    layout = Layout(config.data_dir)
    layout.create()
    hot = HotTier(config.hot.max_bytes)
    manifests = ManifestStore(layout, pool, hot)
    index = BlobIndex(
        layout.index, [POLICIES[config.warm.policy].sql, POLICIES[config.cold.policy].sql]
    )
    tiers = Tiers(
        config, BlobStore(layout, pool), manifests, hot, index, ColdStore.from_config(config.cold)
    )
    return tiers, manifests


def _valid(digest: str) -> bool:
    try:
        parse_digest(digest)
    except errors.MirrorError:
        return False
    return True
