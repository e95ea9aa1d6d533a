"""What a manifest refers to (OCI image spec: image manifest, image index; Docker schema 2 and
manifest list have the same fields). Pure: bytes in, digests out."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mirror.errors import DigestInvalid
from mirror.oci.mediatypes import KNOWN_TYPES
from mirror.oci.reference import Digest, parse_digest


@dataclass(frozen=True, slots=True)
class References:
    """Blobs (config, layers) and child manifests (of an index) one manifest names."""

    blobs: tuple[Digest, ...]
    manifests: tuple[Digest, ...]


def references(data: bytes) -> References:
    """Digests named by a manifest; an unreadable document names nothing, and a descriptor
    whose digest is malformed or of an unknown algorithm is passed over (the manifest was
    verified against its own digest when stored, so this is upstream's problem, not a reason
    to fail)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return References((), ())
    if not isinstance(doc, dict):
        return References((), ())
    blobs = [d for d in (_digest(doc.get("config")),) if d]
    blobs += [d for d in map(_digest, _list(doc.get("layers"))) if d]
    blobs += [d for d in map(_digest, _list(doc.get("blobs"))) if d]
    children = [d for d in map(_digest, _list(doc.get("manifests"))) if d]
    return References(tuple(blobs), tuple(children))


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _digest(descriptor: object) -> Digest | None:
    """A descriptor's digest; None for one that has none, or one we cannot verify."""
    if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
        try:
            return parse_digest(descriptor["digest"])
        except DigestInvalid:
            return None
    return None


def manifest_type(data: bytes, declared: str) -> str | None:
    """What a manifest is, or None when these bytes are no manifest the mirror serves: a JSON
    object whose own `mediaType` (or, for documents without one, the `Content-Type` upstream
    declared) is a known manifest type. The document's own field wins over the header, so
    one digest is always served as one type."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("schemaVersion"), int):
        return None
    own = doc.get("mediaType")
    kind = own if isinstance(own, str) else declared
    return kind if kind in KNOWN_TYPES else None
