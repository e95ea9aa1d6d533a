"""The one shape every blob stream has, wherever it comes from: an upstream answer (resumed
with Range when it breaks), a cold-tier object being promoted, a body verified on the way
through. A fill reads any of them the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class BlobBody(Protocol):
    """A blob's bytes as a stream of pieces, and its size when the source said it."""

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class _Skipped:
    body: BlobBody
    offset: int

    @property
    def size(self) -> int | None:
        return self.body.size

    async def chunks(self) -> AsyncIterator[bytes]:
        skip = self.offset
        async for chunk in self.body.chunks():
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
                if not chunk:
                    continue
            yield chunk


def skipped(body: BlobBody, offset: int) -> BlobBody:
    """`body` without its first `offset` bytes (its `size` still the whole blob's): a fill
    carried on from a file that holds them already, from a source that cannot seek."""
    return _Skipped(body, offset) if offset else body
