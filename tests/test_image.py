"""The image of `deploy/Dockerfile`, built and run by a real dockerd (Debian's `docker.io`, see
`dockerd.py`: vfs, no bridge, no iptables, its own root and socket).

No registry holding `python:3.11-slim` is reachable from here, so the base is made locally: a
Debian bookworm root (whose python3 is 3.11) by `debootstrap --variant=minbase` with python3 and
python3-venv, from the Debian archive this machine's apt uses, imported with `docker import` and
given to the Dockerfile as its `BASE` build argument. The build does not go to PyPI either: the
project's build and run dependencies are first downloaded as wheels by the host's pip (an
install step, as debootstrap is) into a simple index served on 127.0.0.1, which the build's pip
gets as `PIP_INDEX_URL`. To reach it the build runs with `--network host` (with no bridge, host
and none are dockerd's only network modes), and with the classic builder: BuildKit would first
fetch the Dockerfile's `# syntax=docker/dockerfile:1` frontend from Docker Hub.

The image then runs with `--network host`, told to listen on a free loopback port in front of a
real `docker-registry` holding an image pushed by skopeo: `/healthz` answers, the serving process
runs as uid 10001, a pull through it (skopeo, and a plain GET of the manifest) has the upstream's
bytes, and a new container on the same volume serves them again with the upstream stopped. With
`--network none` (a network namespace with only its own loopback) it runs its own command, on
port 5000, and its own HEALTHCHECK, run every second, reports it healthy.

Apart from debootstrap's and pip's downloads, every connection is to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import os
import re
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dockerd import Dockerd, binaries
from image_base import (
    KEYRING,
    PREPARED,
    Preparation,
    dependencies,
    remove_root,
    requirement_name,
    tail,
    tool,
)
from images import (
    OCI_MANIFEST,
    Pushed,
    describe_pushed,
    make_image,
    push_layout,
    sha256_digest,
    write_layout,
)
from registry import LOCAL_OPENER, REGISTRY_BINARY, Registry, free_port

PROJECT = Path(__file__).resolve().parent.parent
DOCKERFILE = PROJECT / "deploy" / "Dockerfile"

BASE_REF = "localbase:bookworm"
#: The PATH official images set (`docker import` sets no environment).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

IMAGE_REF = "mirror-test:image"
UID = 10001
DATA_DIR = "/var/lib/mirror"
#: The image the upstream registry holds: small, two layers.
REPO, TAG = "test/image", "1"

#: debootstrap (about a minute, begun with the session: image_base.py) and the build (1 to 3
#: minutes: on vfs every step of the classic builder copies the whole root) are waited for by
#: the first test that asks for the image; each step has a timeout of its own, and all of them
#: fit in this one.
pytestmark = pytest.mark.timeout(2400)

_names = itertools.count()


# -- tools -------------------------------------------------------------------------------------


def require_tools() -> None:
    """Fail (not skip) naming every missing tool and the Debian package that has it."""
    missing = [
        f"{name} (apt-get install -y {package})"
        for name, package in (("debootstrap", "debootstrap"), ("tar", "tar"), ("skopeo", "skopeo"))
        if tool(name) is None
    ]
    if not Path(REGISTRY_BINARY).is_file():
        missing.append(f"{REGISTRY_BINARY} (apt-get install -y docker-registry)")
    if not KEYRING.is_file():
        missing.append(f"{KEYRING} (apt-get install -y debian-archive-keyring)")
    try:
        binaries()
    except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
        needs = "; ".join(missing)
        pytest.fail(
            f"tests/test_image.py needs what is not installed: {needs} "
            "(`make install-test-deps` should install the packages)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("tests/test_image.py runs debootstrap and dockerd: run it as root (as CI does)")


# -- the base image ----------------------------------------------------------------------------


def import_root(daemon: Dockerd, root: Path, log: Path) -> None:
    """`tar -C root -c . | docker import - BASE_REF`, with the PATH official images set."""
    with log.open("ab") as err:
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        done = subprocess.run(
            [daemon.docker_cli, "import", "--change", f"ENV PATH={BASE_PATH}", "-", BASE_REF],
            stdin=tar.stdout,
            env=daemon.cli_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        try:
            tar.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tar.kill()
            tar.wait()
    assert tar.returncode == 0, f"tar exited with {tar.returncode}:\n{tail(log)}"
    assert done.returncode == 0, f"docker import:\n{done.stdout}{done.stderr}"


# -- the package index the build installs from ------------------------------------------------


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(URL, request lines served so far) of an HTTP server on 127.0.0.1 serving `root`."""
    served: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            served.append(fmt % args)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- the built image ---------------------------------------------------------------------------


@dataclass
class Built:
    """The image built by `daemon`, and what building it took."""

    daemon: Dockerd
    ref: str
    #: The request lines the package index answered during the build.
    index_requests: list[str]
    debootstrap_seconds: float
    build_seconds: float


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """A dockerd, the base imported into it, and deploy/Dockerfile built on it from the
    repository root; the images and the dockerd (its whole data root) removed at the end.
    Asked for through `image()`, from the test body."""
    require_tools()
    # debootstrap and the wheels began with the session (conftest.py); made here otherwise
    preparation = PREPARED[0] if PREPARED else Preparation(tmp_path_factory.mktemp("image"))
    daemon = Dockerd([], [], in_memory=True)
    daemon.cli_env["DOCKER_BUILDKIT"] = "0"  # the classic builder (see the module docstring)
    try:
        daemon.start()
        base = preparation.result(timeout=900)
        debootstrap_seconds = base.debootstrap_seconds
        try:
            import_root(daemon, base.root, base.work / "import.log")
        finally:
            remove_root(base.root)
        index = base.index
        with serve_directory(index) as (index_url, served):
            started = time.monotonic()
            done = daemon.docker(
                "build",
                "--network",
                "host",
                "--force-rm",
                "--build-arg",
                f"BASE={BASE_REF}",
                "--build-arg",
                f"PIP_INDEX_URL={index_url}",
                "--file",
                str(DOCKERFILE),
                "--tag",
                IMAGE_REF,
                str(PROJECT),
                timeout=900,
            )
            build_seconds = time.monotonic() - started
        assert done.returncode == 0, f"docker build:\n{done.stdout[-8000:]}"
        print(f"\ntest_image: debootstrap {debootstrap_seconds:.0f}s, build {build_seconds:.0f}s")
        yield Built(daemon, IMAGE_REF, served, debootstrap_seconds, build_seconds)
    finally:
        if daemon.proc is not None:
            daemon.docker("rmi", "--force", IMAGE_REF, BASE_REF)
            daemon.docker("image", "prune", "--force")  # the build stage's image
        daemon.stop()
        if not PREPARED:
            preparation.close()


def image(request: pytest.FixtureRequest) -> Built:
    """The built image, asked for from the test body, so that a missing tool or a failed step
    fails the test (rather than erroring its setup), and every later test of the module with
    the same error, without trying again."""
    built: Built = request.getfixturevalue("built_image")
    return built


# -- containers --------------------------------------------------------------------------------


class Containers:
    """The containers and named volumes a test makes, removed (with the containers' anonymous
    volumes) at its end."""

    def __init__(self) -> None:
        self.daemon: Dockerd | None = None
        self.names: list[str] = []
        self.volumes: list[str] = []

    def run(self, built: Built, *args: str) -> str:
        """`docker run --detach --name <new name> *args`: the container's name."""
        self.daemon = built.daemon
        name = f"mirror-test-{next(_names)}"
        self.names.append(name)
        done = built.daemon.docker("run", "--detach", "--name", name, *args)
        assert done.returncode == 0, f"docker run {shlex.join(args)}:\n{done.stdout}"
        return name

    def volume(self, built: Built) -> str:
        self.daemon = built.daemon
        name = f"mirror-test-data-{next(_names)}"
        self.volumes.append(name)
        return name

    def close(self) -> None:
        if self.daemon is None:
            return
        for name in reversed(self.names):
            self.daemon.docker("rm", "--force", "--volumes", name)
        for volume in self.volumes:
            self.daemon.docker("volume", "rm", "--force", volume)


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    yield made
    made.close()


def container(daemon: Dockerd, name: str) -> dict[str, Any]:
    """`docker container inspect` of one container, parsed."""
    done = daemon.docker("container", "inspect", name)
    assert done.returncode == 0, done.stdout
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found[0]


def logs(daemon: Dockerd, name: str) -> str:
    return daemon.docker("logs", "--tail", "50", name).stdout


@dataclass
class Mirror:
    """A mirror container: its name, the host:port it listens on, and its first /healthz."""

    name: str
    host: str
    health: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def start_mirror(containers: Containers, built: Built, upstream_url: str, *args: str) -> Mirror:
    """The image on the host's network (with `args` before the image), its command told to
    listen on a free loopback port with `upstream_url` as its upstream; returned once it
    answers `/healthz` (any status)."""
    port = free_port()
    name = containers.run(
        built,
        "--network",
        "host",
        *args,
        built.ref,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        DATA_DIR,
        "--upstream",
        upstream_url,
    )
    mirror = Mirror(name, f"127.0.0.1:{port}")
    mirror.health = wait_for_answer(built.daemon, name, f"{mirror.url}/healthz")
    return mirror


def wait_for_answer(daemon: Dockerd, name: str, url: str, timeout: float = 60.0) -> int:
    """The status of the first HTTP answer from `url`; fails if the container stops first or
    nothing answers within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with LOCAL_OPENER.open(url, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            pass
        state = container(daemon, name)["State"]
        assert state["Running"], f"{name} stopped ({state}):\n{logs(daemon, name)}"
        assert time.monotonic() < deadline, f"{url}: no answer in {timeout}s:\n{logs(daemon, name)}"
        time.sleep(0.1)  # ok: polling a condition with a deadline


# -- the upstream ------------------------------------------------------------------------------


@dataclass
class Hub:
    """A `docker-registry` with `REPO:TAG` pushed to it by skopeo."""

    registry: Registry
    image: Pushed


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Callable[[], Hub]]:
    """`hub()`: a fresh registry holding `REPO:TAG`, started from the test body (after the
    tools are checked); stopped at the end."""
    started: list[Registry] = []

    def start() -> Hub:
        registry = Registry(tmp_path / f"hub{len(started)}")
        started.append(registry)
        registry.start()
        layout = tmp_path / f"layout{len(started)}"
        write_layout(layout, {TAG: make_image(31, [9_000, 3_000])})
        push_layout(layout, registry.host, f"{REPO}:{TAG}", [])
        return Hub(registry, describe_pushed(registry.host, f"{REPO}:{TAG}"))

    yield start
    for registry in started:
        registry.stop()


def skopeo_pull(mirror: Mirror, dest: Path) -> None:
    """`skopeo copy docker://<mirror>/REPO:TAG dir:dest`, plain HTTP."""
    cmd = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--retry-times",
        "0",
        f"docker://{mirror.host}/{REPO}:{TAG}",
        f"dir:{dest}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{shlex.join(cmd)}:\n{done.stdout}{done.stderr}"


def assert_pulled(dest: Path, pushed: Pushed) -> None:
    """A `dir:` copy holds the upstream's manifest byte for byte and every blob it references,
    each of its size and digest."""
    assert (dest / "manifest.json").read_bytes() == pushed.data
    for blob in pushed.layers:
        data = (dest / blob.digest.removeprefix("sha256:")).read_bytes()
        assert (len(data), sha256_digest(data)) == (blob.size, blob.digest), blob


# -- tests -------------------------------------------------------------------------------------


def test_image_builds_on_a_local_base_from_a_local_index(request: pytest.FixtureRequest) -> None:
    """deploy/Dockerfile builds with `BASE` a debootstrapped bookworm and its pip installing
    every dependency from the local index; the image starts from that base and has the
    Dockerfile's user, volume, port, healthcheck and command, and no build argument in its
    environment."""
    built = image(request)
    found: Any = built.daemon.inspect(built.ref)
    base: Any = built.daemon.inspect(BASE_REF)
    base_layers = base["RootFS"]["Layers"]
    assert found["RootFS"]["Layers"][: len(base_layers)] == base_layers

    asked = {line.split()[1].strip("/").split("/")[0] for line in built.index_requests}
    assert {requirement_name(r) for r in dependencies()} <= asked, built.index_requests

    config = found["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Volumes"] == {DATA_DIR: {}}
    assert config["ExposedPorts"] == {"5000/tcp": {}}
    assert config["Entrypoint"] == ["mirror"]
    assert config["Cmd"][0] == "serve"
    assert config["Cmd"][config["Cmd"].index("--data-dir") + 1] == DATA_DIR
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert not [e for e in config["Env"] if e.startswith(("PIP_", "BASE="))], config["Env"]


def test_image_serves_as_uid_10001_and_pulls_through_from_a_real_registry(
    request: pytest.FixtureRequest,
    hub: Callable[[], Hub],
    containers: Containers,
    tmp_path: Path,
) -> None:
    """`docker run --network host <image> serve --listen 127.0.0.1:<port> --upstream <registry>`:
    `/healthz` answers 200; the serving process's real, effective, saved and filesystem uids
    and gids are all 10001; the manifest by tag comes back as the upstream has it (bytes,
    digest header, media type), and a skopeo pull through the mirror has every blob."""
    built = image(request)
    upstream = hub()
    mirror = start_mirror(containers, built, upstream.registry.url)
    assert mirror.health == 200

    state = container(built.daemon, mirror.name)["State"]
    proc = Path(f"/proc/{state['Pid']}")
    status = proc.joinpath("status").read_text()
    ids = {k: v.split() for k, v in re.findall(r"^(Uid|Gid):\s+(.*)$", status, re.MULTILINE)}
    assert ids == {"Uid": [str(UID)] * 4, "Gid": [str(UID)] * 4}, status
    assert b"serve" in proc.joinpath("cmdline").read_bytes().split(b"\0")

    manifest_request = urllib.request.Request(
        f"{mirror.url}/v2/{REPO}/manifests/{TAG}", headers={"Accept": OCI_MANIFEST}
    )
    with LOCAL_OPENER.open(manifest_request, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == upstream.image.digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.read() == upstream.image.data

    skopeo_pull(mirror, tmp_path / "pulled")
    assert_pulled(tmp_path / "pulled", upstream.image)


def test_image_cache_on_its_volume_outlives_the_container_and_the_upstream(
    request: pytest.FixtureRequest,
    hub: Callable[[], Hub],
    containers: Containers,
    tmp_path: Path,
) -> None:
    """A pull through a container with a named volume at /var/lib/mirror; `docker stop` (the
    mirror, as PID 1, exits 0 on SIGTERM); the upstream stopped; a new container on the same
    volume serves the same pull from what the first one wrote there as uid 10001."""
    built = image(request)
    upstream = hub()
    volume = containers.volume(built)
    mount = ["--volume", f"{volume}:{DATA_DIR}"]
    first = start_mirror(containers, built, upstream.registry.url, *mount)
    skopeo_pull(first, tmp_path / "first")
    assert_pulled(tmp_path / "first", upstream.image)

    stopped = built.daemon.docker("stop", "--time", "30", first.name, timeout=60)
    assert stopped.returncode == 0, stopped.stdout
    state = container(built.daemon, first.name)["State"]
    assert (state["Running"], state["ExitCode"]) == (False, 0), logs(built.daemon, first.name)
    upstream.registry.stop()

    second = start_mirror(containers, built, upstream.registry.url, *mount)
    assert second.health == 200
    skopeo_pull(second, tmp_path / "second")
    assert_pulled(tmp_path / "second", upstream.image)


def test_image_healthcheck_reports_healthy_with_the_image_command(
    request: pytest.FixtureRequest, containers: Containers
) -> None:
    """The image as shipped, with its own command (0.0.0.0:5000) in a network namespace of its
    own (`--network none`: only loopback), its HEALTHCHECK run every second instead of every
    30: Docker reports it healthy from the image's own check command; the cache is an
    anonymous volume at /var/lib/mirror."""
    built = image(request)
    name = containers.run(built, "--network", "none", "--health-interval", "1s", built.ref)
    found = container(built.daemon, name)
    shipped: Any = built.daemon.inspect(built.ref)["Config"]
    assert found["Config"]["Healthcheck"]["Test"] == shipped["Healthcheck"]["Test"]
    mounts = [(m["Type"], m["Destination"]) for m in found["Mounts"]]
    assert mounts == [("volume", DATA_DIR)], found["Mounts"]

    deadline = time.monotonic() + 90
    while True:
        state = container(built.daemon, name)["State"]
        health = state.get("Health") or {}
        if health.get("Status") == "healthy":
            break
        assert state["Running"], f"{name} stopped ({state}):\n{logs(built.daemon, name)}"
        assert health.get("Status") != "unhealthy", health
        assert time.monotonic() < deadline, f"not healthy in 90s: {health}"
        time.sleep(0.2)  # ok: polling a condition with a deadline
    assert health["Log"][-1]["ExitCode"] == 0, health
