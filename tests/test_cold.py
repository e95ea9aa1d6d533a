"""The cold tier, on a local directory and over the S3 protocol against a real S3-compatible
server on loopback (moto's server mode: pip-installable, speaks S3's REST protocol over real
sockets, starts in a second; no MinIO or Garage in Debian here). Then the tiers: warm
evictions demote to cold, and a cold hit streams to clients while it promotes back to warm,
verified, one cold read for many clients."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest
from conftest import BUCKET, KEYS, MakeMirror, Mirror
from registry import free_port
from test_metrics import _value
from upstream_sim import UpstreamSim

from mirror import errors
from mirror.config import ColdConfig
from mirror.http.app import CACHE
from mirror.oci.reference import Digest, parse_digest
from mirror.store.cold import ColdStore
from mirror.store.layout import object_key

MiB = 1024 * 1024


def _s3(endpoint: str, prefix: str) -> ColdConfig:
    return ColdConfig(url=f"s3://{BUCKET}/{prefix}", endpoint=endpoint, allow_http=True, **KEYS)


@pytest.fixture(params=["file", "s3"])
def cold_config(request: pytest.FixtureRequest, tmp_path: Path) -> ColdConfig:
    if request.param == "file":
        return ColdConfig(url=f"file://{tmp_path}/cold")
    return _s3(request.getfixturevalue("s3_endpoint"), tmp_path.name)


def _data(seed: int, size: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def _digest(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


async def _read(store: ColdStore, digest: Digest) -> tuple[bytes, int]:
    found = await store.open(digest)
    assert found is not None
    chunks = [c async for c in found.chunks()]
    return b"".join(chunks), len(chunks)


async def test_put_read_size_list_delete(cold_config: ColdConfig, tmp_path: Path) -> None:
    store = ColdStore.from_config(cold_config)
    assert store is not None
    small, big = _data(1, 3 * MiB), _data(2, 20 * MiB)
    for data in (small, big):
        path = tmp_path / "src"
        path.write_bytes(data)
        await store.put_file(_digest(data), path)
    body, pieces = await _read(store, _digest(big))
    assert body == big and pieces > 1, "a large blob streams in pieces, never read whole"
    assert await store.size(_digest(small)) == len(small)
    assert sorted([(str(d), n) async for d, n in store.list()]) == sorted(
        [(str(_digest(small)), len(small)), (str(_digest(big)), len(big))]
    )
    absent = _digest(b"absent")
    assert await store.open(absent) is None and await store.size(absent) is None
    await store.delete(_digest(small))
    await store.delete(_digest(small))  # gone already: fine
    assert await store.open(_digest(small)) is None


async def test_failed_upload_leaves_nothing(cold_config: ColdConfig, tmp_path: Path) -> None:
    store = ColdStore.from_config(cold_config)
    assert store is not None
    with pytest.raises(errors.StoreUnavailable):
        await store.put_file(_digest(b"x"), tmp_path / "no-such-file")
    assert [d async for d, _ in store.list()] == []
    assert await store.open(_digest(b"x")) is None


async def test_unreachable_endpoint_is_a_store_error_and_secrets_stay_hidden() -> None:
    config = _s3(f"http://127.0.0.1:{free_port()}", "x")
    store = ColdStore.from_config(config)
    assert store is not None
    with pytest.raises(errors.StoreUnavailable):
        await store.size(_digest(b"y"))
    assert "testing-secret" not in repr(store) + repr(config)


# -- the tiers: demote, then promote -------------------------------------------------------------


def _toml(cold: ColdConfig) -> str:
    lines = [
        f'{k} = "{v}"'
        for k, v in (
            ("url", cold.url),
            ("endpoint", cold.endpoint),
            ("access_key_id", cold.access_key_id),
            ("secret_access_key", cold.secret_access_key),
            ("region", cold.region),
        )
        if v
    ]
    return (
        "[warm]\nmax_bytes = 3145728\nhigh_watermark = 0.9\nlow_watermark = 0.5\nmin_free_bytes = 0\n"
        "[eviction]\ninterval = 3600\n[cold]\n"
        + "\n".join(lines)
        + f"\nallow_http = {'true' if cold.allow_http else 'false'}\n"
    )


async def test_demote_then_promote_round_trip(
    cold_config: ColdConfig,
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
) -> None:
    blobs = [_data(10 + i, MiB) for i in range(3)]
    digests = [sim.add_blob(b) for b in blobs]
    mirror = await make_mirror(sim.url, _toml(cold_config))
    assert mirror.app is not None
    tiers = mirror.app[CACHE]
    for digest in digests:
        async with client.get(f"{mirror.url}/v2/test/cold/blobs/{digest}") as resp:
            assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == "miss"
            await resp.read()
        await mirror.settled()
    await tiers.evictions.evict_pass()
    in_cold = {str(d) for d in await tiers.index.call(tiers.index.digests, "cold")}
    warm = {f"sha256:{p.name}" for p in mirror.blob_files()}
    assert digests[0] in in_cold and digests[0] not in warm, "the oldest blob was demoted"
    # 10 clients of the demoted blob: one cold read, promoted, correct bytes for everyone
    upstream_gets = sum(n for (m, p), n in sim.requests.items() if m == "GET" and "/blobs/" in p)
    bodies = await asyncio.gather(*(_get_body(client, mirror, digests[0]) for _ in range(10)))
    assert all(b == blobs[0] for b in bodies)
    assert (
        sum(n for (m, p), n in sim.requests.items() if m == "GET" and "/blobs/" in p)
        == upstream_gets
    )
    await mirror.settled()
    assert digests[0] in {f"sha256:{p.name}" for p in mirror.blob_files()}, "promoted back to warm"
    async with client.get(f"{mirror.url}/metrics") as resp:
        text = await resp.text()
    assert (
        _value(text, "mirror_blob_lookups_total", source="cold") == 10
    )  # all from the one promotion
    assert _value(text, "mirror_blob_lookups_total", source="upstream") == 3
    assert _value(text, "mirror_evictions_total", tier="warm", reason="budget") >= 1
    assert _value(text, "mirror_tier_objects", tier="cold") >= 1
    assert _value(text, "mirror_blob_bytes_served_total", source="cold") >= MiB


async def _get_body(client: aiohttp.ClientSession, mirror: Mirror, digest: str) -> bytes:
    async with client.get(f"{mirror.url}/v2/test/cold/blobs/{digest}") as resp:
        assert resp.status == 200
        return await resp.read()


async def test_a_corrupt_cold_copy_is_never_served(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Cold bytes are verified like upstream ones: a flipped byte in the cold copy fails that
    promotion (no client gets wrong bytes as a success) and nothing wrong lands in warm."""
    cold = ColdConfig(url=f"file://{tmp_path}/cold")
    data = _data(30, MiB)
    digest = sim.add_blob(data)
    others = [sim.add_blob(_data(31 + i, MiB)) for i in range(2)]
    mirror = await make_mirror(sim.url, _toml(cold))
    assert mirror.app is not None
    tiers = mirror.app[CACHE]
    for d in (digest, *others):
        await _get_body(client, mirror, d)
        await mirror.settled()
    await tiers.evictions.evict_pass()
    obj = tmp_path / "cold" / object_key(parse_digest(digest))
    assert obj.exists()
    raw = bytearray(obj.read_bytes())
    raw[1000] ^= 0xFF
    obj.write_bytes(bytes(raw))
    try:
        async with client.get(f"{mirror.url}/v2/test/cold/blobs/{digest}") as resp:
            ok = resp.status == 200 and await resp.read() == data
    except aiohttp.ClientPayloadError:
        ok = False
    assert not ok, "the corrupt cold copy failed the transfer"
    await mirror.settled()
    assert not obj.exists() and parse_digest(digest) not in await tiers.index.call(
        tiers.index.digests, "cold"
    )
    before = sim.requests[("GET", f"/v2/test/cold/blobs/{digest}")]
    assert await _get_body(client, mirror, digest) == data  # from upstream now
    assert sim.requests[("GET", f"/v2/test/cold/blobs/{digest}")] == before + 1
    await mirror.settled()
    for p in mirror.blob_files():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name


async def test_cold_keeps_its_budget_and_max_idle(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cold = ColdConfig(url=f"file://{tmp_path}/cold")
    digests = [sim.add_blob(_data(40 + i, MiB)) for i in range(5)]
    toml = _toml(cold).replace("allow_http", "max_bytes = 3145728\nmax_idle = 3600\nallow_http")
    mirror = await make_mirror(sim.url, toml)
    assert mirror.app is not None
    tiers = mirror.app[CACHE]
    for d in digests:
        await _get_body(client, mirror, d)
        await mirror.settled()
        await tiers.evictions.evict_pass()
    in_cold = {str(d) for d in await tiers.index.call(tiers.index.digests, "cold")}
    assert len(in_cold) * MiB <= 3 * MiB * 0.9, "cold stays within its budget"
    assert in_cold, "warm evictions went to cold"
    # one cold blob has not been used for two hours: past max_idle, it goes
    idle = sorted(in_cold)[0]
    await tiers.index.call(
        lambda: tiers.index.db.execute(
            "UPDATE blobs SET last_access = 0 WHERE digest = ? AND tier = 'cold'", (idle,)
        )
    )
    await tiers.evictions.evict_pass()
    assert parse_digest(idle) not in await tiers.index.call(tiers.index.digests, "cold")
    assert not (tmp_path / "cold" / object_key(parse_digest(idle))).exists()
