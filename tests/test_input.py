"""Hostile and odd input at the HTTP edge: writes, malformed names/tags/digests, path
traversal (raw and percent-encoded), Range and HEAD semantics, and a property-based fuzz.

Every refusal must be a 4xx carrying the OCI error JSON, never a 5xx, and must be decided
locally: the upstream receives nothing for it. Raw paths are sent unnormalised with
`yarl.URL(..., encoded=True)` (aiohttp) or `http.client` (the fuzz).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import random
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import aiohttp
import pytest
import yarl
from conftest import MakeMirror, MirrorProcess, error_codes, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import ACCEPT_ALL, Image, Upstream, build_images
from upstream_sim import UpstreamSim

IMAGE: Image = build_images()["test/single:1"]
HEX = "a" * 64

#: The mirror's own codes a refused malformed or hostile request may carry.
REFUSAL_CODES = {
    "NAME_INVALID",
    "TAG_INVALID",
    "MANIFEST_UNKNOWN",
    "DIGEST_INVALID",
    "NAME_UNKNOWN",
    "NOT_FOUND",
}

# The OCI distribution spec grammar, written out independently of mirror.oci.reference.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
SPEC_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
SPEC_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def _tag_or_digest(ref: str) -> bool:
    return bool(SPEC_TAG.fullmatch(ref) or SPEC_DIGEST.fullmatch(ref))


def _digest(ref: str) -> bool:
    return bool(SPEC_DIGEST.fullmatch(ref))


def _anything(ref: str) -> bool:
    return True


ENDPOINT_GRAMMAR: list[tuple[str, Callable[[str], bool]]] = [
    (r"(.+)/manifests/([^/]+)", _tag_or_digest),
    (r"(.+)/blobs/([^/]+)", _digest),
    (r"(.+)/referrers/([^/]+)", _digest),
    (r"(.+)/tags/list()", _anything),
]


def spec_valid_tail(tail: str) -> bool:
    """Whether `<tail>` after `/v2/` is a well-formed pull endpoint for a valid name/reference
    (the only requests that may ever cause upstream traffic)."""
    for pattern, ref_ok in ENDPOINT_GRAMMAR:
        m = re.fullmatch(pattern, tail, re.DOTALL)
        if m and SPEC_NAME.fullmatch(m[1]) and len(m[1]) <= 255 and ref_ok(m[2]):
            return True
    return False


def upstream_path_ok(path: str) -> bool:
    """Whether a path the upstream received is a spec-valid pull request (or auth/ping)."""
    return path in ("/v2/", "/token") or (path.startswith("/v2/") and spec_valid_tail(path[4:]))


def raw(base: str, path: str) -> yarl.URL:
    """A URL whose path is sent byte for byte (no normalisation, no re-encoding)."""
    return yarl.URL(base + path, encoded=True)


# -- writes ----------------------------------------------------------------------------------


WRITES = [
    ("POST", "/v2/x/blobs/uploads/"),
    ("POST", f"/v2/x/blobs/uploads/?digest=sha256:{HEX}"),
    ("POST", f"/v2/x/blobs/uploads/?mount=sha256:{HEX}&from=y"),
    ("PATCH", "/v2/x/blobs/uploads/0b5e7c9e-1111-2222-3333-444455556666"),
    ("PUT", f"/v2/x/blobs/uploads/0b5e7c9e-1111-2222-3333-444455556666?digest=sha256:{HEX}"),
    ("PUT", "/v2/x/manifests/1"),
    ("PUT", f"/v2/x/manifests/sha256:{HEX}"),
    ("DELETE", "/v2/x/manifests/1"),
    ("DELETE", f"/v2/x/manifests/sha256:{HEX}"),
    ("DELETE", f"/v2/x/blobs/sha256:{HEX}"),
    ("PATCH", "/v2/x/manifests/1"),
    ("PUT", "/v2/sim.example/x/manifests/1"),
    ("DELETE", "/v2/x/manifests/1?ns=docker.io"),
    ("POST", "/v2/x/tags/list"),
    ("OPTIONS", "/v2/x/manifests/1"),
    ("DELETE", "/v2/"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_writes_are_refused_405_unsupported(
    method: str, path: str, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Push, delete and every other non-read method is 405 UNSUPPORTED (read-only mirror),
    with or without a body, and nothing reaches the upstream."""
    sim.add_image("library/x", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=f'[upstreams."sim.example"]\nurl = "{sim.url}"\n')
    async with client.request(
        method, raw(mirror.url, path), data=IMAGE.data, headers={"Content-Type": IMAGE.media_type}
    ) as resp:
        body = await resp.read()
        assert resp.status == 405, body
        assert error_codes(body) == ("UNSUPPORTED", "UNSUPPORTED")
    assert sum(sim.requests.values()) == 0
    async with client.get(f"{mirror.url}/v2/x/manifests/1", headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200  # nothing was deleted or replaced
        assert await resp.read() == IMAGE.data


# -- malformed names, tags, digests, traversal -----------------------------------------------


LONG = "a" * 300
MALFORMED = [
    # names
    ("/v2/UPPER/manifests/1", {"NAME_INVALID"}),
    ("/v2/Team/app/manifests/1", {"NAME_INVALID"}),
    ("/v2/a//b/manifests/1", {"NAME_INVALID"}),
    ("/v2/-a/manifests/1", {"NAME_INVALID"}),
    ("/v2/a-/manifests/1", {"NAME_INVALID"}),
    ("/v2/a..b/manifests/1", {"NAME_INVALID"}),
    ("/v2/a/./b/manifests/1", {"NAME_INVALID"}),
    (f"/v2/{LONG}/manifests/1", {"NAME_INVALID"}),
    (f"/v2/team/{LONG}/blobs/sha256:{HEX}", {"NAME_INVALID"}),
    ("/v2/a%20b/manifests/1", {"NAME_INVALID"}),
    ("/v2/a%00b/manifests/1", {"NAME_INVALID"}),
    ("/v2/caf%C3%A9/manifests/1", {"NAME_INVALID"}),
    # tags
    ("/v2/a/manifests/-bad", {"TAG_INVALID"}),
    ("/v2/a/manifests/.bad", {"TAG_INVALID"}),
    (f"/v2/a/manifests/{'t' * 200}", {"TAG_INVALID"}),
    ("/v2/a/manifests/1%00", {"TAG_INVALID"}),
    ("/v2/a/manifests/a%20b", {"TAG_INVALID"}),
    # digests, as manifest references and as blobs
    ("/v2/a/manifests/sha256:xyz", {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:xyz", {"DIGEST_INVALID"}),
    (f"/v2/a/blobs/sha256:{'a' * 63}", {"DIGEST_INVALID"}),
    (f"/v2/a/blobs/sha256:{'a' * 65}", {"DIGEST_INVALID"}),
    (f"/v2/a/manifests/sha256:{'a' * 63}", {"DIGEST_INVALID"}),
    ("/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", {"DIGEST_INVALID"}),
    (f"/v2/a/blobs/sha256:{'A' * 64}", {"DIGEST_INVALID"}),
    (f"/v2/a/manifests/sha256:{'A' * 64}", {"DIGEST_INVALID"}),
    ("/v2/a/blobs/sha256:", {"DIGEST_INVALID"}),
    ("/v2/a/blobs/1", {"DIGEST_INVALID"}),
    (f"/v2/a/referrers/sha256:{'g' * 64}", {"DIGEST_INVALID"}),
    # traversal, raw and percent-encoded, in every segment
    ("/v2/../../etc/passwd", REFUSAL_CODES),
    ("/v2/../v2/a/manifests/1", REFUSAL_CODES),
    ("/v2/a/../../manifests/1", REFUSAL_CODES),
    (f"/v2/a/../../blobs/sha256:{HEX}", REFUSAL_CODES),
    ("/v2/a/manifests/..", REFUSAL_CODES),
    ("/v2/a/manifests/..%2F..%2Fetc", REFUSAL_CODES),
    ("/v2/a/manifests/..%2f..%2f..%2fmeta", REFUSAL_CODES),
    ("/v2/a/manifests/%2e%2e", REFUSAL_CODES),
    ("/v2/a/manifests/%2E%2E%2F%2E%2E", REFUSAL_CODES),
    (f"/v2/%2e%2e/blobs/sha256:{HEX}", REFUSAL_CODES),
    (f"/v2/%2e%2e/%2e%2e/blobs/sha256:{HEX}", REFUSAL_CODES),
    ("/v2/a%2F..%2F..%2Fb/manifests/1", REFUSAL_CODES),
    ("/v2/a/blobs/..", REFUSAL_CODES),
    ("/v2/a/blobs/..%2f..%2fmeta", REFUSAL_CODES),
    ("/v2/a/blobs/sha256:..%2F..", REFUSAL_CODES),
    (f"/v2/a/blobs/sha256:..%2F..%2F{'a' * 58}", REFUSAL_CODES),
    (f"/v2/a/blobs/sha256%3A..%2F{HEX}", REFUSAL_CODES),
    (f"/v2/a/blobs/..%5c..%5c{HEX}", REFUSAL_CODES),
    ("/v2/a/tags/list/..", REFUSAL_CODES),
    ("/v2/a/tags/..%2Flist", REFUSAL_CODES),
    (f"/v2/a/referrers/..%2Fsha256:{HEX}", REFUSAL_CODES),
    ("/v2/sim.example/../x/manifests/1", REFUSAL_CODES),
    ("/v2/sim.example/..%2F..%2Fv2/manifests/1", REFUSAL_CODES),
    ("/v2/sim.example%2F..%2Fx/manifests/1", REFUSAL_CODES),
    ("/v2/a/manifests/1?ns=..%2F..%2Fetc", REFUSAL_CODES),
    ("/v2/a/manifests/1?ns=sim.example%2F..", REFUSAL_CODES),
    ("/v2/a/manifests/%zz", REFUSAL_CODES),
    ("/v2/%/manifests/1", REFUSAL_CODES),
    ("/v2/a/unknown/1", {"NOT_FOUND"}),
    ("/v2/a/manifests", {"NOT_FOUND"}),
    ("/v2/a/manifests/", {"NOT_FOUND"}),
    ("/v2/a/blobs/", {"NOT_FOUND"}),
]


async def test_malformed_and_traversal_paths_are_refused_locally(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Every malformed name, tag, digest and traversal attempt (raw and percent-encoded, in
    every path segment and in `ns`) gets a 4xx (400 or 404) with error JSON carrying an
    expected code, GET and HEAD alike; the upstream receives nothing, nothing is written to
    the store, and afterwards the mirror still serves `/v2/` and a real manifest."""
    sim.add_image("library/a", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=f'[upstreams."sim.example"]\nurl = "{sim.url}"\n')
    failures: list[str] = []
    for path, codes in MALFORMED:
        async with client.get(raw(mirror.url, path)) as resp:
            body = await resp.read()
            if resp.status not in (400, 404):
                failures.append(f"GET {path}: {resp.status} {body[:200]!r}")
                continue
            try:
                code = error_codes(body)[1]  # the mirror's own, more specific
            except (ValueError, KeyError, AssertionError):
                failures.append(f"GET {path}: no error JSON: {body[:200]!r}")
                continue
            if code not in codes:
                failures.append(f"GET {path}: code {code}, expected one of {sorted(codes)}")
        async with client.head(raw(mirror.url, path)) as resp:
            if resp.status not in (400, 404):
                failures.append(f"HEAD {path}: {resp.status}")
    assert failures == []
    assert sim.log == []
    assert mirror.blob_files() == []
    async with client.get(f"{mirror.url}/v2/") as resp:
        assert resp.status == 200
    async with client.get(f"{mirror.url}/v2/a/manifests/1", headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200
        assert await resp.read() == IMAGE.data
    assert sim.log != []
    assert {s.path for s in sim.log} == {"/v2/library/a/manifests/1"}


async def test_one_word_name_too_long_with_library_prefix_is_refused(
    upstream: Upstream, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A one-word name of 250 characters is within the 255 limit, but Docker Hub's rule turns
    it into `library/<name>` (258 characters), which no registry accepts (the reference
    registry answers 500). The mirror must refuse it itself (400 NAME_INVALID) rather than
    send an invalid name upstream (checked with the simulator) and relay the failure as a 5xx
    (checked with the real registry)."""
    name = "a" * 250
    for upstream_url in (upstream.url, sim.url):
        mirror = await make_mirror(upstream_url)
        async with client.get(
            f"{mirror.url}/v2/{name}/manifests/1", headers={"Accept": ACCEPT_ALL}
        ) as resp:
            body = await resp.read()
            assert resp.status == 400, (upstream_url, resp.status, body[:200])
            assert error_codes(body) == ("NAME_INVALID", "NAME_INVALID")
    assert [s.path for s in sim.log if len(s.path) > 255] == []


# -- Range, HEAD, base -----------------------------------------------------------------------


@pytest.fixture
async def cached_blob(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> tuple[str, str, bytes]:
    """(mirror URL, digest, bytes) of a 100 KiB blob fetched once and committed to disk."""
    data = random.Random(7).randbytes(100_000)
    digest = sim.add_blob(data)
    mirror = await make_mirror(sim.url)
    async with client.get(f"{mirror.url}/v2/team/app/blobs/{digest}") as resp:
        assert resp.status == 200
        assert await resp.read() == data
    hex_ = digest.split(":")[1]
    await wait_until(lambda: any(p.name == hex_ for p in mirror.blob_files()))
    return mirror.url, digest, data


async def test_range_requests_on_a_cached_blob(
    cached_blob: tuple[str, str, bytes], sim: UpstreamSim, client: aiohttp.ClientSession
) -> None:
    """On a committed blob: `bytes=0-9` is 206 with Content-Range and the first 10 bytes;
    `bytes=-5` the last 5; an end past the size is clamped; `bytes=<size>-` is 416 with
    `Content-Range: bytes */size` and SIZE_INVALID JSON (reason RANGE_INVALID); close parts
    of a multi-range header are answered as the one range they span; a malformed header is
    ignored (200, whole blob). None of it goes upstream again."""
    url, digest, data = cached_blob
    size = len(data)
    before = sum(sim.requests.values())
    blob_url = f"{url}/v2/team/app/blobs/{digest}"
    cases = [
        ("bytes=0-9", 206, 0, 10),
        ("bytes=-5", 206, size - 5, size),
        ("bytes=100-199", 206, 100, 200),
        (f"bytes=10-{size + 1000}", 206, 10, size),
        (f"bytes={size - 1}-", 206, size - 1, size),
        ("bytes=0-1,5-6", 206, 0, 7),
        ("bytes=5-6, 0-1,", 206, 0, 7),
    ]
    for spec, status, start, end in cases:
        async with client.get(blob_url, headers={"Range": spec}) as resp:
            body = await resp.read()
            assert resp.status == status, spec
            assert body == data[start:end], spec
            assert int(resp.headers["Content-Length"]) == end - start
            if status == 206:
                assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}", spec
            assert resp.headers["Docker-Content-Digest"] == digest
    for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}"):
        async with client.get(blob_url, headers={"Range": spec}) as resp:
            body = await resp.read()
            assert resp.status == 416, spec
            assert resp.headers["Content-Range"] == f"bytes */{size}"
            assert error_codes(body) == ("SIZE_INVALID", "RANGE_INVALID")
    async with client.get(blob_url, headers={"Range": f"bytes=-{size + 10}"}) as resp:
        assert resp.status in (200, 206)  # a suffix longer than the blob means all of it
        assert await resp.read() == data
    for spec in ("bytes=abc", "bytes=5-2", "items=0-9", "bytes=0-1,5-2", "bytes", "", "bytes=-"):
        async with client.get(blob_url, headers={"Range": spec}) as resp:
            body = await resp.read()
            assert resp.status == 200, spec
            assert body == data, spec
    assert sum(sim.requests.values()) == before


async def _head_then_ping(host: str, port: int, path: str, accept: str) -> tuple[bytes, bytes]:
    """Send HEAD on a raw keep-alive connection, read its header block, then GET /v2/ on the
    same connection: (HEAD header block, everything that followed on the socket). If the
    HEAD answer carried a body, it would sit in front of the second status line."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)
        return head, rest
    finally:
        writer.close()


def _headers(block: bytes) -> dict[str, str]:
    lines = block.decode("latin-1").split("\r\n")[1:]
    return {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)
    }


async def test_head_on_manifest_and_blob_has_headers_and_no_body(
    sim: UpstreamSim, make_mirror: MakeMirror
) -> None:
    """HEAD on a manifest (tag and digest) and on a blob (uncached, then cached) answers 200
    with the right Content-Length and Docker-Content-Digest and sends no body bytes at all
    (checked on the raw socket: the next response follows the headers immediately)."""
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url)
    host, port = mirror.host.split(":")
    layer, layer_data = next(iter(IMAGE.blobs.items()))
    checks = [
        ("/v2/team/app/manifests/1", len(IMAGE.data), IMAGE.digest),
        (f"/v2/team/app/manifests/{IMAGE.digest}", len(IMAGE.data), IMAGE.digest),
        (f"/v2/team/app/blobs/{layer}", len(layer_data), layer),
    ]
    async with aiohttp.ClientSession(trust_env=False) as client:
        for path, length, digest in checks:
            head, rest = await _head_then_ping(host, int(port), path, ACCEPT_ALL)
            assert head.startswith(b"HTTP/1.1 200"), head
            headers = _headers(head)
            assert int(headers["content-length"]) == length, path
            assert headers["docker-content-digest"] == digest, path
            assert rest.startswith(b"HTTP/1.1 200"), rest[:100]
        async with client.get(f"{mirror.url}/v2/team/app/blobs/{layer}") as resp:
            assert resp.status == 200
            await resp.read()
        await wait_until(lambda: any(p.name == layer.split(":")[1] for p in mirror.blob_files()))
        head, rest = await _head_then_ping(host, int(port), f"/v2/team/app/blobs/{layer}", "*/*")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert int(_headers(head)["content-length"]) == len(layer_data)
        assert _headers(head)["docker-content-digest"] == layer
        assert rest.startswith(b"HTTP/1.1 200"), rest[:100]


async def test_base_endpoint(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`GET /v2/` (and `/v2`) is 200 `{}` with `Docker-Distribution-API-Version: registry/2.0`,
    answered locally even though the upstream demands auth."""
    sim.require_bearer()
    mirror = await make_mirror(sim.url)
    for path in ("/v2/", "/v2"):
        async with client.get(f"{mirror.url}{path}") as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert resp.content_type == "application/json"
            assert await resp.json() == {}
    assert sim.log == []


# -- property-based fuzz ---------------------------------------------------------------------


@pytest.fixture
def threaded_sim() -> Iterator[UpstreamSim]:
    """An UpstreamSim on its own event loop in a background thread, so that it keeps serving
    while a synchronous (hypothesis) test blocks the main thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sim-loop", daemon=True)
    thread.start()
    simulator = UpstreamSim()
    asyncio.run_coroutine_threadsafe(simulator.start(), loop).result(10)
    try:
        yield simulator
    finally:
        asyncio.run_coroutine_threadsafe(simulator.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


SPECIAL_SEGMENTS = [
    "..",
    ".",
    "",
    "a",
    "library",
    "alpine",
    "team",
    "manifests",
    "blobs",
    "tags",
    "list",
    "referrers",
    "uploads",
    "sim.example",
    "registry.example",
    "localhost",
    "%2e%2e",
    "%2F",
    "1",
    "latest",
    "sha256:" + HEX,
    "sha256:" + HEX[:63],
    "md5:00",
    "x" * 300,
    "UPPER",
    "a..b",
    "-a",
    "a__b",
    "a---b",
    "test",
    "single",
]
valid_component = st.from_regex(
    r"[a-z0-9]{1,8}(?:(?:[._]|__|-+)[a-z0-9]{1,5}){0,2}", fullmatch=True
)
valid_ref = st.one_of(
    st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,12}", fullmatch=True),
    st.sampled_from([IMAGE.digest, *IMAGE.blobs, "sha256:" + HEX, "sha512:" + "b" * 128]),
)
valid_name = st.lists(valid_component, min_size=1, max_size=3).map("/".join)
fuzzed_name = st.lists(
    st.one_of(valid_component, st.text(max_size=30), st.sampled_from(SPECIAL_SEGMENTS)),
    min_size=0,
    max_size=4,
).map("/".join)
fuzzed_ref = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_SEGMENTS))
structured = st.tuples(
    st.sampled_from(["", "", "", "sim.example/", "registry.example/", "evil.example/"]),
    st.one_of(valid_name, valid_name, fuzzed_name),
    st.sampled_from(
        ["/manifests/", "/manifests/", "/blobs/", "/tags/list", "/referrers/", "/", ""]
    ),
    st.one_of(valid_ref, valid_ref, fuzzed_ref),
)


@st.composite
def fuzz_paths(draw: st.DrawFn) -> str:
    """A path after `/v2/`: fully random text, or random and valid segments around the
    endpoint keywords; percent-encoded with a random set of characters left raw, plus maybe
    an ns."""
    safe = draw(st.sampled_from(["/", "/", "/:", "/:%", "/:@!$&'()*+,;=%.~", ""]))
    if draw(st.integers(0, 4)) == 0:
        tail = quote(draw(st.text(max_size=80)), safe=safe)
    else:
        prefix, name, endpoint, ref = draw(structured)
        tail = (
            quote(prefix + name, safe="/" + safe)
            + endpoint
            + ("" if endpoint in ("/tags/list", "") else quote(ref, safe=":" + safe))
        )
    ns = draw(
        st.sampled_from(
            [
                None,
                None,
                None,
                None,
                "docker.io",
                "sim.example",
                "registry.example",
                "evil.example",
                "..%2F",
                "%00",
                "SIM.EXAMPLE",
            ]
        )
    )
    return "/v2/" + tail + (f"?ns={ns}" if ns is not None else "")


def _decoded_tail(path: str) -> tuple[str, str | None]:
    """(decoded tail after /v2/, ns) as the server sees them."""
    raw_path, _, query = path.partition("?")
    ns = unquote(query.removeprefix("ns=")) if query else None
    return unquote(raw_path[len("/v2/") :]), ns


def test_fuzzed_paths_never_5xx_and_invalid_ones_never_go_upstream(
    upstream: Upstream,
    threaded_sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """Property: for any text after `/v2/` (percent-encoded), with any method and `ns`, the
    real `mirror serve` process answers < 500 and, for a GET 4xx, with error JSON; writes are
    never accepted; a path whose name or reference is not spec-valid causes no upstream
    request; and every request the upstream ever receives is a spec-valid pull. The default
    upstream is the simulator (observable); `registry.example` is the real registry."""
    sim = threaded_sim
    sim.add_image("library/alpine", "latest", IMAGE)
    config = tmp_path / "fuzz.toml"
    config.write_text(
        f'[upstreams."sim.example"]\nurl = "{sim.url}"\n'
        f'[upstreams."registry.example"]\nurl = "{upstream.url}"\n'
    )
    mirror = mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)}).start()
    seen: list[tuple[str, int]] = []

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        path=fuzz_paths(),
        method=st.sampled_from(["GET"] * 8 + ["HEAD"] * 2 + ["DELETE", "PUT", "POST"]),
    )
    def check(path: str, method: str) -> None:
        before = len(sim.log)
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=15)
        try:
            conn.request(method, path, headers={"Accept": ACCEPT_ALL})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        seen.append((path, resp.status))
        assert resp.status < 500, (method, path, resp.status, body[:300])
        if method in ("DELETE", "PUT", "POST"):
            assert resp.status in (404, 405), (method, path, resp.status)
        if method != "HEAD" and resp.status >= 400:
            error_codes(body)
        tail, ns = _decoded_tail(path)
        if (
            not spec_valid_tail(tail)
            or method not in ("GET", "HEAD")
            or (
                ns is not None
                and ns.lower() not in ("docker.io", "sim.example", "registry.example")
            )
        ):
            assert sim.log[before:] == [], (method, path)
        bad = [
            (s.method, s.path)
            for s in sim.log
            if s.method not in ("GET", "HEAD") or not upstream_path_ok(s.path)
        ]
        assert bad == [], (method, path)

    check()
    assert len(seen) >= 50
    # the server kept serving throughout, and still serves a real image
    conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=15)
    conn.request("GET", "/v2/alpine/manifests/latest", headers={"Accept": ACCEPT_ALL})
    resp = conn.getresponse()
    assert resp.status == 200
    assert hashlib.sha256(resp.read()).hexdigest() == IMAGE.digest.split(":")[1]
    conn.close()
