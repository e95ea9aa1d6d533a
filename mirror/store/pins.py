"""Pins: `<upstream>/<repository>:<tag>` glob patterns whose images are never evicted.

A pin matches tag records (fnmatch, case-sensitive) and holds every blob reachable from the
manifest a matching tag points at: an index's child manifests, then each one's config and
layers. Blocking (reads the manifest store): run it in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase

from mirror.oci.manifest import references
from mirror.oci.reference import Digest
from mirror.store.keys import TagKey
from mirror.store.manifests import ManifestStore
from mirror.store.tags import TagRecord


def matches(key: TagKey, patterns: Iterable[str]) -> bool:
    ref = f"{key.upstream}/{key.repo}:{key.tag}"
    return any(fnmatchcase(ref, p) for p in patterns)


def pinned_blobs(
    manifests: ManifestStore, tags: Iterator[tuple[TagKey, TagRecord]], patterns: Iterable[str]
) -> set[Digest]:
    """Every blob digest held by a pin, among these tag records."""
    patterns = list(patterns)
    roots = [record.digest for key, record in tags if matches(key, patterns)]
    return reachable_blobs(manifests, roots)


def reachable_blobs(manifests: ManifestStore, roots: Iterable[Digest]) -> set[Digest]:
    """Blobs named by these manifests and, through indexes, their children."""
    blobs: set[Digest] = set()
    seen: set[Digest] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = manifests.load(digest)
        if manifest is None:
            continue
        refs = references(manifest.data)
        blobs.update(refs.blobs)
        todo.extend(refs.manifests)
    return blobs
