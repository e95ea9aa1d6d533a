"""How the replicas of a cluster reach each other's fills: the internal endpoint's paths and
the MAC that authenticates every request to it.

    GET /_mirror/cluster/blobs/<digest>       a committed blob, or the fill in progress as it
                                              grows; `Range: bytes=<n>-` for the rest of it
    Authorization: Mirror-Cluster <unix seconds> <hex HMAC-SHA256>

The MAC covers the method, the path and the time, keyed with `[cluster] secret`, so a request
cannot be replayed on another path nor after VALIDITY seconds, and nobody without the secret
can make one. A replica refuses anything else under the prefix with 401 (http/cluster.py):
the endpoint never serves anything but blobs by digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from mirror.oci.reference import Digest

#: Every path of the internal endpoint starts so.
PREFIX = "/_mirror/cluster/"
#: The scheme of the Authorization header.
SCHEME = "Mirror-Cluster"
#: Seconds a request's time may lie from the receiver's clock, either way.
VALIDITY = 30.0

_HEADER = re.compile(rf"{SCHEME} (?P<at>[0-9]{{1,12}}) (?P<mac>[0-9a-f]{{64}})")


def blob_path(digest: Digest) -> str:
    return f"{PREFIX}blobs/{digest}"


def _mac(secret: str, method: str, path: str, at: int) -> str:
    message = f"{method}\n{path}\n{at}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def authorization(secret: str, method: str, path: str, now: float) -> str:
    """The Authorization value of a request to another replica, made at `now`."""
    at = int(now)
    return f"{SCHEME} {at} {_mac(secret, method, path, at)}"


def authentic(secret: str, method: str, path: str, header: str | None, now: float) -> bool:
    """Whether `header` is a MAC of this request made with the cluster's secret within
    VALIDITY seconds of `now` (compared in constant time: the MAC leaks nothing by timing)."""
    m = _HEADER.fullmatch(header or "")
    if m is None:
        return False
    at = int(m["at"])
    fresh = abs(now - at) <= VALIDITY
    return hmac.compare_digest(_mac(secret, method, path, at), m["mac"]) and fresh
