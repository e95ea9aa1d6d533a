"""Which upstream a request reaches, and what credentials go where.

Routing is a closed world: `?ns=<host>` and a `/v2/<host>/...` path prefix select only
configured upstreams, anything else is refused before a socket is opened. Authentication:
the Bearer token dance (anonymous and with credentials), token caching, Basic challenges,
docker `config.json` credentials, and the rules that keep credentials away from foreign
token realms and from the blob CDN. Every upstream here is a real `UpstreamSim` on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeMirror, MirrorProcess, error_codes, make_cert
from images import ACCEPT_ALL, Image, build_images
from upstream_sim import UpstreamSim

IMAGE: Image = build_images()["test/single:1"]
OTHER: Image = build_images()["test/single:2"]
BASIC_UP = "Basic " + base64.b64encode(b"u:p").decode()


# -- helpers ---------------------------------------------------------------------------------


def upstream_toml(name: str, url: str, **keys: object) -> str:
    """A `[upstreams."name"]` table (values JSON-encoded, which is valid TOML for these)."""
    lines = [f'[upstreams."{name}"]', f"url = {json.dumps(url)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def creds_toml(**keys: object) -> str:
    """Keys for the default `docker.io` upstream (its url comes from make_mirror's flag)."""
    lines = ['[upstreams."docker.io"]'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


async def get_manifest(
    client: aiohttp.ClientSession, url: str
) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url, headers={"Accept": ACCEPT_ALL}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def get_blob(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_requests(sim: UpstreamSim) -> int:
    return sum(sim.requests.values()) + sum(sim.cdn_requests.values())


def sent_authorization(sim: UpstreamSim) -> list[tuple[str, str]]:
    """(path, Authorization) of every request the sim received carrying one."""
    return [(s.path, s.headers["Authorization"]) for s in sim.log if "Authorization" in s.headers]


# -- routing ---------------------------------------------------------------------------------


async def test_ns_selects_configured_upstream_and_echoes_namespace(
    sim: UpstreamSim, other_sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`?ns=sim.example` (and its alias) routes manifest and blob requests to the `sim.example`
    upstream, never the default, and each answer echoes `OCI-Namespace` as the client sent it."""
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(
        other_sim.url, toml=upstream_toml("sim.example", sim.url, aliases=["alias.example"])
    )
    layer = next(iter(IMAGE.blobs))
    for ns in ("sim.example", "alias.example"):
        status, headers, body = await get_manifest(
            client, f"{mirror.url}/v2/team/app/manifests/1?ns={ns}"
        )
        assert status == 200, body
        assert body == IMAGE.data
        assert headers["OCI-Namespace"] == ns
        status, headers, body = await get_blob(
            client, f"{mirror.url}/v2/team/app/blobs/{layer}?ns={ns}"
        )
        assert status == 200
        assert sha256(body) == layer
        assert headers["OCI-Namespace"] == ns
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] >= 1
    assert sim.requests[("GET", f"/v2/team/app/blobs/{layer}")] == 1
    assert registry_requests(other_sim) == 0


async def test_ns_docker_io_and_no_ns_go_to_the_default(
    sim: UpstreamSim, other_sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`?ns=docker.io` (and its alias index.docker.io) selects the default upstream and is
    echoed; a request with no ns reaches the default too and carries no OCI-Namespace."""
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=upstream_toml("sim.example", other_sim.url))
    for ns in ("docker.io", "index.docker.io"):
        status, headers, body = await get_manifest(
            client, f"{mirror.url}/v2/team/app/manifests/{IMAGE.digest}?ns={ns}"
        )
        assert status == 200, body
        assert body == IMAGE.data
        assert headers["OCI-Namespace"] == ns
    status, headers, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 200
    assert body == IMAGE.data
    assert "OCI-Namespace" not in headers
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] == 1
    assert registry_requests(other_sim) == 0


async def test_unconfigured_ns_is_refused_without_dialling(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Closed world: `?ns=evil.example` on every endpoint is 404 NAME_UNKNOWN and no upstream
    (neither the default nor anything else) receives a single request."""
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=upstream_toml("sim.example", sim.url))
    layer = next(iter(IMAGE.blobs))
    paths = [
        "team/app/manifests/1",
        f"team/app/manifests/{IMAGE.digest}",
        f"team/app/blobs/{layer}",
        "team/app/tags/list",
        f"team/app/referrers/{IMAGE.digest}",
    ]
    for ns in ("evil.example", "sim.example.evil", "127.0.0.1", "EVIL.example"):
        for path in paths:
            for method in ("GET", "HEAD"):
                async with client.request(method, f"{mirror.url}/v2/{path}?ns={ns}") as resp:
                    body = await resp.read()
                    assert resp.status == 404, (method, path, ns, body)
                    if method == "GET":
                        assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert registry_requests(sim) == 0


async def test_path_prefix_routes_to_the_host_and_strips_it(
    sim: UpstreamSim, other_sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`/v2/sim.example/team/app/...` reaches the `sim.example` upstream as `/v2/team/app/...`
    (prefix stripped, no library/ added), for manifests, blobs and tags/list."""
    sim.add_image("team/app", "1", IMAGE)
    sim.add_image("solo", "1", OTHER)
    mirror = await make_mirror(other_sim.url, toml=upstream_toml("sim.example", sim.url))
    status, headers, body = await get_manifest(
        client, f"{mirror.url}/v2/sim.example/team/app/manifests/1"
    )
    assert status == 200, body
    assert body == IMAGE.data
    assert "OCI-Namespace" not in headers
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/sim.example/team/app/blobs/{layer}")
    assert status == 200
    assert sha256(body) == layer
    async with client.get(f"{mirror.url}/v2/sim.example/team/app/tags/list") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["1"]
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/sim.example/solo/manifests/1")
    assert status == 200, body
    assert body == OTHER.data
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] == 1
    assert sim.requests[("GET", f"/v2/team/app/blobs/{layer}")] == 1
    assert sim.requests[("GET", "/v2/team/app/tags/list")] == 1
    assert sim.requests[("GET", "/v2/solo/manifests/1")] == 1
    assert not any("sim.example" in path for _, path in sim.requests)
    assert registry_requests(other_sim) == 0


async def test_unconfigured_host_prefix_is_refused(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A first path component that looks like a host (a dot, a port, `localhost`) but is not
    configured is 404 NAME_UNKNOWN, and no upstream is contacted for it."""
    mirror = await make_mirror(sim.url)
    for path in (
        "other.example/x/manifests/1",
        "other.example/x/blobs/sha256:" + "a" * 64,
        "other.example/x/tags/list",
        "localhost/x/manifests/1",
        "localhost:5000/x/manifests/1",
        f"{sim.host}/x/manifests/1",
    ):
        async with client.get(f"{mirror.url}/v2/{path}") as resp:
            body = await resp.read()
            assert resp.status == 404, (path, body)
            assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert registry_requests(sim) == 0


async def test_library_prefix_for_one_word_names(
    sim: UpstreamSim, other_sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """On docker.io a one-word name `alpine` is asked upstream as `library/alpine` (without
    ns, with `?ns=docker.io`); `library/alpine` is not doubled; an upstream without
    library_prefix gets the one-word name unchanged."""
    sim.add_image("library/alpine", "1", IMAGE)
    other_sim.add_image("alpine", "1", OTHER)
    mirror = await make_mirror(sim.url, toml=upstream_toml("sim.example", other_sim.url))
    for url in (
        f"{mirror.url}/v2/alpine/manifests/1",
        f"{mirror.url}/v2/alpine/manifests/1?ns=docker.io",
        f"{mirror.url}/v2/library/alpine/manifests/{IMAGE.digest}",
    ):
        status, _, body = await get_manifest(client, url)
        assert status == 200, (url, body)
        assert body == IMAGE.data
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/alpine/blobs/{layer}")
    assert status == 200
    assert sha256(body) == layer
    assert sim.requests[("GET", "/v2/library/alpine/manifests/1")] >= 1
    assert sim.requests[("GET", f"/v2/library/alpine/blobs/{layer}")] == 1
    assert not any(
        path.startswith(("/v2/alpine/", "/v2/library/library/")) for _, path in sim.requests
    )
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/sim.example/alpine/manifests/1")
    assert status == 200, body
    assert body == OTHER.data
    assert other_sim.requests[("GET", "/v2/alpine/manifests/1")] == 1


#: The registries the mirror serves with no configuration.
BUILT_IN = {
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
    "registry.gitlab.com",
}


async def test_the_built_in_upstreams_route_without_configuration(
    sim: UpstreamSim,
    other_sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
) -> None:
    """A `mirror serve` process with no config file: `?ns=ghcr.io` reaches the built-in
    ghcr.io upstream and a `quay.io/` path prefix the built-in quay.io, each pointed at a
    simulator by its MIRROR_UPSTREAMS__<HOST>__URL variable alone (the prefix taken off, no
    library/ added); gcr.io dropped with MIRROR_UPSTREAMS__GCR_IO__ENABLED=false is 404
    NAME_UNKNOWN by ns and by prefix; /readyz lists every other built-in upstream."""
    sim.add_image("team/app", "1", IMAGE)
    other_sim.add_image("solo", "1", OTHER)
    proc = mirror_process(
        "http://127.0.0.1:9",
        env={
            "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
            "MIRROR_UPSTREAMS__QUAY_IO__URL": other_sim.url,
            "MIRROR_UPSTREAMS__GCR_IO__ENABLED": "false",
        },
    )
    await asyncio.to_thread(proc.start)
    status, headers, body = await get_manifest(
        client, f"{proc.url}/v2/team/app/manifests/1?ns=ghcr.io"
    )
    assert status == 200, body
    assert body == IMAGE.data
    assert headers["OCI-Namespace"] == "ghcr.io"
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{proc.url}/v2/team/app/blobs/{layer}?ns=ghcr.io")
    assert status == 200
    assert sha256(body) == layer
    status, _, body = await get_manifest(client, f"{proc.url}/v2/quay.io/solo/manifests/1")
    assert status == 200, body
    assert body == OTHER.data
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] == 1
    assert sim.requests[("GET", f"/v2/team/app/blobs/{layer}")] == 1
    assert other_sim.requests[("GET", "/v2/solo/manifests/1")] == 1
    assert not any("ghcr.io" in path for _, path in sim.requests)
    assert not any("quay.io" in path or "library" in path for _, path in other_sim.requests)
    for url in (
        f"{proc.url}/v2/team/app/manifests/1?ns=gcr.io",
        f"{proc.url}/v2/gcr.io/x/manifests/1",
    ):
        status, _, body = await get_manifest(client, url)
        assert status == 404, (url, body)
        assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    async with client.get(f"{proc.url}/readyz") as resp:
        assert set((await resp.json())["upstreams"]) == BUILT_IN - {"gcr.io"}


# -- bearer tokens ---------------------------------------------------------------------------


async def test_anonymous_bearer_dance_and_token_cache(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """With a Bearer challenge, a manifest and two blobs pull through; the token (scoped to
    the repository, fetched without credentials) is fetched once and reused for all three."""
    sim.require_bearer()
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url)
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 200, body
    assert body == IMAGE.data
    layers = list(IMAGE.blobs)[:2]
    for layer in layers:
        status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
        assert status == 200
        assert sha256(body) == layer
    assert sim.tokens_issued == 1
    token_requests = [s for s in sim.log if s.path == "/token"]
    assert len(token_requests) == 1
    assert token_requests[0].query["scope"] == "repository:team/app:pull"
    assert token_requests[0].query["service"] == "sim"
    assert "Authorization" not in token_requests[0].headers
    for layer in layers:
        assert sim.auth_seen[f"/v2/team/app/blobs/{layer}"] >= 1


async def test_revoked_token_is_renewed(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """When upstream stops honouring the cached token (expiry, revocation), the next request
    answers the new 401 with a fresh token and still succeeds."""
    sim.require_bearer()
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url)
    first, second = list(IMAGE.blobs)[:2]
    status, _, _ = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{first}")
    assert status == 200
    assert sim.tokens_issued == 1
    sim.revoke_tokens()
    status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{second}")
    assert status == 200
    assert sha256(body) == second
    assert sim.tokens_issued == 2


@pytest.mark.parametrize("realm_rule", ["own-host", "token_realms"])
async def test_bearer_with_credentials_to_an_allowed_realm(
    realm_rule: str, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A token realm that demands credentials gets the configured ones (as Basic) when it is
    the registry's own origin, or, for a realm on another host (registry dialled as
    `localhost`, realm on 127.0.0.1), when that host and its port are listed in
    `token_realms`."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    if realm_rule == "own-host":
        mirror = await make_mirror(
            sim.url, toml=creds_toml(username="u", password="p", token_realms=[])
        )
    else:
        mirror = await make_mirror(
            f"http://localhost:{sim.registry.port}",
            toml=creds_toml(
                username="u", password="p", token_realms=[f"127.0.0.1:{sim.registry.port}"]
            ),
        )
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 200, body
    assert body == IMAGE.data
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert status == 200
    assert sha256(body) == layer
    token_auth = [s.headers.get("Authorization") for s in sim.log if s.path == "/token"]
    assert token_auth == [BASIC_UP]
    # the registry itself only ever saw the token, never the password
    assert all(
        value.startswith("Bearer ") for path, value in sent_authorization(sim) if path != "/token"
    )


async def test_credentials_never_go_to_a_realm_that_is_not_allowed(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """With credentials configured, a challenge naming a realm on a host that is neither the
    registry's nor in `token_realms` is refused (404 NAME_UNKNOWN: upstream denied access) and the credentials are
    sent nowhere: no request the simulator received carries an Authorization header."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(
        f"http://localhost:{sim.registry.port}",
        toml=creds_toml(username="u", password="p", token_realms=["auth.example"]),
    )
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert sim.requests[("GET", "/v2/team/app/manifests/1")] >= 1  # it did ask, and got challenged
    assert all("Authorization" not in s.headers for s in sim.log if s.path == "/token")
    assert sent_authorization(sim) == []
    assert sim.tokens_issued == 0


# -- which realm may have the credentials, against a real process ------------------------------


def _serve_with_credentials(
    mirror_process: Callable[..., MirrorProcess],
    url: str,
    tmp_path: Path,
    token_realms: list[str],
    env: dict[str, str] | None = None,
) -> MirrorProcess:
    """A `mirror serve` process whose docker.io upstream is `url`, with credentials u/p."""
    config = tmp_path / "mirror.toml"
    config.write_text(creds_toml(username="u", password="p", token_realms=token_realms))
    return mirror_process(url, env={"MIRROR_CONFIG": str(config), **(env or {})})


async def test_credentials_for_an_https_registry_never_go_to_an_http_realm(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The registry speaks https (a simulator behind an openssl certificate the process is
    told to trust) and its challenge names `http://127.0.0.1:<port>/token`, a realm whose host
    and port are even listed in `token_realms`: the credentials would travel in clear text, so
    the pull is refused with 404 NAME_UNKNOWN saying so, and the http realm receives no
    request at all, let alone an Authorization header. The same registry naming its own
    https realm gets the credentials there and the pull succeeds."""
    cert, key = make_cert(tmp_path, "registry")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    registry = UpstreamSim(tls=tls)
    await registry.start()
    try:
        registry.require_bearer("u", "p")
        registry.add_image("team/app", "1", IMAGE)
        registry.realm = f"{sim.url}/token"  # plain http, the realm's own port
        sim.require_bearer("u", "p")
        sim.tokens = registry.tokens  # what it issued would be honoured: only the rule stops it
        proc = _serve_with_credentials(
            mirror_process,
            registry.url,
            tmp_path,
            [f"127.0.0.1:{sim.registry.port}"],
            env={"SSL_CERT_FILE": str(cert)},
        )
        await asyncio.to_thread(proc.start)
        status, _, body = await get_manifest(client, f"{proc.url}/v2/team/app/manifests/1")
        assert status == 404, body
        assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
        assert "not https" in json.loads(body)["errors"][0]["message"]
        assert registry.requests[("GET", "/v2/team/app/manifests/1")] >= 1
        assert sim.log == []
        assert sent_authorization(registry) == []
        registry.realm = None  # its own https realm
        status, _, body = await get_manifest(client, f"{proc.url}/v2/team/app/manifests/1")
        assert status == 200, body
        assert body == IMAGE.data
        assert [s.headers.get("Authorization") for s in registry.log if s.path == "/token"] == [
            BASIC_UP
        ]
        assert sim.log == []
    finally:
        await registry.stop()


@pytest.mark.parametrize("listed", ["nothing", "the host", "the host and port"])
async def test_credentials_do_not_follow_a_realm_to_another_port(
    listed: str,
    sim: UpstreamSim,
    other_sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The registry (http, on 127.0.0.1) names a token realm on another port of 127.0.0.1 (a
    second simulator, honouring the same tokens). Unless `token_realms` lists that host with
    that port, the pull is refused with 404 NAME_UNKNOWN naming token_realms and the realm
    receives no request; a bare host there admits only the scheme's default port. Listed
    with its port, the realm receives the credentials and the pull succeeds."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    sim.realm = f"{other_sim.url}/token"
    other_sim.require_bearer("u", "p")
    other_sim.tokens = sim.tokens
    realms = {
        "nothing": [],
        "the host": ["127.0.0.1"],
        "the host and port": [f"127.0.0.1:{other_sim.registry.port}"],
    }[listed]
    proc = _serve_with_credentials(mirror_process, sim.url, tmp_path, realms)
    await asyncio.to_thread(proc.start)
    status, _, body = await get_manifest(client, f"{proc.url}/v2/team/app/manifests/1")
    if listed != "the host and port":
        assert status == 404, body
        assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
        assert "token_realms" in json.loads(body)["errors"][0]["message"]
        assert other_sim.log == []
        assert sent_authorization(sim) == []
        return
    assert status == 200, body
    assert body == IMAGE.data
    assert [s.headers.get("Authorization") for s in other_sim.log] == [BASIC_UP]
    # the registry itself only ever saw the token, never the password
    assert all(value.startswith("Bearer ") for _, value in sent_authorization(sim))


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_cdn_redirect_gets_no_credentials(
    scheme: str, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Blob GETs redirected (307) to a CDN on another host arrive intact, and the CDN never
    receives the token or the Basic credentials the registry was sent."""
    if scheme == "bearer":
        sim.require_bearer("u", "p")
    else:
        sim.require_basic("u", "p")
    sim.redirect_blobs = True
    sim.add_image("team/app", "1", IMAGE)
    # the CDN is on another loopback address: the mirror dials it only when told to
    toml = creds_toml(username="u", password="p", private_targets=["127.0.0.2"])
    mirror = await make_mirror(sim.url, toml=toml)
    for layer in list(IMAGE.blobs)[:2]:
        status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
        assert status == 200
        assert sha256(body) == layer
        assert sim.cdn_requests[("GET", f"/blobs/{layer}")] == 1
        assert sim.auth_seen[f"/v2/team/app/blobs/{layer}"] >= 1  # the registry did get auth
    assert sim.cdn_authorizations == []
    assert all("Authorization" not in s.headers for s in sim.log if s.server == "cdn")


@pytest.mark.parametrize("realm", ["not listed", "listed in token_realms"])
async def test_a_redirect_target_with_its_own_challenge_gets_a_token_of_its_own(
    realm: str,
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The registry (Bearer, credentials u/p) redirects blob GETs to a second host that
    answers 401 with a challenge of its own (its own realm, its own tokens). The blobs arrive
    intact: that host's realm is asked for a token, anonymously unless it is listed in
    `token_realms` (then with the credentials), once for both blobs; that host is sent only
    tokens its realm issued, never the registry's token or the Basic credentials."""
    sim.require_bearer("u", "p")
    sim.redirect_blobs = True
    sim.cdn_bearer = True
    sim.add_image("team/app", "1", IMAGE)
    listed = [f"127.0.0.2:{sim.cdn.port}"] if realm != "not listed" else []
    config = tmp_path / "mirror.toml"
    config.write_text(
        creds_toml(username="u", password="p", private_targets=["127.0.0.2"], token_realms=listed)
    )
    proc = mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)})
    await asyncio.to_thread(proc.start)
    layers = list(IMAGE.blobs)[:2]
    for layer in layers:
        status, _, body = await get_blob(client, f"{proc.url}/v2/team/app/blobs/{layer}")
        assert status == 200, body
        assert sha256(body) == layer
    cdn = [s for s in sim.log if s.server == "cdn"]
    (token_ask,) = [s for s in cdn if s.path == "/token"]
    assert token_ask.query == {"scope": f"blob:{layers[0]}", "service": "cdn"}
    assert token_ask.headers.get("Authorization") == (BASIC_UP if listed else None)
    for layer in layers:
        sent = [s.headers.get("Authorization") for s in cdn if s.path == f"/blobs/{layer}"]
        assert sent[-1] is not None and sent[-1].removeprefix("Bearer ") in sim.cdn_tokens
        assert all(
            value is None or value.removeprefix("Bearer ") in sim.cdn_tokens for value in sent
        )
    registry_tokens = {f"Bearer {t}" for t in sim.tokens}
    assert registry_tokens, "the registry itself was pulled with a token"
    blob_requests = [s for s in cdn if s.path.startswith("/blobs/")]
    assert all(
        s.headers.get("Authorization") not in (*registry_tokens, BASIC_UP) for s in blob_requests
    )
    registry_token_asks = [s for s in sim.log if s.server == "registry" and s.path == "/token"]
    assert [s.headers.get("Authorization") for s in registry_token_asks] == [BASIC_UP]


# -- basic, wrong credentials, denied --------------------------------------------------------


async def test_basic_challenge_answered_with_configured_credentials(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A registry demanding HTTP Basic gets the configured username and password, and the
    pull (manifest and blob) succeeds."""
    sim.require_basic("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=creds_toml(username="u", password="p"))
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 200, body
    assert body == IMAGE.data
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert status == 200
    assert sha256(body) == layer
    assert {value for _, value in sent_authorization(sim)} == {BASIC_UP}


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_wrong_credentials_are_404_name_unknown(
    scheme: str, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Credentials the upstream refuses (at the token realm or on Basic) end as 404
    NAME_UNKNOWN (upstream denied access), for manifests and blobs alike: a 401 would ask the
    client for credentials it cannot give, and containerd moves on to its next host."""
    if scheme == "bearer":
        sim.require_bearer("u", "p")
    else:
        sim.require_basic("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url, toml=creds_toml(username="u", password="wrong"))
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    layer = next(iter(IMAGE.blobs))
    status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert sim.tokens_issued == 0
    assert mirror.blob_files() == []


async def test_basic_registry_without_credentials_is_404_name_unknown(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A Basic challenge with no credentials configured ends as 404 NAME_UNKNOWN (upstream
    denied access), never as a 401 without a challenge of the mirror's own."""
    sim.require_basic("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(sim.url)
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert sent_authorization(sim) == []


async def test_credentials_stay_with_their_upstream(
    sim: UpstreamSim, other_sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Credentials configured for `sim.example` are used there and never offered to the
    default upstream, even when the default challenges for Basic."""
    sim.require_basic("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    other_sim.require_basic("u", "p")
    other_sim.add_image("team/app", "1", IMAGE)
    mirror = await make_mirror(
        other_sim.url, toml=upstream_toml("sim.example", sim.url, username="u", password="p")
    )
    status, _, body = await get_manifest(
        client, f"{mirror.url}/v2/sim.example/team/app/manifests/1"
    )
    assert status == 200, body
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert sent_authorization(other_sim) == []
    assert sent_authorization(sim) != []


@pytest.mark.parametrize("target", ["manifest", "blob"])
async def test_upstream_403_is_403_denied(
    target: str, sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """An upstream 403 on a repository is passed on as 403 with DENIED error JSON."""
    sim.add_image("team/app", "1", IMAGE)
    sim.fault(target, "status", status=403)
    mirror = await make_mirror(sim.url)
    layer = next(iter(IMAGE.blobs))
    if target == "manifest":
        status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    else:
        status, _, body = await get_blob(client, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert status == 403, body
    assert error_codes(body) == ("DENIED", "DENIED")
    assert mirror.blob_files() == []


# -- docker config.json ----------------------------------------------------------------------


def _docker_entry(form: str) -> dict[str, str]:
    if form == "auth":
        return {"auth": base64.b64encode(b"u:p").decode()}
    return {"username": "u", "password": "p"}


@pytest.mark.parametrize(
    ("key_form", "entry_form"),
    [
        ("host:port", "auth"),
        ("host:port", "username"),
        ("http://host:port", "auth"),
        ("https://index.docker.io/v1/", "auth"),
    ],
)
async def test_docker_config_json_provides_credentials(
    key_form: str,
    entry_form: str,
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A docker `config.json` named by `docker_config` supplies the credentials: an `auths`
    entry keyed by the registry's host:port (bare or as a URL), or Docker Hub's classic
    `https://index.docker.io/v1/` key for the docker.io upstream, in `auth` or
    username/password form; the token realm receives them and the pull succeeds."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    key = {"host:port": sim.host, "http://host:port": sim.url}.get(key_form, key_form)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"auths": {key: _docker_entry(entry_form)}}))
    mirror = await make_mirror(sim.url, toml=creds_toml(docker_config=str(config_json)))
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 200, body
    assert body == IMAGE.data
    assert [s.headers.get("Authorization") for s in sim.log if s.path == "/token"] == [BASIC_UP]


async def test_docker_config_entry_for_another_host_is_not_used(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Credentials in config.json for a different registry are not sent to this one: the
    realm sees no Authorization and the answer is 404 NAME_UNKNOWN."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"auths": {"ghcr.io": _docker_entry("auth")}}))
    mirror = await make_mirror(sim.url, toml=creds_toml(docker_config=str(config_json)))
    status, _, body = await get_manifest(client, f"{mirror.url}/v2/team/app/manifests/1")
    assert status == 404, body
    assert error_codes(body) == ("NAME_UNKNOWN", "NAME_UNKNOWN")
    assert sent_authorization(sim) == []
