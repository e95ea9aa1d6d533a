"""A real CNCF distribution registry (`docker-registry`) run as the upstream for tests.

The mirror must interoperate with the reference registry implementation, not only with
our own simulator, so the integration tests pull through a genuine `docker-registry`
subprocess listening on loopback.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

REGISTRY_BINARY = "/usr/bin/docker-registry"

# Loopback traffic must never go through an http_proxy from the environment.
LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: mirror-tests-not-a-secret
"""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now.

    Servers under test take explicit ports (the registry cannot report an ephemeral one),
    so we ask the kernel for one and release it; the tiny reuse race is handled by callers
    retrying (see `Registry.start`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Registry:
    """A `docker-registry serve` subprocess with filesystem storage under `workdir`.

    Use as a context manager or call `start()` / `stop()`; `url` and `host` are valid
    once started. Deletes are enabled so tests can make upstream content disappear.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the form image references and skopeo want."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL for HTTP clients, without a trailing slash."""
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        """Where the registry's own log goes, for post-mortems of failed tests."""
        return self.workdir / "registry.log"

    def start(self, timeout: float = 20.0, attempts: int = 3) -> None:
        """Start the registry and return once `GET /v2/` answers 200.

        A few attempts absorb the race where `free_port()`'s port is taken by someone
        else before the registry binds it.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(attempts):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(CONFIG_TEMPLATE.format(root=self.workdir / "storage", addr=self.host))
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(timeout):
                return
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"docker-registry did not become ready:\n{last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        """Poll `/v2/` until 200, the process dies, or `timeout` elapses.

        Waiting on the process between polls doubles as the poll interval and notices an
        early exit (e.g. port in use) immediately instead of at the deadline.
        """
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with LOCAL_OPENER.open(self.url + "/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            try:
                self._proc.wait(timeout=0.05)
                return False  # exited before becoming ready
            except subprocess.TimeoutExpired:
                continue
        return False

    def stop(self) -> None:
        """Terminate the subprocess (SIGTERM, then SIGKILL) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
