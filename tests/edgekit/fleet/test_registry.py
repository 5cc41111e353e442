"""Ingest into the registry and the registry's answers, on SQLite and PostgreSQL.

Messages go through :class:`edgekit.fleet.ingest.Ingest` exactly as paho hands them over
(topic, payload bytes), without a broker, so the database side is checked on both backends
in a second; ``test_ingest_mqtt.py`` does the same through mosquitto.
"""

from __future__ import annotations

import time

import pytest

from edgekit.fleet.db import Database
from edgekit.fleet.errors import NotFound, SpecError
from edgekit.fleet.ingest import Ingest
from edgekit.fleet.registry import Registry
from edgekit.fleet.spec import Selector
from edgekit.protocol import (
    Drift,
    Event,
    InferenceStats,
    ModelRef,
    Reported,
    SelfTest,
    Status,
    StatusState,
    Telemetry,
    Topics,
    UpdateOutcome,
    UpdateResult,
)

FLEET = "plant-1"
SHA = "3b" * 32


@pytest.fixture
def ingest(db_url):
    db = Database(db_url)
    db.create_all()
    ingest = Ingest(db, history_interval_s=0.0)
    ingest.start()
    yield ingest, Registry(db)
    ingest.stop()
    db.dispose()


def send(ingest: Ingest, *messages) -> None:
    for message in messages:
        topic = Topics(FLEET, message.device).for_kind(message.KIND)
        ingest.submit(topic, message.to_json(), time.time())
    assert ingest.drain(timeout=10)


def model(version: int) -> ModelRef:
    return ModelRef(name="tiny", version=version, sha256=SHA, display_version=f"1.{version}")


def test_every_kind_lands_in_the_registry(ingest):
    ingest, registry = ingest
    send(
        ingest,
        Status(
            device="cam-1",
            state=StatusState.ONLINE,
            agent_version="0.4.0",
            extra={"groups": ["cameras"], "tags": {"site": "north"}},
        ),
        Reported(
            device="cam-1",
            current=model(3),
            previous=model(2),
            update_state="idle",
            last_update=UpdateResult(
                rollout_id="r-1", outcome=UpdateOutcome.COMMITTED, bundle="tiny", version=3
            ),
        ),
        Telemetry(
            device="cam-1",
            inference=InferenceStats(count=500, errors=2, p50_ms=3.0, p95_ms=9.5, p99_ms=12.0),
            model=model(3),
            drift=Drift(samples=100, input_psi={"a": 0.05, "b": 0.3}, output_psi=0.1),
            self_test=SelfTest(ok=True, ts=time.time()),
        ),
        Event(device="cam-1", event="update.committed", rollout_id="r-1", message="done"),
    )
    device = registry.get_device(FLEET, "cam-1")
    assert device["online"] is True and device["agent_version"] == "0.4.0"
    assert device["groups"] == ["cameras"] and device["tags"] == {"site": "north"}
    assert device["current"] == {"name": "tiny", "version": 3, "display_version": "1.3"}
    assert device["previous"]["version"] == 2
    assert device["last_update"]["outcome"] == "committed"
    telemetry = device["telemetry"]
    assert (telemetry["inferences"], telemetry["errors"], telemetry["p95_ms"]) == (500, 2, 9.5)
    assert telemetry["drift_psi"] == pytest.approx(0.3)  # the largest PSI reported
    assert telemetry["self_test_ok"] is True
    assert [e["event"] for e in device["events"]] == ["update.committed"]
    assert device["history"][0]["model"] == "tiny:3"
    processed = ingest.stats.processed
    assert {k: processed[k] for k in ("status", "telemetry", "events", "reported")} == {
        "status": 1,
        "telemetry": 1,
        "events": 1,
        "reported": 1,
    }
    # The last will: offline, with its reason.
    send(ingest, Status(device="cam-1", state=StatusState.OFFLINE, reason="connection-lost"))
    device = registry.get_device(FLEET, "cam-1")
    assert device["online"] is False and device["status_reason"] == "connection-lost"
    assert device["groups"] == ["cameras"]  # a will without labels keeps the declared ones


def test_state_is_the_newest_message_and_duplicates_are_dropped(ingest):
    ingest, registry = ingest
    first = Telemetry(device="cam-2", inference=InferenceStats(count=10))
    second = Telemetry(device="cam-2", inference=InferenceStats(count=20))
    send(ingest, first, second, first)  # the resend of `first` is a duplicate
    assert registry.get_device(FLEET, "cam-2")["telemetry"]["inferences"] == 20
    assert ingest.stats.duplicates == 1


def test_malformed_messages_are_counted_per_kind(ingest):
    ingest, registry = ingest
    now = time.time()
    bad = {
        "edgekit/v1/plant-1/cam-3/status": b"not json",
        "edgekit/v1/plant-1/cam-3/telemetry": b'{"schema":1,"kind":"telemetry","device":"cam-3",'
        b'"seq":1,"msg_id":"abcdefgh12","ts":1,"inference":{"count":"many"}}',
        "edgekit/v1/plant-1/cam-3/events": Event(device="cam-4", event="error").to_json(),
        "edgekit/v1/plant-1/cam-3/reported": b'{"schema":1,"kind":"reported","device":"cam-3",'
        b'"seq":NaN,"msg_id":"abcdefgh13","ts":1}',
        "edgekit/v1/plant-1/bad id/telemetry": b"{}",
    }
    for topic, payload in bad.items():
        ingest.submit(topic, payload, now)
    ingest.submit("edgekit/v1/plant-1/cam-3/status", b"", now)  # a retained message cleared
    send(ingest, Status(device="cam-3", state=StatusState.ONLINE))
    assert dict(ingest.stats.malformed) == {
        "status": 1,
        "telemetry": 1,
        "events": 1,
        "reported": 1,
        "topic": 1,
    }
    assert ingest.stats.empty["status"] == 1
    assert registry.get_device(FLEET, "cam-3")["online"] is True  # still ingesting


def test_labels_targets_and_summary(ingest):
    ingest, registry = ingest
    send(
        ingest,
        Status(device="cam-1", state=StatusState.ONLINE, extra={"groups": ["cameras"]}),
        Status(device="cam-2", state=StatusState.ONLINE, extra={"groups": ["cameras"]}),
        Status(device="th-1", state=StatusState.OFFLINE, extra={"groups": ["sensors"]}),
        Reported(device="cam-1", current=model(3)),
        Reported(device="cam-2", current=model(2)),
    )
    registry.set_labels(FLEET, "cam-2", actor="alice", groups=["pilot"], tags={"site": "south"})
    pilot = registry.list_devices(target=Selector.parse("group=pilot"))
    assert [d["device"] for d in pilot] == ["cam-2"]
    cameras = registry.list_devices(target=Selector.parse("group=cameras,version=3"))
    assert [d["device"] for d in cameras] == ["cam-1"]
    assert [d["device"] for d in registry.list_devices(online=False)] == ["th-1"]
    south = registry.list_devices(target=Selector.parse("tag.site=south"))
    assert south[0]["groups"] == ["cameras", "pilot"]  # declared and operator groups
    summary = registry.summary(fleet=FLEET).to_dict()
    assert (summary["devices"], summary["online"], summary["offline"]) == (3, 2, 1)
    assert {m["model"]: m["devices"] for m in summary["models"]} == {
        "tiny:2": 1,
        "tiny:3": 1,
        "(none)": 1,
    }
    # A device can be labelled before it first connects (so a rollout can target it).
    registry.set_labels(FLEET, "cam-9", actor="alice", groups=["cameras"])
    assert registry.get_device(FLEET, "cam-9")["online"] is False
    with pytest.raises(SpecError):
        registry.set_labels(FLEET, "cam-1", actor="alice", groups=["no spaces allowed"])
    with pytest.raises(NotFound):
        registry.get_device(FLEET, "nobody")
