"""Domain errors, each carrying the mirror's own code for it.

The code is what logs, metrics and events say, for operators. What a client is told, the
HTTP status and a code from the OCI spec's list (or distribution's UNKNOWN / UNAVAILABLE, with
ours kept in the detail and the message), lives in ONE table, `http.middleware.ANSWERS`; code
in `pull`, `store` and `upstream` raises these and never builds a response itself.

    MirrorError (code, message, detail)
    ├── NameInvalid             NAME_INVALID          malformed repository name
    ├── NameUnknown             NAME_UNKNOWN          registry host (ns / prefix) not served
    │   └── UpstreamDenied                            upstream will not let the mirror read it
    ├── ManifestUnknown         MANIFEST_UNKNOWN
    ├── ManifestInvalid         MANIFEST_INVALID      Docker schema 1: not verifiable
    ├── BlobUnknown             BLOB_UNKNOWN
    ├── DigestInvalid           DIGEST_INVALID        malformed digest
    ├── TagInvalid              TAG_INVALID           malformed reference
    ├── RangeInvalid            RANGE_INVALID         unsatisfiable Range
    ├── Unsupported             UNSUPPORTED           push, delete, other methods
    ├── Unauthorized            UNAUTHORIZED          credentials missing or refused
    ├── InvalidRequest          INVALID_REQUEST       a request the mirror cannot parse
    ├── Denied                  DENIED                not granted, or upstream forbids it
    ├── TooManyRequests         TOOMANYREQUESTS       a rate limit, ours or upstream's
    ├── UpstreamError           UPSTREAM_INVALID      upstream failed, nothing cached stands in
    │   ├── UpstreamUnavailable UPSTREAM_UNAVAILABLE  refused, reset, DNS, TLS
    │   ├── UpstreamTimeout     UPSTREAM_TIMEOUT      connect or idle read timeout
    │   ├── UpstreamBadResponse UPSTREAM_INVALID      an unexpected status or answer
    │   │   └── DigestMismatch                        bytes that are not what their digest names
    │   ├── UpstreamOverloaded  UPSTREAM_OVERLOADED   503 from upstream
    │   └── Offline             OFFLINE               `offline = true` and not cached
    ├── StoreUnavailable        STORE_UNAVAILABLE     disk full, read-only, unreadable
    │   └── DiskFull                                  a blob that cannot be kept streams through
    │       └── StoreReadOnly
    └── EndpointUnknown         NOT_FOUND             a path that is no registry endpoint

    ConfigError                 (not a response: a key or value refused at start)
"""

from __future__ import annotations

from typing import Any


class MirrorError(Exception):
    """Base of every error that becomes an OCI error response."""

    code: str = "UNKNOWN"
    default_message: str = "unknown error"

    def __init__(
        self, message: str | None = None, detail: dict[str, Any] | None = None, internal: str = ""
    ) -> None:
        self.message = message or self.default_message
        #: What the client is told besides the message (and our code as `reason`, where the
        #: wire code is another: see http.middleware).
        self.detail = detail
        #: What the mirror's log says about it and a client is not told (addresses, TLS
        #: details of the mirror's own network).
        self.internal = internal
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} ({self.internal})" if self.internal else self.message


class NameInvalid(MirrorError):
    code = "NAME_INVALID"
    default_message = "invalid repository name"


class NameUnknown(MirrorError):
    code = "NAME_UNKNOWN"
    default_message = "repository name not known to registry"


class UpstreamDenied(NameUnknown):
    """Upstream refused the mirror this repository (401: Docker Hub says so for private and
    missing repositories alike), or the mirror would not send its credentials where upstream
    asked. Not the client's credentials: a 401 to the client would ask it for ones it cannot
    give, so this is 404 NAME_UNKNOWN, and containerd moves on to its next host."""

    default_message = "upstream denied access to this repository"


class ManifestUnknown(MirrorError):
    code = "MANIFEST_UNKNOWN"
    default_message = "manifest unknown"


class ManifestInvalid(MirrorError):
    """A manifest the mirror will not serve: Docker schema 1 (its digest cannot be checked
    over its bytes)."""

    code = "MANIFEST_INVALID"
    default_message = "manifest invalid"


class BlobUnknown(MirrorError):
    code = "BLOB_UNKNOWN"
    default_message = "blob unknown to registry"


class DigestInvalid(MirrorError):
    code = "DIGEST_INVALID"
    default_message = "provided digest did not match uploaded content"


class TagInvalid(MirrorError):
    code = "TAG_INVALID"
    default_message = "manifest tag did not match URI"


class RangeInvalid(MirrorError):
    code = "RANGE_INVALID"
    default_message = "requested range not satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(detail={"size": size})
        self.size = size


class Unsupported(MirrorError):
    code = "UNSUPPORTED"
    default_message = "the operation is unsupported: this is a read-only mirror"


class Unauthorized(MirrorError):
    code = "UNAUTHORIZED"
    default_message = "authentication required by upstream"

    def __init__(
        self,
        message: str | None = None,
        detail: dict[str, Any] | None = None,
        challenge: str | None = None,
    ) -> None:
        super().__init__(message, detail)
        #: A `WWW-Authenticate` value for the client, when the mirror itself asks for credentials.
        self.challenge = challenge


class InvalidRequest(MirrorError):
    """A request the mirror cannot act on: one aiohttp cannot parse, an admin request with bad
    JSON or a bad pin pattern."""

    code = "INVALID_REQUEST"
    default_message = "the request is not valid"


class Denied(MirrorError):
    code = "DENIED"
    default_message = "requested access to the resource is denied"


class TooManyRequests(MirrorError):
    code = "TOOMANYREQUESTS"
    default_message = "too many requests: upstream rate limit reached"

    def __init__(self, message: str | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(MirrorError):
    """Upstream failed and no cached answer can stand in for it."""

    code = "UPSTREAM_INVALID"
    default_message = "upstream registry failed"


class UpstreamUnavailable(UpstreamError):
    code = "UPSTREAM_UNAVAILABLE"
    default_message = "upstream registry unreachable"


class UpstreamTimeout(UpstreamError):
    code = "UPSTREAM_TIMEOUT"
    default_message = "upstream registry timed out"


class UpstreamBadResponse(UpstreamError):
    code = "UPSTREAM_INVALID"
    default_message = "upstream registry sent an invalid response"


class DigestMismatch(UpstreamBadResponse):
    """What a source sent is not the content its digest names (upstream lied or was cut,
    or a cold copy went bad): nothing of it is kept."""

    default_message = "upstream content does not match its digest"


class UpstreamOverloaded(UpstreamError):
    code = "UPSTREAM_OVERLOADED"
    default_message = "upstream registry is overloaded"


class Offline(UpstreamError):
    """`offline = true`: no upstream is ever contacted. An upstream error, so a cached tag is
    answered as it was last seen (stale), and only a miss gets this error."""

    code = "OFFLINE"
    default_message = "the mirror is offline: it serves only what it has cached"


class StoreUnavailable(MirrorError):
    """The local store cannot take a write (disk full, read-only) or read a file."""

    code = "STORE_UNAVAILABLE"
    default_message = "the mirror's store cannot serve this request"


class DiskFull(StoreUnavailable):
    """No room for a blob even after eviction: it is streamed through, not kept."""

    default_message = "the mirror's disk is full"


class StoreReadOnly(DiskFull):
    """The store's filesystem went read-only: like a full disk, blobs stream through unkept."""

    default_message = "the mirror's store is read-only"


class EndpointUnknown(MirrorError):
    code = "NOT_FOUND"
    default_message = "no such registry API endpoint"


class ConfigError(Exception):
    """A configuration key or value was refused at start; the message names the key."""
