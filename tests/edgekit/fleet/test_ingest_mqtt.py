"""Ingest through a real broker: simulated devices and hand-made malformed messages, with the
controller running as its own process."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgekit.fleet.client import FleetClient
from edgekit.protocol import Event, Topics

pytestmark = pytest.mark.slow


def publisher(broker) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="test-publisher",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def test_every_topic_from_simulated_devices_lands_in_the_registry(
    db_url, start_controller, simulate, broker, kit
):
    sim = simulate(devices=3, tags={"site": "north"})
    controller = start_controller(db_url)
    client: FleetClient = controller.client
    kit.wait_devices(client, 3)
    # events: one from a device (as an agent sends them)
    sender = publisher(broker)
    try:
        event = Event(device="sim-0001", event="error", message="camera unplugged", reason="io")
        publish(sender, Topics(kit.FLEET, "sim-0001").events, event.to_json())
    finally:
        sender.loop_stop()
        sender.disconnect()
    sim.go_offline("sim-0002")

    def registered() -> dict | None:
        devices = {d["device"]: d for d in client.devices(fleet=kit.FLEET)}
        detail = client.device(kit.FLEET, "sim-0001")
        ok = (
            not devices["sim-0002"]["online"]
            and devices["sim-0002"]["status_reason"] == "connection-lost"
            and detail["events"]
            and detail["history"]
            and all(d["telemetry"] for d in devices.values())
        )
        return devices if ok else None

    devices = kit.wait_for(registered, what="status, telemetry, events and reported to land")
    first = devices["sim-0000"]
    assert first["online"] and first["agent_version"].startswith("sim-")
    assert first["groups"] == ["cameras"] and first["tags"] == {"site": "north"}
    assert first["current"]["name"] == "tiny" and first["current"]["version"] == 1  # reported
    assert first["telemetry"]["p95_ms"] > 0 and first["telemetry"]["self_test_ok"] is None
    detail = client.device(kit.FLEET, "sim-0001")
    assert detail["events"][0]["event"] == "error"
    assert detail["events"][0]["message"] == "camera unplugged"
    stats = client.stats()["ingest"]
    assert all(stats["processed"].get(k, 0) > 0 for k in ("status", "telemetry", "reported"))
    assert stats["processed"]["events"] >= 1 and stats["malformed_total"] == 0


def test_malformed_messages_on_every_ingest_topic_are_counted(
    sqlite_url, start_controller, simulate, broker, kit
):
    simulate(devices=2)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 2)
    topics = Topics(kit.FLEET, "sim-0000")
    malformed = [
        (topics.status, b"not json at all"),
        (topics.status, b'{"kind":"status","kind":"status"}'),  # duplicate keys
        (topics.telemetry, b'{"schema":1,"kind":"telemetry"}'),  # fields missing
        (topics.telemetry, b"{" + b" " * (70 * 1024) + b"}"),  # over the 64 KiB limit
        (topics.events, Event(device="sim-0001", event="error").to_json()),  # someone else's
        (topics.events, b"\xff\xfe\x00garbage"),
        (topics.reported, b'{"schema":1,"kind":"reported","device":"sim-0000","seq":NaN}'),
        (topics.reported, b"[]"),
        ("edgekit/v1/plant-1/no such device!/telemetry", b"{}"),
    ]
    sender = publisher(broker)
    try:
        for topic, payload in malformed:
            publish(sender, topic, payload)
    finally:
        sender.loop_stop()
        sender.disconnect()
    expected = {"status": 2, "telemetry": 2, "events": 2, "reported": 2, "topic": 1}

    def counted() -> dict | None:
        stats = controller.client.stats()["ingest"]
        return stats if stats["malformed"] == expected else None

    stats = kit.wait_for(counted, what=f"malformed counts {expected}")
    assert controller.alive()
    # ... and it keeps ingesting what the devices send.
    before = stats["processed"]["telemetry"]
    kit.wait_for(
        lambda: controller.client.stats()["ingest"]["processed"]["telemetry"] > before + 2,
        what="telemetry to keep arriving",
    )
    assert "malformed" in controller.log() or stats["malformed_total"] == 9
