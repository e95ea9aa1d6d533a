"""Registry API handlers: parse and validate, ask the service, stream the answer.

Endpoints (OCI distribution spec, pull side):
    GET       /v2/                               API version check
    GET|HEAD  /v2/<name>/manifests/<reference>   tag or digest
    GET|HEAD  /v2/<name>/blobs/<digest>          with Range, multi-range too (RFC 9110 §14)
    GET       /v2/<name>/tags/list               n / last passed through
    GET       /v2/<name>/referrers/<digest>      passed through
Anything that writes (POST, PUT, PATCH, DELETE) is UNSUPPORTED: this is a read-only mirror.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from mirror import errors
from mirror.bounded import Bounded
from mirror.events import Events
from mirror.http.access import Access
from mirror.http.middleware import (
    BASE_HEADERS,
    FRONT_DOOR,
    LEDGER,
    Answering,
    Handler,
    Ledger,
    client_of,
)
from mirror.http.sendfile import ClientGone, ClientStalled, Pace, SocketSender, abort
from mirror.metrics import Metrics
from mirror.oci.mediatypes import parse_accept
from mirror.oci.reference import Digest, parse_digest, parse_reference
from mirror.outcome import Outcome
from mirror.pull.fill import Fill
from mirror.pull.service import MirrorService
from mirror.ranges import Multipart, Span, Spec
from mirror.ranges import parse as parse_ranges
from mirror.ranges import plan as plan_ranges
from mirror.store.blobs import OpenBlob
from mirror.store.manifests import StoredManifest
from mirror.upstream.client import FILTERS_APPLIED
from mirror.upstream.routing import Router, Target

log = logging.getLogger("mirror.http")

#: On an answer served stale because upstream failed (RFC 9111 leaves Warning to 299, its
#: miscellaneous persistent warning).
STALE_WARNING = '299 - "response is stale: upstream could not be reached"'

#: Manifest answers whose headers are kept built (a few hundred bytes each).
MANIFEST_HEADERS = 4096

#: Blob bytes sent in one answer, by where they came from (the metrics' `source`).
Served = Counter[str]
#: Sends bytes [start, end) of the blob and counts them in `served`.
Part = Callable[[SocketSender, int, int, Served], Awaitable[None]]

#: The endpoint by the path's last but one segment: `<name>/manifests/<reference>`,
#: `<name>/blobs/<digest>`, `<name>/tags/list`, `<name>/referrers/<digest>`.
_ENDPOINTS = {"manifests": "manifest", "blobs": "blob", "tags": "tags", "referrers": "referrers"}


class Routes:
    """The handlers, bound to the service and the pieces they stream with."""

    def __init__(
        self,
        service: MirrorService,
        router: Router,
        sender_pool: ThreadPoolExecutor,
        pace: Pace,
        metrics: Metrics,
        access: Access,
        events: Events,
    ) -> None:
        self._access = access
        self._events = events
        self._pull_events = events.wants("pull")
        self._service = service
        self._router = router
        self._pool = sender_pool
        self._pace = pace
        self._metrics = metrics
        #: Manifest answers' headers by (digest, media type, outcome, namespace).
        self._manifest_headers: Bounded[
            tuple[Digest, str, str, str | None], CIMultiDictProxy[str]
        ] = Bounded(MANIFEST_HEADERS)
        self._handlers: dict[str, Callable[..., Awaitable[web.StreamResponse]]] = {
            "manifest": self.manifest,
            "blob": self.blob,
            "tags": self.tags,
            "referrers": self.referrers,
        }

    def install(self, app: web.Application, answer: Answering) -> None:
        """The routes, and the front door every connection's requests come in by."""
        app.router.add_get("/v2", self.base)
        app.router.add_get("/v2/", self.base)
        self._route = app.router.add_route("*", "/v2/{tail:.+}", self.dispatch)
        self._app = app
        self._answer = answer
        app[FRONT_DOOR] = self.front_door

    def front_door(self, routed: Handler) -> Handler:
        """A connection's request handler: a request for `/v2/<something>` goes to `dispatch`
        through `answer` at once, anything else to `routed` (aiohttp's router, then the same
        `answer` as its middleware). aiohttp would resolve the path against every route, build
        the match info and wrap the middleware, a tenth of a manifest hit's time, only to find
        the `/v2/{tail:.+}` route again. The request gets the match info that route would give
        it (what `request.app`, `request.match_info` and the app's `on_response_prepare`
        signal go by). A path with a newline in it (which that route does not match) or a
        request with `Expect` (which aiohttp's route answers) takes the router, so either door
        gives the same answer."""
        answer, dispatch, route, app = self._answer, self.dispatch, self._route, self._app

        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.path
            if (
                len(path) > 4
                and path.startswith("/v2/")
                and "\n" not in path
                and hdrs.EXPECT not in request.headers
            ):
                found = web.UrlMappingMatchInfo({"tail": path[4:]}, route)
                found.add_app(app)
                found.freeze()
                request._match_info = found  # what aiohttp's Application._handle sets
                return await answer(request, dispatch)
            return await routed(request)

        return handle

    async def base(self, request: web.Request) -> web.Response:
        request[LEDGER] = Ledger("base")
        if self._access.enabled:
            await self._access.check(request, None)
        return web.json_response({}, headers=BASE_HEADERS)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Find the endpoint by the path's last segments (a name may itself contain them):
        what follows `/v2/` is `<name>/<endpoint>/<reference>`, the name at least one
        character, the reference (`list` for tags) none of them a `/`."""
        name, _, rest = request.path[4:].rpartition("/")
        name, _, kind = name.rpartition("/")
        route = _ENDPOINTS.get(kind) if name and rest and kind else None
        if route == "tags" and rest != "list":
            route = None
        if request.method not in ("GET", "HEAD"):
            if route is not None:
                request[LEDGER] = Ledger(route)
            raise errors.Unsupported()
        if route is None:
            raise errors.EndpointUnknown()
        request[LEDGER] = ledger = Ledger(route)
        ns = request.query.get("ns") if request.query_string else None
        target = self._router.route(name, ns)
        ledger.upstream = target.upstream.name
        if self._access.enabled:
            await self._access.check(request, target)
        return await self._handlers[route](request, target, None if route == "tags" else rest)

    # -- manifests ---------------------------------------------------------------------------

    async def manifest(self, request: web.Request, target: Target, ref: str) -> web.Response:
        reference = parse_reference(ref)
        accept = parse_accept(request.headers.getall("Accept", []))
        service = self._service
        if reference.digest is not None:
            hot = service.manifests.hot_digest(reference.digest)
        else:
            assert reference.tag is not None
            hot = service.manifests.hot(target, reference.tag)
        if hot is not None and accept.allows(hot.media_type):
            m, outcome = hot, Outcome.HIT
        else:
            answer = await service.manifests.get(target, reference, accept)
            m, outcome = answer.manifest, answer.outcome
        service.ahead.after(target, m)
        if self._pull_events:  # emitted before the answer goes out (events/__init__.py)
            user = self._access.user(request) if self._access.enabled else None
            client = client_of(request)
            self._events.pull(target, ref, m, request.method, client, user, outcome)
        return self._manifest_response(request, target, m, outcome)

    def _manifest_response(
        self, request: web.Request, target: Target, m: StoredManifest, outcome: Outcome
    ) -> web.Response:
        value = outcome.value
        request[LEDGER].outcome = value
        key = (m.digest, m.media_type, value, target.namespace)
        headers = self._manifest_headers.get(key)
        if headers is None:
            headers = self._manifest_headers.remember(key, self._headers_of(m, target, outcome))
        match = request.headers.get("If-None-Match", "")
        if headers["ETag"] in match or match.strip() == "*":  # RFC 9110 §13.1.2: not modified
            return web.Response(status=304, headers=headers)
        return web.Response(body=m.data, headers=headers)

    def _headers_of(
        self, m: StoredManifest, target: Target, outcome: Outcome
    ) -> CIMultiDictProxy[str]:
        """A manifest answer's headers: the same for every answer of that manifest with that
        outcome under that namespace, so they are built once. aiohttp copies them into each
        response, and copies a multidict four times faster than a dict; the proxy keeps
        anything from changing the one kept."""
        headers = {
            **BASE_HEADERS,
            "Content-Type": m.media_type,
            "Docker-Content-Digest": str(m.digest),
            "ETag": f'"{m.digest}"',
            "X-Mirror-Cache": outcome.value,
        }
        self._annotate(headers, target, outcome)
        return CIMultiDictProxy(CIMultiDict(headers))

    @staticmethod
    def _annotate(headers: dict[str, str], target: Target, outcome: Outcome) -> None:
        if target.namespace is not None:
            headers["OCI-Namespace"] = target.namespace
        if outcome is Outcome.STALE:
            headers["Warning"] = STALE_WARNING

    # -- blobs -------------------------------------------------------------------------------

    async def blob(self, request: web.Request, target: Target, ref: str) -> web.StreamResponse:
        digest = parse_digest(ref)
        if request.method == "HEAD":
            return await self._blob_head(request, target, digest)
        specs = requested_ranges(request)
        answer = await self._service.blobs.get(
            target, digest, client_of(request) or "", ranged=specs is not None
        )
        if answer.outcome is Outcome.PASS_THROUGH:
            self._metrics.lookup("pass-through")
            return await self._send_through(request, target, digest)
        request[LEDGER].outcome = answer.outcome.value
        if answer.stored is not None:
            self._metrics.lookup(answer.tier)
            return await self._send_stored(
                request, target, digest, answer.stored, answer.outcome, specs, answer.tier
            )
        assert answer.fill is not None
        try:
            await answer.fill.ready()
        except errors.DiskFull:
            self._metrics.lookup("pass-through")
            return await self._send_through(request, target, digest)
        outcome = answer.outcome
        if outcome is Outcome.MISS and not answer.fill.fetched:  # another process fetches it
            outcome = Outcome.COALESCED
            request[LEDGER].outcome = outcome.value
        return await self._send_filling(request, target, digest, answer.fill, outcome, specs)

    async def _blob_head(
        self, request: web.Request, target: Target, digest: Digest
    ) -> web.StreamResponse:
        size, outcome = await self._service.blobs.size(target, digest)
        request[LEDGER].outcome = outcome.value
        response = web.StreamResponse(headers=self._blob_headers(target, digest, outcome))
        if size is not None:
            response.content_length = size
        await response.prepare(request)
        return response

    def _blob_headers(self, target: Target, digest: Digest, outcome: Outcome) -> dict[str, str]:
        headers = {
            **BASE_HEADERS,
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
            "X-Mirror-Cache": outcome.value,
        }
        self._annotate(headers, target, outcome)
        return headers

    async def _send_stored(
        self,
        request: web.Request,
        target: Target,
        digest: Digest,
        blob: OpenBlob,
        outcome: Outcome,
        specs: list[Spec] | None,
        tier: str = "warm",
    ) -> web.StreamResponse:
        try:
            spans = _spans(specs, blob.size)
            headers = self._blob_headers(target, digest, outcome)
            data = blob.data
            if data is not None and len(spans) == 1:  # small: one write, no sendfile thread hop
                start, end = spans[0]
                status = _one_span(headers, blob.size, start, end)
                self._metrics.served(tier, end - start)
                return web.Response(status=status, body=data[start:end], headers=headers)
            fd = blob.fd

            async def part(sender: SocketSender, start: int, end: int, served: Served) -> None:
                if data is not None:
                    await sender.write(data[start:end])
                else:
                    await sender.send(fd, start, end - start)
                served[tier] += end - start

            return await self._send_spans(request, headers, blob.size, spans, part)
        finally:
            blob.close()

    async def _send_filling(
        self,
        request: web.Request,
        target: Target,
        digest: Digest,
        fill: Fill,
        outcome: Outcome,
        specs: list[Spec] | None,
    ) -> web.StreamResponse:
        """Follow a fill from the partial file as it grows (or the committed file once done).
        A range the fill has not reached yet is asked of upstream at once instead (lazy
        pulling: a 64 KiB read of a layer's tail does not wait for the whole layer)."""
        await fill.ready()
        fd = fill.attach()
        if fd is None or fill.size is None:
            if fd is not None:
                os.close(fd)
            self._metrics.lookup(fill.source)
            await fill.finished()
            stored = await self._service.blobs.committed(digest)
            if stored is None:
                raise errors.BlobUnknown(detail={"digest": str(digest)})
            return await self._send_stored(request, target, digest, stored, outcome, specs)
        try:
            size = fill.size
            spans = _spans(specs, size)
            if spans == [(0, size)]:  # the whole blob: its last byte once the digest checks
                self._metrics.lookup(fill.source)

                async def whole(sender: SocketSender, start: int, end: int, served: Served) -> None:
                    await sender.send_growing(fd, start, end, fill.available)
                    served[fill.source] += end - start

                headers = self._blob_headers(target, digest, outcome)
                with fill.watched():
                    return await self._send_spans(request, headers, size, spans, whole)
            lazy = any(fill.behind(end) for _, end in spans)
            if lazy:
                outcome = Outcome.PASS_THROUGH
                request[LEDGER].outcome = outcome.value
            self._metrics.lookup("range" if lazy else fill.source)

            async def part(sender: SocketSender, start: int, end: int, served: Served) -> None:
                pos = start
                if fill.behind(end):
                    pos = await self._range_through(sender, target, digest, start, end, served)
                if pos < end:
                    await sender.send_growing(fd, pos, end, fill.landed)
                    served[fill.source] += end - pos

            headers = self._blob_headers(target, digest, outcome)
            with fill.watched():
                return await self._send_spans(request, headers, size, spans, part)
        finally:
            os.close(fd)

    async def _range_through(
        self,
        sender: SocketSender,
        target: Target,
        digest: Digest,
        start: int,
        end: int,
        served: Served,
    ) -> int:
        """Send what upstream gives of [start, end) of a blob being filled and return how far
        it got: the rest comes from the fill, when upstream ignored the Range or failed on
        the way (the bytes are the same blob's either way)."""
        pos = start
        try:
            async with self._service.blobs.upstream_range(target, digest, start, end) as body:
                if body is not None:
                    async for chunk in body.chunks():
                        await sender.write(chunk)
                        pos += len(chunk)
        except errors.MirrorError as e:
            log.info(
                "range %d-%d of %s: upstream failed at %d (%s); the fill brings the rest",
                start,
                end - 1,
                digest,
                pos,
                e,
            )
        served["range"] += pos - start
        return pos

    async def _send_through(
        self, request: web.Request, target: Target, digest: Digest
    ) -> web.StreamResponse:
        """No room on disk: this client gets the blob straight from upstream (whole: a Range
        may be ignored, RFC 9110 §14.2), verified on the way, and nothing is kept."""
        request[LEDGER].outcome = Outcome.PASS_THROUGH.value
        async with self._service.blobs.pass_through(target, digest) as body:
            response = web.StreamResponse(
                headers=self._blob_headers(target, digest, Outcome.PASS_THROUGH)
            )
            response.content_length = body.size
            await response.prepare(request)
            sent = 0
            try:
                async for chunk in body.chunks():
                    await response.write(chunk)
                    sent += len(chunk)
            except errors.MirrorError:
                abort(request)
                return response
        self._metrics.served("upstream", sent)
        await response.write_eof()
        return response

    async def _send_spans(
        self,
        request: web.Request,
        headers: dict[str, str],
        size: int,
        spans: list[Span],
        part: Part,
    ) -> web.StreamResponse:
        """The answer holding `spans` of a blob of `size` bytes: the whole (200), one range
        (206, RFC 9110 §15.3.7) or several as `multipart/byteranges` (§14.6), each part's
        bytes sent by `part`."""
        if len(spans) == 1:
            start, end = spans[0]
            status = _one_span(headers, size, start, end)

            async def one(sender: SocketSender, served: Served) -> None:
                await part(sender, start, end, served)

            return await self.stream(request, status, headers, end - start, one)
        framing = Multipart(spans, size, headers["Content-Type"], secrets.token_hex(16))
        headers["Content-Type"] = framing.content_type

        async def parts(sender: SocketSender, served: Served) -> None:
            for i, (start, end) in enumerate(spans):
                await sender.write(framing.head(i))
                await part(sender, start, end, served)
            await sender.write(framing.tail)

        return await self.stream(request, 206, headers, framing.length, parts)

    async def stream(
        self,
        request: web.Request,
        status: int,
        headers: dict[str, str],
        length: int,
        send: Callable[[SocketSender, Served], Awaitable[None]],
    ) -> web.StreamResponse:
        """Send the headers, then the body through a SocketSender (`send` counts the bytes it
        sent by source); a failure after the headers cuts the connection, so the client sees
        a failed transfer, never a short success. The cluster's internal endpoint
        (http/cluster.py) sends through it too."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        served: Served = Counter()
        try:
            async with SocketSender(request, response, self._pool, self._pace) as sender:
                await send(sender, served)
        except (ClientGone, errors.MirrorError) as e:
            reason = (
                "fill_failed"
                if isinstance(e, errors.MirrorError)
                else "stalled"
                if isinstance(e, ClientStalled)
                else "gone"
            )
            if reason == "stalled":
                log.info("dropped a slow client (%s): %s %s", e, client_of(request), request.path)
            self._metrics.aborted(reason)
            abort(request)
            return response
        for source, nbytes in served.items():
            self._metrics.served(source, nbytes)
        await response.write_eof()
        return response

    # -- lists -------------------------------------------------------------------------------

    async def tags(self, request: web.Request, target: Target, _: None) -> web.Response:
        query = {k: v for k, v in request.query.items() if k in ("n", "last")}
        return await self._listing(request, target, "tags/list", query)

    async def referrers(self, request: web.Request, target: Target, ref: str) -> web.Response:
        digest = parse_digest(ref)
        query = {k: v for k, v in request.query.items() if k == "artifactType"}
        return await self._listing(request, target, f"referrers/{digest}", query)

    async def _listing(
        self, request: web.Request, target: Target, suffix: str, query: dict[str, str]
    ) -> web.Response:
        cached, outcome = await self._service.manifests.listing(target, suffix, query)
        request[LEDGER].outcome = outcome.value
        headers = {
            **BASE_HEADERS,
            "Content-Type": cached.content_type,
            "X-Mirror-Cache": outcome.value,
        }
        self._annotate(headers, target, outcome)
        if cached.link:
            headers["Link"] = next_link(cached.link, target)
        if cached.filters is not None:
            headers[FILTERS_APPLIED] = cached.filters
        return web.Response(body=cached.body, headers=headers)


def next_link(link: str, target: Target) -> str:
    """Upstream's pagination `Link` (`<url>; rel="next"`), as the client must follow it: to
    the mirror (a relative URL, even when upstream gave its own absolute one), under the name
    the client used, with its `ns` kept."""
    url, sep, params = link.partition(">")
    parts = urlsplit(url.strip().lstrip("<"))
    path = parts.path
    own = f"/v2/{target.repo}/"
    if path.startswith(own):
        path = f"/v2/{target.name}/" + path[len(own) :]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "ns"]
    if target.namespace is not None:
        query.append(("ns", target.namespace))
    rewritten = path + ("?" + urlencode(query) if query else "")
    return f"<{rewritten}{sep}{params}" if sep else f"<{rewritten}>"


def requested_ranges(request: web.Request) -> list[Spec] | None:
    """The range-specs of the request's Range header; None without a usable one."""
    value = request.headers.get("Range")
    return None if value is None else parse_ranges(value)


def _spans(specs: list[Spec] | None, size: int) -> list[Span]:
    """What a blob answer holds: the whole blob without a usable Range, else the parts the
    Range comes to (ranges.plan); RANGE_INVALID when none of it lies in the blob."""
    if specs is None:
        return [(0, size)]
    spans = plan_ranges(specs, size)
    if not spans:
        raise errors.RangeInvalid(size)
    return spans


def _one_span(headers: dict[str, str], size: int, start: int, end: int) -> int:
    """The status of an answer of one span: 200 for the whole blob, else 206 with its
    Content-Range (added to `headers`)."""
    if (start, end) == (0, size):
        return 200
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return 206
