"""A blob file altered, truncated, replaced or deleted behind the mirror's back is never
served as it is: a committed file is sealed (read-only, a fixed mtime) and any write to it
moves the mtime, which the open's fstat sees; small blobs are hashed on every read from disk.
An altered file is dropped and fetched again, verified; a file whose bytes still match (copied
without its times) is sealed again and served. What a reader cannot see cheaply (bytes
changed and the mtime put back by hand) `mirror fsck` finds."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
from conftest import PROJECT, MakeMirror, Mirror
from upstream_sim import UpstreamSim

from mirror.http.app import METRICS
from mirror.store.blobs import SEAL_NS

REPO = "test/integrity"
LARGE = 3 * 1024 * 1024 + 5


async def _cached(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, sizes: tuple[int, ...]
) -> tuple[Mirror, dict[str, bytes]]:
    """A mirror with these blobs committed to its warm tier (hot tier off)."""
    blobs = {sim.add_blob(os.urandom(n)): b"" for n in sizes}
    for digest in blobs:
        blobs[digest] = sim.blobs[digest]
    mirror = await make_mirror(sim.url, toml="[hot]\nmax_bytes = 0\n")
    for digest, data in blobs.items():
        assert await _get(client, mirror, digest) == data
    await mirror.settled()
    return mirror, blobs


async def _get(client: aiohttp.ClientSession, mirror: Mirror, digest: str) -> bytes:
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
        assert resp.status == 200
        return await resp.read()


def _file(mirror: Mirror, digest: str) -> Path:
    return next(p for p in mirror.blob_files() if p.name == digest.split(":")[1])


def _gets(sim: UpstreamSim, digest: str) -> int:
    return sim.requests[("GET", f"/v2/{REPO}/blobs/{digest}")]


def _corrupt_evictions(mirror: Mirror) -> float:
    return float(mirror.app[METRICS].total("mirror_evictions_total", reason="corrupt"))  # type: ignore[index]


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:  # root writes through the read-only mode, as an intruder might
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_committed_blobs_are_sealed(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    mirror, blobs = await _cached(sim, make_mirror, client, (LARGE, 1000))
    for digest in blobs:
        st = _file(mirror, digest).stat()
        assert stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_mtime_ns == SEAL_NS


async def test_altered_truncated_and_deleted_files_are_fetched_again(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A flipped byte in a large blob, a truncated large blob, a flipped byte in a small blob
    with its mtime put back, and a deleted file: each is answered with the right bytes,
    fetched from upstream once more, and the bad files are counted as corrupt evictions."""
    mirror, blobs = await _cached(sim, make_mirror, client, (LARGE, LARGE + 1, 2000, LARGE + 2))
    flipped, truncated, small, deleted = blobs
    _flip(_file(mirror, flipped), LARGE // 2)
    os.truncate(_file(mirror, truncated), LARGE // 3)
    small_file = _file(mirror, small)
    _flip(small_file, 7)
    os.utime(small_file, ns=(SEAL_NS, SEAL_NS))  # a careful intruder
    _file(mirror, deleted).unlink()
    for digest, data in blobs.items():
        assert await _get(client, mirror, digest) == data
        assert _gets(sim, digest) == 2, "fetched again, verified"
    assert _corrupt_evictions(mirror) == 3
    await mirror.settled()
    for digest, data in blobs.items():  # the new files are sealed, whole, and served from disk
        assert _file(mirror, digest).read_bytes() == data
        assert await _get(client, mirror, digest) == data
        assert _gets(sim, digest) == 2


async def test_a_file_touched_but_whole_is_checked_and_sealed_again(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A store copied without its times (`cp -r`): the mtime moved, the bytes did not. The
    blob is hashed once, sealed again and served, without going upstream."""
    mirror, blobs = await _cached(sim, make_mirror, client, (LARGE,))
    ((digest, data),) = blobs.items()
    path = _file(mirror, digest)
    os.utime(path)
    assert await _get(client, mirror, digest) == data
    assert _gets(sim, digest) == 1 and _corrupt_evictions(mirror) == 0
    assert path.stat().st_mtime_ns == SEAL_NS


async def test_an_alteration_with_the_mtime_put_back_is_found_by_fsck(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Bytes of a large blob changed and its mtime restored: no cheap check on read can see
    that (clients verify digests themselves); `mirror fsck` does, and `--repair` drops it."""
    mirror, blobs = await _cached(sim, make_mirror, client, (LARGE,))
    ((digest, data),) = blobs.items()
    path = _file(mirror, digest)
    _flip(path, 10)
    os.utime(path, ns=(SEAL_NS, SEAL_NS))
    fsck = [sys.executable, "-m", "mirror", "fsck", "--data-dir", str(mirror.data_dir)]
    done = await asyncio.to_thread(
        subprocess.run, fsck, cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 1 and f"corrupt: {digest}" in done.stdout
    done = await asyncio.to_thread(
        subprocess.run, [*fsck, "--repair"], cwd=PROJECT, capture_output=True, text=True
    )
    assert not path.exists()
    assert await _get(client, mirror, digest) == data
