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
from dataclasses import dataclass, field
from typing import IO, Any

from mirror import errors
from mirror.cache import Cache
from mirror.config import Config
from mirror.oci.manifest import references
from mirror.oci.reference import Digest, parse_digest, parse_image
from mirror.oci.verify import Mismatch, Verifier, digest_of
from mirror.store.blobs import write_all
from mirror.store.keys import TagKey
from mirror.store.manifests import ManifestStore, StoredManifest
from mirror.store.tags import TagRecord
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


def member(digest: Digest) -> str:
    """A blob's path in an OCI image layout (image-spec image-layout.md)."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _digest_of_member(name: str) -> Digest | None:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    return _digest_or_none(f"{parts[1]}:{parts[2]}")


def _digest_or_none(value: object) -> Digest | None:
    """A digest the bundle names; None for one that is not (a tampered bundle imports it
    as a failure, never as a path)."""
    if not isinstance(value, str):
        return None
    try:
        return parse_digest(value)
    except errors.DigestInvalid:
        return None


# -- export ---------------------------------------------------------------------------------------


def export(
    cache: Cache, config: Config, out: IO[bytes], images: list[str], everything: bool
) -> list[str]:
    """Blocking: write the bundle to `out`; returns the refs exported (incomplete images, whose
    blobs are not all in warm, are left out with a warning)."""
    return _export(cache, _wanted(cache, config, images, everything), out)


def _wanted(
    cache: Cache, config: Config, images: list[str], everything: bool
) -> dict[TagKey, TagRecord]:
    tags = dict(cache.coordinator.tags.all())
    if everything:
        return tags
    router, chosen = Router(config), {}
    for text in images:
        ref = parse_image(text)
        target = router.route(ref.repository, ref.registry)
        key = TagKey(target.upstream.name, target.repo, ref.reference)
        if key not in tags:
            raise errors.ManifestUnknown(f"{text} is not in the cache")
        chosen[key] = tags[key]
    return chosen


def _closure(
    manifests: ManifestStore, root: Digest
) -> tuple[list[StoredManifest], list[Digest]] | None:
    """Every manifest and blob one tag needs, or None when a manifest is missing."""
    found: list[StoredManifest] = []
    blobs: list[Digest] = []
    todo = [root]
    while todo:
        m = manifests.load(todo.pop())
        if m is None:
            return None
        found.append(m)
        refs = references(m.data)
        blobs.extend(refs.blobs)
        todo.extend(refs.manifests)
    return found, blobs


def _export(cache: Cache, tags: dict[TagKey, TagRecord], out: IO[bytes]) -> list[str]:
    written: set[Digest] = set()
    index, history, sums, exported = [], [], [], []
    store = cache.blobs
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for key, record in sorted(tags.items()):
            closure = _closure(cache.manifests, record.digest)
            ref = f"{key.upstream}/{key.repo}:{key.tag}"
            if closure is None or not all(store.exists(d) for d in closure[1]):
                log.warning("%s is not wholly in the warm tier: left out", ref)
                continue
            for m in closure[0]:
                if m.digest not in written:
                    _add_bytes(tar, member(m.digest), m.data)
                    written.add(m.digest)
                    sums.append(m.digest)
            for d in closure[1]:
                if d not in written:
                    tar.add(str(store.path(d)), arcname=member(d), recursive=False)
                    written.add(d)
                    sums.append(d)
            index.append(
                {
                    "mediaType": record.media_type,
                    "digest": str(record.digest),
                    "size": len(closure[0][0].data),
                    "annotations": {REF_NAME: ref},
                }
            )
            history.append(
                {
                    "upstream": key.upstream,
                    "repository": key.repo,
                    "tag": key.tag,
                    "digest": str(record.digest),
                    "media_type": record.media_type,
                    "checked": record.checked,
                }
            )
            exported.append(ref)
        doc = {"schemaVersion": 2, "manifests": index}
        _add_bytes(tar, "index.json", json.dumps(doc, indent=1).encode())
        _add_bytes(tar, "mirror-tags.json", json.dumps(history, indent=1).encode())
        _add_bytes(tar, "SHA256SUMS", "".join(f"{d.hex}  {member(d)}\n" for d in sums).encode())
    return exported


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# -- import ---------------------------------------------------------------------------------------


async def import_bundle(cache: Cache, source: IO[bytes]) -> ImportReport:
    """Verify and store what the bundle holds (see the module docstring). The tar is read
    in a thread: it is a blocking stream."""
    report = ImportReport()
    arrived, docs = await asyncio.to_thread(_read_tar, cache, source, report)
    for digest in arrived:
        await cache.tiers.committed(digest, await cache.blobs.run(cache.blobs.size, digest))
    await _restore_tags(cache, docs, arrived, report)
    return report


def _read_tar(
    cache: Cache, source: IO[bytes], report: ImportReport
) -> tuple[set[Digest], dict[str, Any]]:
    """Blocking: every blob of the bundle into the store (verified), and its two documents."""
    arrived: set[Digest] = set()
    docs: dict[str, Any] = {}
    with tarfile.open(fileobj=source, mode="r|*") as tar:
        for item in tar:
            name = item.name.lstrip("./")
            if item.isfile() and name.startswith("blobs/"):
                digest = _digest_of_member(name)
                reader = tar.extractfile(item)
                if (
                    digest is None
                    or reader is None
                    or not _store_blob(cache, digest, reader, item.size)
                ):
                    report.failed.append(name)
                    continue
                arrived.add(digest)
                report.blobs += 1
            elif item.isfile() and name in ("index.json", "mirror-tags.json"):
                reader = tar.extractfile(item)
                docs[name] = json.loads(reader.read()) if reader is not None else None
    return arrived, docs


def _store_blob(cache: Cache, digest: Digest, reader: IO[bytes], size: int) -> bool:
    """Write one blob to tmp/ while hashing; rename into place only if it is what it says."""
    blobs = cache.blobs
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
    except Mismatch as e:
        log.error("bundle blob %s %s: not imported", digest, e.message)
        blobs.discard(partial)
        return False
    finally:
        os.close(wfd)


async def _restore_tags(
    cache: Cache, docs: dict[str, Any], arrived: set[Digest], report: ImportReport
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
        root = _digest_or_none(entry["digest"])
        stored = await _store_closure(cache, root, entry["media_type"], arrived) if root else 0
        if not stored or root is None:
            report.failed.append(f"{entry['upstream']}/{entry['repository']}:{entry['tag']}")
            continue
        report.manifests += stored
        key = TagKey(entry["upstream"], entry["repository"], entry["tag"])
        record = TagRecord(root, entry["media_type"], float(entry["checked"]))
        await cache.coordinator.tags.put(key, record)
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


async def _store_closure(cache: Cache, root: Digest, media_type: str, arrived: set[Digest]) -> int:
    """Store the manifests under `root` if they and all their blobs arrived intact: how many.
    A manifest's media type is its descriptor's (the tag's, or its index's entry)."""
    todo, found = [(root, media_type)], []
    while todo:
        digest, kind = todo.pop()
        if digest not in arrived:
            return 0
        data = await cache.blobs.run(cache.blobs.read, digest)
        if digest_of(data, digest.algorithm) != digest:
            return 0
        refs = references(data)
        if not all(b in arrived for b in refs.blobs):
            return 0
        found.append(StoredManifest(digest, kind, data))
        for child in json.loads(data).get("manifests", []):
            child_digest = _digest_or_none(child.get("digest"))
            if child_digest is None:
                return 0
            todo.append((child_digest, child.get("mediaType", "")))
    for m in found:
        await cache.manifests.put(m)
    return len(found)
