"""HTTP to upstream registries through one pooled aiohttp ClientSession.

This module's `translated` is the one place aiohttp's client errors become domain errors
(errors.py), at the point they happen, including errors raised while a blob body is being
read (a cluster's stream from another replica, pull/peers.py, goes through it too).
Redirects are followed here, by hand, so that the `Authorization` header is sent only to the
registry's own origin and never to a CDN or any other host; a host redirected to that
challenges on its own is sent only a token from its own challenge (auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from mirror import errors
from mirror.config import Config, UpstreamConfig
from mirror.coordination import PullBudgets, TokenCache
from mirror.events import Events
from mirror.metrics import Metrics
from mirror.oci.reference import Digest, parse_digest
from mirror.upstream.auth import Authenticator, TokenRequest
from mirror.upstream.egress import Egress, GuardedResolver
from mirror.upstream.ratelimit import parse_ratelimit
from mirror.upstream.resume import ResumingBlob, backoff, open_resuming
from mirror.upstream.routing import Target

log = logging.getLogger("mirror.upstream")

MAX_REDIRECTS = 5
#: Bodies we hold in memory (manifests, tag lists, token answers) are refused past this size.
MAX_SMALL_BODY = 8 * 1024 * 1024
BLOB_CHUNK = 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
#: Seconds to back off after a 429 without a usable Retry-After.
DEFAULT_BACKOFF = 60.0
#: The referrers response header naming the filters upstream applied (OCI distribution spec).
FILTERS_APPLIED = "OCI-Filters-Applied"
#: Statuses another try may mend (429 is not one: it has its own back-off).
RETRY_STATUSES = frozenset({408, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    """A manifest answer. `data` is empty for HEAD."""

    data: bytes
    media_type: str
    #: Upstream's Docker-Content-Digest, when it sent one.
    digest: Digest | None
    size: int | None


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """A small passthrough answer (tag lists, referrers)."""

    body: bytes
    content_type: str
    link: str | None
    #: The referrers API's `OCI-Filters-Applied` (the filters upstream did apply).
    filters: str | None = None


class BlobStream:
    """One upstream answer's blob body; `size` is its Content-Length when upstream sent one,
    less the `skip` leading bytes that are dropped (an upstream that ignored our Range sent
    them again).
    With `length` (a range answer) the body must be exactly that long: more is refused,
    less is a cut, whether or not upstream sent a Content-Length."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        received: Callable[[float], None],
        skip: int = 0,
        length: int | None = None,
    ) -> None:
        self._response = response
        self._received = received
        self._skip = skip
        self._length = length
        size = response.content_length
        self.size = length if length is not None else None if size is None else size - skip

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces; a cut or stalled connection raises a domain error."""
        skip, left = self._skip, self._length
        with translated():
            async for chunk in self._response.content.iter_any():
                self._received(len(chunk))
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                if left is not None:
                    if len(chunk) > left:
                        raise errors.UpstreamBadResponse("upstream sent more than the range")
                    left -= len(chunk)
                yield chunk
        if left:
            raise errors.UpstreamUnavailable("upstream connection cut mid-range")


@contextlib.contextmanager
def translated() -> Any:
    """aiohttp and socket failures become the domain errors the HTTP layer knows."""
    try:
        yield
    except errors.MirrorError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as e:
        raise errors.UpstreamTimeout(internal=_reason(e)) from e
    except aiohttp.ClientSSLError as e:
        raise errors.UpstreamUnavailable(
            "TLS failure talking to upstream", internal=_reason(e)
        ) from e
    except aiohttp.ClientPayloadError as e:
        raise errors.UpstreamUnavailable(
            "upstream connection cut mid-body", internal=_reason(e)
        ) from e
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise errors.UpstreamUnavailable(internal=_reason(e)) from e


def _reason(e: BaseException) -> str:
    """What went wrong, for the log only: it names addresses and TLS details of the mirror's
    own network, which a client is not told."""
    return (str(e).splitlines() or [""])[0][:200] or type(e).__name__


def _transient(e: errors.MirrorError) -> bool:
    """A failure before any answer that another try may get past: a refused or reset
    connection. Not DNS, TLS or a certificate (those are settings), not a timeout (a hang
    would only be waited for again)."""
    cause = e.__cause__
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
        cause, (aiohttp.ClientSSLError, aiohttp.ClientConnectorDNSError, aiohttp.ServerTimeoutError)
    )


def _content_range(value: str) -> tuple[int, int] | None:
    """First and last byte of `bytes <first>-<last>/<total or *>` (last -1 when it is no
    number); None if malformed."""
    unit, _, span = value.partition(" ")
    first, _, rest = span.partition("-")
    last = rest.partition("/")[0]
    if unit != "bytes" or not (first.isascii() and first.isdigit()):
        return None
    return int(first), int(last) if last.isascii() and last.isdigit() else -1


def _status_error(
    status: int, headers: Mapping[str, str], not_found: errors.MirrorError
) -> errors.MirrorError:
    """The domain error for a non-success upstream status."""
    if status == 404:
        return not_found
    if status == 401:
        return errors.UpstreamDenied()
    if status == 403:
        return errors.Denied()
    if status == 429:
        return errors.TooManyRequests(retry_after=headers.get("Retry-After"))
    if status == 503:
        return errors.UpstreamOverloaded(detail={"status": status})
    return errors.UpstreamBadResponse(f"upstream answered {status}", detail={"status": status})


def _header_digest(value: str | None) -> Digest | None:
    """Upstream's Docker-Content-Digest; one that is no digest is upstream's fault (502), not
    the client's."""
    if value is None:
        return None
    try:
        return parse_digest(value)
    except errors.DigestInvalid:
        raise errors.UpstreamBadResponse(
            "upstream sent a malformed Docker-Content-Digest", detail={"header": value[:200]}
        ) from None


def _kind(method: str, path: str) -> str:
    """The request's kind for metrics (a fixed set: never the path itself)."""
    if "/manifests/" in path:
        return "manifest_head" if method == "HEAD" else "manifest"
    if "/blobs/" in path:
        return "blob_head" if method == "HEAD" else "blob"
    return "list"


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL: what a token of a host redirected to is kept under."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"


class UpstreamClient:
    """Registry API calls against the configured upstreams."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        tokens: TokenCache,
        events: Events,
        budgets: PullBudgets,
    ) -> None:
        self._config = config
        #: Pulls left and 429 back-offs per upstream, shared by the host's processes.
        self._budgets = budgets
        self._metrics = metrics
        self._events = events
        #: Whether each upstream's last answer was not a failure (absent: not contacted yet).
        self._up: dict[str, bool] = {}
        self._session: aiohttp.ClientSession | None = None
        #: Background writes of what upstreams said of their budgets.
        self._telling: set[asyncio.Task[None]] = set()
        self.auth = Authenticator(config.upstreams, self._fetch_token, tokens)
        self._egress = Egress(config.upstreams)

    async def start(self) -> None:
        t = self._config.timeouts
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_read=t.read),
            connector=aiohttp.TCPConnector(
                limit=256,
                limit_per_host=64,
                ttl_dns_cache=300,
                resolver=GuardedResolver(self._egress),
            ),
            read_bufsize=BLOB_CHUNK,
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamClient.start() not called"
        return self._session

    async def manifest(
        self, target: Target, ref: str, accept: str, method: str = "GET", retry: bool = True
    ) -> UpstreamManifest:
        """GET or HEAD a manifest by tag or digest. `retry=False` when a cached answer can
        stand in for a failure: it is better served at once than after the back-off."""
        path = f"/v2/{target.repo}/manifests/{ref}"
        async with self._open(target, method, path, {"Accept": accept}, retry=retry) as resp:
            self._check(
                resp, errors.ManifestUnknown(detail={"name": target.name, "reference": ref})
            )
            data = b"" if method == "HEAD" else await self._read_small(resp)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = _header_digest(resp.headers.get("Docker-Content-Digest"))
            return UpstreamManifest(data, media_type, digest, resp.content_length)

    @contextlib.asynccontextmanager
    async def blob(
        self, target: Target, digest: Digest, offset: int = 0
    ) -> AsyncIterator[ResumingBlob]:
        """Open a blob body for streaming from byte `offset` on (following the CDN redirect
        without credentials); its `size` is the whole blob's. A body that breaks off is picked
        up again with Range where it stopped (resume.py)."""
        up = target.upstream
        t = self._config.timeouts
        async with open_resuming(
            lambda offset: self._blob_at(target, digest, offset),
            self._config.retries,
            t.min_rate,
            t.rate_window,
            lambda: self._metrics.retried(up.name, "blob", "resume"),
            str(digest),
            offset,
        ) as body:
            yield body

    @contextlib.asynccontextmanager
    async def _blob_at(
        self, target: Target, digest: Digest, offset: int
    ) -> AsyncIterator[BlobStream]:
        """The blob's bytes from `offset` on. A 206 must start at `offset`; a 200 (Range
        ignored) has its first `offset` bytes dropped. Either way the digest check at the end
        of the fill covers the bytes of every connection."""
        path = f"/v2/{target.repo}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self._open(target, "GET", path, headers) as resp:
            self._check(resp, errors.BlobUnknown(detail={"digest": str(digest)}))
            received = self._metrics.receiving(target.upstream.name)
            if not offset:
                yield BlobStream(resp, received)
                return
            if resp.status == 206:
                answered = _content_range(resp.headers.get("Content-Range", ""))
                if answered is None or answered[0] != offset:
                    raise errors.UpstreamBadResponse(
                        "upstream answered a resumed blob from the wrong offset",
                        detail={
                            "asked": offset,
                            "Content-Range": resp.headers.get("Content-Range"),
                        },
                    )
                yield BlobStream(resp, received)
            else:
                yield BlobStream(resp, received, skip=offset)

    @contextlib.asynccontextmanager
    async def blob_range(
        self, target: Target, digest: Digest, start: int, end: int
    ) -> AsyncIterator[BlobStream | None]:
        """Bytes [start, end) of a blob, one try (`Range: bytes=<start>-<end - 1>`): a 206
        must hold exactly those. None when upstream ignored the Range (a 200, the whole blob):
        that answer's body is not read, its connection is closed."""
        path = f"/v2/{target.repo}/blobs/{digest}"
        headers = {"Range": f"bytes={start}-{end - 1}"}
        async with self._open(target, "GET", path, headers, retry=False) as resp:
            self._check(resp, errors.BlobUnknown(detail={"digest": str(digest)}))
            if resp.status != 206:
                yield None
                return
            length = resp.content_length
            if _content_range(resp.headers.get("Content-Range", "")) != (start, end - 1) or (
                length is not None and length != end - start
            ):
                raise errors.UpstreamBadResponse(
                    "upstream answered another range than the one asked for",
                    detail={
                        "asked": headers["Range"],
                        "Content-Range": resp.headers.get("Content-Range"),
                    },
                )
            received = self._metrics.receiving(target.upstream.name)
            yield BlobStream(resp, received, length=end - start)

    async def blob_size(self, target: Target, digest: Digest) -> int | None:
        """HEAD a blob: its size, or None when upstream does not say."""
        path = f"/v2/{target.repo}/blobs/{digest}"
        async with self._open(target, "HEAD", path, {}) as resp:
            self._check(resp, errors.BlobUnknown(detail={"digest": str(digest)}))
            return resp.content_length

    async def raw(
        self, target: Target, suffix: str, query: Mapping[str, str], not_found: errors.MirrorError
    ) -> RawAnswer:
        """GET a small JSON endpoint (tags/list, referrers)."""
        path = f"/v2/{target.repo}/{suffix}"
        accept = {"Accept": "application/json, application/vnd.oci.image.index.v1+json"}
        async with self._open(target, "GET", path, accept, query) as resp:
            self._check(resp, not_found)
            body = await self._read_small(resp)
            content_type = resp.headers.get("Content-Type", "application/json")
            headers = resp.headers
            return RawAnswer(body, content_type, headers.get("Link"), headers.get(FILTERS_APPLIED))

    @staticmethod
    def _check(resp: aiohttp.ClientResponse, not_found: errors.MirrorError) -> None:
        if resp.status >= 300:
            raise _status_error(resp.status, resp.headers, not_found)

    @staticmethod
    async def _read_small(resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > MAX_SMALL_BODY:
            raise errors.UpstreamBadResponse("upstream answer too large")
        with translated():
            data = await resp.content.read(MAX_SMALL_BODY + 1)
        if len(data) > MAX_SMALL_BODY:
            raise errors.UpstreamBadResponse("upstream answer too large")
        return data

    @contextlib.asynccontextmanager
    async def _open(
        self,
        target: Target,
        method: str,
        path: str,
        headers: dict[str, str],
        query: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with auth, answering one 401 challenge and following redirects,
        trying again after a transient failure (see `_tries`). An upstream with `ns` set gets
        `?ns=<host>` on the first hop (not on redirects)."""
        if self._config.offline:
            raise errors.Offline()
        up = target.upstream
        if "/manifests/" in path and (wait := await self._budgets.backing_off(up.name)) > 0:
            raise errors.TooManyRequests(
                "upstream rate limit: backing off", retry_after=str(int(wait) + 1)
            )
        scope = f"repository:{target.repo}:pull"
        url = up.url.rstrip("/") + path
        if up.ns:  # the upstream is a mirror: tell it which registry we mean
            query = {**(query or {}), "ns": up.ns}
        with translated():
            auth = await self.auth.header(up, scope)
        kind = _kind(method, path)
        attempts = self._config.retries.attempts if retry else 1
        resp = await self._tries(
            up, kind, attempts, lambda: self._follow(up, scope, method, url, headers, auth, query)
        )
        try:
            if resp.status == 401 and "WWW-Authenticate" in resp.headers:
                challenge = resp.headers["WWW-Authenticate"]
                resp.release()
                with translated():
                    answer = await self.auth.answer(up, scope, challenge, auth)
                if answer is not None:
                    resp = await self._tries(
                        up,
                        kind,
                        attempts,
                        lambda: self._follow(up, scope, method, url, headers, answer, query),
                    )
            self._observe(up, kind, resp)
            yield resp
        finally:
            resp.release()

    async def _tries(
        self,
        up: UpstreamConfig,
        kind: str,
        attempts: int,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
    ) -> aiohttp.ClientResponse:
        """`send` up to `attempts` times while it fails transiently: a refused or reset
        connection, or a status in RETRY_STATUSES (waiting its Retry-After when that is within
        `max_backoff`, else giving that answer at once). Every registry read is idempotent."""
        retry = self._config.retries
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                resp = await send()
            except errors.UpstreamError as e:
                self._metrics.upstream(up.name, kind, "error")
                self._health(up.name, False, e.message)
                if last or not _transient(e):
                    log.warning("upstream %s %s failed: %s", up.name, kind, e)
                    raise
                reason, delay = "connection", backoff(retry, attempt)
                log.info("upstream %s %s: %s; trying again in %.2fs", up.name, kind, e, delay)
            else:
                if last or resp.status not in RETRY_STATUSES:
                    return resp
                after = resp.headers.get("Retry-After", "")
                if after.isdigit() and int(after) > retry.max_backoff:
                    return resp
                self._observe(up, kind, resp)
                resp.release()
                reason, delay = (
                    "status",
                    float(after) if after.isdigit() else backoff(retry, attempt),
                )
                log.info(
                    "upstream %s %s answered %d; trying again in %.2fs",
                    up.name,
                    kind,
                    resp.status,
                    delay,
                )
            self._metrics.retried(up.name, kind, reason)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last try returns or raises")

    async def conserving(self, up: UpstreamConfig) -> bool:
        """Whether pulls from this upstream should be kept for real misses: below its budget
        floor, or backing off after a 429 (as any process of the host was last told)."""
        left = await self._budgets.left(up.name)
        if left is not None and left < up.pull_budget_floor:
            return True
        return await self._budgets.backing_off(up.name) > 0

    def _health(self, name: str, up: bool, reason: str) -> None:
        """Tell of an upstream that starts failing, or answers again after it failed."""
        was = self._up.get(name)
        self._up[name] = up
        if up != was and (not up or was is not None):
            self._events.upstream_state(name, up, reason)

    def _observe(self, up: UpstreamConfig, kind: str, resp: aiohttp.ClientResponse) -> None:
        self._metrics.upstream(up.name, kind, resp.status)
        self._health(up.name, resp.status < 500, f"answered {resp.status}")
        if resp.status == 429:
            retry = resp.headers.get("Retry-After", "")
            self._tell(
                self._budgets.back_off(
                    up.name, float(retry) if retry.isdigit() else DEFAULT_BACKOFF
                )
            )
            log.warning(
                "upstream %s answered 429: no manifest requests for %ss",
                up.name,
                retry or DEFAULT_BACKOFF,
            )
        limit = parse_ratelimit(resp.headers)
        if limit is not None:
            self._metrics.rate_limit(up.name, up.credential, limit.limit, limit.remaining)
            self._tell(self._budget_told(up, limit.limit, limit.remaining))

    def _tell(self, writing: Coroutine[Any, Any, None]) -> None:
        """Record what upstream said of its budget without holding up its answer."""
        task = asyncio.ensure_future(writing)
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _budget_told(self, up: UpstreamConfig, limit: int, remaining: int) -> None:
        """Keep the pulls left for the host; the budget crossing its floor is told once, by
        the process whose answer crossed it."""
        try:
            before = await self._budgets.told(up.name, remaining)
        except Exception as e:  # a full disk: the budget is known again at the next answer
            log.warning("cannot record the pull budget of %s: %s", up.name, e)
            return
        if remaining < up.pull_budget_floor <= (up.pull_budget_floor if before is None else before):
            self._events.ratelimit_low(
                upstream=up.name,
                credential=up.credential,
                remaining=remaining,
                limit=limit,
                floor=up.pull_budget_floor,
            )

    async def _follow(
        self,
        up: UpstreamConfig,
        scope: str,
        method: str,
        url: str,
        headers: dict[str, str],
        auth: str | None,
        query: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        """One request, following redirects. `auth` goes only to the registry's origin; a
        host redirected to gets only a token from its own challenge, answered here once (a
        401 from the registry's origin is for `_open` to answer)."""
        answered: set[str] = set()
        hops = 0
        while True:
            # identity: digests are over the bytes as stored, so nothing on the way may
            # compress them (aiohttp would ask for gzip and, not decoding, keep it so)
            send = {"Accept-Encoding": "identity", **headers}
            here = _origin_of(url)
            token: str | None = None
            if _same_origin(url, up.url):
                if auth is not None:
                    send["Authorization"] = auth
            elif (token := await self.auth.redirect_header(up, here, scope)) is not None:
                send["Authorization"] = token
            with translated():
                resp = await self.session.request(
                    method, url, headers=send, params=query, allow_redirects=False
                )
            challenge = resp.headers.get("WWW-Authenticate")
            if resp.status == 401 and challenge and not _same_origin(url, up.url):
                resp.release()
                if here in answered:
                    log.warning(
                        "upstream %s: %s, redirected to, refused the token its challenge got",
                        up.name,
                        here,
                    )
                    raise errors.UpstreamDenied(
                        "a host the upstream redirected to refused the token it asked for"
                    )
                answered.add(here)
                with translated():
                    await self.auth.answer_redirect(up, here, scope, challenge, token)
                continue
            if resp.status not in _REDIRECTS or "Location" not in resp.headers:
                return resp
            hops += 1
            if hops > MAX_REDIRECTS:
                resp.release()
                raise errors.UpstreamBadResponse("too many upstream redirects")
            location = resp.headers["Location"]
            resp.release()
            came_from, url = url, urljoin(str(resp.url), location)
            query = None
            if urlsplit(url).scheme not in ("http", "https"):
                raise errors.UpstreamBadResponse("upstream redirected to a non-http(s) URL")
            self._egress.check(url, came_from)
            if resp.status == 303:
                method = "GET" if method != "HEAD" else method

    async def _fetch_token(self, upstream: str, request: TokenRequest) -> dict[str, Any]:
        """Ask a realm for a token (the Authenticator decided what may go there)."""
        try:
            body = await self._token_request(request)
        except errors.MirrorError:
            self._metrics.token_fetched(upstream, ok=False)
            raise
        self._metrics.token_fetched(upstream, ok=True)
        return body

    async def _token_request(self, request: TokenRequest) -> dict[str, Any]:
        """GET the realm with the query, or POST it the form of an OAuth2 grant."""
        headers = {"Accept-Encoding": "identity"}
        if request.authorization:
            headers["Authorization"] = request.authorization
        self._egress.check(request.realm)
        method = "GET" if request.form is None else "POST"
        with translated():
            async with self.session.request(
                method,
                request.realm,
                params=request.query,
                data=request.form,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                if resp.status in (401, 403):
                    raise errors.UpstreamDenied("upstream token realm refused the credentials")
                if resp.status != 200:
                    raise _status_error(
                        resp.status, resp.headers, errors.UpstreamDenied("token realm not found")
                    )
                body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise errors.UpstreamDenied("upstream token realm answered no JSON object")
        return body
