"""`mirror prefetch IMAGE… | --file images.txt`: pull images into a running mirror's cache.

It pulls THROUGH the mirror's registry API (`--mirror`, default http://127.0.0.1:5000), so its
fills are the mirror's own: one per digest, shared with whatever clients ask at the same time,
verified and kept like any pull. An index brings every platform, or those of `--platform`.
Blobs the mirror already holds are only asked with HEAD. Progress: a bar (tqdm) on a
terminal, one line per image otherwise. Exit status 0 only if every image arrived whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable
from typing import Any

import aiohttp

from mirror.oci import mediatypes
from mirror.oci.reference import ImageRef, parse_image

#: Blobs fetched at once per image.
PARALLEL = 4


def add_command(sub: Any) -> None:
    p = sub.add_parser("prefetch", help="pull images into a running mirror's cache")
    p.add_argument("images", nargs="*", help="images, e.g. python:3.12 or ghcr.io/org/tool:1")
    p.add_argument("--file", help="a file with one image per line (# comments)")
    p.add_argument("--mirror", default="http://127.0.0.1:5000", help="the mirror's base URL")
    p.add_argument(
        "--platform", help="comma-separated os/arch[/variant] of an index to bring (default: all)"
    )


def run(args: argparse.Namespace) -> int:
    images = list(args.images)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            images += images_in(f)
    if not images:
        print("mirror prefetch: no images given", file=sys.stderr)
        return 2
    platforms = set(args.platform.split(",")) if args.platform else None
    return asyncio.run(
        _prefetch_all(args.mirror.rstrip("/"), [parse_image(i) for i in images], platforms)
    )


async def _prefetch_all(mirror: str, images: list[ImageRef], platforms: set[str] | None) -> int:
    failed = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        for image in images:
            try:
                blobs, cached = await _prefetch(session, mirror, image, platforms)
                print(
                    f"{image}: {blobs} blobs, {cached} already cached, {blobs - cached} fetched",
                    flush=True,
                )
            except (TimeoutError, aiohttp.ClientError, PrefetchError) as e:
                failed += 1
                print(f"{image}: FAILED: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


class PrefetchError(Exception):
    pass


async def _prefetch(
    session: aiohttp.ClientSession, mirror: str, image: ImageRef, platforms: set[str] | None
) -> tuple[int, int]:
    base = f"{mirror}/v2/{image.repository}"
    ns = {"ns": image.registry}
    doc, media_type = await _manifest(session, base, image.reference, ns)
    manifests = [doc]
    if media_type in mediatypes.INDEX_TYPES:
        manifests = []
        for child in doc.get("manifests", []):
            if platforms is None or _platform(child.get("platform", {})) in platforms:
                manifests.append((await _manifest(session, base, child["digest"], ns))[0])
        if not manifests:
            raise PrefetchError(f"no manifest for {', '.join(sorted(platforms or []))}")
    blobs = {
        d["digest"]: d.get("size", 0)
        for m in manifests
        for d in ([m["config"]] if "config" in m else []) + m.get("layers", [])
    }
    progress = _progress(str(image), sum(blobs.values()))
    gate = asyncio.Semaphore(PARALLEL)

    async def one(digest: str) -> bool:
        async with gate:
            return await _blob(session, f"{base}/blobs/{digest}", ns, progress)

    cached = sum(await asyncio.gather(*(one(d) for d in blobs)))
    progress.close()
    return len(blobs), cached


def _platform(p: dict[str, str]) -> str:
    return "/".join(
        x for x in (p.get("os", ""), p.get("architecture", ""), p.get("variant", "")) if x
    )


async def _manifest(
    session: aiohttp.ClientSession, base: str, ref: str, ns: dict[str, str]
) -> tuple[Any, str]:
    async with session.get(
        f"{base}/manifests/{ref}", params=ns, headers={"Accept": mediatypes.UPSTREAM_ACCEPT}
    ) as resp:
        if resp.status != 200:
            raise PrefetchError(f"manifest {ref}: HTTP {resp.status}")
        return json.loads(await resp.read()), resp.headers.get("Content-Type", "").split(";")[0]


async def _blob(
    session: aiohttp.ClientSession, url: str, ns: dict[str, str], progress: Any
) -> bool:
    """True when the mirror held it already (HEAD says hit); else stream it through."""
    async with session.head(url, params=ns) as resp:
        if resp.status == 200 and resp.headers.get("X-Mirror-Cache") == "hit":
            progress.update(resp.content_length or 0)
            return True
    async with session.get(url, params=ns) as resp:
        if resp.status != 200:
            raise PrefetchError(f"{url.rsplit('/', 1)[1]}: HTTP {resp.status}")
        async for chunk in resp.content.iter_chunked(1 << 20):
            progress.update(len(chunk))
    return False


class _Quiet:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(label: str, total: int) -> Any:
    if not sys.stderr.isatty():
        return _Quiet()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)


def images_in(lines: Iterable[str]) -> list[str]:
    """Image references from a list file: one per line, `#` starts a comment."""
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
