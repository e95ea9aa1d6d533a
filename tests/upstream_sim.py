"""An upstream registry simulator for behaviour a real registry cannot be made to show.

Token auth, redirects to a CDN on another host, Docker Hub rate-limit headers, and
precisely controlled failures (errors, stalls mid-body, truncation, corruption, hangs,
outages) are what the mirror must survive; this aiohttp server produces each on demand,
on real sockets, inside the test's event loop, and counts everything it is asked.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import secrets
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from images import Image, sha256_digest

FaultKind = Literal["status", "slow", "cut", "wrong", "hang", "trickle", "rate"]
BODY_FAULTS = ("slow", "cut", "wrong", "trickle", "rate")
#: Bytes per write of a `rate` body.
RATE_PIECE = 64 * 1024


@dataclass(eq=False)
class Fault:
    """One armed failure. `target` is a request kind ("ping", "token", "manifest",
    "blob", "tags", "cdn"), a digest, or a manifest tag.

    `status`: answer `status` with `headers`. `hang`: wait for `gate` before answering
    normally. `slow`: send `part` bytes of the body, wait for `gate`, send the rest.
    `cut`: send `part` bytes then close the connection (full Content-Length promised);
    with `hold`, wait for `gate` before closing.
    `wrong`: send the full length with one byte flipped. `trickle`: send `part` bytes, then
    `step` bytes every `interval` seconds (never silent long enough for a read timeout)
    until the body is done or `gate` is set. `rate`: send the body at `rate` bytes/s (each
    answer on its own, as a remote upstream's bandwidth per connection would). `reached` is
    set each time a
    request gets to the fault point (after the first part, for body faults), so tests
    can await it instead of sleeping. `times` limits how often it fires (None: always).
    """

    target: str
    kind: FaultKind
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    part: int | None = None
    times: int | None = None
    method: str | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0
    step: int = 100
    hold: bool = False
    interval: float = 0.05
    rate: int = 20_000_000

    def applies(self, kinds: tuple[str, ...], keys: set[str], method: str, body: bool) -> bool:
        """Whether this fault should fire for a request of `kinds` about `keys`."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        if (self.kind in BODY_FAULTS) != body:
            return False
        return self.target in kinds or self.target in keys


@dataclass
class RateLimit:
    """Docker Hub style pull accounting: manifest GETs count down, HEADs are free,
    and at zero manifest GETs get 429 with Retry-After."""

    limit: int = 100
    remaining: int = 100
    retry_after: int = 60
    window: int = 21600


@dataclass(frozen=True)
class Seen:
    """One request as received, for assertions on headers (Accept, Range, ...)."""

    server: str  # "registry" or "cdn"
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A registry-API error body, as distribution and Docker Hub send them."""
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


class _Server:
    """One aiohttp listener that can be stopped and restarted on the same port (over TLS
    with `tls`)."""

    def __init__(self, app: web.Application, host: str, tls: ssl.SSLContext | None = None) -> None:
        self.app, self.host, self.port, self.tls = app, host, 0, tls
        self._runner: web.AppRunner | None = None
        self.inflight: dict[asyncio.Task[Any], web.Request] = {}

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Bind `host:port` (an ephemeral port the first time, the same one afterwards)."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, ssl_context=self.tls).start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and drop every connection, aborting requests in progress
        (a hung or gated request would otherwise hold shutdown)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for task, request in list(self.inflight.items()):
            if request.transport is not None:
                request.transport.abort()
            task.cancel()
        await runner.cleanup()


class UpstreamSim:
    """The simulated registry plus its "CDN" on another loopback address.

    Content: `add_blob`, `add_manifest`, `add_image`, `delete_manifest`. Switches:
    `require_bearer`, `require_basic`, `revoke_tokens`, `redirect_blobs`, `cdn_bearer`,
    `refresh_tokens`, `rate_limit`, `ranges`, `strict_accept`, `realm`, `fault`,
    `clear_faults`, `down`/`up`. Observations: `requests`, `sent`, `auth_seen`, `log`,
    `cdn_requests`, `cdn_authorizations`, `cdn_tokens`, `tokens_issued`, `token_forms`.
    With `tls` the registry listens on https (the CDN stays on http).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        cdn_host: str = "127.0.0.2",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.auth: Literal["none", "bearer", "basic"] = "none"
        self.credentials: tuple[str, str] | None = None
        self.tokens: dict[str, set[str]] = {}
        self.token_ttl = 300
        self.tokens_issued = 0
        #: The realm Bearer challenges name (None: this registry's own /token). Another
        #: simulator's /token issues tokens this one honours if the two share `tokens`.
        self.realm: str | None = None
        self.redirect_blobs = False
        #: The CDN demands Bearer tokens of its own: it challenges with a realm of its own
        #: (`<cdn_url>/token`), which issues them into `cdn_tokens`.
        self.cdn_bearer = False
        self.cdn_tokens: set[str] = set()
        #: Refresh tokens (docker's identity tokens) that `POST /token` takes for an OAuth2
        #: refresh-token grant; every form POSTed there is kept in `token_forms`.
        self.refresh_tokens: set[str] = set()
        self.token_forms: list[dict[str, str]] = []
        self.ranges = True
        self.strict_accept = False
        #: Send Docker-Content-Digest with manifests (a registry may not).
        self.digest_header = True
        #: Compress bodies for clients that accept gzip, as a proxy or CDN on the way may.
        self.gzip_when_asked = False
        #: Pagination links as absolute URLs (some registries send them so).
        self.absolute_links = False
        #: Serve the referrers API (off: a registry without it, which answers 404).
        self.referrers_api = False
        #: Other representations of a tag, (bytes, media type), for clients whose Accept
        #: excludes the stored one (Docker Hub gives a schema 2 client a single manifest).
        self.variants: dict[tuple[str, str], list[tuple[bytes, str]]] = {}
        #: Blobs only some repositories have (any other is 404); every other blob is in all.
        self.blob_repos: dict[str, set[str]] = {}
        self.ratelimit: RateLimit | None = None
        self.faults: list[Fault] = []
        self.requests: Counter[tuple[str, str]] = Counter()
        #: Body bytes the registry handed to its transport, by path (a body cut off or held
        #: counts what went out before).
        self.sent: Counter[str] = Counter()
        self.auth_seen: Counter[str] = Counter()
        self.cdn_requests: Counter[tuple[str, str]] = Counter()
        self.cdn_authorizations: list[str] = []
        self.log: list[Seen] = []

        app = web.Application(middlewares=[self._observe("registry")])
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._token_grant)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        cdn = web.Application(middlewares=[self._observe("cdn")])
        cdn.router.add_get("/blobs/{digest}", self._cdn_blob)
        cdn.router.add_get("/token", self._cdn_token)
        self.registry = _Server(app, host, tls)
        self.cdn = _Server(cdn, cdn_host)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"{self.registry.host}:{self.registry.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.registry.tls else 'http'}://{self.host}"

    @property
    def cdn_url(self) -> str:
        return f"http://{self.cdn.host}:{self.cdn.port}"

    async def start(self) -> str:
        """Start (or restart, same ports) the registry and the CDN; return the registry URL."""
        await self.cdn.start()
        await self.registry.start()
        return self.url

    async def stop(self) -> None:
        """Stop both servers, aborting anything in progress; `start()` revives them."""
        await self.registry.stop()
        await self.cdn.stop()

    async def down(self) -> None:
        """Outage: the registry stops listening (connections refused); the CDN stays up."""
        await self.registry.stop()

    async def up(self) -> None:
        """End of outage: listen again on the same port."""
        await self.registry.start()

    # -- content ---------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        """Serve `data` as a blob (in every repository); return its digest."""
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """Serve a manifest by digest and, if `ref` is a tag, by that tag; return its digest."""
        digest = sha256_digest(data)
        tags = self.manifests.setdefault(repo, {})
        tags[digest] = (data, media_type)
        if ref != digest:
            tags[ref] = (data, media_type)
        return digest

    def add_image(self, repo: str, tag: str, image: Image) -> str:
        """Serve an `images.Image` (index children and all blobs included) under `tag`."""
        for child in image.children:
            self.add_image(repo, sha256_digest(child.data), child)
        for data in image.blobs.values():
            self.add_blob(data)
        return self.add_manifest(repo, tag, image.data, image.media_type)

    def only_in(self, repo: str, image: Image) -> None:
        """Make `image`'s blobs exist in `repo` alone, as a private repository's are."""
        for digest in image.blobs:
            self.blob_repos[digest] = {repo}

    def delete_manifest(self, repo: str, ref: str) -> None:
        """Forget a tag or digest, e.g. to test upstream 404s for cached content."""
        self.manifests.get(repo, {}).pop(ref, None)

    # -- switches --------------------------------------------------------------------

    def require_bearer(self, user: str | None = None, password: str | None = None) -> None:
        """Demand Bearer tokens from /token; with `user`, /token demands Basic credentials."""
        self.auth = "bearer"
        self.credentials = (user, password or "") if user is not None else None

    def require_basic(self, user: str, password: str) -> None:
        """Demand HTTP Basic credentials on every /v2/ request."""
        self.auth, self.credentials = "basic", (user, password)

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (as expiry would), forcing clients to re-auth."""
        self.tokens.clear()

    def rate_limit(
        self, limit: int = 100, remaining: int | None = None, retry_after: int = 60
    ) -> RateLimit:
        """Send rate-limit headers on manifests; `remaining=0` makes manifest GETs 429."""
        self.ratelimit = RateLimit(limit, limit if remaining is None else remaining, retry_after)
        return self.ratelimit

    def fault(self, target: str, kind: FaultKind, **options: Any) -> Fault:
        """Arm a `Fault` (see its docstring for targets, kinds and options) and return it."""
        fault = Fault(target, kind, **options)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Disarm all faults, releasing any request held on a gate."""
        for fault in self.faults:
            fault.gate.set()
        self.faults.clear()

    # -- request plumbing ------------------------------------------------------------

    def _observe(self, server: str) -> Middleware:
        """Middleware: count and log every request, and track it for abrupt shutdown."""

        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            key = (request.method, request.path)
            auth = request.headers.get("Authorization")
            if server == "cdn":
                self.cdn_requests[key] += 1
                if auth is not None:
                    self.cdn_authorizations.append(auth)
            else:
                self.requests[key] += 1
                if auth is not None:
                    self.auth_seen[request.path] += 1
            self.log.append(
                Seen(
                    server, request.method, request.path, dict(request.query), dict(request.headers)
                )
            )
            inflight = (self.cdn if server == "cdn" else self.registry).inflight
            task = asyncio.current_task()
            assert task is not None
            inflight[task] = request
            try:
                return await handler(request)
            finally:
                inflight.pop(task, None)

        return observe

    def _challenge(self, request: web.Request) -> web.Response | None:
        """Return a 401 unless the request carries acceptable credentials."""
        name = request.match_info.get("name")
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            if header == _basic_header(self.credentials):
                return None
            challenge = 'Basic realm="sim"'
        elif self.auth == "bearer":
            scopes = self.tokens.get(header.removeprefix("Bearer "), None)
            if (
                header.startswith("Bearer ")
                and scopes is not None
                and (name is None or name in scopes)
            ):
                return None
            challenge = f'Bearer realm="{self.realm or self.url + "/token"}",service="sim"'
            if name is not None:
                challenge += f',scope="repository:{name}:pull"'
        else:
            return None
        return _error(
            401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge}
        )

    def _find(
        self, kinds: tuple[str, ...], keys: set[str], method: str, body: bool
    ) -> Fault | None:
        """The first armed fault for this request, counted as a hit."""
        for fault in self.faults:
            if fault.applies(kinds, keys, method, body):
                fault.hits += 1
                return fault
        return None

    async def _before(
        self, request: web.Request, kinds: tuple[str, ...], keys: set[str], auth: bool = True
    ) -> web.Response | None:
        """Auth, then status/hang faults; a response means "answer this instead"."""
        if auth and (denied := self._challenge(request)) is not None:
            return denied
        fault = self._find(kinds, keys, request.method, body=False)
        if fault is None:
            return None
        fault.reached.set()
        if fault.kind == "hang":
            await fault.gate.wait()
            return None
        return _error(fault.status, _code(fault.status, kinds), "injected fault", fault.headers)

    async def _send(
        self,
        request: web.Request,
        data: bytes,
        headers: dict[str, str],
        kinds: tuple[str, ...],
        keys: set[str],
    ) -> web.StreamResponse:
        """Send `data` honouring HEAD and Range, through any armed body fault."""
        status = 200
        if self.ranges and "manifest" not in kinds and (spec := request.headers.get("Range")):
            window = _parse_range(spec, len(data))
            if window is None:
                return _error(416, "RANGE_INVALID", spec, {"Content-Range": f"bytes */{len(data)}"})
            start, end = window
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        if self.gzip_when_asked and "gzip" in request.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data)  # a compressing proxy or CDN on the way
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        fault = self._find(kinds, keys, request.method, body=True)
        if fault is None or fault.kind == "wrong":
            self.sent[request.path] += len(data)
        if fault is None:
            return web.Response(status=status, body=data, headers=headers)
        if fault.kind == "wrong":
            fault.reached.set()
            mid = len(data) // 2
            return web.Response(
                status=status,
                body=data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :],
                headers=headers,
            )
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if fault.kind == "rate":
            fault.reached.set()
            self.sent[request.path] += len(data)
            await self._paced(resp, data, fault.rate)
            return resp
        part = len(data) // 2 if fault.part is None else fault.part
        await resp.write(data[:part])
        self.sent[request.path] += len(data[:part])
        fault.reached.set()
        if fault.kind == "cut":  # close, not abort: the `part` bytes buffered still go out
            if fault.hold:
                await fault.gate.wait()
            assert request.transport is not None
            request.transport.close()
            return resp
        pos = part
        while fault.kind == "trickle" and pos < len(data) and not fault.gate.is_set():
            await asyncio.sleep(fault.interval)  # ok: the fault is the pace itself
            await resp.write(data[pos : pos + fault.step])
            self.sent[request.path] += len(data[pos : pos + fault.step])
            pos += fault.step
        if fault.kind == "trickle":
            await resp.write(data[pos:])
            self.sent[request.path] += len(data[pos:])
            await resp.write_eof()
            return resp
        await fault.gate.wait()
        self.sent[request.path] += len(data[part:])
        await resp.write(data[part:])
        await resp.write_eof()
        return resp

    @staticmethod
    async def _paced(resp: web.StreamResponse, data: bytes, rate: int) -> None:
        """Write `data` at `rate` bytes/s, a piece at a time (slices of a view: no copies of a
        large blob)."""
        loop = asyncio.get_running_loop()
        began, view = loop.time(), memoryview(data)
        for pos in range(0, len(data), RATE_PIECE):
            piece = view[pos : pos + RATE_PIECE]
            await resp.write(piece)
            ahead = began + (pos + len(piece)) / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)  # ok: the fault is the pace itself
        await resp.write_eof()

    # -- handlers --------------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        """`GET /v2/`: the API version check clients use to discover auth."""
        if (early := await self._before(request, ("ping",), set())) is not None:
            return early
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _token(self, request: web.Request) -> web.StreamResponse:
        """The token service: grants pull on every repository named in `scope`."""
        if (early := await self._before(request, ("token",), set(), auth=False)) is not None:
            return early
        if self.credentials is not None and request.headers.get("Authorization") != _basic_header(
            self.credentials
        ):
            return _error(
                401, "UNAUTHORIZED", "bad credentials", {"WWW-Authenticate": 'Basic realm="sim"'}
            )
        repos = {
            scope.split(":")[1]
            for value in request.query.getall("scope", [])
            for scope in value.split()
            if scope.startswith("repository:") and scope.count(":") >= 2
        }
        token = secrets.token_urlsafe(16)
        self.tokens[token] = repos
        self.tokens_issued += 1
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_ttl,
            "issued_at": issued,
        }
        return web.json_response(body)

    async def _token_grant(self, request: web.Request) -> web.StreamResponse:
        """The OAuth2 side of the token service: a refresh-token grant with a known refresh
        token gets an access token for the `scope` of the form."""
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.token_forms.append(form)
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in (
            self.refresh_tokens
        ):
            return web.json_response({"error": "invalid_grant"}, status=401)
        scope = form.get("scope", "")
        token = secrets.token_urlsafe(16)
        self.tokens[token] = {s.split(":")[1] for s in scope.split() if s.count(":") >= 2}
        self.tokens_issued += 1
        body = {"access_token": token, "expires_in": self.token_ttl, "scope": scope}
        return web.json_response(body)

    async def _cdn_token(self, request: web.Request) -> web.StreamResponse:
        """The CDN's own token realm: anyone gets a token, good at the CDN only."""
        token = secrets.token_urlsafe(16)
        self.cdn_tokens.add(token)
        return web.json_response({"token": token, "expires_in": self.token_ttl})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        """`GET|HEAD /v2/<name>/manifests/<ref>` with rate-limit accounting."""
        name, ref = request.match_info["name"], request.match_info["ref"]
        stored = self.manifests.get(name, {}).get(ref)
        keys = {ref} | ({sha256_digest(stored[0])} if stored else set())
        if (early := await self._before(request, ("manifest",), keys)) is not None:
            return early
        headers: dict[str, str] = {}
        if (limit := self.ratelimit) is not None:
            if request.method == "GET" and limit.remaining <= 0:
                headers = _rate_headers(limit) | {"Retry-After": str(limit.retry_after)}
                return _error(429, "TOOMANYREQUESTS", "pull rate limit exceeded", headers)
            if request.method == "GET":
                limit.remaining -= 1
            headers = _rate_headers(limit)
        if stored is None:
            return _error(404, "MANIFEST_UNKNOWN", f"{name}:{ref}", headers)
        data, media_type = stored
        for variant in self.variants.get((name, ref), ()):  # what an older client is given
            if media_type not in _accepted(request) and variant[1] in _accepted(request):
                data, media_type = variant
        if self.strict_accept and media_type not in _accepted(request):
            return _error(404, "MANIFEST_UNKNOWN", f"{media_type} not in Accept", headers)
        headers["Content-Type"] = media_type
        if self.digest_header:
            headers["Docker-Content-Digest"] = sha256_digest(data)
        return await self._send(request, data, headers, ("manifest",), keys)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        """`GET|HEAD /v2/<name>/blobs/<digest>`, redirecting GETs to the CDN if enabled."""
        digest = request.match_info["digest"]
        if (early := await self._before(request, ("blob",), {digest})) is not None:
            return early
        only = self.blob_repos.get(digest)
        if digest not in self.blobs or (
            only is not None and request.match_info["name"] not in only
        ):
            return _error(404, "BLOB_UNKNOWN", digest)
        if self.redirect_blobs and request.method == "GET":
            signature = hashlib.sha256(digest.encode()).hexdigest()[:16]
            location = f"{self.cdn_url}/blobs/{digest}?sig={signature}"
            return web.Response(status=307, headers={"Location": location})
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        return await self._send(request, self.blobs[digest], headers, ("blob",), {digest})

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        """The CDN: serves blob bytes without auth (it must never be sent any), or, with
        `cdn_bearer`, only for a token from its own realm."""
        digest = request.match_info["digest"]
        if (early := await self._before(request, ("cdn",), {digest}, auth=False)) is not None:
            return early
        if self.cdn_bearer and (
            request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.cdn_tokens
        ):
            challenge = f'Bearer realm="{self.cdn_url}/token",service="cdn",scope="blob:{digest}"'
            return _error(
                401, "UNAUTHORIZED", "cdn token required", {"WWW-Authenticate": challenge}
            )
        if digest not in self.blobs:
            return web.Response(status=404, text="no such object")
        headers = {"Content-Type": "application/octet-stream"}
        return await self._send(request, self.blobs[digest], headers, ("cdn", "blob"), {digest})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        """`GET /v2/<name>/tags/list` with `n`/`last` pagination and a Link header."""
        name = request.match_info["name"]
        if (early := await self._before(request, ("tags",), set())) is not None:
            return early
        if name not in self.manifests:
            return _error(404, "NAME_UNKNOWN", name)
        tags = sorted(t for t in self.manifests[name] if not t.startswith("sha256:"))
        last = request.query.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        headers: dict[str, str] = {}
        if (n := request.query.get("n")) is not None and len(tags) > int(n):
            tags = tags[: int(n)]
            base = self.url if self.absolute_links else ""
            headers["Link"] = f'<{base}/v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.StreamResponse:
        """`GET /v2/<name>/referrers/<digest>`: an empty image index; with `artifactType`,
        the filter is said applied (OCI-Filters-Applied), as the spec has registries do."""
        if (early := await self._before(request, ("referrers",), set())) is not None:
            return early
        if not self.referrers_api:  # like distribution 2.8: clients fall back to tags
            return _error(404, "NOT_FOUND", "no referrers API")
        headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
        if "artifactType" in request.query:
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": headers["Content-Type"], "manifests": []}
        return web.json_response(body, headers=headers, content_type=None)


def _code(status: int, kinds: tuple[str, ...]) -> str:
    """The registry error code a real upstream would pair with `status`."""
    if status == 404:
        return {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}.get(
            kinds[0], "NAME_UNKNOWN"
        )
    codes = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}
    return codes.get(status, "UNAVAILABLE")


def _basic_header(credentials: tuple[str, str] | None) -> str:
    """The exact Authorization header value expected for `credentials`."""
    if credentials is None:
        return ""
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` to a half-open window, None if unsatisfiable."""
    try:
        first, last = spec.removeprefix("bytes=").split("-", 1)
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start, end = int(first), (min(int(last) + 1, size) if last else size)
    except ValueError:
        return None
    return (start, end) if 0 <= start < end <= size else None


def _accepted(request: web.Request) -> set[str]:
    """Media types named in (possibly several, comma-separated) Accept headers."""
    return {
        item.split(";")[0].strip()
        for header in request.headers.getall("Accept", [])
        for item in header.split(",")
    }


def _rate_headers(limit: RateLimit) -> dict[str, str]:
    """Docker Hub's rate-limit headers for the current state of `limit`."""
    return {
        "ratelimit-limit": f"{limit.limit};w={limit.window}",
        "ratelimit-remaining": f"{limit.remaining};w={limit.window}",
    }
