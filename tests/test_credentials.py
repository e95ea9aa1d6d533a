"""Upstream credentials kept the way docker users keep them, against a real `mirror serve`.

A docker `config.json`'s `credsStore` and `credHelpers` run credential helpers (real
executables this test writes into a directory put on the mirror's PATH) with the docker
credential-helper protocol; `identitytoken` (or a helper's `<token>` answer) is exchanged by an
OAuth2 refresh-token grant POSTed to the realm; `credential_command` runs a program for the
password, again once its lifetime has passed; a rewritten config.json is read again. A helper
that fails or hangs is a 404 NAME_UNKNOWN saying so (upstream denied the mirror; a 401 is
only ever the mirror's own `[auth]`), within `credential_timeout`. Every upstream is a real
`UpstreamSim` on loopback, reached through the built-in upstreams' environment variables.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import MirrorProcess, wait_until
from images import ACCEPT_ALL, Image, build_images
from upstream_sim import UpstreamSim

IMAGE: Image = build_images()["test/single:1"]
NOT_FOUND = "credentials not found in native keychain"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def executable(where: Path, name: str, body: str) -> Path:
    """A shell script `name` in `where`, executable."""
    where.mkdir(exist_ok=True)
    path = where / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def helper(where: Path, name: str, log: Path, answers: dict[str, tuple[str, str]]) -> Path:
    """`docker-credential-<name>`: logs `<verb> <server>` and answers `get` for the servers in
    `answers` with {"ServerURL","Username","Secret"}, for any other with "not found"."""
    cases = "".join(
        f'  "{server}") printf \'{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\\n\' "$server" ;;\n'
        for server, (user, secret) in answers.items()
    )
    return executable(
        where,
        f"docker-credential-{name}",
        f'server=$(cat)\necho "$1 $server" >> "{log}"\n[ "$1" = get ] || exit 2\n'
        f'case "$server" in\n{cases}  *) echo "{NOT_FOUND}"; exit 1 ;;\nesac\n',
    )


def docker_config(where: Path, doc: dict[str, object]) -> Path:
    """Write a config.json as `docker login` does: a new file renamed over the old one."""
    path = where / "config.json"
    fresh = where / "config.json.new"
    fresh.write_text(json.dumps(doc))
    os.replace(fresh, path)
    return path


def serve(
    mirror_process: Callable[..., MirrorProcess], env: dict[str, str], bin_dir: Path | None = None
) -> MirrorProcess:
    """A `mirror serve` with no config file (docker.io at a closed port), `env` on top, and
    `bin_dir` first on its PATH."""
    full = dict(env)
    if bin_dir is not None:
        full["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return mirror_process("http://127.0.0.1:9", env=full)


async def pull(
    client: aiohttp.ClientSession, proc: MirrorProcess, repo: str, ns: str = "ghcr.io"
) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=30)
    url = f"{proc.url}/v2/{repo}/manifests/1?ns={ns}"
    async with client.get(url, headers={"Accept": ACCEPT_ALL}, timeout=timeout) as resp:
        return resp.status, await resp.read()


def message(body: bytes) -> str:
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "NAME_UNKNOWN", error  # upstream denied the mirror: 404
    text = error["message"]
    assert isinstance(text, str)
    return text


def realm_authorizations(sim: UpstreamSim) -> list[str | None]:
    """The Authorization of every GET the registry's token realm received, in order."""
    return [
        s.headers.get("Authorization")
        for s in sim.log
        if s.server == "registry" and s.path == "/token" and s.method == "GET"
    ]


def registry_saw_only_tokens(sim: UpstreamSim) -> bool:
    return all(
        s.headers.get("Authorization", "Bearer ").startswith("Bearer ")
        for s in sim.log
        if s.path.startswith("/v2/")
    )


# -- credential helpers ----------------------------------------------------------------------


async def test_a_creds_store_helper_supplies_the_credentials(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """config.json's `credsStore` names a helper: it is run as `docker-credential-<name> get`
    with the server (the `auths` key docker left for ghcr.io) on stdin, and the user and
    secret it prints go to the token realm; the registry sees only tokens. Two repositories
    (two token fetches) run the helper once: its answer is kept credential_lifetime."""
    sim.require_bearer("u", "p")
    for repo in ("team/app", "team/other"):
        sim.add_image(repo, "1", IMAGE)
    bin_dir, log = tmp_path / "bin", tmp_path / "helper.log"
    helper(bin_dir, "teststore", log, {"ghcr.io": ("u", "p")})
    config = docker_config(tmp_path, {"auths": {"ghcr.io": {}}, "credsStore": "teststore"})
    env = {"MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url}
    env["MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG"] = str(config)
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    for repo in ("team/app", "team/other"):
        status, body = await pull(client, proc, repo)
        assert status == 200, body
        assert body == IMAGE.data
    assert realm_authorizations(sim) == [basic("u", "p")] * 2
    assert log.read_text().splitlines() == ["get ghcr.io"]
    assert registry_saw_only_tokens(sim)


async def test_cred_helpers_choose_a_helper_per_registry(
    sim: UpstreamSim,
    other_sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """`credHelpers` gives ghcr.io and quay.io helpers of their own, over `credsStore`: each
    registry's realm gets the credentials of its helper and never the other's, and the store
    (a helper that would fail) is never run."""
    sim.require_bearer("ghcr-user", "ghcr-secret")
    other_sim.require_bearer("quay-user", "quay-secret")
    sim.add_image("team/app", "1", IMAGE)
    other_sim.add_image("team/app", "1", IMAGE)
    bin_dir, log = tmp_path / "bin", tmp_path / "helpers.log"
    helper(bin_dir, "ghcr", log, {"ghcr.io": ("ghcr-user", "ghcr-secret")})
    helper(bin_dir, "quay", log, {"quay.io": ("quay-user", "quay-secret")})
    executable(bin_dir, "docker-credential-store", f'echo "store $1" >> "{log}"\nexit 1\n')
    config = docker_config(
        tmp_path,
        {"credsStore": "store", "credHelpers": {"ghcr.io": "ghcr", "quay.io": "quay"}},
    )
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
        "MIRROR_UPSTREAMS__QUAY_IO__URL": other_sim.url,
        "MIRROR_UPSTREAMS__QUAY_IO__DOCKER_CONFIG": str(config),
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    for ns in ("ghcr.io", "quay.io"):
        status, body = await pull(client, proc, "team/app", ns)
        assert status == 200, (ns, body)
    assert realm_authorizations(sim) == [basic("ghcr-user", "ghcr-secret")]
    assert realm_authorizations(other_sim) == [basic("quay-user", "quay-secret")]
    assert sorted(log.read_text().splitlines()) == ["get ghcr.io", "get quay.io"]


async def test_a_helper_without_an_entry_means_an_anonymous_pull(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A helper answering "credentials not found in native keychain" (exit 1) is no error:
    the pull goes on anonymously, the realm asked without Authorization."""
    sim.require_bearer()
    sim.add_image("team/app", "1", IMAGE)
    bin_dir, log = tmp_path / "bin", tmp_path / "helper.log"
    helper(bin_dir, "empty", log, {})
    config = docker_config(tmp_path, {"credsStore": "empty"})
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    status, body = await pull(client, proc, "team/app")
    assert status == 200, body
    assert realm_authorizations(sim) == [None]
    assert log.read_text().splitlines() == ["get ghcr.io"]


@pytest.mark.parametrize("failure", ["exits 3", "is not on PATH"])
async def test_a_helper_that_fails_is_404_with_a_clear_message(
    failure: str,
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A helper that exits non-zero (with an error of its own on stderr), or one that is not
    on PATH: the pull is 404 NAME_UNKNOWN naming the helper and what went wrong, nothing goes
    to the token realm, the log has the helper's own words and no traceback, and the mirror
    keeps serving. A failure is not kept: the next pull asks the helper again."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    bin_dir, log = tmp_path / "bin", tmp_path / "helper.log"
    bin_dir.mkdir()
    if failure == "exits 3":
        executable(
            bin_dir,
            "docker-credential-broken",
            f'cat > /dev/null\necho run >> "{log}"\necho "the keychain is locked" >&2\nexit 3\n',
        )
    config = docker_config(tmp_path, {"credsStore": "broken"})
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    for _ in range(2):
        status, body = await pull(client, proc, "team/app")
        assert status == 404, body
        text = message(body)
        assert "docker-credential-broken" in text and "ghcr.io" in text, text
        why = "failed (exit status 3)" if failure == "exits 3" else "could not be started"
        assert why in text, text
    assert [s for s in sim.log if s.path == "/token"] == []
    async with client.get(f"{proc.url}/healthz") as resp:
        assert resp.status == 200
    proc.stop()
    out = proc.log.read_text()
    assert "Traceback" not in out
    if failure == "exits 3":
        assert "exited with status 3: the keychain is locked" in out
        assert log.read_text().splitlines() == ["run", "run"]
    else:
        assert "docker-credential-broken could not be started" in out


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped has ended too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_a_helper_that_hangs_is_answered_within_the_timeout(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A helper that never answers (it waits on a child of its own) is given
    credential_timeout (1 s here): the pull is 404 saying it gave no answer in time, and the
    helper and its child are killed, its whole process group."""
    sim.require_bearer("u", "p")
    sim.add_image("team/app", "1", IMAGE)
    bin_dir = tmp_path / "bin"
    executable(
        bin_dir,
        "docker-credential-stuck",
        f'cat > /dev/null\necho $$ > "{tmp_path}/helper.pid"\nsleep 600 &\n'
        f'echo $! > "{tmp_path}/child.pid"\nwait\n',
    )
    config = docker_config(tmp_path, {"credsStore": "stuck"})
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
        "MIRROR_UPSTREAMS__GHCR_IO__CREDENTIAL_TIMEOUT": "1",
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    status, body = await pull(client, proc, "team/app")
    assert status == 404, body
    text = message(body)
    assert "docker-credential-stuck gave no answer within 1s" in text, text
    pids = [int((tmp_path / f"{name}.pid").read_text()) for name in ("helper", "child")]
    await wait_until(lambda: all(_gone(pid) for pid in pids))
    assert [s for s in sim.log if s.path == "/token"] == []


# -- identity tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["identitytoken", "helper <token>"])
async def test_an_identity_token_is_exchanged_by_a_refresh_token_grant(
    source: str,
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """An identity token (config.json's `identitytoken`, or a helper answering Username
    `<token>`) is POSTed to the realm as an OAuth2 refresh-token grant (grant_type,
    refresh_token, service and scope from the challenge, client_id), form-encoded, with no
    Authorization; the access token answered pulls the image. It never goes anywhere as a
    header or query, and the realm's GET (which wants other credentials) is never tried."""
    sim.require_bearer("nobody", "never")
    sim.refresh_tokens = {"refresh-abc"}
    sim.add_image("team/app", "1", IMAGE)
    bin_dir = tmp_path / "bin"
    if source == "identitytoken":
        doc: dict[str, object] = {"auths": {"ghcr.io": {"identitytoken": "refresh-abc"}}}
    else:
        helper(bin_dir, "tokens", tmp_path / "helper.log", {"ghcr.io": ("<token>", "refresh-abc")})
        doc = {"credsStore": "tokens"}
    config = docker_config(tmp_path, doc)
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    status, body = await pull(client, proc, "team/app")
    assert status == 200, body
    assert body == IMAGE.data
    assert sim.token_forms == [
        {
            "grant_type": "refresh_token",
            "refresh_token": "refresh-abc",
            "client_id": "mirror",
            "scope": "repository:team/app:pull",
            "service": "sim",
        }
    ]
    (grant,) = [s for s in sim.log if s.path == "/token"]
    assert grant.method == "POST"
    assert grant.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in grant.headers and grant.query == {}
    assert registry_saw_only_tokens(sim)
    assert not any("refresh-abc" in json.dumps([s.headers, s.query]) for s in sim.log)


# -- credentials that change -----------------------------------------------------------------


async def test_credential_command_runs_again_after_its_lifetime(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """`credential_command` (a program given with arguments, like `aws ecr
    get-login-password --region …`) prints the password of `username`. The password is then
    rotated at the registry and in what the program prints: once credential_lifetime (1 s
    here) has passed, a pull runs the program again and the realm gets the new password."""
    password = tmp_path / "password"
    password.write_text("first-password\n")
    runs = tmp_path / "runs"
    command = executable(
        tmp_path / "bin", "ecr-login", f'echo "$@" >> "{runs}"\ncat "{password}"\n'
    )
    sim.require_bearer("AWS", "first-password")
    sim.add_image("team/app0", "1", IMAGE)
    env = {
        "MIRROR_UPSTREAMS__PUBLIC_ECR_AWS__URL": sim.url,
        "MIRROR_UPSTREAMS__PUBLIC_ECR_AWS__USERNAME": "AWS",
        "MIRROR_UPSTREAMS__PUBLIC_ECR_AWS__CREDENTIAL_COMMAND": f"{command} get-login-password --region eu-west-1",
        "MIRROR_UPSTREAMS__PUBLIC_ECR_AWS__CREDENTIAL_LIFETIME": "1",
    }
    proc = serve(mirror_process, env)
    await asyncio.to_thread(proc.start)
    status, body = await pull(client, proc, "team/app0", "public.ecr.aws")
    assert status == 200, body
    assert runs.read_text().splitlines() == ["get-login-password --region eu-west-1"]
    password.write_text("second-password\n")
    sim.require_bearer("AWS", "second-password")
    deadline = time.monotonic() + 20
    for attempt in range(1, 1000):  # each repository needs a token of its own
        sim.add_image(f"team/app{attempt}", "1", IMAGE)
        status, body = await pull(client, proc, f"team/app{attempt}", "public.ecr.aws")
        if status == 200:
            break
        assert status == 404, body
        assert time.monotonic() < deadline, "the new password was never used"
        await asyncio.sleep(0.1)  # ok: polling a condition with a deadline
    assert len(runs.read_text().splitlines()) >= 2
    seen = realm_authorizations(sim)
    assert seen[0] == basic("AWS", "first-password")
    assert seen[-1] == basic("AWS", "second-password")
    assert set(seen) == {basic("AWS", "first-password"), basic("AWS", "second-password")}


@pytest.mark.parametrize("kept_in", ["auths", "credsStore"])
async def test_a_rewritten_docker_config_is_read_again(
    kept_in: str,
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """config.json replaced on disk (as `docker login` does) after the password changed, in
    its `auths` entry or in the store its `credsStore` helper reads: the next pull that needs
    credentials reads the file again (asking the helper again, long before its 300 s
    credential_lifetime) and the realm gets the new password, with no restart."""
    sim.require_bearer("u", "old-password")
    for repo in ("team/app", "team/other"):
        sim.add_image(repo, "1", IMAGE)
    bin_dir, store = tmp_path / "bin", tmp_path / "store"
    store.write_text("old-password")
    executable(
        bin_dir,
        "docker-credential-file",
        'cat > /dev/null\nprintf \'{"Username":"u","Secret":"%s"}\' "$(cat "'
        + str(store)
        + '")"\n',
    )

    def written(password: str) -> dict[str, object]:
        if kept_in == "credsStore":
            return {"auths": {"ghcr.io": {}}, "credsStore": "file"}
        return {"auths": {"ghcr.io": {"auth": base64.b64encode(f"u:{password}".encode()).decode()}}}

    config = docker_config(tmp_path, written("old-password"))
    env = {
        "MIRROR_UPSTREAMS__GHCR_IO__URL": sim.url,
        "MIRROR_UPSTREAMS__GHCR_IO__DOCKER_CONFIG": str(config),
    }
    proc = serve(mirror_process, env, bin_dir)
    await asyncio.to_thread(proc.start)
    status, body = await pull(client, proc, "team/app")
    assert status == 200, body
    store.write_text("new-password")
    docker_config(tmp_path, written("new-password"))
    sim.require_bearer("u", "new-password")
    status, body = await pull(client, proc, "team/other")
    assert status == 200, body
    assert realm_authorizations(sim) == [basic("u", "old-password"), basic("u", "new-password")]
