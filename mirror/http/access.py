"""Client access control (`[auth]`): HTTP Basic against an htpasswd file of bcrypt hashes, or
static bearer tokens, each allowed the repositories its grants name. Off unless configured.

No or wrong credentials: 401 UNAUTHORIZED with `WWW-Authenticate: Basic realm="mirror"`, which
is how `docker login`, containerd (`hosts.toml` `[header]`) and skopeo learn to send them; known
client, repository not granted: 403 DENIED. Checked before any store or upstream access.
bcrypt is slow on purpose (tens of ms): a verified (user, password) pair is remembered, by a
hash of the password, so a pull of fifty blobs runs bcrypt once.

What a Basic attempt costs, and what its timing tells:
- Checks run on `PASSWORD_THREADS` threads of their own, behind a semaphore of the same size:
  a flood of wrong passwords keeps at most that many cores busy with bcrypt and leaves the
  event loop and the shared thread pools alone; the rest wait their turn
  (`mirror_client_password_checks_in_progress{state="waiting"}`).
- A user name that is not in the file is checked against a dummy hash of the file's highest
  cost, so the answer takes as long as a wrong password for a user that exists (one whose
  entry has that cost). No count or log tells the two apart.
- bcrypt reads only the first 72 bytes of a password (`htpasswd -B` truncates); bcrypt 5 raises
  on longer ones instead, so they are cut to 72 bytes here as htpasswd does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path

import bcrypt
from aiohttp import web

from mirror import errors
from mirror.bounded import Bounded
from mirror.config import AuthConfig, grant_regex
from mirror.metrics import Metrics
from mirror.store.offload import offload
from mirror.upstream.routing import Target

CHALLENGE = 'Basic realm="mirror"'
#: Verified (user, password digest) pairs remembered (then forgotten all at once).
REMEMBERED = 10_000
#: The bytes of a password bcrypt reads; `htpasswd -B` drops the rest.
BCRYPT_MAX_PASSWORD = 72
#: An htpasswd bcrypt entry: variant, two-digit cost, 22 characters of salt, 31 of hash.
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
#: The cost of the dummy hash when the file holds no entry (bcrypt's own default).
DEFAULT_COST = 12
#: bcrypt checks running at once, each on a thread of its own (http/app.py makes the pool).
PASSWORD_THREADS = 4


#: What a grant admits, compiled (config.grant_regex says how globs match).
Patterns = tuple[re.Pattern[str], ...]


def _compiled(patterns: Iterable[str]) -> Patterns:
    """The config checked every pattern already; one that is not is a bug, not a refusal."""
    compiled = tuple(grant_regex(p) for p in patterns)
    assert all(c is not None for c in compiled), patterns
    return tuple(c for c in compiled if c is not None)


#: An htpasswd user with no grant may pull everything.
EVERYTHING: Patterns = _compiled(["**"])

#: Who the request's credentials name, once checked: an htpasswd user, or `token:<first 8 hex
#: of the token's sha256>` (a token is never shown, in events or anywhere else).
USER = web.RequestKey("user", str)


def admits(patterns: Patterns, upstream: str, repo: str) -> bool:
    """Whether grants of these patterns may see `<upstream>/<repo>`."""
    name = f"{upstream}/{repo}"
    return any(p.fullmatch(name) for p in patterns)


class Access:
    def __init__(self, config: AuthConfig, password_threads: Executor, metrics: Metrics) -> None:
        self.enabled = config.enabled
        self._users = _read_htpasswd(Path(config.htpasswd)) if config.htpasswd else {}
        self._dummy = _dummy_hash(self._users.values())
        self._threads = password_threads
        self._metrics = metrics
        self._slots = asyncio.Semaphore(PASSWORD_THREADS)
        self._tokens = {
            g.who[len("token:") :].encode(): _compiled(g.repositories)
            for g in config.grants
            if g.who.startswith("token:")
        }
        self._grants = {
            g.who: _compiled(g.repositories)
            for g in config.grants
            if not g.who.startswith("token:")
        }
        self._verified: Bounded[tuple[str, bytes], bool] = Bounded(REMEMBERED)

    async def check(self, request: web.Request, target: Target | None) -> None:
        """Raise Unauthorized or Denied unless the request may go on (to `target`, if any)."""
        if not self.enabled:
            return
        patterns = await self.grants(request)
        if target is not None and not admits(patterns, target.upstream.name, target.repo):
            raise errors.Denied(detail={"name": target.name})

    def user(self, request: web.Request) -> str | None:
        """Who the request authenticated as (None while access control is off: a lookup in
        the request's mapping costs a pull event a microsecond for nothing)."""
        return request.get(USER) if self.enabled else None

    async def grants(self, request: web.Request) -> Patterns:
        """What the request's credentials grant (everything while access control is off);
        Unauthorized when they are missing or wrong."""
        if not self.enabled:
            return EVERYTHING
        found = await self._who(request.headers.get("Authorization", ""))
        if found is None:
            raise errors.Unauthorized("authentication required", challenge=CHALLENGE)
        request[USER], patterns = found
        return patterns

    async def _who(self, header: str) -> tuple[str, Patterns] | None:
        """Who the credentials name and the repository patterns they grant, or None when they
        are not valid."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip().encode()
            for token, patterns in self._tokens.items():
                if hmac.compare_digest(token, given):
                    return "token:" + hashlib.sha256(token).hexdigest()[:8], patterns
            return None
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        stored = self._users.get(user)
        if stored is None:
            await self._bcrypt(password.encode(), self._dummy)  # as long as a wrong password
            return None
        key = (user, hashlib.sha256(password.encode() + stored).digest())
        if key not in self._verified:
            if not await self._bcrypt(password.encode(), stored):
                return None
            self._verified.remember(key, True)
        return user, self._grants.get(user, EVERYTHING)

    async def _bcrypt(self, password: bytes, stored: bytes) -> bool:
        """One bcrypt check on a password thread, once one of the slots is free."""
        with self._metrics.password_check_waiting():
            await self._slots.acquire()
        try:
            with self._metrics.password_check_running():
                return await offload(
                    self._threads, bcrypt.checkpw, password[:BCRYPT_MAX_PASSWORD], stored
                )
        finally:
            self._slots.release()


def _read_htpasswd(path: Path) -> dict[str, bytes]:
    """user → bcrypt hash; lines of other hash kinds are refused (they are weak), and so are
    malformed bcrypt entries (they would fail every check with an error, not a refusal)."""
    users = {}
    for line in path.read_text().splitlines():
        user, sep, hashed = line.strip().partition(":")
        if not sep or line.startswith("#"):
            continue
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise errors.ConfigError(
                f"auth.htpasswd: {user!r} is not a bcrypt entry (use htpasswd -B)"
            )
        if not _BCRYPT.fullmatch(hashed):
            raise errors.ConfigError(f"auth.htpasswd: {user!r} has a malformed bcrypt entry")
        users[user] = hashed.encode()
    return users


def _dummy_hash(entries: Iterable[bytes]) -> bytes:
    """A well-formed bcrypt hash no password matches, at the highest cost in `entries`: what a
    password for an unknown user is checked against."""
    cost = max((int(e[4:6]) for e in entries), default=DEFAULT_COST)  # `$2b$NN$…`
    return f"$2b${cost:02d}${'.' * 53}".encode()
