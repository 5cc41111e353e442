"""A mosquitto configuration in which every client is a certificate and sees only its topics.

The broker is where one device could speak for another, so the rules live there, not in the
clients. What ``edgekit fleet broker-config`` writes (all files replaced atomically):

``mosquitto.conf``
    the devices' TLS listener: it requires a client certificate from the fleet CA
    (``cafile``, ``require_certificate``), takes the certificate's CN as the client's user
    name (``use_identity_as_username``) *and* as its client id
    (``use_username_as_clientid``: otherwise a device could connect under another device's
    client id, and so disconnect it and take over its session, losing what was queued for
    it; the ACL would still keep those messages from the intruder), refuses anonymous
    clients, checks the CRL (``crlfile``) and reads the ACL (``acl_file``).
    With ``controller_port``, a second listener for the controller only: the same CA and ACL,
    but without the client-id pinning, because controller replicas open more than one
    connection per certificate and take over a dead replica's session by its client id
    (:mod:`edgekit.fleet.mqtt`). It listens on 127.0.0.1 unless told otherwise: a device that could
    reach it could still not leave its topics (the ACL is the same), but could disconnect a
    client by reusing its client id.
``acl``
    ``pattern`` lines with ``%u`` (the CN, i.e. the device id): a device may *write* only its
    own ``status``, ``telemetry``, ``events`` and ``reported`` and *read* only its own
    ``desired`` and ``cmd``; one ``user controller:NAME`` block per controller certificate in
    force, with every topic of the fleet and the controllers' own ``edgekit/controller/#``
    (markers a replica publishes to itself); and a ``topic deny #`` block for each revoked device
    that holds no certificate any more, so that its connection, if still open, loses all
    access at the reload that also loads the new CRL (mosquitto checks the CRL only when a
    connection is made).
``ca.crt``, ``crl.pem``
    copies from the CA directory; ``server.crt`` and ``server.key`` must already be there
    (``edgekit fleet ca server-cert -o DIR``).

Checked against mosquitto 2.0 (Debian's 2.0.11): an unauthorised PUBLISH is dropped, answered
with reason code 0x87 on MQTT 5 and with a plain PUBACK on MQTT 3.1.1; a subscription to
another device's topic is granted but nothing is delivered on it (the ACL is applied to every
message, retained ones included); ``crlfile`` and ``acl_file`` are re-read on SIGHUP.
``tests/edgekit/fleet/test_broker_acl.py`` runs each of these against the real broker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edgekit.fleet.errors import PkiError
from edgekit.fleet.pki import CA_CERT, CRL, CertKind, FleetCA, load_certificate, validate_host
from edgekit.fsutil import atomic_write_bytes
from edgekit.protocol import TOPIC_ROOT, TOPIC_VERSION, Direction, MessageKind

__all__ = [
    "ACL_FILE",
    "CONF_FILE",
    "CONTROLLER_TOPICS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PORT",
    "SERVER_CERT",
    "SERVER_KEY",
    "BrokerFiles",
    "render_acl",
    "render_conf",
    "update_revocations",
    "write_broker_config",
]

CONF_FILE = "mosquitto.conf"
ACL_FILE = "acl"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_PORT = 8883
DEFAULT_DATA_DIR = Path("/var/lib/mosquitto")

#: Payloads are at most 64 KiB (edgekit.protocol.MAX_PAYLOAD_BYTES); twice that leaves room
#: for the topic and MQTT 5 properties. A larger packet comes from a broken or hostile client,
#: and mosquitto would otherwise buffer up to 256 MiB of it.
MAX_PACKET_SIZE = 128 * 1024

#: Topics the controllers use among themselves (a replica's end-of-retained and drain
#: markers, edgekit.fleet.mqtt): outside every device's tree.
CONTROLLER_TOPICS = f"{TOPIC_ROOT}/controller/#"

#: Offline devices' sessions are dropped after this long: their queued QoS 1 messages go,
#: but ``desired`` is retained and comes back on the next subscription anyway.
SESSION_EXPIRY = "30d"

# mosquitto.conf has no quoting: a path with blanks would be cut, one with a newline would
# add configuration lines of its own.
_UNSAFE_PATH = re.compile(r"[\s\x00-\x1f\x7f#]")


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote and the identities its ACL names."""

    directory: Path
    written: tuple[Path, ...]
    fleet: str
    controllers: tuple[str, ...]
    denied: tuple[str, ...]


def _config_path(path: Path, what: str) -> str:
    text = os.fspath(path)
    if not path.is_absolute():
        raise PkiError(f"{what} must be an absolute path (mosquitto's own working directory is /)")
    if _UNSAFE_PATH.search(text):
        raise PkiError(
            f"{what} {text!r} has blanks or control characters mosquitto.conf cannot hold"
        )
    return text


def render_acl(
    fleet: str, *, controllers: Sequence[str], denied: Sequence[str] = (), when: str = ""
) -> str:
    """The ACL file for ``fleet``: devices confined to their own topics, the controllers to the
    fleet's, revoked devices to nothing."""
    base = f"{TOPIC_ROOT}/{TOPIC_VERSION}/{fleet}"
    lines = [
        f"# mosquitto ACL for edgekit fleet {fleet}, written by 'edgekit fleet broker-config'"
        + (f" at {when}" if when else "")
        + ".",
        "# The user name is the CN of the client's certificate (use_identity_as_username):",
        "# a device's id, or controller:NAME. Anything not granted here is denied.",
        "",
        "# Devices: publish their own reports, read their own desired state and commands.",
    ]
    for kind in MessageKind:
        access = "write" if kind.direction is Direction.UP else "read"
        lines.append(f"pattern {access} {base}/%u/{kind.value}")
    for identity in controllers:
        lines += [
            "",
            "# The controller: every device's topics in this fleet, and its own markers.",
            f"user {identity}",
            f"topic readwrite {base}/#",
            f"topic readwrite {CONTROLLER_TOPICS}",
        ]
    for device in denied:
        lines += [
            "",
            f"# Revoked, with no certificate in force: an open connection of {device} loses",
            "# every topic at the next reload (the CRL keeps new connections out).",
            f"user {device}",
            "topic deny #",
        ]
    return "\n".join(lines) + "\n"


def render_conf(
    *,
    fleet: str,
    install_dir: Path,
    port: int = DEFAULT_PORT,
    bind: str | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    controller_port: int | None = None,
    controller_bind: str = "127.0.0.1",
) -> str:
    """``mosquitto.conf``, with every file referred to under ``install_dir`` (where the files
    will be on the broker host, which need not be where they are written)."""
    where = _config_path(install_dir, "--install-dir")
    data = _config_path(data_dir, "--data-dir")
    for option, value in (("--port", port), ("--controller-port", controller_port)):
        if value is not None and not 1 <= value <= 65535:
            raise PkiError(f"{option} must be 1-65535, not {value}")
    if controller_port == port:
        raise PkiError("--controller-port must differ from --port")
    address = "" if bind is None else " " + validate_host(bind, what="--bind")
    tls = [
        "tls_version tlsv1.2",
        f"cafile {where}/{CA_CERT}",
        f"certfile {where}/{SERVER_CERT}",
        f"keyfile {where}/{SERVER_KEY}",
        f"crlfile {where}/{CRL}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    controller: list[str] = []
    if controller_port is not None:
        controller_address = validate_host(controller_bind, what="--controller-bind")
        controller = [
            "",
            "# The controller's listener: the same CA, CRL and ACL, but client ids are the",
            "# client's own (replicas hold several connections each). Keep it off the devices'",
            "# network.",
            f"listener {controller_port} {controller_address}",
            *tls,
            "use_username_as_clientid false",
        ]
    return "\n".join(
        [
            f"# mosquitto configuration for edgekit fleet {fleet}, written by",
            "# 'edgekit fleet broker-config'. Use it as the broker's whole configuration",
            f"# (mosquitto -c {where}/{CONF_FILE}). Every client needs a certificate from the",
            "# fleet CA; its common name is its identity, and the ACL gives each identity its",
            "# own topics only. After a new crl.pem or acl: kill -HUP the broker (systemctl",
            "# reload mosquitto). See docs/security.md, 'Fleet identity'.",
            "",
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {where}/{ACL_FILE}",
            "",
            "persistence true",
            f"persistence_location {data.rstrip('/')}/",
            f"persistent_client_expiration {SESSION_EXPIRY}",
            f"max_packet_size {MAX_PACKET_SIZE}",
            "",
            "# The devices' listener.",
            f"listener {port}{address}",
            *tls,
            "# The CN also replaces the client id: no client can take over another's session.",
            "use_username_as_clientid true",
            *controller,
            "",
        ]
    )


def _acl_inputs(ca: FleetCA) -> tuple[list[str], list[str]]:
    """The controller identities in force, and the revoked devices left with no certificate."""
    controllers = ca.controller_identities()
    if not controllers:
        raise PkiError(
            "no controller certificate is in force: run 'edgekit fleet ca controller-cert' "
            "first (the ACL names the controller by its certificate)"
        )
    active = {r.name for r in ca.active(CertKind.DEVICE)}
    denied = sorted(
        {r.name for r in ca.records() if r.kind is CertKind.DEVICE and r.revoked} - active
    )
    return controllers, denied


def _check_server_files(ca: FleetCA, directory: Path) -> None:
    """The broker's certificate must come from this CA, be in force and match its key."""
    cert_path, key_path = directory / SERVER_CERT, directory / SERVER_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(
            f"{cert_path} and {key_path} are needed: run 'edgekit fleet ca server-cert "
            f"--ca {ca.directory} --host BROKER_HOST -o {directory}' first"
        )
    certificate = load_certificate(cert_path)
    if not ca.issued_here(certificate):
        raise PkiError(f"{cert_path} was not issued by the CA in {ca.directory}")
    record = next((r for r in ca.records() if r.serial == certificate.serial_number), None)
    now = datetime.now(timezone.utc)
    if record is None or record.kind is not CertKind.SERVER:
        raise PkiError(f"{cert_path} is not a broker certificate of this CA")
    if not record.valid_at(now):
        raise PkiError(f"{cert_path} is revoked or expired: issue a new one with ca server-cert")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(der, spki):
        raise PkiError(f"{key_path} does not belong to {cert_path}")


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def update_revocations(ca: FleetCA, directory: str | os.PathLike[str]) -> list[Path]:
    """Refresh the two files revocation changes in a broker directory: ``crl.pem`` and
    ``acl`` (then send the broker SIGHUP)."""
    folder = Path(directory)
    fleet = ca.fleet
    if fleet is None:
        raise PkiError("this CA is not bound to a fleet: run broker-config with --fleet first")
    if not (folder / CONF_FILE).is_file():
        raise PkiError(f"{folder} holds no {CONF_FILE}: not a broker-config output directory")
    controllers, denied = _acl_inputs(ca)
    crl_path, acl_path = folder / CRL, folder / ACL_FILE
    atomic_write_bytes(crl_path, ca.crl_pem())
    text = render_acl(fleet, controllers=controllers, denied=denied, when=_stamp())
    atomic_write_bytes(acl_path, text.encode("utf-8"))
    return [crl_path, acl_path]


def write_broker_config(
    ca: FleetCA,
    directory: str | os.PathLike[str],
    *,
    fleet: str | None = None,
    port: int = DEFAULT_PORT,
    bind: str | None = None,
    install_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    controller_port: int | None = None,
    controller_bind: str = "127.0.0.1",
) -> BrokerFiles:
    """Write the broker's configuration into ``directory`` (see the module docstring).

    ``install_dir`` is where the files will be on the broker host (default: ``directory``
    itself, made absolute). Nothing is written until every input has been checked.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise PkiError(f"{folder} is not a directory")
    target = Path(install_dir) if install_dir is not None else folder.resolve()
    bound = ca.bind_fleet(fleet)
    _check_server_files(ca, folder)
    controllers, denied = _acl_inputs(ca)
    conf = render_conf(
        fleet=bound,
        install_dir=target,
        port=port,
        bind=bind,
        data_dir=Path(data_dir),
        controller_port=controller_port,
        controller_bind=controller_bind,
    )
    acl = render_acl(bound, controllers=controllers, denied=denied, when=_stamp())
    written = [folder / CA_CERT, folder / CRL, folder / ACL_FILE, folder / CONF_FILE]
    atomic_write_bytes(written[0], ca.certificate_pem())
    atomic_write_bytes(written[1], ca.crl_pem())
    atomic_write_bytes(written[2], acl.encode("utf-8"))
    atomic_write_bytes(written[3], conf.encode("utf-8"))
    return BrokerFiles(
        directory=folder,
        written=tuple(written),
        fleet=bound,
        controllers=tuple(controllers),
        denied=tuple(denied),
    )
