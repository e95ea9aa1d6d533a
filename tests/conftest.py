"""Fixtures: a real registry (once per session), the upstream simulator, and the mirror under
test, in-process (`make_mirror`) or as a real `python -m mirror serve` process (`mirror_process`);
the engines a cluster shares: `redis-server` and moto's S3 server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import boto3
import image_base
import pytest
import redis
from aiohttp import web
from images import Upstream, big_layer, push_all
from registry import LOCAL_OPENER, Registry, free_port
from upstream_sim import UpstreamSim

from mirror.config import DEFAULT_UPSTREAMS, DOCKER_HUB, load_config
from mirror.http.app import CACHE, DRAIN_SECONDS, build_app
from mirror.http.server import MirrorSite
from mirror.oci.reference import parse_digest
from mirror.pull.fill import Fill


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A real `docker-registry` with every test image pushed, shared by the whole session
    because starting it and pushing takes about a second. Treat it as read-only; tests
    that delete upstream content should start their own `Registry`."""
    root: Path = tmp_path_factory.mktemp("upstream")
    registry = Registry(root / "registry")
    registry.start()
    try:
        images = push_all(registry.host, root / "layouts")
        yield Upstream(registry.url, registry.host, images, big_layer())
    finally:
        registry.stop()


async def _running_sim() -> AsyncIterator[UpstreamSim]:
    """A fresh simulator started in the test's event loop, its faults cleared and stopped
    afterwards, so switches never leak between tests."""
    simulator = UpstreamSim()
    await simulator.start()
    try:
        yield simulator
    finally:
        simulator.clear_faults()
        await simulator.stop()


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSim]:
    """A fresh, empty `UpstreamSim` (registry on 127.0.0.1, CDN on 127.0.0.2)."""
    async for simulator in _running_sim():
        yield simulator


@pytest.fixture
async def other_sim() -> AsyncIterator[UpstreamSim]:
    """A second, independent simulator, to prove which of two upstreams a request reached."""
    async for simulator in _running_sim():
        yield simulator


# -- the mirror under test ----------------------------------------------------------------------


PROJECT = Path(__file__).resolve().parent.parent


@dataclass
class Mirror:
    """A running mirror: its base URL, host:port (for skopeo) and data directory."""

    url: str
    host: str
    data_dir: Path
    app: web.Application | None = None
    #: (method, path with query) of every request an in-process mirror answered, in order.
    seen: list[tuple[str, str]] = field(default_factory=list)

    def blob_files(self) -> list[Path]:
        return [p for p in (self.data_dir / "blobs").rglob("*") if p.is_file()]

    def partial_files(self) -> list[Path]:
        return list((self.data_dir / "tmp").iterdir())

    def fill(self, digest: str) -> Fill:
        """The fill of `digest` in flight, to look at its progress (`written`, `size`)."""
        assert self.app is not None
        coordinator = self.app[CACHE].coordinator
        key = parse_digest(digest)
        assert key in coordinator.filling(), "no fill of it in flight"
        # joining a fill in flight returns it and runs nothing: the work below is never called
        joined = coordinator.fill(key, lambda: None, lambda _: asyncio.sleep(0))  # ok: never run
        assert not joined.started
        fill: Fill = joined.state
        return fill

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until no fill is in flight and every committed blob is recorded: a client
        has its last byte once the digest checks out, before the fsync, rename and record."""
        assert self.app is not None
        coordinator = self.app[CACHE].coordinator
        deadline = time.monotonic() + timeout
        while coordinator.filling():
            assert time.monotonic() < deadline, "fills still in flight"
            await asyncio.sleep(0.01)  # ok: polling a condition with a deadline


MakeMirror = Callable[..., Awaitable[Mirror]]


class _FormatCheck(logging.Handler):
    """Formats every record of the mirror's loggers, down to debug: a log call whose
    arguments do not fit its format string is a lost line in production (logging reports it
    on stderr and goes on), and a failed test here."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.broken: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.getMessage()
        except Exception as e:
            self.broken.append(f"{record.name}: {record.msg!r} % {record.args!r}: {e!r}")


@pytest.fixture(autouse=True)
def log_calls_format() -> Iterator[None]:
    """Every log line the mirror writes during a test can be formatted."""
    logger = logging.getLogger("mirror")
    check, level = _FormatCheck(), logger.level
    logger.addHandler(check)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(check)
        logger.setLevel(level)
    assert not check.broken, "log calls that cannot be formatted:\n" + "\n".join(check.broken)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until true, failing after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline


#: The codes a client may find in error JSON, written out here from the OCI distribution spec's
#: "Error Codes" table, plus CNCF distribution's UNKNOWN and UNAVAILABLE (registry/api/errcode)
#: for failures the spec has no code for.
WIRE_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "UNKNOWN",
        "UNAVAILABLE",
    }
)


def error_codes(body: bytes) -> tuple[str, str]:
    """(code on the wire, the mirror's own code) of an error answer. Asserts the spec's shape
    and that the wire code is one in WIRE_CODES; the mirror's code is `detail.reason` where it
    is mapped to another, and then the message ends with it too."""
    doc = json.loads(body)
    assert isinstance(doc["errors"], list) and doc["errors"], doc
    error = doc["errors"][0]
    code, message, detail = error["code"], error["message"], error.get("detail")
    assert isinstance(message, str) and code in WIRE_CODES, error
    own = detail.get("reason", code) if isinstance(detail, dict) else code
    assert isinstance(own, str), error
    if own != code:
        assert message.endswith(f"({own})"), error
    return code, own


async def exchange(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer to the end (the mirror closes after an error):
    (status, headers in lower case, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    return int(lines[0].split()[1]), headers, body


#: Nothing listens here: the discard port of a loopback address no test serves on (its own
#: address, because the mirror trusts the hosts of its upstreams as redirect targets).
CLOSED_URL = "http://127.255.255.254:9"


def offline_builtins(said: str) -> dict[str, str]:
    """Environment that points every built-in upstream but the default (which tests point
    at their own registry) at a closed loopback port, unless `said` (the test's own config
    or variables) names it: no test can dial a public registry, whatever name a fuzzed
    request carries."""
    return {
        f"MIRROR_UPSTREAMS__{re.sub('[^A-Z0-9]', '_', name.upper())}__URL": CLOSED_URL
        for name in DEFAULT_UPSTREAMS
        if name != DOCKER_HUB
        and name not in said
        and re.sub("[^A-Z0-9]", "_", name.upper()) not in said
    }


@pytest.fixture
async def make_mirror(tmp_path: Path) -> AsyncIterator[MakeMirror]:
    """Start in-process mirrors on real loopback sockets: `await make_mirror(upstream_url,
    toml="...extra config...")`. The default upstream (docker.io) points at `upstream_url`.
    Each records the requests it answers in `Mirror.seen`."""
    runners: list[web.AppRunner] = []

    async def start(upstream_url: str, toml: str = "", data_dir: Path | None = None) -> Mirror:
        data = data_dir or tmp_path / f"data{len(runners)}"
        config_file = tmp_path / f"config{len(runners)}.toml"
        config_file.write_text(toml)
        config = load_config(
            config_file,
            env=offline_builtins(toml),
            flags={"upstream": upstream_url, "data_dir": str(data), "listen": "127.0.0.1:0"},
        )
        app = build_app(config)
        seen: list[tuple[str, str]] = []

        async def record(request: web.Request, _: web.StreamResponse) -> None:
            seen.append((request.method, request.path_qs))

        app.on_response_prepare.append(record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = MirrorSite(runner, config, "127.0.0.1", 0)
        await site.start()
        port = site.port
        runners.append(runner)
        return Mirror(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", data, app, seen)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client (no proxy from the environment)."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


def pytest_collection_finish(session: pytest.Session) -> None:
    """With test_image.py among the tests to run, its base (debootstrap and the wheels, a
    minute or more, no dockerd) is begun now on a thread, under the tests before it."""
    if image_base.ready_tools() and any(i.path.name == "test_image.py" for i in session.items):
        work = Path(tempfile.mkdtemp(prefix="mirror-test-image-"))
        image_base.PREPARED.append(image_base.Preparation(work))


def pytest_sessionfinish(session: pytest.Session) -> None:
    for preparation in image_base.PREPARED:
        preparation.close()


#: A stop slower than this is told as a warning (nothing in flight should take it so long).
SLOW_STOP = 10.0


class MirrorProcess:
    """`python -m mirror serve` as a real process (uvloop, CLI, signals, restarts)."""

    def __init__(
        self,
        data_dir: Path,
        upstream_url: str,
        extra_env: dict[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.workers = workers
        self.data_dir = data_dir
        self.upstream_url = upstream_url
        extra = extra_env or {}
        config = Path(extra["MIRROR_CONFIG"]).read_text() if "MIRROR_CONFIG" in extra else ""
        self.env = {
            **os.environ,
            **offline_builtins(config + " ".join(extra)),
            "PYTHONFAULTHANDLER": "1",
            **extra,
        }
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"mirror-{self.port}.log"

    def command(self) -> list[str]:
        """What is run (a subclass may run a worker of several instead)."""
        return [
            sys.executable,
            "-m",
            "mirror",
            "serve",
            "--listen",
            self.host,
            "--data-dir",
            str(self.data_dir),
            "--upstream",
            self.upstream_url,
            "--workers",
            str(self.workers),
        ]

    def start(self, timeout: float = 15.0) -> MirrorProcess:
        cmd = self.command()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=PROJECT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirror exited: {self.log.read_text()[-2000:]}")
            try:
                with LOCAL_OPENER.open(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)  # ok: polling a condition with a deadline
        raise RuntimeError("mirror did not answer in time")

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            asked = time.monotonic()
            try:
                # a stop lets fills and uploads in flight finish for at most DRAIN_SECONDS
                self.proc.wait(timeout=DRAIN_SECONDS + 15)
                if time.monotonic() - asked > SLOW_STOP:  # told in the run's summary
                    warnings.warn(
                        f"the mirror took {time.monotonic() - asked:.0f}s to stop: "
                        f"{self.log.read_text(errors='replace')[-3000:]}",
                        stacklevel=2,
                    )
            except subprocess.TimeoutExpired:
                # PYTHONFAULTHANDLER: SIGABRT writes where every thread of it is to the log
                self.proc.send_signal(signal.SIGABRT)
                self.proc.wait(timeout=15)
                raise AssertionError(
                    f"the mirror did not stop on signal {sig}: {self.log.read_text()[-6000:]}"
                ) from None
        self.proc = None
        # logging's own report of a call whose arguments did not fit its format
        assert "--- Logging error ---" not in self.log.read_text(errors="replace"), self.log


@pytest.fixture
def mirror_process(tmp_path: Path) -> Iterator[Callable[..., MirrorProcess]]:
    """Factory of mirror processes, all stopped at the end of the test."""
    started: list[MirrorProcess] = []

    def make(
        upstream_url: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
    ) -> MirrorProcess:
        """A mirror process; one worker unless told (tests of worker processes say so)."""
        proc = MirrorProcess(data_dir or tmp_path / "data", upstream_url, env, workers)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def make_cert(where: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl: `<name>.crt`,
    `<name>.key` in `where`."""
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def skopeo_copy(src: str, dest: Path, *extra: str) -> tuple[int, str]:
    """Run `skopeo copy` without blocking the loop (an in-process mirror must keep serving)."""
    proc = await asyncio.create_subprocess_exec(
        "skopeo",
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--retry-times",
        "0",
        *extra,
        src,
        f"dir:{dest}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def ed25519_keys(where: Path, name: str, form: str = "pem") -> tuple[Path, Path]:
    """A new Ed25519 key pair made by the tools an operator would use: `openssl` for PEM
    files, `ssh-keygen` for OpenSSH ones. Returns (private key file, public key file)."""
    private = where / f"{name}.key"
    if form == "pem":
        public = where / f"{name}.pub.pem"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True
        )
    else:
        public = where / f"{name}.key.pub"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)],
            check=True,
        )
    return private, public


@pytest.fixture
async def small_disk(tmp_path: Path) -> AsyncIterator[Callable[[int], Path]]:
    """`small_disk(nbytes)`: a fresh tmpfs of that size, unmounted at the end."""
    mounts: list[Path] = []

    def mount(nbytes: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"these tests mount a tmpfs and need root: {done.stderr}"
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


class Ext4Disk:
    """A small ext4 filesystem on a loop device, mounted with `errors=remount-ro`, that can be
    made to fail as a disk does: `fail()` raises a real filesystem error (ext4's sysfs
    `trigger_fs_error`), and the kernel turns the mount read-only under whoever has files open."""

    def __init__(self, image: Path, where: Path) -> None:
        self.image, self.where = image, where

    def fail(self) -> None:
        device = Path(
            subprocess.run(
                ["findmnt", "-no", "SOURCE", str(self.where)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        ).name
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("test")


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Callable[[int], Ext4Disk]]:
    """`ext4_disk(nbytes)`: a fresh `Ext4Disk`, unmounted and released at the end."""
    disks: list[Ext4Disk] = []

    def make(nbytes: int) -> Ext4Disk:
        image, where = tmp_path / f"ext4-{len(disks)}.img", tmp_path / f"ext4-{len(disks)}"
        where.mkdir()
        with image.open("wb") as f:
            f.truncate(nbytes)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        done = subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(image), str(where)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"these tests mount a loop device and need root: {done.stderr}"
        disks.append(Ext4Disk(image, where))
        return disks[-1]

    yield make
    for disk in disks:
        subprocess.run(["umount", "-l", str(disk.where)], check=False)


class RedisEngine(Protocol):
    """Whatever a cluster's replicas are pointed at: `url` is their `redis_url`."""

    url: str


class RedisServer:
    """Debian's `redis-server` on a free loopback port, nothing saved to disk; `stop` and
    `start` again keep the port (a Redis that restarts empty). `args` are more of its
    options (`--replicaof …`, `--cluster-enabled yes`, `--sentinel`), `conf` a config file
    it reads first (a Sentinel's, which it rewrites), `password` its `requirepass`."""

    def __init__(
        self,
        where: Path,
        args: Sequence[str] = (),
        conf: Path | None = None,
        password: str = "",
    ) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password
        self._where = where
        self._args = [*args, *(["--requirepass", password] if password else [])]
        self._conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self._where.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", *([str(self._conf)] if self._conf else [])]
        command += ["--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self._where), *self._args]
        with (self._where / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self.proc.poll() is None, (self._where / "redis.log").read_text()
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    assert time.monotonic() < deadline, "redis-server did not answer in time"
                time.sleep(0.02)  # ok: polling a condition with a deadline
        finally:
            client.close()

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        """A client of this server for the test's own looks (close it)."""
        return redis.Redis(
            port=self.port,
            password=self.password or None,
            socket_timeout=1,
            socket_connect_timeout=1,
        )

    def ask(self, *command: str | int) -> Any:
        """One command's answer, or None while the server does not answer it."""
        client = self.client()
        try:
            return client.execute_command(*command)
        except redis.RedisError:
            return None
        finally:
            client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running `redis-server` of the test's own, stopped at the end."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def until(what: str, ok: Callable[[], object], timeout: float = 30.0) -> None:
    """`wait_until`'s blocking twin, for the fixtures that start engines: poll `ok` until it
    is true, failing naming `what` past the deadline."""
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.05)  # ok: polling a condition with a deadline


class RedisClusterNodes:
    """A Redis Cluster of `count` primaries (`redis-server --cluster-enabled yes`, their bus
    ports free loopback ports too, each with `password`), the 16384 slots split among them,
    each met by the first; `url` is the mirror's redis+cluster:// URL of them all."""

    SLOTS = 16384
    OPTIONS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")

    def __init__(self, where: Path, count: int = 3, password: str = "") -> None:
        self.buses = [free_port() for _ in range(count)]
        self.nodes = [
            RedisServer(
                where / f"node{i}",
                [*self.OPTIONS, "--cluster-port", str(bus)],
                password=password,
            )
            for i, bus in enumerate(self.buses)
        ]
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        self.url = (
            f"redis+cluster://:{password}@{hosts}" if password else f"redis+cluster://{hosts}"
        )

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        share = self.SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = self.SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * share - 1
            assert node.ask("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            if i:
                assert node.ask("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.buses[0])

        def formed() -> bool:
            infos = [node.ask("CLUSTER INFO") or {} for node in self.nodes]  # parsed
            return all(
                i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == str(len(infos))
                for i in infos
            )

        until("cluster_state:ok on every node", formed)
        return self

    def holders(self, pattern: str) -> dict[int, set[str]]:
        """Each node's port → its keys matching `pattern`: where the slots put them."""
        held: dict[int, set[str]] = {}
        for node in self.nodes:
            client = node.client()
            try:
                held[node.port] = {k.decode() for k in client.scan_iter(match=pattern)}
            finally:
                client.close()
        return held

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A running Redis Cluster of three primaries of the test's own, stopped at the end."""
    cluster = RedisClusterNodes(tmp_path / "redis-cluster", password="cluster-pw-4d9a1f")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


class RedisSentinelSet:
    """A master, its replica (`--replicaof`) and one Sentinel watching them as `SERVICE`, quick
    to fail over (a master silent for DOWN_AFTER ms is down, and one Sentinel is the quorum).
    The data nodes require `password`, the Sentinel `sentinel_password`; `url` is the mirror's
    redis+sentinel:// URL with both, naming the Sentinel only."""

    SERVICE = "mirror-redis"
    DOWN_AFTER = 1000

    def __init__(self, where: Path, password: str, sentinel_password: str) -> None:
        self.master = RedisServer(where / "master", ["--masterauth", password], password=password)
        self.replica = RedisServer(
            where / "replica",
            ["--replicaof", "127.0.0.1", str(self.master.port), "--masterauth", password],
            password=password,
        )
        self._conf = where / "sentinel" / "sentinel.conf"
        self.sentinel = RedisServer(
            where / "sentinel", ["--sentinel"], conf=self._conf, password=sentinel_password
        )
        self.url = (
            f"redis+sentinel://:{password}@127.0.0.1:{self.sentinel.port}/{self.SERVICE}"
            f"?sentinel_password={sentinel_password}"
        )

    def start(self) -> RedisSentinelSet:
        self.master.start()
        self.replica.start()
        until(
            "the replica in sync with the master",
            lambda: (
                (self.replica.ask("INFO", "replication") or {}).get("master_link_status") == "up"
            ),
        )
        self._conf.parent.mkdir(parents=True, exist_ok=True)
        self._conf.write_text(
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel auth-pass {self.SERVICE} {self.master.password}\n"
            f"sentinel down-after-milliseconds {self.SERVICE} {self.DOWN_AFTER}\n"
            f"sentinel failover-timeout {self.SERVICE} 10000\n"
        )
        self.sentinel.start()
        until("the Sentinel knows the replica", lambda: self.replica.port in self._replicas())
        return self

    def _replicas(self) -> set[int]:
        """The ports of the replicas the Sentinel sees up."""
        client = self.sentinel.client()
        try:
            return {
                int(r["port"])
                for r in client.sentinel_slaves(self.SERVICE)
                if not r["is_sdown"] and not r["is_odown"]
            }
        except redis.RedisError:
            return set()
        finally:
            client.close()

    def master_port(self) -> int | None:
        """The port of the master the Sentinel names now."""
        found = self.sentinel.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(found[1]) if found else None

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    """A running master, replica and Sentinel of the test's own, stopped at the end."""
    sentinel = RedisSentinelSet(tmp_path / "redis-sentinel", "master-pw-7c21e0", "sentinel-pw-93b5")
    try:
        yield sentinel.start()
    finally:
        sentinel.stop()


def lock_holder(path: Path) -> int | None:
    """The process holding a flock on `path`, as the kernel lists it in /proc/locks."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
            return int(fields[4])
    return None


# -- moto's S3 server: the object storage of the cold tier ------------------------------------

BUCKET = "mirror-cold"
KEYS = {"access_key_id": "testing", "secret_access_key": "testing-secret", "region": "us-east-1"}


def start_s3(port: int, log: Path) -> subprocess.Popen[bytes]:
    """moto's S3 server on `port`, once it answers, with the bucket made."""
    server = Path(sys.executable).with_name("moto_server")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline, "S3 server did not start"
            time.sleep(0.05)  # ok: polling a condition with a deadline
    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=KEYS["access_key_id"],
        aws_secret_access_key=KEYS["secret_access_key"],
        region_name=KEYS["region"],
    ).create_bucket(Bucket=BUCKET)
    return proc


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with one bucket."""
    port = free_port()
    proc = start_s3(port, tmp_path_factory.mktemp("s3") / "moto.log")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
