"""Command line: `mirror serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR] [--upstream URL]`.

With no flags and no file it serves a Docker Hub mirror on 0.0.0.0:5000 with the cache in ./data.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from mirror import __version__, logs
from mirror.config import Config, ignored_variables, load_config
from mirror.errors import ConfigError
from mirror.http.app import build_app
from mirror.http.server import MirrorSite
from mirror.ops import commands, prefetch

log = logging.getLogger("mirror")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror", description="Pull-through caching mirror for container registries."
    )
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="TOML config file (default: none, the embedded Docker Hub mirror)"
    )
    common.add_argument("--data-dir", dest="data_dir", help="cache directory (default ./data)")
    common.add_argument("--json", action="store_true", help="JSON output (admin commands)")
    serve = sub.add_parser("serve", parents=[common], help="serve the registry API")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument(
        "--upstream", help="URL of the default (docker.io) upstream, e.g. http://127.0.0.1:5001"
    )
    commands.add_commands(sub, common)
    prefetch.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "prefetch":
        return prefetch.run(args)
    try:
        config = load_config(
            args.config or os.environ.get("MIRROR_CONFIG"),
            env={k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"},
            flags={
                "listen": getattr(args, "listen", None),
                "data_dir": args.data_dir,
                "upstream": getattr(args, "upstream", None),
            },
        )
    except ConfigError as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        return 2
    if args.command != "serve":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s %(message)s")
        return commands.run(args, config)
    listener = logs.start(config.log_level, config.log_format)
    for var in ignored_variables(os.environ):
        log.debug("environment variable %s is not a configuration key: ignored", var)
    try:
        uvloop.run(serve(config))
    finally:
        listener.stop()
    return 0


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def _reload_tls(context: ssl.SSLContext, config: Config) -> None:
    """SIGHUP: load the certificate and key again into the live context; new handshakes use
    them, connections open now keep theirs, the listener never closes."""
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as e:
        log.error("TLS reload failed, keeping the old certificate: %s", e)
        return
    log.info("TLS certificate reloaded from %s", config.tls.cert)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then close connections and stores cleanly."""
    app = build_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    host, port = config.host_port
    tls = _tls_context(config)
    site = MirrorSite(
        runner,
        config,
        host,
        port,
        ssl_context=tls,
        access_log=logging.getLogger("mirror.access") if config.access_log else None,
    )
    await site.start()
    log.info(
        "serving on %s, data in %s, upstreams %s, default %s",
        config.listen,
        config.data_dir,
        ", ".join(f"{u.name}={u.url}" for u in config.upstreams),
        config.default_upstream,
    )
    log.info("effective configuration (secrets masked): %r", config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tls, tls, config)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
