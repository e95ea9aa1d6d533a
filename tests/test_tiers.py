"""Tiers: the hot LRU, eviction policies, warm budgets and watermarks, pins, blobs in use, and
the index surviving a restart. Real mirrors over real sockets; eviction passes are driven
directly (or woken by a fill and awaited by polling), never waited for with sleeps."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeMirror, Mirror, MirrorProcess
from images import make_image, make_index
from upstream_sim import UpstreamSim

from mirror.cache import Cache
from mirror.config import RetentionRule
from mirror.eviction.policy import expired_tags, plan, target_bytes
from mirror.http.app import CACHE
from mirror.oci.reference import parse_digest
from mirror.policies import GDSF, LFU, LRU, Policy
from mirror.store.hot import OVERHEAD, HotTier
from mirror.store.index import BlobIndex, Entry

MiB = 1024 * 1024
REPO = "test/tiers"


def _blob(seed: int, size: int = MiB) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def _tiers(mirror: Mirror) -> Cache:
    assert mirror.app is not None
    return mirror.app[CACHE]


async def _get(
    client: aiohttp.ClientSession, mirror: Mirror, digest: str, repo: str = REPO
) -> bytes:
    async with client.get(f"{mirror.url}/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return body


async def _fill(client: aiohttp.ClientSession, mirror: Mirror, digest: str) -> None:
    """GET a blob and wait until its fill has been committed and recorded in the index."""
    await _get(client, mirror, digest)
    await mirror.settled()


def _warm_files(mirror: Mirror) -> set[str]:
    return {f"sha256:{p.name}" for p in mirror.blob_files()}


# -- pure parts ------------------------------------------------------------------------------


def _entry(name: str, size: int = 10, last: float = 0.0, hits: int = 0) -> Entry:
    return Entry(name, size, 0.0, last, hits)


def test_policies_order_victims() -> None:
    old_big = _entry("old-big", size=1000, last=1, hits=5)
    new_small = _entry("new-small", size=10, last=3, hits=0)
    mid_popular = _entry("mid-popular", size=10, last=2, hits=50)
    entries = [new_small, old_big, mid_popular]
    assert [e.digest for e in LRU.order(entries)] == ["old-big", "mid-popular", "new-small"]
    assert [e.digest for e in LFU.order(entries)] == ["new-small", "old-big", "mid-popular"]
    # size-aware: the big blob has the least value per byte
    assert [e.digest for e in GDSF.order(entries)] == ["old-big", "new-small", "mid-popular"]


@pytest.mark.parametrize("policy", [LRU, LFU, GDSF], ids=lambda p: p.name)
def test_the_index_streams_candidates_in_the_policys_own_order(
    policy: Policy, tmp_path: Path
) -> None:
    rng = random.Random(7)
    index = BlobIndex(tmp_path / "index.sqlite")
    entries = [
        Entry(
            parse_digest(f"sha256:{i:064x}"),
            rng.randint(1, 10**9),
            0.0,
            rng.random() * 1000,
            rng.randint(0, 50),
        )
        for i in range(500)
    ]
    index.record_many((e.digest, "warm", e.size, e.last_access) for e in entries)
    index.touch("warm", {e.digest: (e.last_access, e.hits) for e in entries})
    assert [e.digest for e in index.ordered("warm", policy.sql)] == [
        e.digest for e in policy.order(entries)
    ]
    index._close()


def test_plan_stops_at_target_skips_protected_and_is_bounded() -> None:
    entries = [_entry(f"b{i}", size=10, last=i) for i in range(10)]
    ordered = LRU.order(entries)
    victims = plan(iter(ordered), used=100, target=70, protected={"b1"}, max_victims=100)
    assert [e.digest for e in victims] == ["b0", "b2", "b3"]
    assert len(plan(iter(ordered), used=100, target=0, protected=set(), max_victims=4)) == 4
    assert plan(iter(ordered), used=50, target=70, protected=set(), max_victims=100) == []


def test_target_bytes_watermarks_and_free_space_floor() -> None:
    assert target_bytes(used=80, budget=100, free=10**9, min_free=0, high=0.9, low=0.7) is None
    assert target_bytes(used=95, budget=100, free=10**9, min_free=0, high=0.9, low=0.7) == 70
    # no byte budget, but the filesystem is short of its free-space floor by 30
    assert (
        target_bytes(used=1000, budget=0, free=70, min_free=100, high=0.9, low=0.7)
        == 1000 - 30 - 200
    )


def test_hot_tier_is_lru_within_its_byte_budget() -> None:
    hot = HotTier(budget=3 * (100 + OVERHEAD))
    for key in "abc":
        hot.put(key, key.upper(), 100)
    assert hot.get("a") == "A"  # a is now the most recently used
    hot.put("d", "D", 100)  # over budget: b, the least recently used, goes
    assert hot.get("b") is None
    assert [hot.get(k) for k in "acd"] == ["A", "C", "D"]
    assert hot.used <= hot.budget
    hot.put("huge", "X", 10 * 100)  # larger than the whole budget: not kept, nothing lost
    assert hot.get("huge") is None and len(hot) == 3


# -- warm budget, LRU, pins, blobs in use ------------------------------------------------------

WARM = """
[warm]
max_bytes = {budget}
high_watermark = 0.9
low_watermark = {low}
min_free_bytes = 0
[eviction]
interval = 3600
"""


async def test_budget_holds_under_fills_larger_than_it(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Ten 1 MiB blobs through a 3 MiB warm tier: after each fill's pass, warm is within
    budget, the index agrees with the files, and the newest blob is always kept."""
    digests = [sim.add_blob(_blob(i)) for i in range(10)]
    mirror = await make_mirror(sim.url, WARM.format(budget=3 * MiB, low=0.7))
    tiers = _tiers(mirror)
    for digest in digests:
        await _fill(client, mirror, digest)
        await tiers.evictions.evict_pass()
        files = _warm_files(mirror)
        assert sum(p.stat().st_size for p in mirror.blob_files()) <= 3 * MiB
        assert digest in files
        assert files == {str(d) for d in await tiers.index.call(tiers.index.digests, "warm")}
    assert (
        sum(
            n for (method, path), n in sim.requests.items() if method == "GET" and "/blobs/" in path
        )
        == 10
    )


async def test_fill_over_high_watermark_wakes_the_evictor(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """The third 1 MiB blob takes warm past 0.9 × 3 MiB: the background evictor (whose timer
    is an hour) runs at once and takes warm down to 0.5 × 3 MiB."""
    digests = [sim.add_blob(_blob(i)) for i in range(3)]
    mirror = await make_mirror(sim.url, WARM.format(budget=3 * MiB, low=0.5))
    for digest in digests:
        await _fill(client, mirror, digest)
    deadline = time.monotonic() + 10
    while sum(p.stat().st_size for p in mirror.blob_files()) > 0.5 * 3 * MiB:
        assert time.monotonic() < deadline, "the evictor was not woken by the fill"
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline


async def test_lru_keeps_the_recently_hit(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    a, b, c, d = (sim.add_blob(_blob(i)) for i in range(4))
    mirror = await make_mirror(sim.url, WARM.format(budget=int(3.5 * MiB), low=0.6))
    tiers = _tiers(mirror)
    for digest in (a, b, c):
        await _fill(client, mirror, digest)
    await tiers.evictions.evict_pass()
    assert _warm_files(mirror) == {a, b, c}  # 3 MiB is under the high watermark
    await _get(client, mirror, a)  # a hit: a is now the most recently used
    await _fill(client, mirror, d)
    await tiers.evictions.evict_pass()  # (or the one the fill woke: passes queue)
    assert _warm_files(mirror) == {a, d}
    # evicted blobs come back from upstream, correct, when asked again
    await _get(client, mirror, b)
    assert sim.requests[("GET", f"/v2/{REPO}/blobs/{b}")] == 2


async def test_pinned_images_and_blobs_in_use_survive(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    pinned = make_index(
        {
            "amd64": make_image(71, [300_000, 400_000]),
            "arm64": make_image(72, [500_000], arch="arm64"),
        }
    )
    sim.add_image("test/pinned", "stable", pinned)
    others = [sim.add_blob(_blob(i)) for i in range(5)]
    toml = 'pins = ["docker.io/test/pinned:st*"]\n' + WARM.format(budget=4 * MiB, low=0.25)
    mirror = await make_mirror(sim.url, toml)
    tiers = _tiers(mirror)
    accept = {
        "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    }
    async with client.get(f"{mirror.url}/v2/test/pinned/manifests/stable", headers=accept) as resp:
        assert resp.status == 200
    for child in pinned.children:
        async with client.get(
            f"{mirror.url}/v2/test/pinned/manifests/{child.digest}", headers=accept
        ) as resp:
            assert resp.status == 200
    pinned_blobs = set(pinned.all_blobs())
    for digest in pinned_blobs:
        await _get(client, mirror, digest, "test/pinned")
    await mirror.settled()
    for digest in others[:2]:
        await _fill(client, mirror, digest)
    # one blob is being sent right now: held open, as a slow client's transfer would hold it
    in_use = await tiers.tiers.open(parse_digest(others[0]))
    assert in_use is not None
    await _fill(client, mirror, others[2])  # past the high watermark: evict down to 1 MiB
    await tiers.evictions.evict_pass()
    files = _warm_files(mirror)
    assert pinned_blobs <= files
    assert others[0] in files
    assert not {others[1], others[2]} & files
    in_use.blob.close()  # the transfer ends: others[0] may go now
    for digest in others[3:]:
        await _fill(client, mirror, digest)
    await tiers.evictions.evict_pass()
    assert _warm_files(mirror) == pinned_blobs


# -- restart ------------------------------------------------------------------------------------


def _index_rows(data_dir: Path) -> dict[str, tuple[str, int, int]]:
    with sqlite3.connect(data_dir / "index.sqlite") as db:
        return {
            d: (t, s, h) for d, t, s, h in db.execute("SELECT digest, tier, size, hits FROM blobs")
        }


async def test_restart_keeps_the_index_and_reconciles_it_with_the_files(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    a, b = sim.add_blob(_blob(1)), sim.add_blob(_blob(2))
    data = tmp_path / "data"
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    a_file = data / "blobs" / "sha256" / a[7:9] / a[7:]
    for _ in range(3):
        async with client.get(f"{proc.url}/v2/{REPO}/blobs/{a}") as resp:
            assert resp.status == 200
            await resp.read()
        deadline = time.monotonic() + 10
        while not a_file.exists():  # committed (fsync, rename) just after the client's last byte
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    async with client.get(f"{proc.url}/v2/{REPO}/blobs/{b}") as resp:
        await resp.read()
    await asyncio.to_thread(proc.stop)
    rows = _index_rows(data)
    assert rows[a] == ("warm", MiB, 2)  # the first GET was the fill, then two hits
    assert rows[b] == ("warm", MiB, 0)
    # behind the mirror's back: b's file goes, an unindexed file appears (a crash between
    # commit and record)
    (data / "blobs" / "sha256" / b[7:9] / b[7:]).unlink()
    c = sim.add_blob(_blob(3))
    c_path = data / "blobs" / "sha256" / c[7:9] / c[7:]
    c_path.parent.mkdir(parents=True, exist_ok=True)
    c_path.write_bytes(_blob(3))
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    async with client.get(f"{proc.url}/v2/{REPO}/blobs/{c}") as resp:
        assert resp.headers["X-Mirror-Cache"] == "hit"
        await resp.read()
    await asyncio.to_thread(proc.stop)
    rows = _index_rows(data)
    assert set(rows) == {a, c}
    assert rows[a][2] == 2 and rows[c][:2] == ("warm", MiB)
    assert not os.listdir(data / "tmp")


# -- retention ----------------------------------------------------------------------------------


def test_retention_rules_pick_tags_past_keep_and_idle() -> None:
    pulled = {
        ("docker.io", "library/app", "1"): 100.0,
        ("docker.io", "library/app", "2"): 300.0,
        ("docker.io", "library/app", "3"): 200.0,
        ("docker.io", "other/db", "x"): 10.0,
        ("ghcr.io", "acme/tool", "old"): 0.0,
    }
    rules = (
        RetentionRule("docker.io/library/*", keep_tags=2),
        RetentionRule("docker.io/*", max_idle=50),
        RetentionRule("docker.io/library/*", max_idle=1),
    )  # shadowed by the first
    assert expired_tags(pulled, rules, now=400.0) == {
        ("docker.io", "library/app", "1"),
        ("docker.io", "other/db", "x"),
    }


async def test_retention_keeps_the_newest_tags_and_frees_what_only_old_tags_held(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    old, new = make_image(81, [300_000]), make_image(82, [400_000])
    sim.add_image("test/app", "old", old)
    sim.add_image("test/app", "new", new)
    toml = '[[retention]]\npattern = "docker.io/test/*"\nkeep_tags = 1\n' + WARM.format(
        budget=100 * MiB, low=0.5
    )
    mirror = await make_mirror(sim.url, toml)
    tiers = _tiers(mirror)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for tag, image in (("old", old), ("new", new)):
        async with client.get(f"{mirror.url}/v2/test/app/manifests/{tag}", headers=accept) as resp:
            assert resp.status == 200
        for digest in image.blobs:
            await _get(client, mirror, digest, "test/app")
    await mirror.settled()
    assert set(old.blobs) | set(new.blobs) <= _warm_files(mirror)
    report = await tiers.evictions.evict_pass()
    assert report.expired_tags == 1
    files = _warm_files(mirror)
    assert set(new.blobs) <= files and not set(old.blobs) & files
    # the expired tag is no longer cached: the next pull asks upstream again and works
    before = sim.requests[("GET", "/v2/test/app/manifests/old")]
    async with client.get(f"{mirror.url}/v2/test/app/manifests/old", headers=accept) as resp:
        assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "miss"
    assert sim.requests[("GET", "/v2/test/app/manifests/old")] == before + 1
