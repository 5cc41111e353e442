"""The fleet CA (edgekit/fleet/pki.py) and its CLI, with real keys, certificates and files.

What an operator relies on, one test each: a CA is created once and never overwritten; a
device certificate names exactly its device and can only be used as a client; a device id
that is not a topic level is refused before anything is signed; a device is provisioned once
unless forced, and forcing revokes the old certificate; revocation lands in a CRL signed by
the CA; the provisioned files are what the agent loads; two operators provisioning at once
both end up recorded. What the broker does with all this is tests/edgekit/fleet/
test_broker_acl.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.config import AgentConfig
from edgekit.archive import TarReader
from edgekit.cli import cli
from edgekit.fleet.errors import PkiError, ProvisionedError
from edgekit.fleet.pki import (
    CA_CERT,
    CA_KEY,
    CA_STATE,
    CRL,
    DEFAULT_CA_DAYS,
    DEFAULT_CONTROLLER_DAYS,
    DEFAULT_DEVICE_DAYS,
    DEFAULT_SERVER_DAYS,
    DEVICE_FILES,
    BrokerEndpoint,
    CertKind,
    FleetCA,
    RevocationReason,
    controller_identity,
    provision_device,
)
from edgekit.protocol import ProtocolError, validate_id

FLEET = "plant-1"
REPO = Path(__file__).resolve().parents[3]
BROKER = BrokerEndpoint.parse("mqtts://mqtt.lan:8883")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (dot files included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def usages(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def crl_of(ca: FleetCA) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl((ca.directory / CRL).read_bytes())
    public = ca.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public)
    return crl


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.init(tmp_path / "ca", fleet=FLEET)


# --- the CA ---------------------------------------------------------------------------------


def test_ca_init_writes_a_private_key_0600_a_ca_certificate_and_an_empty_crl(ca: FleetCA) -> None:
    assert stat.S_IMODE((ca.directory / CA_KEY).stat().st_mode) == 0o600
    certificate = cert((ca.directory / CA_CERT).read_bytes())
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    certificate.verify_directly_issued_by(certificate)  # self-signed
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert list(crl_of(ca)) == []
    reopened = FleetCA.open(ca.directory)
    assert reopened.fleet == FLEET and reopened.records() == []
    assert not [p for p in ca.directory.iterdir() if p.name.endswith(".tmp")]


def test_ca_init_refuses_to_overwrite_an_existing_ca(ca: FleetCA) -> None:
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="already holds a fleet CA"):
        FleetCA.init(ca.directory, fleet=FLEET)
    assert snapshot(ca.directory) == before


def test_a_partly_written_ca_is_refused_not_completed(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    folder.mkdir()
    (folder / CA_KEY).write_bytes(b"left by a killed init")
    with pytest.raises(PkiError, match=r"ca\.key exists"):
        FleetCA.init(folder)
    with pytest.raises(PkiError, match="not a fleet CA"):
        FleetCA.open(folder)


def test_two_cas_have_different_subjects(tmp_path: Path) -> None:
    """Two CAs with one subject would let a TLS stack pick the wrong one for a chain."""
    first = FleetCA.init(tmp_path / "a", fleet=FLEET)
    second = FleetCA.init(tmp_path / "b", fleet=FLEET)
    assert first.certificate.subject != second.certificate.subject


def test_ca_key_readable_by_others_is_refused(ca: FleetCA) -> None:
    os.chmod(ca.directory / CA_KEY, 0o644)
    with pytest.raises(PkiError, match="readable by other users"):
        FleetCA.open(ca.directory).issue_device("cam-1")
    assert FleetCA.open(ca.directory).records() == []


def test_a_key_that_is_not_the_cas_is_refused(ca: FleetCA, tmp_path: Path) -> None:
    other = FleetCA.init(tmp_path / "other", fleet=FLEET)
    (ca.directory / CA_KEY).write_bytes((other.directory / CA_KEY).read_bytes())
    with pytest.raises(PkiError, match="does not belong"):
        FleetCA.open(ca.directory).issue_device("cam-1")


def test_encrypted_ca_key_needs_its_passphrase(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    FleetCA.init(folder, fleet=FLEET, passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (folder / CA_KEY).read_bytes()
    with pytest.raises(PkiError, match="encrypted and no passphrase"):
        FleetCA.open(folder).issue_device("cam-1")
    with pytest.raises(PkiError, match="wrong passphrase"):
        FleetCA.open(folder, passphrase=b"wrong").issue_device("cam-1")
    issued = FleetCA.open(folder, passphrase=lambda _path: b"correct horse").issue_device("cam-1")
    assert cn(cert(issued.certificate_pem)) == "cam-1"


def test_damaged_records_are_a_typed_error(ca: FleetCA) -> None:
    (ca.directory / CA_STATE).write_bytes(b'{"type": "edgekit-fleet-ca", "type": "x"}')
    with pytest.raises(PkiError, match="duplicate JSON key"):
        FleetCA.open(ca.directory)


# --- certificates ---------------------------------------------------------------------------


def test_device_certificate_names_its_device_and_is_a_client_certificate(ca: FleetCA) -> None:
    issued = ca.issue_device("cam-7", days=30)
    certificate = cert(issued.certificate_pem)
    certificate.verify_directly_issued_by(ca.certificate)
    assert cn(certificate) == "cam-7"
    assert usages(certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:edgekit:{FLEET}:cam-7"]
    now = datetime.now(timezone.utc)
    assert certificate.not_valid_before_utc < now - timedelta(minutes=30)  # clock skew
    assert certificate.not_valid_after_utc <= now + timedelta(days=30)
    assert issued.record.sha256 == certificate.fingerprint(hashes.SHA256()).hex()
    assert b"PRIVATE KEY" in issued.key_pem and b"ENCRYPTED" not in issued.key_pem
    assert [r.serial for r in FleetCA.open(ca.directory).records()] == [certificate.serial_number]


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    short = FleetCA.init(tmp_path / "ca", fleet=FLEET, days=10)
    certificate = cert(short.issue_device("cam-1", days=1825).certificate_pem)
    assert certificate.not_valid_after_utc <= short.not_after


def test_server_certificate_names_every_host_and_only_serves(ca: FleetCA) -> None:
    issued = ca.issue_server(["mqtt.lan", "10.0.0.5", "MQTT.lan"])
    certificate = cert(issued.certificate_pem)
    assert usages(certificate) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.lan"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert cn(certificate) == "broker:mqtt.lan"
    with pytest.raises(PkiError, match="not a valid host"):
        ca.issue_server(["bad host"])


def test_controller_identity_cannot_be_a_device_id(ca: FleetCA) -> None:
    issued = ca.issue_controller("main")
    certificate = cert(issued.certificate_pem)
    assert cn(certificate) == controller_identity("main") == "controller:main"
    assert usages(certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(ProtocolError):
        validate_id("controller:main")
    with pytest.raises(PkiError):
        ca.issue_device("controller:main")
    assert ca.controller_identities() == ["controller:main"]


@pytest.mark.parametrize(
    "device",
    ["", "cam/7", "+", "#", "cam-#", "$SYS", "cam 7", "cam\n7", "-cam", ".cam", "x" * 65, "kämera"],
)
def test_a_device_id_that_is_not_a_topic_level_is_refused_before_signing(
    ca: FleetCA, device: str
) -> None:
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="device id"):
        ca.issue_device(device)
    assert snapshot(ca.directory) == before


def test_reprovisioning_needs_force_and_revokes_the_old_certificate(ca: FleetCA) -> None:
    first = ca.issue_device("cam-7")
    before = snapshot(ca.directory)
    with pytest.raises(ProvisionedError, match="already has a certificate"):
        ca.issue_device("cam-7")
    assert snapshot(ca.directory) == before
    second = ca.issue_device("cam-7", force=True)
    assert [r.serial for r in second.revoked] == [first.record.serial]
    entry = crl_of(ca).get_revoked_certificate_by_serial_number(first.record.serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.superseded
    assert crl_of(ca).get_revoked_certificate_by_serial_number(second.record.serial) is None
    assert [r.serial for r in ca.active(CertKind.DEVICE, "cam-7")] == [second.record.serial]


def test_revoke_lists_the_serial_in_a_new_signed_crl(ca: FleetCA) -> None:
    kept = ca.issue_device("cam-1")
    gone = ca.issue_device("cam-2")
    number_before = crl_of(ca).extensions.get_extension_for_class(x509.CRLNumber).value
    revoked = ca.revoke(device="cam-2", reason=RevocationReason.KEY_COMPROMISE)
    assert [r.serial for r in revoked] == [gone.record.serial]
    crl = crl_of(ca)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > (
        number_before.crl_number
    )
    entry = crl.get_revoked_certificate_by_serial_number(gone.record.serial)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        is x509.ReasonFlags.key_compromise
    )
    assert crl.get_revoked_certificate_by_serial_number(kept.record.serial) is None
    # The CRL stays valid as long as the CA: an expired CRL would lock every device out.
    assert crl.next_update_utc is not None and crl.next_update_utc >= ca.not_after
    # Revoking again changes nothing but signs the CRL again (repairs a crash in between).
    assert ca.revoke(device="cam-2") == []
    assert crl_of(ca).get_revoked_certificate_by_serial_number(gone.record.serial) is not None
    assert FleetCA.open(ca.directory).active(CertKind.DEVICE) == ca.active(CertKind.DEVICE)


def test_revoke_by_serial_takes_any_certificate(ca: FleetCA) -> None:
    controller = ca.issue_controller("replica-2")
    ca.revoke(serial=controller.record.serial)
    assert ca.controller_identities() == []
    assert crl_of(ca).get_revoked_certificate_by_serial_number(controller.record.serial)


def test_revoking_what_was_never_issued_is_an_error(ca: FleetCA) -> None:
    with pytest.raises(PkiError, match="never issued a certificate for device cam-9"):
        ca.revoke(device="cam-9")
    with pytest.raises(PkiError, match="never issued"):
        ca.revoke(serial=12345)


def test_a_ca_serves_one_fleet(ca: FleetCA) -> None:
    with pytest.raises(PkiError, match="belongs to fleet 'plant-1', not 'plant-2'"):
        ca.issue_device("cam-1", fleet="plant-2")
    assert ca.records() == []


def test_an_unbound_ca_is_bound_by_its_first_device(tmp_path: Path) -> None:
    unbound = FleetCA.init(tmp_path / "ca")
    with pytest.raises(PkiError, match="not bound to a fleet"):
        unbound.issue_device("cam-1")
    unbound.issue_device("cam-1", fleet="plant-2")
    assert FleetCA.open(tmp_path / "ca").fleet == "plant-2"
    with pytest.raises(PkiError, match="belongs to fleet"):
        unbound.issue_device("cam-2", fleet=FLEET)


# --- provisioning ---------------------------------------------------------------------------


def test_provisioned_directory_is_what_the_agent_loads(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    out = tmp_path / "cam-7"
    done = provision_device(ca, "cam-7", broker=BROKER, trust_file=trust_file, output=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(DEVICE_FILES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    assert (out / "trust.json").read_bytes() == trust_file.read_bytes()
    assert (out / CA_CERT).read_bytes() == ca.certificate_pem()
    device_cert = cert((out / "device.crt").read_bytes())
    assert device_cert.serial_number == done.record.serial and cn(device_cert) == "cam-7"

    config = AgentConfig.load(out / "agent.toml")  # the agent's own strict loader
    mqtt = config.mqtt
    assert (mqtt.enabled, mqtt.host, mqtt.port, mqtt.fleet, mqtt.device) == (
        True,
        "mqtt.lan",
        8883,
        FLEET,
        "cam-7",
    )
    assert mqtt.tls.enabled and mqtt.tls.check_hostname
    assert mqtt.tls.ca_file == out / CA_CERT
    assert mqtt.tls.cert_file == out / "device.crt" and mqtt.tls.key_file == out / "device.key"
    assert config.trust_path == out / "trust.json"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_provision_refuses_a_file_that_is_not_a_trust_file_before_signing(
    ca: FleetCA, tmp_path: Path
) -> None:
    bogus = tmp_path / "trust.json"
    bogus.write_text('{"payloadType": "something else"}')
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="is not a trust file"):
        provision_device(ca, "cam-7", broker=BROKER, trust_file=bogus, output=tmp_path / "out")
    assert snapshot(ca.directory) == before
    assert not (tmp_path / "out").exists()


def test_provision_refuses_an_existing_output_before_signing(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    out = tmp_path / "cam-7"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="exists"):
        provision_device(ca, "cam-7", broker=BROKER, trust_file=trust_file, output=out)
    assert snapshot(ca.directory) == before
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_forced_reprovisioning_replaces_the_output_and_revokes(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    out = tmp_path / "cam-7"
    first = provision_device(ca, "cam-7", broker=BROKER, trust_file=trust_file, output=out)
    with pytest.raises(ProvisionedError):
        provision_device(ca, "cam-7", broker=BROKER, trust_file=trust_file, output=tmp_path / "b")
    second = provision_device(
        ca, "cam-7", broker=BROKER, trust_file=trust_file, output=out, force=True
    )
    assert [r.serial for r in second.revoked] == [first.record.serial]
    assert cert((out / "device.crt").read_bytes()).serial_number == second.record.serial
    assert crl_of(ca).get_revoked_certificate_by_serial_number(first.record.serial)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_provisioning_bundle_is_a_strict_ustar_archive_with_a_private_key(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    archive = tmp_path / "cam-7.tar"
    provision_device(ca, "cam-7", broker=BROKER, trust_file=trust_file, output=archive, bundle=True)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with open(archive, "rb", buffering=0) as handle:  # the project's strict reader accepts it
        reader = TarReader(handle)
        names = []
        while (entry := reader.next_entry()) is not None:
            names.append(entry.name)
            reader.skip_data()
    assert sorted(names) == sorted(DEVICE_FILES)
    with tarfile.open(archive) as tar:  # and plain tar restores the key's mode
        modes = {m.name: stat.S_IMODE(m.mode) for m in tar.getmembers()}
        assert all(m.isfile() for m in tar.getmembers())
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert modes["device.key"] == 0o600 and modes["agent.toml"] == 0o644
    config = AgentConfig.load(tmp_path / "unpacked" / "agent.toml")
    assert config.mqtt.device == "cam-7" and config.mqtt.tls.enabled


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("mqtts://mqtt.lan:8883", "mqtt.lan", 8883),
        ("mqtts://mqtt.lan", "mqtt.lan", 8883),
        ("mqtts://10.0.0.5:1884/", "10.0.0.5", 1884),
        ("mqtts://[::1]:8883", "::1", 8883),
        ("ssl://MQTT.Lan:18883", "mqtt.lan", 18883),
    ],
)
def test_broker_url_accepted(url: str, host: str, port: int) -> None:
    assert BrokerEndpoint.parse(url) == BrokerEndpoint(host, port)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mqtt://mqtt.lan:1883", "over TLS only"),
        ("mqtt.lan:8883", "over TLS only"),
        ("mqtts://user:pw@mqtt.lan", "no user"),
        ("mqtts://mqtt.lan:0", "port"),
        ("mqtts://mqtt.lan:99999", "port"),
        ("mqtts://bad_host:8883", "not a valid host"),
        ("mqtts://mqtt.lan/path", "no user, path"),
    ],
)
def test_broker_url_refused(url: str, why: str) -> None:
    with pytest.raises(PkiError, match=why):
        BrokerEndpoint.parse(url)


# --- the CLI --------------------------------------------------------------------------------


def edgekit(*args: object, code: int = 0, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_cli_operator_flow(tmp_path: Path, trust_file: Path) -> None:
    ca_dir, broker_dir = tmp_path / "ca", tmp_path / "broker"
    edgekit("fleet", "ca", "init", "--dir", ca_dir, "--fleet", FLEET)
    out = edgekit("fleet", "ca", "init", "--dir", ca_dir, code=1)
    assert out.startswith("error [pki]: ") and out.count("\n") == 1
    edgekit("fleet", "ca", "server-cert", "--ca", ca_dir, "--host", "127.0.0.1", "-o", broker_dir)
    edgekit("fleet", "ca", "controller-cert", "--ca", ca_dir, "-o", tmp_path / "controller")
    edgekit("fleet", "broker-config", "--ca", ca_dir, "-o", broker_dir, "--port", "18883")
    assert {"mosquitto.conf", "acl", "ca.crt", "crl.pem"} <= {p.name for p in broker_dir.iterdir()}
    provision = ["fleet", "provision", "cam-7", "--ca", ca_dir, "--trust", trust_file]
    provision += ["--broker", "mqtts://127.0.0.1:18883"]
    edgekit(*provision, "-o", tmp_path / "cam-7")
    out = edgekit(*provision, "-o", tmp_path / "again", code=1)
    assert out.startswith("error [already-provisioned]: device cam-7 already has a certificate")
    bad = ["fleet", "provision", "cam/7", "--ca", ca_dir, "--trust", trust_file]
    out = edgekit(*bad, "--broker", "mqtts://h:1", "-o", tmp_path / "x", code=2)
    assert "Invalid value for 'DEVICE'" in out
    out = edgekit("fleet", "revoke", "cam-7", "--ca", ca_dir, "--broker-dir", broker_dir)
    assert "revoked device cam-7" in out
    assert "user cam-7\ntopic deny #" in (broker_dir / "acl").read_text()
    assert (broker_dir / "crl.pem").read_bytes() == (ca_dir / CRL).read_bytes()
    # The id is free again; provisioning it lifts the ACL's deny when given the broker dir.
    out = edgekit(*provision, "-o", tmp_path / "cam-7-new")
    assert "the broker needs the new crl.pem and acl" in out
    edgekit(*provision, "-o", tmp_path / "cam-7-newer", "--force", "--broker-dir", broker_dir)
    assert "user cam-7" not in (broker_dir / "acl").read_text()
    listed = json.loads(edgekit("fleet", "ca", "list", "--ca", ca_dir, "--json"))
    kinds = [(c["kind"], c["name"], c["reason"]) for c in listed["certificates"]]
    assert kinds == [
        ("server", "broker:127.0.0.1", None),
        ("controller", "controller:main", None),
        ("device", "cam-7", "unspecified"),
        ("device", "cam-7", "superseded"),
        ("device", "cam-7", None),
    ]


def test_cli_defaults_are_the_librarys() -> None:
    """The CLI spells the defaults out (it imports the library lazily); they must agree."""
    from edgekit.cli.fleet_pki_cmds import ca, provision

    def default(command: object, name: str) -> object:
        return next(p.default for p in command.params if p.name == name)  # type: ignore[attr-defined]

    assert default(ca.commands["init"], "days") == DEFAULT_CA_DAYS
    assert default(ca.commands["server-cert"], "days") == DEFAULT_SERVER_DAYS
    assert default(ca.commands["controller-cert"], "days") == DEFAULT_CONTROLLER_DAYS
    assert default(provision, "days") == DEFAULT_DEVICE_DAYS


def test_concurrent_provisioning_records_every_certificate(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    """Separate processes, one CA: the lock on the CA directory serializes them."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def command(i: int) -> list[str]:
        return [
            *(sys.executable, "-m", "edgekit", "fleet", "provision", f"cam-{i}"),
            *("--ca", str(ca.directory), "--trust", str(trust_file)),
            *("--broker", "mqtts://mqtt.lan", "-o", str(tmp_path / f"cam-{i}")),
        ]

    processes = [
        subprocess.Popen(command(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    records = FleetCA.open(ca.directory).records()
    assert sorted(r.name for r in records) == [f"cam-{i}" for i in range(4)]
    for i in range(4):
        serial = cert((tmp_path / f"cam-{i}" / "device.crt").read_bytes()).serial_number
        assert serial in {r.serial for r in records}


def test_an_open_ca_issues_against_the_records_on_disk_not_its_own_copy(ca: FleetCA) -> None:
    """Two handles opened before either issued (two operators' shells): neither loses the
    other's certificate."""
    first, second = FleetCA.open(ca.directory), FleetCA.open(ca.directory)
    first.issue_device("cam-1")
    second.issue_device("cam-2")
    with pytest.raises(ProvisionedError):
        second.issue_device("cam-1")
    assert [r.name for r in FleetCA.open(ca.directory).records()] == ["cam-1", "cam-2"]


def test_provisioning_waits_while_another_process_holds_the_ca(
    ca: FleetCA, tmp_path: Path, trust_file: Path
) -> None:
    lock = os.open(ca.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgekit", "fleet", "provision", "cam-1"),
                *("--ca", str(ca.directory), "--trust", str(trust_file)),
                *("--broker", "mqtts://mqtt.lan", "-o", str(tmp_path / "cam-1")),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=3)  # blocked on the lock (it finishes in ~1 s otherwise)
        assert FleetCA.open(ca.directory).records() == []
    finally:
        os.close(lock)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert [r.name for r in FleetCA.open(ca.directory).records()] == ["cam-1"]
