"""Upstream retries: a blob body that breaks off resumes with Range from where it stopped
(verified end to end), transient failures are tried again with back-off, and a trickle below
`timeouts.min_rate` is treated as a stall. Nothing wrong is ever kept."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
from conftest import MakeMirror, error_codes, wait_until
from upstream_sim import UpstreamSim

from mirror.http.app import METRICS

SIZE = 4 * 1024 * 1024 + 777
REPO = "test/resume"
FAST = "[retries]\nbackoff = 0.01\nmax_backoff = 0.05\n"


def _blob(seed: int, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + os.urandom(size % 32)


def _path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


async def _get(client: aiohttp.ClientSession, url: str) -> bytes | None:
    """The body of a complete 200 answer, or None for an error status or a cut transfer."""
    try:
        async with client.get(url) as resp:
            return await resp.read() if resp.status == 200 else None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        return None


def _ranges(sim: UpstreamSim, digest: str) -> list[str | None]:
    """The Range header of each upstream GET of the blob, in order (None: the whole blob)."""
    return [
        seen.headers.get("Range")
        for seen in sim.log
        if seen.method == "GET" and seen.path == _path(digest)
    ]


def _retries(mirror_app: object, reason: str) -> float:
    metrics = mirror_app[METRICS]  # type: ignore[index]
    return float(metrics.total("mirror_upstream_retries_total", reason=reason))


async def test_cut_body_resumes_with_range_and_every_client_gets_the_blob(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Upstream cuts the body a third of the way in: the fill asks again with
    `Range: bytes=<received>-`, appends, verifies the whole, commits; the leader and its
    followers all get the right blob, as one transfer each."""
    data = _blob(1)
    digest = sim.add_blob(data)
    part = SIZE // 3
    cut = sim.fault(digest, "cut", part=part, times=1, hold=True)
    mirror = await make_mirror(sim.url, toml=FAST)
    clients = asyncio.gather(*(_get(client, mirror.url + _path(digest)) for _ in range(4)))
    await cut.reached.wait()
    # the cut comes once the mirror has read what was sent (bytes still buffered when a
    # connection breaks are lost to the reader, and the resume would start earlier)
    metrics = mirror.app[METRICS]  # type: ignore[index]
    await wait_until(lambda: metrics.total("mirror_upstream_bytes_total") >= part)
    cut.gate.set()
    assert all(body == data for body in await clients)
    assert _ranges(sim, digest) == [None, f"bytes={part}-"]
    await mirror.settled()
    assert len(mirror.blob_files()) == 1 and mirror.partial_files() == []
    assert _retries(mirror.app, "resume") == 1


async def test_upstream_that_ignores_range_still_resumes(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """An upstream that answers the resumed request with a plain 200 (the whole blob): the
    bytes already held are skipped, and the result still verifies."""
    data = _blob(2)
    digest = sim.add_blob(data)
    sim.ranges = False
    part = SIZE // 2
    cut = sim.fault(digest, "cut", part=part, times=1, hold=True)
    mirror = await make_mirror(sim.url, toml=FAST)
    fetch = asyncio.ensure_future(_get(client, mirror.url + _path(digest)))
    await cut.reached.wait()
    metrics = mirror.app[METRICS]  # type: ignore[index]
    await wait_until(lambda: metrics.total("mirror_upstream_bytes_total") >= part)
    cut.gate.set()
    assert await fetch == data
    assert _ranges(sim, digest) == [None, f"bytes={part}-"]
    await mirror.settled()
    assert len(mirror.blob_files()) == 1


async def test_resumed_bytes_that_differ_are_caught_and_nothing_is_kept(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """The first connection is cut, the resumed one sends a flipped byte: the digest check
    over the whole fails, no client gets a complete answer, nothing is kept, and the next
    request fetches afresh and succeeds."""
    data = _blob(3)
    digest = sim.add_blob(data)
    sim.fault(digest, "cut", part=SIZE // 3, times=1)
    sim.fault(digest, "wrong", times=1)
    mirror = await make_mirror(sim.url, toml=FAST)
    url = mirror.url + _path(digest)
    assert await asyncio.gather(*(_get(client, url) for _ in range(3))) == [None, None, None]
    await mirror.settled()
    assert mirror.blob_files() == [] and mirror.partial_files() == []
    metrics = mirror.app[METRICS]  # type: ignore[index]
    assert metrics.total("mirror_digest_mismatches_total", source="upstream") == 1
    assert await _get(client, url) == data


async def test_a_cut_that_keeps_coming_is_given_up(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Every connection breaks after a few bytes: three tries in all (`retries.attempts`),
    then the fill fails; nothing is kept and the mirror keeps serving."""
    data = _blob(4)
    digest = sim.add_blob(data)
    sim.fault(digest, "cut", part=1000)
    mirror = await make_mirror(sim.url, toml=FAST)
    assert await _get(client, mirror.url + _path(digest)) is None
    ranges = _ranges(sim, digest)
    assert len(ranges) == 3 and ranges[0] is None  # (a cut may come before any byte: no Range)
    await mirror.settled()
    assert mirror.blob_files() == [] and mirror.partial_files() == []
    sim.clear_faults()
    assert await _get(client, mirror.url + _path(digest)) == data


async def test_trickle_below_min_rate_is_a_stall(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A body that keeps arriving, but at about 2 KB/s against a floor of 64 KiB/s: each
    connection is given up after `rate_window`, resumed once, then the fill fails (the read
    timeout alone would never fire). Nothing is kept; at full speed the blob then comes."""
    data = _blob(5)
    digest = sim.add_blob(data)
    trickle = sim.fault(digest, "trickle", part=10_000, step=100, interval=0.05)
    toml = (
        FAST.replace("[retries]\n", "[retries]\nattempts = 2\n")
        + '[timeouts]\nmin_rate = "64KiB"\nrate_window = 0.3\n'
    )
    mirror = await make_mirror(sim.url, toml=toml)
    assert await _get(client, mirror.url + _path(digest)) is None
    assert len(_ranges(sim, digest)) == 2 and trickle.hits == 2
    await mirror.settled()
    assert mirror.blob_files() == [] and mirror.partial_files() == []
    trickle.gate.set()
    sim.clear_faults()
    assert await _get(client, mirror.url + _path(digest)) == data


async def test_transient_statuses_and_refusals_are_tried_again(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Two 503s, then success: the client gets the blob. A Retry-After longer than
    `max_backoff` is not waited for: that 503 goes to the client at once. A refused
    connection is tried three times before the client gets 502."""
    data = _blob(6, 10_000)
    digest = sim.add_blob(data)
    flaky = sim.fault(digest, "status", status=503, times=2)
    mirror = await make_mirror(sim.url, toml=FAST)
    assert await _get(client, mirror.url + _path(digest)) == data
    assert flaky.hits == 2 and len(_ranges(sim, digest)) == 3
    assert _retries(mirror.app, "status") == 2

    other = sim.add_blob(_blob(7, 10_000))
    busy = sim.fault(other, "status", status=503, headers={"Retry-After": "3600"})
    async with client.get(mirror.url + _path(other)) as resp:
        assert resp.status == 503
        assert error_codes(await resp.read()) == ("UNAVAILABLE", "UPSTREAM_OVERLOADED")
    assert busy.hits == 1
    sim.clear_faults()

    await sim.down()
    async with client.get(mirror.url + _path(other)) as resp:
        assert resp.status == 502
        assert error_codes(await resp.read()) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
    assert _retries(mirror.app, "connection") == 2
    await sim.up()
    assert await _get(client, mirror.url + _path(digest)) == data
