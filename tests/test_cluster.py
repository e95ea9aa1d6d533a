"""Cluster mode with real engines: Debian's `redis-server` on a loopback port and three
`mirror serve` replicas, each with its own data directory, against the upstream simulator.

One HEAD per tag TTL for the whole cluster; a tag one replica fetched is a record the others
use (each still fetches the manifest's bytes, by digest: manifests are not shared); one
upstream GET per blob for the whole cluster (a fill lease in Redis, the others streaming the
owner's fill through its internal endpoint), carried on from upstream by a survivor when the
owner is killed mid-fill, and per replica again while Redis is down; the internal endpoint
refuses whatever its secret did not sign; a pull budget below its floor told to one replica
spares the others' revalidations; Redis killed mid-traffic leaves every replica serving
standalone (logged, `/readyz`, `mirror_cluster_up`), and Redis started again, empty, is joined
again with one HEAD per TTL again; bad `[cluster]` values stop the start naming the key.
With `[cold]` on moto's S3 server, the bucket is the replicas' shared tier: a blob one replica
fetched is promoted from it by the others with no upstream request, a corrupt object there is
dropped for upstream's bytes, and a dead endpoint leaves every replica on warm and upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import redis
from conftest import BUCKET, KEYS, PROJECT, MirrorProcess, RedisEngine, RedisServer, start_s3
from images import make_image
from registry import free_port
from test_metrics import _value
from upstream_sim import UpstreamSim

from mirror.config import ClusterConfig, load_config
from mirror.coordination.peering import authorization, blob_path
from mirror.errors import ConfigError
from mirror.oci.reference import parse_digest
from mirror.redis_url import redis_shown
from mirror.store.layout import object_key
from mirror.upstream.auth import EXPIRY_MARGIN

REPLICAS = 3
SECRET = "cluster-secret-0123456789abcdefghijkl"
MiB = 1024 * 1024


async def _get(url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.read()


async def _replicas(
    make: Callable[..., MirrorProcess],
    sim: UpstreamSim,
    redis_server: RedisEngine,
    tmp_path: Path,
    extra: str = "",
    workers: int = 1,
    count: int = REPLICAS,
    ttl: int = 1,
) -> list[MirrorProcess]:
    """Three replicas (or `count`), each with its data directory and its advertised URL, one
    Redis (an instance, a Sentinel service or a Redis Cluster: `redis_server.url`); the first
    with `workers` worker processes. Tags live `ttl` seconds."""
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[upstreams."docker.io"]\ntag_ttl = {ttl}\n{extra}\n'
        f'[cluster]\nredis_url = "{redis_server.url}"\nsecret = "{SECRET}"\n'
    )
    procs = []
    for i in range(count):
        each = workers if i == 0 else 1
        proc = make(sim.url, tmp_path / f"replica{i}", {"MIRROR_CONFIG": str(config)}, each)
        proc.env["MIRROR_CLUSTER__ADVERTISE"] = proc.url
        procs.append(proc)
    await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
    deadline = time.monotonic() + 20
    while workers > 1 and f"{workers} workers serving" not in procs[0].log.read_text():
        assert time.monotonic() < deadline, procs[0].log.read_text()[-2000:]
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    for proc in procs:
        assert (await _ready(proc))["cluster"] == "joined"
    return procs


async def _ready(proc: MirrorProcess) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(f"{proc.url}/readyz") as resp,
    ):
        assert resp.status == 200, "a replica serves, joined or standalone"
        body: dict[str, object] = await resp.json()
        return body


async def _cluster_up(proc: MirrorProcess) -> float:
    _, text = await _get(f"{proc.url}/metrics")
    lines = [line for line in text.decode().splitlines() if line.startswith("mirror_cluster_up ")]
    assert len(lines) == 1, lines
    return float(lines[0].split()[1])


async def _until_cluster(procs: list[MirrorProcess], state: str, timeout: float = 15) -> None:
    """Poll every replica's /readyz until each says `state`."""
    deadline = time.monotonic() + timeout
    while True:
        states = [(await _ready(p))["cluster"] for p in procs]
        if all(s == state for s in states):
            return
        assert time.monotonic() < deadline, states
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def _ttl_passes() -> None:
    checked = time.monotonic()
    while time.monotonic() < checked + 1.2:
        await asyncio.sleep(0.1)  # ok: waiting for a TTL to expire


async def _pull_through_all(procs: list[MirrorProcess], path: str, data: bytes, n: int) -> None:
    answers = await asyncio.gather(*(_get(procs[i % len(procs)].url + path) for i in range(n)))
    assert all(status == 200 and body == data for status, body in answers), [s for s, _ in answers]


async def test_a_tag_past_its_ttl_through_three_replicas_costs_one_head(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A tag first pulled via replica A is a record B and C use: no GET of it by tag from
    them (each fetches the manifest by digest, its bytes not being shared yet). Past its TTL,
    30 pulls spread over the three cost one upstream HEAD. Every replica is a member."""
    image = make_image(21, [4096])
    sim.add_image("c/tag", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path)
    path = "/v2/c/tag/manifests/v1"
    by_digest = f"/v2/c/tag/manifests/{image.digest}"
    assert await _get(procs[0].url + path) == (200, image.data)
    for proc in procs[1:]:
        assert await _get(proc.url + path) == (200, image.data)
    assert sim.requests[("GET", path)] == 1, sim.requests
    assert sim.requests[("GET", by_digest)] == REPLICAS - 1, sim.requests
    await _ttl_passes()
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] == 1, sim.requests
    assert sim.requests[("GET", path)] == 1
    client = redis.Redis(port=redis_server.port)
    try:
        members = {k.decode() for k in client.scan_iter(match="mirror:member:*")}
        record = json.loads(client.get("mirror:tag:docker.io/c/tag:v1") or b"{}")
    finally:
        client.close()
    assert members == {f"mirror:member:{p.url}" for p in procs}
    assert record["digest"] == str(image.digest)
    for proc in procs:
        assert await _cluster_up(proc) == 1
        assert SECRET not in proc.log.read_text(), "the secret is never logged"


async def test_hits_within_the_ttl_ask_redis_nothing(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A tag hit within its TTL, a manifest by digest and a blob hit consult Redis not at
    all: over 50 hits of each through a replica of worker processes, Redis's MONITOR shows no
    command of the mirror but the renewals of its membership, and INFO commandstats counts no
    other command than those."""
    image = make_image(23, [4096, 8192])
    sim.add_image("c/hits", "v1", image)
    procs = await _replicas(
        mirror_process, sim, redis_server, tmp_path, workers=2, count=1, ttl=3600
    )
    url = procs[0].url
    paths = ["/v2/c/hits/manifests/v1", f"/v2/c/hits/manifests/{image.digest}"]
    paths += [f"/v2/c/hits/blobs/{d}" for d in image.blobs]
    for path in paths:  # misses, each of which may ask Redis
        status, _, _ = await _fetch(url + path)
        assert status == 200
    client = redis.Redis(port=redis_server.port)
    own = client.client_info()["addr"]  # the test's own connection, left out below
    deadline = time.monotonic() + 10
    while any(client.scan_iter(match="mirror:fill:*")):  # each fill lets its lease go
        assert time.monotonic() < deadline, "a fill lease outlived its fill"
        await asyncio.sleep(0.02)  # ok: polling a condition with a deadline
    watch = tmp_path / "monitor.log"
    with watch.open("wb") as out:
        monitor = subprocess.Popen(
            ["redis-cli", "-p", str(redis_server.port), "monitor"], stdout=out
        )
    try:
        deadline = time.monotonic() + 10
        while not watch.read_bytes().startswith(b"OK"):
            assert time.monotonic() < deadline, "redis-cli monitor did not attach"
            await asyncio.sleep(0.02)  # ok: polling a condition with a deadline
        before = client.info("commandstats")
        for _ in range(50):
            for path in paths:
                status, headers, _ = await _fetch(url + path)
                assert (status, headers["X-Mirror-Cache"]) == (200, "hit"), path
        after = client.info("commandstats")
        client.echo("end-of-hits")
        while b"end-of-hits" not in watch.read_bytes():
            assert time.monotonic() < deadline + 60, "MONITOR did not show the marker"
            await asyncio.sleep(0.02)  # ok: polling a condition with a deadline
    finally:
        monitor.terminate()
        monitor.wait()
        client.close()
    lines = watch.read_text().splitlines()[1:]
    mirror_said = [line.split('"')[1::2] for line in lines if f" {own}]" not in line]
    assert all(
        words[0].lower() == "set" and words[1].startswith("mirror:member:") for words in mirror_said
    ), mirror_said
    grew = {
        name: stats["calls"] - before.get(name, {}).get("calls", 0)
        for name, stats in after.items()
        if stats["calls"] != before.get(name, {}).get("calls", 0)
    }
    grew.pop("cmdstat_info", None)
    renewals = sum(1 for words in mirror_said)
    assert set(grew) <= {"cmdstat_set"}, grew
    assert grew.get("cmdstat_set", 0) <= renewals, (grew, renewals)


async def test_worker_processes_each_join_the_cluster_after_their_fork(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A replica of three worker processes beside two single ones: each worker opened its
    own Redis client (Redis lists one connection per process), every worker is joined (the
    gauge is the least over them), and past the TTL 30 pulls cost one HEAD for the cluster."""
    image = make_image(24, [4096])
    sim.add_image("c/workers", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path, workers=REPLICAS)
    path = "/v2/c/workers/manifests/v1"
    await _pull_through_all(procs, path, image.data, 3)
    await _ttl_passes()
    await _pull_through_all([procs[0]] * 2 + procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] == 1, sim.requests
    assert await _cluster_up(procs[0]) == 1
    client = redis.Redis(port=redis_server.port)
    try:
        names = {c["name"] for c in client.client_list()}
    finally:
        client.close()
    assert procs[0].proc is not None
    workers = {n for n in names if n.startswith(f"mirror@{procs[0].url}#")}
    assert len(workers) == REPLICAS, names
    assert f"mirror@{procs[0].url}#{procs[0].proc.pid}" not in workers, "not the supervisor"


async def test_a_pull_budget_below_its_floor_told_to_one_replica_spares_the_others(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Every replica holds the tag; then Docker Hub tells replica A (its revalidation's HEAD)
    that 3 pulls are left, below the floor of 10. Past the TTL again, B and C — which upstream
    never told — spend nothing on revalidating: they serve the tag as cached."""
    image = make_image(22, [4096])
    sim.add_image("c/budget", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path, "pull_budget_floor = 10\n")
    path = "/v2/c/budget/manifests/v1"
    for proc in procs:
        assert await _get(proc.url + path) == (200, image.data)
    sim.rate_limit(limit=100, remaining=3)
    await _ttl_passes()
    assert await _get(procs[0].url + path) == (200, image.data)
    assert sim.requests[("HEAD", path)] == 1, sim.requests
    await _ttl_passes()
    await _pull_through_all(procs[1:], path, image.data, 20)
    assert sim.requests[("HEAD", path)] == 1, sim.requests


TOKEN_KEY = "mirror:token:docker.io:repository:c/tok:pull"


async def _pulled_with_one_token(
    sim: UpstreamSim, procs: list[MirrorProcess], redis_server: RedisServer
) -> bytes:
    """`c/tok:v1` pulled through each replica in turn, its manifest and blobs, from an
    upstream that demands Bearer tokens: each replica asks upstream (the manifest by digest at
    least), yet the realm issues one token, the one Redis holds for its scope; returned."""
    image = make_image(24, [4096, 8192])
    sim.add_image("c/tok", "v1", image)
    for proc in procs:
        assert await _get(proc.url + "/v2/c/tok/manifests/v1") == (200, image.data)
        for digest in image.blobs:
            status, _ = await _get(f"{proc.url}/v2/c/tok/blobs/{digest}")
            assert status == 200
    assert sim.requests[("GET", f"/v2/c/tok/manifests/{image.digest}")] >= REPLICAS - 1
    assert sim.tokens_issued == 1, "one token for the scope, whichever replica asked"
    client = redis_server.client()
    try:
        token = client.get(TOKEN_KEY)
    finally:
        client.close()
    assert token is not None and token.decode() in sim.tokens
    return token


async def test_a_token_one_replica_fetched_is_the_others_within_its_life(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Replica A fetches the scope's token from the realm; B and C, asking upstream for the
    same repository, use it from Redis: one token issued, not three. Redis keeps it no longer
    than the token lives (less the margin), and no replica logs it."""
    sim.require_bearer()
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path, ttl=3600)
    token = await _pulled_with_one_token(sim, procs, redis_server)
    client = redis_server.client()
    try:
        left = client.pttl(TOKEN_KEY)
    finally:
        client.close()
    assert 0 < left <= (sim.token_ttl - EXPIRY_MARGIN) * 1000, left
    for proc in procs:
        assert token.decode() not in proc.log.read_text(), "a token is never logged"


async def test_a_token_upstream_refuses_leaves_redis_for_a_fresh_one(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Upstream revokes the cluster's token. Replica B, refused, drops it from Redis (its
    realm fails it once, so nothing takes its place); C, refused too, fetches a fresh one,
    which Redis then holds; A, still holding the revoked one in memory, is refused and takes
    C's from Redis, as B does: two tokens issued in all, the revoked one never handed out."""
    sim.require_bearer()
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path, ttl=3600)
    a, b, c = procs
    revoked = await _pulled_with_one_token(sim, procs, redis_server)
    image = make_image(25, [4096])
    sim.add_image("c/tok", "v2", image)
    path = "/v2/c/tok/manifests/v2"
    sim.revoke_tokens()
    sim.fault("token", "status", status=503, times=1)
    status, _ = await _get(b.url + path)
    assert status != 200, "the realm failed B's fetch"
    client = redis_server.client()
    try:
        assert client.get(TOKEN_KEY) is None, "the refused token left Redis"
        assert await _get(c.url + path) == (200, image.data)
        assert sim.tokens_issued == 2
        fresh = client.get(TOKEN_KEY)
        assert fresh is not None and fresh != revoked and fresh.decode() in sim.tokens
        for proc in (a, b):
            assert await _get(proc.url + path) == (200, image.data)
        assert sim.tokens_issued == 2, "A and B took C's token from Redis"
        assert client.get(TOKEN_KEY) == fresh, "A's refusal of its old token left C's"
    finally:
        client.close()


async def test_redis_killed_mid_traffic_leaves_replicas_standalone_until_it_is_back(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Pulls go on through a kill -9 of Redis; each replica says standalone (/readyz, the
    gauge, one warning); Redis started again on its port, empty: each joins again, and one
    HEAD per TTL holds again for the cluster."""
    image = make_image(23, [4096])
    sim.add_image("c/down", "v1", image)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path)
    path = "/v2/c/down/manifests/v1"
    await _pull_through_all(procs, path, image.data, 3)
    stop = asyncio.Event()
    answered: list[tuple[int, bytes]] = []

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            answered.append(await _get(procs[i % REPLICAS].url + path))
            i += 1

    running = asyncio.create_task(traffic())
    await asyncio.to_thread(redis_server.stop, 9)
    await _until_cluster(procs, "standalone")
    await _ttl_passes()  # a revalidation while standalone: each replica asks upstream itself
    seen = len(answered)
    while len(answered) < seen + 10:
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline (the test's timeout)
    stop.set()
    await running
    assert answered and all(a == (200, image.data) for a in answered)
    for proc in procs:
        assert await _cluster_up(proc) == 0
        log = proc.log.read_text()
        assert log.count("serving standalone until it does") == 1, log[-3000:]
    await asyncio.to_thread(redis_server.start)
    await _until_cluster(procs, "joined")
    for proc in procs:
        assert await _cluster_up(proc) == 1
        assert "cluster: joined through Redis" in proc.log.read_text()
    await _pull_through_all(procs, path, image.data, 3)
    await _ttl_passes()
    heads = sim.requests[("HEAD", path)]
    await _pull_through_all(procs, path, image.data, 30)
    assert sim.requests[("HEAD", path)] - heads == 1, sim.requests


@pytest.mark.parametrize(
    ("cluster", "key"),
    [
        ('redis_url = "http://127.0.0.1:6379"', "cluster.redis_url"),
        ('redis_url = "redis://127.0.0.1:99999"', "cluster.redis_url"),
        ('redis_url = "redis://127.0.0.1?socket_timeout=soon"', "cluster.redis_url"),
        ('advertise = "http://a.example:5000"', "cluster.redis_url"),
        ('redis_url = "redis://r.example"', "cluster.advertise"),
        ('redis_url = "redis://r.example"\nadvertise = "a.example:5000"', "cluster.advertise"),
        ('redis_url = "redis://r.example"\nadvertise = "http://a.example"', "cluster.advertise"),
        (
            'redis_url = "redis://r.example"\nadvertise = "http://a:1"\nsecret = "short"',
            "cluster.secret",
        ),
        (
            'redis_url = "redis://r.example"\nadvertise = "http://a:1"\nsecret_file = "/nonexistent"',
            "cluster.secret_file",
        ),
        (
            f'redis_url = "unix:///run/redis.sock"\nadvertise = "http://a:1"\n'
            f'secret = "{SECRET}"\nsecret_file = "/etc/hostname"',
            "cluster.secret_file",
        ),
    ],
)
def test_bad_cluster_values_are_refused_naming_the_key(
    tmp_path: Path, cluster: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[cluster]\n{cluster}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(key + ":"), info.value
    assert SECRET not in str(info.value) and "short" not in str(info.value)


def test_a_bad_cluster_value_stops_the_server_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nredis_url = "redis://127.0.0.1:6379"\nadvertise = "nowhere"\n')
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--data-dir", str(tmp_path / "data")],
        cwd=PROJECT,
        env={"MIRROR_CONFIG": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cluster.advertise" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("rediss://mirror:hunter2-pw@r.example:6380/1", "r.example:6380"),
        ("redis://r.example:6380/1?password=hunter2-pw", "r.example:6380"),
        (
            "redis+sentinel://mirror:hunter2-pw@s1.example:26379,s2.example/svc/2"
            "?sentinel_password=hunter2-sentinel",
            "s1.example:26379,s2.example/svc/2",
        ),
        (
            "rediss+cluster://:hunter2-pw@n1.example:7000,n2.example:7001?ssl_cert_reqs=none",
            "n1.example:7000,n2.example:7001",
        ),
    ],
)
def test_the_secret_comes_from_its_file_and_no_repr_shows_it_or_redis_password(
    tmp_path: Path, url: str, where: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    good = tmp_path / "good.toml"
    good.write_text(
        f'[cluster]\nredis_url = "{url}"\n'
        f'advertise = "https://a.example:5000/"\nsecret_file = "{secret}"\n'
    )
    config = load_config(good, env={})
    assert config.cluster.secret == SECRET and config.cluster.enabled
    assert config.cluster.redis_url == url
    assert config.cluster.advertise == "https://a.example:5000"
    for shown in (repr(config), repr(config.cluster), redis_shown(url)):
        assert SECRET not in shown and "hunter2" not in shown
        assert where in shown
    assert load_config(env={}).cluster == ClusterConfig()


async def _fetch(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET on a connection of its own: status, headers, body."""
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), trust_env=False
        ) as session,
        session.get(url, headers=headers or {}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def _pull(url: str, size: int) -> bytes:
    """A client that tries again when its connection is cut (as docker and containerd do)."""
    for _ in range(5):
        try:
            status, _, body = await _fetch(url)
        except aiohttp.ClientError:
            continue
        if status == 200 and len(body) == size:
            return body
    raise AssertionError("no whole blob after 5 tries")


def _blob_file(proc: MirrorProcess, digest: str) -> Path:
    return proc.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]


async def test_thirty_clients_over_three_replicas_cost_one_upstream_get_of_a_blob(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Ten clients on each replica ask for one uncached 32 MiB blob at once: upstream is asked
    for it once, every client gets the right bytes, and afterwards each replica holds its own
    verified copy and serves it as a hit without asking anyone."""
    blob = os.urandom(32 * MiB)
    digest = sim.add_blob(blob)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path)
    path = f"/v2/c/blob/blobs/{digest}"
    bodies = await asyncio.gather(
        *(_pull(procs[i % REPLICAS].url + path, len(blob)) for i in range(30))
    )
    assert all(body == blob for body in bodies), "every client got the right bytes"
    assert sim.requests[("GET", path)] == 1, sim.requests
    assert sim.sent[path] == len(blob)
    streamed = [p for p in procs if "streaming " + digest in p.log.read_text()]
    assert len(streamed) == REPLICAS - 1, "the others streamed the owner's fill"
    for proc in procs:
        assert hashlib.sha256(_blob_file(proc, digest).read_bytes()).hexdigest() == digest[7:]
        status, headers, body = await _fetch(proc.url + path)
        assert (status, headers["X-Mirror-Cache"], body == blob) == (200, "hit", True)
    assert sim.requests[("GET", path)] == 1, sim.requests
    client = redis.Redis(port=redis_server.port)
    try:
        assert client.get(f"mirror:fill:{digest}") is None, "the lease was let go at the commit"
    finally:
        client.close()


async def test_the_owner_killed_mid_fill_is_carried_on_by_a_survivor_from_its_bytes(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """Upstream holds its answer after 12 MiB; the replica filling (named by the lease in
    Redis) is killed with -9 while ten clients of the other two replicas stream its fill.
    Its lease lapses, a survivor takes it and asks upstream for the rest only: every one of
    those clients gets the right bytes, and upstream sends the blob about once."""
    blob = os.urandom(32 * MiB)
    digest = sim.add_blob(blob)
    hold = sim.fault(digest, "slow", part=12 * MiB, times=1)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path)
    path = f"/v2/c/kill/blobs/{digest}"
    first = asyncio.create_task(_fetch(procs[0].url + path))
    await hold.reached.wait()
    client = redis.Redis(port=redis_server.port)
    try:
        leased = client.get(f"mirror:fill:{digest}")
    finally:
        client.close()
    assert leased is not None
    owner = next(p for p in procs if p.url == leased.decode())
    survivors = [p for p in procs if p is not owner]
    clients = [
        asyncio.create_task(_pull(p.url + path, len(blob))) for p in survivors for _ in range(5)
    ]
    partials = [p.data_dir / "tmp" / f"{digest[7:]}.partial" for p in survivors]
    deadline = time.monotonic() + 15
    # the owner writes what it gathered a MiB at a time: most of the 12 MiB reach the others
    while not all(f.exists() and f.stat().st_size >= 8 * MiB for f in partials):
        assert time.monotonic() < deadline, [f.exists() and f.stat().st_size for f in partials]
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    assert owner.proc is not None
    os.kill(owner.proc.pid, signal.SIGKILL)
    bodies = await asyncio.gather(*clients)
    assert all(body == blob for body in bodies), "every client of a survivor got the right bytes"
    await asyncio.gather(first, return_exceptions=True)  # the owner's own client was cut
    gets = [s for s in sim.log if s.method == "GET" and s.path == path]
    assert len(gets) == 2, gets
    resumed_at = int(gets[1].headers.get("Range", "bytes=0-")[6:].rstrip("-"))
    assert resumed_at >= 8 * MiB, "the survivor asked upstream only for what it lacked"
    assert sim.sent[path] <= 1.2 * len(blob), sim.sent[path]
    for proc in survivors:
        assert hashlib.sha256(_blob_file(proc, digest).read_bytes()).hexdigest() == digest[7:]
    took = [p for p in survivors if "cluster: carrying the fill of " + digest in p.log.read_text()]
    assert len(took) == 1, "one survivor took the lease and asked upstream"
    (other,) = [p for p in survivors if p is not took[0]]
    assert f"streaming {digest} from {took[0].url}" in other.log.read_text(), (
        "the other followed it"
    )


async def test_the_internal_endpoint_serves_only_what_the_cluster_secret_signed(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A blob the replica holds: signed with the secret, it is served (whole, or from a byte
    on); without the header, with another secret, with a stale time, with a MAC of another
    path or for any other path under the prefix: 401, an OCI error body, no blob bytes."""
    blob = os.urandom(256 * 1024)
    digest = sim.add_blob(blob)
    (proc,) = await _replicas(mirror_process, sim, redis_server, tmp_path, count=1)
    assert await _get(f"{proc.url}/v2/c/auth/blobs/{digest}") == (200, blob)
    path = blob_path(digest)
    url = proc.url + path
    now = time.time()

    def signed(secret: str = SECRET, at: float = now, over: str = path) -> dict[str, str]:
        return {"Authorization": authorization(secret, "GET", over, at)}

    status, _, body = await _fetch(url, signed())
    assert (status, body == blob) == (200, True), "the secret's own request is served"
    status, headers, body = await _fetch(url, {**signed(), "Range": "bytes=1000-"})
    assert (status, headers["Content-Range"], body == blob[1000:]) == (
        206,
        f"bytes 1000-{len(blob) - 1}/{len(blob)}",
        True,
    )
    other = "/_mirror/cluster/manifests/" + digest
    refused = [
        (url, {}),
        (url, signed("another-secret-0123456789abcdefghijk")),
        (url, signed(at=now - 120)),
        (url, signed(at=now + 120)),
        (url, signed(over=blob_path("sha256:" + "0" * 64))),
        (url, {"Authorization": signed()["Authorization"][:-1] + "x"}),
        (proc.url + other, signed(over=other)),
        (proc.url + "/_mirror/cluster/", signed(over="/_mirror/cluster/")),
    ]
    for where, headers in refused:
        status, _, body = await _fetch(where, headers)
        assert status == 401, (where, headers, status)
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        assert blob[:64] not in body and len(body) < 1024
    assert SECRET not in proc.log.read_text()


async def test_with_redis_down_each_replica_fetches_a_blob_itself(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """No Redis, no lease: every replica goes on as a standalone mirror, one upstream GET
    per replica, the right bytes for every client."""
    blob = os.urandom(4 * MiB)
    digest = sim.add_blob(blob)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path)
    await asyncio.to_thread(redis_server.stop, 9)
    await _until_cluster(procs, "standalone")
    path = f"/v2/c/alone/blobs/{digest}"
    bodies = await asyncio.gather(
        *(_pull(procs[i % REPLICAS].url + path, len(blob)) for i in range(9))
    )
    assert all(body == blob for body in bodies)
    assert sim.requests[("GET", path)] == REPLICAS, sim.requests
    assert not any("streaming " + digest in p.log.read_text() for p in procs)


async def test_an_owner_of_worker_processes_serves_its_fill_from_any_of_them(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """The owner is a replica of three worker processes: whichever of its workers the others'
    requests reach follows the filling worker's partial file for them (never fetching), and
    the cluster still costs upstream one GET of the blob."""
    blob = os.urandom(16 * MiB)
    digest = sim.add_blob(blob)
    hold = sim.fault(digest, "slow", part=8 * MiB, times=1)
    procs = await _replicas(mirror_process, sim, redis_server, tmp_path, workers=REPLICAS)
    path = f"/v2/c/workers/blobs/{digest}"
    first = asyncio.create_task(_pull(procs[0].url + path, len(blob)))
    await hold.reached.wait()
    client = redis.Redis(port=redis_server.port)
    try:
        assert client.get(f"mirror:fill:{digest}") == procs[0].url.encode()
    finally:
        client.close()
    others = [asyncio.create_task(_pull(p.url + path, len(blob))) for p in procs * 3]
    partials = [p.data_dir / "tmp" / f"{digest[7:]}.partial" for p in procs[1:]]
    deadline = time.monotonic() + 15
    while not all(f.exists() and f.stat().st_size >= 4 * MiB for f in partials):
        assert time.monotonic() < deadline, [f.exists() and f.stat().st_size for f in partials]
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    internal = blob_path(digest)
    signed = [  # as another replica asks, each on a connection the kernel gives any worker
        asyncio.create_task(
            _fetch(
                procs[0].url + internal,
                {"Authorization": authorization(SECRET, "GET", internal, time.time())},
            )
        )
        for _ in range(9)
    ]
    hold.gate.set()
    bodies = await asyncio.gather(first, *others)
    assert all(body == blob for body in bodies)
    assert [(s, b == blob) for s, _, b in await asyncio.gather(*signed)] == [(200, True)] * 9
    assert sim.requests[("GET", path)] == 1, sim.requests
    for proc in procs:
        assert hashlib.sha256(_blob_file(proc, digest).read_bytes()).hexdigest() == digest[7:]
    deadline = time.monotonic() + 10
    while True:  # each worker writes its access lines a batch at a time
        answered = re.findall(
            rf"\bworker=(\d+) method=GET path={internal} status=200 ", procs[0].log.read_text()
        )
        if len(answered) >= 9:
            break
        assert time.monotonic() < deadline, answered
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    assert len(set(answered)) >= 2, "workers other than the filling one answered too"


# -- the shared cold tier: object storage every replica reads --------------------------------


def _shared_cold(endpoint: str, prefix: str) -> str:
    """`[cold]` on moto's bucket: the same for every replica (they share one config file)."""
    keys = "\n".join(f'{k} = "{v}"' for k, v in KEYS.items())
    return (
        f'[cold]\nurl = "s3://{BUCKET}/{prefix}"\nendpoint = "{endpoint}"\nallow_http = true\n'
        f"{keys}\n"
    )


def _bucket(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEYS["access_key_id"],
        aws_secret_access_key=KEYS["secret_access_key"],
        region_name=KEYS["region"],
    )


async def _object_until(bucket: Any, key: str, want: bytes, timeout: float = 20) -> None:
    """Poll the bucket until `key` holds `want` (an upload runs after the commit, off the
    request path)."""
    deadline = time.monotonic() + timeout
    seen: bytes | None = None
    while True:
        try:
            reply = await asyncio.to_thread(bucket.get_object, Bucket=BUCKET, Key=key)
            seen = await asyncio.to_thread(reply["Body"].read)
        except bucket.exceptions.NoSuchKey:
            seen = None
        if seen == want:
            return
        assert time.monotonic() < deadline, f"{key}: {None if seen is None else len(seen)} bytes"
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def _metric(proc: MirrorProcess, name: str, **labels: str) -> float:
    _, text = await _get(f"{proc.url}/metrics")
    return _value(text.decode(), name, **labels)


async def _lease_gone(redis_server: RedisServer, digest: str) -> None:
    """Poll Redis until no replica holds the lease of `digest`: a replica answers its client
    as it promotes a blob, and lets the lease go only once it committed its copy."""
    client = redis.Redis(port=redis_server.port)
    try:
        deadline = time.monotonic() + 10
        while client.exists(f"mirror:fill:{digest}"):
            assert time.monotonic() < deadline, "the lease outlived the fill"
            await asyncio.sleep(0.02)  # ok: polling a condition with a deadline
    finally:
        client.close()


async def test_a_blob_one_replica_fetched_is_promoted_from_cold_by_the_others(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    s3_endpoint: str,
    tmp_path: Path,
) -> None:
    """Replica A fills a blob from upstream and uploads it to the shared bucket once it has
    committed it (its lease is gone by then); B and C, which never saw it, each miss it and
    promote it from the bucket: one upstream GET for the whole cluster, the right bytes
    everywhere, and B and C count their answer as a cold lookup and upload nothing."""
    blob = os.urandom(4 * MiB)
    digest = sim.add_blob(blob)
    prefix = tmp_path.name
    cold = _shared_cold(s3_endpoint, prefix)
    a, b, c = await _replicas(mirror_process, sim, redis_server, tmp_path, cold)
    path = f"/v2/c/shared/blobs/{digest}"
    assert await _pull(a.url + path, len(blob)) == blob
    assert sim.requests[("GET", path)] == 1
    key = f"{prefix}/{object_key(parse_digest(digest))}"
    await _object_until(_bucket(s3_endpoint), key, blob)
    for proc in (b, c):
        status, headers, body = await _fetch(proc.url + path)
        assert (status, headers["X-Mirror-Cache"], body == blob) == (200, "miss", True)
        assert f"promoting {digest} from cold" in proc.log.read_text()
        assert await _metric(proc, "mirror_blob_lookups_total", source="cold") == 1
        assert await _metric(proc, "mirror_blob_lookups_total", source="upstream") == 0
        assert hashlib.sha256(_blob_file(proc, digest).read_bytes()).hexdigest() == digest[7:]
        await _lease_gone(redis_server, digest)  # else the next replica streams this one's
    assert sim.requests[("GET", path)] == 1, "a blob in cold costs no replica an upstream GET"
    assert await _metric(a, "mirror_cold_uploads_total", result="ok") == 1
    for proc in (b, c):
        assert await _metric(proc, "mirror_cold_uploads_total", result="ok") == 0


async def test_a_corrupt_object_in_the_shared_cold_tier_is_dropped_for_upstream_bytes(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    s3_endpoint: str,
    tmp_path: Path,
) -> None:
    """The bucket holds, under a blob's key, bytes that are not that blob (no replica's
    index knows of it). A replica that misses the blob promotes it from there, the digest
    check fails, the object is dropped and the client's next try is filled from upstream:
    the right bytes, one upstream GET, and the upload puts the right bytes in the bucket."""
    blob = os.urandom(2 * MiB)
    digest = sim.add_blob(blob)
    prefix = tmp_path.name
    key = f"{prefix}/{object_key(parse_digest(digest))}"
    bucket = _bucket(s3_endpoint)
    bad = bytearray(blob)
    bad[1000] ^= 0xFF
    await asyncio.to_thread(bucket.put_object, Bucket=BUCKET, Key=key, Body=bytes(bad))
    procs = await _replicas(
        mirror_process, sim, redis_server, tmp_path, _shared_cold(s3_endpoint, prefix)
    )
    path = f"/v2/c/corrupt/blobs/{digest}"
    assert await _pull(procs[1].url + path, len(blob)) == blob
    assert sim.requests[("GET", path)] == 1
    assert await _metric(procs[1], "mirror_digest_mismatches_total", source="cold") == 1
    assert "does not match its digest: dropped" in procs[1].log.read_text()
    await _object_until(bucket, key, blob)
    assert hashlib.sha256(_blob_file(procs[1], digest).read_bytes()).hexdigest() == digest[7:]


async def test_with_the_object_store_down_replicas_go_on_with_warm_and_upstream(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """The bucket's endpoint does not answer: every pull still gets the right bytes, from the
    replica's warm tier or from upstream (one GET per replica that misses after the owner's
    commit); the failed uploads are logged and counted. Once the store answers again, the
    owner's upload is tried again and lands."""
    blob = os.urandom(2 * MiB)
    digest = sim.add_blob(blob)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    dead = _shared_cold(endpoint, "down")
    a, b, _ = await _replicas(mirror_process, sim, redis_server, tmp_path, dead)
    path = f"/v2/c/nostore/blobs/{digest}"
    assert await _pull(a.url + path, len(blob)) == blob
    deadline = time.monotonic() + 20
    while await _metric(a, "mirror_cold_uploads_total", result="failed") < 1:
        assert time.monotonic() < deadline, a.log.read_text()[-2000:]
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    assert "uploading " + digest in a.log.read_text()
    assert await _pull(b.url + path, len(blob)) == blob
    assert "cold tier unreadable for " + digest in b.log.read_text()
    assert sim.requests[("GET", path)] == 2, "no shared copy: B fetched it itself"
    status, headers, body = await _fetch(a.url + path)
    assert (status, headers["X-Mirror-Cache"], body == blob) == (200, "hit", True)
    store = await asyncio.to_thread(start_s3, port, tmp_path / "moto.log")
    try:
        # A's upload, tried again (2 s after its failure, then 4, 8…), lands in the bucket
        key = f"down/{object_key(parse_digest(digest))}"
        await _object_until(_bucket(endpoint), key, blob, timeout=60)
        # counted once the PUT's answer is back and the index holds it: a moment after the
        # object is visible in the bucket
        deadline = time.monotonic() + 20
        while await _metric(a, "mirror_cold_uploads_total", result="ok") < 1:
            assert time.monotonic() < deadline, a.log.read_text()[-2000:]
            await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
        assert "trying again in" in a.log.read_text()
    finally:
        store.terminate()
        store.wait(10)
