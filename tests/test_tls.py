"""TLS termination on a real `mirror serve` process: blobs (filling and cached) go out whole
through TLS, a new certificate is picked up on SIGHUP without a restart, a broken one is refused
at start and kept out on reload, and a reload of a certificate with another pair's key leaves the
served certificate, and the connections open, as they were."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from conftest import PROJECT, make_cert
from registry import free_port
from upstream_sim import UpstreamSim


def _served_cert(port: int, trust: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(trust))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True) or b""


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _start(
    tmp_path: Path, cert: Path, key: Path, port: int, upstream: str
) -> subprocess.Popen[bytes]:
    """`mirror serve` with `[tls]` from `cert` and `key`, logging to tmp_path/mirror.log."""
    env = {**os.environ, "MIRROR_TLS__CERT": str(cert), "MIRROR_TLS__KEY": str(key)}
    with (tmp_path / "mirror.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mirror",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "data"),
                "--upstream",
                upstream,
            ],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=log,
        )


async def _serving(proc: subprocess.Popen[bytes], port: int, cert: Path, tmp_path: Path) -> None:
    """Wait until the process completes TLS handshakes."""
    deadline = time.monotonic() + 20
    while True:
        try:
            await asyncio.to_thread(_served_cert, port, cert)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "mirror.log"
            ).read_text()
            await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def _logged(tmp_path: Path, line: bytes) -> None:
    """Wait until mirror.log holds `line`."""
    deadline = time.monotonic() + 10
    while line not in (tmp_path / "mirror.log").read_bytes():
        assert time.monotonic() < deadline, (tmp_path / "mirror.log").read_text()
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def test_tls_serves_blobs_and_reloads_on_sighup(sim: UpstreamSim, tmp_path: Path) -> None:
    first_cert, first_key = make_cert(tmp_path, "first")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first_cert.read_bytes())
    key.write_bytes(first_key.read_bytes())
    port = free_port()
    proc = _start(tmp_path, cert, key, port, sim.url)
    try:
        await _serving(proc, port, cert, tmp_path)
        data = hashlib.sha256(b"tls").digest() * 200_000  # 6.4 MB: a fill, then a hit
        digest = sim.add_blob(data)
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(
            trust_env=False, connector=aiohttp.TCPConnector(ssl=trust)
        ) as client:
            for outcome in ("miss", "hit"):
                if outcome == "hit":
                    deadline = time.monotonic() + 10
                    while not list((tmp_path / "data" / "blobs").rglob(digest[7:])):
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
                async with client.get(f"https://127.0.0.1:{port}/v2/t/x/blobs/{digest}") as resp:
                    assert resp.status == 200 and resp.headers["X-Mirror-Cache"] == outcome
                    assert await resp.read() == data
        # rotate: a new pair in place, SIGHUP, new handshakes get it
        second_cert, second_key = make_cert(tmp_path, "second")
        cert.write_bytes(second_cert.read_bytes())
        key.write_bytes(second_key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(_served_cert, port, cert) != _der(second_cert):
            assert time.monotonic() < deadline, "the new certificate was not picked up"
            await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
        # a broken pair on reload is refused and the served one stays
        key.write_text("not a key")
        proc.send_signal(signal.SIGHUP)
        await _logged(tmp_path, b"TLS reload failed")
        assert await asyncio.to_thread(_served_cert, port, cert) == _der(second_cert)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)


class _Connection:
    """One TLS connection kept open across reloads, speaking HTTP/1.1 keep-alive."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
        self.served = self.tls.getpeercert(binary_form=True)

    def status(self) -> int:
        """GET /v2/ on this connection; the answer's status."""
        self.tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.tls.recv(65536)
            assert chunk, "the connection was closed"
            head += chunk
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")
        )
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += self.tls.recv(65536)
        return int(lines[0].split()[1])


async def test_a_key_of_another_pair_on_reload_keeps_the_served_certificate(
    sim: UpstreamSim, tmp_path: Path
) -> None:
    """SIGHUP with a valid certificate and a valid key that are not a pair (openssl made two
    pairs; the certificate of one, the key of the other): the reload is refused and logged, new
    handshakes still complete with the old certificate, a connection opened before answers on;
    a good pair on the next SIGHUP is what new handshakes get from then on."""
    first_cert, first_key = make_cert(tmp_path, "first")
    one_cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "other")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first_cert.read_bytes())
    key.write_bytes(first_key.read_bytes())
    port = free_port()
    proc = _start(tmp_path, cert, key, port, sim.url)
    try:
        await _serving(proc, port, cert, tmp_path)
        before = await asyncio.to_thread(_Connection, port)
        assert before.served == _der(first_cert)
        assert await asyncio.to_thread(before.status) == 200
        # the mismatched pair
        cert.write_bytes(one_cert.read_bytes())
        key.write_bytes(other_key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        await _logged(tmp_path, b"TLS reload failed")
        for _ in range(3):
            assert await asyncio.to_thread(_served_cert, port, cert) == _der(first_cert)
        assert await asyncio.to_thread(before.status) == 200
        # a good pair
        second_cert, second_key = make_cert(tmp_path, "second")
        cert.write_bytes(second_cert.read_bytes())
        key.write_bytes(second_key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        await _logged(tmp_path, b"TLS certificate reloaded")
        for _ in range(3):
            assert await asyncio.to_thread(_served_cert, port, cert) == _der(second_cert)
        after = await asyncio.to_thread(_Connection, port)
        assert after.served == _der(second_cert)
        assert await asyncio.to_thread(after.status) == 200
        assert await asyncio.to_thread(before.status) == 200
        before.tls.close()
        after.tls.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_broken_certificate_is_refused_at_start(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "ok")
    key.write_text("broken")
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--data-dir", str(tmp_path / "d")],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MIRROR_TLS__CERT": str(cert), "MIRROR_TLS__KEY": str(key)},
    )
    assert done.returncode == 2 and "tls.cert/tls.key" in done.stderr
