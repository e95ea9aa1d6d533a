"""Deterministic test images, built in pure Python and pushed to a registry with skopeo.

Content is generated from fixed seeds with fixed tar/gzip metadata, so every digest is
identical on every run and machine; tests can therefore reason about exact digests, and
the same in-memory images can be loaded into the simulator (`UpstreamSim.add_image`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import subprocess
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import LOCAL_OPENER

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

BIG_REF = "test/big:1"
BIG_PAYLOAD_SIZE = 32 * 1024 * 1024


def sha256_digest(data: bytes) -> str:
    """`sha256:<hex>` of `data`, the content address every registry uses."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Stable JSON bytes, so manifests (and hence their digests) never vary."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """A descriptor: what tests need to fetch and verify one piece of content."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Image:
    """An image manifest or index held in memory with all the bytes it references.

    `blobs` are this manifest's own config + layers (by digest); an index has no blobs
    but `children`, its platform manifests.
    """

    media_type: str
    data: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    children: tuple[Image, ...] = ()

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> Blob:
        return Blob(self.digest, self.size, self.media_type)

    def all_blobs(self) -> dict[str, bytes]:
        """Every blob reachable from this manifest, children included."""
        out = dict(self.blobs)
        for child in self.children:
            out.update(child.all_blobs())
        return out


def _layer(seed: int, size: int) -> tuple[bytes, bytes]:
    """A tar holding one file of seeded random bytes: (uncompressed tar, gzip of it).

    Random bytes are incompressible, so sizes stay predictable; fixed tar metadata, no
    padding to tar's 10 KiB record size (so layer sizes differ), gzip level 0 and mtime 0
    keep the blob fast to build and byte-for-byte reproducible.
    """
    payload = random.Random(seed).randbytes(size)
    info = tarfile.TarInfo(f"data/{seed}.bin")
    info.size, info.mtime, info.mode = size, 0, 0o644
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    raw = header + payload + bytes(-size % tarfile.BLOCKSIZE) + bytes(2 * tarfile.BLOCKSIZE)
    return raw, gzip.compress(raw, compresslevel=0, mtime=0)


def make_image(seed: int, layer_sizes: list[int], arch: str = "amd64") -> Image:
    """An OCI image manifest with one gzip layer per entry of `layer_sizes`."""
    layers = [_layer(seed * 100 + i, size) for i, size in enumerate(layer_sizes)]
    config = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [f"SEED={seed}"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(r) for r, _ in layers]},
        }
    )
    blobs = {sha256_digest(config): config} | {sha256_digest(gz): gz for _, gz in layers}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(gz), "size": len(gz)}
            for _, gz in layers
        ],
    }
    return Image(OCI_MANIFEST, canonical_json(manifest), blobs)


def make_index(children: dict[str, Image]) -> Image:
    """An OCI image index over `children`, keyed by architecture (all linux)."""
    manifests = [
        {
            "mediaType": child.media_type,
            "digest": child.digest,
            "size": child.size,
            "platform": {"architecture": arch, "os": "linux"},
        }
        for arch, child in children.items()
    ]
    data = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    return Image(OCI_INDEX, data, children=tuple(children.values()))


@functools.cache
def build_images() -> dict[str, Image]:
    """All test images by reference, in memory (cached: the big one is 32 MiB).

    `test/v2s2:1` is the OCI source that `push_all` converts to Docker schema2 on push.
    """
    single1 = make_image(1, [11_000, 23_000, 5_000])
    return {
        "test/single:1": single1,
        "test/single:2": make_image(2, [15_000, 2_000]),
        "test/single:latest": single1,
        "test/multi:1": make_index(
            {"amd64": make_image(3, [13_000], "amd64"), "arm64": make_image(4, [17_000], "arm64")}
        ),
        "test/v2s2:1": make_image(5, [19_000, 7_000]),
        BIG_REF: make_image(6, [BIG_PAYLOAD_SIZE]),
    }


def big_layer() -> Blob:
    """Descriptor of the ~32 MiB layer of `test/big:1` (skopeo pushes it unchanged)."""
    manifest = json.loads(build_images()[BIG_REF].data)
    layer = manifest["layers"][0]
    return Blob(layer["digest"], layer["size"], layer["mediaType"])


def write_layout(path: Path, tagged: dict[str, Image]) -> None:
    """Write an OCI image layout at `path` with each image named by its tag."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> None:
        target = blobs / sha256_digest(data).removeprefix("sha256:")
        if not target.exists():
            target.write_bytes(data)

    entries = []
    for tag, image in tagged.items():
        for node in (image, *image.children):
            put(node.data)
            for data in node.blobs.values():
                put(data)
        entry = {"mediaType": image.media_type, "digest": image.digest, "size": image.size}
        entries.append(entry | {"annotations": {"org.opencontainers.image.ref.name": tag}})
    (path / "index.json").write_bytes(canonical_json({"schemaVersion": 2, "manifests": entries}))


@dataclass(frozen=True)
class Pushed:
    """What the upstream registry reports for one pushed reference.

    `blobs` lists everything the manifest references, in fetch order: for an image its
    config then layers; for an index its child manifests (manifest media types, fetched
    via /manifests/) each followed by that child's config and layers (via /blobs/).
    """

    ref: str
    digest: str
    media_type: str
    data: bytes
    blobs: tuple[Blob, ...]

    @property
    def repo(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def children(self) -> tuple[Blob, ...]:
        """Child manifests of an index (empty for an image)."""
        return tuple(b for b in self.blobs if b.media_type in MANIFEST_TYPES)

    @property
    def layers(self) -> tuple[Blob, ...]:
        """The /blobs/ entries only: configs and layers."""
        return tuple(b for b in self.blobs if b.media_type not in MANIFEST_TYPES)


@dataclass(frozen=True)
class Upstream:
    """A registry holding the pushed test images: where it is and what it reports.

    `images` maps "test/single:1"-style references to `Pushed`; `big_layer` is the
    ~32 MiB layer of `test/big:1`.
    """

    url: str
    host: str
    images: dict[str, Pushed]
    big_layer: Blob


def push_layout(layout: Path, registry_host: str, ref: str, extra: list[str]) -> None:
    """Push one tag from an OCI layout, retrying twice; raise with skopeo's stderr if it fails."""
    tag = ref.rsplit(":", 1)[1]
    cmd = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        *extra,
        f"oci:{layout}:{tag}",
        f"docker://{registry_host}/{ref}",
    ]
    for _ in range(3):  # concurrent pushes of shared blobs can race inside distribution (500)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def fetch_manifest(registry_host: str, repo: str, ref: str) -> tuple[bytes, str, str]:
    """GET a manifest accepting all four types: (bytes, media type, Docker-Content-Digest)."""
    req = urllib.request.Request(
        f"http://{registry_host}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL}
    )
    with LOCAL_OPENER.open(req, timeout=10) as resp:
        data: bytes = resp.read()
        return data, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]


def describe_pushed(registry_host: str, ref: str) -> Pushed:
    """Read back a pushed reference and list what it references, as the upstream has it."""
    repo, tag = ref.rsplit(":", 1)
    data, media_type, digest = fetch_manifest(registry_host, repo, tag)
    assert digest == sha256_digest(data), f"{ref}: digest header does not match body"
    doc = json.loads(data)
    blobs: list[Blob] = []
    if media_type in INDEX_TYPES:
        for child in doc["manifests"]:
            blobs.append(Blob(child["digest"], child["size"], child["mediaType"]))
            child_doc = json.loads(fetch_manifest(registry_host, repo, child["digest"])[0])
            blobs.extend(_image_blobs(child_doc))
    else:
        blobs.extend(_image_blobs(doc))
    return Pushed(ref, digest, media_type, data, tuple(blobs))


def _image_blobs(doc: dict[str, Any]) -> list[Blob]:
    """Config then layers of an image manifest, as descriptors."""
    return [Blob(d["digest"], d["size"], d["mediaType"]) for d in [doc["config"], *doc["layers"]]]


def push_all(registry_host: str, workdir: Path) -> dict[str, Pushed]:
    """Write layouts under `workdir`, push every test image, and describe the results.

    Keys are references ("test/single:1", ...). Pushes run concurrently (each is a
    separate skopeo process and mostly waits on I/O), which keeps the session setup short.
    """
    images = build_images()
    by_repo: dict[str, dict[str, Image]] = {}
    for ref, image in images.items():
        repo, tag = ref.rsplit(":", 1)
        by_repo.setdefault(repo, {})[tag] = image
    for repo, tagged in by_repo.items():
        write_layout(workdir / repo.replace("/", "_"), tagged)

    def push(ref: str) -> None:
        repo = ref.rsplit(":", 1)[0]
        extra = {"test/multi:1": ["--all"], "test/v2s2:1": ["--format", "v2s2"]}.get(ref, [])
        push_layout(workdir / repo.replace("/", "_"), registry_host, ref, extra)

    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        list(pool.map(push, images))
    return {ref: describe_pushed(registry_host, ref) for ref in images}
