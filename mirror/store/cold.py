"""The cold tier: blobs on object storage (S3 and S3-compatible servers, GCS, Azure) or a
directory on a slower volume, through one async API: obstore (Rust's object_store crate).

Why obstore: one interface for every backend operators use (`file://`, `s3://`, `gs://`,
`az://`), native async, streaming gets and multipart puts from a file without Python in the
data path, credentials from the config or the environment; aioboto3 would cover S3 only.

Keys: `store.layout.object_key` (`blobs/<algorithm>/<hex[:2]>/<hex>` under the URL's
prefix); only a grammar-checked `Digest` becomes a key. An object appears whole or not at
all (an object store PUT is atomic; obstore's local store writes a staging file and renames
it). Every obstore error is translated here: a missing object is None, anything else
StoreUnavailable — nothing above store/ sees an obstore exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import from_url

from mirror import errors
from mirror.config import ColdConfig
from mirror.oci.reference import Digest
from mirror.store.layout import OBJECT_PREFIX, digest_of_key, object_key

if TYPE_CHECKING:
    from obstore.store import ObjectStore

#: Bytes per piece when streaming a cold blob out (the fill writes 1 MiB pieces too).
CHUNK = 1024 * 1024
#: Seconds an object-store request may take (a whole multi-GiB transfer included).
TIMEOUT = "3600s"
#: A shared cold tier's lookups, asked on every miss before upstream: an unreachable store
#: must not hold the miss for object_store's default retries (ten, over up to 3 minutes).
QUICK_LOOKUPS: dict[str, Any] = {
    "retry_config": {"max_retries": 1, "retry_timeout": timedelta(seconds=5)},
}
QUICK_CONNECT = "2s"


@contextlib.contextmanager
def _translate(what: str, digest: Digest | None = None) -> Iterator[None]:
    try:
        yield
    except (ObstoreError, OSError) as e:
        # the reason names buckets and endpoints: for the log, not for clients
        reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        detail = {"digest": str(digest)} if digest is not None else None
        raise errors.StoreUnavailable(
            f"cold tier: {what} failed", detail=detail, internal=reason
        ) from e


class ColdObject:
    """An open cold blob: its size and its bytes as a stream (never whole in memory)."""

    def __init__(self, size: int, result: Any, digest: Digest) -> None:
        self.size = size
        self._result = result
        self._digest = digest

    async def chunks(self) -> AsyncIterator[bytes]:
        with _translate("read", self._digest):
            async for chunk in self._result.stream(min_chunk_size=CHUNK):
                yield bytes(chunk)


class ColdStore:
    def __init__(self, store: ObjectStore, where: str, lookups: ObjectStore | None = None) -> None:
        self._store = store
        #: What opens and sizes go through (uploads and deletes keep the patient `_store`).
        self._lookups = lookups or store
        self._where = where

    def __repr__(self) -> str:  # the URL only: credentials never reach logs
        return f"ColdStore({self._where})"

    @classmethod
    def from_config(cls, cold: ColdConfig, quick: bool = False) -> ColdStore | None:
        """None when no cold tier is configured. A local directory is created if missing.
        `quick`: lookups give up soon on a store that does not answer (a shared tier, asked
        on every miss, must not delay the upstream fetch that replaces it)."""
        if not cold.url:
            return None
        parts = urlsplit(cold.url)
        options: dict[str, Any] = {}
        if parts.scheme == "file":
            Path(parts.path).mkdir(parents=True, exist_ok=True)
        elif parts.scheme == "s3":
            options = {
                k: v
                for k, v in (
                    ("endpoint", cold.endpoint),
                    ("region", cold.region),
                    ("access_key_id", cold.access_key_id),
                    ("secret_access_key", cold.secret_access_key),
                )
                if v
            }
        if parts.scheme != "file":
            options["client_options"] = {"allow_http": cold.allow_http, "timeout": TIMEOUT}
        lookups = None
        with _translate("configuration"):
            store = from_url(cold.url, **options)
            if quick and parts.scheme != "file":
                client = {**options["client_options"], "connect_timeout": QUICK_CONNECT}
                lookups = from_url(
                    cold.url, **{**options, **QUICK_LOOKUPS, "client_options": client}
                )
        return cls(store, f"{parts.scheme}://{parts.netloc}{parts.path}", lookups)

    async def put_file(self, digest: Digest, path: Path) -> None:
        """Upload a verified warm file, streaming (multipart for large ones)."""
        with _translate("upload", digest):
            await obstore.put_async(self._store, object_key(digest), path)

    async def open(self, digest: Digest) -> ColdObject | None:
        result = await self._call("read", digest, obstore.get_async, self._lookups)
        return None if result is None else ColdObject(int(result.meta["size"]), result, digest)

    async def size(self, digest: Digest) -> int | None:
        meta = await self._call("head", digest, obstore.head_async, self._lookups)
        return None if meta is None else int(meta["size"])

    async def delete(self, digest: Digest) -> None:
        """Remove a blob; one that is not there is fine."""
        await self._call("delete", digest, obstore.delete_async)

    async def _call(
        self, what: str, digest: Digest, fn: Any, store: ObjectStore | None = None
    ) -> Any:
        """`fn(store, key)`, None when the object is not there."""
        try:
            with _translate(what, digest):
                return await fn(store or self._store, object_key(digest))
        except errors.StoreUnavailable as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise

    async def list(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every blob held (for reconcile and fsck); objects that are not blobs are skipped."""
        with _translate("list"):
            async for batch in obstore.list(self._store, OBJECT_PREFIX):
                for meta in batch:
                    digest = digest_of_key(str(meta["path"]))
                    if digest is not None:
                        yield digest, int(meta["size"])
