"""Checks that the test infrastructure itself behaves, so mirror test failures mean mirror bugs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from images import ACCEPT_ALL, DOCKER_MANIFEST, OCI_INDEX, Upstream, build_images, sha256_digest
from registry import LOCAL_OPENER
from upstream_sim import UpstreamSim
from yarl import URL

SINGLE = build_images()["test/single:1"]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that never follows redirects, so tests see every hop."""
    async with aiohttp.ClientSession() as session:
        yield session


def test_registry_has_the_pushed_images(upstream: Upstream) -> None:
    with LOCAL_OPENER.open(upstream.url + "/v2/", timeout=5) as resp:
        assert resp.status == 200
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            "--raw",
            f"docker://{upstream.host}/test/multi:1",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    index = json.loads(raw)
    assert index["mediaType"] == OCI_INDEX
    assert {m["platform"]["architecture"] for m in index["manifests"]} == {"amd64", "arm64"}
    assert sha256_digest(raw) == upstream.images["test/multi:1"].digest
    images = upstream.images
    assert images["test/single:latest"].digest == images["test/single:1"].digest
    assert images["test/single:2"].digest != images["test/single:1"].digest
    assert images["test/v2s2:1"].media_type == DOCKER_MANIFEST
    assert len(images["test/multi:1"].children) == 2
    assert upstream.big_layer in images["test/big:1"].blobs


async def test_big_blob_hashes_to_its_digest(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    layer = upstream.big_layer
    assert layer.size > 32 * 1024 * 1024
    digest, size = hashlib.sha256(), 0
    async with client.get(f"{upstream.url}/v2/test/big/blobs/{layer.digest}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    assert ("sha256:" + digest.hexdigest(), size) == (layer.digest, layer.size)


async def test_sim_bearer_dance(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    sim.add_image("lib/app", "1", SINGLE)
    sim.require_bearer("alice", "secret")
    path = "/v2/lib/app/manifests/1"
    async with client.get(sim.url + path, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert (
        challenge == f'Bearer realm="{sim.url}/token",service="sim",scope="repository:lib/app:pull"'
    )
    params = {"service": "sim", "scope": "repository:lib/app:pull"}
    async with client.get(f"{sim.url}/token", params=params) as resp:
        assert resp.status == 401  # credentials required
    basic = {"Authorization": aiohttp.encode_basic_auth("alice", "secret")}
    async with client.get(f"{sim.url}/token", params=params, headers=basic) as resp:
        body = await resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    bearer = {"Authorization": f"Bearer {body['token']}", "Accept": ACCEPT_ALL}
    async with client.get(sim.url + path, headers=bearer) as resp:
        assert resp.status == 200
        assert (
            resp.headers["Docker-Content-Digest"]
            == SINGLE.digest
            == sha256_digest(await resp.read())
        )
    async with client.get(sim.url + "/v2/other/manifests/1", headers=bearer) as resp:
        assert resp.status == 401  # token is scoped to lib/app
    assert sim.requests[("GET", path)] == 2
    assert sim.auth_seen[path] == 1
    assert sim.tokens_issued == 1


async def test_sim_basic_auth(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    sim.require_basic("bob", "pw")
    async with client.get(sim.url + "/v2/") as resp:
        assert (resp.status, resp.headers["WWW-Authenticate"]) == (401, 'Basic realm="sim"')
    basic = {"Authorization": aiohttp.encode_basic_auth("bob", "pw")}
    async with client.get(sim.url + "/v2/", headers=basic) as resp:
        assert resp.status == 200


async def test_cdn_records_authorization(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    digest = sim.add_blob(b"layer bytes")
    sim.redirect_blobs = True
    async with client.get(f"{sim.url}/v2/lib/app/blobs/{digest}", allow_redirects=False) as resp:
        assert resp.status == 307
        location = URL(resp.headers["Location"])
    assert location.host == "127.0.0.2"
    async with client.get(location) as resp:
        assert await resp.read() == b"layer bytes"
    assert sim.cdn_authorizations == []
    async with client.get(location, headers={"Authorization": "Bearer leaked"}) as resp:
        assert resp.status == 200
    assert sim.cdn_authorizations == ["Bearer leaked"]


async def test_gate_holds_blob_mid_body(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    data = bytes(range(256)) * 4096
    digest = sim.add_blob(data)
    fault = sim.fault(digest, "slow", part=1000)
    async with client.get(f"{sim.url}/v2/lib/app/blobs/{digest}") as resp:
        assert await resp.content.readexactly(1000) == data[:1000]
        await fault.reached.wait()
        assert resp.content.total_bytes == 1000  # the server is parked on the gate
        fault.gate.set()
        assert await resp.read() == data[1000:]


async def test_cut_raises_payload_error(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    digest = sim.add_blob(b"x" * 100_000)
    sim.fault("blob", "cut", part=10_000)
    async with client.get(f"{sim.url}/v2/lib/app/blobs/{digest}") as resp:
        assert resp.headers["Content-Length"] == "100000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_wrong_status_and_range(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    data = b"abcdefghij" * 100
    digest = sim.add_blob(data)
    url = f"{sim.url}/v2/lib/app/blobs/{digest}"
    sim.fault(digest, "wrong", times=1)
    async with client.get(url) as resp:
        body = await resp.read()
    assert len(body) == len(data) and sha256_digest(body) != digest
    sim.fault("blob", "status", status=503, times=1, headers={"Retry-After": "1"})
    async with client.get(url) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    async with client.get(url, headers={"Range": "bytes=990-"}) as resp:
        assert (resp.status, await resp.read()) == (206, data[990:])
        assert resp.headers["Content-Range"] == "bytes 990-999/1000"
    async with client.head(url) as resp:
        assert (resp.status, resp.headers["Content-Length"]) == (200, "1000")


async def test_rate_limit_headers(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    sim.add_image("lib/app", "1", SINGLE)
    limit = sim.rate_limit(limit=100)
    url = f"{sim.url}/v2/lib/app/manifests/1"
    async with client.head(url) as resp:
        assert resp.headers["ratelimit-remaining"] == "100;w=21600"
        assert resp.headers["Content-Length"] == str(SINGLE.size)
    async with client.get(url) as resp:
        assert resp.headers["ratelimit-limit"] == "100;w=21600"
        assert resp.headers["ratelimit-remaining"] == "99;w=21600"
    limit.remaining = 0
    async with client.get(url) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (429, "60")


async def test_hang_then_outage_keeps_port(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    fault = sim.fault("ping", "hang", times=1)
    pending = asyncio.create_task(client.get(sim.url + "/v2/"))
    await fault.reached.wait()
    assert not pending.done()
    fault.gate.set()
    async with await pending as resp:
        assert resp.status == 200
    url = sim.url
    sim.fault("ping", "hang")
    stuck = asyncio.create_task(client.get(url + "/v2/"))
    await sim.faults[-1].reached.wait()
    await sim.down()  # aborts the hung request too
    with pytest.raises(aiohttp.ClientError):
        await stuck
    with pytest.raises(aiohttp.ClientConnectorError):
        await client.get(url + "/v2/")
    sim.clear_faults()
    await sim.up()
    assert sim.url == url
    async with client.get(url + "/v2/") as resp:
        assert resp.status == 200


async def test_tags_and_strict_accept(sim: UpstreamSim, client: aiohttp.ClientSession) -> None:
    for tag in ("a", "b", "c"):
        sim.add_image("lib/app", tag, SINGLE)
    async with client.get(f"{sim.url}/v2/lib/app/tags/list", params={"n": "2"}) as resp:
        assert (await resp.json())["tags"] == ["a", "b"]
        assert resp.headers["Link"] == '</v2/lib/app/tags/list?n=2&last=b>; rel="next"'
    sim.strict_accept = True
    url = f"{sim.url}/v2/lib/app/manifests/{SINGLE.digest}"
    async with client.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 404
    async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200
