"""The coordination seam: who does each piece of shared work, and how the others follow.

Everything that serves one cache shares four decisions:

    fill          who fetches a digest that is not cached, and how the others follow that
                  one fill from byte 0 (`fill`, `filling`, `fill_tasks` within a process;
                  `claim` across processes; `fill_lease` across replicas)
    once          who asks upstream about a tag, a manifest or a list while the others wait
                  for that answer (tag revalidation above all: one HEAD per TTL)
    eviction_turn who runs an eviction pass (one at a time); `leads`: who runs them periodically
    tags, tokens  where tag records and upstream tokens live
    budgets       each upstream's pull budget and 429 back-off, as last told to anyone

`HostCoordinator` (host.py) answers them for the processes of one host that share a data
directory (worker processes, admin commands): single-flight tasks within a process, and
across processes advisory locks on files that the kernel frees when a holder dies (claims.py
for fills); the tag store of the data directory; tokens in memory. `ClusterCoordinator`
(cluster.py) wraps it for replicas across hosts (`[cluster]`): tag records, upstream tokens,
pull budgets and each tag's turn to ask upstream in Redis, the rest the host's, and the
host's alone whenever Redis does not answer; and each fill's lease, so that one replica of the
cluster fetches a blob while the others stream its fill (peering.py: the internal endpoint).
Callers do not change; `mirror.cache.open_cache` is where the answer is chosen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Generic, NamedTuple, Protocol, TypeVar

from mirror.coordination.claims import Claim
from mirror.oci.reference import Digest
from mirror.store.keys import AnyTagKey, TagKey
from mirror.store.tags import TagRecord

S = TypeVar("S")
V = TypeVar("V")


class TagRecords(Protocol):
    """Tag → digest records, and when upstream last confirmed each (store/tags.py)."""

    def cached(self, key: AnyTagKey) -> TagRecord | None:
        """From memory only, without an await (the manifest hot path); None if not there."""
        ...

    async def get(self, key: AnyTagKey) -> TagRecord | None: ...

    async def confirmed(self, key: AnyTagKey) -> TagRecord | None:
        """The record as the shared store has it now (another process may have revalidated
        it since this one's copy in memory), kept in memory again."""
        ...

    async def put(self, key: AnyTagKey, record: TagRecord) -> None: ...

    async def drop(self, key: AnyTagKey) -> None: ...

    def all(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Blocking: every record (pins, retention, the catalog, export)."""
        ...


class TokenCache(Protocol):
    """Bearer tokens from upstream token realms, per upstream and scope, until they expire."""

    async def get(self, upstream: str, scope: str) -> str | None:
        """A live token; from memory without a wait when this process holds one."""
        ...

    async def put(self, upstream: str, scope: str, token: str, ttl: float) -> None: ...

    async def drop(self, upstream: str, scope: str, token: str) -> None:
        """`token` was refused upstream: forgotten where it is still the one kept (another
        process may have put a fresh one in its place meanwhile, which stays)."""
        ...


class PullBudgets(Protocol):
    """What upstreams said of their pull budgets (store/budgets.py), for every process."""

    async def told(self, upstream: str, remaining: int) -> int | None:
        """Upstream said `remaining` pulls are left; what was known before."""
        ...

    async def left(self, upstream: str) -> int | None: ...

    async def back_off(self, upstream: str, seconds: float) -> None: ...

    async def backing_off(self, upstream: str) -> float:
        """Seconds still to leave the upstream alone after a 429 (0: none)."""
        ...


class FillLease(Protocol):
    """The cluster's say over one digest's fetch, for the process that holds the host's claim
    on it (the one about to ask the source). Held until the fill commits or fails."""

    async def take(self) -> str | None:
        """None: this replica fetches the blob itself (it holds the lease now, or it is alone,
        or Redis does not answer); else the advertised URL of the replica that does, whose
        fill this one streams instead. Asked again when that stream breaks."""
        ...


class Joined(NamedTuple, Generic[S]):
    """A fill joined: its shared state, its task, and whether this call started it."""

    state: S
    task: asyncio.Task[None]
    started: bool


class Coordinator(Protocol):
    @property
    def tags(self) -> TagRecords: ...

    @property
    def cluster(self) -> str | None:
        """ "joined" or "standalone" for a replica of a cluster (whether it reaches the
        cluster's shared state now); None for a mirror that is not one."""
        ...

    async def start(self) -> None:
        """Begin what coordinating needs while serving, once the event loop runs (the
        cluster's connection and its probe); nothing is opened before then, so that worker
        processes each open their own after the fork."""
        ...

    async def stop(self) -> None:
        """End what `start` began."""
        ...

    @property
    def tokens(self) -> TokenCache: ...

    @property
    def budgets(self) -> PullBudgets: ...

    def fill(
        self, digest: Digest, state: Callable[[], S], work: Callable[[S], Awaitable[None]]
    ) -> Joined[S]:
        """The fill of `digest` in progress, or a new one: `state()` made and `work(state)`
        started, detached, by this call. A follower's going away never stops the work."""
        ...

    def filling(self) -> list[Digest]:
        """Digests being filled now (never evicted)."""
        ...

    def fill_state(self, digest: Digest) -> object | None:
        """The shared state of this process's fill of `digest` if one runs; never starts one
        (a peer replica asking must not make this one fetch)."""
        ...

    def fill_lease(self, digest: Digest) -> AbstractAsyncContextManager[FillLease]:
        """The cluster's lease on fetching `digest`, let go (if taken) on exit."""
        ...

    def fill_tasks(self) -> list[asyncio.Task[None]]: ...

    async def claim(self, digest: Digest) -> Claim:
        """Who fills `digest` for every process sharing the store: this one (`owned`), or
        another, whose fill this process then follows (claims.py)."""
        ...

    async def once(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The outcome of `work` for `key`, run by one caller while the others wait for it
        (errors shared too); True for a caller that waited on another's."""
        ...

    def eviction_turn(self) -> AbstractAsyncContextManager[None]:
        """Held while an eviction pass runs: passes never overlap."""
        ...

    async def leads(self, role: str) -> bool:
        """Whether this process is the one that does `role`'s periodic work (the evictor)."""
        ...

    def close(self) -> None:
        """Blocking: let go of every lock this process holds."""
        ...
