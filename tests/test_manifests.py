"""Manifests and tags: TTL, HEAD revalidation, stale serving, coalescing, verification, and
the tag-list cache, against the upstream simulator (which counts every request)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from conftest import MakeMirror, error_codes
from images import ACCEPT_ALL, make_image, sha256_digest
from upstream_sim import UpstreamSim

REPO = "test/app"
TAG_PATH = f"/v2/{REPO}/manifests/1"
FRESH = '[upstreams."docker.io"]\ntag_ttl = 3600\n'
EXPIRED = '[upstreams."docker.io"]\ntag_ttl = 0\nlist_ttl = 0\n'


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_fresh_tag_is_served_without_upstream(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Within tag_ttl a tag costs the upstream nothing after the first GET."""
    image = make_image(11, [100])
    sim.add_image(REPO, "1", image)
    mirror = await make_mirror(sim.url, toml=FRESH)
    for expected in ("miss", "hit", "hit"):
        status, headers, body = await _get(client, mirror.url + TAG_PATH)
        assert (status, headers["X-Mirror-Cache"], body) == (200, expected, image.data)
    assert sim.requests[("GET", TAG_PATH)] == 1
    assert sim.requests[("HEAD", TAG_PATH)] == 0


async def test_expired_tag_is_revalidated_with_head_only(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Past the TTL, an unchanged tag costs one HEAD (free on Docker Hub) and no GET; the
    pull-limit counter does not move."""
    limit = sim.rate_limit(limit=100)
    image = make_image(12, [100])
    sim.add_image(REPO, "1", image)
    mirror = await make_mirror(sim.url, toml=EXPIRED)
    await _get(client, mirror.url + TAG_PATH)
    status, headers, body = await _get(client, mirror.url + TAG_PATH)
    assert (status, headers["X-Mirror-Cache"], body) == (200, "revalidated", image.data)
    assert sim.requests[("GET", TAG_PATH)] == 1
    assert sim.requests[("HEAD", TAG_PATH)] == 1
    assert limit.remaining == 99


async def test_moved_tag_fetches_the_new_manifest(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """When the HEAD shows a new digest, the new manifest is fetched, verified and served;
    the old one stays reachable by digest."""
    old, new = make_image(13, [100]), make_image(14, [100])
    sim.add_image(REPO, "1", old)
    mirror = await make_mirror(sim.url, toml=EXPIRED)
    await _get(client, mirror.url + TAG_PATH)
    sim.add_image(REPO, "1", new)
    status, headers, body = await _get(client, mirror.url + TAG_PATH)
    assert (status, body, headers["Docker-Content-Digest"]) == (200, new.data, new.digest)
    await sim.down()
    status, _, body = await _get(client, f"{mirror.url}/v2/{REPO}/manifests/{old.digest}")
    assert (status, body) == (200, old.data)


async def test_stale_tag_served_when_upstream_fails(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Upstream down, 503, 429 or silent past the timeout: a held tag is served stale, with
    headers that say so; an unknown tag gets error JSON with 502/503/429/504."""
    image = make_image(15, [100])
    sim.add_image(REPO, "1", image)
    sim.add_image(REPO, "2", make_image(16, [100]))
    mirror = await make_mirror(sim.url, toml=EXPIRED + "[timeouts]\nread = 0.5\n")
    await _get(client, mirror.url + TAG_PATH)
    cases: list[tuple[dict[str, Any], int, tuple[str, str]]] = [
        ({"kind": "status", "status": 503}, 503, ("UNAVAILABLE", "UPSTREAM_OVERLOADED")),
        ({"kind": "status", "status": 500}, 502, ("UNKNOWN", "UPSTREAM_INVALID")),
        ({"kind": "hang"}, 504, ("UNAVAILABLE", "UPSTREAM_TIMEOUT")),
        # last: a 429 makes the mirror back off from this upstream's manifests (Retry-After)
        (
            {"kind": "status", "status": 429, "headers": {"Retry-After": "30"}},
            429,
            ("TOOMANYREQUESTS", "TOOMANYREQUESTS"),
        ),
    ]
    for options, status_unknown, codes in cases:
        fault = sim.fault("manifest", **options)
        status, headers, body = await _get(client, mirror.url + TAG_PATH)
        assert (status, headers["X-Mirror-Cache"], body) == (200, "stale", image.data)
        assert headers["Warning"].startswith("299 - ") and "stale" in headers["Warning"]
        async with client.get(
            f"{mirror.url}/v2/{REPO}/manifests/2", headers={"Accept": ACCEPT_ALL}
        ) as resp:
            assert resp.status == status_unknown
            assert error_codes(await resp.read()) == codes
        fault.gate.set()
        sim.clear_faults()
    await sim.down()
    status, headers, body = await _get(client, mirror.url + TAG_PATH)
    assert (status, headers["X-Mirror-Cache"]) == (200, "stale")


async def test_pull_budget_floor_and_429_backoff(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Below the budget floor a held tag is served as cached without asking upstream; after a
    429 no manifest request goes upstream until Retry-After has passed: held tags are served
    stale, unknown ones get 429 with Retry-After."""
    limit = sim.rate_limit(limit=100, remaining=10)
    image = make_image(17, [100])
    sim.add_image(REPO, "1", image)
    sim.add_image(REPO, "2", make_image(18, [100]))
    sim.add_image(REPO, "3", make_image(19, [100]))
    mirror = await make_mirror(sim.url, toml=EXPIRED)
    await _get(client, mirror.url + TAG_PATH)  # a real miss: 9 pulls left, below 10
    caplog.set_level(logging.INFO, logger="mirror")
    for _ in range(3):
        status, headers, body = await _get(client, mirror.url + TAG_PATH)
        assert (status, headers["X-Mirror-Cache"], body) == (200, "stale", image.data)
    said = f"pull budget of docker.io low: serving docker.io/{REPO}:1 as cached, unrevalidated"
    assert said in caplog.messages
    assert (sim.requests[("GET", TAG_PATH)], sim.requests[("HEAD", TAG_PATH)]) == (1, 0)
    async with client.get(
        f"{mirror.url}/v2/{REPO}/manifests/2", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        assert resp.status == 200, "what is left of the budget goes to real misses"
    limit.remaining = 0  # upstream now answers 429
    async with client.get(
        f"{mirror.url}/v2/{REPO}/manifests/3", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        assert resp.status == 429
    asked = sim.requests[("GET", f"/v2/{REPO}/manifests/3")]
    async with client.get(
        f"{mirror.url}/v2/{REPO}/manifests/3", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    assert sim.requests[("GET", f"/v2/{REPO}/manifests/3")] == asked, "backing off: not asked again"
    status, headers, _ = await _get(client, mirror.url + TAG_PATH)
    assert (status, headers["X-Mirror-Cache"]) == (200, "stale")


async def test_tag_gone_upstream_is_passed_on_and_blobs_stay(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A 404 on revalidation is passed on (MANIFEST_UNKNOWN) and drops the tag record, but
    the manifest by digest and the blobs stay."""
    image = make_image(17, [2000])
    sim.add_image(REPO, "1", image)
    mirror = await make_mirror(sim.url, toml=EXPIRED)
    await _get(client, mirror.url + TAG_PATH)
    layer = next(d for d in image.blobs)
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{layer}") as resp:
        assert resp.status == 200
    sim.delete_manifest(REPO, "1")
    async with client.get(mirror.url + TAG_PATH, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    await sim.down()
    async with client.get(mirror.url + TAG_PATH, headers={"Accept": ACCEPT_ALL}) as resp:
        # remembered as missing for negative_ttl: not served stale, and upstream not asked
        assert resp.status == 404, "the dropped tag is not served stale"
    status, _, body = await _get(client, f"{mirror.url}/v2/{REPO}/manifests/{image.digest}")
    assert (status, body) == (200, image.data)
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{layer}") as resp:
        assert resp.status == 200


async def test_concurrent_tag_requests_make_one_upstream_call(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Ten clients asking for the same uncached tag at once cause one upstream GET."""
    image = make_image(18, [100])
    sim.add_image(REPO, "1", image)
    hang = sim.fault("manifest", "hang", times=1)
    mirror = await make_mirror(sim.url, toml=FRESH)
    tasks = [asyncio.create_task(_get(client, mirror.url + TAG_PATH)) for _ in range(10)]
    await hang.reached.wait()
    hang.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r[0] == 200 and r[2] == image.data for r in results)
    assert sorted(r[1]["X-Mirror-Cache"] for r in results).count("miss") == 1
    assert sim.requests[("GET", TAG_PATH)] == 1


async def test_manifest_that_does_not_match_its_digest_is_refused(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """An upstream that answers a digest request with other bytes is a lying upstream:
    502, and nothing is stored (the next request asks upstream again)."""
    image = make_image(19, [100])
    sim.add_image(REPO, "1", image)
    other = make_image(20, [100])
    sim.manifests[REPO][image.digest] = (other.data, other.media_type)
    mirror = await make_mirror(sim.url)
    url = f"{mirror.url}/v2/{REPO}/manifests/{image.digest}"
    for _ in range(2):
        async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
            assert resp.status == 502
            assert error_codes(await resp.read()) == ("UNKNOWN", "UPSTREAM_INVALID")
    assert sim.requests[("GET", f"/v2/{REPO}/manifests/{image.digest}")] == 2
    assert sha256_digest(other.data) != image.digest


async def test_tag_lists_paginate_and_serve_stale(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """tags/list passes n/last through, rewrites the Link to the client's name (library/
    prefix), and serves the last answer stale when upstream is down."""
    for tag in ("a", "b", "c"):
        sim.add_image("library/app", tag, make_image(21, [100]))
    mirror = await make_mirror(sim.url, toml=EXPIRED)
    async with client.get(f"{mirror.url}/v2/app/tags/list?n=2") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["a", "b"]
        assert resp.headers["Link"].startswith("</v2/app/tags/list?")
    async with client.get(f"{mirror.url}/v2/app/tags/list?n=2&last=b") as resp:
        assert (await resp.json())["tags"] == ["c"]
    await sim.down()
    async with client.get(f"{mirror.url}/v2/app/tags/list?n=2") as resp:
        assert resp.status == 200
        assert resp.headers["X-Mirror-Cache"] == "stale"
        assert (await resp.json())["tags"] == ["a", "b"]
    async with client.get(f"{mirror.url}/v2/other/tags/list") as resp:
        assert resp.status == 502


async def test_referrers_pass_through_and_unknown_is_error_json(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A registry without the referrers API (the simulator, like distribution 2.8) answers 404:
    the client gets the spec's error JSON (so it falls back to the tag schema), not a raw page."""
    image = make_image(22, [100])
    sim.add_image(REPO, "1", image)
    mirror = await make_mirror(sim.url)
    async with client.get(f"{mirror.url}/v2/{REPO}/referrers/{image.digest}") as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert sim.requests[("GET", f"/v2/{REPO}/referrers/{image.digest}")] == 1
    async with client.get(f"{mirror.url}/v2/{REPO}/referrers/sha256:xyz") as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
