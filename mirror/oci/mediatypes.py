"""Manifest media types and Accept negotiation.

A mirror must never hand a client a manifest type its Accept header excludes: an old client that
only knows Docker schema2 must not receive an OCI index. `acceptable` is the one test for that.
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


class AcceptSet:
    """The media types a client's Accept header(s) allow.

    No Accept header, or a `*/*` / `application/*` range, allows anything: that is how curl and
    containerd (which appends `*/*`) behave toward registries. q=0 entries are excluded (RFC 9110
    §12.5.1).
    """

    __slots__ = ("_any", "_types", "header")

    def __init__(self, headers: list[str]) -> None:
        self.header = ", ".join(headers)
        self._types: set[str] = set()
        self._any = not headers
        for header in headers:
            for item in header.split(","):
                self._add(item)

    def _add(self, item: str) -> None:
        parts = [p.strip() for p in item.split(";")]
        media = parts[0].lower()
        if not media or any(
            p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in parts[1:]
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
    """An AcceptSet for these header values, parsed once per distinct value."""
    key = tuple(headers)
    found = _ACCEPT_CACHE.get(key)
    if found is None:
        found = _ACCEPT_CACHE.remember(key, AcceptSet(headers))
    return found
