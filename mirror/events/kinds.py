"""Every kind of event and what its data holds: one method per kind, which returns at its
first line when nothing wants the kind (so an emitter with events off builds nothing), and
otherwise hands the data to `emit` (a pull, the common one, its fields joined, with no dict
built: record.py). `Events` (the package's emitter) is a
`Kinds`. Nothing is returned, nothing awaited: an event is in the journal when its method
returns.

Data is plain JSON: digests as their strings, times in seconds; `subject` names the image,
digest or upstream an event is about. The README's Events table lists the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mirror.bounded import Bounded
from mirror.events.record import pull_head, pull_line
from mirror.events.routes import Route

#: Most pull-line heads kept (one per manifest and reference pulled: record.pull_head).
PULL_HEADS = 4096


class Kinds:
    """The kinds; a subclass says where events go (`_routes`) and how they leave (`emit`)."""

    _routes: Mapping[str, Route]
    #: (upstream, repository, reference, digest, media type, size) → its pull lines' head.
    _pull_heads: Bounded[tuple[str, str, str, object, str, int], str]

    def wants(self, kind: str) -> bool:
        return kind in self._routes

    def emit(self, kind: str, data: dict[str, Any], subject: str | None = None) -> None:
        """Emit one event of `kind`."""
        raise NotImplementedError

    def _append(self, kind: str, line: bytes) -> None:
        """Journal an event of `kind`, its line built (record.py)."""
        raise NotImplementedError

    def pull(
        self,
        *,
        upstream: str,
        repository: str,
        reference: str,
        digest: object,
        media_type: str,
        size: int,
        method: str,
        client: str | None,
        user: str | None,
        outcome: str,
    ) -> None:
        """A manifest answered (GET or HEAD), by tag or by digest."""
        if "pull" not in self._routes:
            return
        key = (upstream, repository, reference, digest, media_type, size)
        head = self._pull_heads.get(key)
        if head is None:
            tag = None if ":" in reference else reference  # a digest has one, a tag never
            head = pull_head(upstream, repository, tag, digest, media_type, size)
            head = self._pull_heads.remember(key, head)
        self._append("pull", pull_line(head, method, client, user, outcome))

    def blob_cached(
        self,
        *,
        digest: object,
        size: int,
        source: str,
        seconds: float,
        upstream: str,
        repository: str,
    ) -> None:
        """A fill committed a verified blob to warm (from `upstream` or `cold`)."""
        if "blob.cached" not in self._routes:
            return
        data = {
            "digest": str(digest),
            "size": size,
            "tier": "warm",
            "source": source,
            "seconds": round(seconds, 3),
            "upstream": upstream,
            "repository": repository,
        }
        self.emit("blob.cached", data, str(digest))

    def blob_evicted(
        self, *, tier: str, reason: str, digests: Sequence[object], nbytes: int, to: str | None
    ) -> None:
        """Blobs left `tier` for `reason` (metrics.EVICTION_REASONS); `to` is "cold" for a
        demotion, None when they were deleted."""
        if "blob.evicted" not in self._routes or not digests:
            return
        data = {
            "tier": tier,
            "reason": reason,
            "digests": [str(d) for d in digests],
            "count": len(digests),
            "bytes": nbytes,
            "to": to,
        }
        self.emit("blob.evicted", data)

    def digest_mismatch(
        self,
        *,
        what: str,
        source: str,
        upstream: str | None,
        repository: str | None,
        expected: object,
        actual: object | None,
        detail: str,
    ) -> None:
        """A `manifest` or `blob` from `upstream` (or `cold`) that is not what its digest names;
        `actual` is what its bytes hash to, when they all arrived."""
        if "digest.mismatch" not in self._routes:
            return
        data = {
            "what": what,
            "source": source,
            "upstream": upstream,
            "repository": repository,
            "expected": str(expected),
            "actual": None if actual is None else str(actual),
            "detail": detail,
        }
        self.emit("digest.mismatch", data, str(expected))

    def tag_moved(
        self, *, upstream: str, repository: str, tag: str, old: object, new: object
    ) -> None:
        """Revalidation found a tag naming another digest than the one cached."""
        if "tag.moved" not in self._routes:
            return
        data = {
            "upstream": upstream,
            "repository": repository,
            "tag": tag,
            "old": str(old),
            "new": str(new),
        }
        self.emit("tag.moved", data, f"{upstream}/{repository}:{tag}")

    def upstream_state(self, upstream: str, up: bool, reason: str = "") -> None:
        """An upstream started failing (`upstream.down`: no answer, or 5xx) or answered again."""
        kind = "upstream.up" if up else "upstream.down"
        if kind not in self._routes:
            return
        data = {"upstream": upstream} if up else {"upstream": upstream, "reason": reason}
        self.emit(kind, data, upstream)

    def ratelimit_low(
        self, *, upstream: str, credential: str, remaining: int, limit: int, floor: int
    ) -> None:
        """The upstream's pull budget fell below `pull_budget_floor`."""
        if "ratelimit.low" not in self._routes:
            return
        data = {
            "upstream": upstream,
            "credential": credential,
            "remaining": remaining,
            "limit": limit,
            "floor": floor,
        }
        self.emit("ratelimit.low", data, upstream)

    def exported(self, *, images: Iterable[str], signed: bool) -> None:
        """`mirror export` wrote a bundle of these images (`<upstream>/<repository>:<tag>`)."""
        if "export.done" not in self._routes:
            return
        self.emit("export.done", {"images": list(images), "signed": signed})

    def imported(
        self,
        *,
        blobs: int,
        manifests: int,
        tags: int,
        signature: str,
        refused: str | None,
        failed: Iterable[str],
    ) -> None:
        """`mirror import` read a bundle: what it took, what the signature said, and what it
        refused (the whole bundle) or failed (single tags)."""
        if "import.done" not in self._routes:
            return
        data = {
            "blobs": blobs,
            "manifests": manifests,
            "tags": tags,
            "signature": signature,
            "refused": refused,
            "failed": list(failed),
        }
        self.emit("import.done", data)

    def admin(
        self,
        *,
        action: str,
        via: str,
        who: Mapping[str, Any],
        params: Mapping[str, Any],
        result: str,
    ) -> None:
        """An administrative action, through the admin API (`via` "api", `who` the client's
        address) or a command (`via` "cli", `who` the local user), and how it ended."""
        if "admin" not in self._routes:
            return
        data = {"action": action, "via": via, **who, "params": dict(params), "result": result}
        self.emit("admin", data, action)
