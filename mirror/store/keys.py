"""The keys things are cached under, typed: one class per kind, so a blob and a manifest of
the same digest never meet in the hot tier, and a key says what it finds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from mirror.oci.reference import Digest


class TagKey(NamedTuple):
    """A tag as the mirror holds it: upstream (its configured name), repository, tag. A
    tuple, so it is also the row key of the index's `tags` table; in the hot tier it cannot
    meet the other keys, which have two fields or are no tuples."""

    upstream: str
    repo: str
    tag: str


class VariantKey(NamedTuple):
    """A tag as a client with a narrower Accept sees it (say, one that knows no OCI index):
    its own record, so it is cached and served stale like everyone else's. Four fields, so it
    never meets a TagKey."""

    upstream: str
    repo: str
    tag: str
    accept: str


#: Where a tag record lives: the tag itself, or one client Accept's view of it.
AnyTagKey = TagKey | VariantKey


class BlobKey(NamedTuple):
    """A small blob's bytes. (`kind` keeps it apart from a ManifestKey of the same digest;
    both are tuples so that the hot path hashes them in C.)"""

    digest: Digest
    kind: str = "blob"


class ManifestKey(NamedTuple):
    """A manifest by digest."""

    digest: Digest
    kind: str = "manifest"


@dataclass(frozen=True, slots=True)
class ListKey:
    """A cached tags/list or referrers answer: whose, which endpoint, which query."""

    upstream: str
    repo: str
    suffix: str
    query: str

    @property
    def durable(self) -> bool:
        """Whether the answer is kept on disk: only a repository's whole tag list. What a
        client's own arguments choose (a page of a list, the referrers of any digest it
        names) is kept in memory only, where the hot tier's budget bounds it."""
        return self.suffix == "tags/list" and not self.query


#: Everything the hot tier holds is found by one of these.
HotKey = BlobKey | ManifestKey | TagKey | VariantKey | ListKey
