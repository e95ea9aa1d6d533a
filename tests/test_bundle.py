"""Export and import for air-gapped sites: a cache filled through a mirror in front of the real
registry is exported while that mirror runs, read by skopeo as an OCI archive, imported into an
empty data directory and pulled with skopeo through an offline mirror; a tampered bundle
imports nothing wrong: not a wrong blob, not a tag its tag file moved or dated ahead, and,
when signatures are required, nothing from a bundle not signed by a trusted key or altered
after it was signed."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import PROJECT, MakeMirror, ed25519_keys, skopeo_copy
from images import ACCEPT_ALL, OCI_CONFIG, OCI_MANIFEST, Upstream

from mirror.cache import opened_cache
from mirror.config import load_config
from mirror.oci.reference import parse_digest
from mirror.store.tags import TagRecord

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


# -- the tag file, signatures ------------------------------------------------------------------


async def _filled(upstream: Upstream, make_mirror: MakeMirror, *refs: str) -> Path:
    """A cache that pulled `refs` through a mirror in front of the real registry."""
    source = await make_mirror(upstream.url)
    code, out = await _mirror("prefetch", "--mirror", source.url, *refs)
    assert code == 0, out
    await source.settled()
    return source.data_dir


async def _export(data_dir: Path, bundle: Path, *flags: str) -> None:
    code, out = await _mirror(
        "export", "--all", "--out", str(bundle), "--data-dir", str(data_dir), *flags
    )
    assert code == 0, out


def _rewrite(
    src: Path,
    dst: Path,
    change: Callable[[str, bytes], bytes | None],
    add: dict[str, bytes] | None = None,
) -> None:
    """Copy a bundle member by member through `change` (None drops the member), then append
    `add`: what someone with the file on its way to the site can do."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
        for item in tar:
            reader = tar.extractfile(item)
            data = change(item.name, reader.read() if reader is not None else b"")
            if data is not None:
                item.size = len(data)
                out.addfile(item, io.BytesIO(data))
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def _entries(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """A JSON document of the bundle with `change` applied to each of its tag entries (the
    tag file's list, or index.json's descriptors)."""
    doc = json.loads(data)
    for entry in doc if isinstance(doc, list) else doc["manifests"]:
        change(entry)
    if isinstance(doc, dict):
        doc["manifests"] = [d for d in doc["manifests"] if d]
    return json.dumps(doc).encode()


def _tag_records(data_dir: Path) -> dict[str, TagRecord]:
    """The tag records of a data directory, read through the store."""
    with opened_cache(load_config(env={}, flags={"data_dir": str(data_dir)})) as cache:
        return {f"{k.upstream}/{k.repo}:{k.tag}": r for k, r in cache.coordinator.tags.all()}


def _manifests_stored(data_dir: Path, digests: list[str]) -> list[str]:
    """Which of `digests` the data directory holds as manifests."""
    with opened_cache(load_config(env={}, flags={"data_dir": str(data_dir)})) as cache:
        return [d for d in digests if cache.manifests.load(parse_digest(d)) is not None]


def _blobs_match_their_names(data_dir: Path) -> bool:
    return all(
        hashlib.sha256(p.read_bytes()).hexdigest() == p.name
        for p in (data_dir / "blobs").rglob("*")
        if p.is_file()
    )


async def _manifest(
    client: aiohttp.ClientSession, base: str, repo: str, tag: str
) -> tuple[int, str, str]:
    """GET a tag through a mirror: status, X-Mirror-Cache, Docker-Content-Digest."""
    async with client.get(
        f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL}
    ) as resp:
        await resp.read()
        return (
            resp.status,
            resp.headers.get("X-Mirror-Cache", ""),
            resp.headers.get("Docker-Content-Digest", ""),
        )


async def test_a_tampered_tag_file_restores_neither_a_wrong_tag_nor_a_future_time(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """mirror-tags.json (no signature) points single:1 at single:2's manifest, dates single:2
    ten years ahead and gives single:latest a time that is no number. Import restores single:2
    only, checked no later than the import, so a mirror with tag_ttl = 0 revalidates it upstream
    instead of trusting it unasked; single:1 is not restored and is fetched fresh, right."""
    refs = ("test/single:1", "test/single:2", "test/single:latest")
    data = await _filled(upstream, make_mirror, *refs)
    bundle, tampered = tmp_path / "bundle.tar", tmp_path / "tampered.tar"
    await _export(data, bundle)
    one, two = upstream.images["test/single:1"].digest, upstream.images["test/single:2"].digest

    def lie(entry: dict[str, Any]) -> None:
        if entry["tag"] == "1":
            entry["digest"] = two
        elif entry["tag"] == "2":
            entry["checked"] = time.time() + 10 * 365 * 86400
        else:
            entry["checked"] = "soon"

    _rewrite(bundle, tampered, lambda n, d: _entries(d, lie) if n == "mirror-tags.json" else d)
    site = tmp_path / "site"
    before = time.time()
    code, out = await _mirror("import", str(tampered), "--data-dir", str(site))
    after = time.time()
    records = _tag_records(site)
    assert set(records) == {"docker.io/test/single:2"}, out
    record = records["docker.io/test/single:2"]
    assert str(record.digest) == two and before <= record.checked <= after
    assert code == 1 and "Traceback" not in out, out
    assert "FAILED: docker.io/test/single:1: index.json does not name it" in out, out
    assert "FAILED: docker.io/test/single:latest: its check time is not a number" in out, out

    mirror = await make_mirror(
        upstream.url, '[upstreams."docker.io"]\ntag_ttl = 0\n', data_dir=site
    )
    assert await _manifest(client, mirror.url, "test/single", "2") == (200, "revalidated", two)
    assert await _manifest(client, mirror.url, "test/single", "1") == (200, "miss", one)


async def test_a_tag_is_restored_only_as_a_manifest_that_index_json_names(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Both documents (no signature) agree on lies: single:1 is pointed at its image's config
    blob, claimed to be an image manifest; single:latest at a manifest slipped into the bundle
    (single:1's without its mediaType field, all it references there) named as text/html;
    single:2 is left out of index.json but kept in the tag file. None of the three is restored,
    and neither blob is stored as a manifest."""
    data = await _filled(
        upstream, make_mirror, "test/single:1", "test/single:2", "test/single:latest"
    )
    bundle, tampered = tmp_path / "bundle.tar", tmp_path / "tampered.tar"
    await _export(data, bundle)
    config = next(
        b.digest for b in upstream.images["test/single:1"].layers if b.media_type == OCI_CONFIG
    )
    untyped = json.loads(upstream.images["test/single:1"].data)
    del untyped["mediaType"]
    slipped = json.dumps(untyped).encode()
    slipped_digest = "sha256:" + hashlib.sha256(slipped).hexdigest()

    def lie(entry: dict[str, Any]) -> None:
        ref = entry.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
        tag = entry.get("tag") or ref.rpartition(":")[2]
        key = "mediaType" if "annotations" in entry else "media_type"
        if tag == "1":
            entry["digest"], entry[key] = config, OCI_MANIFEST
        elif tag == "latest":
            entry["digest"], entry[key] = slipped_digest, "text/html"
        elif tag == "2" and "annotations" in entry:
            entry.clear()

    _rewrite(
        bundle,
        tampered,
        lambda n, d: _entries(d, lie) if n in ("index.json", "mirror-tags.json") else d,
        {f"blobs/sha256/{slipped_digest[7:]}": slipped},
    )
    site = tmp_path / "site"
    code, out = await _mirror("import", str(tampered), "--data-dir", str(site))
    assert _tag_records(site) == {}, out
    assert _manifests_stored(site, [config, slipped_digest]) == [], out
    assert code == 1 and "Traceback" not in out, out
    assert (
        f"FAILED: docker.io/test/single:1: {config} is no {OCI_MANIFEST}" in out
        and f"FAILED: docker.io/test/single:latest: {slipped_digest} is named with 'text/html', "
        "not a manifest media type"
        in out
        and "FAILED: docker.io/test/single:2: index.json does not name it" in out
    ), out


def _signed_config(tmp_path: Path, name: str, trusted: list[Path], required: bool) -> Path:
    path = tmp_path / f"{name}.toml"
    keys = ", ".join(json.dumps(str(k)) for k in trusted)
    path.write_text(
        f"[bundle]\ntrusted_keys = [{keys}]\nrequire_signature = {str(required).lower()}\n"
    )
    return path


async def test_a_signed_bundle_imports_when_signatures_are_required(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """`export --sign` with a PEM key (openssl made it) puts SHA256SUMS.sig in the tar, which
    openssl verifies, and SHA256SUMS lists the documents too (sha256sum -c passes); a bundle
    signed through `bundle.signing_key` with an OpenSSH key (ssh-keygen) verifies as well. Each
    imports whole where a signature is required, naming the key it verified with."""
    pem_key, pem_pub = ed25519_keys(tmp_path, "site", "pem")
    ssh_key, ssh_pub = ed25519_keys(tmp_path, "ops", "openssh")
    data = await _filled(upstream, make_mirror, *REFS)
    bundle = tmp_path / "bundle.tar"
    await _export(data, bundle, "--sign", str(pem_key))
    unpacked = tmp_path / "unpacked"
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    verify = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(pem_pub),
            "-rawin",
            "-in",
            "SHA256SUMS",
            "-sigfile",
            "SHA256SUMS.sig",
        ],
        cwd=unpacked,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True, text=True
    )
    assert (
        sums.returncode == 0
        and "index.json: OK" in sums.stdout
        and "mirror-tags.json: OK" in sums.stdout
    ), sums.stdout

    config = _signed_config(tmp_path, "site", [ssh_pub, pem_pub], required=True)
    site = tmp_path / "site"
    code, out = await _mirror(
        "import", str(bundle), "--data-dir", str(site), "--config", str(config)
    )
    assert code == 0 and "FAILED" not in out and f"2 tags (signed by {pem_pub})" in out, out
    assert {r: str(t.digest) for r, t in _tag_records(site).items()} == {
        f"docker.io/{r}": upstream.images[r].digest for r in REFS
    }

    by_config, ssh_bundle = tmp_path / "export.toml", tmp_path / "ssh.tar"
    by_config.write_text(f"[bundle]\nsigning_key = {json.dumps(str(ssh_key))}\n")
    await _export(data, ssh_bundle, "--config", str(by_config))
    other_site = tmp_path / "other-site"
    code, out = await _mirror(
        "import",
        str(ssh_bundle),
        "--data-dir",
        str(other_site),
        "--require-signature",
        "--trusted-key",
        str(ssh_pub),
    )
    assert code == 0 and "FAILED" not in out and f"2 tags (signed by {ssh_pub})" in out, out
    assert len(_tag_records(other_site)) == 2


async def test_bundles_not_signed_by_a_trusted_key_or_altered_after_signing_import_nothing(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Where signatures are required: an unsigned bundle, one whose signature was stripped, one
    signed with a key the site does not trust, and a signed one altered afterwards (SHA256SUMS
    edited, a layer changed, both tag documents moved consistently, a blob slipped in) each
    exit 1 naming why, restore no tag and store no manifest; a bad signature is refused even
    where signatures are not required. Blobs that arrived stay only as bytes matching their
    names."""
    trusted_key, trusted_pub = ed25519_keys(tmp_path, "site")
    other_key, _ = ed25519_keys(tmp_path, "other")
    data = await _filled(upstream, make_mirror, *REFS)
    good, unsigned, other = (tmp_path / f"{n}.tar" for n in ("good", "unsigned", "other"))
    await _export(data, good, "--sign", str(trusted_key))
    await _export(data, unsigned)
    await _export(data, other, "--sign", str(other_key))
    required = _signed_config(tmp_path, "required", [trusted_pub], required=True)
    optional = _signed_config(tmp_path, "optional", [trusted_pub], required=False)

    layer = upstream.images["test/single:1"].layers[-1].digest
    child = upstream.images["test/multi:1"].children[0]
    extra = b"a blob no signature covers"

    def variant(
        name: str, change: Callable[[str, bytes], bytes | None], add: dict[str, bytes] | None = None
    ) -> Path:
        path = tmp_path / f"{name}.tar"
        _rewrite(good, path, change, add)
        return path

    def moved(entry: dict[str, Any]) -> None:
        ref = entry.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
        if (
            entry.get("tag") == "1" and entry.get("repository") == "test/multi"
        ) or ref == "docker.io/test/multi:1":
            entry["digest"] = child.digest
            entry["mediaType" if ref else "media_type"] = child.media_type

    cases = {
        "unsigned": (unsigned, required, "it is not signed (SHA256SUMS.sig missing)"),
        "stripped": (
            variant("stripped", lambda n, d: None if n == "SHA256SUMS.sig" else d),
            required,
            "it is not signed (SHA256SUMS.sig missing)",
        ),
        "other key": (other, required, "SHA256SUMS is not signed by any of bundle.trusted_keys"),
        "other key, not required": (
            other,
            optional,
            "SHA256SUMS is not signed by any of bundle.trusted_keys",
        ),
        "sums edited": (
            variant(
                "sums",
                lambda n, d: d.replace(layer[7:].encode(), b"0" * 64) if n == "SHA256SUMS" else d,
            ),
            required,
            "SHA256SUMS is not signed by any of bundle.trusted_keys",
        ),
        "layer changed": (
            variant(
                "layer",
                lambda n, d: bytes([d[0] ^ 1]) + d[1:] if n == f"blobs/sha256/{layer[7:]}" else d,
            ),
            required,
            f"it does not hold what its signed SHA256SUMS lists: blobs/sha256/{layer[7:]} does not match its digest",
        ),
        "tags moved": (
            variant(
                "moved",
                lambda n, d: _entries(d, moved) if n in ("index.json", "mirror-tags.json") else d,
            ),
            required,
            "it does not hold what its signed SHA256SUMS lists: index.json is not the one listed",
        ),
        "blob added": (
            variant(
                "added",
                lambda n, d: d,
                {f"blobs/sha256/{hashlib.sha256(extra).hexdigest()}": extra},
            ),
            required,
            f"it does not hold what its signed SHA256SUMS lists: blobs/sha256/{hashlib.sha256(extra).hexdigest()} is not listed",
        ),
    }
    manifests = [upstream.images[r].digest for r in REFS] + [child.digest]
    for i, (case, (bundle, config, why)) in enumerate(cases.items()):
        site = tmp_path / f"site{i}"
        code, out = await _mirror(
            "import", str(bundle), "--data-dir", str(site), "--config", str(config)
        )
        assert _tag_records(site) == {}, (case, out)
        assert _manifests_stored(site, manifests) == [], (case, out)
        assert code == 1 and "Traceback" not in out, (case, out)
        assert f"bundle refused: {why}; no manifest or tag imported" in out, (case, out)
        assert _blobs_match_their_names(site), case


async def test_an_unsigned_bundle_still_imports_where_signatures_are_not_required(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """With trusted keys configured but `require_signature` off, an unsigned bundle imports as
    it always did, and says it was unsigned; a signed one imported where no key is trusted
    imports too, saying its signature was not checked."""
    key, pub = ed25519_keys(tmp_path, "site")
    data = await _filled(upstream, make_mirror, *REFS)
    unsigned, signed = tmp_path / "unsigned.tar", tmp_path / "signed.tar"
    await _export(data, unsigned)
    await _export(data, signed, "--sign", str(key))
    config = _signed_config(tmp_path, "optional", [pub], required=False)
    site = tmp_path / "site"
    code, out = await _mirror(
        "import", str(unsigned), "--data-dir", str(site), "--config", str(config)
    )
    assert code == 0 and "FAILED" not in out and "2 tags (unsigned)" in out, out
    assert len(_tag_records(site)) == 2
    other_site = tmp_path / "other-site"
    code, out = await _mirror("import", str(signed), "--data-dir", str(other_site))
    assert code == 0 and "2 tags (signature not checked: no bundle.trusted_keys)" in out, out
    assert len(_tag_records(other_site)) == 2
