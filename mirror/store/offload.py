"""The one executor hop: blocking disk and SQLite work runs on a thread pool, never on the
event loop (store/blobs.py, store/manifests.py, store/index.py go through here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def offload(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `executor`, awaited."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
