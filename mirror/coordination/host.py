"""Coordination among the processes of one host that serve one data directory: worker
processes, and the admin commands and imports that run beside them.

Within a process, a fill and an upstream question are single-flight tasks (flights.py). Across
processes, the kernel decides with advisory locks it frees when a holder dies:

- fill: the process holding a digest's fill lock fetches it; the others follow its partial
  file from byte 0 (claims.py, used by pull/fill.py). A `kill -9` of the holder frees the
  lock and a follower carries the fill on from what the file holds.
- once: the caller that runs `work` holds a lock for its key while it runs, so a process that
  asks the same question meanwhile waits, then finds the answer the first one stored (the tag
  record on disk) instead of asking upstream again: one HEAD per TTL per host. Keys share
  `STRIPES` lock files (a stable hash picks one), so there is no file per key.
- eviction_turn: one lock for the host; `leads` names the one process that runs periodic
  passes (the evictor), taken over by another when it dies.

Tag records and pull budgets live in the data directory's diskcache (store/tags.py,
store/budgets.py), which every process reads; upstream tokens stay in each process's memory
(a token request costs no pull; a cluster's replicas share them through Redis, cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from mirror.bounded import Bounded
from mirror.coordination import FillLease, Joined, PullBudgets, TagRecords
from mirror.coordination.claims import Claim
from mirror.coordination.flights import Flights
from mirror.locks import FileLock, hold, try_hold
from mirror.oci.reference import Digest
from mirror.store.layout import Layout
from mirror.store.offload import offload

S = TypeVar("S")
V = TypeVar("V")

#: Tokens kept at most (one per upstream and repository scope); past it they are all fetched
#: anew, so a client naming endless repositories cannot grow the process.
TOKENS_KEPT = 4096
#: Lock files that `once` keys are spread over.
STRIPES = 256
#: Threads that may wait for a host lock at once (a wait blocks its thread).
LOCK_WAITERS = 32


class MemoryTokens:
    """Tokens in process memory, each until its expiry (monotonic clock). Async to be one
    `TokenCache` with the cluster's (cluster.py, which may ask Redis); nothing here awaits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: Bounded[tuple[str, str], tuple[str, float]] = Bounded(TOKENS_KEPT)

    async def get(self, upstream: str, scope: str) -> str | None:
        entry = self._tokens.get((upstream, scope))
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def put(self, upstream: str, scope: str, token: str, ttl: float) -> None:
        self._tokens.remember((upstream, scope), (token, self._clock() + ttl))

    async def drop(self, upstream: str, scope: str, token: str) -> None:
        entry = self._tokens.get((upstream, scope))
        if entry is not None and entry[0] == token:
            self._tokens.forget((upstream, scope))

    def __len__(self) -> int:
        return len(self._tokens)


class Alone:
    """The fill lease of a mirror that is no replica: nobody else to stream from."""

    async def take(self) -> str | None:
        return None


ALONE = Alone()


def stripe(key: Hashable) -> int:
    """The lock file of a `once` key: the same in every process (str hashes are not)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % STRIPES


class HostCoordinator:
    def __init__(
        self,
        layout: Layout,
        tags: TagRecords,
        budgets: PullBudgets,
        executor: ThreadPoolExecutor,
        processes: int = 1,
    ) -> None:
        #: Server processes sharing the data directory: with one, `once` needs no host lock
        #: (admin commands never ask upstream about tags).
        self._processes = processes
        self.tags = tags
        self.budgets = budgets
        self.tokens = MemoryTokens()
        self._layout = layout
        self._executor = executor
        self._waiters = ThreadPoolExecutor(LOCK_WAITERS, thread_name_prefix="lock-wait")
        self._fills: Flights[Digest, Any, None] = Flights()
        self._once: Flights[Hashable, None, Any] = Flights()
        self._evicting = asyncio.Lock()
        self._leading: dict[str, FileLock] = {}

    @property
    def cluster(self) -> str | None:
        return None

    async def start(self) -> None:
        """Nothing to begin: files and locks are opened as they are needed."""

    async def stop(self) -> None:
        """Nothing to end (`close` lets go of the locks)."""

    def fill(
        self, digest: Digest, state: Callable[[], S], work: Callable[[S], Awaitable[None]]
    ) -> Joined[S]:
        st, task, started = self._fills.join(digest, state, work)
        return Joined(st, task, started)

    def filling(self) -> list[Digest]:
        return self._fills.keys()

    def fill_tasks(self) -> list[asyncio.Task[None]]:
        return self._fills.tasks()

    def fill_state(self, digest: Digest) -> object | None:
        return self._fills.state(digest)

    def fill_lease(self, digest: Digest) -> AbstractAsyncContextManager[FillLease]:
        """A host alone: the holder of the host's claim always fetches itself."""
        return contextlib.nullcontext(ALONE)

    async def claim(self, digest: Digest) -> Claim:
        """The host-wide fill of `digest`: held by this process now, or watched."""
        return await offload(self._executor, Claim, self._layout, digest)

    async def once(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        async def held() -> V:
            if self._processes == 1:
                return await work()
            lock = await self._take(f"once-{stripe(key):03d}")
            try:
                return await work()
            finally:
                await offload(self._executor, lock.close)

        result, followed = await self._once.run(key, held)
        return result, followed

    def eviction_turn(self) -> AbstractAsyncContextManager[None]:
        return self._eviction_turn()

    @contextlib.asynccontextmanager
    async def _eviction_turn(self) -> AsyncIterator[None]:
        async with self._evicting:
            lock = await self._take("evict")
            try:
                yield
            finally:
                await offload(self._executor, lock.close)

    async def leads(self, role: str) -> bool:
        """Whether this process is the host's one `role` (the evictor): it becomes so when
        no live process is, and stays so until it exits."""
        if role in self._leading:
            return True
        got, lock = await offload(self._executor, try_hold, self._layout.locks / f"{role}.lead")
        if not got:
            await offload(self._executor, lock.close)
            return False
        self._leading[role] = lock
        return True

    async def _take(self, name: str) -> FileLock:
        """Hold run/locks/<name>: taken at once in a store thread when it is free (the common
        case), else waited for in a thread of its own, never on the loop."""
        path = self._layout.locks / f"{name}.lock"
        got, lock = await offload(self._executor, try_hold, path)
        if got:
            return lock
        await offload(self._executor, lock.close)
        waiting = asyncio.get_running_loop().run_in_executor(self._waiters, hold, path)
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:  # the wait goes on in its thread: let go once got
            waiting.add_done_callback(_release_when_got)
            raise

    def close(self) -> None:
        """Blocking: let go of what this process leads."""
        for lock in self._leading.values():
            lock.close()
        self._leading.clear()
        self._waiters.shutdown(wait=False, cancel_futures=True)


def _release_when_got(waiting: asyncio.Future[FileLock]) -> None:
    if not waiting.cancelled() and waiting.exception() is None:
        waiting.result().close()
