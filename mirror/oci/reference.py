"""Repository names, tags and digests, checked against the OCI distribution spec's grammar.

Every value that reaches the store or the upstream passes through here first: a `Digest` is the
only thing ever turned into a file name, and its grammar (algorithm we support + fixed-length
lowercase hex) leaves no room for `/`, `..` or NUL.

Grammar (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests):
    name       [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*
    tag        [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    digest     algorithm ":" encoded (image-spec descriptor.md#digests)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from mirror.errors import DigestInvalid, NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

#: Algorithms we can verify, with the exact length of their lowercase hex encoding.
HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")


class Digest(NamedTuple):
    """A verified-grammar content digest such as `sha256:<64 hex>` (made by `parse_digest`).
    A tuple, so that hashing one, which every cache lookup does, is the interpreter's own
    tuple hash rather than Python code."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(value: str) -> Digest:
    """Parse a digest, refusing unknown algorithms and malformed encodings (DIGEST_INVALID)."""
    if not _DIGEST_RE.fullmatch(value):
        raise DigestInvalid("invalid digest", detail={"digest": value[:200]})
    algorithm, encoded = value.split(":", 1)
    length = HEX_LENGTH.get(algorithm)
    if length is None:
        raise DigestInvalid("unsupported digest algorithm", detail={"algorithm": algorithm[:50]})
    if len(encoded) != length or not _HEX_RE.fullmatch(encoded):
        raise DigestInvalid("invalid digest encoding", detail={"digest": value[:200]})
    return Digest(algorithm, encoded)


def is_digest_like(reference: str) -> bool:
    """A manifest reference containing ':' is a digest; a tag never contains one."""
    return ":" in reference


def looks_like_host(segment: str) -> bool:
    """Whether the first path segment of an image name is a registry host rather than part
    of the repository: it has a `.` or a `:` (a port), or is `localhost` (docker's rule)."""
    return "." in segment or ":" in segment or segment == "localhost"


def check_name(name: str) -> str:
    """Return `name` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid(detail={"name": name[:300]})
    return name


def check_tag(tag: str) -> str:
    """Return `tag` if it matches the tag grammar, else raise TAG_INVALID."""
    if not _TAG_RE.fullmatch(tag):
        raise TagInvalid("invalid tag", detail={"tag": tag[:200]})
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of `tag` and `digest` is set."""

    tag: str | None = None
    digest: Digest | None = None

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def parse_reference(value: str) -> Reference:
    """A tag or a digest, by the rule that only digests contain ':'."""
    if is_digest_like(value):
        return Reference(digest=parse_digest(value))
    return Reference(tag=check_tag(value))


@dataclass(frozen=True)
class ImageRef:
    """An image as a person writes it: registry, repository and tag or digest."""

    registry: str
    repository: str
    reference: str

    def __str__(self) -> str:
        sep = "@" if is_digest_like(self.reference) else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


def parse_image(text: str) -> ImageRef:
    """`[registry/]repository[:tag|@digest]`, as docker reads it (docker.io by default)."""
    name, at, digest = text.strip().partition("@")
    first, slash, rest = name.partition("/")
    if slash and looks_like_host(first):
        registry, name = first, rest
    else:
        registry = "docker.io"
    if at:
        return ImageRef(registry, name, digest)
    repo, colon, tag = name.rpartition(":")
    if colon and "/" not in tag:
        return ImageRef(registry, repo, tag)
    return ImageRef(registry, name, "latest")
