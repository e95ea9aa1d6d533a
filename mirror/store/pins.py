"""Pins: `<upstream>/<repository>:<tag>` glob patterns whose images are never evicted.

A pin matches tag records (fnmatch, case-sensitive) and holds every blob reachable from the
manifest a matching tag points at: an index's child manifests, then each one's config and
layers. Blocking (reads the manifest store): run it in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from mirror.oci.manifest import references
from mirror.store.manifests import ManifestStore


def matches(upstream: str, repo: str, tag: str, patterns: Iterable[str]) -> bool:
    ref = f"{upstream}/{repo}:{tag}"
    return any(fnmatchcase(ref, p) for p in patterns)


def pinned_blobs(manifests: ManifestStore, patterns: Iterable[str]) -> set[str]:
    """Every blob digest held by a pin."""
    patterns = list(patterns)
    roots = [
        record.digest
        for (up, repo, tag), record in manifests.iter_tags()
        if matches(up, repo, tag, patterns)
    ]
    return reachable_blobs(manifests, roots)


def reachable_blobs(manifests: ManifestStore, roots: Iterable[str]) -> set[str]:
    """Blobs named by these manifests and, through indexes, their children."""
    blobs: set[str] = set()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = manifests.load_manifest(digest)
        if manifest is None:
            continue
        refs = references(manifest.data)
        blobs.update(refs.blobs)
        todo.extend(refs.manifests)
    return blobs
