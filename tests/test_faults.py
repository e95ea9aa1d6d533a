"""Upstream faults the simulator does not play, each against a real socket: refused connection,
DNS failure, TLS failure, a redirect loop, a redirect to a non-http scheme, and bodies longer or
shorter than their Content-Length. Each ends in a clear error JSON, nothing is kept, and the
mirror keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeMirror, Mirror, error_codes
from registry import free_port

DATA = b"fault-test-blob" * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
PATH = f"/v2/f/x/blobs/{DIGEST}"


async def _serves_on(client: aiohttp.ClientSession, mirror: Mirror) -> None:
    async with client.get(f"{mirror.url}/v2/") as resp:
        assert resp.status == 200
    await mirror.settled()  # a failed fill removes its partial file after telling its clients
    assert mirror.blob_files() == [] and mirror.partial_files() == []


async def _error(client: aiohttp.ClientSession, mirror: Mirror) -> tuple[int, str]:
    """Status and the mirror's own code of an error answer (`error_codes` checks the code on
    the wire), or what a 200 turned out to be."""
    async with client.get(mirror.url + PATH) as resp:
        if resp.status == 200:  # headers went out before the fault: a cut transfer
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError:
                return 200, "cut"
            return 200, "complete" if body == DATA else "wrong"
        return resp.status, error_codes(await resp.read())[1]


@pytest.mark.parametrize(
    "url, status, code",
    [
        ("http://127.0.0.1:{closed}", 502, "UPSTREAM_UNAVAILABLE"),
        ("http://nonexistent.invalid", 502, "UPSTREAM_UNAVAILABLE"),
    ],
    ids=["refused", "dns"],
)
async def test_unreachable_upstreams(
    make_mirror: MakeMirror, client: aiohttp.ClientSession, url: str, status: int, code: str
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused, and
        closed.bind(("127.0.0.1", 0))  # no other listener (the mirror's own) can take the port
        mirror = await make_mirror(url.format(closed=closed.getsockname()[1]))
        assert await _error(client, mirror) == (status, code)
        await _serves_on(client, mirror)


@pytest.fixture
async def serve() -> AsyncIterator[
    Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]
]:
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_tls_to_a_plain_http_upstream_fails_cleanly(
    serve: Callable[..., Awaitable[str]], make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    async def plain(_: web.Request) -> web.Response:
        return web.Response(body=DATA)

    url = (await serve(plain)).replace("http://", "https://")
    mirror = await make_mirror(url)
    assert await _error(client, mirror) == (502, "UPSTREAM_UNAVAILABLE")
    await _serves_on(client, mirror)


@pytest.mark.parametrize(
    "location", ["{self}", "file:///etc/passwd", "ftp://127.0.0.1/x"], ids=["loop", "file", "ftp"]
)
async def test_bad_redirects_end_in_an_error(
    serve: Callable[..., Awaitable[str]],
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    location: str,
) -> None:
    hits = 0

    async def redirect(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        raise web.HTTPTemporaryRedirect(location.format(self=str(request.url)))

    mirror = await make_mirror(await serve(redirect))
    assert await _error(client, mirror) == (502, "UPSTREAM_INVALID")
    assert hits <= 6, "a redirect loop is followed a bounded number of times"
    await _serves_on(client, mirror)


@pytest.mark.parametrize("sent", [DATA + b"extra bytes", DATA[:-100]], ids=["longer", "shorter"])
async def test_body_not_matching_its_content_length(
    make_mirror: MakeMirror, client: aiohttp.ClientSession, sent: bytes
) -> None:
    """A raw server announces len(DATA) and sends more or fewer bytes (then closes)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {len(DATA)}\r\nConnection: close\r\n\r\n".encode()
            + sent
        )
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(answer, "127.0.0.1", port)
    try:
        mirror = await make_mirror(f"http://127.0.0.1:{port}")
        status, outcome = await _error(client, mirror)
        assert outcome != "wrong", "never a wrong blob"
        if len(sent) < len(DATA):
            assert (status, outcome) != (200, "complete"), "a short body never completes"
        await mirror.settled()
        async with client.get(f"{mirror.url}/v2/") as resp:
            assert resp.status == 200
        assert mirror.partial_files() == []
        for kept in mirror.blob_files():  # if anything was kept, it is the right bytes
            assert kept.read_bytes() == DATA
    finally:
        server.close()
        await server.wait_closed()
