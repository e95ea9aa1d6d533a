"""Coordination among replicas on several hosts, through one Redis (`[cluster]`): one
instance, the master of a Sentinel service, or a Redis Cluster (topology.py opens the client).

A replica is a host's mirror (one process, or worker processes sharing a data directory) that
shares with the other replicas what is small and must be the same for all of them:

    mirror:tag:<upstream>/<repo>:<tag>   a tag record: {"digest", "media_type", "checked"}
                                         (a client Accept's own view of a tag stays local)
    mirror:token:<name>:<scope>          an upstream's Bearer token for one scope (`<name>`: the
                                         upstream, or "<upstream> via <origin>" for a host it
                                         redirected to, percent-encoded, so it holds no `:`),
                                         expiring (PX) when the replica that fetched it stops
                                         using it: EXPIRY_MARGIN (auth.py) before the token does
    mirror:budget:<upstream>             the pulls upstream last said are left
    mirror:backoff:<upstream>            until when (wall clock) to leave it alone after a 429,
                                         expiring then
    mirror:turn:<upstream>/<repo>:<tag>  who asks upstream about the tag now (redis-py's Lock:
                                         SET NX PX with a token, released by compare-and-delete)
    mirror:member:<advertise>            a live replica, renewed every PROBE_SECONDS
    mirror:fill:<digest>                 the advertised URL of the replica fetching the blob
                                         from its source now (SET NX PX, renewed with a
                                         compare-and-extend while it fills, released with a
                                         compare-and-delete at its commit or failure)

A fill's lease: the process holding its host's claim on a digest takes the digest's lease
before it asks upstream. Held by another replica, it streams that replica's fill instead
(pull/peers.py, through the endpoint of peering.py), and asks again whenever that stream
breaks: an owner killed mid-fill stops renewing, its lease lapses after LEASE_SECONDS, and one
follower takes it and goes on from upstream with Range from the bytes it holds. The value is
the replica, not the process: a lease that names this very replica was left by one of its own
processes that no longer fills (this one holds the host's claim), and is taken over.

Everything else stays the host's (`HostCoordinator`, which this wraps): the fill claims of its
processes, eviction, who leads, and `once` for anything but a tag. A tag's `once` is
the host's single flight and host lock first, then the tag's turn in Redis: one replica asks
upstream while the others wait, then re-read the record it stored (`tags.confirmed`): one HEAD
per tag TTL per cluster.
Each tag record is written to the data directory too, so a replica on its own still has it.

An upstream token is looked up in the process's memory first (a live one there asks Redis
nothing), then in Redis, where the replica that fetched it from the realm put it: one token
fetch per scope per token lifetime for the cluster, but for two replicas that miss at once,
which may both fetch one (there is no turn for it; the later one's stays). A token upstream
refuses is deleted from Redis if it is still the one there (compare-and-delete), so a fresh
one another replica put meanwhile stays. Tokens are secrets: never logged; whoever reads Redis
may pull, for each token's scope and until it expires, what the upstream's credentials may.

Redis down or unreachable: the first failure of any call turns the replica standalone (a
warning in the log, `mirror_cluster_up` 0, `/readyz` says so) and from then on nothing on
the request path asks Redis: every answer is the host's. A probe in the background tries Redis
every PROBE_SECONDS and joins again once it answers. Every call is bounded by CALL_TIMEOUT
(socket and connect timeouts, no retries), so a dead Redis costs a request a fraction of a
second once, not each time. A Redis that comes back empty holds no record: each is fetched or
revalidated again from upstream, and blobs were never in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar
from urllib.parse import quote

from redis.commands.core import AsyncScript
from redis.exceptions import LockError, RedisClusterException, RedisError

from mirror.config import ClusterConfig
from mirror.coordination import FillLease, Joined, PullBudgets, TagRecords, TokenCache
from mirror.coordination.claims import Claim
from mirror.coordination.host import HostCoordinator
from mirror.coordination.topology import Client, open_client
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.redis_url import redis_shown
from mirror.store.keys import AnyTagKey, TagKey
from mirror.store.tags import TagRecord

S = TypeVar("S")
V = TypeVar("V")
T = TypeVar("T")

log = logging.getLogger("mirror.cluster")

PREFIX = "mirror:"
#: Seconds one Redis call may take (connecting included) before Redis counts as down.
CALL_TIMEOUT = 0.5
#: Seconds between probes of Redis (and renewals of this replica's membership).
PROBE_SECONDS = 1.0
#: Seconds a replica stays listed without renewing its membership.
MEMBER_TTL = 10
#: Seconds a tag's turn is held at most (a holder that dies or hangs frees it then), and how
#: long another replica waits for it before asking upstream itself.
TURN_SECONDS = 5.0
#: Seconds between a waiting replica's tries of the turn.
TURN_POLL = 0.02
#: Seconds a tag record stays in Redis after it was last written (a tag nobody pulls for this
#: long leaves Redis; the replicas that hold it keep their own copy).
TAG_KEPT = 7 * 86400
#: Seconds a pull budget stays in Redis after upstream last told of it.
BUDGET_KEPT = 86400
#: Seconds a fill's lease outlives its holder's last renewal (a killed owner's lease lapses
#: so soon, and a follower carries the fill on); renewed every LEASE_RENEW seconds.
LEASE_SECONDS = 3.0
LEASE_RENEW = 1.0
#: Compare-and-extend and compare-and-delete of a lease: only its holder's value moves it.
EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
#: A token and the milliseconds it has left, in one call (false and -2 when there is none).
PEEK = """
return {redis.call('get', KEYS[1]), redis.call('pttl', KEYS[1])}
"""
#: What a call to Redis fails with when Redis is down, restarting, unreachable or slow (a
#: Redis Cluster none of whose nodes answers: RedisClusterException, no RedisError).
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class Standalone(Exception):
    """Redis is not to be asked now: the caller answers as a standalone replica."""


class Link:
    """This process's Redis client, and whether it is joined (Redis answered the last call)."""

    def __init__(self, config: ClusterConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self.client: Client | None = None
        self.scripts: Scripts | None = None
        self._close: Callable[[], Awaitable[None]] | None = None
        self.joined = False
        #: Whether the log has told of this replica's state yet.
        self._told = False

    def open(self) -> None:
        """The client, made in the process that uses it (each worker after its fork); it
        connects on its first call."""
        self.client, self._close = open_client(
            self._config.redis_url,
            # CLIENT LIST tells which replica and process each connection is
            f"mirror@{self._config.advertise}#{os.getpid()}",
            CALL_TIMEOUT,
        )
        self.scripts = Scripts(self.client)

    async def call(self, op: Callable[[Client], Awaitable[T]]) -> T:
        """`op` on Redis while joined; Standalone when not joined, or when this call fails
        (which leaves the cluster until the probe finds Redis again)."""
        client = self.client
        if client is None or not self.joined:
            raise Standalone
        try:
            return await asyncio.wait_for(op(client), CALL_TIMEOUT)
        except FAILURES as e:
            self.lost(e)
            raise Standalone from e

    def lost(self, error: BaseException) -> None:
        if self.joined or not self._told:
            log.warning(
                "cluster: Redis at %s does not answer (%s): serving standalone until it does",
                redis_shown(self._config.redis_url),
                str(error) or type(error).__name__,
            )
        self.joined, self._told = False, True
        self._metrics.cluster(False)

    def found(self) -> None:
        if not self.joined:
            log.info(
                "cluster: joined through Redis at %s as %s",
                redis_shown(self._config.redis_url),
                self._config.advertise,
            )
        self.joined, self._told = True, True
        self._metrics.cluster(True)

    async def probe(self) -> None:
        """Renew this replica's membership; its answer (or its failure) joins or leaves."""
        client = self.client
        if client is None:
            return
        member = json.dumps({"advertise": self._config.advertise, "pid": os.getpid()})
        try:
            await asyncio.wait_for(
                client.set(f"{PREFIX}member:{self._config.advertise}", member, ex=MEMBER_TTL),
                CALL_TIMEOUT,
            )
        except FAILURES as e:
            self.lost(e)
            return
        self.found()

    async def close(self) -> None:
        close, self._close, self.client, self.scripts = self._close, None, None, None
        if close is not None:
            with contextlib.suppress(*FAILURES):
                await close()


def _tag(key: TagKey) -> str:
    """A tag's name in Redis: `/` and `:` cannot occur in an upstream name or a tag, nor `:`
    in a repository, so no two tags share one."""
    return f"{key.upstream}/{key.repo}:{key.tag}"


class ClusterTags:
    """Tag records in Redis, each also kept in the data directory's store (`local`), whose
    memory copy stays the hot path: a fresh record in memory consults Redis not at all."""

    def __init__(self, local: TagRecords, link: Link) -> None:
        self._local = local
        self._link = link

    def cached(self, key: AnyTagKey) -> TagRecord | None:
        return self._local.cached(key)

    async def get(self, key: AnyTagKey) -> TagRecord | None:
        """The host's record first (memory, then the data directory, where another worker of
        this host may have put it): a hit within the TTL asks Redis nothing; Redis for a tag
        this host does not hold (another replica may). A stale record of the host's is
        revalidated through `confirmed`, which asks Redis first."""
        found = await self._local.get(key)
        if found is None and isinstance(key, TagKey):
            with contextlib.suppress(Standalone):
                found = await self._shared(key)
        return found

    async def confirmed(self, key: AnyTagKey) -> TagRecord | None:
        """The record as the cluster has it now; the data directory's when Redis has none
        (it restarted empty) or is not joined."""
        if isinstance(key, TagKey):
            with contextlib.suppress(Standalone):
                found = await self._shared(key)
                if found is not None:
                    return found
        return await self._local.confirmed(key)

    async def _shared(self, key: TagKey) -> TagRecord | None:
        raw = await self._link.call(lambda r: r.get(f"{PREFIX}tag:{_tag(key)}"))
        if raw is None:
            return None
        try:
            said = json.loads(raw)
            found = TagRecord(
                parse_digest(said["digest"]), str(said["media_type"]), float(said["checked"])
            )
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: the record of %s in Redis is no record; ignored", _tag(key))
            return None
        if self._local.cached(key) != found:
            await self._local.put(key, found)  # memory for the hot path, disk for standalone
        return found

    async def put(self, key: AnyTagKey, record: TagRecord) -> None:
        await self._local.put(key, record)
        if isinstance(key, TagKey):
            value = json.dumps(
                {
                    "digest": str(record.digest),
                    "media_type": record.media_type,
                    "checked": record.checked,
                }
            )
            with contextlib.suppress(Standalone):
                await self._link.call(
                    lambda r: r.set(f"{PREFIX}tag:{_tag(key)}", value, ex=TAG_KEPT)
                )

    async def drop(self, key: AnyTagKey) -> None:
        await self._local.drop(key)
        if isinstance(key, TagKey):
            with contextlib.suppress(Standalone):
                await self._link.call(lambda r: r.delete(f"{PREFIX}tag:{_tag(key)}"))

    def all(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Blocking: the records this replica holds (its pins, retention and catalog are of
        what it holds)."""
        return self._local.all()


class ClusterBudgets:
    """Pull budgets and 429 back-offs in Redis: one budget per upstream credential for the
    cluster. Each is also told to the host's store (`local`), which answers while Redis is
    not joined."""

    def __init__(self, local: PullBudgets, link: Link, clock: Callable[[], float] = time.time):
        self._local = local
        self._link = link
        self._clock = clock

    async def told(self, upstream: str, remaining: int) -> int | None:
        before = await self._local.told(upstream, remaining)
        try:
            shared = await self._link.call(
                lambda r: r.set(f"{PREFIX}budget:{upstream}", remaining, ex=BUDGET_KEPT, get=True)
            )
        except Standalone:
            return before
        return None if shared is None else int(shared)

    async def left(self, upstream: str) -> int | None:
        try:
            found = await self._link.call(lambda r: r.get(f"{PREFIX}budget:{upstream}"))
        except Standalone:
            return await self._local.left(upstream)
        return None if found is None else int(found)

    async def back_off(self, upstream: str, seconds: float) -> None:
        await self._local.back_off(upstream, seconds)
        if seconds <= 0:
            return
        until = self._clock() + seconds
        with contextlib.suppress(Standalone):
            await self._link.call(
                lambda r: r.set(f"{PREFIX}backoff:{upstream}", until, px=int(seconds * 1000) + 1)
            )

    async def backing_off(self, upstream: str) -> float:
        try:
            until = await self._link.call(lambda r: r.get(f"{PREFIX}backoff:{upstream}"))
        except Standalone:
            return await self._local.backing_off(upstream)
        return max(0.0, float(until) - self._clock()) if until is not None else 0.0


class Scripts:
    """The Lua scripts, registered on this process's client once it is made."""

    def __init__(self, client: Client) -> None:
        self.extend: AsyncScript = client.register_script(EXTEND)
        self.release: AsyncScript = client.register_script(RELEASE)
        self.peek: AsyncScript = client.register_script(PEEK)


def _token(upstream: str, scope: str) -> str:
    """A token's key in Redis. The name is percent-encoded (a redirect target's, "<upstream>
    via <origin>", holds `:` and `/`), so the first `:` after `token:` ends it and no two
    (name, scope) share a key."""
    return f"{PREFIX}token:{quote(upstream, safe='')}:{scope}"


class ClusterTokens:
    """Upstream tokens in Redis, each also kept in this process's memory (`local`), which
    stays the hot path: a live token in memory asks Redis nothing. Not joined: memory only."""

    def __init__(self, local: TokenCache, link: Link) -> None:
        self._local = local
        self._link = link

    async def get(self, upstream: str, scope: str) -> str | None:
        """Memory, then Redis (another replica's token, kept in memory for what Redis says it
        has left)."""
        found = await self._local.get(upstream, scope)
        scripts = self._link.scripts
        if found is not None or scripts is None:
            return found
        key = _token(upstream, scope)
        try:
            raw, left = await self._link.call(lambda r: scripts.peek(keys=[key]))
        except Standalone:
            return None
        if not isinstance(raw, (bytes, str)) or not isinstance(left, int) or left <= 0:
            return None  # none, or one without an expiry, which the mirror never writes
        token = raw.decode() if isinstance(raw, bytes) else raw
        await self._local.put(upstream, scope, token, left / 1000)
        return token

    async def put(self, upstream: str, scope: str, token: str, ttl: float) -> None:
        """A token fetched from the realm, good for `ttl` seconds: kept in memory and, for
        as long, in Redis."""
        await self._local.put(upstream, scope, token, ttl)
        key, ms = _token(upstream, scope), max(int(ttl * 1000), 1)
        with contextlib.suppress(Standalone):
            await self._link.call(lambda r: r.set(key, token, px=ms))

    async def drop(self, upstream: str, scope: str, token: str) -> None:
        await self._local.drop(upstream, scope, token)
        scripts = self._link.scripts
        if scripts is None:
            return
        key = _token(upstream, scope)
        with contextlib.suppress(Standalone):
            await self._link.call(lambda r: scripts.release(keys=[key], args=[token]))


class ClusterLease:
    """One digest's fill lease, as the process holding its host's claim sees it."""

    def __init__(self, link: Link, scripts: Scripts | None, digest: Digest, advertise: str):
        self._link = link
        self._scripts = scripts
        self._key = f"{PREFIX}fill:{digest}"
        self._advertise = advertise
        self._renewing: asyncio.Task[None] | None = None

    async def take(self) -> str | None:
        if self._renewing is not None or self._scripts is None:
            return None
        scripts, key, me, ms = self._scripts, self._key, self._advertise, int(LEASE_SECONDS * 1000)
        try:
            for _ in range(2):  # a lease that lapsed between the SET and the GET: once more
                if await self._link.call(lambda r: r.set(key, me, nx=True, px=ms)):
                    break
                holder = await self._link.call(lambda r: r.get(key))
                if holder is None:
                    continue
                named = holder.decode() if isinstance(holder, bytes) else str(holder)
                if named != me:
                    return named
                if await self._link.call(lambda r: scripts.extend(keys=[key], args=[me, ms])):
                    log.info("cluster: taking over the lease on %s this replica left", key)
                    break
            else:
                return None  # Redis keeps losing it: fetch, as a standalone replica would
        except Standalone:
            return None
        self._renewing = asyncio.create_task(self._renew())
        return None

    async def _renew(self) -> None:
        """Keep the lease while the fill runs. Lost (Redis restarted empty, or this replica
        stalled past LEASE_SECONDS): taken again if free; another replica may fetch the same
        blob meanwhile, which costs a transfer, never a wrong byte."""
        assert self._scripts is not None
        scripts, key, me, ms = self._scripts, self._key, self._advertise, int(LEASE_SECONDS * 1000)
        while True:
            await asyncio.sleep(LEASE_RENEW)  # ok: the lease's renewal period
            with contextlib.suppress(Standalone):
                if not await self._link.call(lambda r: scripts.extend(keys=[key], args=[me, ms])):
                    await self._link.call(lambda r: r.set(key, me, nx=True, px=ms))

    async def release(self) -> None:
        renewing, self._renewing = self._renewing, None
        if renewing is None or self._scripts is None:
            return
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        scripts, key, me = self._scripts, self._key, self._advertise
        with contextlib.suppress(Standalone):
            await self._link.call(lambda r: scripts.release(keys=[key], args=[me]))


class ClusterCoordinator:
    """The coordination seam for one replica of a cluster: the host's, with tag records,
    upstream tokens, pull budgets and tag revalidation shared through Redis (see the module's
    docstring)."""

    def __init__(self, host: HostCoordinator, config: ClusterConfig, metrics: Metrics) -> None:
        self._host = host
        self._config = config
        self._link = Link(config, metrics)
        self.tags = ClusterTags(host.tags, self._link)
        self.budgets = ClusterBudgets(host.budgets, self._link)
        self.tokens = ClusterTokens(host.tokens, self._link)
        self._probing: asyncio.Task[None] | None = None
        metrics.cluster(False)

    @property
    def cluster(self) -> str | None:
        return "joined" if self._link.joined else "standalone"

    async def start(self) -> None:
        """Open this process's Redis client, try Redis once (so a replica whose Redis answers
        serves joined from its first request) and keep probing it in the background."""
        self._link.open()
        await self._link.probe()
        self._probing = asyncio.create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)  # ok: the probe's period
            await self._link.probe()

    async def stop(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
            self._probing = None
        await self._link.close()

    async def members(self) -> list[str]:
        """The advertised URLs of the replicas that renewed their membership lately."""
        found: list[str] = []

        async def scan(r: Client) -> None:
            async for name in r.scan_iter(match=f"{PREFIX}member:*", count=100):
                found.append(name.decode()[len(f"{PREFIX}member:") :])

        with contextlib.suppress(Standalone):
            await self._link.call(scan)
        return sorted(found)

    def fill(
        self, digest: Digest, state: Callable[[], S], work: Callable[[S], Awaitable[None]]
    ) -> Joined[S]:
        return self._host.fill(digest, state, work)

    def filling(self) -> list[Digest]:
        return self._host.filling()

    def fill_tasks(self) -> list[asyncio.Task[None]]:
        return self._host.fill_tasks()

    def fill_state(self, digest: Digest) -> object | None:
        return self._host.fill_state(digest)

    def fill_lease(self, digest: Digest) -> AbstractAsyncContextManager[FillLease]:
        return self._fill_lease(digest)

    @contextlib.asynccontextmanager
    async def _fill_lease(self, digest: Digest) -> AsyncIterator[FillLease]:
        lease = ClusterLease(self._link, self._link.scripts, digest, self._config.advertise)
        try:
            yield lease
        finally:
            await asyncio.shield(lease.release())

    async def claim(self, digest: Digest) -> Claim:
        return await self._host.claim(digest)

    async def once(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """A tag: the host's single flight and lock, then the tag's turn for the cluster.
        Anything else (a manifest by digest, a list) is each host's own to fetch: its bytes
        are not shared (yet), so waiting for another replica's fetch would save nothing."""
        if not isinstance(key, TagKey):
            return await self._host.once(key, work)
        tag = key

        async def in_turn() -> V:
            async with self._turn(tag):
                return await work()

        return await self._host.once(key, in_turn)

    @contextlib.asynccontextmanager
    async def _turn(self, key: TagKey) -> AsyncIterator[None]:
        """Hold the tag's turn in Redis while asking upstream. Not joined, or Redis failing
        meanwhile: go on without it (the host's lock still holds). Waited for longer than
        TURN_SECONDS (a slow upstream): go on too, the wait is bounded."""
        client = self._link.client if self._link.joined else None
        if client is None:
            yield
            return
        lock: Any = client.lock(
            f"{PREFIX}turn:{_tag(key)}",
            timeout=TURN_SECONDS,
            sleep=TURN_POLL,
            blocking_timeout=TURN_SECONDS,
            thread_local=False,
        )
        got = False
        try:
            got = bool(await asyncio.wait_for(lock.acquire(), TURN_SECONDS + CALL_TIMEOUT))
        except FAILURES as e:
            self._link.lost(e)
        try:
            yield
        finally:
            if got:
                try:
                    await asyncio.wait_for(lock.release(), CALL_TIMEOUT)
                except LockError:
                    pass  # it lapsed while upstream answered: another replica may hold it now
                except FAILURES as e:
                    self._link.lost(e)

    def eviction_turn(self) -> AbstractAsyncContextManager[None]:
        return self._host.eviction_turn()

    async def leads(self, role: str) -> bool:
        return await self._host.leads(role)

    def close(self) -> None:
        self._host.close()
