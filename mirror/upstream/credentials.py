"""Where an upstream's credentials come from, read when they are needed and kept while they hold.

An upstream has at most one source of credentials (`credentials_for`):

- `username` / `password` in the config: fixed.
- `credential_command` (with `username`): a program whose standard output is the password,
  such as `aws ecr get-login-password` (user `AWS`); run again once `credential_lifetime` has
  passed, so short-lived passwords are renewed without a restart.
- `docker_config`: a docker `config.json`, read as docker reads it. The registry's
  `credHelpers` entry, else `credsStore`, names a credential helper `docker-credential-<name>`,
  asked with the docker credential-helper protocol: `get` as its argument, the server URL on
  stdin, `{"Username": …, "Secret": …}` on stdout (Username `<token>` makes Secret an identity
  token; exiting non-zero with "credentials not found in native keychain" means none, so the
  pull is anonymous). Without a helper, the registry's `auths` entry: `auth` (base64 of
  `user:password`), `username` / `password`, or `identitytoken`. The file is read again when it
  changes (its modification time, size or inode: `docker login` and editors replace it by a
  rename); a helper's answer is kept `credential_lifetime`, or until the file changes.

An identity token is an OAuth2 refresh token: the token realm exchanges it (auth.py); it is
never sent as a password.

Programs run as child processes in a session of their own, without a shell, awaited on the
event loop (nothing blocks it), each with `credential_timeout` to answer. One that cannot be
started, fails, or hangs (then it is killed with its whole process group) makes the pull 401
UNAUTHORIZED with a message naming the program; what it printed on failure goes to the log,
never what it answered on success. Runs are single-flight: any number of requests waiting for
credentials start one program.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from mirror.config import DOCKER_HUB, UpstreamConfig
from mirror.coordination.flights import Flights
from mirror.errors import UpstreamDenied

log = logging.getLogger("mirror.upstream.credentials")

#: A credential helper named `x` in config.json is the program `docker-credential-x`.
HELPER_PREFIX = "docker-credential-"
#: What a helper prints (exiting non-zero) when it holds nothing for the server.
NOT_FOUND = "credentials not found in native keychain"
#: The Username with which a helper says its Secret is an identity token.
TOKEN_USERNAME = "<token>"
#: Docker Hub's key in config.json, and the server URL docker hands helpers for it.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
#: Bytes of a program's stdout (and of its stderr) kept; more is refused.
MAX_OUTPUT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = ""
    #: An OAuth2 refresh token (docker's `identitytoken`): exchanged at the token realm,
    #: never sent as Basic.
    identity_token: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ***)"


class Source(Protocol):
    """Where one upstream's credentials come from; `get` answers with the current ones."""

    async def get(self) -> Credentials | None: ...


def credentials_for(up: UpstreamConfig) -> Source | None:
    """The source of the upstream's credentials, or None when it is pulled anonymously."""
    if up.credential_command:
        return Command(up)
    if up.username:
        return Fixed(Credentials(up.username, up.password))
    if up.docker_config:
        return DockerConfig(up)
    return None


class Fixed:
    """Credentials written in the config."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def get(self) -> Credentials | None:
        return self._credentials

    def __repr__(self) -> str:
        return f"Fixed({self._credentials!r})"


class _Kept:
    """A program's last answer while `lifetime` lasts and the program asked stays the same;
    one run at a time, whoever is waiting."""

    def __init__(self, lifetime: float) -> None:
        self._lifetime = lifetime
        self._answer: tuple[Hashable, Credentials | None, float] | None = None
        self._flights: Flights[Hashable, None, Credentials | None] = Flights()

    async def get(
        self, key: Hashable, run: Callable[[], Awaitable[Credentials | None]]
    ) -> Credentials | None:
        answer = self._answer
        if answer is not None and answer[0] == key and answer[2] > time.monotonic():
            return answer[1]

        async def fresh() -> Credentials | None:
            credentials = await run()
            self._answer = (key, credentials, time.monotonic() + self._lifetime)
            return credentials

        credentials, _ = await self._flights.run(key, fresh)
        return credentials

    def forget(self) -> None:
        """The next `get` asks the program again (what it answers may have changed)."""
        self._answer = None


class Command:
    """`credential_command`: its standard output is the password of `username`."""

    def __init__(self, up: UpstreamConfig) -> None:
        self._argv = tuple(shlex.split(up.credential_command))
        self._up = up
        self._kept = _Kept(up.credential_lifetime)

    async def get(self) -> Credentials | None:
        return await self._kept.get(self._argv, self._run)

    async def _run(self) -> Credentials:
        what = f"credential_command {Path(self._argv[0]).name}"
        ran = await _run(list(self._argv), None, self._up.credential_timeout, what, self._up.name)
        if ran.status != 0:
            raise _failed(self._up.name, what, ran)
        try:
            password = ran.out.decode().strip()
        except UnicodeDecodeError:
            password = ""
        if not password:
            log.warning("credentials for upstream %s: %s printed no password", self._up.name, what)
            raise _refused(self._up.name, f"{what} printed no password")
        return Credentials(self._up.username, password)

    def __repr__(self) -> str:
        return f"Command({self._argv[0]!r}, user={self._up.username!r})"


@dataclass(frozen=True, slots=True)
class _Helper:
    """A credential helper to ask, and the server URL to ask it about."""

    name: str
    server: str


class DockerConfig:
    """A docker `config.json`, read again whenever it changes."""

    def __init__(self, up: UpstreamConfig) -> None:
        self._up = up
        self._path = Path(up.docker_config)
        self._stamp: tuple[int, int, int] | None = None
        self._choice: Credentials | _Helper | None = None
        self._kept = _Kept(up.credential_lifetime)

    async def get(self) -> Credentials | None:
        try:
            stamp, doc = await asyncio.to_thread(_read_changed, self._path, self._stamp)
            if stamp != self._stamp:  # `docker login` rewrites it: ask a helper again too
                self._choice, self._stamp = _choose(doc, self._up), stamp
                self._kept.forget()
        except (OSError, ValueError) as e:
            log.warning(
                "credentials for upstream %s: docker_config %s cannot be read: %s",
                self._up.name,
                self._path,
                e,
            )
            raise _refused(self._up.name, "its docker_config cannot be read") from None
        choice = self._choice
        if isinstance(choice, _Helper):
            return await self._kept.get(choice, lambda: self._ask(choice))
        return choice

    async def _ask(self, helper: _Helper) -> Credentials | None:
        """The docker credential-helper protocol's `get`."""
        what = f"credential helper {HELPER_PREFIX}{helper.name}"
        argv = [HELPER_PREFIX + helper.name, "get"]
        name = self._up.name
        ran = await _run(argv, helper.server.encode(), self._up.credential_timeout, what, name)
        if ran.status != 0:
            if NOT_FOUND in ran.out.decode(errors="replace"):
                log.debug("credentials for upstream %s: %s has none", name, what)
                return None
            raise _failed(name, what, ran)
        try:
            answer = json.loads(ran.out)
            username, secret = answer["Username"], answer["Secret"]
            if not isinstance(username, str) or not isinstance(secret, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            log.warning("credentials for upstream %s: %s answered no credentials JSON", name, what)
            raise _refused(name, f"{what} answered no credentials") from None
        if username == TOKEN_USERNAME:
            return Credentials("", "", identity_token=secret)
        return Credentials(username, secret)

    def __repr__(self) -> str:
        return f"DockerConfig({str(self._path)!r})"


def _read_changed(
    path: Path, known: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], Any]:
    """Blocking: the file's (mtime, size, inode), and its JSON when that is not `known`."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return stamp, (None if stamp == known else json.loads(f.read()))


def _choose(doc: Any, up: UpstreamConfig) -> Credentials | _Helper | None:
    """What config.json says about this upstream, in docker's order: its `credHelpers` entry,
    `credsStore`, its `auths` entry. ValueError when the file is no docker config."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    hosts = [*(h.lower() for h in up.hosts), urlsplit(up.url).netloc.lower()]
    if up.name == DOCKER_HUB:
        hosts.append("index.docker.io")
    helpers, auths = _by_host(doc.get("credHelpers")), _by_host(doc.get("auths"))
    for host in hosts:
        key, name = helpers.get(host, ("", None))
        if isinstance(name, str) and name:
            return _Helper(name, key)
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        default = DOCKER_HUB_SERVER if up.name == DOCKER_HUB else up.name
        return _Helper(store, next((auths[h][0] for h in hosts if h in auths), default))
    for host in hosts:
        if host in auths and (found := _entry(auths[host][1])) is not None:
            return found
    return None


def _by_host(table: Any) -> dict[str, tuple[str, Any]]:
    """A config.json table keyed by `host[:port]` however it is written (a bare host, or a
    URL like `https://index.docker.io/v1/`): host → (the key as written, its value)."""
    if not isinstance(table, dict):
        return {}
    return {
        urlsplit(key if "//" in key else f"//{key}").netloc.lower(): (key, value)
        for key, value in table.items()
    }


def _entry(entry: Any) -> Credentials | None:
    """An `auths` entry's credentials: `auth`, or `username`/`password`, with `identitytoken`
    standing in for the password."""
    if not isinstance(entry, dict):
        return None
    user, password = "", ""
    auth, username = entry.get("auth"), entry.get("username")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("an auths entry's auth is not base64 of user:password") from None
    elif isinstance(username, str):
        user, password = username, str(entry.get("password", ""))
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(user, "", identity_token=token)
    return Credentials(user, password) if user else None


# -- running a program -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ran:
    status: int
    out: bytes
    err: bytes


async def _run(
    argv: list[str], stdin: bytes | None, within: float, what: str, upstream: str
) -> _Ran:
    """Run `argv` with `stdin`, waiting at most `within` seconds for it to end; a program that
    does not end in time is killed with its process group (a helper's own children too)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        log.warning(
            "credentials for upstream %s: %s could not be started: %s",
            upstream,
            what,
            e.strerror or e,
        )
        raise _refused(upstream, f"{what} could not be started") from None
    try:
        out, err = await asyncio.wait_for(_talk(proc, stdin), within)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
        if not isinstance(e, TimeoutError):
            raise
        log.warning(
            "credentials for upstream %s: %s gave no answer within %gs: killed",
            upstream,
            what,
            within,
        )
        raise _refused(upstream, f"{what} gave no answer within {within:g}s") from None
    if len(out) > MAX_OUTPUT or len(err) > MAX_OUTPUT:
        log.warning("credentials for upstream %s: %s printed too much", upstream, what)
        raise _refused(upstream, f"{what} printed more than a credential")
    assert proc.returncode is not None  # _talk waited for it
    return _Ran(proc.returncode, out, err)


async def _talk(proc: asyncio.subprocess.Process, stdin: bytes | None) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    if stdin is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        proc.stdin.close()
    out, err = await asyncio.gather(_drain(proc.stdout), _drain(proc.stderr))
    await proc.wait()
    return out, err


async def _drain(stream: asyncio.StreamReader) -> bytes:
    """Read to the end, keeping at most MAX_OUTPUT + 1 bytes (enough to tell it was more)."""
    kept = bytearray()
    while chunk := await stream.read(MAX_OUTPUT):
        kept += chunk[: MAX_OUTPUT + 1 - len(kept)]
    return bytes(kept)


def _failed(upstream: str, what: str, ran: _Ran) -> UpstreamDenied:
    """A program that exited non-zero: its first line of output to the log, its exit status
    to the client."""
    lines = (ran.err or ran.out).decode(errors="replace").strip().splitlines()
    log.warning(
        "credentials for upstream %s: %s exited with status %d: %s",
        upstream,
        what,
        ran.status,
        lines[0][:200] if lines else "(no output)",
    )
    return _refused(upstream, f"{what} failed (exit status {ran.status})")


def _refused(upstream: str, why: str) -> UpstreamDenied:
    return UpstreamDenied(
        f"credentials for upstream {upstream} could not be had: {why}; the mirror's log says more"
    )
