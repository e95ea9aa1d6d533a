"""Every kind of event and what its data holds: one method per kind, which returns at its
first line when nothing wants the kind (so an emitter with events off builds nothing), and
otherwise hands the data to `emit`. `Events` (the package's emitter) is a `Kinds`. Nothing is
returned, nothing awaited: an event is in the journal when its method returns, or (on a busy
loop) with the next write, a few milliseconds on (events/__init__.py).

A pull, one per manifest answered, is the common event and the one on a hot path: its method
keeps what the pull is made of as it is, a tuple, and only its time when it is the same as
the pull's before it (`Pulls`); its line (record.py) is built with the others' at the
journal's next write, where building a hundred costs less than building one between two
requests did.

Data is plain JSON: digests as their strings, times in seconds; `subject` names the image,
digest or upstream an event is about. The README's Events table lists the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mirror.events.routes import Route
from mirror.oci.reference import Digest


class Named(Protocol):
    """An upstream, as a pull names it."""

    @property
    def name(self) -> str: ...


class Target(Protocol):
    """Where a pull was routed (upstream/routing.py's Target), as much of it as its line
    holds: the events package takes what it is given and imports nothing above it."""

    @property
    def upstream(self) -> Named: ...

    @property
    def repo(self) -> str: ...


class Answered(Protocol):
    """The manifest a pull answered (store/manifests.py's StoredManifest), as its line
    holds it."""

    @property
    def digest(self) -> Digest: ...

    @property
    def media_type(self) -> str: ...

    @property
    def data(self) -> bytes: ...


#: What a pull is made of: the target, the reference as the client gave it, the manifest
#: answered; the method, the client's address, the authenticated user, the outcome.
PullKey = tuple[Target, str, Answered, str, "str | None", "str | None", str]
#: Pulls as their method keeps them until their line is built: one after the other, alike in
#: everything but their time (their key), and when each was emitted (ns since the epoch).
Pulls = tuple[PullKey, list[int]]


class Kinds:
    """The kinds; a subclass says where events go (`_routes`) and how they leave (`emit`)."""

    _routes: Mapping[str, Route]

    def wants(self, kind: str) -> bool:
        return kind in self._routes

    def emit(self, kind: str, data: dict[str, Any], subject: str | None = None) -> None:
        """Emit one event of `kind`."""
        raise NotImplementedError

    def pull(
        self,
        target: Target,
        reference: str,
        manifest: Answered,
        method: str,
        client: str | None,
        user: str | None,
        outcome: str,
    ) -> None:
        """A manifest answered (GET or HEAD), by tag or by digest (`reference`), on the event
        loop: what it is made of is kept as it is, in `Pulls` (see the module docstring)."""
        raise NotImplementedError

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
