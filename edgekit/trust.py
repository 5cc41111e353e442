"""The device's trust policy: which keys may sign, how many must, and how that changes.

A trust file is a DSSE-style envelope (see docs/bundle-format.md)::

    {"payloadType": "application/vnd.edgekit.trust+json",
     "payload": "<base64 of the policy JSON>",
     "signatures": [{"keyid": "...", "sig": "..."}]}

The policy JSON holds ``type``, ``format``, ``version``, ``threshold`` and ``keys``
(keyid → ``{"keytype": "ed25519", "public": hex, "name": ...}``). Signatures cover the exact payload
bytes, so nothing is re-serialized to check them.

Version 1 is the trust anchor: it is provisioned onto the device out of band and needs no
signature. Every later version is accepted only as TUF accepts a new root: its version is exactly
the current one plus one, and it is signed by a threshold of the *current* keys and a threshold
of its *own* keys. Revoking a key is rotating to a policy that no longer lists it.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit._jsonutil import dumps, loads_strict
from edgekit.errors import (
    BadSignature,
    Malformed,
    Rollback,
    ThresholdNotMet,
    TooLarge,
    UntrustedKey,
)
from edgekit.keys import TRUST_PAYLOAD_TYPE, PublicKey, Signature, SigningKey

__all__ = [
    "MAX_TRUST_SIZE",
    "TrustEnvelope",
    "TrustPolicy",
    "apply_rotations",
    "check_signatures",
    "load_trust",
    "verify_rotation",
]

#: A trust file lists a handful of keys; 256 KiB leaves room for hundreds.
MAX_TRUST_SIZE = 256 * 1024
_TRUST_TYPE = "edgekit-trust"


def check_signatures(
    body: bytes,
    signatures: Sequence[Signature],
    *,
    keys: Mapping[str, PublicKey],
    threshold: int,
    payload_type: str,
    what: str,
) -> tuple[str, ...]:
    """Count distinct trusted keys with a valid signature over ``body``; raise if too few.

    Returns the key ids that signed. The error says *why* the threshold was missed, most
    specific first: a trusted key's signature that does not verify (tampering) beats
    signatures from unknown keys, which beats plain "not enough".
    """
    valid: set[str] = set()
    bad_trusted = False
    unknown = False
    for signature in signatures:
        key = keys.get(signature.keyid)
        if key is None:
            unknown = True
        elif key.verify(payload_type, body, signature):
            valid.add(signature.keyid)
        else:
            bad_trusted = True
    if len(valid) >= threshold:
        return tuple(sorted(valid))
    if bad_trusted:
        raise BadSignature(
            f"{what}: a signature from a trusted key does not match the signed bytes"
        )
    if not signatures:
        raise ThresholdNotMet(f"{what} has no signatures (needs {threshold})")
    if unknown and not valid:
        raise UntrustedKey(f"{what} is signed only by keys this trust policy does not list")
    raise ThresholdNotMet(
        f"{what} has {len(valid)} valid signature(s) from distinct trusted keys, needs {threshold}"
    )


@dataclass(frozen=True)
class TrustPolicy:
    """A parsed trust policy (the payload of a trust file)."""

    version: int
    threshold: int
    keys: Mapping[str, PublicKey]
    names: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"type", "format", "version", "threshold", "keys"})

    @classmethod
    def create(
        cls, keys: Iterable[tuple[str, PublicKey]], *, threshold: int, version: int = 1
    ) -> TrustPolicy:
        """Build a policy from ``(name, key)`` pairs; a key listed twice is one key."""
        by_id: dict[str, PublicKey] = {}
        names: dict[str, str] = {}
        for name, key in keys:
            by_id[key.keyid] = key
            names.setdefault(key.keyid, name)
        policy = cls(version=version, threshold=threshold, keys=by_id, names=names)
        policy._validate()
        return policy

    def _validate(self) -> None:
        if self.version < 1:
            raise Malformed("trust version must be at least 1")
        if not self.keys:
            raise Malformed("a trust policy needs at least one key")
        if not 1 <= self.threshold <= len(self.keys):
            raise Malformed(
                f"threshold {self.threshold} must be between 1 and the number of distinct keys "
                f"({len(self.keys)})"
            )

    @classmethod
    def from_payload(cls, data: bytes) -> TrustPolicy:
        doc = loads_strict(data, what="trust policy", max_size=MAX_TRUST_SIZE)
        if doc.get("type") != _TRUST_TYPE:
            raise Malformed(f"trust policy type must be {_TRUST_TYPE!r}")
        if doc.get("format") != 1:
            raise Malformed(f"trust policy format {doc.get('format')!r} is not supported")
        version, threshold, raw_keys = doc.get("version"), doc.get("threshold"), doc.get("keys")
        if not isinstance(version, int) or isinstance(version, bool):
            raise Malformed("trust policy version must be an integer")
        if not isinstance(threshold, int) or isinstance(threshold, bool):
            raise Malformed("trust policy threshold must be an integer")
        if not isinstance(raw_keys, dict):
            raise Malformed("trust policy keys must be an object")
        keys: dict[str, PublicKey] = {}
        names: dict[str, str] = {}
        for keyid, entry in raw_keys.items():
            if not isinstance(entry, dict) or entry.get("keytype") != "ed25519":
                raise Malformed(f"trust key {keyid[:12]} must be an ed25519 key object")
            key = PublicKey.from_raw_hex(str(entry.get("public", "")))
            if key.keyid != keyid:
                # Otherwise one key could be listed under several ids and counted twice.
                raise Malformed(f"trust key id {keyid[:12]} is not the sha256 of its public key")
            keys[keyid] = key
            if isinstance(entry.get("name"), str):
                names[keyid] = entry["name"]
        policy = cls(
            version=version,
            threshold=threshold,
            keys=keys,
            names=names,
            extra={k: v for k, v in doc.items() if k not in cls._KNOWN},
        )
        policy._validate()
        return policy

    def to_payload(self) -> bytes:
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            type=_TRUST_TYPE,
            format=1,
            version=self.version,
            threshold=self.threshold,
            keys={
                keyid: {
                    "keytype": "ed25519",
                    "public": key.raw.hex(),
                    **({"name": self.names[keyid]} if keyid in self.names else {}),
                }
                for keyid, key in sorted(self.keys.items())
            },
        )
        return dumps(doc)

    def check(
        self, body: bytes, signatures: Sequence[Signature], *, payload_type: str, what: str
    ) -> tuple[str, ...]:
        """Raise unless a threshold of this policy's keys signed ``body``."""
        return check_signatures(
            body,
            signatures,
            keys=self.keys,
            threshold=self.threshold,
            payload_type=payload_type,
            what=what,
        )


@dataclass(frozen=True)
class TrustEnvelope:
    """A trust file: the exact policy bytes, the parsed policy, and signatures over the bytes."""

    payload: bytes
    policy: TrustPolicy
    signatures: tuple[Signature, ...] = ()

    @classmethod
    def unsigned(cls, policy: TrustPolicy) -> TrustEnvelope:
        return cls(payload=policy.to_payload(), policy=policy)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustEnvelope:
        if len(data) > MAX_TRUST_SIZE * 2:
            raise TooLarge(f"trust file is {len(data)} bytes, the limit is {MAX_TRUST_SIZE * 2}")
        doc = loads_strict(data, what="trust file", max_size=MAX_TRUST_SIZE * 2)
        if doc.get("payloadType") != TRUST_PAYLOAD_TYPE:
            raise Malformed(f"trust file payloadType must be {TRUST_PAYLOAD_TYPE!r}")
        raw_payload, raw_sigs = doc.get("payload"), doc.get("signatures")
        if not isinstance(raw_payload, str):
            raise Malformed("trust file payload must be a base64 string")
        if not isinstance(raw_sigs, list):
            raise Malformed("trust file signatures must be a list")
        try:
            payload = base64.b64decode(raw_payload, validate=True)
        except (binascii.Error, ValueError):
            raise Malformed("trust file payload is not valid base64") from None
        return cls(
            payload=payload,
            policy=TrustPolicy.from_payload(payload),
            signatures=tuple(Signature.from_dict(s) for s in raw_sigs),
        )

    def to_bytes(self) -> bytes:
        return dumps(
            {
                "payloadType": TRUST_PAYLOAD_TYPE,
                "payload": base64.b64encode(self.payload).decode("ascii"),
                "signatures": [s.to_dict() for s in self.signatures],
            }
        )

    def signed_by(self, *keys: SigningKey) -> TrustEnvelope:
        """A copy with signatures from ``keys`` added (a key already present is not re-added)."""
        have = {s.keyid for s in self.signatures}
        extra = [k.sign(TRUST_PAYLOAD_TYPE, self.payload) for k in keys if k.keyid not in have]
        unique = {s.keyid: s for s in (*self.signatures, *extra)}
        return TrustEnvelope(self.payload, self.policy, tuple(unique.values()))


def load_trust(path: str | os.PathLike[str]) -> TrustEnvelope:
    """Read the device's current trust file (the anchor: its own signatures are not required)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TRUST_SIZE * 2 + 1)
    except OSError as exc:
        raise Malformed(f"cannot read trust file {os.fspath(path)}: {exc.strerror}") from None
    return TrustEnvelope.from_bytes(data)


def verify_rotation(current: TrustPolicy, new: TrustEnvelope) -> TrustPolicy:
    """Accept ``new`` as the successor of ``current`` or raise; nothing is written here."""
    expected = current.version + 1
    if new.policy.version <= current.version:
        raise Rollback(
            f"trust version {new.policy.version} is not newer than the current {current.version}"
        )
    if new.policy.version != expected:
        raise Rollback(
            f"trust version {new.policy.version} skips ahead; the next accepted is {expected}"
        )
    current.check(
        new.payload,
        new.signatures,
        payload_type=TRUST_PAYLOAD_TYPE,
        what=f"trust v{new.policy.version} (by the current v{current.version} keys)",
    )
    new.policy.check(
        new.payload,
        new.signatures,
        payload_type=TRUST_PAYLOAD_TYPE,
        what=f"trust v{new.policy.version} (by its own keys)",
    )
    return new.policy


def apply_rotations(path: str | os.PathLike[str], updates: Sequence[TrustEnvelope]) -> TrustPolicy:
    """Verify a chain of successors against the trust file at ``path`` and install the last.

    The chain is checked entirely in memory first; the file is replaced once, atomically, so a
    failure anywhere leaves the current trust file byte-identical.
    """
    from edgekit.fsutil import atomic_write_bytes

    current = load_trust(path).policy
    for update in updates:
        current = verify_rotation(current, update)
    if updates:
        atomic_write_bytes(Path(path), updates[-1].to_bytes())
    return current
