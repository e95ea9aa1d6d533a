"""Incremental digest and size checking: hash while streaming, decide at the end.

Pure: it says that bytes are not what their digest names (`Mismatch`), not whose fault that
is. The caller knows (a lying upstream, a bad cold copy, a tampered bundle) and reports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from mirror.oci.reference import Digest


class Mismatch(Exception):
    """Bytes that are not the content their digest names: too many, too few, or other."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Verifier:
    """Feeds bytes to the digest's hash; `check()` says whether size and digest hold.

    `update` may run in an executor thread: hashlib releases the GIL for large buffers, so
    hashing a fill does not hold up the event loop.
    """

    __slots__ = ("_hash", "digest", "expected_size", "max_size", "size")

    def __init__(
        self, digest: Digest, expected_size: int | None = None, max_size: int | None = None
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        #: Refuse past this many bytes even when no size was announced.
        self.max_size = max_size
        self.size = 0
        self._hash = hashlib.new(digest.algorithm)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise Mismatch("has more bytes than announced", {"digest": str(self.digest)})
        if self.max_size is not None and self.size > self.max_size:
            raise Mismatch("is larger than allowed", {"digest": str(self.digest)})

    def update_all(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.update(piece)

    def check(self) -> None:
        """Raise Mismatch unless every byte arrived and they hash to the digest."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise Mismatch(
                "is shorter than announced", {"digest": str(self.digest), "size": self.size}
            )
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            raise Mismatch(
                "does not match its digest",
                {"digest": str(self.digest), "actual": f"{self.digest.algorithm}:{actual}"},
            )


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of bytes held in memory (manifests)."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


async def verified(chunks: AsyncIterator[bytes], verifier: Verifier) -> AsyncIterator[bytes]:
    """Pass `chunks` on, hashing them, but hold the last one back until size and digest check
    out: a consumer streaming to a client can then never complete a wrong or short blob."""
    held: bytes | None = None
    async for chunk in chunks:
        if not chunk:
            continue
        verifier.update(chunk)
        if held is not None:
            yield held
        held = chunk
    verifier.check()
    if held is not None:
        yield held
