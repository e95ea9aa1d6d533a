"""Command line: `mirror serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR] [--upstream URL]`.

With no flags and no file it serves a Docker Hub mirror on 0.0.0.0:5000 with the cache in ./data.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from mirror import __version__, logs
from mirror.cache import opened_cache
from mirror.config import Config, ignored_variables, load_config
from mirror.errors import ConfigError
from mirror.http.app import CACHE, build_app
from mirror.http.server import MirrorSite
from mirror.metrics import forget_process, prepare_multiprocess, use_multiprocess
from mirror.ops import commands, prefetch
from mirror.store.layout import Layout
from mirror.store.reconcile import reconcile
from mirror.workers import cpus, deliverer, supervisor

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
        "--workers", help="server processes: auto (the CPUs it may use, the default) or N"
    )
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
                "workers": getattr(args, "workers", None),
                "data_dir": args.data_dir,
                "upstream": getattr(args, "upstream", None),
                **commands.config_flags(args),
            },
        )
    except ConfigError as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        return 2
    if args.command != "serve":
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s %(message)s")
        return commands.run(args, config)
    count = cpus.usable() if config.workers == "auto" else int(config.workers)
    if count > 1:
        return _supervise(config, count)
    return _serve_here(config)


def _serve_here(
    config: Config,
    worker: int | None = None,
    workers: int = 1,
    ready: int = -1,
    deliver: bool = True,
) -> int:
    """Serve in this process (the only one, or worker number `worker`; delivering the events
    unless a deliverer beside the workers does); the exit status."""
    listener = logs.start(config.log_level, config.log_format, worker)
    if worker is None:
        for var in ignored_variables(os.environ):
            log.debug("environment variable %s is not a configuration key: ignored", var)
    try:
        uvloop.run(serve(config, worker, workers, ready, deliver))
    except ConfigError as e:  # found only when the app reads its files (the htpasswd file)
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        return supervisor.CONFIG_ERROR
    finally:
        listener.stop()
    return 0


def _supervise(config: Config, count: int) -> int:
    """Serve with `count` worker processes under this one (workers/supervisor.py)."""
    logs.direct(config.log_level, config.log_format)
    for var in ignored_variables(os.environ):
        log.debug("environment variable %s is not a configuration key: ignored", var)
    host, port = config.host_port
    try:
        reserved = supervisor.reserve(host, port)
    except OSError as e:
        print(f"mirror: cannot listen on {config.listen}: {e.strerror}", file=sys.stderr)
        return 1
    bound = reserved.getsockname()[1]
    config = dataclasses.replace(
        config, listen=f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    )
    metrics_dir = Layout(config.data_dir).metrics
    with reserved:
        _prepare_host(config)
        prepare_multiprocess(metrics_dir)
        log.info(
            "serving on %s with %d workers, data in %s, upstreams %s, default %s",
            config.listen,
            count,
            config.data_dir,
            ", ".join(f"{u.name}={u.url}" for u in config.upstreams),
            config.default_upstream,
        )
        log.info("effective configuration (secrets masked): %r", config)

        beside = deliverer.wanted(config)

        def work(index: int, ready: int) -> int:
            use_multiprocess(metrics_dir)
            return _serve_here(config, index, count, ready, deliver=not beside)

        def deliver(_index: int, ready: int) -> int:
            use_multiprocess(metrics_dir)
            return deliverer.run(config, ready)

        return supervisor.Supervisor(
            count,
            work,
            beside=deliver if beside else None,
            exited=lambda pid: forget_process(pid, metrics_dir),
            private=(reserved.fileno(),),
        ).run()


def _prepare_host(config: Config) -> None:
    """What a host start does once, before any worker serves: sweep the partial files a
    crash left and make the index agree with the files (no worker may sweep another's fill)."""
    with opened_cache(config) as cache:
        cache.blobs.sweep()
        asyncio.run(reconcile(cache.blobs, cache.index, cache.usage))


def _load_certificate(cert: str, key: str) -> ssl.SSLContext:
    """A server context holding the pair, or OSError / SSLError when it does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class ServingCertificate:
    """The listener's TLS context and the certificate new handshakes get.

    A context is never loaded twice: `load_cert_chain` on a live context replaces the
    certificate before it checks the key, so a valid certificate with a key of another pair
    leaves the context with no usable key and every later handshake fails. A reload therefore
    builds a new context from the files, off the event loop, and only once it has loaded does
    the listener's SNI callback (which OpenSSL runs on every ClientHello, with or without a
    server name) hand it to new handshakes. Connections open now keep the context they were
    made with; the listener never closes.
    """

    def __init__(self, cert: str, key: str) -> None:
        self._cert, self._key = cert, key
        self.listener = _load_certificate(cert, key)
        self._current = self.listener
        self.listener.sni_callback = self._select
        self._lock = asyncio.Lock()
        self._reloading: set[asyncio.Task[None]] = set()

    def _select(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._current is not self.listener:
            conn.context = self._current

    def on_sighup(self) -> None:
        """The signal handler: start a reload (a task, so the file reads leave the loop)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)

    async def reload(self) -> None:
        """Load the pair again into a new context; keep the old one if it does not load."""
        async with self._lock:  # reloads take effect in the order the signals came
            try:
                fresh = await asyncio.to_thread(_load_certificate, self._cert, self._key)
            except (OSError, ssl.SSLError) as e:
                log.error("TLS reload failed, keeping the old certificate: %s", e)
                return
            self._current = fresh
        log.info("TLS certificate reloaded from %s", self._cert)


async def serve(
    config: Config,
    worker: int | None = None,
    workers: int = 1,
    ready: int = -1,
    deliver: bool = True,
) -> None:
    """Run until SIGINT or SIGTERM, then close connections and stores cleanly. A worker
    process (`worker` of `workers`) listens with SO_REUSEPORT and writes a byte to `ready`
    once it serves; `deliver`: whether it may deliver the events (build_app)."""
    app = build_app(config, worker, workers, deliver)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    host, port = config.host_port
    tls = ServingCertificate(config.tls.cert, config.tls.key) if config.tls.cert else None
    site = MirrorSite(
        runner,
        config,
        host,
        port,
        ssl_context=tls.listener if tls is not None else None,
        access_log=logging.getLogger("mirror.access") if config.access_log else None,
        reuse_port=worker is not None,
    )
    await site.start()
    if ready >= 0:
        os.write(ready, b"r")
        os.close(ready)
    if worker is None:
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
    # SIGHUP: what was opened from files is opened again (for logrotate, renewed certificates)
    reopen = []
    if tls is not None:
        reopen.append(tls.on_sighup)
    if config.events.audit_log:
        reopen.append(app[CACHE].events.reopen)
    loop.add_signal_handler(signal.SIGHUP, lambda: [action() for action in reopen])
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
