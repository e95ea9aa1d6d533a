"""The ONE table from domain errors to what a client is told (HTTP status and the code in the
OCI error JSON), and the request bookkeeping every response goes through.

Error body (OCI distribution spec, "Error Codes"): {"errors": [{"code", "message", "detail"}]}.

A client acts on the codes it knows, so every code on the wire is one of the spec's or, for a
failure the spec has no code for (upstream or the store failed), one CNCF distribution adds in
registry/api/errcode and containerd and docker already show: `UNAVAILABLE` (its 503, try again
later) or `UNKNOWN` (its 500, nothing says a retry helps). The mirror's own code (errors.py) is
more specific and stays what it records for operators (a log record's `code`, an admin event's
`result`); where it is not the wire code, the client gets it too, as `detail.reason` (merged
into the error's detail) and at the end of the message, e.g.
`{"code": "UNAVAILABLE", "message": "upstream registry timed out (UPSTREAM_TIMEOUT)",
"detail": {"reason": "UPSTREAM_TIMEOUT"}}`. The status says more than a code can and is
the mirror's own: 502 upstream failed, 503 try later, 504 upstream timed out.

    our code              wire code         status
    NAME_INVALID          NAME_INVALID      400
    TAG_INVALID           MANIFEST_INVALID  400   a reference that can name no manifest
    DIGEST_INVALID        DIGEST_INVALID    400
    MANIFEST_INVALID      MANIFEST_INVALID  400
    INVALID_REQUEST       UNSUPPORTED       400   the spec's "invalid set of parameters"
    UNAUTHORIZED          UNAUTHORIZED      401
    DENIED                DENIED            403
    NAME_UNKNOWN          NAME_UNKNOWN      404
    MANIFEST_UNKNOWN      MANIFEST_UNKNOWN  404
    BLOB_UNKNOWN          BLOB_UNKNOWN      404
    NOT_FOUND             UNSUPPORTED       404   no such endpoint: "a missing implementation"
    UNSUPPORTED           UNSUPPORTED       405
    RANGE_INVALID         SIZE_INVALID      416   a Range outside the blob's size
    TOOMANYREQUESTS       TOOMANYREQUESTS   429
    UNKNOWN               UNKNOWN           500   a bug: the log has the traceback
    UPSTREAM_INVALID      UNKNOWN           502   upstream's answer was wrong (digest mismatch too)
    UPSTREAM_UNAVAILABLE  UNAVAILABLE       502
    UPSTREAM_OVERLOADED   UNAVAILABLE       503
    OFFLINE               UNAVAILABLE       503
    STORE_UNAVAILABLE     UNAVAILABLE       503
    UPSTREAM_TIMEOUT      UNAVAILABLE       504

A code missing from the table is answered 500 `UNKNOWN`, with the code as its reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from time import time as _now
from typing import NamedTuple

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


class Answer(NamedTuple):
    """What a client is told for one of the mirror's codes."""

    status: int
    #: The code in the error JSON: the spec's, or distribution's UNKNOWN / UNAVAILABLE.
    code: str


ANSWERS: dict[str, Answer] = {
    errors.NameInvalid.code: Answer(400, "NAME_INVALID"),
    errors.TagInvalid.code: Answer(400, "MANIFEST_INVALID"),
    errors.DigestInvalid.code: Answer(400, "DIGEST_INVALID"),
    errors.ManifestInvalid.code: Answer(400, "MANIFEST_INVALID"),
    errors.InvalidRequest.code: Answer(400, "UNSUPPORTED"),
    errors.Unauthorized.code: Answer(401, "UNAUTHORIZED"),
    errors.Denied.code: Answer(403, "DENIED"),
    errors.NameUnknown.code: Answer(404, "NAME_UNKNOWN"),
    errors.ManifestUnknown.code: Answer(404, "MANIFEST_UNKNOWN"),
    errors.BlobUnknown.code: Answer(404, "BLOB_UNKNOWN"),
    errors.EndpointUnknown.code: Answer(404, "UNSUPPORTED"),
    errors.Unsupported.code: Answer(405, "UNSUPPORTED"),
    errors.RangeInvalid.code: Answer(416, "SIZE_INVALID"),
    errors.TooManyRequests.code: Answer(429, "TOOMANYREQUESTS"),
    errors.MirrorError.code: Answer(500, "UNKNOWN"),
    errors.UpstreamBadResponse.code: Answer(502, "UNKNOWN"),
    errors.UpstreamUnavailable.code: Answer(502, "UNAVAILABLE"),
    errors.UpstreamOverloaded.code: Answer(503, "UNAVAILABLE"),
    errors.Offline.code: Answer(503, "UNAVAILABLE"),
    errors.StoreUnavailable.code: Answer(503, "UNAVAILABLE"),
    errors.UpstreamTimeout.code: Answer(504, "UNAVAILABLE"),
}
#: For a code the table lacks: a bug, answered as one.
UNMAPPED = Answer(500, "UNKNOWN")


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
Answering = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
#: Given the request handler aiohttp gives a connection (its router and the middleware), the
#: one the connection uses instead (http/server.py; routes.py `Routes.front_door`).
FrontDoor = Callable[[Handler], Handler]
FRONT_DOOR: web.AppKey[FrontDoor] = web.AppKey("front_door")


def client_of(request: web.BaseRequest) -> str | None:
    """The client's address: the one its connection kept when it opened (server.py's
    `MirrorConnection.peer`), else `request.remote`, which aiohttp builds anew for every
    request (some 0.7 µs, more than a pull event costs)."""
    peer: str | None = getattr(request.protocol, "peer", None)
    return peer if peer is not None else request.remote


def answer(err: errors.MirrorError) -> Answer:
    """Status and wire code of `err`, from the table."""
    return ANSWERS.get(err.code, UNMAPPED)


def error_body(err: errors.MirrorError) -> str:
    """The spec's error JSON for `err`: {"errors": [{"code", "message", "detail"}]}, its code
    the wire code; the mirror's own code, when it is another, at the end of the message and as
    `detail.reason`, next to what the detail already says."""
    code, message, detail = answer(err).code, err.message, err.detail
    if code != err.code:
        message = f"{message} ({err.code})"
        detail = {**(detail or {}), "reason": err.code}
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]})


def error_response(err: errors.MirrorError) -> web.Response:
    """The spec's error JSON with the status from the table."""
    headers = dict(BASE_HEADERS)
    if isinstance(err, errors.RangeInvalid):
        headers["Content-Range"] = f"bytes */{err.size}"
    if isinstance(err, errors.Unauthorized) and err.challenge:
        headers["WWW-Authenticate"] = err.challenge
    if isinstance(err, errors.TooManyRequests) and err.retry_after:
        headers["Retry-After"] = err.retry_after
    return web.Response(
        status=answer(err).status,
        text=error_body(err),
        content_type="application/json",
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> errors.MirrorError:
    if exc.status == 405:
        return errors.Unsupported()
    return errors.EndpointUnknown()


def make_answer(metrics: Metrics) -> Answering:
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


def make_middleware(answer: Answering) -> Middleware:
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
                    client_of(request),
                )
            )
