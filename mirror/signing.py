"""Ed25519 keys and detached signatures: what lets an air-gapped site tell a bundle its own
exporting site made from one that was altered on the way.

The cryptography is the `cryptography` package's (pyca, OpenSSL underneath); this module only
reads key files and names what went wrong. Keys are files in PEM (`openssl genpkey -algorithm
ed25519`, `openssl pkey -pubout`) or OpenSSH form (`ssh-keygen -t ed25519`, the `.pub` line).
Private keys must not be encrypted: the commands that sign run unattended. A signature is the
raw 64 bytes Ed25519 produces, which `openssl pkeyutl -verify -rawin` checks too.

Loading is blocking (it reads a file): the config check at start and the commands call it
before any event loop runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: What signs (the exporting site's key); callers name it by this, not by the library's type.
SigningKey = Ed25519PrivateKey

_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_PUBLIC = b"ssh-"


class BadKey(Exception):
    """A key file that cannot be used: unreadable, not a key, encrypted, or not Ed25519."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.message = f"{path}: {why}"


@dataclass(frozen=True)
class TrustedKey:
    """A public key and the file it came from (what an import names as the signer)."""

    path: str
    key: Ed25519PublicKey


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BadKey(path, e.strerror or "cannot be read") from None


def load_private_key(path: str) -> SigningKey:
    """The Ed25519 private key in a PEM or OpenSSH file (blocking)."""
    data = _read(path)
    try:
        if data.lstrip().startswith(_OPENSSH_PRIVATE):
            key: object = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except TypeError:  # what cryptography raises for an encrypted key given no password
        raise BadKey(path, "an encrypted private key (a signing key must not need one)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise BadKey(path, "not a PEM or OpenSSH private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(path, "not an Ed25519 key")
    return key


def load_public_key(path: str) -> TrustedKey:
    """The Ed25519 public key in a PEM or OpenSSH (`ssh-ed25519 …`) file (blocking)."""
    data = _read(path)
    try:
        if data.lstrip().startswith(_OPENSSH_PUBLIC):
            key: object = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise BadKey(path, "not a PEM or OpenSSH public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadKey(path, "not an Ed25519 key")
    return TrustedKey(path, key)


def sign(key: SigningKey, data: bytes) -> bytes:
    """A detached signature over `data`."""
    return key.sign(data)


def signer(signature: bytes, data: bytes, keys: Sequence[TrustedKey]) -> TrustedKey | None:
    """The first of `keys` whose holder signed `data` with `signature`; None when none did."""
    for trusted in keys:
        try:
            trusted.key.verify(signature, data)
        except InvalidSignature:
            continue
        return trusted
    return None
