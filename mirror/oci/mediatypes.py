"""Manifest media types and Accept negotiation.

A mirror must never hand a client a manifest type its Accept header excludes: an old client that
only knows Docker schema2 must not receive an OCI index. `AcceptSet.allows` is the one test for
that.

What a request's Accept can make the mirror keep is bounded: at most `MAX_TYPES` media types of
at most `MAX_TYPE_LENGTH` characters are read from it (a client that names more is not a
registry client; the rest is ignored), and only headers of ordinary size are remembered.
"""

from __future__ import annotations

from mirror.bounded import Bounded

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: What the mirror asks upstream for: every manifest type current clients understand, so the
#: cached answer is the registry's native one and serves every modern client.
MANIFEST_TYPES: tuple[str, ...] = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
UPSTREAM_ACCEPT = ", ".join(MANIFEST_TYPES)

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
#: What the mirror keeps and serves as a manifest; anything else upstream calls one is refused.
KNOWN_TYPES = frozenset(MANIFEST_TYPES)
#: Docker's schema 1, deprecated since 2017: its digest is over a canonical form of a signed
#: payload, not over its bytes, so it cannot be verified the way the mirror verifies content;
#: it is refused with MANIFEST_INVALID rather than served unverified.
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

#: Media types read from one request's Accept headers, and the longest one (RFC 6838: 127
#: characters for the type and for the subtype).
MAX_TYPES = 32
MAX_TYPE_LENGTH = 255
#: Accept headers up to this many characters in all are parsed once and remembered; longer
#: ones are parsed on every request and never kept.
MAX_REMEMBERED = 1024


class AcceptSet:
    """The media types a client's Accept header(s) allow.

    No Accept header, or a `*/*` / `application/*` range, allows anything: that is how curl and
    containerd (which appends `*/*`) behave toward registries. q=0 entries are excluded (RFC 9110
    §12.5.1).
    """

    __slots__ = ("_any", "_types", "header")

    def __init__(self, headers: list[str]) -> None:
        self._types: set[str] = set()
        self._any = not headers
        for header in headers:
            for item in header.split(",", MAX_TYPES):
                if len(self._types) >= MAX_TYPES:
                    break
                self._add(item)
        #: The accepted types again, as one header (sent upstream for this client alone).
        self.header = ", ".join(sorted(self._types))

    def _add(self, item: str) -> None:
        parts = [p.strip() for p in item.split(";")]
        media = parts[0].lower()
        if (
            not media
            or len(media) > MAX_TYPE_LENGTH
            or any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in parts[1:])
        ):
            return
        if media in ("*/*", "application/*"):
            self._any = True
        self._types.add(media)

    def allows(self, media_type: str) -> bool:
        """True when a manifest of `media_type` may be sent to this client."""
        return self._any or media_type.lower() in self._types


#: Parsed Accept headers by their raw values: clients send a handful of distinct ones, and
#: parsing is a visible share of a cached manifest request.
_ACCEPT_CACHE: Bounded[tuple[str, ...], AcceptSet] = Bounded(512)


def parse_accept(headers: list[str]) -> AcceptSet:
    """An AcceptSet for these header values, parsed once per distinct value of ordinary size."""
    key = tuple(headers)
    found = _ACCEPT_CACHE.get(key)
    if found is None:
        found = AcceptSet(headers)
        if sum(map(len, headers)) <= MAX_REMEMBERED:
            _ACCEPT_CACHE.remember(key, found)
    return found
