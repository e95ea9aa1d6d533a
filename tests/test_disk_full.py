"""A full disk: the store on a small tmpfs (the tests run as root, as CI does). A blob that cannot
fit is streamed through to the client, verified and kept nowhere; ENOSPC in the middle of a
fill evicts and retries once, else fails the fill cleanly. Never a corrupt or partial file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import Ext4Disk, MakeMirror, Mirror
from images import ACCEPT_ALL, make_image
from upstream_sim import UpstreamSim

MiB = 1024 * 1024
REPO = "test/full"
NO_FLOOR = "[warm]\nmin_free_bytes = 0\n[eviction]\ninterval = 3600\n"


def _blob(seed: int, size: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _ballast(disk: Path, leave: int) -> Path:
    """Fill the disk up to `leave` free bytes, as another program would."""
    path = disk / "ballast"
    with path.open("wb") as f:
        f.write(b"\0" * max(_free(disk) - leave, 0))
    return path


async def _fails(client: aiohttp.ClientSession, url: str, size: int) -> bool:
    try:
        async with client.get(url) as resp:
            return resp.status != 200 or len(await resp.read()) != size
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        return True


def _nothing_partial(mirror: Mirror) -> bool:
    return not mirror.partial_files()


async def test_blob_larger_than_the_disk_streams_through(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    small_disk: Callable[[int], Path],
) -> None:
    data = _blob(1, 6 * MiB)
    digest = sim.add_blob(data)
    mirror = await make_mirror(sim.url, NO_FLOOR, data_dir=small_disk(4 * MiB))
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    for _ in range(2):
        async with client.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["X-Mirror-Cache"] == "pass-through"
            assert resp.headers["Docker-Content-Digest"] == digest
            assert await resp.read() == data
    await mirror.settled()
    assert mirror.blob_files() == [] and _nothing_partial(mirror)
    # the first request's fill opened upstream to learn the size, then gave up; the second
    # request knew better and went straight through
    assert sim.requests[("GET", f"/v2/{REPO}/blobs/{digest}")] == 3
    # streamed through, still verified: wrong bytes never complete
    sim.fault(digest, "wrong")
    assert await _fails(client, url, len(data))
    await mirror.settled()
    assert mirror.blob_files() == [] and _nothing_partial(mirror)
    # and the mirror keeps serving
    small = sim.add_blob(_blob(2, 100_000))
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{small}") as resp:
        assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "miss"


async def _fill_meets_a_full_disk(
    sim: UpstreamSim, mirror: Mirror, disk: Path, client: aiohttp.ClientSession, data: bytes
) -> tuple[str, asyncio.Task[bool]]:
    """Start a fill, fill the disk behind it while upstream holds the rest, then let it go on."""
    digest = sim.add_blob(data)
    hold = sim.fault(digest, "slow", part=MiB)
    transfer = asyncio.create_task(
        _fails(client, f"{mirror.url}/v2/{REPO}/blobs/{digest}", len(data))
    )
    await hold.reached.wait()
    deadline = time.monotonic() + 10
    while not any(p.stat().st_size for p in mirror.partial_files()):  # past the room check, writing
        assert time.monotonic() < deadline, "the fill never started"
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    _ballast(disk, leave=256 * 1024)
    hold.gate.set()
    return digest, transfer


async def test_enospc_mid_fill_evicts_and_retries(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    small_disk: Callable[[int], Path],
) -> None:
    disk = small_disk(10 * MiB)
    mirror = await make_mirror(sim.url, NO_FLOOR, data_dir=disk)
    old = _blob(3, 3 * MiB)
    old_digest = sim.add_blob(old)
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{old_digest}") as resp:
        assert await resp.read() == old
    await mirror.settled()
    data = _blob(4, 3 * MiB)
    digest, transfer = await _fill_meets_a_full_disk(sim, mirror, disk, client, data)
    assert not await transfer, "the retry after eviction completes the transfer"
    await mirror.settled()
    files = {f"sha256:{p.name}" for p in mirror.blob_files()}
    assert files == {digest}, "the older blob was evicted to make room"
    assert hashlib.sha256(next(iter(mirror.blob_files())).read_bytes()).hexdigest() == digest[7:]
    await mirror.settled()
    assert _nothing_partial(mirror)


async def test_enospc_mid_fill_with_nothing_to_evict_fails_clean_then_streams_through(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    small_disk: Callable[[int], Path],
) -> None:
    disk = small_disk(8 * MiB)
    mirror = await make_mirror(sim.url, NO_FLOOR, data_dir=disk)
    data = _blob(5, 3 * MiB)
    digest, transfer = await _fill_meets_a_full_disk(sim, mirror, disk, client, data)
    assert await transfer, "a fill that cannot be kept never completes as a success"
    await mirror.settled()
    assert mirror.blob_files() == [] and _nothing_partial(mirror)
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
        assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "pass-through"
        assert await resp.read() == data
    assert mirror.blob_files() == []


async def test_store_gone_read_only_keeps_serving(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    ext4_disk: Callable[[int], Ext4Disk],
) -> None:
    """The store's ext4 hits an error and the kernel remounts it read-only under the running
    mirror (errors=remount-ro): cached manifests and blobs are still served, /readyz says
    503, and an uncached blob streams through, verified and unkept, with no upstream request
    wasted on a fill that could not be kept."""
    disk = ext4_disk(64 * MiB)
    image = make_image(77, [2 * MiB, 3000])
    sim.add_image(REPO, "1", image)
    mirror = await make_mirror(sim.url, NO_FLOOR, data_dir=disk.where / "data")
    manifest_url = f"{mirror.url}/v2/{REPO}/manifests/1"
    async with client.get(manifest_url, headers={"Accept": ACCEPT_ALL}) as resp:
        assert await resp.read() == image.data
    for digest, data in image.blobs.items():
        async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
            assert await resp.read() == data
    await mirror.settled()
    new = _blob(78, 3 * MiB)
    new_digest = sim.add_blob(new)
    await asyncio.to_thread(disk.fail)
    async with client.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 503
    async with client.get(manifest_url, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200 and await resp.read() == image.data
    for digest, data in image.blobs.items():
        async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == data
    for _ in range(2):
        async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{new_digest}") as resp:
            assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "pass-through"
            assert await resp.read() == new
    assert sim.requests[("GET", f"/v2/{REPO}/blobs/{new_digest}")] == 2, (
        "one per client, no fill attempt"
    )
    assert not any(p.name == new_digest.split(":")[1] for p in mirror.blob_files())
