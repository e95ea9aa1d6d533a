"""A fill's source in a cluster: one replica fetches a blob from upstream, every other one
that misses it meanwhile streams that replica's fill.

The process holding its host's claim on a digest asks the digest's fill lease
(coordination/cluster.py) before it asks cold or upstream. Free, or this replica's: it takes
it and promotes the blob from the shared cold tier, or fetches it from upstream. Held by
another replica: it streams the blob from that replica's internal endpoint
(coordination/peering.py, http/cluster.py) from the byte its own partial file
ends at, as the owner's fill grows, and writes and hashes it exactly as it would upstream's
bytes: its own clients and worker processes follow its partial file as ever, and nothing is
committed that its own digest check did not pass.

When that stream breaks (the owner was killed, cut off, or its fill failed) the lease is asked
again from the byte reached: a dead owner's lease lapses within LEASE_SECONDS, one follower
takes it and carries on from upstream with Range, the others stream from that one. An owner
that holds the lease but does not answer for LEASE_WAIT seconds is given up on: this replica
fetches from upstream itself (a second transfer, never a wrong byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from mirror import errors
from mirror.body import BlobBody
from mirror.config import Config
from mirror.coordination import FillLease
from mirror.coordination.cluster import LEASE_SECONDS
from mirror.coordination.peering import authorization, blob_path
from mirror.oci.reference import Digest
from mirror.pull.fill import BlobSource
from mirror.upstream.client import BlobStream, translated
from mirror.upstream.resume import PROGRESS, RESUMABLE

log = logging.getLogger("mirror.cluster")

#: Seconds an owner that holds the lease may fail to answer before this replica fetches
#: from upstream itself: its lease has had time to lapse twice over if it were dead.
LEASE_WAIT = 2 * LEASE_SECONDS + 1
#: Seconds between two looks at the lease while its holder does not answer.
LEASE_POLL = 0.05
#: Where a fill's bytes came from this time: "peer" or "upstream" (the fill's `source`).
CameFrom = Callable[[str], Awaitable[None]]
#: Opens the next body from an offset into `stack`: (body, the whole blob's size, kind).
_Choose = Callable[[contextlib.AsyncExitStack, int], Awaitable[tuple[BlobBody, int | None, str]]]


class Peers:
    """This process's client of the other replicas' internal endpoints."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self._secret = config.cluster.secret
        self._timeouts = config.timeouts
        self._attempts = config.retries.attempts
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """The session, made on the serving loop (each worker process its own). A connect
        that takes longer than a lease is an owner not to wait for; a silence as long as an
        upstream's may be the owner's own wait on upstream."""
        t = self._timeouts
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, connect=LEASE_SECONDS, sock_read=t.read + LEASE_SECONDS
            ),
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def source(
        self, digest: Digest, lease: FillLease, own: BlobSource, came_from: CameFrom
    ) -> BlobSource:
        """The fill's source: `own` (the shared cold tier, else upstream) once this replica
        holds the lease, else the owner's fill, switching over whenever the owner's stream
        breaks (the module's docstring)."""

        async def choose(
            stack: contextlib.AsyncExitStack, offset: int
        ) -> tuple[BlobBody, int | None, str]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LEASE_WAIT
            while (owner := await lease.take()) is not None:
                try:
                    body = await stack.enter_async_context(self._peer(owner, digest, offset))
                except errors.MirrorError as e:
                    if loop.time() < deadline:
                        await asyncio.sleep(LEASE_POLL)  # ok: polling the lease with a deadline
                        continue
                    log.warning(
                        "cluster: %s holds the lease on %s but does not serve it (%s); "
                        "fetching it from upstream",
                        owner,
                        digest,
                        e,
                    )
                    break
                await came_from("peer")
                log.info("streaming %s from %s, from byte %d", digest, owner, offset)
                return body, None if body.size is None else offset + body.size, "peer"
            await came_from("upstream")
            if offset:
                log.warning(
                    "cluster: carrying the fill of %s on from upstream at byte %d", digest, offset
                )
            body = await stack.enter_async_context(own(offset))
            return body, body.size, "upstream"

        @contextlib.asynccontextmanager
        async def open_at(offset: int) -> AsyncIterator[BlobBody]:
            relayed = _Relayed(choose, self._attempts, str(digest))
            try:
                await relayed.start(offset)
                yield relayed
            finally:
                await relayed.close()

        return open_at

    @contextlib.asynccontextmanager
    async def _peer(self, owner: str, digest: Digest, offset: int) -> AsyncIterator[BlobBody]:
        """The owner's answer from `offset` on, authenticated with the cluster's secret."""
        assert self._session is not None
        path = blob_path(digest)
        headers = {"Authorization": authorization(self._secret, "GET", path, self._clock())}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with translated():
            response = await self._session.get(owner + path, headers=headers)
        try:
            if response.status != (206 if offset else 200):
                raise errors.UpstreamUnavailable(
                    f"the replica filling it answered {response.status}",
                    detail={"replica": owner},
                )
            yield BlobStream(response, lambda _: None)
        finally:
            response.release()


class _Relayed:
    """The whole blob from `offset` on as one body, whatever serves each part of it: the
    owner's fill, then (its stream broken) whoever the lease names then, or upstream."""

    def __init__(self, choose: _Choose, attempts: int, name: str) -> None:
        self._choose = choose
        self._attempts = attempts
        self._name = name
        self._stack = contextlib.AsyncExitStack()
        self._body: BlobBody | None = None
        self._kind = ""
        self._offset = 0
        self.size: int | None = None

    async def start(self, offset: int) -> None:
        self._offset = offset
        self._body, self.size, self._kind = await self._choose(self._stack, offset)

    async def close(self) -> None:
        await self._stack.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        got, failures = self._offset, 0
        while True:
            since = got
            assert self._body is not None
            try:
                async for chunk in self._body.chunks():
                    got += len(chunk)
                    yield chunk
                return
            except RESUMABLE as e:
                failures = 1 if got - since >= PROGRESS else failures + 1
                done = self.size is not None and got >= self.size
                if self._kind != "peer" or failures >= self._attempts or done:
                    raise  # upstream's own body resumes itself; past that, the fill fails
                log.warning(
                    "cluster: the stream of %s broke off after %d bytes (%s); asking its "
                    "lease again",
                    self._name,
                    got,
                    e,
                )
            await self._stack.aclose()
            self._stack = contextlib.AsyncExitStack()
            self._body, size, self._kind = await self._choose(self._stack, got)
            if size is not None and self.size is not None and size != self.size:
                raise errors.UpstreamBadResponse(
                    "the blob's size changed between its sources",
                    detail={"before": self.size, "now": size},
                )
