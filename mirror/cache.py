"""The whole cache of one data directory, opened: store, tiers, eviction passes, the
coordinator that decides who does the shared work, and the events emitter (its queues live
in the data directory too).

`open_cache` opens it the same way for the server, the admin commands and bundle import and
export. It is safe to open while a mirror serves the same data directory: SQLite in WAL mode
and diskcache take writers from several processes, and blob files are only ever renamed into
place or unlinked. This is also where the coordinator is chosen: the processes of one host,
and for the server of a replica with `[cluster]` the cluster's around them (admin commands
act on this host's data directory and keep to the host's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import diskcache

from mirror.config import Config
from mirror.coordination import Coordinator
from mirror.coordination.cluster import ClusterCoordinator
from mirror.coordination.host import HostCoordinator
from mirror.events import Events
from mirror.eviction.passes import Evictions
from mirror.metrics import Metrics
from mirror.policies import POLICIES
from mirror.store.blobs import BlobStore
from mirror.store.budgets import BudgetStore
from mirror.store.cold import ColdStore
from mirror.store.hot import HotTier
from mirror.store.index import BlobIndex
from mirror.store.layout import Layout
from mirror.store.manifests import ManifestStore
from mirror.store.tags import TagStore
from mirror.store.tiers import Tiers
from mirror.store.usage import Usage


@dataclass(frozen=True)
class Cache:
    """Every part of one data directory's cache, opened."""

    layout: Layout
    blobs: BlobStore
    index: BlobIndex
    manifests: ManifestStore
    tiers: Tiers
    usage: Usage
    coordinator: Coordinator
    evictions: Evictions
    events: Events
    _meta: diskcache.Cache

    def close(self) -> None:
        """Blocking: finish the index's queued work and close it, then the metadata cache;
        commit the events still pending."""
        self.index.close()
        self._meta.close()
        self.events.close()
        self.coordinator.close()


def open_cache(
    config: Config,
    pool: ThreadPoolExecutor,
    metrics: Metrics,
    serving: bool = False,
    worker: int | None = None,
    share: int = 1,
) -> Cache:
    """The cache of `config.data_dir` (blocking work runs in `pool`); `serving` for the
    server's own (its events go to a journal named for it, which only it writes); `worker` for one
    of several serving processes on this data directory (its index, 0…N-1, the same for the
    process started in a dead one's place), None for the only one. `share`: the worker
    processes that serve it, which split the hot tier's budget (each keeps its own copy in
    memory: the budget is the host's)."""
    if worker is not None and (not serving or worker < 0):
        raise ValueError(f"a worker is a serving process with an index from 0, got {worker!r}")
    layout = Layout(config.data_dir)
    layout.create()
    events = Events(
        config.events,
        metrics,
        layout.events_journal,
        layout.events_cursors,
        layout.events_deliver,
        serving,
        worker,
    )
    hot = HotTier(config.hot.max_bytes // share)
    meta = diskcache.Cache(str(layout.meta), eviction_policy="none", size_limit=2**62)
    index = BlobIndex(
        layout.index, [POLICIES[config.warm.policy].sql, POLICIES[config.cold.policy].sql]
    )
    blobs = BlobStore(layout, pool)
    usage = Usage(config.warm, index, blobs)
    # a cluster's replicas share the cold tier (admin commands keep to their host's index)
    shared = serving and config.cluster.enabled
    cold = ColdStore.from_config(config.cold, quick=shared)
    tiers = Tiers(config.hot, blobs, hot, index, usage, metrics, events, cold, shared=shared)
    manifests = ManifestStore(meta, pool, hot)
    host = HostCoordinator(
        layout, TagStore(meta, pool, hot), BudgetStore(meta, pool), pool, processes=share
    )
    coordinator: Coordinator = (
        ClusterCoordinator(host, config.cluster, metrics)
        if serving and config.cluster.enabled
        else host
    )
    evictions = Evictions(config, tiers, manifests, coordinator, metrics, events)
    return Cache(
        layout, blobs, index, manifests, tiers, usage, coordinator, evictions, events, meta
    )


@contextlib.contextmanager
def opened_cache(config: Config, threads: int = 4) -> Iterator[Cache]:
    """`open_cache` for a command: its own thread pool and metrics, all closed on exit (use it
    outside the event loop: closing blocks)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="store")
    cache = open_cache(config, pool, Metrics())
    try:
        yield cache
    finally:
        cache.close()
        pool.shutdown()
