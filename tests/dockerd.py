"""A real dockerd (Debian's `docker.io`) as a client of the mirror, started by a test.

Everything it owns lives under one short temporary directory (unix socket paths are limited
to 108 bytes, so not under pytest's long `tmp_path`): data root (vfs storage, no overlay
mounts), exec root (where it also starts its own containerd), pid file, socket, identity
key (`deprecated-key-path`, else /etc/docker/key.json), a `daemon.json` naming the mirror in
`registry-mirrors` and `insecure-registries`, and the docker CLI's own config directory.
No bridge, no iptables: it never touches the host's network. Its proxy variables point at a closed loopback port, so if it ever fell back to
Docker Hub (which it does, silently, when a mirror fails) that attempt fails on 127.0.0.1
instead of leaving the machine; the mirror itself is reached directly (`NO_PROXY`).

`Dockerd.start()` returns once the API answers `/_ping`; `stop()` signals dockerd's process
group, and the containerd it started (a session of its own) if that outlives it, then removes
the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

#: The most an in-memory data root may hold (a tmpfs takes only what it holds).
TMPFS_SIZE = "8g"
#: Nothing listens on the discard port: the proxy any non-mirror registry traffic is sent to.
CLOSED_PROXY = "http://127.0.0.1:9"
MISSING = (
    "dockerd is not installed: the dockerd tests need Debian's docker.io package "
    "(apt-get install -y docker.io), which `make install-test-deps` installs"
)


def binaries() -> tuple[str, str]:
    """(dockerd, docker) paths; raises with what to install when either is missing. The CLI
    the package installs next to dockerd is preferred, so client and daemon match."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise FileNotFoundError(MISSING)
    packaged = Path("/usr/bin/docker")
    docker = str(packaged) if packaged.is_file() else shutil.which("docker")
    if docker is None:
        raise FileNotFoundError(MISSING.replace("dockerd is", "the docker CLI is"))
    return dockerd, docker


class Dockerd:
    """One dockerd. `mirrors` are `registry-mirrors` URLs, `insecure` the host:ports it may
    talk plain HTTP to."""

    def __init__(self, mirrors: list[str], insecure: list[str], in_memory: bool = False) -> None:
        self.dockerd, self.docker_cli = binaries()
        #: Its data root on a tmpfs of its own: vfs copies an image's whole root for every
        #: container, and the classic builder makes one per Dockerfile step (test_image.py).
        self.in_memory = in_memory
        self.root = Path(tempfile.mkdtemp(prefix="d", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.config = self.root / "daemon.json"
        self.config.write_text(
            json.dumps(
                {
                    "registry-mirrors": mirrors,
                    "insecure-registries": insecure,
                    # its identity key, /etc/docker/key.json by default
                    "deprecated-key-path": str(self.root / "key.json"),
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.cli_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.root / "cli"),
        }

    def start(self, timeout: float = 60.0) -> Dockerd:
        if self.in_memory:
            data = self.root / "data"
            data.mkdir()
            mount = [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={TMPFS_SIZE},mode=0700",
                "dockerd",
                str(data),
            ]
            done = subprocess.run(mount, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{' '.join(mount)}: {done.stderr}"
        cmd = [
            self.dockerd,
            "--config-file",
            str(self.config),
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "docker.pid"),
            "-H",
            f"unix://{self.socket}",
            "--log-level",
            "debug",
        ]
        env = {
            **os.environ,
            "HTTP_PROXY": CLOSED_PROXY,
            "HTTPS_PROXY": CLOSED_PROXY,
            "http_proxy": CLOSED_PROXY,
            "https_proxy": CLOSED_PROXY,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.socket.exists() and self._ping():
                return self
            time.sleep(0.05)  # ok: polling a condition with a deadline
        raise RuntimeError(f"dockerd did not answer /_ping within {timeout}s:\n{self.log_tail()}")

    def _ping(self) -> bool:
        """GET /_ping on the API socket: dockerd answers `OK` once it serves requests."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return False
        return (
            answer.startswith(b"HTTP/1.")
            and b" 200 " in answer.split(b"\r\n", 1)[0]
            and answer.endswith(b"OK")
        )

    def docker(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon (stdout and stderr together in `.stdout`)."""
        return subprocess.run(
            [self.docker_cli, *args],
            env=self.cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def inspect(self, ref: str) -> dict[str, object]:
        """`docker image inspect` of one image, parsed."""
        done = self.docker("image", "inspect", ref)
        assert done.returncode == 0, done.stdout
        found: list[dict[str, object]] = json.loads(done.stdout)
        assert len(found) == 1, found
        return found[0]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to dockerd's process group, SIGKILL to it after `timeout`; then SIGKILL to the
        containerd it started if that outlived it (containerd runs in a session of its own, out
        of dockerd's group); then remove the directory (vfs layers are full copies)."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                containerd = self._containerd_pid()
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)
                if containerd is not None and self._containerd_pid() == containerd:
                    _signal_group(containerd, signal.SIGKILL)
                    self._wait_gone(containerd, timeout)
        finally:
            unmount_under(self.root)  # the in-memory data root too
            shutil.rmtree(self.root, ignore_errors=True)

    def _containerd_pid(self) -> int | None:
        """The pid of the containerd this dockerd started, while it runs (its pid file, checked
        against the process's command line, which names our directory)."""
        try:
            pid = int((self.root / "exec" / "containerd" / "containerd.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.root).encode() in cmdline and _running(pid) else None

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> None:
        """containerd is not our child (init reaps it): wait until it no longer runs."""
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd {pid} still running after SIGKILL")
            time.sleep(0.02)  # ok: polling a condition with a deadline


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def unmount_under(root: Path) -> None:
    """Lazily unmount anything dockerd left mounted below `root` (its exec root holds netns
    bind mounts), deepest first, so the tree can be removed."""
    prefix = str(root) + "/"
    try:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return
    for where in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", where], capture_output=True, check=False, timeout=10)
