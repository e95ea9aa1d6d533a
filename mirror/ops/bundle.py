"""`mirror export` and `mirror import`: cached images as an OCI image layout in a tar, for
air-gapped sites that fill a cache elsewhere and carry it in.

The bundle (written as a stream: each blob goes from its file into the tar, never whole in
memory):

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    blobs/sha256/<hex>      every manifest, config and layer
    index.json              one descriptor per tag, annotated
                            org.opencontainers.image.ref.name = <upstream>/<repository>:<tag>
    mirror-tags.json        the tag history: upstream, repository, tag, digest, type, checked
    SHA256SUMS              the digest of every blob and of the three documents above, as
                            `sha256sum -c` reads it
    SHA256SUMS.sig          when signed: the Ed25519 signature over SHA256SUMS (raw 64 bytes)

Import reads the tar as a stream too, so SHA256SUMS and its signature arrive after the blobs.
Every blob goes to the store's tmp/ while it is hashed and is renamed into place only if it
matches its name: such a file is content-addressed bytes that match their digest, safe to keep
whatever the rest of the bundle turns out to be. Only then, with the whole tar read, is the
signature checked; nothing the bundle claims (a manifest's place, a tag) is stored before that.
A signed bundle must hold exactly what its signed SHA256SUMS lists or it is refused whole. Then
each tag is checked on its own: the tag file only says what index.json says too (same digest,
same media type, a manifest media type), its check time is never later than the import, and a
tag is restored only when every manifest and blob it needs arrived. A tampered bundle imports
nothing wrong and says what failed. Writes are the store's own temp → verify → rename and
SQLite/diskcache transactions, so importing into a running mirror's data is safe.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

from mirror import errors, signing
from mirror.cache import Cache
from mirror.config import Config
from mirror.oci.manifest import references
from mirror.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES
from mirror.oci.reference import Digest, check_name, check_tag, parse_digest, parse_image
from mirror.oci.verify import Mismatch, Verifier, digest_of
from mirror.store.blobs import write_all
from mirror.store.keys import TagKey
from mirror.store.manifests import ManifestStore, StoredManifest
from mirror.store.tags import TagRecord
from mirror.upstream.routing import Router

log = logging.getLogger("mirror.bundle")

REF_NAME = "org.opencontainers.image.ref.name"
READ_CHUNK = 1024 * 1024
LAYOUT = "oci-layout"
INDEX = "index.json"
TAGS = "mirror-tags.json"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
#: Documents SHA256SUMS lists besides the blobs: a signature over it covers the tags too.
LISTED_DOCUMENTS = (LAYOUT, INDEX, TAGS)
#: Members import reads into memory (all small); everything else but blobs is passed over.
DOCUMENTS = frozenset({*LISTED_DOCUMENTS, SUMS, SIGNATURE})


@dataclass
class ImportReport:
    blobs: int = 0
    manifests: int = 0
    tags: int = 0
    failed: list[str] = field(default_factory=list)
    #: "unsigned", "signed by <key file>", or why the signature was not checked.
    signature: str = "unsigned"
    #: Why the bundle was refused whole (no manifest or tag imported); None when it was not.
    refused: str | None = None


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
    cache: Cache,
    config: Config,
    out: IO[bytes],
    images: list[str],
    everything: bool,
    signer: signing.SigningKey | None = None,
) -> list[str]:
    """Blocking: write the bundle to `out`, signed with `signer` when given; returns the refs
    exported (incomplete images, whose blobs are not all in warm, are left out with a
    warning). Tells of it in an `export.done` event."""
    exported = _export(cache, _wanted(cache, config, images, everything), out, signer)
    cache.events.exported(images=exported, signed=signer is not None)
    return exported


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


def _export(
    cache: Cache,
    tags: dict[TagKey, TagRecord],
    out: IO[bytes],
    signer: signing.SigningKey | None,
) -> list[str]:
    written: set[Digest] = set()
    index, history, sums, exported = [], [], [], []
    store = cache.blobs
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        documents = {LAYOUT: json.dumps({"imageLayoutVersion": "1.0.0"}).encode()}
        _add_bytes(tar, LAYOUT, documents[LAYOUT])
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
        documents[INDEX] = json.dumps(doc, indent=1).encode()
        documents[TAGS] = json.dumps(history, indent=1).encode()
        _add_bytes(tar, INDEX, documents[INDEX])
        _add_bytes(tar, TAGS, documents[TAGS])
        lines = [f"{d.hex}  {member(d)}\n" for d in sums]
        lines += [f"{digest_of(data).hex}  {name}\n" for name, data in documents.items()]
        checksums = "".join(lines).encode()
        _add_bytes(tar, SUMS, checksums)
        if signer is not None:
            _add_bytes(tar, SIGNATURE, signing.sign(signer, checksums))
    return exported


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# -- import ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """What an import checks a bundle's signature with (from the `[bundle]` keys)."""

    keys: tuple[signing.TrustedKey, ...] = ()
    #: Refuse a bundle that is not signed by one of `keys`.
    required: bool = False


@dataclass
class _Received:
    """What the tar held, once read: blobs now in the store, blob members that were not what
    their names say, and the documents' bytes."""

    blobs: set[Digest] = field(default_factory=set)
    rejected: list[str] = field(default_factory=list)
    documents: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class _Verdict:
    """What the signature says about the bundle as a whole."""

    signature: str
    refused: str | None = None


async def import_bundle(cache: Cache, source: IO[bytes], trust: Trust) -> ImportReport:
    """Verify and store what the bundle holds (see the module docstring). The tar is read
    in a thread: it is a blocking stream. Tells of it in an `import.done` event."""
    report = await _import(cache, source, trust)
    cache.events.imported(
        blobs=report.blobs,
        manifests=report.manifests,
        tags=report.tags,
        signature=report.signature,
        refused=report.refused,
        failed=report.failed,
    )
    return report


async def _import(cache: Cache, source: IO[bytes], trust: Trust) -> ImportReport:
    report = ImportReport()
    received = await asyncio.to_thread(_read_tar, cache, source)
    report.blobs = len(received.blobs)
    report.failed += received.rejected
    for digest in received.blobs:
        await cache.tiers.committed(digest, await cache.blobs.run(cache.blobs.size, digest))
    verdict = await asyncio.to_thread(_judge, received, trust)
    report.signature, report.refused = verdict.signature, verdict.refused
    if verdict.refused is not None:
        return report
    for key, record in _tags(received.documents, time.time(), report):
        closure = await _verified_closure(cache, record.digest, record.media_type, received.blobs)
        if isinstance(closure, str):
            report.failed.append(f"{key.upstream}/{key.repo}:{key.tag}: {closure}")
            continue
        for m in closure:
            await cache.manifests.put(m)
        report.manifests += len(closure)
        await cache.coordinator.tags.put(key, record)
        report.tags += 1
    return report


def _read_tar(cache: Cache, source: IO[bytes]) -> _Received:
    """Blocking: every blob of the bundle into the store (verified), and its documents."""
    received = _Received()
    with tarfile.open(fileobj=source, mode="r|*") as tar:
        for item in tar:
            name = item.name.lstrip("./")
            if not item.isfile():
                continue
            if name.startswith("blobs/"):
                digest = _digest_of_member(name)
                reader = tar.extractfile(item)
                if (
                    digest is None
                    or reader is None
                    or not _store_blob(cache, digest, reader, item.size)
                ):
                    received.rejected.append(name)
                    continue
                received.blobs.add(digest)
            elif name in DOCUMENTS:
                reader = tar.extractfile(item)
                if reader is not None:
                    received.documents[name] = reader.read()
    return received


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


# -- the signature ---------------------------------------------------------------------------------


def _judge(received: _Received, trust: Trust) -> _Verdict:
    """Blocking (it hashes the documents): whether the bundle may be imported at all.

    A signature is checked when there are trusted keys; one that verifies with none of them is
    refused even when signatures are not required (it is no honest signature). A bundle with a
    good signature must hold exactly what the signed SHA256SUMS lists. Without a signature the
    bundle is refused only when one is required."""
    sums, signature = received.documents.get(SUMS), received.documents.get(SIGNATURE)
    if signature is None:
        if trust.required:
            return _Verdict("unsigned", f"it is not signed ({SIGNATURE} missing)")
        return _Verdict("unsigned")
    if not trust.keys:
        return _Verdict("signature not checked: no bundle.trusted_keys")
    if sums is None:
        return _Verdict("badly signed", f"it has {SIGNATURE} but no {SUMS}")
    signer = signing.signer(signature, sums, trust.keys)
    if signer is None:
        return _Verdict("badly signed", f"{SUMS} is not signed by any of bundle.trusted_keys")
    differs = _off_the_list(received, sums)
    if differs is not None:
        return _Verdict(
            f"signed by {signer.path}", f"it does not hold what its signed {SUMS} lists: {differs}"
        )
    return _Verdict(f"signed by {signer.path}")


def _off_the_list(received: _Received, sums: bytes) -> str | None:
    """What in the bundle differs from the checksum list: a blob that failed its digest, is
    not listed or is listed and missing, a document that is not the one listed; None when the
    bundle is exactly what the list names."""
    listed = _checksums(sums)
    if listed is None:
        return f"{SUMS} is no list of checksums"
    if received.rejected:
        return f"{received.rejected[0]} does not match its digest"
    for digest in sorted(received.blobs, key=str):
        if listed.get(member(digest)) != digest.hex:
            return f"{member(digest)} is not listed"
    for name in listed:
        if name.startswith("blobs/") and _digest_of_member(name) not in received.blobs:
            return f"{name} is missing"
    for name in LISTED_DOCUMENTS:
        data = received.documents.get(name)
        if listed.get(name) != (digest_of(data).hex if data is not None else None):
            return f"{name} is not the one listed"
    return None


def _checksums(data: bytes) -> dict[str, str] | None:
    """`sha256sum` output (`<hex>  <path>`, or `<hex> *<path>`): path → hex; None when it
    is not that."""
    listed: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    for line in text.splitlines():
        hexdigest, _, rest = line.partition(" ")
        if not hexdigest or rest[:1] not in (" ", "*") or not rest[1:]:
            return None
        listed[rest[1:]] = hexdigest
    return listed


# -- the tags --------------------------------------------------------------------------------------


def _tags(
    documents: dict[str, bytes], now: float, report: ImportReport
) -> list[tuple[TagKey, TagRecord]]:
    """The tags to restore: the tag file's entries that index.json confirms, their check
    times no later than `now`; each entry that does not hold is reported and left out. Without
    a readable tag file the tags are index.json's, checked at 0 (revalidated on first pull)."""
    named = _named(_document(documents, INDEX, report))
    history = _document(documents, TAGS, report) if TAGS in documents else None
    if not isinstance(history, list):
        if TAGS in documents:
            report.failed.append(f"{TAGS}: not a list of tags; tags taken from {INDEX}")
        history = [_entry_of(ref, *pair) for ref, pairs in named.items() for pair in pairs]
    found = []
    for entry in history:
        tag = _tag(entry, named, now)
        if isinstance(tag, str):
            report.failed.append(tag)
        else:
            found.append(tag)
    return found


def _document(documents: dict[str, bytes], name: str, report: ImportReport) -> Any:
    """A JSON document of the bundle; None (reported) when it is missing or no JSON."""
    data = documents.get(name)
    try:
        return json.loads(data) if data is not None else None
    except ValueError:
        report.failed.append(f"{name}: not JSON")
        return None


def _named(index: Any) -> dict[str, set[tuple[Digest, str]]]:
    """index.json's tags: ref name → the (digest, media type) of every descriptor naming it."""
    named: dict[str, set[tuple[Digest, str]]] = {}
    descriptors = index.get("manifests") if isinstance(index, dict) else None
    for d in descriptors if isinstance(descriptors, list) else []:
        annotations = d.get("annotations") if isinstance(d, dict) else None
        ref = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        digest, media_type = _digest_or_none(d.get("digest")), d.get("mediaType")
        if isinstance(ref, str) and digest is not None and isinstance(media_type, str):
            named.setdefault(ref, set()).add((digest, media_type))
    return named


def _entry_of(ref: str, digest: Digest, media_type: str) -> dict[str, Any]:
    """A tag file entry for an index.json descriptor (a bundle with no tag file)."""
    name, _, tag = ref.rpartition(":")
    upstream, _, repo = name.partition("/")
    return {
        "upstream": upstream,
        "repository": repo,
        "tag": tag,
        "digest": str(digest),
        "media_type": media_type,
        "checked": 0.0,
    }


def _tag(
    entry: Any, named: dict[str, set[tuple[Digest, str]]], now: float
) -> tuple[TagKey, TagRecord] | str:
    """One tag file entry as a tag to restore, or why it is not one. (That its digest is a
    manifest, of a manifest media type, is the closure's to check.)"""
    if not isinstance(entry, dict):
        return f"{TAGS}: an entry that is no table"
    upstream, repo, tag = entry.get("upstream"), entry.get("repository"), entry.get("tag")
    if not (isinstance(upstream, str) and isinstance(repo, str) and isinstance(tag, str)):
        return f"{TAGS}: an entry that names no upstream, repository and tag"
    ref = f"{upstream}/{repo}:{tag}"[:300]
    if not upstream or "/" in upstream or not _is_name(repo, tag):
        return f"{ref}: not an upstream, repository and tag"
    digest, media_type = _digest_or_none(entry.get("digest")), entry.get("media_type")
    if (
        digest is None
        or not isinstance(media_type, str)
        or named.get(ref) != {(digest, media_type)}
    ):
        return f"{ref}: {INDEX} does not name it with the digest and media type {TAGS} gives"
    checked = entry.get("checked")
    if isinstance(checked, bool) or not isinstance(checked, int | float) or math.isnan(checked):
        return f"{ref}: its check time is not a number"
    return TagKey(upstream, repo, tag), TagRecord(
        digest, media_type, float(min(max(checked, 0.0), now))
    )


def _is_name(repo: str, tag: str) -> bool:
    try:
        check_name(repo)
        check_tag(tag)
    except errors.MirrorError:
        return False
    return True


async def _verified_closure(
    cache: Cache, root: Digest, media_type: str, arrived: set[Digest]
) -> list[StoredManifest] | str:
    """The manifests under `root`, if they and all their blobs arrived intact; else why not.
    A manifest's media type is its descriptor's (the tag's, or its index's entry); it must be a
    manifest's, and the bytes a manifest of that type."""
    todo, found = [(root, media_type)], []
    while todo:
        digest, kind = todo.pop()
        if digest not in arrived:
            return f"{digest} is not in the bundle"
        if kind not in MANIFEST_TYPES:
            return f"{digest} is named with {kind[:100]!r}, not a manifest media type"
        data = await cache.blobs.run(cache.blobs.read, digest)
        if digest_of(data, digest.algorithm) != digest:
            return f"{digest} does not match its digest"
        children = _children(data, kind)
        if children is None:
            return f"{digest} is no {kind}"
        missing = next((b for b in references(data).blobs if b not in arrived), None)
        if missing is not None:
            return f"{missing} is not in the bundle"
        found.append(StoredManifest(digest, kind, data))
        todo += children
    return found


def _children(data: bytes, kind: str) -> list[tuple[Digest, str]] | None:
    """The manifests an index names, as (digest, media type); none for an image manifest;
    None when the bytes are no manifest of media type `kind` (a config or layer of the bundle
    passed off as one) or an entry is unreadable."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None
    if doc.get("mediaType", kind) != kind:
        return None
    if kind not in INDEX_TYPES:
        image = isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list)
        return [] if image else None
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        return None
    children = []
    for child in entries:
        digest = _digest_or_none(child.get("digest")) if isinstance(child, dict) else None
        if digest is None:
            return None
        children.append((digest, str(child.get("mediaType", ""))))
    return children
