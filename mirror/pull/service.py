"""The pull-through policy, in one place to hand to the HTTP layer and the sync list: the
only part of the mirror that sees both the upstream and the store.

    manifests  manifests by tag and digest, and lists (manifests.py)
    blobs      blobs: hits, fills, pass-through (blobs.py)
    ahead      what a manifest references, fetched before it is asked for (ahead.py)
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.pull.ahead import Ahead
from mirror.pull.blobs import Blobs
from mirror.pull.manifests import Manifests


@dataclass(frozen=True)
class MirrorService:
    """Answers registry reads from the cache, going upstream only on a miss."""

    manifests: Manifests
    blobs: Blobs
    ahead: Ahead
