"""Upstream authentication: challenge parsing, the Bearer token dance, a token cache.

Flow (https://distribution.github.io/distribution/spec/auth/token/): a request answered 401
with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is retried once with a token from
the realm: asked anonymously, with Basic credentials, or, for an identity token, by an OAuth2
refresh-token grant POSTed to the realm. Tokens are kept per (upstream, scope) until shortly
before they expire, in the coordinator's token cache (memory for one process; memory, then
Redis, for a cluster's replicas), and concurrent fetches of the same token are coalesced. The
cache is asked only for an upstream that has challenged with Bearer in this process: an
upstream that never does costs no lookup. A 401 is answered with a token the cache holds that
is not the refused one (another replica's) before the realm is asked. `Basic` challenges are
answered with the upstream's credentials (credentials.py says where they come from).

A host the upstream redirects to that challenges on its own (a registry keeping blobs, or its
whole API, behind a second host) gets a token from the realm it names, kept apart from the
upstream's tokens: asked anonymously unless the upstream's credentials may go to that realm
by the rules below. The upstream's own Authorization never goes to it.

Credentials go only to the registry itself and to a realm that (1) is https when the registry
is (an http registry, a local one, may name an http realm: its credentials travel in clear
text to it anyway), and (2) is the registry's own origin — scheme, host and port — or on a
host listed in `token_realms`: a bare `host` admits that host on the scheme's default port
(443 for https), `host:port` admits that port only. A realm that fails either is refused, as
401 to the client, before a byte goes to it. Without credentials any http(s) realm may be
asked anonymously: nothing secret goes there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from mirror.config import UpstreamConfig
from mirror.coordination import TokenCache
from mirror.coordination.flights import Flights
from mirror.errors import UpstreamDenied
from mirror.upstream.credentials import Credentials, credentials_for

log = logging.getLogger("mirror.upstream.auth")

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


#: The `client_id` of an OAuth2 grant: the spec asks for one that tells who asked.
CLIENT_ID = "mirror"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What to ask a token realm: GET with `query` (and `authorization`, Basic, when the
    credentials may go there), or, with `form`, POST the form (an OAuth2 refresh-token grant)."""

    realm: str
    query: dict[str, str]
    authorization: str | None = None
    form: dict[str, str] | None = None


#: Fetches a token: (upstream name, request) → the realm's JSON.
TokenFetcher = Callable[[str, TokenRequest], Awaitable[dict[str, object]]]


def _elsewhere(up: UpstreamConfig, origin: str) -> str:
    """The token cache's name for tokens of a host `up` redirected to: never the upstream's
    own entry, so neither host is ever sent the other's token."""
    return f"{up.name} via {origin}"


class Authenticator:
    """Per-upstream credentials and the token cache; the HTTP client asks it what to send."""

    def __init__(
        self, upstreams: tuple[UpstreamConfig, ...], fetch: TokenFetcher, tokens: TokenCache
    ) -> None:
        self._sources = {up.name: s for up in upstreams if (s := credentials_for(up)) is not None}
        self._fetch = fetch
        self._tokens = tokens
        self._basic: set[str] = set()
        #: Token cache names (upstreams, hosts they redirected to) that challenged with Bearer.
        self._bearer: set[str] = set()
        self._flights: Flights[tuple[str, str], None, str] = Flights()

    async def credentials(self, up: UpstreamConfig) -> Credentials | None:
        """The upstream's credentials as they are now (credentials.py reads them again when
        they expire or their file changes)."""
        source = self._sources.get(up.name)
        return None if source is None else await source.get()

    async def header(self, up: UpstreamConfig, scope: str) -> str | None:
        """The Authorization header to send first: a live cached token, or Basic if the
        registry asked for Basic before."""
        if up.name in self._bearer and (token := await self._tokens.get(up.name, scope)):
            return f"Bearer {token}"
        if up.name in self._basic:
            creds = await self.credentials(up)
            if creds is not None and not creds.identity_token:
                return creds.basic()
        return None

    async def answer(
        self, up: UpstreamConfig, scope: str, www_authenticate: str, sent: str | None
    ) -> str | None:
        """The header that answers a 401's challenge to a request that carried `sent` (its
        Authorization, if any), or None when we have nothing to offer."""
        challenge = parse_challenge(www_authenticate)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self.credentials(up)
            if creds is None:
                return None
            if creds.identity_token:
                raise UpstreamDenied(
                    "the upstream asks for Basic credentials, and the mirror holds an identity "
                    "token for it, which only a token realm takes"
                )
            self._basic.add(up.name)
            return creds.basic()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        token = await self._renewed(up, up.name, scope, challenge, sent, elsewhere=False)
        return f"Bearer {token}"

    async def redirect_header(self, up: UpstreamConfig, origin: str, scope: str) -> str | None:
        """A live token for `origin`, a host `up` redirected to, got from that host's own
        challenge; None when there is none."""
        key = _elsewhere(up, origin)
        if key in self._bearer and (token := await self._tokens.get(key, scope)):
            return f"Bearer {token}"
        return None

    async def answer_redirect(
        self, up: UpstreamConfig, origin: str, scope: str, www_authenticate: str, sent: str | None
    ) -> str:
        """The header that answers the challenge of `origin`, a host `up` redirected to (a
        registry that keeps blobs, or its whole API, behind a second host): a token from the
        realm that host names, in place of `sent` (the token it refused, if any). The upstream's
        credentials go to that realm only when they may go to it anyway (`realm_refusal`);
        otherwise the token is asked for anonymously. The upstream's own Authorization never
        goes to that host."""
        challenge = parse_challenge(www_authenticate)
        if challenge is None or challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise UpstreamDenied(
                "a host the upstream redirected to asks for credentials, and the upstream's "
                "are never sent to another host"
            )
        token = await self._renewed(
            up, _elsewhere(up, origin), scope, challenge, sent, elsewhere=True
        )
        return f"Bearer {token}"

    async def _renewed(
        self,
        up: UpstreamConfig,
        key: str,
        scope: str,
        challenge: Challenge,
        sent: str | None,
        elsewhere: bool,
    ) -> str:
        """A token under `key` in place of the one `sent` carried, which was refused: dropped
        from the cache, then one fetch for the concurrent callers (`_fetched`)."""
        self._bearer.add(key)
        refused = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
        if refused is not None:
            await self._tokens.drop(key, scope, refused)
        token, _ = await self._flights.run(
            (key, scope), lambda: self._fetched(up, key, scope, challenge, refused, elsewhere)
        )
        return token

    async def _fetched(
        self,
        up: UpstreamConfig,
        key: str,
        scope: str,
        challenge: Challenge,
        refused: str | None,
        elsewhere: bool,
    ) -> str:
        """The cache's token when it holds one other than `refused` (another replica fetched
        it since, or this process's lookup missed it), else the realm's (`_token`)."""
        found = await self._tokens.get(key, scope)
        if found is not None and found != refused:
            return found
        return await self._token(up, key, scope, challenge, elsewhere)

    async def _token(
        self, up: UpstreamConfig, key: str, scope: str, challenge: Challenge, elsewhere: bool
    ) -> str:
        """A token from the challenge's realm, kept under `key`. With credentials, a realm
        they may not go to is refused (401), unless the challenge came from a host the
        upstream redirected to (`elsewhere`): that realm is asked anonymously."""
        realm = challenge.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamDenied("upstream token realm is not an http(s) URL")
        query = {"scope": challenge.params.get("scope", scope)}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        refusal = realm_refusal(up, parts)
        creds = None if elsewhere and refusal is not None else await self.credentials(up)
        if creds is not None and refusal is not None:
            raise UpstreamDenied(
                f"credentials not sent to the upstream token realm: {refusal}",
                detail={"realm": f"{parts.scheme}://{parts.netloc}"},
            )
        body = await self._fetch(up.name, _request(realm, query, creds))
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamDenied("upstream token realm returned no token")
        expires_in = body.get("expires_in")
        ttl = (
            float(expires_in)
            if isinstance(expires_in, (int, float)) and expires_in > 0
            else DEFAULT_EXPIRES_IN
        )
        await self._tokens.put(key, scope, token, max(ttl - EXPIRY_MARGIN, 1.0))
        return token


def _request(realm: str, query: dict[str, str], creds: Credentials | None) -> TokenRequest:
    """How to ask the realm: anonymously, with Basic credentials, or with the identity token
    as an OAuth2 refresh-token grant (https://distribution.github.io/distribution/spec/auth/oauth/)."""
    if creds is None:
        return TokenRequest(realm, query)
    if creds.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": CLIENT_ID,
            **query,
        }
        return TokenRequest(realm, {}, form=form)
    return TokenRequest(realm, query, creds.basic())


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
