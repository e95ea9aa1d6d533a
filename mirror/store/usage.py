"""How full each tier is, and how much room warm's filesystem has left.

Bytes and blob counts per tier come from the index (kept by triggers there, so writers in
other processes — admin commands, an import — are counted too) and are refreshed before each
eviction pass; a commit adds its blob at once, so the high watermark is noticed without
waiting for the next pass, and the evictor is woken (`pressure`).
"""

from __future__ import annotations

import asyncio
import os

from mirror.config import WarmConfig
from mirror.store.blobs import BlobStore
from mirror.store.index import BlobIndex


class Usage:
    def __init__(self, warm: WarmConfig, index: BlobIndex, blobs: BlobStore) -> None:
        self._warm = warm
        self._index = index
        self._blobs = blobs
        #: (bytes, blobs) per tier, as of the last refresh plus commits since.
        self.tiers: dict[str, tuple[int, int]] = {}
        #: Set when warm crosses its high watermark: the evictor waits on it.
        self.pressure = asyncio.Event()

    async def refresh(self) -> dict[str, tuple[int, int]]:
        self.tiers = await self._index.call(self._index.usage)
        return self.tiers

    def used(self, tier: str) -> int:
        return self.tiers.get(tier, (0, 0))[0]

    def added(self, nbytes: int) -> None:
        """A blob of `nbytes` was committed to warm."""
        used, count = self.tiers.get("warm", (0, 0))
        self.tiers["warm"] = (used + nbytes, count + 1)
        budget = self._warm.max_bytes
        if budget and used + nbytes > self._warm.high_watermark * budget:
            self.pressure.set()

    async def disk(self) -> tuple[int, int]:
        """Size and free bytes (for unprivileged users) of warm's filesystem."""
        st = await self._blobs.run(os.statvfs, self._blobs.layout.blobs)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    async def room(self) -> int:
        """Bytes warm may still take before its filesystem reaches the free-space floor."""
        _, free = await self.disk()
        return free - self._warm.min_free_bytes
