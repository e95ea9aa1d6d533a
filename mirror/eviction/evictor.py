"""The background evictor: runs an eviction pass every `interval` seconds, or at once when
woken (a commit that crossed the high watermark sets `wake`). One pass at a time; a failing
pass is logged and the next one tries again; a pass that stopped at its bound is followed at
once by another.

Of the processes serving one data directory, only the one that `leads` runs the periodic
passes (another takes over when it exits); any of them runs a pass when its own commit
crossed the watermark. Passes never overlap across processes (the coordinator's turn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from mirror.eviction.passes import PassReport

log = logging.getLogger("mirror.eviction")


class Evictor:
    def __init__(
        self,
        one_pass: Callable[[], Awaitable[PassReport]],
        interval: float,
        wake: asyncio.Event,
        leads: Callable[[], Awaitable[bool]],
    ) -> None:
        self._leads = leads
        self._one_pass = one_pass
        self._interval = interval
        self._wake = wake
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.passes = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="evictor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self._again:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
            woken, self._again = self._wake.is_set() or self._again, False
            self._wake.clear()
            try:
                if not woken and not await self._leads():
                    continue
            except Exception:
                log.exception("cannot tell which process runs the evictor; trying again")
                continue
            started = time.monotonic()
            try:
                report = await self._one_pass()
            except Exception:
                log.exception("eviction pass failed; the next one retries")
                continue
            self.passes += 1
            self._again = report.bounded
            if report.deleted or report.demoted:
                log.info(
                    "eviction pass: %d demoted, %d deleted, %d bytes freed in %.3fs",
                    report.demoted,
                    report.deleted,
                    report.freed,
                    time.monotonic() - started,
                )
