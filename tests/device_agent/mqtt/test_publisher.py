"""Producing messages without a connection: the publisher and the telemetry loop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_agent.metrics import Metrics
from device_agent.mqtt_link import (
    LinkConfig,
    LinkError,
    MqttLink,
    Publisher,
    TelemetryLoop,
    TlsConfig,
    build_telemetry,
)
from device_agent.outbox import Outbox
from device_agent.sysinfo import SystemSample
from edgekit.protocol import Desired, Event, ProtocolError, Reported, Telemetry, Topics

TOPICS = Topics("plant-1", "cam-7")


@pytest.fixture
def outbox(tmp_path: Path):
    with Outbox(tmp_path / "o.db") as box:
        yield box


def test_publisher_stamps_seq_and_routes_by_kind(outbox: Outbox) -> None:
    publisher = Publisher(outbox, TOPICS)
    original = Telemetry(device="cam-7")
    stamped = publisher.publish(original)
    assert stamped is not None and stamped.seq == 1 and stamped.msg_id == original.msg_id
    event = publisher.event("update.trial", message="line one\n  line two", data={"n": 1})
    assert event is not None and event.seq == 2 and event.message == "line one line two"
    publisher.publish(Reported(device="cam-7"))
    records = outbox.pending()
    assert [r.topic for r in records] == [TOPICS.telemetry, TOPICS.events, TOPICS.reported]
    assert [r.retain for r in records] == [False, False, True]
    assert Event.from_json(records[1].payload) == event
    with pytest.raises(ProtocolError, match="is for device"):
        publisher.publish(Telemetry(device="cam-8"))
    desired = Desired(
        device="cam-7",
        bundle="b",
        version=1,
        url="https://h/b",
        sha256="a" * 64,
        size=1,
        rollout_id="r",
    )
    with pytest.raises(ProtocolError, match="do not publish desired"):
        publisher.publish(desired)


def test_build_telemetry_from_metrics_and_sample() -> None:
    metrics = Metrics()
    metrics.observe(0.002)
    metrics.reject()
    message = build_telemetry(
        "cam-7",
        metrics=metrics.snapshot(),
        interval_s=10,
        system=SystemSample(cpu_percent=5.0, disk_free_bytes=1),
        slots={"a": "committed"},
        active_slot="a",
    )
    assert message.inference.count == 1 and message.inference.rejected == 1
    assert message.inference.p50_ms is not None
    assert message.system.cpu_percent == 5.0 and message.system.disk_free_bytes == 1
    assert Telemetry.from_json(message.to_json()) == message


def test_telemetry_loop_runs_at_a_fixed_rate_and_survives_failures(outbox: Outbox) -> None:
    publisher = Publisher(outbox, TOPICS)
    calls = {"n": 0}

    def build() -> Telemetry:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("sensor read failed")
        return Telemetry(device="cam-7", interval_s=0.05)

    loop = TelemetryLoop(publisher, build, interval_s=0.05)
    loop.start()
    time.sleep(0.5)
    loop.stop()
    assert loop.failures == 1
    assert 5 <= loop.produced <= 12
    events = [Event.from_json(r.payload) for r in outbox.pending(100) if r.kind == "events"]
    assert [e.event for e in events] == ["error"]
    assert "sensor read failed" in events[0].message
    with pytest.raises(ValueError):
        TelemetryLoop(publisher, build, interval_s=0)


def test_configuration_errors_are_typed(outbox: Outbox, tmp_path: Path) -> None:
    with pytest.raises(LinkError, match="device id"):
        MqttLink(LinkConfig(host="h", fleet="f", device="a/b"), outbox)
    with pytest.raises(LinkError, match="tls"):
        MqttLink(
            LinkConfig(
                host="h", fleet="f", device="d", tls=TlsConfig(ca_file=tmp_path / "missing.pem")
            ),
            outbox,
        )
    assert "secret" not in repr(LinkConfig(host="h", fleet="f", device="d", password="secret"))
    assert "secret" not in repr(TlsConfig(key_password="secret"))
