"""Answers a client can act on: what a proxy on the way or upstream's own quirks must not
break, what is asked again and again and need not be, and the spec's corners — each against a
real `python -m mirror serve` process and the upstream simulator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import MirrorProcess
from images import make_image, make_index
from upstream_sim import UpstreamSim

from mirror.oci import mediatypes

ACCEPT = {"Accept": "*/*"}


async def test_a_compressing_proxy_on_the_way_breaks_no_digest(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """Something between the mirror and upstream gzips what a client says it accepts: the
    mirror asks for `Accept-Encoding: identity`, so manifests, blobs and tag lists arrive as
    they are stored and their digests hold."""
    sim.gzip_when_asked = True
    image = make_image(31, [5000])
    sim.add_image("test/app", "1", image)
    mirror = mirror_process(sim.url).start()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{mirror.url}/v2/test/app/manifests/1", headers=ACCEPT) as resp:
            assert resp.status == 200 and await resp.read() == image.data
        for digest, data in image.blobs.items():
            async with client.get(f"{mirror.url}/v2/test/app/blobs/{digest}") as resp:
                assert resp.status == 200 and await resp.read() == data
        async with client.get(f"{mirror.url}/v2/test/app/tags/list") as resp:
            assert (await resp.json())["tags"] == ["1"]
    assert all(s.headers.get("Accept-Encoding") == "identity" for s in sim.log)


async def test_manifests_upstream_does_not_have_are_not_asked_for_again_within_negative_ttl(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """A signature checker asks for `sha256-<hex>.sig` on every pull; upstream has none: the
    mirror asks upstream once and answers the next asks within `negative_ttl` itself, 404
    MANIFEST_UNKNOWN both times; a tag that exists is unaffected."""
    image = make_image(32, [100])
    sim.add_image("test/app", "1", image)
    sig = "sha256-" + image.digest.split(":")[1] + ".sig"
    mirror = mirror_process(sim.url).start()
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(
                f"{mirror.url}/v2/test/app/manifests/{sig}", headers=ACCEPT
            ) as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        async with client.get(f"{mirror.url}/v2/test/app/manifests/1", headers=ACCEPT) as resp:
            assert resp.status == 200
    assert sim.requests[("GET", f"/v2/test/app/manifests/{sig}")] == 1


async def test_if_none_match_gets_304_and_pagination_links_point_back_at_the_mirror(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """A client that has the manifest (If-None-Match with its ETag) gets 304 without a body;
    upstream's absolute pagination Link becomes a link to the mirror under the client's name,
    with containerd's `ns` kept; referrers pass OCI-Filters-Applied on."""
    sim.absolute_links = True
    sim.referrers_api = True
    image = make_image(33, [100])
    for tag in ("a", "b", "c"):
        sim.add_image("library/app", tag, image)
    mirror = mirror_process(sim.url).start()
    async with aiohttp.ClientSession() as client:
        url = f"{mirror.url}/v2/app/manifests/a"
        async with client.get(url, headers=ACCEPT) as resp:
            etag = resp.headers["ETag"]
            assert etag == f'"{image.digest}"'
        async with client.get(url, headers={**ACCEPT, "If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""
            assert resp.headers["Docker-Content-Digest"] == image.digest
        async with client.get(url, headers={**ACCEPT, "If-None-Match": '"sha256:other"'}) as resp:
            assert resp.status == 200
        async with client.get(f"{mirror.url}/v2/app/tags/list?n=2&ns=docker.io") as resp:
            assert (await resp.json())["tags"] == ["a", "b"]
            link = resp.headers["Link"]
        assert link == '</v2/app/tags/list?n=2&last=b&ns=docker.io>; rel="next"', link
        async with client.get(
            f"{mirror.url}/v2/app/referrers/{image.digest}?artifactType=application/x-sig"
        ) as resp:
            assert resp.status == 200
            assert resp.headers["OCI-Filters-Applied"] == "artifactType"


async def test_a_docker_schema1_manifest_is_refused_clearly(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """Docker schema 1 (signed): its digest is over a canonical payload, not its bytes, so the
    mirror cannot verify it; the client gets 400 MANIFEST_INVALID saying so, not a digest
    mismatch or a silent pass-through, and nothing is kept."""
    schema1 = (
        b'{"schemaVersion": 1, "name": "test/old", "tag": "1", "architecture": "amd64",'
        b' "fsLayers": [], "history": [], "signatures": [{"header": {}, "signature": "x"}]}'
    )
    sim.add_manifest("test/old", "1", schema1, mediatypes.DOCKER_SCHEMA1_SIGNED)
    mirror = mirror_process(sim.url).start()
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get(f"{mirror.url}/v2/test/old/manifests/1", headers=ACCEPT) as resp:
                error = (await resp.json())["errors"][0]
                assert resp.status == 400 and error["code"] == "MANIFEST_INVALID"
                assert "schema 1" in error["message"]
    assert sim.requests[("GET", "/v2/test/old/manifests/1")] == 2, "nothing was kept"


async def test_a_client_with_a_narrower_accept_gets_a_tag_record_of_its_own(
    sim: UpstreamSim, tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """Tag `1` is an OCI index; a client that knows only Docker schema 2 is given a schema 2
    manifest upstream. That client's view gets a record of its own: asked again within the
    TTL it is a hit (no upstream GET, which would cost a Docker Hub pull each time); past the
    TTL it is revalidated with a HEAD, and served stale when upstream is down."""
    index = make_index({a: make_image(36 + i, [100], a) for i, a in enumerate(("amd64", "arm64"))})
    single = make_image(35, [100])
    sim.add_image("test/app", "1", index)
    sim.add_image("test/app", single.digest, single)
    sim.variants[("test/app", "1")] = [(single.data, single.media_type)]
    mirror = mirror_process(sim.url).start()
    old = {"Accept": single.media_type}
    url = f"{mirror.url}/v2/test/app/manifests/1"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers=ACCEPT) as resp:
            assert resp.headers["Content-Type"] == mediatypes.OCI_INDEX
        outcomes = []
        for _ in range(3):
            async with client.get(url, headers=old) as resp:
                assert resp.status == 200 and await resp.read() == single.data
                outcomes.append(resp.headers["X-Mirror-Cache"])
    assert outcomes == ["miss", "hit", "hit"]
    gets = sim.requests[("GET", "/v2/test/app/manifests/1")]
    assert gets == 2, "one for the index, one for the older client's view"
    mirror.stop()
    config = tmp_path / "ttl.toml"
    config.write_text('[upstreams."docker.io"]\ntag_ttl = 0\n')
    again = mirror_process(sim.url, data_dir=mirror.data_dir, env={"MIRROR_CONFIG": str(config)})
    again.start()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{again.url}/v2/test/app/manifests/1", headers=old) as resp:
            assert resp.status == 200 and await resp.read() == single.data
        heads = sim.requests[("HEAD", "/v2/test/app/manifests/1")]
        async with client.get(f"{again.url}/v2/test/app/manifests/1", headers=old) as resp:
            assert resp.headers["X-Mirror-Cache"] == "revalidated"
        assert sim.requests[("HEAD", "/v2/test/app/manifests/1")] == heads + 1
        await sim.down()
        async with client.get(f"{again.url}/v2/test/app/manifests/1", headers=old) as resp:
            assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "stale"
            assert await resp.read() == single.data
