"""The Redis client of what `[cluster] redis_url` names (mirror/redis_url.py), with the bounds
cluster.py's failure semantics need: every socket operation within the call's timeout and no
retries, so that a failed call is the replica's signal to serve standalone and the probe its
way back, for whichever topology is behind the URL.

    one Redis       redis-py's client from the URL, as given
    Sentinel        the master Sentinel names for the service, asked of the Sentinels again
                    on each new connection: a failover breaks the connections to the old
                    master (standalone), and the probe's next connection is the new master's
                    (joined again). A Sentinel that does not answer is skipped for the next
                    one; each is given its share of the call's time, so that a discovery that
                    passes by dead ones still ends within the call.
    Redis Cluster   redis-py's cluster client from the startup nodes: each key's command goes
                    to the primary of its slot. Every key the mirror writes is a command of
                    its own on one key (the Lua scripts and redis-py's Lock included), so any
                    slot layout works; SCAN of the members goes to every primary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from mirror.redis_url import redis_target

#: The client a replica asks: one Redis (Sentinel's master is one too) or a Redis Cluster.
Client = Redis | RedisCluster


def _bounds(timeout: float) -> dict[str, Any]:
    """Socket and connect timeouts of `timeout`, and no retry: the caller decides what a
    failure means."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def open_client(
    url: str, client_name: str, timeout: float
) -> tuple[Client, Callable[[], Awaitable[None]]]:
    """The client of `url` (checked at start: it parses) and how to close all it opened. It
    connects on its first call. The URL's query options win over the bounds, as redis-py's
    `from_url` has them."""
    target = redis_target(url)
    bounds = _bounds(timeout)
    if target.topology == "instance":
        single = Redis.from_url(url, **bounds, client_name=client_name)
        return single, single.aclose
    options = {**bounds, "client_name": client_name, **target.options}
    if target.topology == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        cluster = RedisCluster(startup_nodes=nodes, **options)
        return cluster, cluster.aclose
    tls = {k: v for k, v in target.options.items() if k.startswith("ssl")}
    asked = _bounds(timeout / (len(target.nodes) + 1))  # the master's connect keeps a share
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        target.nodes, sentinel_kwargs={**asked, **tls, **target.sentinel}
    )
    master: Redis = sentinel.master_for(target.service, **options)

    async def close() -> None:
        try:
            await master.aclose()
        finally:
            await sentinel.aclose()

    return master, close
