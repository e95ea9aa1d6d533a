"""Blob fills: one upstream GET per digest, followers streaming from the fill in progress,
and nothing wrong or partial ever reaching a client as success or staying in the store."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
from conftest import MakeMirror, error_codes, wait_until
from upstream_sim import UpstreamSim

SIZE = 8 * 1024 * 1024 + 12345
REPO = "test/blob"


def _blob(seed: int, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + os.urandom(size % 32)


def _path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


async def _fetch(client: aiohttp.ClientSession, url: str) -> bytes:
    async with client.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def _fails(client: aiohttp.ClientSession, url: str, size: int) -> bool:
    """True when the client sees a failed transfer (error status, cut body), never a
    complete 200 body."""
    try:
        async with client.get(url) as resp:
            if resp.status != 200:
                return True
            body = await resp.read()
            return len(body) != size
    except aiohttp.ClientPayloadError:
        return True
    except aiohttp.ServerDisconnectedError:
        return True


async def test_twenty_clients_one_upstream_get_and_early_first_bytes(
    sim: UpstreamSim, make_mirror: MakeMirror
) -> None:
    """20 clients of one uncached blob: exactly one upstream GET, every client gets the right
    bytes, and the later ones get their first bytes while the fill is still held upstream."""
    data = _blob(1)
    digest = sim.add_blob(data)
    hold = sim.fault(digest, "slow", part=SIZE // 2)
    mirror = await make_mirror(sim.url)
    url = mirror.url + _path(digest)
    first_bytes = [asyncio.Event() for _ in range(20)]

    async def one(i: int, session: aiohttp.ClientSession) -> bytes:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.content_length == SIZE
            head = await resp.content.readexactly(1024)
            first_bytes[i].set()
            return head + await resp.read()

    async with aiohttp.ClientSession(
        trust_env=False, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        leader = asyncio.create_task(one(0, session))
        await first_bytes[0].wait()
        await hold.reached.wait()
        followers = [asyncio.create_task(one(i, session)) for i in range(1, 20)]
        await asyncio.gather(*(e.wait() for e in first_bytes))
        assert not hold.gate.is_set()
        assert mirror.partial_files(), "the fill is still in progress while followers read"
        hold.gate.set()
        bodies = await asyncio.gather(leader, *followers)
    assert all(hashlib.sha256(b).hexdigest() == digest.split(":")[1] for b in bodies)
    assert sim.requests[("GET", _path(digest))] == 1
    await mirror.settled()
    assert [p.name for p in mirror.blob_files()] == [digest.split(":")[1]]
    assert mirror.partial_files() == []


async def test_corrupted_upstream_blob_reaches_no_client_and_leaves_nothing(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A corrupted upstream body fails every client (leader and followers), keeps nothing in
    the store, and the next request fetches afresh and succeeds. (A cut body is resumed:
    test_resume.py.)"""
    data = _blob(2)
    digest = sim.add_blob(data)
    fault = sim.fault(digest, "wrong", times=1)
    mirror = await make_mirror(sim.url)
    url = mirror.url + _path(digest)
    results = await asyncio.gather(*(_fails(client, url, SIZE) for _ in range(5)))
    assert all(results)
    assert fault.hits == 1
    await mirror.settled()
    assert mirror.blob_files() == []
    assert mirror.partial_files() == []
    body = await _fetch(client, url)
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
    await mirror.settled()
    assert len(mirror.blob_files()) == 1


async def test_second_request_is_a_hit_with_no_upstream_call(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A committed blob is served from disk: the upstream sees one GET in all."""
    digest = sim.add_blob(_blob(3))
    mirror = await make_mirror(sim.url)
    await _fetch(client, mirror.url + _path(digest))
    await mirror.settled()  # the client had every byte once verified; fsync and rename follow
    async with client.get(mirror.url + _path(digest)) as resp:
        assert resp.headers["X-Mirror-Cache"] == "hit"
        assert hashlib.sha256(await resp.read()).hexdigest() == digest.split(":")[1]
    assert sim.requests[("GET", _path(digest))] == 1


async def test_client_that_leaves_does_not_cancel_the_fill(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """The only client drops its connection mid-fill; the fill still completes and commits,
    so the next client is served from disk without a second upstream GET."""
    data = _blob(4)
    digest = sim.add_blob(data)
    hold = sim.fault(digest, "slow", part=SIZE // 4)
    mirror = await make_mirror(sim.url)
    async with aiohttp.ClientSession(trust_env=False) as leaving:
        async with leaving.get(mirror.url + _path(digest)) as resp:
            await resp.content.readexactly(1000)
            await hold.reached.wait()
            resp.close()
    hold.gate.set()
    async with client.get(mirror.url + _path(digest)) as resp:
        assert hashlib.sha256(await resp.read()).hexdigest() == digest.split(":")[1]
    assert sim.requests[("GET", _path(digest))] == 1
    await mirror.settled()
    assert len(mirror.blob_files()) == 1


async def test_range_on_a_blob_being_filled(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A Range request for bytes the fill has already written is answered 206 from the
    partial file, whole (a range's last byte does not wait for the digest check of the
    blob), while upstream is still held, sharing the one upstream GET: no ranged request
    goes upstream."""
    data = _blob(5)
    digest = sim.add_blob(data)
    hold = sim.fault(digest, "slow", part=SIZE // 2)
    mirror = await make_mirror(sim.url)
    url = mirror.url + _path(digest)
    leader = asyncio.create_task(_fetch(client, url))
    await hold.reached.wait()
    await wait_until(lambda: mirror.fill(digest).written >= 200)
    async with client.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
        assert resp.headers["X-Mirror-Cache"] == "coalesced"
        assert await asyncio.wait_for(resp.read(), 30) == data[100:200]
    assert not hold.gate.is_set(), "answered from the partial file while upstream is held"
    hold.gate.set()
    assert await leader == data
    assert sim.requests[("GET", _path(digest))] == 1
    assert [s.headers.get("Range") for s in sim.log if s.path == _path(digest)] == [None]


async def test_upstream_errors_become_error_json(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Unknown blob → 404 BLOB_UNKNOWN; upstream 500 → 502; upstream down → 502; the mirror
    keeps serving throughout."""
    mirror = await make_mirror(sim.url)
    missing = "sha256:" + "a" * 64
    async with client.get(mirror.url + _path(missing)) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    digest = sim.add_blob(_blob(6, 1000))
    fault = sim.fault(digest, "status", status=500)
    async with client.get(mirror.url + _path(digest)) as resp:
        assert resp.status == 502
        assert error_codes(await resp.read()) == ("UNKNOWN", "UPSTREAM_INVALID")
    assert fault.hits == 3, "a 500 is tried three times in all (retries.attempts)"
    sim.clear_faults()
    await sim.down()
    async with client.get(mirror.url + _path(digest)) as resp:
        assert resp.status == 502
        assert error_codes(await resp.read()) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
    await sim.up()
    assert len(await _fetch(client, mirror.url + _path(digest))) == 1000


async def test_upstream_silence_times_out_as_504(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """An upstream that accepts and never answers yields 504 after the read timeout."""
    digest = sim.add_blob(_blob(7, 1000))
    hang = sim.fault(digest, "hang")
    mirror = await make_mirror(sim.url, toml="[timeouts]\nread = 0.5\n")
    async with client.get(mirror.url + _path(digest)) as resp:
        assert resp.status == 504
        assert error_codes(await resp.read()) == ("UNAVAILABLE", "UPSTREAM_TIMEOUT")
    hang.gate.set()


async def test_blob_head_reports_size_without_fetching(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """HEAD on an uncached blob asks upstream's HEAD for the size and fetches no body."""
    digest = sim.add_blob(_blob(8, 5000))
    mirror = await make_mirror(sim.url)
    async with client.head(mirror.url + _path(digest)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "5000"
        assert resp.headers["Docker-Content-Digest"] == digest
    assert sim.requests[("GET", _path(digest))] == 0
    assert mirror.blob_files() == []


async def test_limits_on_fills_and_blob_size(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`limits.max_fills`: a miss beyond it gets 429 with Retry-After, a follower of a running
    fill is not turned away. `max_blob_bytes`: a bigger blob is refused, nothing kept."""
    held, other, big = _blob(20), _blob(21), _blob(22, 3 * 1024 * 1024)
    held_digest, other_digest, big_digest = (
        sim.add_blob(held),
        sim.add_blob(other),
        sim.add_blob(big),
    )
    hold = sim.fault(held_digest, "slow", part=2 * 1024 * 1024)
    mirror = await make_mirror(
        sim.url, '[limits]\nmax_fills = 1\n[upstreams."docker.io"]\nmax_blob_bytes = "9MiB"\n'
    )
    first = asyncio.create_task(_fetch(client, mirror.url + _path(held_digest)))
    await hold.reached.wait()
    async with client.get(mirror.url + _path(other_digest)) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    follower = asyncio.create_task(_fetch(client, mirror.url + _path(held_digest)))
    hold.gate.set()
    assert await first == held and await follower == held
    await mirror.settled()
    assert await _fetch(client, mirror.url + _path(other_digest)) == other
    await mirror.settled()
    small = await make_mirror(sim.url, '[upstreams."docker.io"]\nmax_blob_bytes = "1MiB"\n')
    async with client.get(small.url + _path(big_digest)) as resp:
        assert resp.status == 403 and (await resp.json())["errors"][0]["code"] == "DENIED"
    await small.settled()
    assert small.blob_files() == [] and small.partial_files() == []
