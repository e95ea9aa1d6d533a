"""Mirror chaining: a site mirror whose upstreams are another (regional) mirror.

An upstream with `ns = "<registry host>"` gets `?ns=<host>` on every request, so one regional
mirror can serve several registries to the site mirrors behind it, as containerd would ask
it directly. The chain test runs real parts end to end: a real `docker-registry` and the
upstream simulator behind mirror A (regional), mirror B (site) pointing at A for both
registries, and skopeo pulling through B.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import MakeMirror, Mirror, skopeo_copy
from images import ACCEPT_ALL, Image, Upstream, build_images
from upstream_sim import UpstreamSim

from mirror.config import load_config
from mirror.errors import ConfigError

TOOL: Image = build_images()["test/single:2"]


def upstream_toml(name: str, url: str, **keys: object) -> str:
    """A `[upstreams."name"]` table (values JSON-encoded, which is valid TOML for these)."""
    lines = [f'[upstreams."{name}"]', f"url = {json.dumps(url)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def ns_of(path_qs: str) -> list[str]:
    """The `ns` values of a recorded request's query string."""
    return parse_qs(urlsplit(path_qs).query).get("ns", [])


def api_requests(mirror: Mirror) -> list[tuple[str, str]]:
    """What a mirror answered under /v2/<name>/ (the version check `/v2/` aside)."""
    return [(m, p) for m, p in mirror.seen if p.startswith("/v2/") and urlsplit(p).path != "/v2/"]


# -- the upstream `ns` option ----------------------------------------------------------------


async def test_ns_option_is_sent_on_every_upstream_request(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """With `ns` set, manifests (GET by tag and digest), blobs (GET and HEAD) and tag lists all
    reach the upstream with `?ns=<host>`; a tag list keeps its own `n` beside it."""
    sim.add_image("team/app", "1", TOOL)
    mirror = await make_mirror(sim.url, toml=upstream_toml("docker.io", sim.url, ns="GHCR.io"))
    layer = next(iter(TOOL.blobs))
    for path in (
        "team/app/manifests/1",
        f"team/app/manifests/{TOOL.digest}",
        f"team/app/blobs/{layer}",
    ):
        async with client.get(f"{mirror.url}/v2/{path}", headers={"Accept": ACCEPT_ALL}) as resp:
            assert resp.status == 200, await resp.read()
    async with client.head(f"{mirror.url}/v2/team/app/blobs/{next(reversed(TOOL.blobs))}") as resp:
        assert resp.status == 200
    async with client.get(f"{mirror.url}/v2/team/app/tags/list?n=1") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["1"]
    seen = [s for s in sim.log if s.server == "registry" and s.path != "/v2/"]
    assert {(s.method, s.path) for s in seen} >= {
        ("GET", "/v2/team/app/manifests/1"),
        ("GET", f"/v2/team/app/blobs/{layer}"),
        ("HEAD", f"/v2/team/app/blobs/{next(reversed(TOOL.blobs))}"),
        ("GET", "/v2/team/app/tags/list"),
    }
    assert all(s.query.get("ns") == "ghcr.io" for s in seen), [(s.path, s.query) for s in seen]
    assert [s.query.get("n") for s in seen if s.path.endswith("/tags/list")] == ["1"]


async def test_without_ns_option_no_ns_is_sent(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """The default (`ns` empty) sends no `ns` upstream, even when the client sent one to us."""
    sim.add_image("team/app", "1", TOOL)
    mirror = await make_mirror(sim.url)
    async with client.get(
        f"{mirror.url}/v2/team/app/manifests/1?ns=docker.io", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        assert resp.status == 200
    assert [s.query for s in sim.log if s.path == "/v2/team/app/manifests/1"] == [{}]


@pytest.mark.parametrize(
    "value", ["ghcr.io/owner", "ghcr.io?x=1", "-bad.example", "a b", "host:port"]
)
def test_bad_ns_option_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(upstream_toml("ghcr.io", "https://ghcr.io", ns=value))
    with pytest.raises(ConfigError, match=r"upstreams\.ghcr\.io\.ns"):
        load_config(config, env={})


def test_ns_option_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        env={
            "MIRROR_UPSTREAMS__DOCKER_IO__NS": "docker.io",
            "MIRROR_UPSTREAMS__DOCKER_IO__URL": "http://regional.example:5000",
        }
    )
    assert config.upstream("docker.io").ns == "docker.io"


# -- containerd's override_path form: prefix and ns together ---------------------------------


async def test_prefix_naming_the_ns_upstream_is_stripped(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`/v2/sim.example/team/app/...?ns=sim.example` (containerd with `override_path` on
    `http://mirror/v2/sim.example`) reaches that upstream as `team/app`; a prefix naming
    another upstream than ns is part of the name, and the answer stays the upstream's 404."""
    sim.add_image("team/app", "1", TOOL)
    mirror = await make_mirror(sim.url, toml=upstream_toml("sim.example", sim.url))
    url = f"{mirror.url}/v2/sim.example/team/app/manifests/1?ns=sim.example"
    async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
        assert resp.status == 200, await resp.read()
        assert await resp.read() == TOOL.data
        assert resp.headers["OCI-Namespace"] == "sim.example"
    async with client.get(
        f"{mirror.url}/v2/docker.io/team/app/manifests/1?ns=sim.example",
        headers={"Accept": ACCEPT_ALL},
    ) as resp:
        assert resp.status == 404
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] == 1
    assert sim.requests[("GET", "/v2/docker.io/team/app/manifests/1")] == 1


# -- a chain of two --------------------------------------------------------------------------


async def _pull(host: str, ref: str, dest: Path, *extra: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    code, out = await skopeo_copy(f"docker://{host}/{ref}", dest, *extra)
    assert code == 0, out
    return dest


async def test_site_mirror_pulls_two_registries_through_a_regional_mirror(
    upstream: Upstream, sim: UpstreamSim, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """registry + sim ← mirror A (regional: docker.io → registry, ghcr.io → sim) ← mirror B
    (site: both upstreams are A, each with its ns) ← skopeo. The bytes match the origins'
    digests, A saw every request with the ns of the right registry, and a second pull of the
    same images through B sends nothing to A."""
    sim.add_image("team/tool", "2", TOOL)
    regional = await make_mirror(upstream.url, toml=upstream_toml("ghcr.io", sim.url))
    site = await make_mirror(
        regional.url,
        toml=upstream_toml("docker.io", regional.url, ns="docker.io")
        + upstream_toml("ghcr.io", regional.url, ns="ghcr.io"),
    )
    multi = upstream.images["test/multi:1"]

    for run in ("first", "second"):
        before = len(api_requests(regional))
        hub = await _pull(site.host, "test/multi:1", tmp_path / run / "hub", "--all")
        ghcr = await _pull(site.host, "ghcr.io/team/tool:2", tmp_path / run / "ghcr")
        assert sha256_file(hub / "manifest.json") == multi.digest
        for blob in multi.children:
            assert sha256_file(hub / f"{blob.digest.split(':')[1]}.manifest.json") == blob.digest
        for blob in multi.layers:
            assert sha256_file(hub / blob.digest.split(":")[1]) == blob.digest
        assert sha256_file(ghcr / "manifest.json") == TOOL.digest
        for digest in TOOL.blobs:
            assert sha256_file(ghcr / digest.split(":")[1]) == digest
        if run == "first":
            seen = api_requests(regional)
            assert seen, "the site mirror never reached the regional one"
            for _, path in seen:
                expected = "ghcr.io" if path.startswith("/v2/team/tool/") else "docker.io"
                assert path.startswith(("/v2/team/tool/", "/v2/test/multi/")), path
                assert ns_of(path) == [expected], path
            assert {p for _, p in seen if p.startswith("/v2/team/tool/")}
            assert all(not s.path.startswith("/v2/test/") for s in sim.log)
        else:
            assert len(api_requests(regional)) == before, api_requests(regional)[before:]
