"""Clients that misbehave: slowloris heads, idle keep-alives, header floods and huge
headers, garbage on the port, absurd and many-part Range, too many connections from one
address, and a client that never reads its blob. Each gets an answer or a closed connection
in bounded time, and the mirror keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable

import aiohttp
from conftest import MakeMirror, MirrorProcess, error_codes, exchange, wait_until
from upstream_sim import UpstreamSim

from mirror.http.app import METRICS

REPO = "test/hostile"


async def _slowloris(host: str, port: int) -> bytes:
    """Start a request head and add a header line every 0.2 s, never finishing it, until the
    mirror closes the connection (or 200 lines, 40 s, have gone by). What the mirror sent."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
        for line in range(200):
            try:
                return await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                writer.write(b"X-Slow-%d: 1\r\n" % line)
                await writer.drain()
        return b"still open"
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def _idle_after_one_request(host: str, port: int) -> bytes:
    """One keep-alive request answered, then silence: what follows on the socket."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        await reader.readexactly(length)
        return await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()


async def test_slowloris_and_idle_connections_are_closed_while_others_are_served(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], client: aiohttp.ClientSession
) -> None:
    """A real mirror process with `timeouts.client_idle = 1`: 30 connections trickling a
    request head that never ends, and one idle keep-alive, are all closed by the mirror;
    meanwhile a normal client is answered at once."""
    proc = mirror_process(sim.url, env={"MIRROR_TIMEOUTS__CLIENT_IDLE": "1"}).start()
    host, port = "127.0.0.1", proc.port
    loris = [asyncio.ensure_future(_slowloris(host, port)) for _ in range(30)]
    idle = asyncio.ensure_future(_idle_after_one_request(host, port))
    async with client.get(proc.url + "/v2/") as resp:
        assert resp.status == 200
    assert not any(task.done() for task in loris), "the slow heads were still being sent"
    assert await asyncio.gather(*loris) == [b""] * 30, "closed without an answer, like nginx"
    assert await idle == b""
    async with client.get(proc.url + "/v2/") as resp:
        assert resp.status == 200


async def test_unparseable_requests_get_error_json(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], client: aiohttp.ClientSession
) -> None:
    """A header flood (300 fields), a 20 KB header, a 20 KB request line, a TLS hello on the
    plain port and a request line of garbage: each gets 400 with OCI error JSON
    (UNSUPPORTED, reason INVALID_REQUEST) from the real process, which then serves on."""
    proc = mirror_process(sim.url).start()
    flood = b"".join(b"X-F-%d: x\r\n" % i for i in range(300))
    cases = {
        "header flood": b"GET /v2/ HTTP/1.1\r\nHost: m\r\n" + flood + b"\r\n",
        "huge header": b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        "huge request line": b"GET /v2/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: m\r\n\r\n",
        "TLS hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(64) + b"\r\n\r\n",
        "garbage": b"\x00\x01\x02 nonsense\r\n\r\n",
    }
    for name, request in cases.items():
        status, headers, body = await exchange("127.0.0.1", proc.port, request)
        assert status == 400, name
        assert headers["content-type"].startswith("application/json"), name
        assert error_codes(body) == ("UNSUPPORTED", "INVALID_REQUEST"), name
    async with client.get(proc.url + "/v2/") as resp:
        assert resp.status == 200


async def test_absurd_and_many_part_ranges(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A Range of 1,000 parts costs no more than a GET of the blob: adjacent or overlapping
    parts are answered as the one range they make (206, or 200 when that is the whole blob),
    and more than 16 far-apart parts as the one range that covers them all, which for a blob
    still being filled is ONE ranged request upstream, not one per part; numbers past 64 bits
    are unsatisfiable (416) or clamped to the blob, never a crash."""
    data = os.urandom(50_000)
    digest = sim.add_blob(data)
    mirror = await make_mirror(sim.url)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with client.get(url) as resp:
        assert await resp.read() == data
    many = "bytes=" + ",".join(
        f"{i}-{i}" for i in range(1000)
    )  # 7.9 KB: under the 8 KiB field limit
    async with client.get(url, headers={"Range": many}) as resp:
        assert (resp.status, resp.headers["Content-Range"]) == (206, "bytes 0-999/50000")
        assert await resp.read() == data[:1000]
    overlapping = "bytes=" + ",".join(["0-"] * 1000)
    async with client.get(url, headers={"Range": overlapping}) as resp:
        assert (resp.status, await resp.read()) == (200, data)
    huge = "9" * 30
    async with client.get(url, headers={"Range": f"bytes={huge}-"}) as resp:
        assert resp.status == 416
        assert error_codes(await resp.read()) == ("SIZE_INVALID", "RANGE_INVALID")
    async with client.get(url, headers={"Range": f"bytes=0-{huge}"}) as resp:
        assert resp.status in (200, 206) and await resp.read() == data  # all of it
    async with client.get(url, headers={"Range": f"bytes=-{huge}"}) as resp:
        assert resp.status in (200, 206) and await resp.read() == data

    big = os.urandom(4 * 1024 * 1024)
    big_digest = sim.add_blob(big)
    hold = sim.fault(big_digest, "slow", part=1024 * 1024, times=1)
    far = "bytes=" + ",".join(f"{i * 100_000}-{i * 100_000 + 9}" for i in range(1, 41))
    big_url = f"{mirror.url}/v2/{REPO}/blobs/{big_digest}"
    async with client.get(big_url, headers={"Range": far}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100000-4000009/{len(big)}"
        assert await asyncio.wait_for(resp.read(), 30) == big[100_000:4_000_010]
    assert not hold.gate.is_set(), "answered while the fill is held"
    ranged = [s.headers.get("Range") for s in sim.log if s.path.endswith(big_digest)]
    assert ranged == [None, "bytes=100000-4000009"], "the fill's GET and one ranged GET"
    hold.gate.set()
    await mirror.settled()


async def test_connections_per_client_are_capped(sim: UpstreamSim, make_mirror: MakeMirror) -> None:
    """`limits.max_connections_per_client = 2`: a third connection from the same address gets
    429 TOOMANYREQUESTS with Retry-After and is closed; once one of the two closes, a new
    connection is served."""
    mirror = await make_mirror(sim.url, toml="[limits]\nmax_connections_per_client = 2\n")
    host, port = "127.0.0.1", int(mirror.url.rsplit(":", 1)[1])
    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    request = b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n"
    status, headers, body = await exchange(host, port, request)
    assert (status, headers["retry-after"]) == (429, "1")
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    metrics = mirror.app[METRICS]  # type: ignore[index]
    assert metrics.total("mirror_client_refusals_total", reason="connections_per_client") == 1
    _, writer = held.pop()
    writer.close()
    await writer.wait_closed()
    status = 0
    for _ in range(50):  # the close reaches the mirror asynchronously: poll, with a bound
        status, _, _ = await exchange(
            host, port, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        )
        if status == 200:
            break
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    assert status == 200
    for _, writer in held:
        writer.close()


async def test_client_that_never_reads_is_dropped(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A client asks for a 32 MiB cached blob and then reads nothing: after `timeouts.read`
    the mirror drops it (counted as a stalled client), so it holds no socket, file or
    sender thread; other clients are served meanwhile."""
    data = os.urandom(32 * 1024 * 1024)
    digest = sim.add_blob(data)
    mirror = await make_mirror(sim.url, toml="[timeouts]\nread = 1\n")
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with client.get(url) as resp:
        assert await resp.read() == data
    await mirror.settled()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(
        sock, ("127.0.0.1", int(mirror.url.rsplit(":", 1)[1]))
    )
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    async with client.get(url) as resp:  # served while the other one sits
        assert await resp.read() == data
    metrics = mirror.app[METRICS]  # type: ignore[index]
    await wait_until(
        lambda: metrics.total("mirror_client_aborts_total", reason="stalled") >= 1, timeout=30
    )
    received = 0
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
            received += len(chunk)
    except ConnectionError:
        pass
    writer.close()
    assert received < len(data), "the transfer was cut, not finished"
