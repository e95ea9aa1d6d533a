"""Configuration: defaults, TOML, `MIRROR_*` environment and flags in that order of
precedence; unknown keys and bad values refused with a ConfigError naming the key; secrets
kept out of reprs and messages; the CLI's exit status on a bad config; and
`config.example.toml` kept complete (every dataclass key documented, defaults identical).

`load_config` is pure (the environment is passed in), so most of these need no I/O beyond
writing a TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MirrorProcess, ed25519_keys

from mirror.config import Config, Timeouts, UpstreamConfig, ignored_variables, load_config
from mirror.errors import ConfigError
from mirror.upstream.credentials import credentials_for

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLE = PROJECT / "config.example.toml"


def toml_file(tmp_path: Path, text: str, name: str = "mirror.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> str:
    """Load a config that must be refused; return the ConfigError's message."""
    path = toml_file(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


# -- defaults and precedence -----------------------------------------------------------------


#: The registries served with no configuration, and what each is dialled at.
DEFAULT_URLS = {
    "docker.io": "https://registry-1.docker.io",
    "ghcr.io": "https://ghcr.io",
    "quay.io": "https://quay.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "gcr.io": "https://gcr.io",
    "mcr.microsoft.com": "https://mcr.microsoft.com",
    "public.ecr.aws": "https://public.ecr.aws",
    "registry.gitlab.com": "https://registry.gitlab.com",
}


def test_defaults_are_a_docker_hub_mirror() -> None:
    """With no file, env or flags: docker.io is the default upstream, dialled at
    registry-1.docker.io, with the library/ rule, the Docker Hub aliases and auth.docker.io as
    token realm; the server listens on 0.0.0.0:5000 with its data in ./data."""
    config = load_config(env={})
    assert config.upstreams[0].name == "docker.io"
    hub = config.upstream("docker.io")
    assert hub.url == "https://registry-1.docker.io"
    assert hub.library_prefix is True
    assert set(hub.aliases) == {"registry-1.docker.io", "index.docker.io"}
    assert hub.token_realms == ("auth.docker.io",)
    assert hub.username == "" and hub.password == ""
    assert config.default_upstream == "docker.io"
    assert config.listen == "0.0.0.0:5000"
    assert config.host_port == ("0.0.0.0", 5000)
    assert config.data_dir == "./data"
    assert config.timeouts == Timeouts()
    assert config.log_level == "info"
    assert config.access_log is True


def test_the_big_public_registries_are_built_in_anonymous_upstreams() -> None:
    """With no configuration, ghcr.io, quay.io, registry.k8s.io, gcr.io, mcr.microsoft.com,
    public.ecr.aws and registry.gitlab.com are upstreams too, each dialled at its own host,
    without credentials, library/ rule or aliases; only GitLab's token realm (gitlab.com) lies
    on another host and is listed."""
    config = load_config(env={})
    assert {u.name: u.url for u in config.upstreams} == DEFAULT_URLS
    for up in config.upstreams[1:]:
        assert (up.username, up.password, up.docker_config, up.credential_command) == ("",) * 4
        assert up.library_prefix is False and up.aliases == ()
        assert up.hosts == (up.name,)
        expected = ("gitlab.com",) if up.name == "registry.gitlab.com" else ()
        assert up.token_realms == expected, up.name


def test_an_upstream_is_dropped_with_enabled_false(tmp_path: Path) -> None:
    """`enabled = false` (TOML, or MIRROR_UPSTREAMS__<HOST>__ENABLED) removes a built-in
    upstream, and another may then take its host as an alias; a disabled default upstream
    stops the start, naming default_upstream."""
    path = toml_file(
        tmp_path,
        '[upstreams."quay.io"]\nenabled = false\n'
        '[upstreams."quay.example"]\nurl = "https://quay.example"\naliases = ["quay.io"]\n',
    )
    config = load_config(path, env={"MIRROR_UPSTREAMS__REGISTRY_K8S_IO__ENABLED": "false"})
    names = [u.name for u in config.upstreams]
    assert "registry.k8s.io" not in names and "quay.io" not in names
    assert config.upstream("quay.example").hosts == ("quay.example", "quay.io")
    assert set(names) == (set(DEFAULT_URLS) - {"quay.io", "registry.k8s.io"}) | {"quay.example"}
    message = refused(tmp_path, '[upstreams."docker.io"]\nenabled = false\n')
    assert message.startswith("default_upstream") and "enabled" in message


def test_environment_variables_name_the_built_in_upstreams() -> None:
    """MIRROR_UPSTREAMS__GHCR_IO__URL and friends set keys of the built-in upstream of that
    host (dots and dashes as underscores), not an upstream named after the variable."""
    config = load_config(
        env={
            "MIRROR_UPSTREAMS__GHCR_IO__URL": "http://127.0.0.1:5001",
            "MIRROR_UPSTREAMS__PUBLIC_ECR_AWS__TAG_TTL": "7",
            "MIRROR_UPSTREAMS__REGISTRY_GITLAB_COM__USERNAME": "robot",
        }
    )
    assert {u.name for u in config.upstreams} == set(DEFAULT_URLS)
    assert config.upstream("ghcr.io").url == "http://127.0.0.1:5001"
    assert config.upstream("public.ecr.aws").tag_ttl == 7.0
    assert config.upstream("registry.gitlab.com").username == "robot"


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ('credential_command = "aws ecr get-login-password"', "needs username"),
        ('username = "AWS"\ncredential_command = "\\"unclosed"', "cannot be split"),
        ('username = "AWS"\ncredential_command = "   "', "names no program"),
        ('username = "AWS"\npassword = "x"\ncredential_command = "aws"', "not two of them"),
        ("credential_lifetime = 0", "credential_lifetime/credential_timeout"),
        ("credential_timeout = -1", "credential_lifetime/credential_timeout"),
        ('credential_timeout = "soon"', "credential_timeout"),
    ],
)
def test_credential_keys_are_checked(tmp_path: Path, keys: str, named: str) -> None:
    """credential_command needs a username and is the only source of credentials given; it
    must split into words; lifetimes and timeouts are positive seconds."""
    message = refused(tmp_path, f'[upstreams."public.ecr.aws"]\n{keys}\n')
    assert message.startswith("upstreams.public.ecr.aws."), message
    assert named in message, message


def test_credential_command_with_username_loads(tmp_path: Path) -> None:
    path = toml_file(
        tmp_path,
        '[upstreams."123456789012.dkr.ecr.eu-west-1.amazonaws.com"]\n'
        'url = "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"\nusername = "AWS"\n'
        'credential_command = "aws ecr get-login-password --region eu-west-1"\n'
        "credential_lifetime = 43200\ncredential_timeout = 30\n",
    )
    up = load_config(path, env={}).upstream("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
    assert up.credential_command == "aws ecr get-login-password --region eu-west-1"
    assert (up.credential_lifetime, up.credential_timeout) == (43200.0, 30.0)


def test_toml_overrides_and_merges_over_the_builtin_upstream(tmp_path: Path) -> None:
    """A TOML file overrides top-level keys, sections and single keys of the built-in
    docker.io entry (the others keep their defaults), and adds upstreams."""
    path = toml_file(
        tmp_path,
        """
listen = "127.0.0.1:6000"
data_dir = "/var/cache/mirror"
log_level = "debug"
access_log = false
[timeouts]
read = 60
[upstreams."docker.io"]
tag_ttl = 5
username = "robot"
[upstreams."ghcr.io"]
url = "https://ghcr.io"
aliases = ["ghcr.example"]
list_ttl = 1.5
""",
    )
    config = load_config(path, env={})
    assert config.listen == "127.0.0.1:6000"
    assert config.data_dir == "/var/cache/mirror"
    assert config.log_level == "debug"
    assert config.access_log is False
    assert config.timeouts == Timeouts(connect=10.0, read=60.0)
    hub = config.upstream("docker.io")
    assert hub.tag_ttl == 5.0 and isinstance(hub.tag_ttl, float)
    assert hub.username == "robot"
    assert hub.url == "https://registry-1.docker.io"
    assert hub.library_prefix is True
    ghcr = config.upstream("ghcr.io")
    assert ghcr.url == "https://ghcr.io"
    assert ghcr.aliases == ("ghcr.example",)
    assert ghcr.hosts == ("ghcr.io", "ghcr.example")
    assert ghcr.list_ttl == 1.5
    assert ghcr.library_prefix is False


def test_environment_overrides_toml(tmp_path: Path) -> None:
    """MIRROR_LISTEN, MIRROR_TIMEOUTS__READ, MIRROR_UPSTREAMS__<NAME>__<KEY> (name with dots
    and dashes as underscores, for built-in and TOML upstreams), MIRROR_UPSTREAM and a list
    from a comma-separated value all win over the file, coerced to the field's type."""
    path = toml_file(
        tmp_path,
        """
listen = "127.0.0.1:6000"
[timeouts]
read = 60
[upstreams."docker.io"]
tag_ttl = 5
[upstreams."registry.k8s.io"]
url = "https://registry.k8s.io"
""",
    )
    config = load_config(
        path,
        env={
            "MIRROR_LISTEN": "127.0.0.1:7000",
            "MIRROR_TIMEOUTS__READ": "12.5",
            "MIRROR_UPSTREAMS__DOCKER_IO__TAG_TTL": "42",
            "MIRROR_UPSTREAMS__DOCKER_IO__ALIASES": "a.example, b.example",
            "MIRROR_UPSTREAMS__REGISTRY_K8S_IO__PASSWORD": "s3cret",
            "MIRROR_UPSTREAM": "http://127.0.0.1:5001",
            "MIRROR_ACCESS_LOG": "off",
            "HOME": "/root",  # not ours: ignored
        },
    )
    assert config.listen == "127.0.0.1:7000"
    assert config.timeouts.read == 12.5
    hub = config.upstream("docker.io")
    assert hub.tag_ttl == 42.0
    assert hub.aliases == ("a.example", "b.example")
    assert hub.url == "http://127.0.0.1:5001"
    assert config.upstream("registry.k8s.io").password == "s3cret"
    assert config.access_log is False


def test_flags_win_over_environment(tmp_path: Path) -> None:
    """Command-line flags beat MIRROR_* variables (and the file); a flag left None does not."""
    path = toml_file(tmp_path, 'listen = "127.0.0.1:6000"\ndata_dir = "/from/toml"\n')
    env = {
        "MIRROR_LISTEN": "127.0.0.1:7000",
        "MIRROR_UPSTREAM": "http://127.0.0.1:5001",
        "MIRROR_DATA_DIR": "/from/env",
    }
    config = load_config(
        path,
        env=env,
        flags={"listen": "127.0.0.1:8000", "upstream": "http://127.0.0.1:5002", "data_dir": None},
    )
    assert config.listen == "127.0.0.1:8000"
    assert config.upstream("docker.io").url == "http://127.0.0.1:5002"
    assert config.data_dir == "/from/env"


def test_mirror_upstream_applies_to_the_configured_default(tmp_path: Path) -> None:
    """MIRROR_UPSTREAM and --upstream set the url of the *default* upstream, whichever it is:
    chosen in the file, or chosen by MIRROR_DEFAULT_UPSTREAM in the same environment."""
    path = toml_file(tmp_path, '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n')
    by_file = toml_file(
        tmp_path,
        'default_upstream = "ghcr.io"\n[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n',
        "by_file.toml",
    )
    config = load_config(by_file, env={"MIRROR_UPSTREAM": "http://127.0.0.1:5001"})
    assert config.upstream("ghcr.io").url == "http://127.0.0.1:5001"
    assert config.upstream("docker.io").url == "https://registry-1.docker.io"
    config = load_config(by_file, env={}, flags={"upstream": "http://127.0.0.1:5002"})
    assert config.upstream("ghcr.io").url == "http://127.0.0.1:5002"
    config = load_config(
        path, env={"MIRROR_DEFAULT_UPSTREAM": "ghcr.io", "MIRROR_UPSTREAM": "http://127.0.0.1:5003"}
    )
    assert config.default_upstream == "ghcr.io"
    assert config.upstream("ghcr.io").url == "http://127.0.0.1:5003"
    assert config.upstream("docker.io").url == "https://registry-1.docker.io"


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[timeouts]\nconnnect = 3\n", "timeouts.connnect"),
        ('[upstreams."docker.io"]\npasword = "x"\n', "upstreams.docker.io.pasword"),
        (
            '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\ntag_tll = 3\n',
            "upstreams.ghcr.io.tag_tll",
        ),
        ("[logging]\nlevel = 'debug'\n", "logging"),
    ],
)
def test_unknown_keys_are_refused_by_name(tmp_path: Path, text: str, key: str) -> None:
    """A misspelt or unknown key anywhere in the file is an error naming it, never ignored."""
    assert key in refused(tmp_path, text)


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("MIRROR_TIMEOUTS__BOGUS", "timeouts.bogus"),
        ("MIRROR_UPSTREAMS__DOCKER_IO__BOGUS", "upstreams.docker.io.bogus"),
        ("MIRROR_TIMEOUTS__A__B", "MIRROR_TIMEOUTS__A__B"),
    ],
)
def test_unknown_environment_variables_are_refused_by_name(
    tmp_path: Path, var: str, key: str
) -> None:
    """A MIRROR_ variable that names a section, or an upstream, with a key it does not have is
    an error naming the key it maps to (or the variable)."""
    assert key.lower() in refused(tmp_path, env={var: "1"}).lower()


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ('[upstreams."docker.io"]\ntag_ttl = "abc"\n', {}, "upstreams.docker.io.tag_ttl"),
        ('[upstreams."docker.io"]\ntag_ttl = true\n', {}, "upstreams.docker.io.tag_ttl"),
        ('[upstreams."docker.io"]\ntag_ttl = -1\n', {}, "tag_ttl"),
        ('[upstreams."docker.io"]\nlist_ttl = -1\n', {}, "list_ttl"),
        ('[upstreams."docker.io"]\nurl = "ftp://x"\n', {}, "upstreams.docker.io.url"),
        ('[upstreams."docker.io"]\nurl = "registry.example"\n', {}, "upstreams.docker.io.url"),
        ('[upstreams."docker.io"]\naliases = [1, 2]\n', {}, "upstreams.docker.io.aliases"),
        (
            '[upstreams."docker.io"]\ntoken_realms = ["https://auth.example"]\n',
            {},
            "upstreams.docker.io.token_realms",
        ),
        (
            '[upstreams."docker.io"]\ntoken_realms = ["auth.example/token"]\n',
            {},
            "upstreams.docker.io.token_realms",
        ),
        (
            '[upstreams."docker.io"]\nlibrary_prefix = "perhaps"\n',
            {},
            "upstreams.docker.io.library_prefix",
        ),
        (
            '[upstreams."docker.io"]\ndocker_config = "/nonexistent/config.json"\n',
            {},
            "upstreams.docker.io.docker_config",
        ),
        ('listen = "nope"\n', {}, "listen"),
        ('listen = "127.0.0.1:70000"\n', {}, "listen"),
        ("listen = 5000\n", {}, "listen"),
        ('log_level = "loud"\n', {}, "log_level"),
        ('access_log = "maybe"\n', {}, "access_log"),
        ('default_upstream = "registry.example.com"\n', {}, "default_upstream"),
        ('metrics_path = "metrics"\n', {}, "metrics_path"),
        ('metrics_path = "/v2/metrics"\n', {}, "metrics_path"),
        ("timeouts = 5\n", {}, "timeouts"),
        ('[timeouts]\nread = "slow"\n', {}, "timeouts.read"),
        ("", {"MIRROR_TIMEOUTS__READ": "abc"}, "timeouts.read"),
        ("", {"MIRROR_ACCESS_LOG": "maybe"}, "access_log"),
        ("", {"MIRROR_UPSTREAMS__DOCKER_IO__TAG_TTL": "abc"}, "upstreams.docker.io.tag_ttl"),
        ("", {"MIRROR_UPSTREAM": "ftp://x"}, "upstreams.docker.io.url"),
    ],
)
def test_bad_values_are_refused_by_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    """A value of the wrong type or out of range is refused with a message naming its key."""
    assert key in refused(tmp_path, text, env)


@pytest.mark.parametrize("key", ["connect", "read"])
def test_negative_timeouts_are_refused(tmp_path: Path, key: str) -> None:
    """A negative timeout is a bad value like a negative TTL, refused naming the key."""
    assert f"timeouts.{key}" in refused(tmp_path, f"[timeouts]\n{key} = -1\n")


@pytest.mark.parametrize(
    "text",
    [
        '[upstreams]\n"ghcr.io" = "https://ghcr.io"\n',
        'upstreams = { "ghcr.io" = 5 }\n',
        'upstreams = { "docker.io" = "https://registry-1.docker.io" }\n',
    ],
)
def test_upstream_that_is_not_a_table_is_a_config_error(tmp_path: Path, text: str) -> None:
    """`[upstreams]` entries that are not tables (an easy slip: `"ghcr.io" = "https://..."`)
    are refused with a ConfigError naming the upstream, not an unhandled exception."""
    message = refused(tmp_path, text)
    assert "upstreams." in message


def test_upstreams_must_be_a_table(tmp_path: Path) -> None:
    """`upstreams = "x"` is refused naming `upstreams`."""
    assert "upstreams" in refused(tmp_path, 'upstreams = "x"\n')


@pytest.mark.parametrize(
    "text",
    [
        '[upstreams."mirror.example"]\nurl = "https://m.example"\naliases = ["index.docker.io"]\n',
        '[upstreams."mirror.example"]\nurl = "https://m.example"\naliases = ["docker.io"]\n',
        (
            '[upstreams."a.example"]\nurl = "https://a.example"\naliases = ["shared.example"]\n'
            '[upstreams."b.example"]\nurl = "https://b.example"\naliases = ["shared.example"]\n'
        ),
        '[upstreams."mirror.example"]\nurl = "https://m.example"\naliases = ["DOCKER.IO"]\n',
        '[upstreams."Docker.IO"]\nurl = "https://m.example"\n',
    ],
)
def test_a_host_selecting_two_upstreams_is_refused(tmp_path: Path, text: str) -> None:
    """A host (name or alias) may select only one upstream; hosts are case-insensitive (the
    router lowercases them), so `DOCKER.IO` on another upstream would silently take
    docker.io's traffic and must be refused like an exact duplicate."""
    assert "upstreams." in refused(tmp_path, text)


def test_credentials_in_the_url_are_refused_without_echoing_them(tmp_path: Path) -> None:
    """`https://user:secret@host` is refused (credentials belong in username/password) and
    the message does not repeat the secret."""
    message = refused(
        tmp_path, '[upstreams."docker.io"]\nurl = "https://robot:hunter2@r.example"\n'
    )
    assert "upstreams.docker.io.url" in message
    assert "hunter2" not in message


def test_bad_password_value_is_not_echoed(tmp_path: Path) -> None:
    """A password of the wrong type (an unquoted number in TOML) is refused naming the key,
    without printing the password itself into the error (which goes to stderr and logs)."""
    message = refused(tmp_path, '[upstreams."docker.io"]\nusername = "u"\npassword = 86753091\n')
    assert "upstreams.docker.io.password" in message
    assert "86753091" not in message


# -- secrets ---------------------------------------------------------------------------------


def test_reprs_never_contain_the_password(tmp_path: Path) -> None:
    """repr/str of an UpstreamConfig, of the whole Config and of the derived Credentials
    mask the password (they may end up in logs and tracebacks)."""
    path = toml_file(
        tmp_path, '[upstreams."docker.io"]\nusername = "robot"\npassword = "hunter2-xyz"\n'
    )
    config = load_config(path, env={})
    hub = config.upstream("docker.io")
    assert hub.password == "hunter2-xyz"
    for text in (
        repr(hub),
        str(hub),
        repr(config),
        str(config),
        repr(config.upstreams),
        repr(credentials_for(hub)),
    ):
        assert "hunter2-xyz" not in text
    assert "robot" in repr(hub)
    direct = UpstreamConfig(name="x", url="https://x.example", username="u", password="pw-123456")
    assert "pw-123456" not in repr(direct)


# -- CLI -------------------------------------------------------------------------------------


def _run_cli(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mirror",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        cwd=PROJECT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    """`mirror serve --config bad.toml` (an unknown key), the same file via MIRROR_CONFIG, and
    an unknown MIRROR_ variable each exit with status 2 before serving, and stderr names the
    offending key, without a traceback."""
    bad = toml_file(tmp_path, '[upstreams."docker.io"]\ntag_tll = 3\n', "bad.toml")
    runs = [
        (_run_cli(["--config", str(bad)], {}, tmp_path), "upstreams.docker.io.tag_tll"),
        (_run_cli([], {"MIRROR_CONFIG": str(bad)}, tmp_path), "upstreams.docker.io.tag_tll"),
        (_run_cli([], {"MIRROR_TIMEOUTS__REED": "3"}, tmp_path), "timeouts.reed"),
    ]
    for proc, key in runs:
        assert proc.returncode == 2, proc.stderr
        assert key in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the data directory


# -- the documented example ------------------------------------------------------------------


def test_example_config_loads_and_equals_the_defaults() -> None:
    """`config.example.toml` is valid, and every value it shows is the real default: loading
    it gives exactly the configuration of no file at all."""
    assert load_config(EXAMPLE, env={}) == load_config(env={})


def test_example_config_documents_every_key() -> None:
    """Every field of Config, Timeouts and UpstreamConfig (except the implicit `name`) is set
    in `config.example.toml`, so the documentation cannot silently fall behind the code."""
    doc = tomllib.loads(EXAMPLE.read_text())
    top = {f.name for f in dataclasses.fields(Config)}
    assert top - set(doc) == set()
    assert {f.name for f in dataclasses.fields(Timeouts)} - set(doc["timeouts"]) == set()
    upstream_keys = {f.name for f in dataclasses.fields(UpstreamConfig)} - {"name"}
    assert upstream_keys - set(doc["upstreams"]["docker.io"]) == set()


def test_bundle_keys_are_loaded_at_start(tmp_path: Path) -> None:
    """`[bundle]` keys: Ed25519 keys in PEM (openssl) and OpenSSH (ssh-keygen) files load; a
    missing file, a public key given to sign with, an encrypted key, a key of another type,
    and a signature required with no key to check it stop the start, naming the key."""
    pem_key, pem_pub = ed25519_keys(tmp_path, "pem")
    ssh_key, ssh_pub = ed25519_keys(tmp_path, "ssh", "openssh")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "ed25519",
            "-aes256",
            "-pass",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
    )
    ec = tmp_path / "ec.key"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(ec),
        ],
        check=True,
    )
    for key in (pem_key, ssh_key):
        good = toml_file(
            tmp_path,
            f'[bundle]\nsigning_key = "{key}"\ntrusted_keys = ["{pem_pub}", "{ssh_pub}"]\n'
            "require_signature = true\n",
        )
        bundle = load_config(good, env={}).bundle
        assert bundle.signing_key == str(key) and bundle.require_signature is True
        assert bundle.trusted_keys == (str(pem_pub), str(ssh_pub))
    flags = {"bundle": {"trusted_keys": [str(ssh_pub)], "require_signature": True}}
    assert load_config(env={}, flags=flags).bundle.trusted_keys == (str(ssh_pub),)
    for body, key, why in (
        (f'signing_key = "{tmp_path / "absent"}"', "bundle.signing_key", "No such file"),
        (f'signing_key = "{pem_pub}"', "bundle.signing_key", "not a PEM or OpenSSH private key"),
        (f'signing_key = "{encrypted}"', "bundle.signing_key", "an encrypted private key"),
        (f'signing_key = "{ec}"', "bundle.signing_key", "not an Ed25519 key"),
        (f'trusted_keys = ["{pem_key}"]', "bundle.trusted_keys", "not a PEM or OpenSSH public"),
        ("require_signature = true", "bundle.require_signature", "needs bundle.trusted_keys"),
        ('require_signature = "maybe"', "bundle.require_signature", "true or false"),
    ):
        message = refused(tmp_path, f"[bundle]\n{body}\n")
        assert message.startswith(key) and why in message, message


def test_retention_rules_are_an_array_of_tables_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[retention]]\npattern = "docker.io/library/*"\nkeep_tags = 3\n'
        '[[retention]]\npattern = "ghcr.io/*"\nmax_idle = "86400"\n'
    )
    rules = load_config(good, env={}).retention
    assert [(r.pattern, r.keep_tags, r.max_idle) for r in rules] == [
        ("docker.io/library/*", 3, 0.0),
        ("ghcr.io/*", 0, 86400.0),
    ]
    for body, key in (
        ('retention = "x"', "retention"),
        ('[[retention]]\npattern = "nohost"\nkeep_tags = 1', "retention[0].pattern"),
        ('[[retention]]\npattern = "a/b"', "retention[0]"),
        ('[[retention]]\npattern = "a/b"\nkeep = 1', "retention[0].keep"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(bad, env={})


# -- the environment: only the mirror's own variables ----------------------------------------

#: What a pod gets for the Service named `mirror` (port `http`, 5000) that deploy/k8s creates,
#: and for its headless sibling, unless `enableServiceLinks: false`.
KUBERNETES_SERVICE_LINKS = {
    "MIRROR_SERVICE_HOST": "10.96.0.12",
    "MIRROR_SERVICE_PORT": "5000",
    "MIRROR_SERVICE_PORT_HTTP": "5000",
    "MIRROR_PORT": "tcp://10.96.0.12:5000",
    "MIRROR_PORT_5000_TCP": "tcp://10.96.0.12:5000",
    "MIRROR_PORT_5000_TCP_PROTO": "tcp",
    "MIRROR_PORT_5000_TCP_PORT": "5000",
    "MIRROR_PORT_5000_TCP_ADDR": "10.96.0.12",
    "MIRROR_HEADLESS_SERVICE_HOST": "10.96.0.13",
    "MIRROR_HEADLESS_PORT": "tcp://10.96.0.13:5000",
}


def test_variables_that_are_not_keys_are_ignored() -> None:
    """Kubernetes service links and a wrapper's own MIRROR_URL / MIRROR_NAME leave the
    configuration as it is, and are the ones reported as ignored."""
    env = {
        **KUBERNETES_SERVICE_LINKS,
        "MIRROR_URL": "http://x",
        "MIRROR_NAME": "edge",
        "MIRROR_LISTEN": "127.0.0.1:7000",
    }
    config = load_config(env=env)
    assert config == load_config(env={}, flags={"listen": "127.0.0.1:7000"})
    assert ignored_variables({**env, "MIRROR_CONFIG": "x.toml", "PATH": "/bin"}) == sorted(
        set(env) - {"MIRROR_LISTEN"}
    )


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("MIRROR_WARM__MAX_BYTE", "warm.max_byte"),
        ("MIRROR_TIMEOUTS__REED", "timeouts.reed"),
        ("MIRROR_WARM_MAX_BYTES", "MIRROR_WARM__MAX_BYTES"),
        ("MIRROR_DATA_DIRR", "data_dir"),
        ("MIRROR_LISTN", "listen"),
        ("MIRROR_TIMEOUT__READ", "MIRROR_TIMEOUT__READ"),
        ("MIRROR_TIMEOUTS__READ__X", "MIRROR_TIMEOUTS__READ__X"),
    ],
)
def test_near_misses_of_keys_are_refused_by_name(tmp_path: Path, var: str, key: str) -> None:
    """A variable that looks meant for a key (a typo of its name, one underscore where a
    section takes two) still stops the start, naming the key."""
    assert key in refused(tmp_path, env={var: "1"})


def test_the_server_starts_with_a_pods_service_link_variables(
    mirror_process: Callable[..., MirrorProcess],
) -> None:
    """`mirror serve` as a real process, with exactly the variables a pod gets for the
    Service `mirror`, starts and serves; with log_level=debug it says what it ignored."""
    proc = mirror_process(
        "http://127.0.0.1:9", env={**KUBERNETES_SERVICE_LINKS, "MIRROR_LOG_LEVEL": "debug"}
    )
    proc.start()  # raises if the process exits (a configuration error) instead of answering
    proc.stop()
    out = proc.log.read_text()
    assert "MIRROR_PORT_5000_TCP_ADDR is not a configuration key: ignored" in out
    assert "configuration error" not in out
