"""A blob body that survives a cut, stalled or trickling upstream connection.

Blobs are content-addressed and immutable, so when a body breaks off the rest can be asked
for with `Range: bytes=<received>-` on a new connection and appended: the consumer (a fill)
keeps hashing as if nothing happened, and the digest check at the end still covers every
byte, whichever connection brought it. A resumed answer that disagrees about the size, or
bytes that were changed between connections, fail that check and nothing is kept.

Retries are bounded: the count of failures grows with each break that brought less than
`PROGRESS` bytes (or was too slow), and a transfer is given up at `attempts` such failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from mirror import errors
from mirror.body import BlobBody
from mirror.config import RetryConfig
from mirror.pace import RateFloor

log = logging.getLogger("mirror.upstream")

#: A break after at least this many new bytes starts the failure count afresh.
PROGRESS = 1024 * 1024
#: Failures that a resume on a new connection may mend (a 4xx, a lying size, TLS: no).
RESUMABLE = (errors.UpstreamUnavailable, errors.UpstreamTimeout, errors.UpstreamOverloaded)


#: Open the blob's body from byte `offset` on (offset 0: the whole blob).
OpenAt = Callable[[int], AbstractAsyncContextManager[BlobBody]]


def backoff(retry: RetryConfig, failures: int) -> float:
    """Seconds to wait before try number `failures + 1`: doubling, capped, with jitter so that
    many fills that broke together do not come back together."""
    delay = min(retry.max_backoff, retry.backoff * 2.0 ** max(0, failures - 1))
    return delay * random.uniform(0.5, 1.0)


class TooSlow(errors.UpstreamTimeout):
    """An upstream body below `timeouts.min_rate`: a stall that never falls silent."""

    default_message = "upstream blob body slower than the minimum rate"


class ResumingBlob:
    """The whole blob as one stream of pieces, reconnecting with Range when a connection
    breaks. Use through `open_resuming`, which opens the first connection (so a 404 or 401 is
    raised before any byte) and closes the last one."""

    def __init__(
        self,
        open_at: OpenAt,
        retry: RetryConfig,
        min_rate: int,
        rate_window: float,
        on_resume: Callable[[], None],
        name: str,
    ) -> None:
        self._open_at = open_at
        self._retry = retry
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._on_resume = on_resume
        self._name = name
        self._current: contextlib.AsyncExitStack | None = None
        self._body: BlobBody | None = None
        self._offset = 0
        self.size: int | None = None

    async def _connect(self, offset: int) -> BlobBody:
        await self._disconnect()
        stack = contextlib.AsyncExitStack()
        try:
            body = await stack.enter_async_context(self._open_at(offset))
        except BaseException:
            await stack.aclose()
            raise
        self._current, self._body = stack, body
        return body

    async def _disconnect(self) -> None:
        stack, self._current, self._body = self._current, None, None
        if stack is not None:
            await stack.aclose()

    async def start(self, offset: int = 0) -> None:
        """Open the first connection, from byte `offset` on (a fill carried on from a file
        that holds the bytes before it); `size` is then the whole blob's."""
        body = await self._connect(offset)
        self._offset = offset
        self.size = None if body.size is None else offset + body.size

    async def close(self) -> None:
        await self._disconnect()

    async def chunks(self) -> AsyncIterator[bytes]:
        got = self._offset
        failures = 0
        body = self._body
        while True:
            since = got
            floor = RateFloor(self._min_rate, self._rate_window)
            try:
                if body is None:
                    body = await self._connect(got)
                async for chunk in body.chunks():
                    got += len(chunk)
                    if (pace := floor.below(len(chunk))) is not None:
                        raise TooSlow(detail={"bytes_per_second": pace, "min_rate": self._min_rate})
                    yield chunk
                return
            except RESUMABLE as e:
                progressed = got - since >= PROGRESS and not isinstance(e, TooSlow)
                failures = 1 if progressed else failures + 1
                if failures >= self._retry.attempts or (self.size is not None and got >= self.size):
                    raise
                delay = backoff(self._retry, failures)
                log.warning(
                    "blob %s broke off after %d bytes (%s); resuming from there in %.2fs",
                    self._name,
                    got,
                    e,
                    delay,
                )
                await self._disconnect()
                body = None
                self._on_resume()
                await asyncio.sleep(delay)


@contextlib.asynccontextmanager
async def open_resuming(
    open_at: OpenAt,
    retry: RetryConfig,
    min_rate: int,
    rate_window: float,
    on_resume: Callable[[], None],
    name: str,
    offset: int = 0,
) -> AsyncIterator[ResumingBlob]:
    """A `ResumingBlob` with its first connection open (from `offset`); every connection
    closed on exit."""
    blob = ResumingBlob(open_at, retry, min_rate, rate_window, on_resume, name)
    try:
        await blob.start(offset)
        yield blob
    finally:
        await blob.close()
