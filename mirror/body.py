"""The one shape every blob stream has, wherever it comes from: an upstream answer (resumed
with Range when it breaks), a cold-tier object being promoted, a body verified on the way
through. A fill reads any of them the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class BlobBody(Protocol):
    """A blob's bytes as a stream of pieces, and its size when the source said it."""

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...
