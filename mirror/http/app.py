"""Wiring and lifecycle: builds the pieces from the Config and ties them to the aiohttp app.

Start: sweep partial files a crash left, reconcile the index with the files (a single process
does both itself; worker processes leave them to their supervisor, which does them once for the
host before any worker serves), start the coordinator (a cluster's Redis connection), open the
upstream session (and a replica's session to the other replicas), start the evictor, the sync
list, the access-count flusher and the webhook deliveries. Stop: let fills in flight finish,
then stop the deliveries (what they had not delivered stays queued), close the session, the
stores (committing pending events) and the thread pools.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mirror.cache import Cache, open_cache
from mirror.config import Config
from mirror.events.delivery import Deliveries
from mirror.eviction.evictor import Evictor
from mirror.http import admin as admin_api
from mirror.http import status
from mirror.http.access import PASSWORD_THREADS, Access
from mirror.http.cluster import ClusterRoutes
from mirror.http.middleware import make_answer, make_middleware
from mirror.http.routes import Routes
from mirror.http.sendfile import Pace
from mirror.metrics import Metrics
from mirror.ops.admin import Admin
from mirror.pull.ahead import Ahead
from mirror.pull.blobs import Blobs
from mirror.pull.holdings import Holdings
from mirror.pull.manifests import Manifests
from mirror.pull.peers import Peers
from mirror.pull.service import MirrorService
from mirror.pull.sync import Syncer
from mirror.store.reconcile import reconcile
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Router

#: Threads for blocking disk work (open, write+hash, fsync, SQLite).
STORE_THREADS = 16
#: Threads for os.sendfile: one per blob being sent right now.
SENDER_THREADS = 512
#: At shutdown, how long fills in flight may take to finish.
DRAIN_SECONDS = 30.0
#: With worker processes, how often each one writes its own state into the host's metrics
#: (a scrape reaches one worker and samples that one only).
SAMPLE_SECONDS = 5.0

log = logging.getLogger("mirror")

SERVICE = web.AppKey("service", MirrorService)
SYNC = web.AppKey("sync", Syncer)
CACHE = web.AppKey("cache", Cache)
METRICS = web.AppKey("metrics", Metrics)


def build_service(
    config: Config,
    cache: Cache,
    upstream: UpstreamClient,
    metrics: Metrics,
    peers: Peers | None = None,
) -> MirrorService:
    """The pull-through policy over this cache and upstream (and, for a replica of a
    cluster, the other replicas' fills)."""
    coordinator, tiers, events = cache.coordinator, cache.tiers, cache.events
    holdings = Holdings(config.auth.enabled, cache.index, upstream)
    manifests = Manifests(
        upstream, cache.manifests, coordinator, tiers.accesses, metrics, holdings, events
    )
    blobs = Blobs(
        upstream,
        tiers,
        cache.evictions,
        coordinator,
        metrics,
        config.limits,
        holdings,
        events,
        peers,
    )
    return MirrorService(manifests, blobs, Ahead(manifests, blobs, cache.blobs))


def build_app(
    config: Config, worker: int | None = None, workers: int = 1, deliver: bool = True
) -> web.Application:
    """The whole mirror as an aiohttp Application (tests run it in-process); `worker` is
    this process's index among `workers` worker processes, None for a single process;
    `deliver`: whether this process may deliver the events (False for a supervisor's workers:
    its deliverer, a process of its own, does)."""
    store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")
    sender_pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="sendfile")
    password_pool = ThreadPoolExecutor(PASSWORD_THREADS, thread_name_prefix="password")
    metrics = Metrics()
    metrics.prefill((u.name, u.credential) for u in config.upstreams)
    cache = open_cache(config, store_pool, metrics, serving=True, worker=worker, share=workers)
    events = cache.events
    upstream = UpstreamClient(
        config, metrics, cache.coordinator.tokens, events, cache.coordinator.budgets
    )
    peers = Peers(config) if config.cluster.enabled else None
    service = build_service(config, cache, upstream, metrics, peers)
    syncer = Syncer(config, service)
    evictor = Evictor(
        cache.evictions.evict_pass,
        config.eviction.interval,
        cache.usage.pressure,
        lambda: cache.coordinator.leads("evictor"),
    )
    admin = Admin(cache)
    deliveries = Deliveries(config.events, events, metrics, events.deliver_lock)

    answer = make_answer(metrics)
    app = web.Application(middlewares=[make_middleware(answer)], client_max_size=64 * 1024)
    app[SERVICE] = service
    app[METRICS] = metrics
    app[CACHE] = cache
    app[SYNC] = syncer
    t = config.timeouts
    pace = Pace(t.read, t.client_min_rate, t.rate_window)
    access = Access(config.auth, password_pool, metrics)
    routes = Routes(service, Router(config), sender_pool, pace, metrics, access, events)
    routes.install(app, answer)
    if config.cluster.enabled:
        ClusterRoutes(routes, service.blobs, config.cluster.secret).install(app)

    async def sample() -> None:
        """The gauges no update keeps current, brought up to date: this process's fills,
        descriptors and tasks, its memory tier, and warm's and cold's usage (the host's)."""
        events.tally()
        fds = await asyncio.to_thread(lambda: len(os.listdir("/proc/self/fd")))
        metrics.process(service.blobs.fetching(), fds, len(asyncio.all_tasks()))
        for tier, (nbytes, count) in (await admin.tiers()).items():
            metrics.tier_usage(tier, nbytes, count)

    async def sample_forever() -> None:
        """With worker processes: this one's state stays current in the host's metrics
        however long scrapes go to other workers."""
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            try:
                await sample()
            except (OSError, sqlite3.Error) as e:  # out of descriptors, a broken index
                log.warning("sampling this worker's state for the metrics failed: %s", e)

    async def metrics_handler(_: web.Request) -> web.Response:
        await sample()
        body = await asyncio.to_thread(metrics.render)  # every worker's files when several
        return web.Response(body=body, headers={"Content-Type": metrics.content_type})

    app.router.add_get(config.metrics_path, metrics_handler)
    status.install(app, config, admin, metrics, access, sample, lambda: cache.coordinator.cluster)
    if config.admin.enabled:
        admin_api.install(app, admin, config.admin, events)

    background: list[asyncio.Task[None]] = []

    async def on_startup(_: web.Application) -> None:
        if worker is None:
            await cache.blobs.run(cache.blobs.sweep)
            await reconcile(cache.blobs, cache.index, cache.usage)
        else:
            await cache.usage.refresh()
        await cache.coordinator.start()
        await upstream.start()
        if peers is not None:
            await peers.start()
        events.attach()
        if deliver:
            deliveries.start()
        evictor.start()
        syncer.start()
        flusher = cache.tiers.flush_forever(config.eviction.access_flush)
        background.append(asyncio.create_task(flusher))
        if metrics.multiprocess:
            background.append(asyncio.create_task(sample_forever()))

    async def on_shutdown(_: web.Application) -> None:
        await service.blobs.drain(DRAIN_SECONDS)
        await cache.tiers.finish_uploads(DRAIN_SECONDS)

    async def on_cleanup(_: web.Application) -> None:
        await syncer.stop()
        await evictor.stop()
        for task in background:
            task.cancel()
        await cache.tiers.flush_accesses()
        await deliveries.stop()
        events.detach()
        await upstream.close()
        if peers is not None:
            await peers.close()
        await cache.coordinator.stop()
        await asyncio.to_thread(cache.close)
        sender_pool.shutdown(wait=False, cancel_futures=True)
        password_pool.shutdown(wait=False, cancel_futures=True)
        store_pool.shutdown(wait=True)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
