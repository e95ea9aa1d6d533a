"""One serving process of several on one data directory, as a worker of `mirror serve
--workers N` runs: the whole app (`build_app(config, worker=index)`), with a journal of its
own and the delivery lock shared with the others. Until the supervisor that forks workers on
one port exists, tests start these on a port each:

    python tests/events_worker.py <index> --listen HOST:PORT --data-dir DIR --upstream URL

configured as `mirror serve` is (MIRROR_CONFIG, MIRROR_* variables). SIGTERM stops it,
SIGHUP reopens the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

# the worktree's own package, whatever the interpreter has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from aiohttp import web

from mirror import logs
from mirror.config import Config, load_config
from mirror.http.app import CACHE, build_app
from mirror.http.server import MirrorSite


async def serve(config: Config, worker: int) -> None:
    app = build_app(config, worker=worker)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    host, port = config.host_port
    await MirrorSite(runner, config, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[CACHE].events.reopen)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("worker", type=int)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = load_config(
        os.environ.get("MIRROR_CONFIG"),
        env={k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"},
        flags={"listen": args.listen, "data_dir": args.data_dir, "upstream": args.upstream},
    )
    listener = logs.start(config.log_level, config.log_format)
    try:
        uvloop.run(serve(config, args.worker))
    finally:
        listener.stop()


if __name__ == "__main__":
    main()
