"""Upstream authentication: challenge parsing, credentials, the Bearer token dance, a token cache.

Flow (https://distribution.github.io/distribution/spec/auth/token/): a request answered 401
with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is retried once with a token from
the realm. Tokens are kept per (upstream, scope) until shortly before they expire, in the
coordinator's token cache (memory for one process), and concurrent fetches of the same token
are coalesced. `Basic` challenges are answered with the
configured credentials.

Credentials go only to the registry itself and to a realm that (1) is https when the registry
is (an http registry, a local one, may name an http realm: its credentials travel in clear
text to it anyway), and (2) is the registry's own origin — scheme, host and port — or on a
host listed in `token_realms`: a bare `host` admits that host on the scheme's default port
(443 for https), `host:port` admits that port only. A realm that fails either is refused, as
401 to the client, before a byte goes to it. Without credentials any http(s) realm may be
asked anonymously: nothing secret goes there.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from mirror.config import UpstreamConfig
from mirror.coordination import TokenCache
from mirror.coordination.flights import Flights
from mirror.errors import UpstreamDenied

#: A token is dropped this many seconds before its stated expiry, to absorb clock and transit.
EXPIRY_MARGIN = 10.0
#: The token spec's default lifetime when the realm does not say.
DEFAULT_EXPIRES_IN = 60.0

#: The port a URL without one means.
DEFAULT_PORTS = {"http": 80, "https": 443}

_PARAM_RE = re.compile(r'\s*([a-zA-Z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a WWW-Authenticate header (RFC 9110 §11.6.1)."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    for m in _PARAM_RE.finditer(rest):
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ***)"


def credentials_for(up: UpstreamConfig) -> Credentials | None:
    """Credentials from the upstream's config, else from its docker config.json entry."""
    if up.username:
        return Credentials(up.username, up.password)
    if up.docker_config:
        return _from_docker_config(Path(up.docker_config), up)
    return None


def _from_docker_config(path: Path, up: UpstreamConfig) -> Credentials | None:
    auths = json.loads(path.read_text()).get("auths", {})
    keys = {urlsplit(k if "//" in k else f"//{k}").netloc: v for k, v in auths.items()}
    hosts = [*list(up.hosts), urlsplit(up.url).netloc]
    if up.name == "docker.io":
        hosts.append("index.docker.io")
    for host in hosts:
        entry = keys.get(host)
        if entry and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(user, password)
        if entry and entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


#: Fetches a token: (upstream name, realm, query, Authorization or None) → the realm's JSON.
TokenFetcher = Callable[[str, str, dict[str, str], str | None], Awaitable[dict[str, object]]]


class Authenticator:
    """Per-upstream credentials and the token cache; the HTTP client asks it what to send."""

    def __init__(
        self, upstreams: tuple[UpstreamConfig, ...], fetch: TokenFetcher, tokens: TokenCache
    ) -> None:
        self._creds = {up.name: credentials_for(up) for up in upstreams}
        self._fetch = fetch
        self._tokens = tokens
        self._basic: set[str] = set()
        self._flights: Flights[tuple[str, str], None, str] = Flights()

    def header(self, up: UpstreamConfig, scope: str) -> str | None:
        """The Authorization header to send first: a live cached token, or Basic if the
        registry asked for Basic before."""
        token = self._tokens.get(up.name, scope)
        if token is not None:
            return f"Bearer {token}"
        creds = self._creds.get(up.name)
        if up.name in self._basic and creds is not None:
            return creds.basic()
        return None

    async def answer(self, up: UpstreamConfig, scope: str, www_authenticate: str) -> str | None:
        """The header that answers a 401's challenge, or None when we have nothing to offer."""
        challenge = parse_challenge(www_authenticate)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds.get(up.name)
            if creds is None:
                return None
            self._basic.add(up.name)
            return creds.basic()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        self._tokens.drop(up.name, scope)  # it was refused, if we sent it
        token, _ = await self._flights.run(
            (up.name, scope), lambda: self._token(up, scope, challenge)
        )
        return f"Bearer {token}"

    async def _token(self, up: UpstreamConfig, scope: str, challenge: Challenge) -> str:
        realm = challenge.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamDenied("upstream token realm is not an http(s) URL")
        creds = self._creds.get(up.name)
        auth = None
        if creds is not None:
            refusal = realm_refusal(up, parts)
            if refusal is not None:
                raise UpstreamDenied(
                    f"credentials not sent to the upstream token realm: {refusal}",
                    detail={"realm": f"{parts.scheme}://{parts.netloc}"},
                )
            auth = creds.basic()
        query = {"scope": challenge.params.get("scope", scope)}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        body = await self._fetch(up.name, realm, query, auth)
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamDenied("upstream token realm returned no token")
        expires_in = body.get("expires_in")
        ttl = (
            float(expires_in)
            if isinstance(expires_in, (int, float)) and expires_in > 0
            else DEFAULT_EXPIRES_IN
        )
        self._tokens.put(up.name, scope, token, max(ttl - EXPIRY_MARGIN, 1.0))
        return token


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None if not http(s)."""
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or DEFAULT_PORTS[parts.scheme]


def realm_refusal(up: UpstreamConfig, realm: SplitResult) -> str | None:
    """Why `up`'s credentials may not go to the token realm `realm`, or None when they may."""
    own, there = _origin(urlsplit(up.url)), _origin(realm)
    if own is None or there is None:
        return "not an http(s) URL with a valid port"
    scheme, host, port = there
    if own[0] == "https" and scheme != "https":
        return "it is not https and the registry is (they would travel in clear text)"
    if there == own:
        return None
    listed = {entry.lower() for entry in up.token_realms}
    if f"{host}:{port}" in listed or (host in listed and port == DEFAULT_PORTS[scheme]):
        return None
    return (
        f"{scheme}://{host}:{port} is neither the registry's own origin nor in token_realms "
        "(a bare host there admits only the default port; list host:port for another)"
    )
