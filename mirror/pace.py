"""A floor under a transfer's pace: a stream that averages less than `min_rate` bytes a second
over each `window` is too slow, whichever side is slow (an upstream trickling a blob, a client
reading one byte at a time). Total silence is the idle timeouts' business; this catches the
trickle that never falls silent long enough for them."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateFloor:
    def __init__(
        self, min_rate: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._min_rate = min_rate
        self._window = window
        self._clock = clock
        self._start = clock()
        self._bytes = 0

    def below(self, nbytes: int) -> int | None:
        """Count `nbytes` more; at the end of a window in which the pace was under the floor,
        the pace it kept (bytes/s), else None. A floor of 0 is no floor."""
        if not self._min_rate:
            return None
        self._bytes += nbytes
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self._window:
            return None
        if self._bytes < self._min_rate * elapsed:
            return int(self._bytes / elapsed)
        self._start, self._bytes = now, 0
        return None
