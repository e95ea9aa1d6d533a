"""Coordination within one process: the first implementation of the seam (see __init__).

Fills and upstream questions are single-flight tasks (flights.py); eviction passes take an
asyncio lock; tag records are the data directory's own (store/tags.py); tokens live in a
bounded dict in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from mirror.bounded import Bounded
from mirror.coordination import Joined, TagRecords
from mirror.coordination.flights import Flights
from mirror.oci.reference import Digest

S = TypeVar("S")
V = TypeVar("V")

#: Tokens kept at most (one per upstream and repository scope); past it they are all fetched
#: anew, so a client naming endless repositories cannot grow the process.
TOKENS_KEPT = 4096


class MemoryTokens:
    """Tokens in process memory, each until its expiry (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: Bounded[tuple[str, str], tuple[str, float]] = Bounded(TOKENS_KEPT)

    def get(self, upstream: str, scope: str) -> str | None:
        entry = self._tokens.get((upstream, scope))
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def put(self, upstream: str, scope: str, token: str, ttl: float) -> None:
        self._tokens.remember((upstream, scope), (token, self._clock() + ttl))

    def drop(self, upstream: str, scope: str) -> None:
        self._tokens.forget((upstream, scope))

    def __len__(self) -> int:
        return len(self._tokens)


class LocalCoordinator:
    def __init__(self, tags: TagRecords, tokens: MemoryTokens | None = None) -> None:
        self.tags = tags
        self.tokens = tokens or MemoryTokens()
        self._fills: Flights[Digest, Any, None] = Flights()
        self._once: Flights[Hashable, None, Any] = Flights()
        self._evicting = asyncio.Lock()

    def fill(
        self, digest: Digest, state: Callable[[], S], work: Callable[[S], Awaitable[None]]
    ) -> Joined[S]:
        st, task, started = self._fills.join(digest, state, work)
        return Joined(st, task, started)

    def filling(self) -> list[Digest]:
        return self._fills.keys()

    def fill_tasks(self) -> list[asyncio.Task[None]]:
        return self._fills.tasks()

    async def once(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        result, followed = await self._once.run(key, work)
        return result, followed

    def eviction_turn(self) -> AbstractAsyncContextManager[None]:
        return self._evicting
