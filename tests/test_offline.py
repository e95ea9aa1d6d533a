"""Offline mode: an air-gapped mirror serves its cache and never dials an upstream."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from conftest import MakeMirror, error_codes
from images import make_image
from upstream_sim import UpstreamSim

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


async def test_offline_serves_the_cache_and_never_dials(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(70, [150_000, 400_000])
    sim.add_image("site/app", "1", image)
    sim.add_blob(b"never cached" * 100)
    data = tmp_path / "shared"
    online = await make_mirror(sim.url, data_dir=data)
    async with client.get(f"{online.url}/v2/site/app/manifests/1", headers=ACCEPT) as resp:
        assert resp.status == 200
    for digest in image.blobs:
        async with client.get(f"{online.url}/v2/site/app/blobs/{digest}") as resp:
            await resp.read()
    await online.settled()
    seen = sum(sim.requests.values())

    offline = await make_mirror(
        sim.url, 'offline = true\n[upstreams."docker.io"]\ntag_ttl = 0\n', data_dir=data
    )
    async with client.get(f"{offline.url}/v2/site/app/manifests/1", headers=ACCEPT) as resp:
        assert resp.status == 200 and await resp.read() == image.data
        assert resp.headers["X-Mirror-Cache"] == "stale"  # the tag as last seen
    for digest, body in image.blobs.items():
        async with client.get(f"{offline.url}/v2/site/app/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == body
    for path in ("/v2/site/app/manifests/2", "/v2/site/other/blobs/sha256:" + "0" * 64):
        async with client.get(f"{offline.url}{path}", headers=ACCEPT) as resp:
            assert resp.status == 503
            body = await resp.read()
            assert error_codes(body) == ("UNAVAILABLE", "OFFLINE")
            assert "offline" in json.loads(body)["errors"][0]["message"]
    assert sum(sim.requests.values()) == seen, "an offline mirror never dials an upstream"
