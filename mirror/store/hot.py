"""The hot tier: one byte-bounded LRU in process memory, shared by manifests, tag records and
small blobs, so a single budget (`[hot] max_bytes`) bounds them all.

Hot is always a copy of something warm holds on disk, never the only copy: dropping an entry
costs a disk read later, never data. aiocache's memory backend bounds entries, not bytes, and
every lookup through it is a coroutine; the manifest hot path answers without an await, so this
is a plain OrderedDict with the sizes accounted here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mirror.store.keys import HotKey

#: What a key-value pair costs besides its payload (dict slot, tuple key, object headers).
OVERHEAD = 200


class HotTier:
    """Least recently used entries leave first once `budget` bytes are exceeded."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._data: OrderedDict[HotKey, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: HotKey) -> Any:
        """The value, marked most recently used; None when absent."""
        found = self._data.get(key)
        if found is None:
            return None
        self._data.move_to_end(key)
        return found[0]

    def put(self, key: HotKey, value: Any, nbytes: int = 0) -> None:
        """Keep `value` (payload `nbytes`), then evict from the cold end down to the budget.
        An entry larger than the whole budget is not kept at all."""
        self.drop(key)
        cost = nbytes + OVERHEAD
        if cost > self.budget:
            return
        self._data[key] = (value, cost)
        self.used += cost
        while self.used > self.budget:
            _, (_, old) = self._data.popitem(last=False)
            self.used -= old

    def drop(self, key: HotKey) -> None:
        found = self._data.pop(key, None)
        if found is not None:
            self.used -= found[1]
