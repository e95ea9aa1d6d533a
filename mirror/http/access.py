"""Client access control (`[auth]`): HTTP Basic against an htpasswd file of bcrypt hashes, or
static bearer tokens, each allowed the repositories its grants name. Off unless configured.

No or wrong credentials: 401 UNAUTHORIZED with `WWW-Authenticate: Basic realm="mirror"`, which
is how `docker login`, containerd (`hosts.toml` `[header]`) and skopeo learn to send them; known
client, repository not granted: 403 DENIED. Checked before any store or upstream access.
bcrypt is slow on purpose (tens of ms): a verified (user, password) pair is remembered, by a
hash of the password, so a pull of fifty blobs runs bcrypt once; the check runs in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
from fnmatch import fnmatchcase
from pathlib import Path

import bcrypt
from aiohttp import web

from mirror import errors
from mirror.bounded import Bounded
from mirror.config import AuthConfig
from mirror.upstream.routing import Target

CHALLENGE = 'Basic realm="mirror"'
#: Verified (user, password digest) pairs remembered (then forgotten all at once).
REMEMBERED = 10_000


class Access:
    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._users = _read_htpasswd(Path(config.htpasswd)) if config.htpasswd else {}
        self._tokens = {
            g.who[len("token:") :].encode(): g.repositories
            for g in config.grants
            if g.who.startswith("token:")
        }
        self._grants = {
            g.who: g.repositories for g in config.grants if not g.who.startswith("token:")
        }
        self._verified: Bounded[tuple[str, bytes], bool] = Bounded(REMEMBERED)

    async def check(self, request: web.Request, target: Target | None) -> None:
        """Raise Unauthorized or Denied unless the request may go on (to `target`, if any)."""
        if not self.enabled:
            return
        patterns = await self._who(request.headers.get("Authorization", ""))
        if patterns is None:
            raise errors.Unauthorized("authentication required", challenge=CHALLENGE)
        if target is not None and not any(
            fnmatchcase(f"{target.upstream.name}/{target.repo}", p) for p in patterns
        ):
            raise errors.Denied(detail={"name": target.name})

    async def _who(self, header: str) -> tuple[str, ...] | None:
        """The repository patterns the credentials grant, or None when they are not valid."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip().encode()
            return next((p for t, p in self._tokens.items() if hmac.compare_digest(t, given)), None)
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
            return None
        key = (user, hashlib.sha256(password.encode() + stored).digest())
        if key not in self._verified:
            if not await asyncio.to_thread(bcrypt.checkpw, password.encode(), stored):
                return None
            self._verified.remember(key, True)
        return self._grants.get(user, ("*",))


def _read_htpasswd(path: Path) -> dict[str, bytes]:
    """user → bcrypt hash; lines of other hash kinds are refused (they are weak)."""
    users = {}
    for line in path.read_text().splitlines():
        user, sep, hashed = line.strip().partition(":")
        if not sep or line.startswith("#"):
            continue
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise errors.ConfigError(
                f"auth.htpasswd: {user!r} is not a bcrypt entry (use htpasswd -B)"
            )
        users[user] = hashed.encode()
    return users
