"""Ed25519 keys, key ids and signatures with domain separation.

A key id is the hex sha256 of the 32-byte raw public key, so the same key always has the same id
whoever lists it, and a trust policy cannot count one key twice under two names.

Every signature covers ``PAE(payload_type, body)`` — the pre-authentication encoding of DSSE
(https://github.com/secure-systems-lab/dsse) — over the *exact* bytes of the document, never a
re-serialization. The payload type separates domains: a signature made for a bundle manifest can
never be replayed as a signature over a trust file, and vice versa.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import KeyFileError, Malformed

__all__ = [
    "MANIFEST_PAYLOAD_TYPE",
    "TRUST_PAYLOAD_TYPE",
    "PublicKey",
    "Signature",
    "SigningKey",
    "generate_key",
    "load_public_key",
    "load_signing_key",
    "pae",
    "write_key_pair",
]

MANIFEST_PAYLOAD_TYPE = "application/vnd.edgekit.manifest+json"
TRUST_PAYLOAD_TYPE = "application/vnd.edgekit.trust+json"

#: Key files are tiny; anything bigger is not a key and is not read into memory.
_MAX_KEY_FILE = 64 * 1024


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(body), body)


@dataclass(frozen=True)
class Signature:
    """One signature as stored in ``signatures.json`` and trust files."""

    keyid: str
    sig: str  # hex

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": self.sig}

    @classmethod
    def from_dict(cls, value: object) -> Signature:
        if not isinstance(value, dict) or set(value) - {"keyid", "sig"}:
            raise Malformed("a signature must be an object with exactly 'keyid' and 'sig'")
        keyid, sig = value.get("keyid"), value.get("sig")
        if not isinstance(keyid, str) or not _is_hex(keyid, 64):
            raise Malformed("signature keyid must be 64 lowercase hex characters")
        if not isinstance(sig, str) or not _is_hex(sig, 128):
            raise Malformed(f"signature by {keyid[:12]} must be 128 lowercase hex characters")
        return cls(keyid=keyid, sig=sig)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class PublicKey:
    """A verifying key and its id."""

    key: Ed25519PublicKey

    @property
    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @classmethod
    def from_raw_hex(cls, text: str) -> PublicKey:
        if not _is_hex(text, 64):
            raise Malformed("an ed25519 public key must be 64 lowercase hex characters")
        return cls(Ed25519PublicKey.from_public_bytes(bytes.fromhex(text)))

    def verify(self, payload_type: str, body: bytes, signature: Signature) -> bool:
        """True when ``signature`` is this key's valid signature over ``body``."""
        if signature.keyid != self.keyid:
            return False
        try:
            self.key.verify(bytes.fromhex(signature.sig), pae(payload_type, body))
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class SigningKey:
    """A private key ready to sign (already decrypted)."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, payload_type: str, body: bytes) -> Signature:
        return Signature(keyid=self.keyid, sig=self.key.sign(pae(payload_type, body)).hex())

    def to_pem(self, passphrase: bytes | None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def generate_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def _read_small(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {os.fspath(path)}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{os.fspath(path)} is too large to be a {what}")
    return data


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load a ``.pub`` file (PEM SubjectPublicKeyInfo, or 64 hex characters of a raw key)."""
    data = _read_small(path, "public key")
    text = data.strip().decode("ascii", errors="replace")
    if _is_hex(text.lower(), 64):
        return PublicKey.from_raw_hex(text.lower())
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY" in data:
            raise KeyFileError(
                f"{os.fspath(path)} is a private key; give the .pub file instead"
            ) from None
        raise KeyFileError(f"{os.fspath(path)} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{os.fspath(path)} is not an Ed25519 key")
    return PublicKey(key)


PassphraseProvider = Callable[[Path], "bytes | None"]


def load_signing_key(
    path: str | os.PathLike[str], *, passphrase: PassphraseProvider | bytes | None = None
) -> SigningKey:
    """Load a ``.key`` file; ``passphrase`` is asked for only when the key is encrypted."""
    data = _read_small(path, "private key")
    if b"PRIVATE KEY" not in data:
        if b"PUBLIC KEY" in data:
            raise KeyFileError(f"{os.fspath(path)} is a public key; signing needs the .key file")
        raise KeyFileError(f"{os.fspath(path)} is not a PEM private key")
    secret: bytes | None = None
    if b"ENCRYPTED PRIVATE KEY" in data:
        secret = passphrase(Path(path)) if callable(passphrase) else passphrase
        if not secret:
            raise KeyFileError(f"{os.fspath(path)} is encrypted and no passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except TypeError:
        raise KeyFileError(
            f"{os.fspath(path)}: unexpected passphrase for an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if secret:
            raise KeyFileError(f"{os.fspath(path)}: wrong passphrase or corrupt key") from None
        raise KeyFileError(f"{os.fspath(path)} is not a readable private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{os.fspath(path)} is not an Ed25519 key")
    return SigningKey(key)


def write_key_pair(
    directory: str | os.PathLike[str],
    name: str,
    key: SigningKey,
    *,
    passphrase: bytes | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0600, never world-readable, even briefly) and ``NAME.pub``."""
    from edgekit.fsutil import atomic_write_bytes  # local: keeps the verify path's imports small

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    if not overwrite:
        for existing in (private_path, public_path):
            if existing.exists():
                raise KeyFileError(f"{existing} exists; refusing to overwrite a key (use --force)")
    atomic_write_bytes(private_path, key.to_pem(passphrase), mode=0o600)
    atomic_write_bytes(public_path, key.public.to_pem(), mode=0o644)
    return private_path, public_path
