"""`mirror prefetch` as a real command, through an in-process mirror in front of the real
registry: every platform of an index or only some, second run all hits, failures in the exit
status. And pull-ahead: a manifest answer brings its blobs in the background."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import PROJECT, MakeMirror
from images import Upstream, make_image
from upstream_sim import UpstreamSim

from mirror.config import SyncEntry
from mirror.http.app import CACHE, SYNC
from mirror.oci.reference import ImageRef, parse_image


@pytest.mark.parametrize(
    "text, ref",
    [
        ("python:3.12", ImageRef("docker.io", "python", "3.12")),
        ("library/python", ImageRef("docker.io", "library/python", "latest")),
        ("ghcr.io/org/tool:1.2", ImageRef("ghcr.io", "org/tool", "1.2")),
        (
            "localhost:5001/a/b@sha256:" + "a" * 64,
            ImageRef("localhost:5001", "a/b", "sha256:" + "a" * 64),
        ),
        ("registry.k8s.io/pause", ImageRef("registry.k8s.io", "pause", "latest")),
    ],
)
def test_image_references_read_as_docker_reads_them(text: str, ref: ImageRef) -> None:
    assert parse_image(text) == ref


async def _prefetch(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        "prefetch",
        *args,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def _blobs_of(upstream: Upstream, ref: str, arch: str | None = None) -> set[str]:
    """Configs and layers of an image, or of an index's children (of one architecture)."""
    image = upstream.images[ref]
    wanted = {
        m["digest"]
        for m in json.loads(image.data).get("manifests", [])
        if arch is None or m["platform"]["architecture"] == arch
    }
    found, keep = set(), not wanted
    for blob in image.blobs:
        if blob in image.children:
            keep = blob.digest in wanted
        elif keep:
            found.add(blob.digest)
    return found


async def test_prefetch_fills_the_cache_through_the_mirror(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await make_mirror(upstream.url)
    code, out = await _prefetch(
        "--mirror", mirror.url, "--platform", "linux/arm64", "docker.io/test/multi:1"
    )
    assert code == 0, out
    await mirror.settled()
    files = {f"sha256:{p.name}" for p in mirror.blob_files()}
    assert files == _blobs_of(upstream, "test/multi:1", "arm64"), "only the platform asked for"
    listing = tmp_path / "images.txt"
    listing.write_text("# what CI needs\ntest/multi:1\ntest/single:1   # by tag\n")
    code, out = await _prefetch("--mirror", mirror.url, "--file", str(listing))
    assert code == 0, out
    await mirror.settled()
    files = {f"sha256:{p.name}" for p in mirror.blob_files()}
    assert _blobs_of(upstream, "test/multi:1") | _blobs_of(upstream, "test/single:1") <= files
    code, out = await _prefetch("--mirror", mirror.url, "--file", str(listing))
    assert code == 0 and "0 fetched" in out and out.count("already cached") == 2, out
    code, out = await _prefetch("--mirror", mirror.url, "test/single:1", "test/nope:9")
    assert code == 1 and "test/nope:9: FAILED" in out


async def test_pull_ahead_brings_the_layers_of_a_manifest(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    image = make_image(75, [600_000, 300_000])
    sim.add_image("ci/app", "1", image)
    mirror = await make_mirror(sim.url, '[upstreams."docker.io"]\npull_ahead = true\n')
    async with client.get(
        f"{mirror.url}/v2/ci/app/manifests/1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 10
    while {f"sha256:{p.name}" for p in mirror.blob_files()} != set(image.blobs):
        assert time.monotonic() < deadline, "pull-ahead never brought the blobs"
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    for digest, body in image.blobs.items():  # the client's own pulls are hits now
        async with client.get(f"{mirror.url}/v2/ci/app/blobs/{digest}") as resp:
            assert await resp.read() == body and resp.headers["X-Mirror-Cache"] in (
                "hit",
                "coalesced",
            )
        assert sim.requests[("GET", f"/v2/ci/app/blobs/{digest}")] == 1


async def test_sync_list_keeps_matching_tags_fresh_and_pinned(
    sim: UpstreamSim, make_mirror: MakeMirror
) -> None:
    images = {tag: make_image(80 + i, [200_000]) for i, tag in enumerate(("1.0", "1.1", "2.0"))}
    for tag, image in images.items():
        sim.add_image("sync/app", tag, image)
    toml = (
        '[[sync]]\nimage = "docker.io/sync/app"\ntags = ["1.*"]\nevery = 3600\n'
        '[upstreams."docker.io"]\ntag_ttl = 0\n'
    )
    mirror = await make_mirror(sim.url, toml)
    assert mirror.app is not None
    syncer, cache = mirror.app[SYNC], mirror.app[CACHE]
    entry = SyncEntry("docker.io/sync/app", ("1.*",), 3600)
    assert await syncer.sync(entry) == ["1.0", "1.1"]
    await mirror.settled()
    files = {f"sha256:{p.name}" for p in mirror.blob_files()}
    wanted = set(images["1.0"].blobs) | set(images["1.1"].blobs)
    assert wanted <= files and not set(images["2.0"].blobs) & files
    protected = {str(d) for d in await cache.evictions.protected()}
    assert wanted <= protected, "what the sync list holds is pinned"
    # upstream moves 1.1: the next sync revalidates (HEAD), sees the new digest, pulls it
    moved = make_image(90, [250_000])
    sim.add_image("sync/app", "1.1", moved)
    assert await syncer.sync(entry) == ["1.0", "1.1"]
    await mirror.settled()
    assert set(moved.blobs) <= {f"sha256:{p.name}" for p in mirror.blob_files()}
