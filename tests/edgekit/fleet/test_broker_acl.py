"""The broker configuration from ``edgekit fleet broker-config``, run by a real mosquitto.

Each test starts Debian's mosquitto with the generated ``mosquitto.conf`` (on a free loopback
port; only log lines are appended) and the generated ACL, with certificates from a real fleet
CA, and talks to it through paho-mqtt with those certificates. What a fleet relies on, one test
each: a device cannot publish as another device; cannot read another device's ``desired`` or
commands (retained or live); a client without a certificate of this CA cannot connect at all;
a revoked certificate is refused once the broker has reloaded (SIGHUP), and an open connection
of a revoked device loses its topics at that reload; a device cannot take over another's
session by its client id; the controller reads and writes every device of its fleet; and a
real ``edgekit-agent run`` with a provisioned agent.toml reports over TLS.

Every "never sees" assertion is made after a permitted marker message sent *later* has
arrived, so it cannot pass merely because the forbidden message was slow.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from support.mosquitto import Broker, free_port, wait_for

from edgekit.fleet.broker_config import (
    CONF_FILE,
    render_acl,
    render_conf,
    update_revocations,
    write_broker_config,
)
from edgekit.fleet.errors import PkiError
from edgekit.fleet.pki import (
    BrokerEndpoint,
    Credentials,
    FleetCA,
    RevocationReason,
    provision_device,
    write_credentials,
)
from edgekit.protocol import Command, Event, MessageKind, Status, StatusState, Topics, decode

pytestmark = pytest.mark.timeout(120)

FLEET = "plant-1"
REPO = Path(__file__).resolve().parents[3]
NOT_AUTHORIZED = 0x87
WAIT_S = 15.0


# --- a fleet CA and its broker ----------------------------------------------------------------


@dataclass
class Identity:
    """A certificate and key on disk (a device, a controller, or an impostor)."""

    cert: Path
    key: Path


@dataclass
class Fleet:
    root: Path
    ca: FleetCA
    broker_dir: Path
    ids: dict[str, Identity] = field(default_factory=dict)

    def save(self, label: str, issued: Credentials, ca_pem: bytes | None = None) -> Identity:
        folder = self.root / label
        write_credentials(
            folder, issued, stem="id", ca_certificate=ca_pem or self.ca.certificate_pem()
        )
        self.ids[label] = Identity(folder / "id.crt", folder / "id.key")
        return self.ids[label]

    @property
    def ca_file(self) -> Path:
        return self.ca.directory / "ca.crt"


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """A CA for plant-1 with a broker certificate for 127.0.0.1, two controller replicas and
    devices cam-a, cam-b, cam-c; plus impostors that the broker must refuse."""
    ca = FleetCA.init(tmp_path / "ca", fleet=FLEET)
    made = Fleet(tmp_path, ca, tmp_path / "broker")
    write_credentials(
        made.broker_dir,
        ca.issue_server(["127.0.0.1", "localhost"]),
        stem="server",
        ca_certificate=ca.certificate_pem(),
    )
    made.save("controller", ca.issue_controller("main"))
    made.save("replica", ca.issue_controller("replica-2"))
    for device in ("cam-a", "cam-b", "cam-c"):
        made.save(device, ca.issue_device(device))
    # Another fleet's CA issuing the very same device id: the classic impersonation.
    other = FleetCA.init(tmp_path / "other-ca", fleet=FLEET)
    made.save("foreign-cam-a", other.issue_device("cam-a"), other.certificate_pem())
    # A certificate of this CA that has expired.
    ten_days_ago = datetime.now(timezone.utc) - timedelta(days=10)
    made.save("expired-cam-d", ca.issue_device("cam-d", days=1, now=ten_days_ago))
    # The broker's own certificate offered as a client certificate (serverAuth only).
    made.ids["server-as-client"] = Identity(
        made.broker_dir / "server.crt", made.broker_dir / "server.key"
    )
    return made


class SecureBroker:
    """mosquitto running the configuration ``write_broker_config`` produced."""

    def __init__(self, fleet: Fleet, workdir: Path, binary: str) -> None:
        self.fleet = fleet
        self.port = free_port()
        self.controller_port = free_port()
        data = workdir / "data"
        data.mkdir(parents=True)
        write_broker_config(
            fleet.ca,
            fleet.broker_dir,
            port=self.port,
            bind="127.0.0.1",
            data_dir=data,
            controller_port=self.controller_port,
        )
        self.broker = Broker(workdir / "run", binary=binary, port=self.port)
        extra = [
            f"log_dest file {self.broker.log_path}",
            "log_type all",
            "connection_messages true",
        ]
        if os.geteuid() == 0:  # as root mosquitto would switch to a user that cannot read tmp
            extra.append("user root")
        generated = (fleet.broker_dir / CONF_FILE).read_text()
        self.broker.config_path.write_text(generated + "\n".join(extra) + "\n")
        self.broker.start()
        self.peers: list[Peer] = []

    def peer(self, identity: str | None, **options: Any) -> Peer:
        made = Peer(
            self,
            None if identity is None else self.fleet.ids[identity],
            client_id=options.pop("client_id", f"{identity}-{len(self.peers)}"),
            **options,
        )
        self.peers.append(made)
        return made

    def connected(self, identity: str, **options: Any) -> Peer:
        made = self.peer(identity, **options)
        assert made.connect(), f"{identity} could not connect: {made.error}\n{self.log()}"
        return made

    def reload(self) -> None:
        """SIGHUP, as ``systemctl reload mosquitto`` sends it; returns once it was handled."""
        before = self.log().count("Reloading config")
        assert self.broker.pid is not None
        os.kill(self.broker.pid, signal.SIGHUP)
        wait_for(lambda: self.log().count("Reloading config") > before, what="the reload")

    def log(self) -> str:
        return self.broker.log()[-4000:]

    def close(self) -> None:
        for made in self.peers:
            made.close()
        self.broker.kill()


@pytest.fixture
def secure(fleet: Fleet, tmp_path: Path, mosquitto_bin: str) -> Iterator[SecureBroker]:
    running = SecureBroker(fleet, tmp_path / "mosquitto", mosquitto_bin)
    yield running
    running.close()


class Peer:
    """One MQTT client of the fleet broker, through paho (the library the agent and the
    controller use), with blocking helpers that return what the broker answered."""

    def __init__(
        self,
        secure: SecureBroker,
        identity: Identity | None,
        *,
        client_id: str,
        version: int = 5,
        tls: bool = True,
        port: int | None = None,
    ) -> None:
        self.secure = secure
        self.port = port or secure.port
        self.version = version
        self.error: str | None = None
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes, bool]] = []
        self._acks: dict[int, Any] = {}
        self._connack: ReasonCode | None = None
        self._ended = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if version == 5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        if tls:
            context = ssl.create_default_context(cafile=str(secure.fleet.ca_file))
            if identity is not None:
                context.load_cert_chain(str(identity.cert), str(identity.key))
            self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # paho callbacks (its network thread)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason
        if reason.is_failure:
            self.error = f"CONNACK {reason}"
            self._ended.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.error = self.error or f"disconnected: {reason}"
        self._ended.set()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            self._messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self._lock:
            self._acks[mid] = list(codes)

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        with self._lock:
            self._acks[mid] = code

    # blocking helpers
    def connect(self, timeout: float = WAIT_S) -> bool:
        """True once the broker's CONNACK accepted us; False if it refused the TLS handshake
        or the CONNECT (``error`` says how)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ended.is_set():
                return False
            if self._connack is not None and not self._connack.is_failure:
                return True
            time.sleep(0.01)
        self.error = self.error or "no CONNACK"
        return False

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def _ack(self, mid: int, what: str) -> Any:
        return wait_for(
            lambda: self._acks.get(mid) if mid in self._acks else None,
            timeout=WAIT_S,
            what=f"{what} acknowledgement\n{self.secure.log()}",
        )

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        codes: list[ReasonCode] = self._ack(mid, "SUBACK")
        return codes

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (always 0 on MQTT 3.1.1,
        which has none: there the broker drops a refused message silently)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        code = self._ack(info.mid, "PUBACK")
        return int(code.value) if isinstance(code, ReasonCode) else int(code)

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p, _ in self._messages]

    def wait_message(self, topic: str, payload: bytes) -> None:
        wait_for(
            lambda: (topic, payload) in self.messages(),
            timeout=WAIT_S,
            what=f"{payload!r} on {topic}; got {self.messages()}\n{self.secure.log()}",
        )

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def topics(device: str, fleet: str = FLEET) -> Topics:
    return Topics(fleet, device)


# --- the generated files --------------------------------------------------------------------


def test_acl_confines_devices_by_pattern_and_names_each_controller() -> None:
    text = render_acl(FLEET, controllers=["controller:main"], denied=["cam-x"])
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write edgekit/v1/plant-1/%u/status",
        "pattern write edgekit/v1/plant-1/%u/telemetry",
        "pattern write edgekit/v1/plant-1/%u/events",
        "pattern write edgekit/v1/plant-1/%u/reported",
        "pattern read edgekit/v1/plant-1/%u/desired",
        "pattern read edgekit/v1/plant-1/%u/cmd",
        "user controller:main",
        "topic readwrite edgekit/v1/plant-1/#",
        "topic readwrite edgekit/controller/#",
        "user cam-x",
        "topic deny #",
    ]


def test_conf_requires_certificates_and_uses_the_cn_as_identity(tmp_path: Path) -> None:
    text = render_conf(fleet=FLEET, install_dir=Path("/etc/mosquitto/edgekit"), bind="0.0.0.0")
    assert "use_username_as_clientid false" not in text  # no controller listener unless asked
    with pytest.raises(PkiError, match="differ"):
        render_conf(fleet=FLEET, install_dir=Path("/x"), port=8883, controller_port=8883)
    lines = set(text.splitlines())
    assert {
        "allow_anonymous false",
        "listener 8883 0.0.0.0",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "crlfile /etc/mosquitto/edgekit/crl.pem",
        "acl_file /etc/mosquitto/edgekit/acl",
        "persistence true",
    } <= lines
    assert not [line for line in lines if line.startswith("password_file")]


@pytest.mark.parametrize(
    "install_dir", ["relative/dir", "/etc/mos quitto", "/etc/x\nallow_anonymous true"]
)
def test_conf_refuses_paths_mosquitto_cannot_hold(install_dir: str) -> None:
    with pytest.raises(PkiError, match="install-dir"):
        render_conf(fleet=FLEET, install_dir=Path(install_dir))


def test_broker_config_needs_a_server_certificate_of_this_ca(fleet: Fleet, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PkiError, match="ca server-cert"):
        write_broker_config(fleet.ca, empty)
    other = FleetCA.init(tmp_path / "ca-2", fleet=FLEET)
    write_credentials(empty, other.issue_server(["127.0.0.1"]), stem="server", ca_certificate=b"x")
    with pytest.raises(PkiError, match="not issued by the CA"):
        write_broker_config(fleet.ca, empty)
    assert sorted(p.name for p in empty.iterdir()) == ["ca.crt", "server.crt", "server.key"]


def test_broker_config_needs_a_controller(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca", fleet=FLEET)
    write_credentials(
        tmp_path / "b", ca.issue_server(["127.0.0.1"]), stem="server", ca_certificate=b"x"
    )
    with pytest.raises(PkiError, match="controller-cert"):
        write_broker_config(ca, tmp_path / "b")


# --- against mosquitto ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [5, 3], ids=["mqtt5", "mqtt311"])
def test_device_cannot_publish_on_another_devices_topics(
    secure: SecureBroker, version: int
) -> None:
    controller = secure.connected("controller")
    controller.subscribe(f"edgekit/v1/{FLEET}/#")
    victim = secure.connected("cam-b")
    victim.subscribe(topics("cam-b").desired, topics("cam-b").cmd)
    attacker = secure.connected("cam-a", version=version)

    forged = []
    for kind in MessageKind:
        payload = f"forged {kind.value} from cam-a".encode()
        code = attacker.publish(topics("cam-b").for_kind(kind), payload)
        # MQTT 5 says so in the PUBACK; MQTT 3.1.1 cannot, and the broker drops it silently.
        assert code == (NOT_AUTHORIZED if version == 5 else 0), kind
        forged.append(payload)
    # Its own id in another fleet is not its topic either.
    code = attacker.publish(topics("cam-a", "plant-2").telemetry, b"forged other fleet")
    assert code == (NOT_AUTHORIZED if version == 5 else 0)
    forged.append(b"forged other fleet")

    # Markers sent after the forgeries were acknowledged: once they arrive, so would have the
    # forgeries.
    assert attacker.publish(topics("cam-a").telemetry, b"marker from cam-a") == 0
    controller.wait_message(topics("cam-a").telemetry, b"marker from cam-a")
    assert controller.publish(topics("cam-b").cmd, b"marker for cam-b") == 0
    victim.wait_message(topics("cam-b").cmd, b"marker for cam-b")
    seen = {payload for _, payload in controller.messages() + victim.messages()}
    assert not seen & set(forged), secure.log()
    assert "Denied PUBLISH from cam-a" in secure.log()


def test_device_cannot_read_another_devices_desired_commands_or_reports(
    secure: SecureBroker,
) -> None:
    controller = secure.connected("controller")
    controller.subscribe(f"edgekit/v1/{FLEET}/#")
    assert controller.publish(topics("cam-b").desired, b"desired for cam-b", retain=True) == 0
    assert controller.publish(topics("cam-a").desired, b"desired for cam-a", retain=True) == 0

    snoop = secure.connected("cam-a")
    # However it asks: the topic itself, a wildcard over devices, everything.
    snoop.subscribe(
        topics("cam-b").desired,
        f"edgekit/v1/{FLEET}/+/desired",
        f"edgekit/v1/{FLEET}/+/telemetry",
        f"edgekit/v1/{FLEET}/#",
        "#",
    )
    # Retained messages are delivered right after the SUBACK: its own arrives, cam-b's not.
    snoop.wait_message(topics("cam-a").desired, b"desired for cam-a")

    owner = secure.connected("cam-b")
    owner.subscribe(topics("cam-b").desired, topics("cam-b").cmd)
    owner.wait_message(topics("cam-b").desired, b"desired for cam-b")  # it is there
    assert owner.publish(topics("cam-b").telemetry, b"cam-b telemetry") == 0
    controller.wait_message(topics("cam-b").telemetry, b"cam-b telemetry")
    assert controller.publish(topics("cam-b").cmd, b"command for cam-b") == 0
    owner.wait_message(topics("cam-b").cmd, b"command for cam-b")
    assert controller.publish(topics("cam-a").cmd, b"command for cam-a") == 0
    snoop.wait_message(topics("cam-a").cmd, b"command for cam-a")  # sent last

    assert [t for t, _ in snoop.messages() if "/cam-b/" in t] == [], secure.log()
    # Not even its own reports come back: devices read only desired and cmd.
    assert {t.rsplit("/", 1)[1] for t, _ in snoop.messages()} == {"desired", "cmd"}


@pytest.mark.parametrize(
    ("identity", "tls"),
    [
        (None, True),  # TLS without a client certificate
        ("foreign-cam-a", True),  # a provisioned device's name, signed by another CA
        ("expired-cam-d", True),  # this CA's, but expired
        ("server-as-client", True),  # the broker's certificate: serverAuth only
        (None, False),  # no TLS at all
    ],
    ids=["no-certificate", "another-ca", "expired", "server-certificate", "plain-tcp"],
)
def test_unprovisioned_client_cannot_connect(
    secure: SecureBroker, identity: str | None, tls: bool
) -> None:
    assert secure.connected("cam-a")  # the listener works for a provisioned device
    sessions = secure.log().count("New client connected")
    intruder = secure.peer(identity, tls=tls)
    assert not intruder.connect(), secure.log()
    assert secure.log().count("New client connected") == sessions  # no MQTT session at all


def test_revoked_certificate_is_refused_after_the_broker_reloads(secure: SecureBroker) -> None:
    controller = secure.connected("controller")
    controller.subscribe(f"edgekit/v1/{FLEET}/#")
    still_open = secure.connected("cam-c")
    still_open.subscribe(topics("cam-c").cmd)

    revoked = secure.fleet.ca.revoke(device="cam-c", reason=RevocationReason.KEY_COMPROMISE)
    assert [r.name for r in revoked] == ["cam-c"]
    update_revocations(secure.fleet.ca, secure.fleet.broker_dir)  # crl.pem and acl
    secure.reload()

    wait_for(
        lambda: not secure.peer("cam-c").connect(timeout=5),
        what=f"the revoked certificate to be refused\n{secure.log()}",
    )
    assert secure.connected("cam-a")  # the others are not affected
    # The connection cam-c had open before the reload keeps its socket, but no topic: the
    # ACL's deny for a revoked device took effect at the same reload.
    assert still_open.connected
    assert still_open.publish(topics("cam-c").telemetry, b"after revocation") == NOT_AUTHORIZED
    assert controller.publish(topics("cam-c").cmd, b"command after revocation") == 0
    assert controller.publish(topics("cam-a").cmd, b"later marker") == 0
    controller.wait_message(topics("cam-a").cmd, b"later marker")
    # Both were sent in order on one connection; give the second client's socket the moment
    # by which it could trail the first's.
    time.sleep(0.2)
    assert still_open.messages() == []


def test_a_revoked_device_id_provisioned_again_gets_its_topics_back(secure: SecureBroker) -> None:
    fleet = secure.fleet
    fleet.ca.revoke(device="cam-c")
    update_revocations(fleet.ca, fleet.broker_dir)
    secure.reload()
    fleet.save("cam-c-new", fleet.ca.issue_device("cam-c"))  # no --force: nothing in force
    update_revocations(fleet.ca, fleet.broker_dir)
    secure.reload()
    controller = secure.connected("controller")
    controller.subscribe(f"edgekit/v1/{FLEET}/cam-c/#")
    device = secure.connected("cam-c-new")
    device.subscribe(topics("cam-c").cmd)
    assert device.publish(topics("cam-c").telemetry, b"back") == 0
    controller.wait_message(topics("cam-c").telemetry, b"back")
    assert controller.publish(topics("cam-c").cmd, b"welcome back") == 0
    device.wait_message(topics("cam-c").cmd, b"welcome back")
    assert not secure.peer("cam-c").connect(timeout=5)  # the revoked key stays out


def test_reprovisioned_device_displaces_the_old_certificates_connection(
    secure: SecureBroker,
) -> None:
    fleet = secure.fleet
    old = secure.connected("cam-b")
    fleet.save("cam-b-new", fleet.ca.issue_device("cam-b", force=True))
    update_revocations(fleet.ca, fleet.broker_dir)
    secure.reload()
    wait_for(
        lambda: not secure.peer("cam-b").connect(timeout=5), what="the old certificate refused"
    )
    new = secure.connected("cam-b-new")
    # Same CN, so the same client id: the broker closes the old certificate's connection.
    wait_for(lambda: not old.connected, what="the old connection to be closed")
    new.subscribe(topics("cam-b").cmd)
    controller = secure.connected("controller")
    assert controller.publish(topics("cam-b").cmd, b"to the new key") == 0
    new.wait_message(topics("cam-b").cmd, b"to the new key")


def test_device_cannot_take_over_another_devices_session(secure: SecureBroker) -> None:
    agent_client_id = f"edgekit-{FLEET}-cam-b"  # what edgekit-agent connects as
    victim = secure.connected("cam-b", client_id=agent_client_id)
    victim.subscribe(topics("cam-b").cmd)
    # The attacker asks for the victim's client id (and with it, its session).
    attacker = secure.connected("cam-a", client_id=agent_client_id)
    controller = secure.connected("controller")
    assert controller.publish(topics("cam-b").cmd, b"for cam-b only") == 0
    victim.wait_message(topics("cam-b").cmd, b"for cam-b only")
    assert victim.connected and attacker.connected
    assert attacker.messages() == []


def test_controllers_read_and_write_every_device_of_their_fleet(secure: SecureBroker) -> None:
    main = secure.connected("controller")
    replica = secure.connected("replica")  # a second identity: connected at the same time
    main.subscribe(f"edgekit/v1/{FLEET}/+/status", f"edgekit/v1/{FLEET}/+/telemetry")
    # Replicas share the ingest through MQTT 5 shared subscriptions.
    replica.subscribe(f"$share/ingest/edgekit/v1/{FLEET}/+/telemetry")
    devices = {d: secure.connected(d) for d in ("cam-a", "cam-b")}
    for name, device in devices.items():
        device.subscribe(topics(name).desired, topics(name).cmd)
        assert device.publish(topics(name).status, f"{name} online".encode(), retain=True) == 0
        assert device.publish(topics(name).telemetry, f"{name} telemetry".encode()) == 0
    for name, device in devices.items():
        main.wait_message(topics(name).status, f"{name} online".encode())
        main.wait_message(topics(name).telemetry, f"{name} telemetry".encode())
        replica.wait_message(topics(name).telemetry, f"{name} telemetry".encode())
        assert main.publish(topics(name).desired, f"desired {name}".encode(), retain=True) == 0
        assert replica.publish(topics(name).cmd, f"cmd {name}".encode()) == 0
        device.wait_message(topics(name).desired, f"desired {name}".encode())
        device.wait_message(topics(name).cmd, f"cmd {name}".encode())
    assert main.connected and replica.connected
    # Its fleet only.
    assert main.publish(topics("cam-a", "plant-2").desired, b"other fleet") == NOT_AUTHORIZED


# --- a real agent -----------------------------------------------------------------------------


def _events(observer: Peer, device: str) -> list[Event]:
    found = []
    for topic, payload in observer.messages():
        if topic == topics(device).events:
            _, message = decode(topic, payload)
            assert isinstance(message, Event)
            found.append(message)
    return found


def _statuses(observer: Peer, device: str) -> list[str]:
    states = []
    for topic, payload in observer.messages():
        if topic == topics(device).status and payload:
            _, message = decode(topic, payload)
            assert isinstance(message, Status)
            states.append(message.state.value)
    return states


def test_provisioned_agent_reports_over_tls_and_takes_commands(
    secure: SecureBroker, tmp_path: Path, trust_file: Path
) -> None:
    device = "cam-7"
    out = tmp_path / "provisioned"
    provision_device(
        secure.fleet.ca,
        device,
        broker=BrokerEndpoint.parse(f"mqtts://127.0.0.1:{secure.port}"),
        trust_file=trust_file,
        output=out,
    )
    # The provisioned file as written; only the local HTTP API is turned off, so that this
    # test does not need the agent's default port to be free.
    config = out / "agent.toml"
    config.write_text(config.read_text() + "\n[http]\nenabled = false\n")
    observer = secure.connected("controller")
    observer.subscribe(f"edgekit/v1/{FLEET}/{device}/#")

    log = tmp_path / "agent.log"
    with open(log, "wb") as sink:
        agent = subprocess.Popen(
            [
                *(sys.executable, "-m", "device_agent", "run"),
                *("--config", str(config), "--state-dir", str(tmp_path / "state")),
            ],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def output() -> str:
        return log.read_text(errors="replace")[-3000:]

    try:
        wait_for(
            lambda: "online" in _statuses(observer, device),
            timeout=60,
            what=f"the agent's status over TLS\n{output()}\n{secure.log()}",
        )
        assert f"u'{device}')" in secure.broker.log()  # its identity: the certificate's CN
        # Downlink: a command reaches it through the ACL and it answers on its events topic.
        command = Command(device=device, seq=1, command="rollback")
        assert observer.publish(topics(device).cmd, command.to_json()) == 0
        answers = wait_for(
            lambda: [e for e in _events(observer, device) if e.ref == command.msg_id],
            timeout=30,
            what=f"the agent's answer to the command\n{output()}",
        )
        assert answers[0].event.startswith("command.")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, output()
        wait_for(lambda: _statuses(observer, device)[-1:] == ["offline"], what="offline")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)


def test_controller_listener_lets_one_identity_hold_several_connections(
    secure: SecureBroker,
) -> None:
    """Replicas open a second connection (retained state) and take over a dead replica's
    session by its client id: possible on the controller's listener only."""
    first = secure.connected("controller", client_id="ctl-a", port=secure.controller_port)
    second = secure.connected("controller", client_id="ctl-b", port=secure.controller_port)
    first.subscribe(f"edgekit/v1/{FLEET}/+/telemetry")
    second.subscribe("edgekit/controller/#")
    assert second.publish("edgekit/controller/marker-1", b"to myself") == 0
    second.wait_message("edgekit/controller/marker-1", b"to myself")
    device = secure.connected("cam-a")
    assert device.publish(topics("cam-a").telemetry, b"seen by ctl-a") == 0
    first.wait_message(topics("cam-a").telemetry, b"seen by ctl-a")
    assert first.connected and second.connected
    # On the devices' listener the same two connections would be one client id: the second
    # closes the first.
    pinned = secure.connected("controller", client_id="ctl-c")
    secure.connected("controller", client_id="ctl-d")
    wait_for(lambda: not pinned.connected, what="the pinned client id to be taken over")
    # The ACL is the same on both listeners: a device there still has only its own topics.
    stray = secure.connected("cam-a", port=secure.controller_port)
    assert stray.publish(topics("cam-b").telemetry, b"forged") == NOT_AUTHORIZED
    assert stray.publish("edgekit/controller/marker-1", b"forged") == NOT_AUTHORIZED


def test_controller_process_ingests_through_the_secured_broker(
    secure: SecureBroker, tmp_path: Path
) -> None:
    """``edgekit fleet serve`` with its controller certificate on the controller listener: a
    device's status, published under the device's own certificate, reaches the registry."""
    from edgekit.launcher import ControllerProcess

    identity = secure.fleet.ids["controller"]
    controller = ControllerProcess(
        tmp_path / "controller",
        broker=f"mqtts://127.0.0.1:{secure.controller_port}",
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        token="t" * 32,
        extra=[
            *("--ca-file", str(secure.fleet.ca_file)),
            *("--cert-file", str(identity.cert), "--key-file", str(identity.key)),
        ],
    )
    try:
        controller.start(timeout=60)
        device = secure.connected("cam-a")
        status = Status(device="cam-a", state=StatusState.ONLINE, agent_version="0.4.0")
        assert device.publish(topics("cam-a").status, status.to_json(), retain=True) == 0
        found = wait_for(
            lambda: [d for d in controller.client.devices() if d.get("device") == "cam-a"],
            timeout=30,
            what=f"cam-a in the registry\n{controller.log_tail()}\n{secure.log()}",
        )
        assert found[0]["online"] is True
    finally:
        controller.stop()


def test_controller_refuses_half_a_client_certificate(tmp_path: Path) -> None:
    from edgekit.fleet.errors import SpecError
    from edgekit.fleet.mqtt import BrokerAddress

    address = BrokerAddress.parse("mqtts://127.0.0.1:8883")
    with pytest.raises(SpecError, match="both"):
        address.with_client_cert(str(tmp_path / "c.crt"), None)
    with pytest.raises(SpecError, match="mqtts"):
        BrokerAddress.parse("mqtt://127.0.0.1").with_client_cert("c.crt", "c.key")
    assert address.with_client_cert(None, None) is address
