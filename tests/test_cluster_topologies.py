"""Cluster mode behind the other topologies `redis_url` names, with real engines: a Redis
Cluster of three `redis-server --cluster-enabled yes` primaries (the slots split among them),
and a master, its replica and a Sentinel watching them; three `mirror serve` replicas against
the upstream simulator, as in test_cluster.py.

On a Redis Cluster: one HEAD per tag TTL, one upstream GET per blob for the whole cluster,
every replica a member. Through Sentinel: the same, then the master killed with -9: the
Sentinel promotes the replica, every mirror replica is standalone meanwhile and joins the new
master, and one HEAD per TTL holds again. Neither URL's passwords reach a log; bad Sentinel and
Cluster URLs stop the start naming the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MirrorProcess, RedisClusterNodes, RedisSentinelSet
from images import make_image
from test_cluster import (
    REPLICAS,
    MiB,
    _cluster_up,
    _fetch,
    _get,
    _pull,
    _pull_through_all,
    _replicas,
    _ttl_passes,
    _until_cluster,
)
from upstream_sim import UpstreamSim

from mirror.config import load_config
from mirror.errors import ConfigError
from mirror.redis_url import redis_target


def _no_password_logged(procs: list[MirrorProcess], *passwords: str) -> None:
    for proc in procs:
        log = proc.log.read_text()
        assert "cluster: joined through Redis" in log
        for password in passwords:
            assert password not in log, "a Redis password is never logged"


async def test_on_a_redis_cluster_a_tag_past_its_ttl_costs_one_head(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_cluster: RedisClusterNodes,
    tmp_path: Path,
) -> None:
    """redis+cluster:// of three primaries: a tag one replica fetched is a record the others
    use, and past its TTL 30 pulls over the three cost one upstream HEAD (the tag's turn is
    redis-py's Lock on the primary of its slot). Every replica is a member, wherever the
    slots put its key."""
    image = make_image(31, [4096])
    sim.add_image("c/sharded", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_cluster, tmp_path)
    path = "/v2/c/sharded/manifests/v1"
    for proc in procs:
        assert await _get(proc.url + path) == (200, image.data)
    assert sim.requests[("GET", path)] == 1, sim.requests
    await _ttl_passes()
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] == 1, sim.requests
    await _ttl_passes()
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] == 2, sim.requests
    members = set().union(*redis_cluster.holders("mirror:member:*").values())
    assert members == {f"mirror:member:{p.url}" for p in procs}
    (tag,) = [keys for keys in redis_cluster.holders("mirror:tag:*").values() if keys]
    assert tag == {"mirror:tag:docker.io/c/sharded:v1"}
    for proc in procs:
        assert await _cluster_up(proc) == 1
    _no_password_logged(procs, redis_cluster.nodes[0].password)


async def test_on_a_redis_cluster_thirty_clients_cost_one_upstream_get_of_a_blob(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_cluster: RedisClusterNodes,
    tmp_path: Path,
) -> None:
    """Ten clients on each replica ask for one uncached 16 MiB blob at once: one upstream
    GET (the fill's lease, taken with SET NX and renewed with a script on the primary of its
    slot), the others stream the owner's fill, and the lease is let go at the commit."""
    blob = os.urandom(16 * MiB)
    digest = sim.add_blob(blob)
    procs = await _replicas(mirror_process, sim, redis_cluster, tmp_path)
    path = f"/v2/c/sharded/blobs/{digest}"
    bodies = await asyncio.gather(
        *(_pull(procs[i % REPLICAS].url + path, len(blob)) for i in range(30))
    )
    assert all(body == blob for body in bodies), "every client got the right bytes"
    assert sim.requests[("GET", path)] == 1, sim.requests
    streamed = [p for p in procs if "streaming " + digest in p.log.read_text()]
    assert len(streamed) == REPLICAS - 1, "the others streamed the owner's fill"
    for proc in procs:
        status, headers, body = await _fetch(proc.url + path)
        assert (status, headers["X-Mirror-Cache"], body == blob) == (200, "hit", True)
    assert not any(redis_cluster.holders("mirror:fill:*").values()), "the lease was let go"


async def _sentinel_says(sentinel: RedisSentinelSet, port: int, timeout: float = 30) -> None:
    """Poll the Sentinel until it names the master on `port`."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(sentinel.master_port) != port:
        assert time.monotonic() < deadline, "the Sentinel promoted no replica in time"
        await asyncio.sleep(0.1)  # ok: polling a condition with a deadline


async def test_through_sentinel_replicas_follow_a_failover_to_the_promoted_master(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_sentinel: RedisSentinelSet,
    tmp_path: Path,
) -> None:
    """redis+sentinel:// naming the Sentinel and the service: the replicas join the master
    (its password theirs, the Sentinel's its own) and one HEAD per TTL holds. The master
    killed with -9: the Sentinel promotes the replica; every mirror replica is standalone
    meanwhile and serves on, then joins the promoted master, and one HEAD per TTL holds again,
    the records in the new master."""
    image = make_image(32, [4096])
    sim.add_image("c/failover", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_sentinel, tmp_path)
    path = "/v2/c/failover/manifests/v1"
    await _pull_through_all(procs, path, image.data, 3)
    await _ttl_passes()
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] == 1, sim.requests
    record = redis_sentinel.master.ask("GET", "mirror:tag:docker.io/c/failover:v1")
    assert json.loads(record)["digest"] == str(image.digest)

    await asyncio.to_thread(redis_sentinel.master.stop, 9)
    await _until_cluster(procs, "standalone")
    await _pull_through_all(procs, path, image.data, 6)  # standalone, each its own answer
    await _sentinel_says(redis_sentinel, redis_sentinel.replica.port)
    await _until_cluster(procs, "joined", timeout=30)
    for proc in procs:
        assert await _cluster_up(proc) == 1
        log = proc.log.read_text()
        assert log.count("serving standalone until it does") == 1, log[-3000:]
        assert log.count("cluster: joined through Redis") == 2, log[-3000:]
    await _pull_through_all(procs, path, image.data, 3)
    await _ttl_passes()
    heads = sim.requests[("HEAD", path)]
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] - heads == 1, sim.requests
    promoted = redis_sentinel.replica
    assert (promoted.ask("INFO", "replication") or {}).get("role") == "master"
    record = promoted.ask("GET", "mirror:tag:docker.io/c/failover:v1")
    assert json.loads(record)["digest"] == str(image.digest)
    members = {k.decode() for k in promoted.ask("KEYS", "mirror:member:*")}
    assert members == {f"mirror:member:{p.url}" for p in procs}
    _no_password_logged(procs, redis_sentinel.master.password, redis_sentinel.sentinel.password)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service name
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel:///mymaster",  # no host
        "redis+sentinel://:hunter2@/mymaster",
        "redis+sentinel://127.0.0.1:26379/mymaster/zero",  # no database number
        "redis+sentinel://127.0.0.1:26379/mymaster/0/more",
        "redis+sentinel://127.0.0.1:99999/mymaster",
        "redis+sentinel://127.0.0.1:26379/mymaster?socket_timeout=soon",
        "redis+cluster://",  # no host
        "redis+cluster://:hunter2@",
        "redis+cluster://127.0.0.1:7000,,127.0.0.1:port",
        "redis+cluster://127.0.0.1:7000/1",  # a cluster has database 0 only
        "redis+cluster://127.0.0.1:7000?db=2",
        "redis+cluster://127.0.0.1:7000?sentinel_password=hunter2",
        "sentinel://127.0.0.1:26379/mymaster",  # wrong scheme
        "redis-sentinel://127.0.0.1:26379/mymaster",
        "cluster://127.0.0.1:7000",
    ],
)
def test_bad_sentinel_and_cluster_urls_are_refused_naming_the_key(tmp_path: Path, url: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[cluster]\nredis_url = "{url}"\nadvertise = "http://a.example:5000"\n'
        f'secret = "{"s" * 32}"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith("cluster.redis_url:"), info.value
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "topology", "nodes", "service"),
    [
        (
            "redis+sentinel://s1.example,s2.example:26380/mymaster",
            "sentinel",
            (("s1.example", 26379), ("s2.example", 26380)),
            "mymaster",
        ),
        (
            "rediss+sentinel://:pw@[::1]:26379/mymaster/3?ssl_cert_reqs=none",
            "sentinel",
            (("::1", 26379),),
            "mymaster",
        ),
        ("redis+cluster://n1.example:7000", "cluster", (("n1.example", 7000),), ""),
        (
            "rediss+cluster://user:pw@n1.example:7000,n2.example?socket_keepalive=yes",
            "cluster",
            (("n1.example", 7000), ("n2.example", 6379)),
            "",
        ),
    ],
)
def test_sentinel_and_cluster_urls_are_taken(
    tmp_path: Path, url: str, topology: str, nodes: tuple[tuple[str, int], ...], service: str
) -> None:
    """A port left out is the default one (a Sentinel's 26379); the credentials, database and
    query options are redis-py's reading of them."""
    path = tmp_path / "good.toml"
    path.write_text(
        f'[cluster]\nredis_url = "{url}"\nadvertise = "http://a.example:5000"\n'
        f'secret = "{"s" * 32}"\n'
    )
    config = load_config(path, env={})
    assert config.cluster.enabled and config.cluster.redis_url == url
    target = redis_target(config.cluster.redis_url)
    assert (target.topology, target.nodes, target.service) == (topology, nodes, service)
    assert target.options.get("ssl", False) == url.startswith("rediss")
    assert "pw" not in repr(target)
