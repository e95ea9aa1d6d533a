"""What the pull-through policy answers with: the manifest, or the blob (or the fill to
follow), and how it was answered (`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass

from mirror.outcome import Outcome
from mirror.pull.fill import Fill
from mirror.store.blobs import OpenBlob
from mirror.store.manifests import StoredManifest


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: StoredManifest
    outcome: Outcome


@dataclass(slots=True)
class BlobAnswer:
    """Either an open committed blob (and the tier it came from) or a fill to follow; with
    neither, the blob is to be streamed through (no room to keep it)."""

    outcome: Outcome
    stored: OpenBlob | None = None
    fill: Fill | None = None
    tier: str = "upstream"
