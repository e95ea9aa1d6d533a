"""Wiring and lifecycle: builds the pieces from the Config and ties them to the aiohttp app.

Start: create the store's folders, sweep partial files a crash left, open the upstream
session. Stop: close the session, the metadata store and the thread pools.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mirror.admin import Admin
from mirror.config import Config
from mirror.eviction import Evictor
from mirror.http import admin as admin_api
from mirror.http import status
from mirror.http.access import Access
from mirror.http.middleware import make_middleware
from mirror.http.routes import Routes
from mirror.metrics import Metrics
from mirror.service import MirrorService
from mirror.store.tiers import Tiers, open_tiers
from mirror.sync import Syncer, pin_patterns
from mirror.upstream.client import UpstreamClient
from mirror.upstream.routing import Router

#: Threads for blocking disk work (open, write+hash, fsync, SQLite).
STORE_THREADS = 16
#: Threads for os.sendfile: one per blob being sent right now.
SENDER_THREADS = 512
#: At shutdown, how long fills in flight may take to finish.
DRAIN_SECONDS = 30.0

SERVICE = web.AppKey("service", MirrorService)
SYNC = web.AppKey("sync", Syncer)
TIERS = web.AppKey("tiers", Tiers)
METRICS = web.AppKey("metrics", Metrics)


def build_app(config: Config) -> web.Application:
    """The whole mirror as an aiohttp Application (tests run it in-process)."""
    store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")
    sender_pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="sendfile")
    tiers, manifests = open_tiers(config, store_pool)
    blobs, hot, index = tiers.blobs, tiers.hot, tiers.index
    evictor = Evictor(tiers.evict_pass, config.eviction.interval)
    tiers.on_pressure = evictor.wake
    metrics = Metrics()
    tiers.extra_pins = pin_patterns(config)
    metrics.prefill((u.name, u.username or "anonymous") for u in config.upstreams)
    upstream = UpstreamClient(config, metrics)
    service = MirrorService(
        upstream, tiers, manifests, metrics=metrics, max_fills=config.limits.max_fills
    )
    syncer = Syncer(config, service)

    app = web.Application(middlewares=[make_middleware(metrics)], client_max_size=64 * 1024)
    app[SERVICE] = service
    app[METRICS] = metrics
    app[TIERS] = tiers
    app[SYNC] = syncer
    Routes(
        service,
        Router(config),
        blobs,
        sender_pool,
        config.timeouts.read,
        metrics,
        Access(config.auth),
    ).install(app)

    tiers.on_evicted = metrics.evicted

    async def metrics_handler(_: web.Request) -> web.Response:
        metrics.fills.set(service.fills_in_flight())
        metrics.tier_usage("hot", hot.used, len(hot))
        metrics.open_fds.set(len(os.listdir("/proc/self/fd")))
        metrics.tasks.set(len(asyncio.all_tasks()))
        for tier, (nbytes, count) in (await tiers.refresh_usage()).items():
            metrics.tier_usage(tier, nbytes, count)
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app.router.add_get(config.metrics_path, metrics_handler)
    admin = Admin(tiers, manifests)
    status.install(app, config, tiers, admin, metrics)
    if config.admin.enabled:
        admin_api.install(app, admin, config.admin)

    background: list[asyncio.Task[None]] = []

    async def on_startup(_: web.Application) -> None:
        await blobs.run(blobs.sweep)
        await tiers.reconcile()
        await upstream.start()
        evictor.start()
        syncer.start()
        background.append(asyncio.create_task(tiers.flush_forever(config.eviction.access_flush)))

    async def on_shutdown(_: web.Application) -> None:
        await service.drain(DRAIN_SECONDS)

    async def on_cleanup(_: web.Application) -> None:
        await syncer.stop()
        await evictor.stop()
        for task in background:
            task.cancel()
        await tiers.flush_accesses()
        await upstream.close()
        await asyncio.to_thread(index.close)
        manifests.close()
        sender_pool.shutdown(wait=False, cancel_futures=True)
        store_pool.shutdown(wait=True)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
