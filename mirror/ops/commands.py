"""`mirror cache ls|du|evict|pin|unpin`, `mirror fsck`, `mirror export` and `mirror import`: the
admin operations on a data directory, as tables for people or JSON (`--json`) for scripts."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from typing import IO, Any

from mirror import signing
from mirror.cache import Cache, opened_cache
from mirror.config import Config
from mirror.errors import MirrorError
from mirror.ops import bundle
from mirror.ops.admin import Admin
from mirror.ops.format import as_json, human, table


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    cache = sub.add_parser("cache", help="inspect and manage the cache").add_subparsers(
        dest="action", required=True
    )
    cache.add_parser(
        "ls", parents=[common], help="cached images: repository, tag, size, last pulled, tier"
    )
    cache.add_parser("du", parents=[common], help="bytes per tier and per upstream")
    evict = cache.add_parser(
        "evict", parents=[common], help="evict warm blobs now (never pinned ones)"
    )
    evict.add_argument("--dry-run", action="store_true", help="only list what would go")
    evict.add_argument("--older-than", type=float, metavar="SECONDS", help="unused for this long")
    evict.add_argument(
        "--repo", metavar="PATTERN", help="held by repositories matching <upstream>/<repo glob>"
    )
    for name in ("pin", "unpin"):
        one = cache.add_parser(
            name, parents=[common], help=f"{name} images: <upstream>/<repository>:<tag glob>"
        )
        one.add_argument("pattern")
    fsck = sub.add_parser(
        "fsck", parents=[common], help="re-hash every blob; check index against files"
    )
    fsck.add_argument(
        "--repair", action="store_true", help="drop what fails, reconcile index and files"
    )
    exp = sub.add_parser("export", parents=[common], help="cached images as an OCI layout tar")
    exp.add_argument("--out", required=True, help="the tar to write (- for standard output)")
    exp.add_argument("--all", action="store_true", help="every cached tag")
    exp.add_argument("images", nargs="*", help="images to export, e.g. python:3.12")
    exp.add_argument(
        "--sign", metavar="KEY", help="sign with this Ed25519 private key (bundle.signing_key)"
    )
    imp = sub.add_parser("import", parents=[common], help="verify and load a bundle made by export")
    imp.add_argument("bundle", help="the tar (- for standard input)")
    imp.add_argument(
        "--trusted-key",
        metavar="KEY",
        action="append",
        help="an Ed25519 public key a signature may verify with; repeatable (bundle.trusted_keys)",
    )
    imp.add_argument(
        "--require-signature",
        action="store_true",
        default=None,
        help="import nothing unless signed by a trusted key (bundle.require_signature)",
    )


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys the export and import flags set (the flags are another way to
    give those keys, never settings of their own)."""
    given = {
        "signing_key": getattr(args, "sign", None),
        "trusted_keys": getattr(args, "trusted_key", None),
        "require_signature": getattr(args, "require_signature", None),
    }
    bundle = {k: v for k, v in given.items() if v is not None}
    return {"bundle": bundle} if bundle else {}


#: Arguments that say how a command runs, not what it does (left out of its `admin` event).
_NOT_PARAMS = frozenset({"command", "action", "config", "data_dir", "json"})


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        with opened_cache(config) as cache:
            result = "error"
            try:
                code = _run(args, config, cache)
                result = "ok" if code == 0 else f"exit {code}"
                return code
            except MirrorError as e:
                result = e.code
                raise
            finally:
                _audited(args, cache, result)
    except (MirrorError, signing.BadKey) as e:
        print(f"mirror: {e.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, config: Config, cache: Cache) -> int:
    if args.command == "export":
        return _export(args, config, cache)
    if args.command == "import":
        return _import(args, config, cache)
    return asyncio.run(_dispatch(Admin(cache), args))


def _audited(args: argparse.Namespace, cache: Cache, result: str) -> None:
    """The command as an `admin` event: what ran, with what, by whom, and how it ended."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no name for this uid
        user = str(os.getuid())
    cache.events.admin(
        action=f"cache {args.action}" if args.command == "cache" else args.command,
        via="cli",
        who={"user": user, "uid": os.getuid()},
        params={k: v for k, v in vars(args).items() if k not in _NOT_PARAMS and v is not None},
        result=result,
    )


def _export(args: argparse.Namespace, config: Config, cache: Cache) -> int:
    if not (args.all or args.images):
        print("mirror export: name images or give --all", file=sys.stderr)
        return 2
    key = config.bundle.signing_key
    signer = signing.load_private_key(key) if key else None
    with _open(args.out, "wb", sys.stdout.buffer) as out:
        refs = bundle.export(cache, config, out, args.images, args.all, signer)
    print("\n".join(f"exported {r}" for r in refs) or "nothing exported", file=sys.stderr)
    return 0 if refs and (args.all or len(refs) == len(args.images)) else 1


def _open(path: str, mode: str, std: IO[bytes]) -> IO[bytes]:
    """The file at `path`, or standard input/output for `-`."""
    return std if path == "-" else open(path, mode)  # the caller's `with` closes it


def _import(args: argparse.Namespace, config: Config, cache: Cache) -> int:
    trust = bundle.Trust(
        tuple(signing.load_public_key(p) for p in config.bundle.trusted_keys),
        config.bundle.require_signature,
    )
    with _open(args.bundle, "rb", sys.stdin.buffer) as source:
        report = asyncio.run(bundle.import_bundle(cache, source, trust))
    _out(args, report, lambda: _imported(report))
    return 1 if report.failed or report.refused else 0


def _imported(report: bundle.ImportReport) -> str:
    if report.refused:
        head = (
            f"bundle refused: {report.refused}; no manifest or tag imported "
            f"({report.blobs} blobs that match their digests stay in the store; no tag or "
            "manifest of this import refers to them)"
        )
    else:
        head = (
            f"imported {report.blobs} blobs, {report.manifests} manifests, {report.tags} tags "
            f"({report.signature})"
        )
    return "\n".join([head] + [f"  FAILED: {f}" for f in report.failed])


async def _dispatch(admin: Admin, args: argparse.Namespace) -> int:
    action = args.action if args.command == "cache" else "fsck"
    if action == "ls":
        images = await admin.catalog()
        return _out(
            args,
            images,
            lambda: table(
                (
                    [
                        f"{i.upstream}/{i.repository}",
                        i.tag,
                        human(i.size),
                        _when(i.last_pulled),
                        ",".join(i.tiers) or "-",
                    ]
                    for i in images
                ),
                ["REPOSITORY", "TAG", "SIZE", "LAST PULLED", "TIER"],
            ),
        )
    if action == "du":
        usage = await admin.usage()
        return _out(
            args,
            usage,
            lambda: table(
                [[f"tier {t}", human(v["bytes"]), v["blobs"]] for t, v in usage["tiers"].items()]
                + [
                    [f"upstream {u}", human(v["bytes"]), v["blobs"]]
                    for u, v in usage["upstreams"].items()
                ],
                ["", "BYTES", "BLOBS"],
            ),
        )
    if action == "evict":
        gone = await admin.evict(args.dry_run, args.older_than, args.repo)
        verb = "would evict" if args.dry_run else "evicted"
        return _out(
            args, gone, lambda: f"{verb} {len(gone)} blobs, {human(sum(e.size for e in gone))}"
        )
    if action == "pin":
        await admin.pin(args.pattern)
        pins = await admin.pins()
        return _out(args, pins, lambda: "pins:\n" + "\n".join(f"  {p}" for p in pins))
    if action == "unpin":
        found = await admin.unpin(args.pattern)
        print(
            json.dumps({"unpinned": found})
            if args.json
            else ("unpinned" if found else "no such pin")
        )
        return 0 if found else 1
    report = await admin.fsck(args.repair)
    _out(
        args,
        report,
        lambda: "\n".join(
            [f"checked {report.checked} blobs: " + ("clean" if report.clean else "problems found")]
            + [f"  corrupt: {d}" for d in report.corrupt]
            + [f"  record without file: {d}" for d in report.records_without_files]
            + [f"  file without record: {d}" for d in report.files_without_records]
            + [f"  stale partial file: {p}" for p in report.stale_partials]
            + (["  repaired"] if report.repaired else [])
        ),
    )
    return 0 if report.clean or report.repaired else 1


def _out(args: argparse.Namespace, value: Any, text: Any) -> int:
    print(json.dumps(as_json(value), indent=2) if args.json else text())
    return 0


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
