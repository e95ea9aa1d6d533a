"""The cluster's internal endpoint: what another replica streams a blob from while this one
fills it (pull/peers.py is the other side; coordination/peering.py the paths and the MAC).

    GET /_mirror/cluster/blobs/<digest>   [Range: bytes=<n>-]

Only with `[cluster]` on. A committed blob is sent from the store; a fill in progress from its
partial file as it grows, the way a client of this replica follows it (its last byte once the
digest checks). Nothing else is ever served: a request without a valid MAC of the cluster's
secret, with a stale one, for any other path or method under the prefix, gets 401 and an OCI
error body before anything is looked up. A digest this host neither holds nor fills is
BLOB_UNKNOWN: the asking replica then looks at the lease again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror import errors
from mirror.coordination.peering import PREFIX, authentic
from mirror.http.middleware import BASE_HEADERS, LEDGER, Ledger
from mirror.http.routes import Routes, Served
from mirror.http.sendfile import SocketSender
from mirror.oci.reference import Digest, parse_digest
from mirror.pull.blobs import Blobs

_BLOB = re.compile(r"blobs/(?P<digest>sha256:[0-9a-f]{64})")
_FROM = re.compile(r"bytes=(?P<start>[0-9]{1,19})-")


class ClusterRoutes:
    """The internal endpoint's one handler, over this replica's blobs."""

    def __init__(
        self, routes: Routes, blobs: Blobs, secret: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._routes = routes
        self._blobs = blobs
        self._secret = secret
        self._clock = clock

    def install(self, app: web.Application) -> None:
        app.router.add_route("*", PREFIX + "{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request[LEDGER] = Ledger("cluster")
        header = request.headers.get("Authorization")
        m = _BLOB.fullmatch(request.match_info["tail"])
        signed = authentic(self._secret, request.method, request.path, header, self._clock())
        if not signed or m is None or request.method != "GET":
            raise errors.Unauthorized("not a request of this mirror's cluster")
        digest = parse_digest(m["digest"])
        spec = request.headers.get("Range")
        start_m = _FROM.fullmatch(spec) if spec is not None else None
        if spec is not None and start_m is None:
            raise errors.InvalidRequest("a replica asks for bytes=<n>- only")
        start = int(start_m["start"]) if start_m is not None else 0
        async with self._blobs.for_peer(digest) as answer:
            request[LEDGER].outcome = answer.outcome.value
            if answer.stored is not None:
                blob = answer.stored
                try:
                    size, data, fd = blob.size, blob.data, blob.fd

                    async def stored(sender: SocketSender, _: Served) -> None:
                        if data is not None:
                            await sender.write(data[start:])
                        else:
                            await sender.send(fd, start, size - start)

                    return await self._answer(request, digest, size, start, stored)
                finally:
                    blob.close()
            fill = answer.fill
            assert fill is not None
            await fill.ready()
            rfd = fill.attach()
            if rfd is None or fill.size is None:  # committed meanwhile: from the store
                if rfd is not None:
                    os.close(rfd)
                await fill.finished()
                return await self.handle(request)
            try:
                size = fill.size

                async def growing(sender: SocketSender, _: Served) -> None:
                    await sender.send_growing(rfd, start, size, fill.available)

                with fill.watched():
                    return await self._answer(request, digest, size, start, growing)
            finally:
                os.close(rfd)

    async def _answer(
        self,
        request: web.Request,
        digest: Digest,
        size: int,
        start: int,
        send: Callable[[SocketSender, Served], Awaitable[None]],
    ) -> web.StreamResponse:
        """The blob from `start` on (200 whole, else 206), its bytes sent by `send`; bytes
        sent to a replica are not counted as served to clients (that replica counts its own)."""
        if start >= size and size:
            raise errors.RangeInvalid(size)
        headers = {
            **BASE_HEADERS,
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": str(digest),
        }
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        return await self._routes.stream(request, status, headers, size - start, send)
