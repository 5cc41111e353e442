"""The fleet's certificate authority: device, broker and controller certificates, revocation,
and the files a device is provisioned with.

Why a private CA: the broker knows a client by the common name (CN) of its TLS client
certificate (mosquitto's ``use_identity_as_username``) and its ACL lets a client touch only the
topics under that name (:mod:`edgekit.fleet.broker_config`). So whoever holds a certificate with
``CN=cam-7`` from a CA the broker trusts *is* ``cam-7``. With a CA made for one fleet, whose key
stays with the operator, issuing that certificate is a deliberate act: ``edgekit fleet
provision``.

``CA_DIR`` holds::

    ca.key    the CA's private key (mode 0600; optionally encrypted with a passphrase)
    ca.crt    the CA certificate: the broker's cafile, the devices' and controller's ca_file
    crl.pem   the certificate revocation list: the broker's crlfile
    ca.json   the fleet the CA belongs to and every certificate it issued, with revocations

Durability: every change runs under an exclusive ``flock`` on ``CA_DIR/.lock`` (two operators
provisioning at once both end up recorded), every file is replaced atomically (temp file,
fsync, rename), and the record of a certificate is written *before* the certificate leaves
this module, so every certificate that exists somewhere can be found and revoked.

Keys are ECDSA P-256 throughout: every TLS stack a device may run (OpenSSL under mosquitto and
Python, mbedTLS on an ESP32, wolfSSL) accepts P-256 client certificates in TLS 1.2 and 1.3;
Ed25519 certificates are not supported by mbedTLS and most other microcontroller stacks.

The identities cannot collide: device ids follow the protocol's id rules
(:func:`edgekit.protocol.validate_id`: ``[A-Za-z0-9._-]``), while the controller's and the
broker's names contain a ``:`` (``controller:main``, ``broker:mqtt.lan``), which no device id
can. A device can therefore never be issued a certificate that the ACL would read as the
controller's.

This module runs on the operator's workstation only; nothing on the device imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgekit._jsonutil import dumps, loads_strict
from edgekit.errors import EdgekitError
from edgekit.fleet.errors import PkiError, ProvisionedError
from edgekit.fsutil import atomic_write_bytes, fsync_dir
from edgekit.manifest import format_time
from edgekit.protocol import ProtocolError, validate_id

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CA_STATE",
    "CONTROLLER_PREFIX",
    "CRL",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CONTROLLER_DAYS",
    "DEFAULT_DEVICE_DAYS",
    "DEFAULT_SERVER_DAYS",
    "DEVICE_FILES",
    "BrokerEndpoint",
    "CertKind",
    "Credentials",
    "FleetCA",
    "IssuedCertificate",
    "Provisioned",
    "RevocationReason",
    "agent_config_text",
    "controller_identity",
    "load_certificate",
    "provision_device",
    "validate_host",
    "write_credentials",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL = "crl.pem"
CA_STATE = "ca.json"
_LOCK = ".lock"
_STATE_TYPE = "edgekit-fleet-ca"
_STATE_FORMAT = 1

#: A CA outlives many device generations; its expiry ends the fleet's identities at once.
DEFAULT_CA_DAYS = 3650
#: Devices sit in the field for years and are re-provisioned by hand, so their certificates
#: last long; revocation, not expiry, is how a lost device is shut out.
DEFAULT_DEVICE_DAYS = 1825
#: The broker and the controller are servers an operator can reach; shorter lifetimes.
DEFAULT_SERVER_DAYS = 825
DEFAULT_CONTROLLER_DAYS = 825
#: Certificates start an hour in the past: a device whose clock is a few minutes behind must
#: not find the broker's certificate "not yet valid" (and the other way round).
_BACKDATE = timedelta(hours=1)

#: The controller identity is ``controller:NAME``. The ``:`` keeps it out of the device id
#: space (see the module docstring); NAME tells controller replicas apart.
CONTROLLER_PREFIX = "controller:"
_SERVER_PREFIX = "broker:"
#: ca.json grows by ~300 bytes per certificate: 64 MiB are ~200,000 certificates.
_MAX_STATE = 64 * 1024 * 1024
_MAX_PEM = 1024 * 1024

#: What ``provision`` writes for a device (the agent.toml refers to the others by these names).
DEVICE_FILES = ("agent.toml", "ca.crt", "device.crt", "device.key", "trust.json")

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

PassphraseSource = Callable[[Path], "bytes | None"] | bytes | None


class CertKind(str, Enum):
    """What a certificate is for; it decides the extended key usage and the name rules."""

    DEVICE = "device"
    SERVER = "server"
    CONTROLLER = "controller"


class RevocationReason(str, Enum):
    """CRL reason codes an operator can give (RFC 5280 §5.3.1), by their CLI names."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"

    @property
    def flag(self) -> x509.ReasonFlags | None:
        """The CRL entry's reason; None for ``unspecified``, which RFC 5280 says to omit."""
        return {
            RevocationReason.UNSPECIFIED: None,
            RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
            RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
            RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
        }[self]


# --- names ------------------------------------------------------------------------------------


def _device_id(value: object) -> str:
    try:
        return validate_id(value, what="device id")
    except ProtocolError as exc:
        raise PkiError(exc.message) from None


def _fleet_id(value: object) -> str:
    try:
        return validate_id(value, what="fleet id")
    except ProtocolError as exc:
        raise PkiError(exc.message) from None


def controller_identity(name: str) -> str:
    """``controller:NAME``: the CN of a controller certificate and its ACL user name."""
    try:
        validate_id(name, what="controller name")
    except ProtocolError as exc:
        raise PkiError(exc.message) from None
    return CONTROLLER_PREFIX + name


def validate_host(value: object, *, what: str = "host") -> str:
    """A DNS name or an IP address, as a certificate's subjectAltName and a URL carry it."""
    if not isinstance(value, str) or not value:
        raise PkiError(f"{what} must be a host name or an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise PkiError(f"{what} {value!r} is not a valid host name or IP address")
    return name.lower()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str) or not value.endswith("Z"):
        raise PkiError(f"{what} must be a UTC timestamp like 2027-01-01T00:00:00Z")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)
    except ValueError:
        raise PkiError(f"{what} {value!r} is not a valid timestamp") from None


# --- the record of issued certificates --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IssuedCertificate:
    """One certificate the CA signed, as ``ca.json`` records it."""

    serial: int
    kind: CertKind
    name: str
    """The subject CN: device id, ``controller:NAME`` or ``broker:HOST``."""
    not_before: datetime
    not_after: datetime
    sha256: str
    """Fingerprint of the certificate's DER bytes (what ``openssl x509 -fingerprint`` shows)."""
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def valid_at(self, when: datetime) -> bool:
        """Not revoked and within its validity period: it would open a connection now."""
        return not self.revoked and self.not_before <= when < self.not_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "serial": self.serial_hex,
            "kind": self.kind.value,
            "name": self.name,
            "not_before": format_time(self.not_before),
            "not_after": format_time(self.not_after),
            "sha256": self.sha256,
            "revoked_at": None if self.revoked_at is None else format_time(self.revoked_at),
            "reason": None if self.reason is None else self.reason.value,
        }

    @classmethod
    def from_dict(cls, value: object) -> IssuedCertificate:
        if not isinstance(value, dict):
            raise PkiError("ca.json: a certificate record must be an object")
        try:
            serial = int(str(value.get("serial")), 16)
            kind = CertKind(value.get("kind"))
            reason_text = value.get("reason")
            reason = None if reason_text is None else RevocationReason(reason_text)
        except ValueError as exc:
            raise PkiError(f"ca.json: a certificate record is damaged: {exc}") from None
        name, sha256 = value.get("name"), value.get("sha256")
        if not isinstance(name, str) or not isinstance(sha256, str):
            raise PkiError("ca.json: a certificate record lacks its name or fingerprint")
        revoked = value.get("revoked_at")
        return cls(
            serial=serial,
            kind=kind,
            name=name,
            not_before=_parse_time(value.get("not_before"), "ca.json not_before"),
            not_after=_parse_time(value.get("not_after"), "ca.json not_after"),
            sha256=sha256,
            revoked_at=None if revoked is None else _parse_time(revoked, "ca.json revoked_at"),
            reason=reason,
        )

    @classmethod
    def of(cls, kind: CertKind, certificate: x509.Certificate) -> IssuedCertificate:
        return cls(
            serial=certificate.serial_number,
            kind=kind,
            name=_common_name(certificate),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        )


@dataclass
class _State:
    """``ca.json``: the fleet the CA is bound to, the CRL counter, the issued certificates."""

    fleet: str | None
    crl_number: int = 0
    certificates: list[IssuedCertificate] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return dumps(
            {
                "type": _STATE_TYPE,
                "format": _STATE_FORMAT,
                "fleet": self.fleet,
                "crl_number": self.crl_number,
                "certificates": [c.to_dict() for c in self.certificates],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> _State:
        try:
            doc = loads_strict(data, what="ca.json", max_size=_MAX_STATE)
        except EdgekitError as exc:
            raise PkiError(exc.message) from None
        if doc.get("type") != _STATE_TYPE or doc.get("format") != _STATE_FORMAT:
            raise PkiError(f"ca.json is not an edgekit fleet CA (format {_STATE_FORMAT})")
        fleet, number, records = doc.get("fleet"), doc.get("crl_number"), doc.get("certificates")
        if fleet is not None:
            fleet = _fleet_id(fleet)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise PkiError("ca.json: crl_number must be a whole number")
        if not isinstance(records, list):
            raise PkiError("ca.json: certificates must be a list")
        return cls(fleet, number, [IssuedCertificate.from_dict(r) for r in records])


# --- issued credentials -----------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A freshly issued certificate with its private key (which exists nowhere else)."""

    record: IssuedCertificate
    certificate_pem: bytes
    key_pem: bytes = field(repr=False)
    revoked: tuple[IssuedCertificate, ...] = ()
    """Certificates of the same device revoked to make way for this one (``force``)."""


def write_credentials(
    directory: str | os.PathLike[str],
    credentials: Credentials,
    *,
    stem: str,
    ca_certificate: bytes,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``STEM.crt``, ``STEM.key`` (0600) and ``ca.crt`` into ``directory``.

    The key is written first: a crash in between leaves a key without its certificate (which
    the broker refuses to start with, loudly) rather than a certificate whose key is gone.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, ca_path = folder / f"{stem}.crt", folder / f"{stem}.key", folder / CA_CERT
    if not overwrite:
        for existing in (cert_path, key_path):
            if existing.exists():
                raise PkiError(f"{existing} exists; refusing to overwrite it (use --force)")
    atomic_write_bytes(key_path, credentials.key_pem, mode=0o600)
    atomic_write_bytes(cert_path, credentials.certificate_pem, mode=0o644)
    atomic_write_bytes(ca_path, ca_certificate, mode=0o644)
    return [cert_path, key_path, ca_path]


# --- the CA -----------------------------------------------------------------------------------


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _spki(public: Any) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: equal bytes, equal keys (any key type)."""
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _read_small(path: Path, what: str, limit: int = _MAX_PEM) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise PkiError(f"{path} is too large to be a {what}")
    return data


class FleetCA:
    """A fleet certificate authority in a directory (see the module docstring for its files).

    Open one with :meth:`init` or :meth:`open`. Reading (``certificate``, :meth:`records`)
    needs no passphrase; the private key is loaded on first use to sign.
    """

    def __init__(
        self,
        directory: Path,
        *,
        certificate: x509.Certificate,
        state: _State,
        passphrase: PassphraseSource = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._state = state
        self._passphrase = passphrase
        self._key = key

    # --- opening ---

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        fleet: str | None = None,
        days: int = DEFAULT_CA_DAYS,
        passphrase: bytes | None = None,
        now: datetime | None = None,
    ) -> FleetCA:
        """Create a CA in ``directory`` (created if missing). An existing CA is never touched.

        ``fleet`` binds the CA to one fleet now; otherwise the first device or broker
        configuration binds it (device ids are unique only within a fleet, so one CA serving
        two fleets would let ``cam-7`` of one speak as ``cam-7`` of the other).
        """
        folder = Path(directory)
        if fleet is not None:
            fleet = _fleet_id(fleet)
        if not 1 <= days <= 100 * 366:
            raise PkiError(f"--days must be between 1 and {100 * 366}, not {days}")
        for name in (CA_KEY, CA_CERT, CRL, CA_STATE):
            if (folder / name).exists():
                raise PkiError(
                    f"{folder / name} exists: {folder} already holds a fleet CA; refusing to "
                    "overwrite it (every certificate it issued depends on its key)"
                )
        folder.mkdir(parents=True, exist_ok=True)
        now = now or _utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        # A random suffix makes each CA's subject unique: two CAs with one subject would let
        # a TLS stack pick the wrong one when it builds a chain.
        label = f"edgekit fleet {fleet} CA" if fleet else "edgekit fleet CA"
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekit"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {secrets.token_hex(4)}"[:64]),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(folder, certificate=certificate, state=_State(fleet), key=key)
        with ca._locked():
            # ca.json last: its presence marks a complete CA (open() requires it).
            atomic_write_bytes(folder / CA_KEY, _key_pem(key, passphrase), mode=0o600)
            atomic_write_bytes(
                folder / CA_CERT, certificate.public_bytes(serialization.Encoding.PEM)
            )
            atomic_write_bytes(folder / CRL, ca._sign_crl(now))
            ca._save()
        return ca

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], *, passphrase: PassphraseSource = None
    ) -> FleetCA:
        """Open an existing CA; ``passphrase`` is asked for only if the key is encrypted."""
        folder = Path(directory)
        if not (folder / CA_STATE).is_file():
            raise PkiError(
                f"{folder} is not a fleet CA (no {CA_STATE}); create one with "
                f"'edgekit fleet ca init --dir {folder}'"
            )
        try:
            certificate = x509.load_pem_x509_certificate(
                _read_small(folder / CA_CERT, "certificate")
            )
        except ValueError:
            raise PkiError(f"{folder / CA_CERT} is not a PEM certificate") from None
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise PkiError(f"{folder / CA_CERT} is not a CA certificate")
        state = _State.from_bytes(_read_small(folder / CA_STATE, "CA state", _MAX_STATE))
        return cls(folder, certificate=certificate, state=state, passphrase=passphrase)

    # --- reading ---

    @property
    def fleet(self) -> str | None:
        """The fleet this CA issues for (None until the first device or broker binds it)."""
        return self._state.fleet

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def crl_pem(self) -> bytes:
        return _read_small(self.directory / CRL, "revocation list")

    def records(self) -> list[IssuedCertificate]:
        """Every certificate issued, oldest first (as of the last change made through here)."""
        return list(self._state.certificates)

    def active(
        self, kind: CertKind, name: str | None = None, *, now: datetime | None = None
    ) -> list[IssuedCertificate]:
        """Certificates of ``kind`` (and ``name``) that are neither revoked nor expired."""
        when = now or _utcnow()
        return [
            r
            for r in self._state.certificates
            if r.kind is kind and (name is None or r.name == name) and r.valid_at(when)
        ]

    def controller_identities(self) -> list[str]:
        """The CNs of the controller certificates in force, each once, in issue order."""
        return list(dict.fromkeys(r.name for r in self.active(CertKind.CONTROLLER)))

    def issued_here(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` carries this CA's signature."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    # --- changing ---

    def bind_fleet(self, fleet: str | None) -> str:
        """The fleet to issue for: ``fleet`` if the CA is unbound or bound to it; the CA's own
        when ``fleet`` is None. Binding is recorded in ca.json."""
        if fleet is not None:
            fleet = _fleet_id(fleet)
        with self._locked():
            bound = self._state.fleet
            if bound is None:
                if fleet is None:
                    raise PkiError(
                        "this CA is not bound to a fleet yet: give --fleet (the fleet id its "
                        "devices report under)"
                    )
                self._state.fleet = fleet
                self._save()
                return fleet
            if fleet is not None and fleet != bound:
                raise PkiError(
                    f"this CA belongs to fleet {bound!r}, not {fleet!r}: device ids are unique "
                    "only within a fleet, so each fleet needs its own CA"
                )
            return bound

    def issue_device(
        self,
        device: str,
        *,
        fleet: str | None = None,
        days: int = DEFAULT_DEVICE_DAYS,
        force: bool = False,
        now: datetime | None = None,
    ) -> Credentials:
        """A key and a client certificate with ``CN=device``.

        A device that already holds a certificate in force is refused (:class:`ProvisionedError`)
        unless ``force``: then the old certificates are revoked (reason ``superseded``) in the
        same step, and the caller must hand the new CRL to the broker.
        """
        device = _device_id(device)
        fleet = self.bind_fleet(fleet)
        with self._locked():
            when = now or _utcnow()
            current = self.active(CertKind.DEVICE, device, now=when)
            if current and not force:
                newest = current[-1]
                raise ProvisionedError(
                    f"device {device} already has a certificate (serial {newest.serial_hex}, "
                    f"valid until {format_time(newest.not_after)}); --force issues a new one "
                    "and revokes the old"
                )
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekit"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
                    x509.NameAttribute(NameOID.COMMON_NAME, device),
                ]
            )
            san = [x509.UniformResourceIdentifier(f"urn:edgekit:{fleet}:{device}")]
            revoked = self._revoke_records(current, RevocationReason.SUPERSEDED, when)
            credentials = self._issue(CertKind.DEVICE, subject, san, days=days, now=when)
            crl = self._sign_crl(when) if revoked else None
            self._save()
            if crl is not None:
                atomic_write_bytes(self.directory / CRL, crl)
        return replace(credentials, revoked=tuple(revoked))

    def issue_server(
        self,
        hosts: Sequence[str],
        *,
        days: int = DEFAULT_SERVER_DAYS,
        now: datetime | None = None,
    ) -> Credentials:
        """The broker's certificate: every name and address clients use to reach it."""
        names = list(dict.fromkeys(validate_host(h) for h in hosts))
        if not names:
            raise PkiError("give at least one --host: the name or address devices connect to")
        cn = _SERVER_PREFIX + names[0]
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekit"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn if len(cn) <= 64 else "broker:"),
            ]
        )
        san: list[x509.GeneralName] = []
        for name in names:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                san.append(x509.DNSName(name))
        with self._locked():
            credentials = self._issue(CertKind.SERVER, subject, san, days=days, now=now)
            self._save()
        return credentials

    def issue_controller(
        self,
        name: str = "main",
        *,
        days: int = DEFAULT_CONTROLLER_DAYS,
        now: datetime | None = None,
    ) -> Credentials:
        """A client certificate with ``CN=controller:NAME``: the ACL grants it every topic of
        the fleet. Replicas get one NAME each (the broker uses the CN as the client id)."""
        identity = controller_identity(name)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgekit"),
                x509.NameAttribute(NameOID.COMMON_NAME, identity),
            ]
        )
        with self._locked():
            credentials = self._issue(CertKind.CONTROLLER, subject, [], days=days, now=now)
            self._save()
        return credentials

    def revoke(
        self,
        *,
        device: str | None = None,
        serial: int | None = None,
        reason: RevocationReason = RevocationReason.UNSPECIFIED,
        now: datetime | None = None,
    ) -> list[IssuedCertificate]:
        """Revoke every unrevoked certificate of ``device``, or the one with ``serial``, and
        re-sign the CRL. Revoking what is already revoked re-signs the CRL and returns []
        (so a crash between ca.json and crl.pem is repaired by running it again)."""
        if (device is None) == (serial is None):
            raise PkiError("name a device or give --serial, not both")
        if device is not None:
            device = _device_id(device)
        with self._locked():
            when = now or _utcnow()
            if device is not None:
                found = [
                    r
                    for r in self._state.certificates
                    if r.kind is CertKind.DEVICE and r.name == device
                ]
                if not found:
                    raise PkiError(f"this CA never issued a certificate for device {device}")
            else:
                found = [r for r in self._state.certificates if r.serial == serial]
                if not found:
                    raise PkiError(f"this CA never issued a certificate with serial {serial:x}")
            revoked = self._revoke_records(found, reason, when)
            crl = self._sign_crl(when)
            self._save()  # the record first: a crash before the CRL is repaired by a re-run
            atomic_write_bytes(self.directory / CRL, crl)
        return revoked

    # --- internals ---

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold ``CA_DIR/.lock`` and work on the state as it is on disk now, not as it was
        when this object was opened (another process may have issued meanwhile)."""
        path = self.directory / _LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state_path = self.directory / CA_STATE
            if state_path.is_file():
                self._state = _State.from_bytes(_read_small(state_path, "CA state", _MAX_STATE))
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def _save(self) -> None:
        atomic_write_bytes(self.directory / CA_STATE, self._state.to_bytes())

    def _signing_key(self) -> ec.EllipticCurvePrivateKey:
        if self._key is not None:
            return self._key
        path = self.directory / CA_KEY
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise PkiError(f"{path} is missing: this CA directory cannot sign") from None
        if mode & 0o077:
            raise PkiError(
                f"{path} is readable by other users (mode {mode & 0o777:o}); chmod 600 it: "
                "whoever reads it can make devices"
            )
        data = _read_small(path, "private key")
        secret: bytes | None = None
        if b"ENCRYPTED PRIVATE KEY" in data:
            source = self._passphrase
            secret = source(path) if callable(source) else source
            if not secret:
                raise PkiError(f"{path} is encrypted and no passphrase was given")
        try:
            key = serialization.load_pem_private_key(data, password=secret)
        except TypeError:
            raise PkiError(f"{path}: a passphrase was given for an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise PkiError(f"{path}: wrong passphrase or not a private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path} is not an EC private key")
        if _spki(key.public_key()) != _spki(self.certificate.public_key()):
            raise PkiError(f"{path} does not belong to {self.directory / CA_CERT}")
        self._key = key
        return key

    def _issue(
        self,
        kind: CertKind,
        subject: x509.Name,
        san: Sequence[x509.GeneralName],
        *,
        days: int,
        now: datetime | None,
    ) -> Credentials:
        """Sign a new leaf and record it (the caller holds the lock and saves the state)."""
        if days < 1:
            raise PkiError(f"--days must be at least 1, not {days}")
        when = now or _utcnow()
        ca_key = self._signing_key()
        if when >= self.not_after:
            raise PkiError(f"the CA expired on {format_time(self.not_after)}")
        # A leaf cannot outlive its CA: a chain with an expired CA fails anyway.
        not_after = min(when + timedelta(days=days), self.not_after)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if kind is CertKind.SERVER
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # One purpose each: OpenSSL checks it, so a broker certificate cannot log in as a
            # client and a device certificate cannot pose as the broker.
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        record = IssuedCertificate.of(kind, certificate)
        self._state.certificates.append(record)
        return Credentials(
            record=record,
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
        )

    def _revoke_records(
        self, records: Sequence[IssuedCertificate], reason: RevocationReason, when: datetime
    ) -> list[IssuedCertificate]:
        serials = {r.serial for r in records if not r.revoked}
        done: list[IssuedCertificate] = []
        for index, record in enumerate(self._state.certificates):
            if record.serial in serials and not record.revoked:
                updated = replace(record, revoked_at=when, reason=reason)
                self._state.certificates[index] = updated
                done.append(updated)
        return done

    def _sign_crl(self, when: datetime) -> bytes:
        """The CRL of every revoked certificate, under the next CRL number (the caller saves
        the state, then writes the CRL).

        ``nextUpdate`` is the CA's own expiry. OpenSSL refuses *every* client certificate once
        the CRL it was given has passed its nextUpdate, and the broker reads this file from its
        own disk (anyone able to swap it for an old one controls the broker anyway), so a
        short-lived CRL would add a fleet-wide outage risk and no protection.
        """
        ca_key = self._signing_key()
        self._state.crl_number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(when - _BACKDATE)
            .next_update(max(self.not_after, when + timedelta(days=1)))
            .add_extension(x509.CRLNumber(self._state.crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        for record in self._state.certificates:
            if record.revoked_at is None:
                continue
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(record.serial)
                .revocation_date(record.revoked_at)
            )
            flag = record.reason.flag if record.reason is not None else None
            if flag is not None:
                entry = entry.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- provisioning a device --------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where a device reaches the broker: ``mqtts://HOST[:8883]`` (TLS only)."""

    host: str
    port: int = 8883

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("mqtts", "ssl"):
            raise PkiError(
                f"broker {url!r}: give mqtts://HOST:PORT (a provisioned device connects with its "
                "certificate, over TLS only)"
            )
        if "@" in rest or "/" in rest.rstrip("/") or "?" in rest:
            raise PkiError(f"broker {url!r}: only mqtts://HOST:PORT (no user, path or query)")
        rest = rest.rstrip("/")
        if rest.startswith("["):  # [IPv6]:port
            host, _, tail = rest[1:].partition("]")
            port_text = tail[1:] if tail.startswith(":") else ""
            if tail and not tail.startswith(":"):
                raise PkiError(f"broker {url!r} is not mqtts://HOST:PORT")
        else:
            host, _, port_text = rest.partition(":")
        port = 8883
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise PkiError(f"broker {url!r}: the port must be 1-65535")
            port = int(port_text)
        return cls(validate_host(host, what=f"broker {url!r}: host"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtts://{host}:{self.port}"


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for the ASCII text written here)."""
    import json

    return json.dumps(value, ensure_ascii=True)


def agent_config_text(
    *, fleet: str, device: str, broker: BrokerEndpoint, record: IssuedCertificate | None = None
) -> str:
    """The ``agent.toml`` of a provisioned device.

    Paths are relative, and the agent resolves them against the config file's directory, so
    the provisioned files work wherever they are copied together (``/etc/edgekit`` by
    default). Only what provisioning decides is written; everything else keeps the agent's
    defaults (``device_agent/agent.example.toml`` lists them).
    """
    lines = [
        f"# edgekit-agent configuration for device {device} of fleet {fleet},",
        "# written by 'edgekit fleet provision'.",
    ]
    if record is not None:
        lines.append(
            f"# Certificate serial {record.serial_hex}, valid until "
            f"{format_time(record.not_after)}."
        )
    lines += [
        "# Copy this file with ca.crt, device.crt, device.key and trust.json to /etc/edgekit/;",
        "# relative paths are relative to this file. Keep device.key readable by the agent only.",
        "",
        "# The trust anchor: which keys may sign the bundles this device installs.",
        f"trust_file = {_toml_string('trust.json')}",
        "",
        "[mqtt]",
        "enabled = true",
        f"host = {_toml_string(broker.host)}",
        f"port = {broker.port}",
        f"fleet = {_toml_string(fleet)}",
        f"device = {_toml_string(device)}",
        "",
        "[mqtt.tls]",
        "# Mutual TLS: the broker is checked against the fleet CA, and this device proves",
        "# its identity (the certificate's CN is its device id) with its own key.",
        "enabled = true",
        f"ca_file = {_toml_string(CA_CERT)}",
        f"cert_file = {_toml_string('device.crt')}",
        f"key_file = {_toml_string('device.key')}",
        "check_hostname = true",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision_device` did."""

    device: str
    fleet: str
    record: IssuedCertificate
    output: Path
    revoked: tuple[IssuedCertificate, ...] = ()


def _read_trust(path: Path) -> bytes:
    from edgekit.trust import MAX_TRUST_SIZE, TrustEnvelope

    data = _read_small(path, "trust file", MAX_TRUST_SIZE * 2)
    try:
        TrustEnvelope.from_bytes(data)
    except EdgekitError as exc:
        raise PkiError(f"{path} is not a trust file: {exc.message}") from None
    return data


def provision_device(
    ca: FleetCA,
    device: str,
    *,
    broker: BrokerEndpoint,
    trust_file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    fleet: str | None = None,
    bundle: bool = False,
    force: bool = False,
    days: int = DEFAULT_DEVICE_DAYS,
) -> Provisioned:
    """Issue ``device``'s key and certificate and write everything it needs to ``output``.

    ``output`` is a directory of :data:`DEVICE_FILES` (mode 0700), or with ``bundle`` one tar
    archive of them (mode 0600, the key inside 0600) to carry over USB. Everything that can be
    checked is checked before the certificate is issued, so a typo issues nothing; the output
    appears by rename, complete or not at all. An existing output is replaced only with
    ``force``.
    """
    device = _device_id(device)
    fleet = _fleet_id(fleet) if fleet is not None else None
    if ca.fleet is not None and fleet is not None and fleet != ca.fleet:
        ca.bind_fleet(fleet)  # raises with the explanation
    target = Path(output)
    trust = _read_trust(Path(trust_file))
    if target.exists() or target.is_symlink():
        if not force:
            raise PkiError(f"{target} exists; refusing to overwrite it (use --force)")
        if bundle and target.is_dir():
            raise PkiError(f"{target} is a directory; --bundle writes one archive file")
        if not bundle and not target.is_dir():
            raise PkiError(f"{target} is not a directory")
    if not target.parent.is_dir():
        raise PkiError(f"{target.parent} is not a directory")
    credentials = ca.issue_device(device, fleet=fleet, days=days, force=force)
    bound = ca.fleet
    assert bound is not None  # issue_device bound it
    files = {
        "agent.toml": (
            agent_config_text(fleet=bound, device=device, broker=broker, record=credentials.record)
        ).encode("utf-8"),
        CA_CERT: ca.certificate_pem(),
        "device.crt": credentials.certificate_pem,
        "device.key": credentials.key_pem,
        "trust.json": trust,
    }
    if bundle:
        _write_bundle(target, files)
    else:
        _write_directory(target, files)
    return Provisioned(
        device=device,
        fleet=bound,
        record=credentials.record,
        output=target,
        revoked=credentials.revoked,
    )


def _mode(name: str) -> int:
    return 0o600 if name.endswith(".key") else 0o644


def _write_bundle(target: Path, files: dict[str, bytes]) -> None:
    """One ustar archive of flat regular files: ``tar -xpf`` on the device restores them with
    their modes, and :class:`edgekit.archive.TarReader` (the project's strict reader) accepts
    it too."""
    buffer = BytesIO()
    mtime = int(time.time())
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = _mode(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            archive.addfile(info, BytesIO(data))
    atomic_write_bytes(target, buffer.getvalue(), mode=0o600)


def _write_directory(target: Path, files: dict[str, bytes]) -> None:
    """Write into a private staging directory, then rename it into place."""
    parent = target.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    old: Path | None = None
    try:
        os.chmod(staging, 0o700)
        for name, data in files.items():
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode(name))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(staging)
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
            os.replace(target, old / "replaced")
        os.replace(staging, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / "replaced", target)  # put the previous output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read one PEM certificate, with a one-line error if it is not one."""
    file = Path(path)
    try:
        return x509.load_pem_x509_certificate(_read_small(file, "certificate"))
    except ValueError:
        raise PkiError(f"{file} is not a PEM certificate") from None
