"""Each upstream's pull budget as the host knows it: the pulls its last answer said are left
(Docker Hub's `ratelimit-remaining`) and until when it is left alone after a 429, in the data
directory's diskcache (under meta/) so that every worker process reads what any of them was
last told: one budget per upstream credential for the host, not one per process.

On disk: ("budget", upstream) → pulls left; ("backoff", upstream) → until when (wall clock).
What this process read is reused for `FRESH` seconds: a burst of failing requests does not
read the disk for each one, and another process's 429 is seen within that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor

import diskcache

from mirror.store.offload import offload

#: Seconds a value read from disk is used before it is read again.
FRESH = 1.0


class BudgetStore:
    def __init__(
        self, disk: diskcache.Cache, executor: Executor, clock: Callable[[], float] = time.time
    ) -> None:
        self._disk = disk
        self._executor = executor
        self._clock = clock
        #: key → (value, when read), for FRESH seconds.
        self._read: dict[tuple[str, str], tuple[float | None, float]] = {}

    async def _get(self, key: tuple[str, str]) -> float | None:
        now = self._clock()
        held = self._read.get(key)
        if held is not None and now - held[1] < FRESH:
            return held[0]
        value: float | None = await offload(self._executor, self._disk.get, key)
        self._read[key] = (value, now)
        return value

    async def told(self, upstream: str, remaining: int) -> int | None:
        """Upstream said `remaining` pulls are left; what was known before (None: nothing).
        This process knows it at once, before the disk does: its next request, which may come
        before the write lands, must not act on what it read earlier."""
        self._read[("budget", upstream)] = (remaining, self._clock())
        return await offload(self._executor, self._swap, ("budget", upstream), remaining)

    def _swap(self, key: tuple[str, str], value: int) -> int | None:
        with self._disk.transact():
            before: int | None = self._disk.get(key)
            self._disk.set(key, value)
        self._read[key] = (value, self._clock())
        return before

    async def left(self, upstream: str) -> int | None:
        """Pulls left as last told, by any process; None if never told."""
        found = await self._get(("budget", upstream))
        return None if found is None else int(found)

    async def back_off(self, upstream: str, seconds: float) -> None:
        """Upstream answered 429: leave it alone for `seconds`."""
        until = self._clock() + seconds
        self._read[("backoff", upstream)] = (until, self._clock())
        await offload(self._executor, self._disk.set, ("backoff", upstream), until)

    async def backing_off(self, upstream: str) -> float:
        """Seconds still to leave it alone (0: none)."""
        until = await self._get(("backoff", upstream))
        return max(0.0, until - self._clock()) if until is not None else 0.0
