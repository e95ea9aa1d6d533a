"""Where the mirror may connect on an upstream's word.

The upstreams are the operator's choice and are dialled wherever they are. What an upstream
names — a redirect (a CDN, signed storage) or a token realm — is not: it may point at the
mirror's own network (loopback, link-local such as a cloud metadata service at
169.254.169.254, private ranges), and a mirror that follows it fetches, and might cache and
serve, what only the mirror can reach. So those connections go to public addresses only,
except:

- the addresses of the configured upstreams themselves (a registry on the private network
  may redirect to itself, under any name), and
- networks an upstream lists in `private_targets` (a private registry's storage).

Every address a name resolves to is checked when the connection is made, not once when the
URL is read, so a name that resolves to a public address first and an internal one later
(DNS rebinding) gets nowhere. An https upstream is never followed to http.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from mirror import errors
from mirror.config import UpstreamConfig

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class Egress:
    """What may be dialled: any configured upstream host, and otherwise public addresses or
    the upstreams' own addresses or `private_targets`."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self.hosts = {(urlsplit(u.url).hostname or "").lower() for u in upstreams}
        self._addresses: set[Address] = {a for h in self.hosts if (a := _literal(h))}
        self._networks: list[Network] = [
            ipaddress.ip_network(n, strict=False) for u in upstreams for n in u.private_targets
        ]

    def learn(self, addresses: list[str]) -> None:
        """Addresses a configured upstream's name resolved to: as trusted as its name."""
        self._addresses.update(a for a in map(_literal, addresses) if a is not None)

    def allowed(self, address: str) -> bool:
        found = _literal(address)
        if found is None:
            return False
        if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
            found = found.ipv4_mapped
        return (
            found.is_global
            or found in self._addresses
            or any(found in net for net in self._networks)
        )

    def check(self, url: str, came_from: str | None = None) -> None:
        """Raise UpstreamBadResponse for a URL an upstream named that is not to be followed:
        an address literal outside what is allowed, or https → http. (A name is checked
        when it is resolved: `GuardedResolver`.)"""
        parts = urlsplit(url)
        if (
            came_from is not None
            and urlsplit(came_from).scheme == "https"
            and parts.scheme == "http"
        ):
            raise errors.UpstreamBadResponse("upstream redirected from https to http: not followed")
        host = (parts.hostname or "").lower()
        if host in self.hosts:
            return
        if _literal(host) is not None and not self.allowed(host):
            raise errors.UpstreamBadResponse(
                "upstream named an internal address: not dialled", internal=url[:200]
            )


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses `egress` allows for a name that is no
    configured upstream host."""

    def __init__(self, egress: Egress, inner: AbstractResolver | None = None) -> None:
        self._egress = egress
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if host.lower() in self._egress.hosts:
            self._egress.learn([r["host"] for r in found])
            return found
        kept = [r for r in found if self._egress.allowed(r["host"])]
        if not kept:
            raise OSError(f"{host} resolves only to addresses the mirror does not dial")
        return kept

    async def close(self) -> None:
        await self._inner.close()
