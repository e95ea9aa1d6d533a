"""Export and import for air-gapped sites: a cache filled through a mirror in front of the real
registry is exported while that mirror runs, read by skopeo as an OCI archive, imported into an
empty data directory and pulled with skopeo through an offline mirror; a tampered bundle
imports nothing wrong."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import PROJECT, MakeMirror, skopeo_copy
from images import Upstream

REFS = ("test/single:1", "test/multi:1")


async def _mirror(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        *args,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def _digests(dest: Path) -> set[str]:
    return {
        "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        for p in dest.iterdir()
        if p.name not in ("version", "manifest.json") and not p.name.endswith(".manifest.json")
    }


async def test_export_then_import_and_pull_offline(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    source = await make_mirror(upstream.url)
    code, out = await _mirror("prefetch", "--mirror", source.url, *REFS)
    assert code == 0, out
    await source.settled()
    bundle = tmp_path / "bundle.tar"
    code, out = await _mirror(
        "export", "--all", "--out", str(bundle), "--data-dir", str(source.data_dir)
    )
    assert code == 0, out
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert {"oci-layout", "index.json", "mirror-tags.json", "SHA256SUMS"} <= names
    assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]} == {
        f"docker.io/{r}" for r in REFS
    }
    # a standard OCI archive: skopeo reads it
    code, out = await skopeo_copy(
        f"oci-archive:{bundle}:docker.io/test/single:1", tmp_path / "from-archive"
    )
    assert code == 0, out
    assert {b.digest for b in upstream.images["test/single:1"].layers} <= _digests(
        tmp_path / "from-archive"
    )

    site = tmp_path / "site"
    code, out = await _mirror("import", str(bundle), "--data-dir", str(site))
    assert code == 0 and "2 tags" in out and "FAILED" not in out, out
    offline = await make_mirror(upstream.url, "offline = true\n", data_dir=site)
    for ref in REFS:
        dest = tmp_path / ref.replace("/", "_")
        code, out = await skopeo_copy(f"docker://{offline.host}/{ref}", dest, "--all")
        assert code == 0, out
        expected = {b.digest for b in upstream.images[ref].layers}
        assert expected <= _digests(dest)


async def test_a_tampered_bundle_imports_nothing_wrong(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    source = await make_mirror(upstream.url)
    code, out = await _mirror("prefetch", "--mirror", source.url, "test/single:1")
    assert code == 0, out
    await source.settled()
    bundle, tampered = tmp_path / "bundle.tar", tmp_path / "tampered.tar"
    code, out = await _mirror(
        "export", "--out", str(bundle), "--data-dir", str(source.data_dir), "test/single:1"
    )
    assert code == 0, out
    victim = upstream.images["test/single:1"].layers[-1].digest
    with tarfile.open(bundle) as src, tarfile.open(tampered, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            if member.name == f"blobs/sha256/{victim[7:]}":
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.addfile(member, io.BytesIO(data))
    site = tmp_path / "site"
    code, out = await _mirror("import", str(tampered), "--data-dir", str(site))
    assert (
        code == 1
        and f"FAILED: blobs/sha256/{victim[7:]}" in out
        and "FAILED: docker.io/test/single:1" in out
    )
    stored = {p.name for p in (site / "blobs").rglob("*") if p.is_file()}
    assert victim[7:] not in stored
    for name in stored:
        assert (
            hashlib.sha256((site / "blobs" / "sha256" / name[:2] / name).read_bytes()).hexdigest()
            == name
        )
