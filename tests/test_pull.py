"""Pulls through the mirror with a real client (skopeo) in front of a real registry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
from conftest import MakeMirror, skopeo_copy
from images import ACCEPT_ALL, Upstream, push_all
from registry import Registry, free_port


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def _pull_all(mirror_host: str, refs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        extra = ("--all",) if "multi" in ref else ()
        code, out = await skopeo_copy(
            f"docker://{mirror_host}/{ref}", dest / ref.replace("/", "_"), *extra
        )
        assert code == 0, out


async def test_skopeo_pulls_every_image_with_upstream_digests(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Each test image pulls through the mirror, and the manifest skopeo received hashes to
    the digest the upstream registry reports (exact bytes, not a re-serialisation)."""
    mirror = await make_mirror(upstream.url)
    refs = sorted(upstream.images)
    await _pull_all(mirror.host, refs, tmp_path / "pull")
    for ref in refs:
        pulled = tmp_path / "pull" / ref.replace("/", "_")
        assert _sha256(pulled / "manifest.json") == upstream.images[ref].digest
        for blob in upstream.images[ref].layers:
            assert _sha256(pulled / blob.digest.split(":")[1]) == blob.digest


async def test_second_pull_needs_no_upstream(
    make_mirror: MakeMirror, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """After one pull, the same pull succeeds with the upstream registry stopped: zero
    upstream requests for blobs and for manifests within the tag TTL."""
    registry = Registry(tmp_path / "own-registry")
    registry.start()
    try:
        images = push_all(registry.host, tmp_path / "layouts")
        mirror = await make_mirror(registry.url)
        refs = sorted(images)
        await _pull_all(mirror.host, refs, tmp_path / "first")
    finally:
        registry.stop()
    await _pull_all(mirror.host, refs, tmp_path / "second")
    for ref in refs:
        first = tmp_path / "first" / ref.replace("/", "_")
        second = tmp_path / "second" / ref.replace("/", "_")
        assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    async with client.get(
        f"{mirror.url}/v2/test/single/manifests/1", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Mirror-Cache"] == "hit"


async def test_blobs_are_shared_across_repositories(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """One file per digest: fetching the same blob through two names stores it once."""
    mirror = await make_mirror(upstream.url)
    layer = upstream.images["test/single:1"].layers[0]
    for repo in ("test/single", "test/v2s2"):
        async with client.get(f"{mirror.url}/v2/{repo}/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            assert hashlib.sha256(await resp.read()).hexdigest() == layer.digest.split(":")[1]
    await mirror.settled()
    assert len([p for p in mirror.blob_files() if p.name == layer.digest.split(":")[1]]) == 1


async def test_manifest_headers_and_head(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """GET and HEAD by tag and by digest carry the upstream's Content-Type, the digest, a
    Content-Length and an ETag; HEAD has no body."""
    mirror = await make_mirror(upstream.url)
    image = upstream.images["test/multi:1"]
    for ref in ("1", image.digest):
        url = f"{mirror.url}/v2/test/multi/manifests/{ref}"
        async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Type"] == image.media_type
            assert resp.headers["Docker-Content-Digest"] == image.digest
            assert resp.headers["ETag"] == f'"{image.digest}"'
            assert body == image.data
        async with client.head(url, headers={"Accept": ACCEPT_ALL}) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(image.data)
            assert resp.headers["Docker-Content-Digest"] == image.digest
            assert await resp.read() == b""


async def test_accept_that_excludes_an_index_never_gets_one(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A client that accepts only single-image manifests is never handed the cached index
    (the wrong type): it gets what upstream gives for its own Accept, here MANIFEST_UNKNOWN."""
    mirror = await make_mirror(upstream.url)
    url = f"{mirror.url}/v2/test/multi/manifests/1"
    async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200
    narrow = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    async with client.get(url, headers={"Accept": narrow}) as resp:
        body = await resp.json()
        assert resp.status == 404
        assert body["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    digest = upstream.images["test/multi:1"].digest
    async with client.get(
        f"{mirror.url}/v2/test/multi/manifests/{digest}", headers={"Accept": narrow}
    ) as resp:
        assert resp.status == 404
    single = upstream.images["test/single:1"]
    async with client.get(
        f"{mirror.url}/v2/test/single/manifests/1", headers={"Accept": narrow}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == single.media_type


async def test_tags_list_passes_through(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """tags/list answers what the real registry answers (pagination: see test_lists)."""
    mirror = await make_mirror(upstream.url)
    async with client.get(f"{mirror.url}/v2/test/single/tags/list") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["name"] == "test/single"
        assert sorted(body["tags"]) == ["1", "2", "latest"]


async def test_restart_keeps_cache_and_sweeps_partials(
    upstream: Upstream,
    mirror_process,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """The real process (uvloop, CLI): a pull, a stop, a partial file left as by a crash, a
    restart against a dead upstream: the pull still succeeds from disk, the partial is gone."""
    data = tmp_path / "data"
    first = mirror_process(upstream.url, data_dir=data).start()
    code, out = await skopeo_copy(f"docker://{first.host}/test/single:2", tmp_path / "a")
    assert code == 0, out
    first.stop()
    crash_left = data / "tmp" / ("0" * 64 + ".dead.partial")
    crash_left.write_bytes(b"half a blob")
    dead = f"http://127.0.0.1:{free_port()}"
    second = mirror_process(
        dead, data_dir=data, env={"MIRROR_UPSTREAMS__DOCKER_IO__TAG_TTL": "0"}
    ).start()
    code, out = await skopeo_copy(f"docker://{second.host}/test/single:2", tmp_path / "b")
    assert code == 0, out
    assert not crash_left.exists()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_bytes())
    assert manifest["schemaVersion"] == 2
    assert _sha256(tmp_path / "b" / "manifest.json") == upstream.images["test/single:2"].digest
