"""The MQTT link against a real mosquitto, observed by an independent mosquitto_sub.

What a fleet operator relies on, one test each: telemetry arrives with every field; a broker
outage loses nothing (what was produced meanwhile arrives afterwards, duplicates removable by
msg_id); a killed agent is marked offline by its last will; desired state and commands reach
the agent once; garbage from the controller side is counted and reported, never fatal; TLS
client certificates and passwords work.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from support.mosquitto import Broker, Subscriber, find_client, wait_for

from device_agent.metrics import Metrics
from device_agent.mqtt_link import (
    Backoff,
    LinkState,
    MqttVersion,
    Publisher,
    TelemetryLoop,
    TlsConfig,
    build_telemetry,
    overflow_reporter,
)
from device_agent.outbox import Outbox
from device_agent.sysinfo import SystemProbe
from edgekit.protocol import (
    Command,
    Deduplicator,
    Desired,
    Drift,
    Event,
    EventType,
    Message,
    MessageKind,
    ModelRef,
    SelfTest,
    Status,
    Telemetry,
    Topics,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[3]
FLEET, DEVICE = "plant-1", "cam-7"
SHA = "ab" * 32


def status_states(subscriber: Subscriber) -> list[tuple[str, str | None]]:
    return [
        (m.state.value, m.reason)
        for _, m in subscriber.messages(MessageKind.STATUS)
        if isinstance(m, Status)
    ]


def rich_telemetry(metrics: Metrics, probe: SystemProbe) -> Callable[[], Telemetry]:
    """A telemetry builder that fills every field the agent can fill."""

    def build() -> Telemetry:
        return build_telemetry(
            DEVICE,
            metrics=metrics.snapshot(),
            interval_s=0.1,
            system=probe.sample(),
            model=ModelRef(name="tiny", version=3, sha256=SHA, display_version="1.0"),
            active_slot="a",
            slots={"a": "committed", "b": "previous"},
            drift=Drift(
                samples=100,
                input_psi={"x0": 0.01, "x1": 0.4},
                output_psi=0.02,
                output_distribution={"ok": 0.7, "fault": 0.3},
                baseline_distribution={"ok": 0.75, "fault": 0.25},
            ),
            self_test=SelfTest(ok=True, ts=time.time(), detail="4/4"),
        )

    return build


class RecordingPublisher(Publisher):
    """Remembers every message it queued (what the receivers must eventually see)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[Message] = []
        self._lock = threading.Lock()

    def publish(self, message: Any) -> Any:
        stamped = super().publish(message)
        if stamped is not None:
            with self._lock:
                self.sent.append(stamped)
        return stamped

    def ids(self) -> set[str]:
        with self._lock:
            return {m.msg_id for m in self.sent}


def test_subscriber_sees_status_telemetry_and_events_with_every_field(
    make_link, make_subscriber, tmp_path: Path
) -> None:
    subscriber = make_subscriber()
    metrics = Metrics()
    for ms in (1.0, 2.0, 3.0, 50.0):
        metrics.observe(ms / 1000.0)
    metrics.observe(0.01, ok=False)
    link = make_link()
    loop = TelemetryLoop(
        link.publisher, rich_telemetry(metrics, SystemProbe(tmp_path)), interval_s=0.1
    )
    link.start()
    loop.start()
    try:
        assert link.wait_connected(15)
        link.publisher.event(
            EventType.UPDATE_DOWNLOADING, message="downloading tiny 4", rollout_id="r-1"
        )
        wait_for(lambda: len(subscriber.messages(MessageKind.TELEMETRY)) >= 3, what="telemetry")
        wait_for(lambda: subscriber.messages(MessageKind.EVENTS), what="the event")
    finally:
        loop.stop()
    assert ("online", None) in status_states(subscriber)

    telemetry = [
        (topic, json.loads(payload))
        for topic, payload in subscriber.raw()
        if topic.endswith("/telemetry")
    ]
    topic, data = telemetry[-1]
    assert topic == f"edgekit/v1/{FLEET}/{DEVICE}/telemetry"
    template = Telemetry(device=DEVICE).to_dict()
    may_be_null_here = {"temperature_c"}  # no thermal zone in most containers

    def check(expected: dict[str, Any], actual: dict[str, Any], path: str) -> None:
        assert set(actual) == set(expected), path
        for key, value in actual.items():
            if isinstance(expected[key], dict) and expected[key] and key != "slots":
                check(expected[key], value, f"{path}.{key}")
            elif key not in may_be_null_here:
                assert value is not None, f"{path}.{key} is null"

    template["model"] = template["drift"] = template["self_test"] = {}
    check(template, data, "telemetry")
    for name, sub in (("model", ModelRef), ("drift", Drift), ("self_test", SelfTest)):
        assert set(data[name]) == {f.name for f in fields(sub) if f.name != "extra"}, name
    assert data["inference"]["count"] == 5 and data["inference"]["errors"] == 1
    assert data["inference"]["p50_ms"] > 0
    assert any(
        json.loads(p)["system"]["cpu_percent"] is not None
        for t, p in subscriber.raw()
        if t.endswith("/telemetry")
    )
    event = next(m for _, m in subscriber.messages(MessageKind.EVENTS))
    assert isinstance(event, Event)
    assert event.event == "update.downloading" and event.rollout_id == "r-1"
    seqs = [m.seq for _, m in subscriber.messages() if m.KIND is not MessageKind.STATUS]
    assert len(seqs) == len(set(seqs))


def test_broker_outage_loses_nothing(broker: Broker, make_link, make_subscriber, topics) -> None:
    """Stop the broker while the agent keeps producing, restart it on the same port: all that
    was produced arrives; after deduplication by msg_id, exactly once."""
    subscriber = make_subscriber(client_id="observer")  # persistent: queued across restart
    link = make_link()
    publisher = RecordingPublisher(link.outbox, topics)
    metrics = Metrics()
    loop = TelemetryLoop(
        publisher,
        lambda: build_telemetry(DEVICE, metrics=metrics.snapshot(), interval_s=0.05),
        interval_s=0.05,
    )
    link.start()
    loop.start()
    try:
        assert link.wait_connected(15)
        wait_for(lambda: len(subscriber.messages(MessageKind.TELEMETRY)) >= 5, what="telemetry")

        broker.stop()
        wait_for(lambda: not link.connected, what="the link to notice the outage")
        before = publisher.ids()
        for i in range(5):
            metrics.observe(0.001)
            publisher.event(EventType.ERROR, severity="error", message=f"during outage {i}")
            time.sleep(0.1)
        wait_for(lambda: link.outbox.stats().rows >= 10, what="records queued offline")
        during = publisher.ids() - before
        assert len(during) >= 10
        assert link.state is not LinkState.CONNECTED

        broker.start()
        assert link.wait_connected(15)
        time.sleep(0.3)
    finally:
        loop.stop()
    assert link.wait_idle(15)
    produced = publisher.ids()

    def received_ids() -> list[str]:
        return [
            m.msg_id
            for _, m in subscriber.messages()
            if m.KIND in (MessageKind.TELEMETRY, MessageKind.EVENTS)
        ]

    wait_for(lambda: produced <= set(received_ids()), what="every produced message")
    received = received_ids()
    assert set(received) == produced  # nothing lost, nothing invented
    assert during <= set(received)
    dedup = Deduplicator()
    unique = [
        m
        for _, m in subscriber.messages()
        if m.KIND in (MessageKind.TELEMETRY, MessageKind.EVENTS) and dedup.accept(m)
    ]
    assert len(unique) == len(produced)  # exactly once after dedup
    assert dedup.duplicates == len(received) - len(produced)
    outage_events = [m for m in unique if isinstance(m, Event) and "outage" in m.message]
    assert len(outage_events) == 5
    counters = link.counters()
    assert counters.disconnects >= 1 and counters.connects >= 2
    assert link.outbox.stats().rows == 0


CHILD = """
import sys, time
from device_agent.outbox import Outbox
from device_agent.mqtt_link import LinkConfig, MqttLink
outbox = Outbox(sys.argv[1])
link = MqttLink(
    LinkConfig(host="127.0.0.1", port=int(sys.argv[2]), fleet="plant-1", device=sys.argv[3],
               keepalive_s=5, backoff_initial_s=0.05, backoff_max_s=0.2),
    outbox,
)
link.start()
print("connected" if link.wait_connected(15) else "timeout", flush=True)
if sys.argv[4] == "stop":
    link.stop()
    print("stopped", flush=True)
time.sleep(60)
"""


def _run_child(tmp_path: Path, broker: Broker, device: str, mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / f"{device}.db"),
            str(broker.port),
            device,
            mode,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == "connected", child.stderr.read() if child.stderr else ""
    return child


def test_last_will_marks_the_device_offline_when_the_agent_is_killed(
    tmp_path: Path, broker: Broker, make_subscriber
) -> None:
    subscriber = make_subscriber(topic=Topics(FLEET, "victim").status)
    child = _run_child(tmp_path, broker, "victim", "run")
    try:
        wait_for(lambda: ("online", None) in status_states(subscriber), what="online status")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    wait_for(
        lambda: ("offline", "connection-lost") in status_states(subscriber), what="the last will"
    )
    # Retained: a controller that connects later still sees the device offline.
    late = make_subscriber(topic=Topics(FLEET, "victim").status)
    wait_for(lambda: status_states(late), what="the retained status")
    assert status_states(late)[-1] == ("offline", "connection-lost")


def test_clean_stop_reports_shutdown_and_no_will(
    tmp_path: Path, broker: Broker, make_subscriber
) -> None:
    subscriber = make_subscriber(topic=Topics(FLEET, "quitter").status)
    child = _run_child(tmp_path, broker, "quitter", "stop")
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "stopped"
        wait_for(
            lambda: ("offline", "shutdown") in status_states(subscriber), what="offline/shutdown"
        )
        child.kill()  # the connection is already closed: no will now
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    time.sleep(0.3)
    assert ("offline", "connection-lost") not in status_states(subscriber)


@pytest.mark.parametrize("version", [MqttVersion.V5, MqttVersion.V311])
def test_a_stop_the_broker_does_not_acknowledge_leaves_the_device_offline(
    broker: Broker, make_link, make_subscriber, topics: Topics, version: MqttVersion
) -> None:
    """The broker hangs (SIGSTOP) while the agent stops: the offline status gets no PUBACK,
    so the link leaves in a way that fires the will. Never a stale retained "online"."""
    link = make_link(version=version, stop_timeout_s=0.3)
    link.start()
    assert link.wait_connected(15)
    subscriber = make_subscriber(topic=topics.status)
    wait_for(lambda: ("online", None) in status_states(subscriber), what="online status")
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        link.stop(timeout=10)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    wait_for(lambda: status_states(subscriber)[-1][0] == "offline", what="offline status")
    late = make_subscriber(topic=topics.status)
    wait_for(lambda: status_states(late), what="the retained status")
    assert status_states(late)[-1][0] == "offline"


def test_desired_and_commands_reach_the_callbacks_once(
    make_link, mosquitto_pub, topics: Topics
) -> None:
    desired: list[Desired] = []
    commands: list[Command] = []
    link = make_link(on_desired=desired.append, on_command=commands.append)
    link.start()
    assert link.wait_subscribed(15)
    want = Desired(
        device=DEVICE,
        seq=1,
        bundle="tiny",
        version=4,
        url="https://updates.example.com/tiny-4.ekb",
        sha256=SHA,
        size=4096,
        rollout_id="r-7",
    )
    mosquitto_pub(topics.desired, want.to_json(), retain=True)
    command = Command(device=DEVICE, seq=2, command="restart")
    mosquitto_pub(topics.cmd, command.to_json())
    mosquitto_pub(topics.cmd, command.to_json())  # a redelivery: same msg_id
    wait_for(lambda: desired and commands, what="both callbacks")
    wait_for(lambda: link.counters().duplicates >= 1, what="the duplicate")
    assert desired == [want] and commands == [command]
    # Answering the command goes out on events with ref = the command's msg_id.
    ack = link.publisher.ack_command(command, EventType.COMMAND_COMPLETED)
    assert ack is not None and ack.ref == command.msg_id
    assert link.wait_idle(10)


def test_invalid_desired_is_counted_reported_and_survived(
    make_link, make_subscriber, mosquitto_pub, topics: Topics
) -> None:
    subscriber = make_subscriber(topic=topics.events)
    desired: list[Desired] = []
    link = make_link(on_desired=desired.append)
    link.start()
    assert link.wait_subscribed(15)
    mosquitto_pub(topics.desired, b'{"schema": 1, "kind": "desired", "version": "eight"}')
    wait_for(lambda: link.counters().invalid_messages == 1, what="the invalid message count")
    wait_for(lambda: subscriber.messages(MessageKind.EVENTS), what="the invalid-message event")
    _, event = subscriber.messages(MessageKind.EVENTS)[0]
    assert isinstance(event, Event)
    assert event.event == EventType.INVALID_MESSAGE.value
    assert event.data["topic"] == topics.desired and event.reason == "protocol"
    # Another device's payload on our topic is refused too; the link keeps going.
    other = Desired(
        device="someone-else",
        bundle="tiny",
        version=5,
        url="https://h/t.ekb",
        sha256=SHA,
        size=1,
        rollout_id="r-8",
    )
    mosquitto_pub(topics.desired, other.to_json())
    wait_for(lambda: link.counters().invalid_messages == 2)
    good = Desired(
        device=DEVICE,
        bundle="tiny",
        version=5,
        url="https://h/t.ekb",
        sha256=SHA,
        size=1,
        rollout_id="r-8",
    )
    mosquitto_pub(topics.desired, good.to_json())
    wait_for(lambda: desired == [good], what="the valid desired after the invalid ones")
    mosquitto_pub(topics.desired, b"", retain=True)  # cleared by the controller: not an error
    wait_for(lambda: link.counters().cleared == 1)
    assert link.connected and link.counters().invalid_messages == 2


def test_handler_errors_are_reported_and_survived(make_link, mosquitto_pub, topics) -> None:
    def broken(command: Command) -> None:
        raise RuntimeError("handler bug")

    link = make_link(on_command=broken)
    link.start()
    assert link.wait_subscribed(15)
    command = Command(device=DEVICE, command="rollback")
    mosquitto_pub(topics.cmd, command.to_json())
    wait_for(lambda: link.counters().callback_errors == 1)
    assert link.wait_idle(10)
    assert link.connected


def test_mqtt_311_with_a_persistent_session(make_link, make_subscriber) -> None:
    subscriber = make_subscriber(version="mqttv311")
    link = make_link(version=MqttVersion.V311)
    link.start()
    assert link.wait_connected(15)
    link.publisher.publish(Telemetry(device=DEVICE))
    wait_for(lambda: subscriber.messages(MessageKind.TELEMETRY), what="telemetry over 3.1.1")
    link.stop()
    again = make_link(outbox=link.outbox, version=MqttVersion.V311)
    again.start()
    assert again.wait_connected(15)
    assert again.counters().session_present  # clean_session=0: the broker kept the session


def test_records_of_a_previous_process_are_sent_after_restart(
    tmp_path: Path, make_link, make_subscriber, topics: Topics
) -> None:
    path = tmp_path / "agent.db"
    with Outbox(path, overflow=overflow_reporter(topics)) as offline:
        queued = [Publisher(offline, topics).publish(Telemetry(device=DEVICE)) for _ in range(3)]
    subscriber = make_subscriber()
    outbox = Outbox(path)
    try:
        link = make_link(outbox=outbox)
        link.start()
        wanted = {m.msg_id for m in queued if m is not None}
        wait_for(
            lambda: wanted <= {m.msg_id for _, m in subscriber.messages(MessageKind.TELEMETRY)},
            what="the backlog",
        )
        assert link.wait_idle(10)
        link.stop()
    finally:
        outbox.close()


def test_reconnects_with_backoff_until_the_broker_appears(make_broker, make_link) -> None:
    late = make_broker()  # configured, not started
    link = make_link(port=late.port, host=late.host)
    link.start()
    wait_for(lambda: link.counters().connect_failures >= 3, what="failed attempts")
    assert not link.connected
    late.start()
    assert link.wait_connected(15)


def test_backoff_grows_exponentially_with_jitter_and_resets() -> None:
    import random

    backoff = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 1.0
    exact = Backoff(0.5, 2.0, jitter=0.0)
    assert [exact.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# --- security -------------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(
        cn: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool, usage: Any = None
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    paths: dict[str, Path] = {}

    def save(label: str, cert: x509.Certificate, key: Any) -> None:
        paths[f"{label}_cert"] = directory / f"{label}.pem"
        paths[f"{label}_key"] = directory / f"{label}.key"
        paths[f"{label}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{label}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("edgekit test CA", ca_key, name("edgekit test CA"), ca_key, ca=True)
    save("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue(
        "broker", server_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    save("server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue(
        DEVICE, client_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    save("client", client, client_key)
    return paths


def test_tls_with_client_certificates(tmp_path: Path, make_broker, make_link) -> None:
    pki = _write_pki(tmp_path / "pki")
    secure = make_broker(
        listener_options=[
            f"cafile {pki['ca_cert']}",
            f"certfile {pki['server_cert']}",
            f"keyfile {pki['server_key']}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    )
    secure.start()
    tls = TlsConfig(
        ca_file=pki["ca_cert"], cert_file=pki["client_cert"], key_file=pki["client_key"]
    )
    link = make_link(port=secure.port, tls=tls)
    link.start()
    assert link.wait_connected(15), secure.log()[-2000:]
    link.publisher.publish(Telemetry(device=DEVICE))
    assert link.wait_idle(10)
    assert link.counters().published >= 1

    anonymous = make_link(port=secure.port, tls=TlsConfig(ca_file=pki["ca_cert"]))
    anonymous.start()
    wait_for(lambda: anonymous.counters().connect_failures >= 2, what="refused TLS handshakes")
    assert not anonymous.connected


def test_username_and_password(tmp_path: Path, make_broker, make_link) -> None:
    tool = find_client("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    passwords = tmp_path / "passwords"
    subprocess.run([tool, "-b", "-c", str(passwords), "device", "s3cret"], check=True, timeout=30)
    guarded = make_broker(allow_anonymous=False, options=[f"password_file {passwords}"])
    guarded.start()
    wrong = make_link(port=guarded.port, username="device", password="wrong")
    wrong.start()
    wait_for(lambda: wrong.counters().connect_failures >= 2, what="refused logins")
    assert not wrong.connected
    assert "wrong" not in repr(wrong.config)  # the password never reaches logs via repr
    right = make_link(port=guarded.port, username="device", password="s3cret")
    right.start()
    assert right.wait_connected(15)
