"""The processes a hand-run benchmark starts (nginx, registries, mirrors, Redis), each in a
process group of its own with its output in the script's run directory, and what their
configurations and start-up checks share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

HOST = "127.0.0.1"


def nginx_user() -> str:
    """nginx's `user` line: as root, its workers stay root (the run directory is root's)."""
    return "user root;\n" if os.geteuid() == 0 else ""


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


class Procs:
    """The processes this script started, by name; each in its own process group, its output
    in `<run>/<name>.out`."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> None:
        out = open(self.run / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None
