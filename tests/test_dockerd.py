"""A real dockerd pulling through a real mirror process (`python -m mirror serve`), configured
as the README says: `registry-mirrors` for Docker Hub names, `insecure-registries` for plain
HTTP, and a prefixed name (`<mirror>/ghcr.io/owner/image:tag`) for any other registry.

dockerd is Debian's `docker.io` (see `dockerd.py`). Docker Hub is unreachable from here, and
dockerd's proxy is a closed loopback port, so a Docker Hub pull that succeeds came through the
mirror. The upstreams are real `docker-registry` processes holding images pushed by skopeo.

What dockerd 20.10 sends, as the mirror's access log shows: to a `registry-mirrors` entry,
plain HTTP at once, `library/<name>` in the path for an official image (the full Docker Hub
repository name; `RepoDigests` then says `<name>@…`), no `?ns=` (the mirror routes it to its
default upstream), a HEAD of the tag, a GET of the manifest by digest, then the config and
layers by digest. To a registry it is told is insecure (a prefixed name), a TLS handshake
first, which the mirror answers with a 400, then the same in plain HTTP. A mirror's 404 sends
it on to Docker Hub.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MirrorProcess
from dockerd import Dockerd
from images import Pushed, Upstream, describe_pushed, make_image, push_layout, write_layout
from registry import LOCAL_OPENER, Registry

#: The Docker Hub image of these tests: an official-image name, so dockerd asks the mirror
#: for `library/<name>`. Small, two layers: vfs keeps a full copy of every layer.
HUB_REPO, HUB_TAG = "library/mirrortest", "1"
HUB_REF = f"{HUB_REPO}:{HUB_TAG}"
#: Nothing listens on the discard port: an upstream that refuses connections.
CLOSED_URL = "http://127.0.0.1:9"
#: dockerd's name for the host it runs on, as image indexes spell platforms.
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

StartDockerd = Callable[..., Dockerd]
StartMirror = Callable[..., MirrorProcess]


@dataclass
class Hub:
    """A registry standing in for Docker Hub, with `HUB_REF` pushed to it."""

    registry: Registry
    image: Pushed


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """A fresh `docker-registry` holding `HUB_REF` (an OCI image pushed by skopeo), its own
    because a test here stops it."""
    registry = Registry(tmp_path / "hub")
    registry.start()
    try:
        layout = tmp_path / "hub-layout"
        write_layout(layout, {HUB_TAG: make_image(21, [12_000, 4_000])})
        push_layout(layout, registry.host, HUB_REF, [])
        yield Hub(registry, describe_pushed(registry.host, HUB_REF))
    finally:
        registry.stop()


@pytest.fixture
def dockerd() -> Iterator[StartDockerd]:
    """`dockerd(mirror_host, registry_mirror=True)`: a started dockerd that may talk plain HTTP
    to the mirror, and has it as its Docker Hub mirror unless told otherwise; stopped (its
    process group) and its directory removed at the end. No dockerd fails the test, naming
    the package to install."""
    started: list[Dockerd] = []

    def start(mirror_host: str, registry_mirror: bool = True) -> Dockerd:
        mirrors = [f"http://{mirror_host}"] if registry_mirror else []
        try:
            daemon = Dockerd(mirrors, [mirror_host])
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


# -- helpers -----------------------------------------------------------------------------------


def metric(mirror: MirrorProcess, name: str, **labels: str) -> float:
    """Sum of the mirror's /metrics samples of `name` whose labels include `labels`."""
    with LOCAL_OPENER.open(f"{mirror.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


@dataclass(frozen=True)
class Access:
    """One access-log line of the mirror process (`path` is the path with its query)."""

    method: str
    path: str
    status: int
    outcome: str
    upstream: str


def access_log(mirror: MirrorProcess) -> list[Access]:
    """Every request the mirror process has logged so far, in order (logfmt
    `logger=mirror.access`)."""
    out = []
    for line in mirror.log.read_text(errors="replace").splitlines():
        if "logger=mirror.access" not in line:
            continue
        fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
        out.append(
            Access(
                fields["method"],
                fields["path"].strip('"'),
                int(fields["status"]),
                fields["outcome"],
                fields["upstream"],
            )
        )
    return out


def logged(
    mirror: MirrorProcess,
    until: Callable[[list[Access]], bool],
    since: int = 0,
    timeout: float = 15.0,
) -> list[Access]:
    """The access log from line `since` on, once `until` holds for it (or at the deadline, for
    the caller's assertion to show). The mirror writes its log from a queue, in order, a moment
    after the answer went out: a client can be done before its last lines are in the file."""
    deadline = time.monotonic() + timeout
    while True:
        seen = access_log(mirror)[since:]
        if until(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)  # ok: polling a condition with a deadline


def paths_logged(*paths: str) -> Callable[[list[Access]], bool]:
    return lambda seen: set(paths) <= {a.path for a in seen}


def pull(daemon: Dockerd, ref: str) -> None:
    done = daemon.docker("pull", ref)
    assert done.returncode == 0, (
        f"docker pull {ref}:\n{done.stdout}\n--- dockerd log ---\n{daemon.log_tail()}"
    )


def assert_image(
    daemon: Dockerd, ref: str, manifest_digest: str, config_digest: str, repo_digest_name: str
) -> None:
    """dockerd holds `ref` as the upstream has it: its ID is the config's digest and its repo
    digest is the manifest's (or index's) digest."""
    found = daemon.inspect(ref)
    assert found["Id"] == config_digest, found
    assert found["RepoDigests"] == [f"{repo_digest_name}@{manifest_digest}"], found


def config_digest(pushed: Pushed) -> str:
    """The config of an image, or of the index's child for this host's architecture (the one
    dockerd picks): `Pushed.blobs` lists each child manifest followed by its config."""
    if not pushed.children:
        return pushed.layers[0].digest
    index = json.loads(pushed.data)
    child = next(m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == GOARCH)
    digests = [b.digest for b in pushed.blobs]
    return digests[digests.index(child) + 1]


# -- tests -------------------------------------------------------------------------------------


def test_docker_hub_pull_goes_through_registry_mirrors(
    hub: Hub, mirror_process: StartMirror, dockerd: StartDockerd
) -> None:
    """`docker pull library/<image>:<tag>` with the mirror in `registry-mirrors`: the image
    dockerd stores has the upstream's manifest and config digests; the mirror was asked for
    the tag and every blob under `library/…`, with no `ns`, and fetched them from its
    upstream."""
    mirror = mirror_process(hub.registry.url).start()
    daemon = dockerd(mirror.host)
    info = daemon.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}")
    assert info.returncode == 0 and json.loads(info.stdout) == [f"{mirror.url}/"], info.stdout

    pull(daemon, HUB_REF)

    assert_image(daemon, HUB_REF, hub.image.digest, hub.image.layers[0].digest, "mirrortest")
    expected = {f"/v2/{HUB_REPO}/manifests/{HUB_TAG}"}
    expected |= {f"/v2/{HUB_REPO}/blobs/{b.digest}" for b in hub.image.layers}
    seen = [a for a in logged(mirror, paths_logged(*expected)) if a.path.startswith("/v2/library/")]
    assert expected <= {a.path for a in seen}, seen
    assert all(a.status == 200 and a.upstream == "docker.io" for a in seen), seen
    assert not [a for a in seen if "?" in a.path], "dockerd sent a query (ns=?)"
    upstream_manifests = metric(
        mirror,
        "mirror_upstream_requests_total",
        upstream="docker.io",
        kind="manifest",
        status="200",
    )
    assert upstream_manifests >= 1
    assert metric(mirror, "mirror_blob_lookups_total", source="upstream") == len(hub.image.layers)


def test_docker_pull_again_after_rmi_is_served_from_the_cache_with_upstream_down(
    hub: Hub, mirror_process: StartMirror, dockerd: StartDockerd
) -> None:
    """Pull, `docker rmi`, stop the upstream registry, pull again: the second pull succeeds
    with the same image, dockerd fetched every blob again and each was a cache hit, and the
    mirror sent its upstream nothing more (the tag is within its TTL)."""
    mirror = mirror_process(hub.registry.url).start()
    daemon = dockerd(mirror.host)
    blob_paths = [f"/v2/{HUB_REPO}/blobs/{b.digest}" for b in hub.image.layers]
    pull(daemon, HUB_REF)
    first = len(logged(mirror, paths_logged(*blob_paths)))  # the first pull's lines all in
    asked = metric(mirror, "mirror_upstream_requests_total")

    removed = daemon.docker("rmi", HUB_REF)
    assert removed.returncode == 0, removed.stdout
    assert daemon.docker("image", "inspect", HUB_REF).returncode != 0
    hub.registry.stop()

    pull(daemon, HUB_REF)

    assert_image(daemon, HUB_REF, hub.image.digest, hub.image.layers[0].digest, "mirrortest")
    again = logged(mirror, paths_logged(*blob_paths), since=first)
    blobs = [a for a in again if "/blobs/" in a.path]
    assert sorted(a.path for a in blobs) == sorted(blob_paths), again
    assert all(a.status == 200 and a.outcome == "hit" for a in blobs), again
    assert all(a.status == 200 for a in again), again
    assert metric(mirror, "mirror_upstream_requests_total") == asked


def test_prefixed_pull_of_another_registry_through_path_routing(
    upstream: Upstream, mirror_process: StartMirror, dockerd: StartDockerd, tmp_path: Path
) -> None:
    """`docker pull <mirror>/ghcr.io/<repo>:<tag>` with ghcr.io configured as a second
    upstream (in a file named by MIRROR_CONFIG; Docker Hub's upstream is a closed port):
    dockerd takes the mirror for the registry (trying HTTPS first, as it does for any insecure
    registry: the mirror refuses that handshake with a 400, and dockerd goes on in plain HTTP)
    and asks for `/v2/ghcr.io/<repo>/…`, which the mirror routes to ghcr.io by the path
    prefix. A Docker schema2 image and an OCI index
    (dockerd picks this host's platform) both arrive with the upstream's digests."""
    config = tmp_path / "mirror.toml"
    config.write_text(f'[upstreams."ghcr.io"]\nurl = "{upstream.url}"\n')
    mirror = mirror_process(CLOSED_URL, env={"MIRROR_CONFIG": str(config)}).start()
    daemon = dockerd(mirror.host, registry_mirror=False)

    for ref in ("test/v2s2:1", "test/multi:1"):
        pushed = upstream.images[ref]
        name = f"{mirror.host}/ghcr.io/{pushed.repo}"
        pull(daemon, f"{name}:{pushed.tag}")
        assert_image(daemon, f"{name}:{pushed.tag}", pushed.digest, config_digest(pushed), name)
        tag_path = f"/v2/ghcr.io/{pushed.repo}/manifests/{pushed.tag}"
        prefix = f"/v2/ghcr.io/{pushed.repo}/"
        seen = [a for a in logged(mirror, paths_logged(tag_path)) if a.path.startswith(prefix)]
        assert tag_path in {a.path for a in seen}, seen
        assert all(a.status == 200 and a.upstream == "ghcr.io" for a in seen), seen

    assert metric(mirror, "mirror_upstream_requests_total", upstream="ghcr.io", status="200") >= 1
    assert metric(mirror, "mirror_upstream_requests_total", upstream="docker.io") == 0


def test_a_pull_the_mirror_cannot_serve_falls_back_to_docker_hub(
    hub: Hub, mirror_process: StartMirror, dockerd: StartDockerd
) -> None:
    """The control for the tests above: an image the upstream does not have gets a 404 from
    the mirror, and dockerd moves on to Docker Hub itself (its silent fallback, here a closed
    proxy) and fails; so a pull that succeeds above did come from the mirror."""
    mirror = mirror_process(hub.registry.url).start()
    daemon = dockerd(mirror.host)
    done = daemon.docker("pull", "library/absent:1")
    assert done.returncode != 0
    assert "registry-1.docker.io" in done.stdout, done.stdout
    tag_path = "/v2/library/absent/manifests/1"
    seen = [a for a in logged(mirror, paths_logged(tag_path)) if a.path == tag_path]
    assert seen and all(a.status == 404 for a in seen), seen
