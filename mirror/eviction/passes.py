"""The eviction passes: what the policies decide, applied to the tiers (mechanism).

A pass shrinks warm to its low watermark (and to the free-space floor), demoting to cold
when there is a cold tier and deleting otherwise, then cold to its own budget and idle limit;
retention rules run first. Protected from every pass: pinned images (resolved through their
manifests to every blob), blobs of fills in flight (not in the index until committed) and
blobs being sent right now. Passes never overlap (the coordinator's eviction turn), and each
is bounded by `max_per_pass`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror import errors
from mirror.config import Config
from mirror.coordination import Coordinator
from mirror.events import Events
from mirror.eviction.policy import plan, target_bytes
from mirror.eviction.retention import Retention
from mirror.metrics import Metrics
from mirror.oci.reference import Digest
from mirror.policies import POLICIES
from mirror.store.index import Entry
from mirror.store.keys import BlobKey
from mirror.store.manifests import ManifestStore
from mirror.store.pins import pinned_blobs
from mirror.store.tiers import Tiers

log = logging.getLogger("mirror.eviction")

#: An eviction pass deletes files in up to REMOVE_LANES store threads, REMOVE_BATCH or more each.
REMOVE_BATCH = 250
REMOVE_LANES = 4


@dataclass
class PassReport:
    """What one eviction pass did: blobs demoted to cold, deleted, and bytes freed."""

    demoted: int = 0
    deleted: int = 0
    freed: int = 0
    #: A tier stopped at max_per_pass, not at its target: run again at once.
    bounded: bool = False
    #: Tags that retention rules let go.
    expired_tags: int = 0


class Evictions:
    def __init__(
        self,
        config: Config,
        tiers: Tiers,
        manifests: ManifestStore,
        coordinator: Coordinator,
        metrics: Metrics,
        events: Events,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._events = events
        self._tiers = tiers
        self._index = tiers.index
        self._manifests = manifests
        self._coordinator = coordinator
        self._metrics = metrics
        self._clock = clock
        self._retention = Retention(
            config.retention, tiers.index, coordinator.tags, manifests, clock
        )

    async def protected(self) -> set[Digest]:
        """Digests no pass may evict: pins, fills in flight, blobs being sent."""
        patterns = [*self._config.all_pins, *await self._index.call(self._index.pins)]
        pinned: set[Digest] = set()
        if patterns:
            tags = self._coordinator.tags
            pinned = await asyncio.to_thread(
                lambda: pinned_blobs(self._manifests, tags.all(), patterns)
            )
        return pinned | set(self._coordinator.filling()) | self._tiers.in_use()

    async def evict_pass(self) -> PassReport:
        """One bounded pass: retention, then warm, then cold."""
        async with self._coordinator.eviction_turn():
            await self._tiers.accesses.flush()
            await self._tiers.usage.refresh()
            report = PassReport()
            protected = await self.protected()
            report.expired_tags, victims = await self._retention.expire(protected)
            await self.leave_warm(victims, report, "retention")
            await self._tiers.usage.refresh()
            await self._evict_warm(protected, report)
            if self._tiers.cold is not None:
                await self._evict_cold(protected, report)
            await self._tiers.usage.refresh()
            return report

    async def make_room(self, nbytes: int) -> bool:
        """Room on warm's filesystem for `nbytes` more, above the free-space floor, evicting
        (past the watermarks if need be) to get it; False when even that is not enough."""
        usage = self._tiers.usage
        if await usage.room() >= nbytes:
            return True
        async with self._coordinator.eviction_turn():
            await self._tiers.accesses.flush()
            await usage.refresh()
            report = PassReport()
            await self._evict_warm(await self.protected(), report, reserve=nbytes)
            await usage.refresh()
        room = await usage.room()
        log.warning(
            "disk full: evicted %d blobs (%d bytes) for %d bytes; %s",
            report.deleted + report.demoted,
            report.freed,
            nbytes,
            "room made" if room >= nbytes else "still no room",
        )
        return room >= nbytes

    async def _evict_warm(
        self, protected: set[Digest], report: PassReport, reserve: int = 0
    ) -> None:
        """Down to the low watermark, and to the free-space floor with `reserve` bytes taken."""
        warm = self._config.warm
        used = self._tiers.usage.used("warm")
        total, free = await self._tiers.usage.disk()
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
        if not victims:
            return
        if self._tiers.cold is not None:
            in_cold = await self._index.call(self._index.digests, "cold")
            moved = [e for e in victims if e.digest in in_cold or await self._demote(e)]
            report.demoted += len(moved)
        else:
            moved = victims
            report.deleted += len(victims)
        await self._drop("warm", moved)
        freed = sum(e.size for e in moved)
        report.freed += freed
        if moved:
            self._metrics.evicted("warm", reason, len(moved), freed)
            self._events.blob_evicted(
                tier="warm",
                reason=reason,
                digests=[e.digest for e in moved],
                nbytes=freed,
                to="cold" if self._tiers.cold is not None else None,
            )

    async def _demote(self, entry: Entry) -> bool:
        """Copy a warm blob to cold and record it there; False (blob stays warm) on failure.
        A shared cold tier may hold it already (another replica uploaded it): then it is only
        recorded, not sent again."""
        cold, blobs = self._tiers.cold, self._tiers.blobs
        assert cold is not None
        try:
            there = await cold.size(entry.digest) if self._tiers.shared else None
            if there != entry.size:
                await cold.put_file(entry.digest, blobs.path(entry.digest))
        except (errors.StoreUnavailable, FileNotFoundError) as e:
            log.warning("demoting %s to cold failed, it stays warm: %s", entry.digest, e)
            return False
        await self._index.call(self._index.record, entry.digest, "cold", entry.size, self._clock())
        return True

    async def _evict_cold(self, protected: set[Digest], report: PassReport) -> None:
        cold, most = self._config.cold, self._config.eviction.max_per_pass
        idle: list[Entry] = []
        if cold.max_idle:
            before = self._clock() - cold.max_idle
            idle = await self._index.call(self._index.idle, "cold", before, most)
            report.bounded |= len(idle) >= most
            idle = [e for e in idle if e.digest not in protected]
        used = self._tiers.usage.used("cold") - sum(e.size for e in idle)
        warm = self._config.warm
        target = target_bytes(used, cold.max_bytes, 1, 0, warm.high_watermark, warm.low_watermark)
        over = []
        if target is not None:
            spared = protected | {e.digest for e in idle}
            over = await self._plan("cold", cold.policy, used, target, spared)
        report.bounded |= len(over) >= most
        await self._drop("cold", idle + over)
        report.deleted += len(idle) + len(over)
        for reason, gone in (("idle", idle), ("budget", over)):
            if gone:
                nbytes = sum(e.size for e in gone)
                self._metrics.evicted("cold", reason, len(gone), nbytes)
                self._events.blob_evicted(
                    tier="cold",
                    reason=reason,
                    digests=[e.digest for e in gone],
                    nbytes=nbytes,
                    to=None,
                )

    async def _plan(
        self, tier: str, policy: str, used: int, target: int, protected: set[Digest]
    ) -> list[Entry]:
        """Victims chosen on the index thread, reading candidates in policy order."""
        order, most = POLICIES[policy].sql, self._config.eviction.max_per_pass

        def choose() -> list[Entry]:
            return plan(self._index.ordered(tier, order), used, target, protected, most)

        return await self._index.call(choose)

    async def _drop(self, tier: str, victims: list[Entry]) -> None:
        """Records first, then files: a crash in between leaves files that reconcile adopts.
        On a disk too full for SQLite's journal, files first (freeing the space the records
        need); a crash then leaves records without files, which a lookup treats as a miss and
        reconcile drops."""
        if not victims:
            return
        digests = [e.digest for e in victims]
        try:
            await self._index.call(self._index.forget_many, tier, digests)
        except sqlite3.OperationalError as e:
            log.warning("index cannot write (%s): removing the files first", e)
            await self._remove(tier, digests)
            await self._index.call(self._index.forget_many, tier, digests)
            return
        await self._remove(tier, digests)

    async def _remove(self, tier: str, digests: list[Digest]) -> None:
        if tier == "warm":
            # unlink releases the GIL: a few store threads at once get through thousands
            # faster; only a few, so that the event loop does not queue behind them for it
            blobs = self._tiers.blobs
            lanes = min(REMOVE_LANES, -(-len(digests) // REMOVE_BATCH))
            await asyncio.gather(
                *(blobs.run(blobs.remove, digests[i::lanes]) for i in range(lanes))
            )
            for d in digests:
                self._tiers.hot.drop(BlobKey(d))
        else:
            cold = self._tiers.cold
            assert cold is not None
            for digest in digests:
                await cold.delete(digest)
