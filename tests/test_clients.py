"""Real clients configured as the README tells operators to: containerd with `hosts.toml`
(per-registry, `_default`, and a prefixed mirror URL with `override_path`) and
containers/image (skopeo, the library podman, CRI-O and buildah share) with a
`registries.conf` mirror entry.

containerd is Debian's package, started here with its own root, state, socket and a minimal
config in a temporary directory (it needs root, as on any node). The `server` of every
`hosts.toml` and the `location` of every `registries.conf` entry is a closed loopback port:
a pull can only succeed through the mirror, and never leaves the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import MakeMirror, Mirror, skopeo_copy
from images import Pushed, Upstream

#: Nothing listens on the discard port: the "origin" a client falls back to if the mirror fails.
CLOSED = "127.0.0.1:9"
NAMESPACE = "mirror-test"

CONTAINERD_CONFIG = """\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{root}/containerd.sock"

[ttrpc]
  address = "{root}/containerd-ttrpc.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""


@dataclass
class Containerd:
    """A running containerd: `ctr` runs the client against its socket in our namespace."""

    address: str
    proc: subprocess.Popen[bytes]
    log: Path

    async def ctr(self, *args: str) -> tuple[int, str]:
        """Run `ctr` without blocking the loop (the in-process mirror must keep serving)."""
        proc = await asyncio.create_subprocess_exec(
            "ctr",
            "--address",
            self.address,
            "--namespace",
            NAMESPACE,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace")

    async def content(self, digest: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            "ctr",
            "--address",
            self.address,
            "--namespace",
            NAMESPACE,
            "content",
            "get",
            digest,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")
        return out

    async def image_digest(self, ref: str) -> str:
        """The target digest containerd recorded for an image name (`ctr image ls`)."""
        code, out = await self.ctr("image", "ls")
        assert code == 0, out
        for line in out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"{ref} not in containerd's images:\n{out}")


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """containerd with everything under a short temporary directory (unix socket paths are
    limited to 108 bytes, so not under pytest's long tmp_path), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    config = root / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(root=root))
    log = root / "containerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config), "--log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    daemon = Containerd(str(root / "containerd.sock"), proc, log)
    try:
        _wait_serving(daemon)
        yield daemon
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_serving(daemon: Containerd, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"containerd exited:\n{daemon.log.read_text()[-2000:]}")
        if Path(daemon.address).exists():
            version = subprocess.run(
                ["ctr", "--address", daemon.address, "version"], capture_output=True, timeout=10
            )
            if version.returncode == 0:
                return
        time.sleep(0.05)  # ok: polling a condition with a deadline
    raise RuntimeError(f"containerd did not serve in time:\n{daemon.log.read_text()[-2000:]}")


def write_hosts(hosts_dir: Path, namespace: str, text: str) -> None:
    (hosts_dir / namespace).mkdir(parents=True, exist_ok=True)
    (hosts_dir / namespace / "hosts.toml").write_text(text)


def mirror_toml(upstream: Upstream, *hosts: str) -> str:
    """More upstreams, all pointing at the test registry."""
    return "".join(f'[upstreams."{h}"]\nurl = "{upstream.url}"\n' for h in hosts)


def requests_for(mirror: Mirror, prefix: str) -> list[str]:
    return [p for _, p in mirror.seen if p.startswith(prefix)]


async def assert_containerd_has(daemon: Containerd, ref: str, pushed: Pushed) -> None:
    """The image containerd recorded has the upstream's digest, and every manifest and blob
    it references is in its content store with bytes that hash to their digest."""
    assert await daemon.image_digest(ref) == pushed.digest
    assert await daemon.content(pushed.digest) == pushed.data
    for blob in pushed.blobs:
        data = await daemon.content(blob.digest)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
        assert len(data) == blob.size


# -- containerd ------------------------------------------------------------------------------


async def test_containerd_pulls_through_the_mirror_per_registry_hosts_toml(
    upstream: Upstream, make_mirror: MakeMirror, containerd: Containerd, tmp_path: Path
) -> None:
    """`certs.d/docker.io/hosts.toml` with the mirror as a `[host]`: `ctr image pull`
    (unpacked) gets the upstream's digests, and the mirror saw every request with
    `ns=docker.io`."""
    mirror = await make_mirror(upstream.url)
    hosts = tmp_path / "certs.d"
    write_hosts(
        hosts,
        "docker.io",
        f'server = "http://{CLOSED}"\n\n'
        f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    code, out = await containerd.ctr(
        "image",
        "pull",
        "--hosts-dir",
        str(hosts),
        "--snapshotter",
        "native",
        "docker.io/test/single:1",
    )
    assert code == 0, out
    await assert_containerd_has(
        containerd, "docker.io/test/single:1", upstream.images["test/single:1"]
    )
    seen = requests_for(mirror, "/v2/test/single/")
    assert seen
    assert all(parse_qs(urlsplit(p).query)["ns"] == ["docker.io"] for p in seen), seen
    await mirror.settled()
    assert len(mirror.blob_files()) == len(upstream.images["test/single:1"].layers)


async def test_containerd_default_hosts_toml_serves_any_registry(
    upstream: Upstream, make_mirror: MakeMirror, containerd: Containerd, tmp_path: Path
) -> None:
    """`certs.d/_default/hosts.toml` with the mirror as `server`: a registry that has no
    directory of its own (ghcr.io) is pulled through the mirror, all platforms of an index,
    routed there by `ns=ghcr.io`."""
    mirror = await make_mirror(upstream.url, toml=mirror_toml(upstream, "ghcr.io"))
    hosts = tmp_path / "certs.d"
    write_hosts(
        hosts,
        "_default",
        f'server = "{mirror.url}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    code, out = await containerd.ctr(
        "content", "fetch", "--hosts-dir", str(hosts), "--all-platforms", "ghcr.io/test/multi:1"
    )
    assert code == 0, out
    await assert_containerd_has(containerd, "ghcr.io/test/multi:1", upstream.images["test/multi:1"])
    seen = requests_for(mirror, "/v2/test/multi/")
    assert seen
    assert all(parse_qs(urlsplit(p).query)["ns"] == ["ghcr.io"] for p in seen), seen


async def test_containerd_prefixed_mirror_with_override_path(
    upstream: Upstream, make_mirror: MakeMirror, containerd: Containerd, tmp_path: Path
) -> None:
    """A `[host."http://mirror/v2/quay.io"]` with `override_path = true` (for clients or
    proxies that need the registry in the path): containerd sends the prefix and `ns`, and
    the mirror serves quay.io's image from it."""
    mirror = await make_mirror(upstream.url, toml=mirror_toml(upstream, "quay.io"))
    hosts = tmp_path / "certs.d"
    write_hosts(
        hosts,
        "quay.io",
        f'server = "http://{CLOSED}"\n\n'
        f'[host."{mirror.url}/v2/quay.io"]\n  capabilities = ["pull", "resolve"]\n'
        "  override_path = true\n",
    )
    code, out = await containerd.ctr(
        "content", "fetch", "--hosts-dir", str(hosts), "quay.io/test/v2s2:1"
    )
    assert code == 0, out
    await assert_containerd_has(containerd, "quay.io/test/v2s2:1", upstream.images["test/v2s2:1"])
    seen = requests_for(mirror, "/v2/quay.io/test/v2s2/")
    assert seen
    assert requests_for(mirror, "/v2/test/") == []


# -- containers/image (skopeo; podman, CRI-O and buildah read the same file) -------------------


async def test_registries_conf_mirror_for_docker_io_and_a_prefixed_registry(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A v2 `registries.conf` with `[[registry.mirror]]` entries: `docker.io/…` is pulled
    through the mirror as `/v2/<repo>`, and `ghcr.io/…` through `mirror/ghcr.io` as a path
    prefix, both with the upstream's digests, the primary locations never reached."""
    mirror = await make_mirror(upstream.url, toml=mirror_toml(upstream, "ghcr.io"))
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nprefix = "docker.io"\nlocation = "{CLOSED}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n\n'
        f'[[registry]]\nprefix = "ghcr.io"\nlocation = "{CLOSED}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror.host}/ghcr.io"\ninsecure = true\n'
    )
    for ref, path in (
        ("docker.io/test/single:1", "/v2/test/single/"),
        ("ghcr.io/test/v2s2:1", "/v2/ghcr.io/test/v2s2/"),
    ):
        pushed = upstream.images[ref.split("/", 1)[1]]
        dest = tmp_path / ref.replace("/", "_")
        # --registries-conf: a root flag of skopeo's (accepted after `copy`, not in its help)
        code, out = await skopeo_copy(f"docker://{ref}", dest, "--registries-conf", str(conf))
        assert code == 0, out
        assert _sha256(dest / "manifest.json") == pushed.digest
        for blob in pushed.layers:
            assert _sha256(dest / blob.digest.split(":")[1]) == blob.digest
        assert requests_for(mirror, path), mirror.seen


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
