"""`mirror export` and `mirror import`: cached images as an OCI image layout in a tar, for
air-gapped sites that fill a cache elsewhere and carry it in.

The bundle (written as a stream: each blob goes from its file into the tar, never whole in
memory):

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    blobs/sha256/<hex>      every manifest, config and layer
    index.json              one descriptor per tag, annotated
                            org.opencontainers.image.ref.name = <upstream>/<repository>:<tag>
    mirror-tags.json        the tag history: upstream, repository, tag, digest, type, checked
    SHA256SUMS              the digest of every blob, as `sha256sum -c` reads it

Import reads the tar as a stream too. Every blob goes to the store's tmp/ while it is hashed and
is renamed into place only if it matches its name; manifests are then stored (verified again)
and tags restored only when everything they reference arrived. A tampered bundle imports
nothing wrong and says what failed. Writes are the store's own temp → verify → rename and
SQLite/diskcache transactions, so importing into a running mirror's data is safe.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from mirror import errors
from mirror.config import Config
from mirror.oci.manifest import references
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.verify import Verifier, digest_of
from mirror.prefetch import parse_image
from mirror.store.blobs import write_all
from mirror.store.manifests import ManifestStore, StoredManifest, TagKey, TagRecord
from mirror.store.tiers import Tiers, open_tiers
from mirror.upstream.routing import Router

log = logging.getLogger("mirror.bundle")

REF_NAME = "org.opencontainers.image.ref.name"
READ_CHUNK = 1024 * 1024


@dataclass
class ImportReport:
    blobs: int = 0
    manifests: int = 0
    tags: int = 0
    failed: list[str] = field(default_factory=list)


# -- export ---------------------------------------------------------------------------------------


def _wanted(
    config: Config, manifests: ManifestStore, images: list[str], everything: bool
) -> dict[TagKey, TagRecord]:
    tags = dict(manifests.iter_tags())
    if everything:
        return tags
    router, chosen = Router(config), {}
    for text in images:
        ref = parse_image(text)
        target = router.route(ref.repository, ref.registry)
        key = (target.upstream.name, target.repo, ref.reference)
        if key not in tags:
            raise errors.ManifestUnknown(f"{text} is not in the cache")
        chosen[key] = tags[key]
    return chosen


def _closure(manifests: ManifestStore, root: str) -> tuple[list[StoredManifest], list[str]] | None:
    """Every manifest and blob one tag needs, or None when a manifest is missing."""
    found: list[StoredManifest] = []
    blobs: list[str] = []
    todo = [root]
    while todo:
        m = manifests.load_manifest(todo.pop())
        if m is None:
            return None
        found.append(m)
        refs = references(m.data)
        blobs.extend(refs.blobs)
        todo.extend(refs.manifests)
    return found, blobs


def export(config: Config, out: IO[bytes], images: list[str], everything: bool) -> list[str]:
    """Blocking: write the bundle to `out`; returns the refs exported (incomplete images, whose
    blobs are not all in warm, are left out with a warning)."""
    pool = ThreadPoolExecutor(2)
    tiers, manifests = open_tiers(config, pool)
    try:
        return _export(tiers, manifests, _wanted(config, manifests, images, everything), out)
    finally:
        tiers.index.close()
        manifests.close()
        pool.shutdown()


def _export(
    tiers: Tiers, manifests: ManifestStore, tags: dict[TagKey, TagRecord], out: IO[bytes]
) -> list[str]:
    written: set[str] = set()
    index, history, sums, exported = [], [], [], []
    layout = tiers.blobs.layout
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for (upstream, repo, tag), record in sorted(tags.items()):
            closure = _closure(manifests, record.digest)
            ref = f"{upstream}/{repo}:{tag}"
            if closure is None or not all(
                layout.blob(parse_digest(d)).exists() for d in closure[1]
            ):
                log.warning("%s is not wholly in the warm tier: left out", ref)
                continue
            for m in closure[0]:
                if m.digest not in written:
                    _add_bytes(tar, _member(m.digest), m.data)
                    written.add(m.digest)
                    sums.append(m.digest)
            for d in closure[1]:
                if d not in written:
                    tar.add(str(layout.blob(parse_digest(d))), arcname=_member(d), recursive=False)
                    written.add(d)
                    sums.append(d)
            index.append(
                {
                    "mediaType": record.media_type,
                    "digest": record.digest,
                    "size": len(closure[0][0].data),
                    "annotations": {REF_NAME: ref},
                }
            )
            history.append(
                {
                    "upstream": upstream,
                    "repository": repo,
                    "tag": tag,
                    "digest": record.digest,
                    "media_type": record.media_type,
                    "checked": record.checked,
                }
            )
            exported.append(ref)
        _add_bytes(
            tar,
            "index.json",
            json.dumps({"schemaVersion": 2, "manifests": index}, indent=1).encode(),
        )
        _add_bytes(tar, "mirror-tags.json", json.dumps(history, indent=1).encode())
        _add_bytes(
            tar, "SHA256SUMS", "".join(f"{d.split(':')[1]}  {_member(d)}\n" for d in sums).encode()
        )
    return exported


def _member(digest: str) -> str:
    algorithm, _, hexd = digest.partition(":")
    return f"blobs/{algorithm}/{hexd}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# -- import ---------------------------------------------------------------------------------------


def import_bundle(config: Config, source: IO[bytes]) -> ImportReport:
    """Blocking: verify and store what the bundle holds (see the module docstring)."""
    pool = ThreadPoolExecutor(2)
    tiers, manifests = open_tiers(config, pool)
    try:
        return asyncio.run(_import(tiers, manifests, source))
    finally:
        tiers.index.close()
        manifests.close()
        pool.shutdown()


async def _import(tiers: Tiers, manifests: ManifestStore, source: IO[bytes]) -> ImportReport:
    report = ImportReport()
    arrived: set[str] = set()
    docs: dict[str, Any] = {}
    with tarfile.open(fileobj=source, mode="r|*") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if member.isfile() and name.startswith("blobs/"):
                digest = _digest_of_member(name)
                reader = tar.extractfile(member)
                if (
                    digest is None
                    or reader is None
                    or not _store_blob(tiers, digest, reader, member.size)
                ):
                    report.failed.append(name)
                    continue
                arrived.add(str(digest))
                report.blobs += 1
            elif member.isfile() and name in ("index.json", "mirror-tags.json"):
                reader = tar.extractfile(member)
                docs[name] = json.loads(reader.read()) if reader is not None else None
    for text in arrived:
        blob = parse_digest(text)
        await tiers.committed(blob, tiers.blobs.layout.blob(blob).stat().st_size)
    await _restore_tags(tiers, manifests, docs, arrived, report)
    return report


def _digest_of_member(name: str) -> Digest | None:
    parts = name.split("/")
    if len(parts) != 3:
        return None
    try:
        return parse_digest(f"{parts[1]}:{parts[2]}")
    except errors.MirrorError:
        return None


def _store_blob(tiers: Tiers, digest: Digest, reader: IO[bytes], size: int) -> bool:
    """Write one blob to tmp/ while hashing; rename into place only if it is what it says."""
    blobs = tiers.blobs
    if blobs.exists(digest):
        return True
    partial, wfd, rfd = blobs.create_partial(digest)
    os.close(rfd)
    verifier = Verifier(digest, size)
    try:
        while chunk := reader.read(READ_CHUNK):
            verifier.update(chunk)
            write_all(wfd, [chunk])
        verifier.check()
        blobs.commit(partial, wfd, digest)
        return True
    except errors.UpstreamBadResponse:
        log.error("bundle blob %s does not match its digest: not imported", digest)
        blobs.discard(partial)
        return False
    finally:
        os.close(wfd)


async def _restore_tags(
    tiers: Tiers,
    manifests: ManifestStore,
    docs: dict[str, Any],
    arrived: set[str],
    report: ImportReport,
) -> None:
    """Store manifests (verified) and tags whose every blob arrived."""
    history = docs.get("mirror-tags.json") or [
        _from_ref_name(d)
        for d in (docs.get("index.json") or {}).get("manifests", [])
        if REF_NAME in d.get("annotations", {})
    ]
    for entry in history:
        if entry is None:
            continue
        stored = await _store_closure(
            tiers, manifests, entry["digest"], entry["media_type"], arrived
        )
        if not stored:
            report.failed.append(f"{entry['upstream']}/{entry['repository']}:{entry['tag']}")
            continue
        report.manifests += stored
        key = (entry["upstream"], entry["repository"], entry["tag"])
        await manifests.put_tag(
            key, TagRecord(entry["digest"], entry["media_type"], float(entry["checked"]))
        )
        report.tags += 1


def _from_ref_name(descriptor: dict[str, Any]) -> dict[str, Any] | None:
    ref = descriptor["annotations"][REF_NAME]
    name, _, tag = ref.rpartition(":")
    upstream, _, repo = name.partition("/")
    if not (upstream and repo and tag):
        return None
    return {
        "upstream": upstream,
        "repository": repo,
        "tag": tag,
        "digest": descriptor["digest"],
        "media_type": descriptor["mediaType"],
        "checked": 0.0,
    }


async def _store_closure(
    tiers: Tiers, manifests: ManifestStore, root: str, media_type: str, arrived: set[str]
) -> int:
    """Store the manifests under `root` if they and all their blobs arrived intact: how many.
    A manifest's media type is its descriptor's (the tag's, or its index's entry)."""
    todo, found = [(root, media_type)], []
    while todo:
        digest, kind = todo.pop()
        if digest not in arrived:
            return 0
        data = tiers.blobs.layout.blob(parse_digest(digest)).read_bytes()
        if str(digest_of(data)) != digest:
            return 0
        refs = references(data)
        if not all(b in arrived for b in refs.blobs):
            return 0
        found.append(StoredManifest(digest, kind, data))
        todo.extend(
            (d["digest"], d.get("mediaType", "")) for d in json.loads(data).get("manifests", [])
        )
    for m in found:
        await manifests.put_manifest(m)
    return len(found)
