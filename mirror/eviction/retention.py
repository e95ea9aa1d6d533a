"""`[[retention]]`: tags past their repository's `keep_tags`, or not pulled for `max_idle`,
leave the cache, and so do their blobs that no kept tag or pin holds (the rules themselves
are `policy.expired_tags`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from mirror.coordination import TagRecords
from mirror.eviction.policy import Rule, expired_tags
from mirror.oci.reference import Digest
from mirror.store.index import BlobIndex, Entry
from mirror.store.manifests import ManifestStore
from mirror.store.pins import reachable_blobs


class Retention:
    def __init__(
        self,
        rules: Sequence[Rule],
        index: BlobIndex,
        tags: TagRecords,
        manifests: ManifestStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules
        self._index = index
        self._tags = tags
        self._manifests = manifests
        self._clock = clock

    async def expire(self, protected: set[Digest]) -> tuple[int, list[Entry]]:
        """Drop the expired tag records; return how many, and the warm blobs that only they
        held (the caller evicts those)."""
        if not self._rules:
            return 0, []
        pulled = await self._index.call(self._index.tags_pulled)
        records = dict(await asyncio.to_thread(lambda: list(self._tags.all())))
        last = {key: pulled.get(key, record.checked) for key, record in records.items()}
        expired = expired_tags(last, self._rules, self._clock())
        if not expired:
            return 0, []
        kept = [r.digest for key, r in records.items() if key not in expired]
        gone = [records[key].digest for key in expired]

        def doomed() -> set[Digest]:
            only_gone = reachable_blobs(self._manifests, gone)
            return only_gone - reachable_blobs(self._manifests, kept) - protected

        victims = await self._index.call(
            self._index.select, "warm", await asyncio.to_thread(doomed)
        )
        for key in expired:
            await self._tags.drop(key)
        await self._index.call(self._index.forget_tags, list(expired))
        return len(expired), victims
