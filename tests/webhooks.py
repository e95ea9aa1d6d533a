"""Webhook receivers for the events tests: real HTTP servers on 127.0.0.1 that record every
POST, and can be down, failing, hanging, or tell which local process sent each POST."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from registry import free_port


@dataclass
class Attempt:
    """One POST a receiver got: its headers, its body, the status it answered, and the
    process that sent it (when the receiver was told which to look among)."""

    headers: dict[str, str]
    body: bytes
    status: int
    sender: int | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        batch = json.loads(self.body)
        assert isinstance(batch, list)
        return batch


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next of `answers` (then
    200), or never, while `hang` is set; records every attempt, and, for each, which of
    `senders` (process ids) holds the connection it came on."""

    port: int = field(default_factory=free_port)
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    senders: set[int] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _never: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            self._never.set()
            await self._runner.cleanup()
            self._runner = None
            self._never = asyncio.Event()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        sender = None
        if self.senders and request.transport is not None:
            port = request.transport.get_extra_info("peername")[1]
            sender = connection_owner(port, self.port, self.senders)
        if self.hang:
            self.attempts.append(Attempt(dict(request.headers), body, 0, sender))
            await self._never.wait()
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        self.attempts.append(Attempt(dict(request.headers), body, status, sender))
        return web.Response(status=status, headers=headers)

    def delivered(self) -> list[dict[str, Any]]:
        """Every event of every batch answered 2xx, in the order received."""
        return [e for a in self.attempts if 200 <= a.status < 300 for e in a.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.delivered() if e["type"] == f"io.mirror.{kind}"]


def connection_owner(local: int, remote: int, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the loopback TCP connection from port `local` to port `remote`
    (read from /proc, while the connection is open)."""
    inode = None
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            here, there = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(here, 16) == local and int(there, 16) == remote:
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    return None
