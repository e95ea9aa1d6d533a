"""One frozen, typed configuration, built once at start from TOML, environment and flags.

Precedence, lowest first: the embedded defaults (a Docker Hub mirror that serves the big public
registries too, no file needed), the TOML file, `MIRROR_…` environment variables, command-line
flags. Unknown keys and bad values are refused with a `ConfigError` that names the key, so a
typo never silently falls back to a default. `config.example.toml` documents every key; keep
it in step with the dataclasses here.

Environment variables: `MIRROR_<KEY>` for top-level keys (`MIRROR_LISTEN`, `MIRROR_DATA_DIR`),
`MIRROR_<SECTION>__<KEY>` for section keys (`MIRROR_TIMEOUTS__CONNECT`),
`MIRROR_UPSTREAMS__<NAME>__<KEY>` for an upstream (NAME upper-cased, non-alphanumerics as `_`:
`MIRROR_UPSTREAMS__DOCKER_IO__PASSWORD`), and `MIRROR_UPSTREAM` for the default upstream's URL.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import hashlib
import ipaddress
import re
import shlex
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror import signing
from mirror.errors import ConfigError
from mirror.policies import POLICIES
from mirror.redis_url import redis_shown, redis_target

DOCKER_HUB = "docker.io"
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
ENV_PREFIX = "MIRROR_"
#: Variables the mirror reads that are not configuration keys (the CLI's).
ENV_OWN = frozenset({"MIRROR_CONFIG"})
#: How alike (difflib ratio) an unknown name must be to a key to be taken for a typo of it.
NEAR_MISS = 0.8


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `read` is the longest silence tolerated while reading an upstream answer."""

    connect: float = 10.0
    read: float = 30.0
    #: Bytes per second an upstream blob body must average over each `rate_window`: a trickle
    #: that never falls silent long enough for `read` is a stall too (0 = no minimum).
    min_rate: int = 1024
    rate_window: float = 30.0
    #: A client connection with no request in progress is closed after this long: an idle
    #: keep-alive, or a request head trickling in (slowloris) that never completes.
    client_idle: float = 60.0
    #: Bytes per second a client must read a blob at, averaged over each `rate_window` of
    #: time the mirror waits on it (0 = no minimum): one that reads a byte at a time cannot
    #: hold a sender thread and a file for long. Waiting for a fill to land bytes does not count.
    client_min_rate: int = 1024


@dataclass(frozen=True)
class RetryConfig:
    """Upstream requests that fail in a way another try can mend (refused or reset connection,
    408/500/502/503/504, a blob body cut or stalled mid-way) are tried again, `attempts` times
    in all, waiting `backoff` seconds (doubled each time, with jitter, at most `max_backoff`).
    A blob body resumes with Range from the byte where it stopped."""

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry. `name` is its key in `[upstreams]` and its canonical host."""

    name: str = ""
    #: Base URL the mirror dials (http or https).
    url: str = ""
    #: Hosts that select this upstream in `?ns=` and as a path prefix; `name` is always one.
    aliases: tuple[str, ...] = ()
    #: Docker Hub's rule: a one-word name means `library/<name>`.
    library_prefix: bool = False
    #: Seconds a tag → digest answer is trusted before a HEAD revalidates it.
    tag_ttl: float = 300.0
    #: Seconds tag lists and referrers answers are cached (served stale past it on failure).
    list_ttl: float = 30.0
    #: Seconds a "no such manifest" (404) from upstream is answered again without asking.
    negative_ttl: float = 30.0
    #: `false` drops the upstream (a built-in one included): its hosts are then refused.
    enabled: bool = True
    username: str = ""
    password: str = ""
    #: A docker `config.json` to take this registry's credentials from: its `credHelpers` or
    #: `credsStore` helper, else its `auths` entry (credentials.py). Read again when it changes.
    docker_config: str = ""
    #: A program (split like a shell would, run without one) whose standard output is the
    #: password for `username`, e.g. `aws ecr get-login-password --region eu-west-1`.
    credential_command: str = ""
    #: Seconds credentials from `credential_command` or a credential helper are kept before
    #: the program is asked again (ECR's passwords hold for 12 hours).
    credential_lifetime: float = 300.0
    #: Seconds a credential helper or `credential_command` has to answer; one that does not is
    #: killed and the pull refused with 401.
    credential_timeout: float = 10.0
    #: Token realm hosts, other than the registry's own origin, that may receive our
    #: credentials: `host` (on the scheme's default port) or `host:port`.
    token_realms: tuple[str, ...] = ()
    #: Networks (CIDR, or single addresses) besides public ones that this upstream's
    #: redirects and token realms may lead to; its own addresses are always allowed.
    private_targets: tuple[str, ...] = ()
    #: On a manifest answer, fetch its config and layers in the background (pull-ahead).
    pull_ahead: bool = False
    #: Largest blob fetched from this upstream (0 = no limit): refused before a byte is kept.
    max_blob_bytes: int = 64 * GiB
    #: When the upstream's `ratelimit-remaining` falls below this, held tags are served as
    #: cached without revalidation, keeping what is left for real misses.
    pull_budget_floor: int = 10
    #: When `url` is another mirror: the registry host sent to it as `?ns=` on every request,
    #: so one upstream mirror can serve several registries (site → regional → origin).
    ns: str = ""

    @property
    def credential(self) -> str:
        """Which credential the upstream is pulled with, as a metrics label: `anonymous`, or
        a short hash of the user name (names are not shown on the open /metrics)."""
        if self.username:
            return "account-" + hashlib.sha256(self.username.encode()).hexdigest()[:8]
        return "docker-config" if self.docker_config else "anonymous"

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.name, *[a for a in self.aliases if a != self.name])

    def __repr__(self) -> str:  # secrets never reach logs
        masked = "***" if self.password else ""
        return f"UpstreamConfig(name={self.name!r}, url={self.url!r}, user={self.username!r}, password={masked!r})"


@dataclass(frozen=True)
class HotConfig:
    """Process memory: manifests, tag records and small blobs, a copy of what warm holds."""

    #: Byte budget of everything the hot tier keeps (least recently used out first).
    max_bytes: int = 64 * MiB
    #: Blobs up to this size (configs, tiny layers) are kept hot once read.
    small_blob_bytes: int = 256 * KiB


@dataclass(frozen=True)
class WarmConfig:
    """The local disk store. Budget: the smaller of `max_bytes` and `max_fraction` of the
    filesystem (0 = not set), and never less than `min_free_bytes` left free for the OS."""

    max_bytes: int = 0
    max_fraction: float = 0.0
    min_free_bytes: int = 1 * GiB
    #: Eviction starts above high × budget and stops at low × budget.
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    #: lru | lfu | gdsf (size-aware: keeps many small hot blobs before one large cold one).
    policy: str = "lru"


@dataclass(frozen=True)
class ColdConfig:
    """Optional object storage or slower volume behind warm; empty `url` = no cold tier."""

    #: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix
    url: str = ""
    endpoint: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    #: Allow http:// endpoints (a local S3-compatible server).
    allow_http: bool = False
    #: Byte budget (0 = none) and the longest a blob may stay unused there (seconds, 0 = forever).
    max_bytes: int = 0
    max_idle: float = 0.0
    policy: str = "lru"

    def __repr__(self) -> str:  # secrets never reach logs
        return (
            f"ColdConfig(url={self.url!r}, endpoint={self.endpoint!r}, max_bytes={self.max_bytes})"
        )


@dataclass(frozen=True)
class EvictionConfig:
    #: Seconds between background passes (a fill that crosses the high watermark wakes it early).
    interval: float = 30.0
    #: Most blobs one pass evicts or demotes (work per pass stays bounded; a pass that hits
    #: the bound is followed at once by another).
    max_per_pass: int = 1000
    #: Seconds between batched writes of access times and hit counts to the index.
    access_flush: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    #: Blob fills running at once (0 = no limit); a miss beyond it gets 429 with Retry-After.
    max_fills: int = 64
    #: Fills one client address may have started that still run (0 = no limit); joining a
    #: fill another started is always allowed.
    max_fills_per_client: int = 16
    #: A fill that no client follows any more (each went away) goes on only while at most this
    #: many of its bytes are still to come (0 = always finish); pull-ahead and sync fills,
    #: which nobody follows by design, always finish.
    abandoned_fill_bytes: int = 1 * GiB
    #: Connections open at once from one client address (0 = no limit); a request on a
    #: connection past it gets 429 with Retry-After and the connection is closed. Raise it for
    #: a large fleet behind one NAT address.
    max_connections_per_client: int = 256


@dataclass(frozen=True)
class TLSConfig:
    """HTTPS on the listener (dockerd wants it for a mirror not marked insecure). SIGHUP
    reloads both files; a bad pair on reload is logged and the old one kept."""

    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class BundleConfig:
    """Signed bundles for `mirror export` and `mirror import`: the exporting site signs the
    bundle's checksum list, the importing site checks it against the public keys it trusts,
    so a bundle altered on its way into an air-gapped site is refused."""

    #: Ed25519 private key file (PEM or OpenSSH): `mirror export` signs with it (`--sign`).
    signing_key: str = ""
    #: Ed25519 public key files (PEM or OpenSSH): a bundle's signature must verify with one
    #: of them (`--trusted-key`).
    trusted_keys: tuple[str, ...] = ()
    #: Refuse, importing nothing, a bundle that is not signed by one of `trusted_keys`
    #: (`--require-signature`).
    require_signature: bool = False


@dataclass(frozen=True)
class Grant:
    """Who may pull what: `who` is an htpasswd user name, or `token:<value>` for a static
    bearer token; `repositories` are `<upstream>/<repository glob>` patterns (`grant_regex`)."""

    who: str = ""
    repositories: tuple[str, ...] = ("**",)

    def __repr__(self) -> str:  # tokens never reach logs
        shown = "token:***" if self.who.startswith("token:") else self.who
        return f"Grant(who={shown!r}, repositories={self.repositories!r})"


@dataclass(frozen=True)
class AuthConfig:
    """Client access control, off unless `htpasswd` or a token grant is set. A client must
    authenticate, and then pulls only repositories its grants name (an htpasswd user with no
    grant may pull everything)."""

    #: An htpasswd file with bcrypt entries (`htpasswd -B`).
    htpasswd: str = ""
    grants: tuple[Grant, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.htpasswd) or any(g.who.startswith("token:") for g in self.grants)


@dataclass(frozen=True)
class SyncEntry:
    """Images the running mirror keeps fresh and pinned: `image` is `<upstream>/<repository>`,
    `tags` are tag globs matched against the repository's tag list."""

    image: str = ""
    tags: tuple[str, ...] = ("latest",)
    #: Seconds between syncs.
    every: float = 3600.0


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP API (catalog, usage, evict, pins, fsck): off unless enabled, and then
    only for requests bearing the token."""

    enabled: bool = False
    token: str = ""
    prefix: str = "/_mirror"

    def __repr__(self) -> str:  # the token never reaches logs
        return f"AdminConfig(enabled={self.enabled}, prefix={self.prefix!r})"


#: What happens that the mirror tells of (`[events]`): a webhook's `events` globs are matched
#: against these, and each is the CloudEvents type `io.mirror.<kind>`.
EVENT_KINDS = (
    "pull",
    "blob.cached",
    "blob.evicted",
    "digest.mismatch",
    "tag.moved",
    "upstream.down",
    "upstream.up",
    "ratelimit.low",
    "import.done",
    "export.done",
    "admin",
)
#: The kinds the audit log keeps: who pulled what, and every administrative action.
AUDIT_KINDS = ("pull", "admin", "import.done", "export.done")


@dataclass(frozen=True)
class Webhook:
    """One receiver of events: batches of CloudEvents POSTed to `url`, each event kept on disk
    until the receiver answered 2xx."""

    url: str = ""
    #: Its name in metrics and the key of its queue on disk (default: the URL's host[:port]).
    name: str = ""
    #: Globs over EVENT_KINDS: which events it gets.
    events: tuple[str, ...] = ("*",)
    #: HMAC-SHA256 key: each delivery is signed in a `Mirror-Signature` header (empty: unsigned).
    secret: str = ""
    #: Seconds one delivery may take, connecting included.
    timeout: float = 10.0
    #: More headers sent with every delivery (a receiver's own authentication, say).
    headers: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:  # secrets, header values and query strings never reach logs
        shown = self.url.split("?", 1)[0]
        return (
            f"Webhook(name={self.name!r}, url={shown!r}, events={self.events!r}, "
            f"secret={'***' if self.secret else ''!r}, headers={[k for k, _ in self.headers]!r})"
        )


@dataclass(frozen=True)
class EventsConfig:
    """Webhooks that are told what happens, and the audit trail. Off while there is neither."""

    webhooks: tuple[Webhook, ...] = ()
    #: The CloudEvents `source` of every event (empty: `urn:mirror:<host name>`).
    source: str = ""
    #: Events kept on disk per webhook while it cannot take them; past it the oldest go.
    max_queue: int = 10000
    #: A file that gets every pull and every administrative action as one JSON line.
    audit_log: str = ""
    #: The audit log is rotated when it would grow past this (0: never; for logrotate + SIGHUP).
    audit_max_bytes: int = 100 * MiB
    #: Rotated audit files kept (`<audit_log>.1` the newest).
    audit_keep: int = 5

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks or self.audit_log)


@dataclass(frozen=True)
class RetentionRule:
    """Lifecycle for cached images of matching repositories, in the spirit of ECR's: the
    first rule whose `pattern` (a glob on `<upstream>/<repository>`) matches applies."""

    pattern: str = ""
    #: Tags not pulled for this many seconds leave the cache (0 = no limit).
    max_idle: float = 0.0
    #: Keep only this many most recently pulled tags per repository (0 = all).
    keep_tags: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas on several hosts that share their tag records, pull budgets and upstream
    questions through one Redis (mirror/coordination/cluster.py). Off while `redis_url` is
    empty: the mirror is then exactly a standalone one."""

    #: One Redis (redis://[[user]:password@]host[:port][/db], rediss:// over TLS, or
    #: unix:///path/to/socket), a Sentinel service's master
    #: (redis+sentinel://[[user]:password@]host:port[,host:port…]/<service_name>[/<db>]) or a
    #: Redis Cluster (redis+cluster://[[user]:password@]host:port[,host:port…]); with the query
    #: options redis-py's URL parsing takes (mirror/redis_url.py).
    redis_url: str = ""
    #: This replica's URL as the other replicas reach it: http(s)://host:port.
    advertise: str = ""
    #: The secret every replica shares (at least 32 characters), or a file holding it.
    secret: str = ""
    secret_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    def __repr__(self) -> str:  # the secret and Redis's password never reach logs
        return (
            f"ClusterConfig(redis_url={redis_shown(self.redis_url)!r}, "
            f"advertise={self.advertise!r}, secret={'***' if self.secret else ''!r}, "
            f"secret_file={self.secret_file!r})"
        )


#: Shortest cluster secret taken.
CLUSTER_SECRET_MIN = 32

#: Most worker processes `workers` may ask for.
MAX_WORKERS = 256


@dataclass(frozen=True)
class Config:
    """Everything the server needs; passed to constructors, never read from globals."""

    listen: str = "0.0.0.0:5000"
    #: Server processes on the one port: "auto" (the CPUs this process may use, cgroup quota
    #: and affinity respected) or a number; 1 is a single process with no supervisor.
    workers: str = "auto"
    data_dir: str = "./data"
    log_level: str = "info"
    #: logfmt | json: one structured line per log record and per request.
    log_format: str = "logfmt"
    access_log: bool = True
    #: Never contact an upstream: serve what is cached (tags as last seen), refuse misses.
    offline: bool = False
    #: The upstream for requests with no `ns` and no configured path prefix.
    default_upstream: str = DOCKER_HUB
    metrics_path: str = "/metrics"
    #: A small HTML page: what is cached, hit ratio, bytes saved, upstreams, tiers.
    status_path: str = "/_status"
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: RetryConfig = field(default_factory=RetryConfig)
    hot: HotConfig = field(default_factory=HotConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)
    cold: ColdConfig = field(default_factory=ColdConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    #: Images never evicted: `<upstream>/<repository>:<tag>` glob patterns, e.g.
    #: "docker.io/library/python:3.*"; they hold every blob their manifests reference.
    pins: tuple[str, ...] = ()
    retention: tuple[RetentionRule, ...] = ()
    sync: tuple[SyncEntry, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    def upstream(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.name == name)

    @property
    def all_pins(self) -> tuple[str, ...]:
        """`pins` and the sync list's images as pins (`<upstream>/<repository>:<tag glob>`)."""
        return (*self.pins, *(f"{e.image}:{tag}" for e in self.sync for tag in e.tags))


#: The embedded default: a Docker Hub mirror (the default upstream) that also serves the big
#: public registries by `?ns=` and path prefix, anonymously. A config file's
#: `[upstreams."<host>"]` merges over an entry key by key; `enabled = false` drops one. Token
#: realms on the registry's own origin need no listing: only Docker Hub's and GitLab's live on
#: another host.
DEFAULT_UPSTREAMS: dict[str, dict[str, Any]] = {
    DOCKER_HUB: {
        "url": "https://registry-1.docker.io",
        "aliases": ["registry-1.docker.io", "index.docker.io"],
        "library_prefix": True,
        "token_realms": ["auth.docker.io"],
    },
    "ghcr.io": {"url": "https://ghcr.io"},
    "quay.io": {"url": "https://quay.io"},
    "registry.k8s.io": {"url": "https://registry.k8s.io"},
    "gcr.io": {"url": "https://gcr.io"},
    "mcr.microsoft.com": {"url": "https://mcr.microsoft.com"},
    "public.ecr.aws": {"url": "https://public.ecr.aws"},
    "registry.gitlab.com": {"url": "https://registry.gitlab.com", "token_realms": ["gitlab.com"]},
}

_LOG_LEVELS = ("debug", "info", "warning", "error")
#: A registry host as containerd sends it in `?ns=`: a DNS name or address, optional port.
_NS = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults < TOML file < environment < flags (`None` flags are unset)."""
    raw: dict[str, Any] = {"upstreams": copy.deepcopy(DEFAULT_UPSTREAMS)}
    if path is not None:
        _merge(raw, _read_toml(Path(path)))
    _merge(raw, _from_env(env or {}, raw))
    _merge(raw, _from_flags(flags or {}, raw))
    return _validate(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _env_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def _default_name(raw: Mapping[str, Any]) -> str:
    return str(raw.get("default_upstream", Config.default_upstream))


def _from_env(env: Mapping[str, str], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map the MIRROR_* variables the mirror owns onto config keys.

    Only a variable that names a configuration key is read. One that looks like a mistake
    for a key (a section that exists with a key that does not, a near-miss of a key's name,
    a single underscore where a section needs two) is refused, naming the key. Anything
    else is somebody else's (Kubernetes injects `MIRROR_PORT`, `MIRROR_SERVICE_HOST`, … into
    every pod for a Service named `mirror`) and is ignored, logged at debug."""
    out: dict[str, Any] = {}
    by_env_name = {_env_name(n): n for n in raw.get("upstreams", {})}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in ENV_OWN:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        if parts == ["UPSTREAM"]:
            default = env.get("MIRROR_DEFAULT_UPSTREAM") or _default_name(raw)
            _merge(out, {"upstreams": {default: {"url": value}}})
        elif len(parts) == 3 and parts[0] == "UPSTREAMS":
            name = by_env_name.get(parts[1], parts[1].lower())
            _merge(out, {"upstreams": {name: {parts[2].lower(): value}}})
        elif (key := _env_key(var, parts)) is not None:
            _merge(out, _nest(key, value))
    return out


def ignored_variables(env: Mapping[str, str]) -> list[str]:
    """The MIRROR_ variables of `env` that are not the mirror's (for a debug line at start,
    once logging is up; `load_config` has refused the near-misses already)."""
    return sorted(
        v
        for v in env
        if v.startswith(ENV_PREFIX) and v not in ENV_OWN and not _from_env({v: ""}, {})
    )


def _nest(key: tuple[str, ...], value: str) -> dict[str, Any]:
    out: dict[str, Any] = {key[-1]: value}
    for part in reversed(key[:-1]):
        out = {part: out}
    return out


def _env_key(var: str, parts: list[str]) -> tuple[str, ...] | None:
    """The key a MIRROR_ variable names; None when it is none of the mirror's business;
    ConfigError when it is a near-miss of one."""
    words = [p.lower() for p in parts]
    sections = {f.name: f.type for f in dataclasses.fields(Config) if _is_section(f.name)}
    scalars = [
        f.name
        for f in dataclasses.fields(Config)
        if not _is_section(f.name) and f.name not in ("upstreams",)
    ]
    if len(words) == 1:
        word = words[0]
        if word in scalars:
            return (word,)
        section = next((s for s in sections if word.startswith(f"{s}_")), None)
        if section is not None:
            raise ConfigError(
                f"environment variable {var}: a section key takes two underscores, "
                f"MIRROR_{section.upper()}__{word[len(section) + 1 :].upper()}"
            )
        near = difflib.get_close_matches(word, [*scalars, *sections], n=1, cutoff=NEAR_MISS)
        if near:
            raise ConfigError(
                f"{word}: unknown configuration key (environment variable {var}; "
                f"did you mean {near[0]}?)"
            )
        return None
    if words[0] in sections or difflib.get_close_matches(words[0], sections, n=1, cutoff=NEAR_MISS):
        if len(words) != 2 or words[0] not in sections:
            raise ConfigError(f"environment variable {var}: not a configuration key")
        return (words[0], words[1])  # an unknown key of a known section is refused by _build
    return None


def _is_section(name: str) -> bool:
    kind = typing.get_type_hints(Config)[name]
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _from_flags(flags: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in flags.items() if v is not None and k != "upstream"}
    if flags.get("upstream"):
        out["upstreams"] = {_default_name(raw): {"url": flags["upstream"]}}
    return out


def _validate(raw: dict[str, Any]) -> Config:
    if isinstance(raw.get("workers"), int) and not isinstance(raw["workers"], bool):
        raw["workers"] = str(raw["workers"])  # `workers = 4` in TOML, as "4" from a flag
    upstreams = raw.pop("upstreams", {})
    if not isinstance(upstreams, Mapping):
        raise ConfigError("upstreams: must be a table of upstream registries")
    built = tuple(u for name, v in upstreams.items() if (u := _upstream(str(name), v)).enabled)
    config: Config = _build(Config, {**raw, "upstreams": built}, "")
    _check(config)
    return dataclasses.replace(config, cluster=_cluster(config.cluster))


def _upstream(name: str, raw: Any) -> UpstreamConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"upstreams.{name}: must be a table")
    up: UpstreamConfig = _build(UpstreamConfig, {**raw, "name": name.lower()}, f"upstreams.{name}.")
    up = dataclasses.replace(up, aliases=tuple(a.lower() for a in up.aliases))
    where = f"upstreams.{name}"
    parts = urlsplit(up.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: must be an http:// or https:// URL, got {up.url!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{where}.url: put credentials in username/password, not in the URL")
    if up.tag_ttl < 0 or up.list_ttl < 0 or up.negative_ttl < 0:
        raise ConfigError(f"{where}.tag_ttl/list_ttl/negative_ttl: must not be negative")
    if up.docker_config and not Path(up.docker_config).is_file():
        raise ConfigError(f"{where}.docker_config: no such file {up.docker_config!r}")
    _check_credential_keys(up, where)
    if up.ns and not _NS.fullmatch(up.ns):
        raise ConfigError(
            f"{where}.ns: must be a registry host[:port] such as 'ghcr.io', got {up.ns!r}"
        )
    for net in up.private_targets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}.private_targets: {net!r} is not a network (CIDR) or an address"
            ) from None
    for realm in up.token_realms:
        if not _NS.fullmatch(realm):
            raise ConfigError(
                f"{where}.token_realms: a host, or host:port for a port other than the "
                f"scheme's default, such as 'auth.docker.io', got {realm!r}"
            )
    return dataclasses.replace(
        up, ns=up.ns.lower(), token_realms=tuple(r.lower() for r in up.token_realms)
    )


def _check_credential_keys(up: UpstreamConfig, where: str) -> None:
    """`credential_command` is one source of credentials among the others, not a second."""
    if not (up.credential_lifetime > 0 and up.credential_timeout > 0):
        raise ConfigError(
            f"{where}.credential_lifetime/credential_timeout: must be positive seconds"
        )
    if not up.credential_command:
        return
    try:
        argv = shlex.split(up.credential_command)
    except ValueError as e:
        raise ConfigError(f"{where}.credential_command: cannot be split into words: {e}") from None
    if not argv:
        raise ConfigError(f"{where}.credential_command: names no program")
    if not up.username:
        raise ConfigError(
            f"{where}.credential_command: needs username, the user its output is the password "
            "of (AWS for `aws ecr get-login-password`)"
        )
    if up.password or up.docker_config:
        raise ConfigError(
            f"{where}.credential_command: give it, password or docker_config, not two of them"
        )


def _check(config: Config) -> None:
    try:
        _, port = config.host_port
    except ValueError:
        raise ConfigError(f"listen: expected HOST:PORT, got {config.listen!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen: port out of range in {config.listen!r}")
    if config.workers != "auto" and not (
        config.workers.isdigit() and 1 <= int(config.workers) <= MAX_WORKERS
    ):
        raise ConfigError(
            f"workers: auto or a number from 1 to {MAX_WORKERS}, got {config.workers!r}"
        )
    for key in ("connect", "read", "rate_window", "client_idle"):
        value = getattr(config.timeouts, key)
        if not value > 0:
            raise ConfigError(
                f"timeouts.{key}: must be a positive number of seconds, got {value!r}"
            )
    for key in ("min_rate", "client_min_rate"):
        if getattr(config.timeouts, key) < 0:
            raise ConfigError(f"timeouts.{key}: must not be negative")
    retries = config.retries
    if retries.attempts < 1 or retries.backoff < 0 or retries.max_backoff < retries.backoff:
        raise ConfigError("retries: need attempts >= 1 and 0 <= backoff <= max_backoff")
    _check_tiers(config)
    _check_bundle(config.bundle)
    _check_events(config.events)
    if config.admin.enabled and len(config.admin.token) < 16:
        raise ConfigError("admin.token: the admin API needs a token of at least 16 characters")
    if not config.admin.prefix.startswith("/_"):
        raise ConfigError(f"admin.prefix: must start with /_, got {config.admin.prefix!r}")
    if config.log_format not in ("logfmt", "json"):
        raise ConfigError(f"log_format: logfmt or json, got {config.log_format!r}")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: one of {', '.join(_LOG_LEVELS)}, got {config.log_level!r}")
    if config.default_upstream not in {u.name for u in config.upstreams}:
        raise ConfigError(
            f"default_upstream: {config.default_upstream!r} is not among the enabled [upstreams]"
        )
    if not config.status_path.startswith("/") or config.status_path.startswith("/v2"):
        raise ConfigError(
            f"status_path: must start with / and not with /v2, got {config.status_path!r}"
        )
    if not config.metrics_path.startswith("/") or config.metrics_path.startswith("/v2"):
        raise ConfigError(
            f"metrics_path: must start with / and not with /v2, got {config.metrics_path!r}"
        )
    seen: dict[str, str] = {}
    for up in config.upstreams:
        for host_name in up.hosts:
            if host_name.lower() in seen:
                raise ConfigError(
                    f"upstreams.{up.name}.aliases: {host_name!r} is also used by "
                    f"{seen[host_name.lower()]!r}"
                )
            seen[host_name.lower()] = up.name


def _check_tiers(config: Config) -> None:
    warm, cold = config.warm, config.cold
    if not 0 < warm.low_watermark < warm.high_watermark <= 1:
        raise ConfigError(
            "warm.low_watermark/high_watermark: need 0 < low < high <= 1, got "
            f"{warm.low_watermark!r} and {warm.high_watermark!r}"
        )
    if not 0 <= warm.max_fraction <= 1:
        raise ConfigError(f"warm.max_fraction: a share between 0 and 1, got {warm.max_fraction!r}")
    for where, policy in (("warm.policy", warm.policy), ("cold.policy", cold.policy)):
        if policy not in POLICIES:
            raise ConfigError(f"{where}: one of {', '.join(POLICIES)}, got {policy!r}")
    if cold.url and urlsplit(cold.url).scheme not in ("file", "s3", "gs", "az", "memory"):
        raise ConfigError(
            f"cold.url: file://, s3://, gs://, az:// or memory:// URL, got {cold.url!r}"
        )
    for key in ("max_bytes", "small_blob_bytes"):
        if getattr(config.hot, key) < 0:
            raise ConfigError(f"hot.{key}: must not be negative")
    for where, value in (
        ("warm.max_bytes", warm.max_bytes),
        ("warm.min_free_bytes", warm.min_free_bytes),
        ("cold.max_bytes", cold.max_bytes),
        ("cold.max_idle", cold.max_idle),
        ("eviction.max_per_pass", config.eviction.max_per_pass - 1),
    ):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
    if not (config.eviction.interval > 0 and config.eviction.access_flush > 0):
        raise ConfigError("eviction.interval/access_flush: must be positive seconds")
    _check_rules(config)


def _check_rules(config: Config) -> None:
    """Retention, limits, TLS, access control, the sync list and pins."""
    for i, rule in enumerate(config.retention):
        if "/" not in rule.pattern:
            raise ConfigError(
                f"retention[{i}].pattern: expected <upstream>/<repository glob>, got {rule.pattern!r}"
            )
        if rule.max_idle < 0 or rule.keep_tags < 0 or not (rule.max_idle or rule.keep_tags):
            raise ConfigError(f"retention[{i}]: set max_idle and/or keep_tags to a positive number")
    for key in (
        "max_connections_per_client",
        "max_fills",
        "max_fills_per_client",
        "abandoned_fill_bytes",
    ):
        if getattr(config.limits, key) < 0:
            raise ConfigError(f"limits.{key}: must not be negative")
    if any(u.max_blob_bytes < 0 for u in config.upstreams):
        raise ConfigError("upstreams.*.max_blob_bytes: must not be negative")
    if bool(config.tls.cert) != bool(config.tls.key):
        raise ConfigError("tls.cert/tls.key: give both, or neither")
    if config.tls.cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.tls.cert, config.tls.key
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls.cert/tls.key: cannot load them: {e}") from None
    _check_auth(config.auth)
    for i, entry in enumerate(config.sync):
        upstream, _, repo = entry.image.partition("/")
        if upstream not in {u.name for u in config.upstreams} or not repo or ":" in repo:
            raise ConfigError(
                f"sync[{i}].image: <configured upstream>/<repository> without a tag, got {entry.image!r}"
            )
        if not entry.tags or entry.every <= 0:
            raise ConfigError(f"sync[{i}]: needs tags and a positive `every`")
    for pattern in config.pins:
        if not is_pin(pattern):
            raise ConfigError(f"pins: expected {PIN_FORM}, got {pattern!r}")


def _check_auth(auth: AuthConfig) -> None:
    if auth.htpasswd and not Path(auth.htpasswd).is_file():
        raise ConfigError(f"auth.htpasswd: no such file {auth.htpasswd!r}")
    for i, grant in enumerate(auth.grants):
        if (
            not grant.who
            or grant.who == "token:"
            or (grant.who.startswith("token:") and len(grant.who) < 22)
        ):
            raise ConfigError(
                f"auth.grants[{i}].who: a user name, or token:<at least 16 characters>"
            )
        for pattern in grant.repositories:
            if grant_regex(pattern) is None:
                raise ConfigError(
                    f"auth.grants[{i}].repositories: expected {GRANT_FORM}, got {pattern!r}"
                )


#: What a grant pattern looks like, in words (for errors).
GRANT_FORM = "<upstream glob>/<repository glob>, or ** for everything"
#: One path segment of a grant pattern, without its `*` and `?`.
_SEGMENT_CHAR = "[^/]"


def grant_regex(pattern: str) -> re.Pattern[str] | None:
    """The names `<upstream>/<repository>` a grant pattern admits, or None when it is not one.

    Globs match path segments, never across a `/` unless asked to: `*` is any run of
    characters within one segment, `?` one character within it, and `**`, which must be a
    whole segment, is one or more whole segments. So `docker.io/org/*` admits
    `docker.io/org/app` but neither `docker.io/org/team/app` nor `docker.io/org-evil/app`;
    `docker.io/org/**` admits `docker.io/org/app` and `docker.io/org/team/app` but not
    `docker.io/org` itself (name it too if it is meant); `**` alone admits everything. There
    are no character classes: anything else stands for itself. A pattern needs an upstream
    part and a repository part, so a bare `*` (which would admit nothing) is refused.
    """
    segments = pattern.split("/")
    if pattern != "**" and (len(segments) < 2 or "" in segments):
        return None
    parts = []
    for segment in segments:
        if segment == "**":
            parts.append(f"{_SEGMENT_CHAR}+(?:/{_SEGMENT_CHAR}+)*")
        elif "**" in segment:
            return None
        else:
            parts.append(
                "".join(
                    f"{_SEGMENT_CHAR}*" if c == "*" else _SEGMENT_CHAR if c == "?" else re.escape(c)
                    for c in segment
                )
            )
    return re.compile("/".join(parts))


def _check_bundle(bundle: BundleConfig) -> None:
    """Load the keys at start, so a missing or wrong key file stops the start rather than an
    export or an import."""
    try:
        if bundle.signing_key:
            signing.load_private_key(bundle.signing_key)
    except signing.BadKey as e:
        raise ConfigError(f"bundle.signing_key: {e.message}") from None
    try:
        for path in bundle.trusted_keys:
            signing.load_public_key(path)
    except signing.BadKey as e:
        raise ConfigError(f"bundle.trusted_keys: {e.message}") from None
    if bundle.require_signature and not bundle.trusted_keys:
        raise ConfigError(
            "bundle.require_signature: needs bundle.trusted_keys, the keys a signature is "
            "checked against"
        )


def _cluster(cluster: ClusterConfig) -> ClusterConfig:
    """Check `[cluster]`, and read `secret_file` into `secret` (once, at start: a replica
    that cannot read its secret does not start)."""
    if not cluster.redis_url:
        if cluster.advertise or cluster.secret or cluster.secret_file:
            raise ConfigError("cluster.redis_url: needed by the other [cluster] keys")
        return cluster
    try:
        redis_target(cluster.redis_url)
    except ValueError as e:
        raise ConfigError(f"cluster.redis_url: {e}") from None
    advertised = urlsplit(cluster.advertise)
    try:
        port = advertised.port
    except ValueError:
        port = None
    if (
        advertised.scheme not in ("http", "https")
        or not advertised.hostname
        or port is None
        or advertised.username is not None
        or advertised.path not in ("", "/")
        or advertised.query
    ):
        raise ConfigError(
            "cluster.advertise: this replica's URL as the others reach it, "
            f"http(s)://host:port, got {cluster.advertise!r}"
        )
    secret = cluster.secret
    if cluster.secret_file:
        if secret:
            raise ConfigError("cluster.secret_file: give it or cluster.secret, not both")
        try:
            secret = Path(cluster.secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cluster.secret_file: cannot read it: {e}") from None
    where = "cluster.secret_file" if cluster.secret_file else "cluster.secret"
    if len(secret) < CLUSTER_SECRET_MIN:
        raise ConfigError(
            f"{where}: the secret every replica shares, at least {CLUSTER_SECRET_MIN} characters"
        )
    return dataclasses.replace(cluster, advertise=cluster.advertise.rstrip("/"), secret=secret)


#: A webhook's name: a metrics label and the key of its queue.
_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: Headers a delivery sets itself.
_OWN_HEADERS = frozenset({"content-type", "content-length", "mirror-signature", "host"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def webhook_name(hook: Webhook) -> str:
    """The name a webhook goes by: its own, or its URL's host[:port]."""
    if hook.name:
        return hook.name
    parts = urlsplit(hook.url)
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""


def _check_events(events: EventsConfig) -> None:
    if events.max_queue < 1:
        raise ConfigError(f"events.max_queue: at least 1, got {events.max_queue!r}")
    if events.audit_max_bytes < 0:
        raise ConfigError("events.audit_max_bytes: must not be negative")
    if events.audit_max_bytes and events.audit_keep < 1:
        raise ConfigError(
            "events.audit_keep: at least 1 while audit_max_bytes rotates the log "
            "(audit_max_bytes = 0 leaves rotation to logrotate)"
        )
    if events.audit_log and not Path(events.audit_log).parent.is_dir():
        raise ConfigError(f"events.audit_log: no such directory for {events.audit_log!r}")
    if any(c.isspace() for c in events.source):
        raise ConfigError(f"events.source: a URI reference, got {events.source!r}")
    seen: dict[str, int] = {}
    for i, hook in enumerate(events.webhooks):
        where = f"events.webhooks[{i}]"
        parts = urlsplit(hook.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: must be an http:// or https:// URL, got {hook.url!r}")
        if parts.username or parts.password:
            raise ConfigError(f"{where}.url: put credentials in headers, not in the URL")
        name = webhook_name(hook)
        if not _WEBHOOK_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}.name: letters, digits and . _ : - (at most 64), got {name!r}"
            )
        if name in seen:
            raise ConfigError(
                f"{where}.name: {name!r} is also webhooks[{seen[name]}]'s; give each its own name"
            )
        seen[name] = i
        if not hook.events:
            raise ConfigError(f'{where}.events: name at least one kind (or "*")')
        for pattern in hook.events:
            if not fnmatch.filter(EVENT_KINDS, pattern):
                raise ConfigError(
                    f"{where}.events: {pattern!r} matches none of {', '.join(EVENT_KINDS)}"
                )
        if hook.secret and len(hook.secret) < 16:
            raise ConfigError(f"{where}.secret: at least 16 characters")
        if not hook.timeout > 0:
            raise ConfigError(f"{where}.timeout: must be a positive number of seconds")
        for header, value in hook.headers:
            if not _HEADER_NAME.fullmatch(header) or header.lower() in _OWN_HEADERS:
                raise ConfigError(f"{where}.headers: {header!r} is not a header it may set")
            if any(c in value for c in "\r\n\0"):
                raise ConfigError(f"{where}.headers: the value of {header!r} has a line break")


#: What a pin looks like, in words (for errors).
PIN_FORM = "<upstream>/<repository>:<tag pattern>"


def is_pin(pattern: str) -> bool:
    """Whether `pattern` has the form of a pin, `<upstream>/<repository>:<tag pattern>` (in
    the config's `pins`, or added at run time by `mirror cache pin` and the admin API)."""
    return "/" in pattern and ":" in pattern.rpartition("/")[2]


def _build(cls: type[Any], raw: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, refusing unknown keys and coercing values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown configuration key")
    values = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in raw.items()}
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    """Coerce TOML or environment strings to the field's type; the error names the key."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a table")
        return _build(kind, value, f"{key}.")
    origin = typing.get_origin(kind)
    item = typing.get_args(kind)[0] if origin is tuple else None
    if typing.get_origin(item) is tuple:  # a table of strings, kept as sorted pairs
        if isinstance(value, tuple):
            return value
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: must be a table of strings")
        return tuple(sorted(value.items()))
    if isinstance(item, type) and dataclasses.is_dataclass(item) and not isinstance(value, tuple):
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
        return tuple(_build(item, v, f"{key}[{i}].") for i, v in enumerate(value))
    if origin is tuple:
        if isinstance(value, tuple):
            return value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(value)
    if origin is types.UnionType:
        kind = str
    return _scalar(kind, value, key)


def _shown(key: str, value: Any) -> str:
    """A value for an error message; secrets are never echoed."""
    hidden = key.endswith(("password", "secret_access_key", "token", "secret")) or ".headers" in key
    return "(hidden)" if hidden else repr(value)


def _scalar(kind: Any, value: Any, key: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: must be true or false, got {_shown(key, value)}")
    if kind is int and isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        return int(float(m[1]) * _UNITS[(m[2] or "")[:1].upper()])
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {_shown(key, value)}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number, got {_shown(key, value)}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {_shown(key, value)}")
    return value
