"""The ONE table from domain errors to HTTP status and the OCI error JSON, and the request
bookkeeping every response goes through.

Error body (OCI distribution spec, "Error Codes"): {"errors": [{"code", "message", "detail"}]}.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from time import time as _now

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

from mirror import errors, logs
from mirror.metrics import Metrics

log = logging.getLogger("mirror.http")

#: On every registry answer: the API version clients check, and no content sniffing (a body is
#: what its Content-Type says, never a page a browser would run from the mirror's origin).
BASE_HEADERS = {
    "Docker-Distribution-API-Version": "registry/2.0",
    "X-Content-Type-Options": "nosniff",
}

STATUS_BY_CODE: dict[str, int] = {
    errors.NameInvalid.code: 400,
    errors.TagInvalid.code: 400,
    errors.DigestInvalid.code: 400,
    errors.NameUnknown.code: 404,
    errors.ManifestUnknown.code: 404,
    errors.ManifestInvalid.code: 400,
    errors.BlobUnknown.code: 404,
    errors.EndpointUnknown.code: 404,
    errors.Unsupported.code: 405,
    errors.RangeInvalid.code: 416,
    errors.Unauthorized.code: 401,
    errors.InvalidRequest.code: 400,
    errors.Denied.code: 403,
    errors.TooManyRequests.code: 429,
    errors.UpstreamUnavailable.code: 502,
    errors.UpstreamBadResponse.code: 502,
    errors.UpstreamOverloaded.code: 503,
    errors.Offline.code: 503,
    errors.UpstreamTimeout.code: 504,
    errors.StoreUnavailable.code: 503,
}


class Ledger:
    """What the bookkeeping learns of a request while it is answered: its route (for the
    metrics), the cache outcome and the upstream (for the metrics and the access line). Put on
    the request once, then written as plain attributes: each request-mapping access is Python
    code in aiohttp, and the hit path made seven of them."""

    __slots__ = ("outcome", "route", "upstream")

    def __init__(self, route: str) -> None:
        self.route = route
        self.outcome: str | None = None
        self.upstream: str | None = None


#: Where a handler leaves the request's Ledger (a request without one counts as "other").
LEDGER = web.RequestKey("ledger", Ledger)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: `answer(request, handler)`, see make_answer.
Answer = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
#: Given the request handler aiohttp gives a connection (its router and the middleware), the
#: one the connection uses instead (http/server.py; routes.py `Routes.front_door`).
FrontDoor = Callable[[Handler], Handler]
FRONT_DOOR: web.AppKey[FrontDoor] = web.AppKey("front_door")


def error_body(code: str, message: str, detail: object = None) -> str:
    """The spec's error JSON: {"errors": [{"code", "message", "detail"}]}."""
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]})


def error_response(err: errors.MirrorError) -> web.Response:
    """The spec's error JSON with the status from the table (500 if a code is missing)."""
    status = STATUS_BY_CODE.get(err.code, 500)
    headers = dict(BASE_HEADERS)
    if isinstance(err, errors.RangeInvalid):
        headers["Content-Range"] = f"bytes */{err.size}"
    if isinstance(err, errors.Unauthorized) and err.challenge:
        headers["WWW-Authenticate"] = err.challenge
    if isinstance(err, errors.TooManyRequests) and err.retry_after:
        headers["Retry-After"] = err.retry_after
    return web.Response(
        status=status,
        text=error_body(err.code, err.message, err.detail),
        content_type="application/json",
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> errors.MirrorError:
    if exc.status == 405:
        return errors.Unsupported()
    return errors.EndpointUnknown()


def make_answer(metrics: Metrics) -> Answer:
    """`answer(request, handler)`: the handler's response, every domain error (and router
    404/405) turned into error JSON by the table, the request counted and timed. The app's one
    middleware, and what the registry API's requests go through when they skip aiohttp's
    router (routes.py, `Routes.front_door`)."""
    request_counted = metrics.request
    took = metrics.took

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        over_cap = getattr(request.protocol, "over_cap", False)  # see http/server.py
        try:
            if over_cap:
                metrics.refused("connections_per_client")
                raise errors.TooManyRequests(
                    "too many connections from this client", retry_after="1"
                )
            response = await handler(request)
        except errors.MirrorError as e:
            response = error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = error_response(_from_http_exception(e))
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            response = error_response(errors.MirrorError("internal error"))
        if over_cap and isinstance(response, web.Response):
            response.force_close()
        try:
            ledger = request[LEDGER]
        except KeyError:  # no handler of the registry API's got it
            route, outcome = "other", "none"
        else:
            route, outcome = ledger.route, ledger.outcome or "none"
        request_counted(route, request.method, response.status, outcome)
        took(route, time.monotonic() - started)
        return response

    return answer


def make_middleware(answer: Answer) -> Middleware:
    """The app's middleware: every answer aiohttp's router finds goes through `answer`."""

    @web.middleware
    async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer(request, handler)

    return registry_errors


class AccessLogger(AbstractAccessLogger):
    """One structured line per request (see mirror/logs.py): method, path, status, bytes,
    duration, cache outcome, upstream, client. Headers are never logged, so credentials and
    tokens cannot leak here. The loop only gathers the fields in a tuple; the line is
    formatted and written in batches by a writer thread."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sink = logs.access
        if sink is not None:
            try:
                ledger: Ledger | None = request[LEDGER]
            except KeyError:
                ledger = None
            sink.add(
                (
                    _now(),
                    request.method,
                    request.path_qs,
                    response.status,
                    response.content_length,
                    time,
                    None if ledger is None else ledger.outcome,
                    None if ledger is None else ledger.upstream,
                    request.remote,
                )
            )
