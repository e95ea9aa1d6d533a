"""Zero-copy sending of file ranges to a client socket, under any event loop.

uvloop, our event loop, has no `loop.sendfile`, and aiohttp's FileResponse then falls back to
reading the file into memory chunk by chunk. Instead, once the response headers are flushed,
a worker thread calls `os.sendfile` on a duplicate of the client socket's descriptor, waiting
for writability with poll(). The duplicate keeps the socket alive if the transport closes it
meanwhile, so the thread never writes to a reused descriptor. A client that stops reading for
`Pace.idle` seconds or reads slower than `Pace.min_rate`, resets, or a stop request ends the
transfer with an error.

The same primitive serves committed blobs and blobs still being filled (a follower sends each
newly landed range as it arrives). Bytes that are not in a file (the head of each part of a
multipart answer, a range passed through from upstream) go through the transport, held to
the same pace; the transport is flushed before the next sendfile, so the two never interleave.

Over TLS the bytes must go through the TLS transport, so there the sender reads pieces of the
file in the thread pool and writes them to the response instead (one copy through Python).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from mirror.pace import RateFloor

#: How often a waiting thread wakes to check for a stop request (ms).
_POLL_MS = 200
#: Bytes per read when copying a file through a TLS transport.
COPY_CHUNK = 1024 * 1024
_BAD_EVENTS = select.POLLERR | select.POLLHUP | select.POLLNVAL


#: Blocking: (position, end, stop flag) -> how far the file may be sent now (see Fill.available).
Available = Callable[[int, int, "Stop"], int]
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


class Stop(Protocol):
    def is_set(self) -> bool: ...


class _StopOrHangup:
    """Set when the server stops, or when the client's side of the socket has closed: a
    follower waiting for a stalled fill notices a client that went away, instead of holding
    its thread (and keeping the fill wanted) until bytes arrive."""

    def __init__(self, sock: int, stop: threading.Event) -> None:
        self._stop = stop
        self._poller = select.poll()
        self._poller.register(sock, _HANGUP)
        self.hung_up = False

    def is_set(self) -> bool:
        if not self.hung_up:
            self.hung_up = any(events & _HANGUP for _, events in self._poller.poll(0))
        return self.hung_up or self._stop.is_set()


class ClientGone(ConnectionError):
    """The client reset, stopped reading past the idle timeout, or the server is stopping."""


class ClientStalled(ClientGone):
    """The client read nothing for the idle timeout, or read slower than the minimum rate
    over a window: its connection is dropped, so a client that never reads (or reads a byte
    at a time) cannot hold a socket, a file and a sender thread for long."""


@dataclass(frozen=True)
class Pace:
    """How slow a client may read: silent for at most `idle` seconds, and at least
    `min_rate` bytes/s averaged over each `window` of time spent waiting on it."""

    idle: float
    min_rate: int = 0
    window: float = 30.0


def _sendfile_blocking(
    sock: int, fd: int, offset: int, end: int, pace: Pace, stop: threading.Event
) -> None:
    """Send bytes [offset, end) of `fd` to `sock` (non-blocking) with os.sendfile. Only time
    spent here counts against the client's pace: a follower waiting for a fill to land more
    bytes is not slow."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    last = time.monotonic()
    floor = RateFloor(pace.min_rate, pace.window)
    while offset < end:
        try:
            n = os.sendfile(sock, fd, offset, end - offset)
        except BlockingIOError:
            n = -1
        except OSError as e:
            raise ClientGone(str(e)) from e
        if n == 0:
            raise ClientGone("file shorter than announced")
        if (slow := floor.below(max(n, 0))) is not None:
            raise ClientStalled(f"client read at {slow} bytes/s, under {pace.min_rate}")
        if n > 0:
            offset += n
            last = time.monotonic()
            continue
        if stop.is_set():
            raise ClientGone("server stopping")
        if time.monotonic() - last > pace.idle:
            raise ClientStalled("client stopped reading")
        for _, events in poller.poll(_POLL_MS):
            if events & _BAD_EVENTS:
                raise ClientGone("client connection closed")


def _follow_blocking(
    sock: int,
    fd: int,
    start: int,
    end: int,
    available: Available,
    pace: Pace,
    stop: threading.Event,
) -> None:
    """Send [start, end) of a growing file, each range as soon as `available` releases it."""
    pos = start
    waiting = _StopOrHangup(sock, stop)
    while pos < end:
        limit = available(pos, end, waiting)
        if waiting.hung_up:
            raise ClientGone("client went away while the fill was stalled")
        if stop.is_set():
            raise ClientGone("server stopping")
        _sendfile_blocking(sock, fd, pos, limit, pace, stop)
        pos = limit


class SocketSender:
    """Sends file ranges over one prepared response's socket; use as an async context."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        executor: ThreadPoolExecutor,
        pace: Pace,
    ) -> None:
        self._request = request
        self._response = response
        self._executor = executor
        self._pace = pace
        self._sock: int | None = None
        self._tls = False
        #: Seconds spent waiting on the client in transport writes: the floor's clock.
        self._waited = 0.0
        self._floor = RateFloor(pace.min_rate, pace.window, clock=lambda: self._waited)

    async def __aenter__(self) -> SocketSender:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("connection lost before the body")
        if transport.get_extra_info("sslcontext") is not None:
            self._tls = True
            return self
        await self._flush(transport)
        sock = transport.get_extra_info("socket")
        self._sock = os.dup(sock.fileno())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sock is not None:
            os.close(self._sock)
            self._sock = None

    async def _flush(self, transport: asyncio.Transport) -> None:
        """Wait until the transport's buffer (the headers) has reached the socket: with a
        high-water mark of 0 the protocol stays paused until the buffer is empty."""
        if transport.get_write_buffer_size() == 0:
            return
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            protocol = self._request.protocol
            while transport.get_write_buffer_size() and not transport.is_closing():
                await protocol._drain_helper()
        finally:
            transport.set_write_buffer_limits()

    async def send(self, fd: int, offset: int, count: int) -> None:
        """Send a file range."""
        if self._tls:
            return await self._copy(fd, offset, offset + count, None)
        await self._in_thread(_sendfile_blocking, fd, offset, offset + count)

    async def send_growing(self, fd: int, start: int, end: int, available: Available) -> None:
        """Send [start, end) of a file still being written, as `available` allows."""
        if self._tls:
            return await self._copy(fd, start, end, available)
        await self._in_thread(_follow_blocking, fd, start, end, available)

    async def write(self, data: bytes) -> None:
        """Send bytes that are in no file, through the transport, at the client's pace: it
        is stalled past `Pace.idle` and under `Pace.min_rate` as with sendfile."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.wait_for(self._response.write(data), self._pace.idle)
        except TimeoutError as e:
            raise ClientStalled("client stopped reading") from e
        except ConnectionError as e:
            raise ClientGone(str(e)) from e
        self._waited += loop.time() - started
        if self._floor.below(len(data)) is not None:
            raise ClientStalled("client read slower than the minimum rate")

    async def _copy(self, fd: int, pos: int, end: int, available: Available | None) -> None:
        """TLS: pread pieces in the pool and write them through the transport."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        try:
            while pos < end:
                limit = (
                    end
                    if available is None
                    else await loop.run_in_executor(self._executor, available, pos, end, stop)
                )
                while pos < limit:
                    chunk = await loop.run_in_executor(
                        self._executor, os.pread, fd, min(COPY_CHUNK, limit - pos), pos
                    )
                    if not chunk:
                        raise ClientGone("file shorter than announced")
                    await self.write(chunk)
                    pos += len(chunk)
        finally:
            stop.set()

    async def _in_thread(self, fn: Callable[..., None], *args: object) -> None:
        """Run a blocking sender in the pool; if we are cancelled, stop it and wait for it, so
        the socket duplicate is never closed under a running thread. What the transport still
        holds goes out first."""
        assert self._sock is not None
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("connection lost")
        await self._flush(transport)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self._executor, functools.partial(fn, self._sock, *args, self._pace, stop)
        )
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(Exception):
                await fut
            raise


def abort(request: web.Request) -> None:
    """Cut a response whose headers are out: the client must see a failed transfer. The
    connection is reset (SO_LINGER 0), so what the kernel still holds for a slow client is
    dropped at once rather than trickled out."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
