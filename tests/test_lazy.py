"""Lazy pulling (stargz, SOCI, nydus, zstd:chunked): a Range on a blob that is not cached is
answered at once, straight from upstream, while the one fill of the whole blob goes on behind
it; a range the partial file already holds comes from there, a committed blob's from disk;
several ranges come as one covering range or as multipart/byteranges."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import MakeMirror, MirrorProcess, wait_until
from test_metrics import _value
from upstream_sim import UpstreamSim

from mirror.http.app import METRICS

REPO = "test/lazy"
MiB = 1024 * 1024
SIZE = 8 * MiB + 12345
TAIL = 64 * 1024


def _blob(seed: int, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + os.urandom(size % 32)


def _path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def _ranges(sim: UpstreamSim, digest: str) -> list[str | None]:
    """The Range header of each upstream GET of the blob, in order (None: the whole blob)."""
    return [
        seen.headers.get("Range")
        for seen in sim.log
        if seen.method == "GET" and seen.path == _path(digest)
    ]


async def _get(
    client: aiohttp.ClientSession, url: str, spec: str | None = None
) -> tuple[int, str | None, bytes]:
    """(status, Content-Range, body) of a GET, with `Range: spec` if given."""
    headers = {} if spec is None else {"Range": spec}
    async with client.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Range"), await resp.read()


async def _parts(resp: aiohttp.ClientResponse) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges answer."""
    reader = aiohttp.MultipartReader.from_response(resp)
    found = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        assert part.headers["Content-Type"] == "application/octet-stream"
        found.append((part.headers["Content-Range"], await part.read()))
    return found


def _committed(data_dir: Path, digest: str) -> bool:
    hex_ = digest.split(":")[1]
    return (data_dir / "blobs" / "sha256" / hex_[:2] / hex_).is_file()


async def test_tail_range_of_an_uncached_blob_comes_while_the_fill_runs(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], client: aiohttp.ClientSession
) -> None:
    """A real mirror process, an upstream sending each answer at 20 MB/s, a 200 MiB blob
    nobody has asked for: a request for its last 64 KiB is answered (206, the right bytes,
    `X-Mirror-Cache: pass-through`) while the fill has written less than half of it. The
    fill goes on though nobody follows it and more than `limits.abandoned_fill_bytes` is
    left, and commits the blob: upstream saw one whole GET and one `Range: bytes=a-b`, and
    the next range comes from disk."""
    size = 200 * MiB
    data = _blob(1, size)
    digest = sim.add_blob(data)
    sim.fault(digest, "rate", rate=20_000_000)
    proc = mirror_process(sim.url, env={"MIRROR_LIMITS__ABANDONED_FILL_BYTES": "64MiB"}).start()
    tmp = proc.data_dir / "tmp"
    url = proc.url + _path(digest)
    tail = f"bytes={size - TAIL}-{size - 1}"
    async with client.get(url, headers={"Range": tail}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {size - TAIL}-{size - 1}/{size}"
        assert resp.headers["X-Mirror-Cache"] == "pass-through"
        assert await resp.read() == data[-TAIL:]
    partial = list(tmp.iterdir())
    assert len(partial) == 1 and partial[0].stat().st_size < size // 2, "the fill is far off"
    assert not _committed(proc.data_dir, digest)

    await wait_until(lambda: _committed(proc.data_dir, digest), timeout=120)
    await wait_until(lambda: not any(tmp.iterdir()))
    assert _ranges(sim, digest) == [None, tail]
    async with client.get(url, headers={"Range": "bytes=1000-1999"}) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "hit")
        assert await resp.read() == data[1000:2000]
    assert _ranges(sim, digest) == [None, tail]
    async with client.get(proc.url + "/metrics") as resp:
        text = await resp.text()
    assert _value(text, "mirror_blob_bytes_served_total", source="range") == TAIL
    assert _value(text, "mirror_blob_lookups_total", source="range") == 1


async def test_ranges_of_a_committed_blob_come_from_disk(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Once committed, ranges are hits: one range, close parts as the one range they span,
    far parts as multipart/byteranges with each part's Content-Range and bytes (from a file,
    and from a small blob held in memory); upstream is not asked again."""
    data, small = _blob(2), os.urandom(100_000)
    digest, small_digest = sim.add_blob(data), sim.add_blob(small)
    mirror = await make_mirror(sim.url)
    for d in (digest, small_digest):
        async with client.get(mirror.url + _path(d)) as resp:
            assert resp.status == 200
            await resp.read()
    await mirror.settled()
    url = mirror.url + _path(digest)
    async with client.get(url, headers={"Range": f"bytes=-{TAIL}"}) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "hit")
        assert await resp.read() == data[-TAIL:]
    async with client.get(url, headers={"Range": "bytes=0-99,1000-1099"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 0-1099/{SIZE}"
        assert await resp.read() == data[:1100]
    far = f"bytes={SIZE - 100}-,0-99,{4 * MiB}-{4 * MiB + 9}"
    async with client.get(url, headers={"Range": far}) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "hit")
        assert resp.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
        assert await _parts(resp) == [
            (f"bytes 0-99/{SIZE}", data[:100]),
            (f"bytes {4 * MiB}-{4 * MiB + 9}/{SIZE}", data[4 * MiB : 4 * MiB + 10]),
            (f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}", data[-100:]),
        ]
    async with client.get(
        mirror.url + _path(small_digest), headers={"Range": "bytes=0-9,90000-90009"}
    ) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "hit")
        assert await _parts(resp) == [
            ("bytes 0-9/100000", small[:10]),
            ("bytes 90000-90009/100000", small[90000:90010]),
        ]
    assert _ranges(sim, digest) == [None] and _ranges(sim, small_digest) == [None]


async def test_several_ranges_of_a_blob_being_filled(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """The fill is held upstream after 2 MiB. Close parts the partial file holds are one
    range from it (no upstream request); far parts are multipart/byteranges, the first from
    the partial file and the last from upstream with one `Range: bytes=a-b`, all while the
    fill is held; the fill then commits the blob."""
    data = _blob(3)
    digest = sim.add_blob(data)
    hold = sim.fault(digest, "slow", part=2 * MiB, times=1)
    mirror = await make_mirror(sim.url)
    url = mirror.url + _path(digest)
    leader = asyncio.ensure_future(_get(client, url))
    await hold.reached.wait()
    await wait_until(lambda: mirror.fill(digest).written >= MiB)
    async with client.get(url, headers={"Range": "bytes=0-99,1000-1099"}) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "coalesced")
        assert resp.headers["Content-Range"] == f"bytes 0-1099/{SIZE}"
        assert await asyncio.wait_for(resp.read(), 30) == data[:1100]
    assert _ranges(sim, digest) == [None]
    async with client.get(url, headers={"Range": f"bytes=0-99,{SIZE - 100}-"}) as resp:
        assert (resp.status, resp.headers["X-Mirror-Cache"]) == (206, "pass-through")
        assert await asyncio.wait_for(_parts(resp), 30) == [
            (f"bytes 0-99/{SIZE}", data[:100]),
            (f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}", data[-100:]),
        ]
    assert not hold.gate.is_set()
    assert _ranges(sim, digest) == [None, f"bytes={SIZE - 100}-{SIZE - 1}"]
    hold.gate.set()
    assert await leader == (200, None, data)
    await mirror.settled()
    assert len(mirror.blob_files()) == 1 and mirror.partial_files() == []


async def test_upstream_that_ignores_range_is_not_read_twice(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """An upstream that answers a ranged GET with 200 and the whole blob: that answer's body
    is dropped unread and the range is served from the fill as it lands (206, right bytes),
    so the mirror receives the blob's bytes once, not twice."""
    data = _blob(4)
    digest = sim.add_blob(data)
    sim.ranges = False
    hold = sim.fault(digest, "slow", part=MiB, times=1)
    mirror = await make_mirror(sim.url)
    url = mirror.url + _path(digest)
    tail = f"bytes={SIZE - TAIL}-{SIZE - 1}"
    answer = asyncio.ensure_future(_get(client, url, tail))
    await wait_until(lambda: _ranges(sim, digest) == [None, tail])
    hold.gate.set()
    assert await answer == (206, f"bytes {SIZE - TAIL}-{SIZE - 1}/{SIZE}", data[-TAIL:])
    await mirror.settled()
    assert len(mirror.blob_files()) == 1
    metrics = mirror.app[METRICS]  # type: ignore[index]
    assert metrics.total("mirror_upstream_bytes_total") == SIZE
