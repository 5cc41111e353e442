"""The agent on the fleet: a real Agent, real signed bundles, a real mosquitto, and the
controller side played by mosquitto_sub/mosquitto_pub.

One test per promise of the fleet link: telemetry carries every field; an outage loses and
duplicates nothing (deduplicated by seq, per device and kind); agent events are forwarded once,
also across a restart; a desired bundle served over HTTP is downloaded, verified, self-tested,
activated and reported; its retained copy redelivered later installs nothing; commands are
acknowledged and executed; garbage from the controller is rejected with an event while the
agent keeps serving.
"""

from __future__ import annotations

import itertools
import json
import tarfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from fleet_support import (
    DEVICE,
    BundleServer,
    Device,
    baseline_samples,
    desired_for,
    events,
    latest,
    wait_event,
)
from support.mosquitto import Broker, wait_for

from device_agent.fleet_link import FLEET_STATE_NAME, FleetState, Rollout
from edgekit.protocol import (
    MAX_PAYLOAD_BYTES,
    Command,
    Desired,
    Event,
    Message,
    MessageKind,
    Reported,
    Telemetry,
    Topics,
)

pytestmark = pytest.mark.timeout(90)


def commit_first_model(device: Device, version: int = 1, model: str = "m1") -> None:
    """Install and commit a model on the device's agent directly (its factory image)."""
    assert device.agent is not None
    device.kit.commit(device.agent, device.kit.bundle(version, model))


_SEEDS = itertools.count(100)


def traffic(device: Device, count: int, *, shift: float = 0.0) -> None:
    """``count`` requests drawn like the baseline's data (plus ``shift``), fresh each call."""
    assert device.agent is not None
    rows = baseline_samples(count, seed=next(_SEEDS), shift=shift)
    for row in rows:
        device.agent.predict(row[None, :])


def dedup_by_seq(messages: list[Message]) -> dict[tuple[str, str, int], Message]:
    """The rule receivers apply (docs/mqtt-protocol.md, agent side): a record is identified by
    (device, kind, seq); copies of one record are byte-identical, so keep the first."""
    unique: dict[tuple[str, str, int], Message] = {}
    for message in messages:
        key = (message.device, message.KIND.value, message.seq)
        if key in unique:
            assert unique[key].msg_id == message.msg_id, "two records share a seq"
        unique.setdefault(key, message)
    return unique


# --- telemetry ------------------------------------------------------------------------------


def test_telemetry_carries_every_field(fleet_device: Device, fleet_subscriber) -> None:
    subscriber = fleet_subscriber(topic=Topics.subscription("plant-1", DEVICE, "telemetry"))
    fleet = fleet_device.start()
    commit_first_model(fleet_device)
    traffic(fleet_device, 60)  # like the baseline: low PSI

    def complete() -> Telemetry | None:
        traffic(fleet_device, 2)  # steady traffic, as on a device
        for _, message in reversed(subscriber.messages(MessageKind.TELEMETRY)):
            assert isinstance(message, Telemetry)
            if message.drift and message.model and message.self_test:
                return message
        return None

    telemetry = wait_for(complete, what="telemetry with drift")
    raw = json.loads(
        next(p for t, p in reversed(subscriber.raw()) if json.loads(p)["seq"] == telemetry.seq)
    )
    inference = raw["inference"]
    assert inference["count"] >= 60 and inference["errors"] == 0
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        assert inference[key] is not None and inference[key] > 0
    model = raw["model"]
    assert model["name"] == "tiny" and model["version"] == 1 and len(model["sha256"]) == 64
    serving = fleet_device.agent.serving  # type: ignore[union-attr]
    assert model["sha256"] == serving.manifest.files[serving.manifest.model].sha256
    assert raw["active_slot"] == serving.slot.lower()
    assert raw["slots"] == {serving.slot.lower(): "committed"}
    assert raw["uptime_s"] > 0 and raw["interval_s"] == 0.2
    system = raw["system"]
    for key in ("cpu_percent", "mem_total_bytes", "mem_available_bytes", "rss_bytes"):
        assert key in system
    assert system["disk_free_bytes"] > 0 and system["rss_bytes"] > 0
    assert "temperature_c" in system  # a number, or null where the host has no thermal zone
    drift = raw["drift"]
    assert drift["samples"] >= 5
    assert set(drift["input_psi"]) == {"input"} and drift["input_psi"]["input"] < 0.25
    assert drift["input_psi_max"] == drift["input_psi"]["input"]
    assert drift["output_psi"] is not None and drift["output_tv"] is not None
    assert drift["baseline_distribution"] and drift["output_distribution"]
    assert abs(sum(drift["baseline_distribution"].values()) - 1.0) < 1e-3
    self_test = raw["self_test"]
    assert self_test["ok"] is True and self_test["ts"] > 0
    assert "tiny v1" in self_test["detail"] and "golden" in self_test["detail"]

    # Shifted inputs: the next window scores far above the "shifted" threshold of 0.25.
    seen = telemetry.seq

    def shifted() -> Telemetry | None:
        traffic(fleet_device, 5, shift=3.0)
        for _, message in subscriber.messages(MessageKind.TELEMETRY):
            assert isinstance(message, Telemetry)
            if message.seq > seen and message.drift and message.drift.input_psi["input"] > 1:
                return message
        return None

    assert wait_for(shifted, what="telemetry reporting drift")
    assert fleet.telemetry.last is not None


def test_broker_outage_loses_and_duplicates_nothing(
    fleet_device: Device, fleet_broker: Broker, fleet_subscriber
) -> None:
    """The broker stops while the agent keeps serving and reporting, then returns: every
    telemetry and event record arrives; after deduplication by (device, kind, seq) each
    exactly once."""
    subscriber = fleet_subscriber(client_id="controller")  # persistent: queued across restart
    fleet = fleet_device.start(run=False)
    produced: list[Message] = []
    publish = fleet.publisher.publish

    def recording(message: Any) -> Any:
        stamped = publish(message)
        if stamped is not None:
            produced.append(stamped)
        return stamped

    fleet.publisher.publish = recording  # type: ignore[method-assign]
    fleet.start()
    assert fleet.link.wait_connected(15)
    commit_first_model(fleet_device)
    wait_for(lambda: latest(subscriber, MessageKind.TELEMETRY), what="first telemetry")

    fleet_broker.stop()
    wait_for(lambda: not fleet.link.connected, what="the link to notice the outage")
    offline_from = len(produced)
    traffic(fleet_device, 30)
    fleet_device.kit.commit(fleet_device.agent, fleet_device.kit.bundle(2, "m2"))  # events...
    fleet_device.agent.rollback("outage-drill")  # type: ignore[union-attr]  # ...offline
    wait_for(
        lambda: sum(m.KIND is MessageKind.TELEMETRY for m in produced[offline_from:]) >= 8,
        what="telemetry produced offline",
    )
    assert fleet.outbox.stats().rows >= 8
    fleet_broker.start()
    assert fleet.link.wait_connected(15)
    time.sleep(0.5)
    fleet.loop.stop()
    assert fleet.wait_idle(20)

    wanted = {
        (m.device, m.KIND.value, m.seq): m
        for m in produced
        if m.KIND in (MessageKind.TELEMETRY, MessageKind.EVENTS)
    }

    def received() -> list[Message]:
        return [
            m
            for _, m in subscriber.messages()
            if m.KIND in (MessageKind.TELEMETRY, MessageKind.EVENTS)
        ]

    wait_for(lambda: set(wanted) <= set(dedup_by_seq(received())), what="every record")
    unique = dedup_by_seq(received())
    assert set(unique) == set(wanted)  # none lost, none invented
    for key, message in unique.items():
        assert message.to_dict() == wanted[key].to_dict()
    offline = [m for m in produced[offline_from:] if m.KIND is MessageKind.TELEMETRY]
    assert len(offline) >= 8 and all(m.ts > 0 for m in offline)
    rolled = [
        m for m in unique.values() if isinstance(m, Event) and m.event == "update.rolled-back"
    ]
    assert len(rolled) == 1 and rolled[0].reason == "outage-drill"
    assert fleet.outbox.stats().rows == 0


def test_events_recorded_offline_are_forwarded_once_after_restart(
    fleet_device: Device, fleet_broker: Broker, fleet_subscriber
) -> None:
    """Events the agent records while the link is down, and while no link runs at all, are
    forwarded when it comes back, each once; the forwarding cursor survives the restart."""
    subscriber = fleet_subscriber(client_id="controller")
    fleet = fleet_device.start()
    assert fleet.link.wait_connected(15)
    commit_first_model(fleet_device, 1, "m1")
    wait_event(subscriber, "update.committed")
    fleet_broker.stop()
    fleet_device.kit.commit(fleet_device.agent, fleet_device.kit.bundle(2, "m2"))
    fleet_device.stop()  # agent-stopped is written after the link stopped: never forwarded yet
    fleet_broker.start()
    fleet = fleet_device.start()
    assert fleet.wait_idle(20) or fleet.wait_idle(10)
    wait_event(subscriber, "update.committed", count=2)
    wait_event(subscriber, "agent.started", count=2)
    bridged = [e for e in events(subscriber) if "event_seq" in e.data]
    by_seq: dict[int, list[Event]] = {}
    for event in bridged:
        by_seq.setdefault(event.data["event_seq"], []).append(event)
    log = fleet_device.kit.events()
    assert sorted(by_seq) == [e["seq"] for e in log]  # every agent event, in order
    for seq, copies in by_seq.items():
        assert len({c.msg_id for c in copies}) == 1, f"event {seq} forwarded twice"
    once = [copies[0] for _, copies in sorted(by_seq.items())]  # duplicates: QoS 1 resends
    stopping = [e for e in once if e.event == "agent.stopping"]
    assert len(stopping) == 1 and stopping[0].data["agent_event"] == "agent-stopped"
    committed = [e for e in once if e.event == "update.committed"]
    assert [e.data["version"] for e in committed] == [1, 2]


# --- desired --------------------------------------------------------------------------------


def test_desired_bundle_over_http_is_installed_and_reported(
    fleet_device: Device,
    fleet_broker: Broker,
    fleet_subscriber,
    fleet_pub,
    topics: Topics,
    bundle_server: BundleServer,
) -> None:
    subscriber = fleet_subscriber()
    fleet = fleet_device.start()
    commit_first_model(fleet_device, 1, "m1")
    assert fleet.link.wait_subscribed(15)
    desired = desired_for(bundle_server, fleet_device.kit.bundle(2, "m2"), version=2, rollout="r-2")
    fleet_pub(topics.desired, desired.to_json(), retain=True)
    wait_event(subscriber, "update.trial", timeout=40)

    def committed_event() -> Event | None:
        # The health window counts 5 inferences on the new model; keep traffic flowing until
        # it commits, since the trial event can reach us before the swap has finished.
        traffic(fleet_device, 2)
        found = events(subscriber, "update.committed")
        return found[1] if len(found) >= 2 else None

    committed = wait_for(committed_event, timeout=40, what="event update.committed")
    assert committed.rollout_id == "r-2" and committed.ref == desired.msg_id

    def reported_outcome() -> Reported | None:
        message = latest(subscriber, MessageKind.REPORTED)
        if isinstance(message, Reported) and message.last_update is not None:
            return message
        return None

    reported = wait_for(reported_outcome, what="reported with the outcome")
    assert reported.last_update.rollout_id == "r-2"  # type: ignore[union-attr]
    assert reported.last_update.outcome.value == "committed"  # type: ignore[union-attr]
    assert reported.last_update.version == 2  # type: ignore[union-attr]
    assert reported.current is not None and reported.current.version == 2
    assert reported.previous is not None and reported.previous.version == 1
    assert reported.update_state == "idle"
    assert sorted(reported.slots.values()) == ["committed", "previous"]
    lifecycle = [e.event for e in events(subscriber) if e.rollout_id == "r-2"]
    for name in (
        "update.received",
        "update.downloading",
        "update.verified",
        "update.self-test-passed",
        "update.trial",
        "update.committed",
    ):
        assert name in lifecycle, (name, lifecycle)
    assert lifecycle.index("update.received") < lifecycle.index("update.committed")
    assert bundle_server.requests == [f"/{desired.url.rsplit('/', 1)[1]}"]
    assert fleet_device.agent.serving.manifest.version == 2  # type: ignore[union-attr]

    # The retained desired comes again on every reconnect and every restart: no reinstall.
    starts = fleet_device.kit.event_types().count("update-started")
    fleet_broker.restart()  # retained messages are persisted; the link reconnects
    wait_for(lambda: fleet.link.counters().connects >= 2, what="a reconnect")
    assert fleet.link.wait_subscribed(15)
    time.sleep(0.3)
    fleet_device.stop()
    fleet = fleet_device.start()
    assert fleet.link.wait_subscribed(15)
    wait_for(lambda: fleet.ignored_desired >= 1, what="the redelivered desired state")
    time.sleep(0.5)
    assert fleet_device.kit.event_types().count("update-started") == starts
    assert bundle_server.requests == [f"/{desired.url.rsplit('/', 1)[1]}"]
    assert fleet.installs == 0


def test_a_refused_desired_bundle_is_reported_and_not_retried(
    fleet_device: Device, fleet_subscriber, fleet_pub, topics: Topics, bundle_server: BundleServer
) -> None:
    subscriber = fleet_subscriber()
    fleet = fleet_device.start()
    commit_first_model(fleet_device, 3, "m1")
    assert fleet.link.wait_subscribed(15)
    old = desired_for(bundle_server, fleet_device.kit.bundle(2, "m2"), version=2, rollout="r-old")
    fleet_pub(topics.desired, old.to_json(), retain=True)
    rejected = wait_event(subscriber, "update.rejected")
    assert rejected.rollout_id == "r-old" and rejected.reason == "rollback"
    wait_for(
        lambda: (
            isinstance(m := latest(subscriber, MessageKind.REPORTED), Reported)
            and m.last_update is not None
            and m.last_update.outcome.value == "rejected"
        ),
        what="reported rejected",
    )
    bad = desired_for(bundle_server, fleet_device.kit.bundle(4, "m2"), version=4, rollout="r-bad")
    bad = Desired.from_dict({**bad.to_dict(), "sha256": "0" * 64, "msg_id": "b" * 32})
    fleet_pub(topics.desired, bad.to_json(), retain=True)
    failed = wait_event(subscriber, "update.rejected", count=2)
    assert failed.rollout_id == "r-bad" and failed.reason == "download-mismatch"
    assert fleet_device.agent.serving.manifest.version == 3  # type: ignore[union-attr]
    traffic(fleet_device, 3)  # still serving


# --- commands -------------------------------------------------------------------------------


def command(name: str, **fields: Any) -> bytes:
    return Command(device=DEVICE, seq=5, command=name, **fields).to_json()


def test_rollback_and_diagnostics_commands_are_acknowledged_and_executed(
    fleet_device: Device, fleet_subscriber, fleet_pub, topics: Topics
) -> None:
    subscriber = fleet_subscriber()
    fleet = fleet_device.start()
    commit_first_model(fleet_device, 1, "m1")
    fleet_device.kit.commit(fleet_device.agent, fleet_device.kit.bundle(2, "m2"))
    assert fleet.link.wait_subscribed(15)

    rollback = Command(device=DEVICE, seq=5, command="rollback", args={"reason": "bad night"})
    fleet_pub(topics.cmd, rollback.to_json())
    completed = wait_event(subscriber, "command.completed")
    accepted = events(subscriber, "command.accepted")
    assert accepted[0].ref == rollback.msg_id and completed.ref == rollback.msg_id
    assert completed.data["version"] == 1 and completed.data["command"] == "rollback"
    assert fleet_device.agent.serving.manifest.version == 1  # type: ignore[union-attr]
    rolled = wait_event(subscriber, "update.rolled-back")
    assert rolled.reason == "bad-night" and rolled.ref is None  # not part of a rollout
    wait_for(
        lambda: (
            isinstance(m := latest(subscriber, MessageKind.REPORTED), Reported)
            and m.current is not None
            and m.current.version == 1
            and m.previous is None
        ),
        what="reported after the rollback",
    )

    fleet_pub(topics.cmd, command("rollback"))  # nothing left to roll back to
    failed = wait_event(subscriber, "command.failed")
    assert failed.reason == "no-previous"

    fleet_pub(topics.cmd, command("collect-diagnostics", args={"minutes": 5}))
    done = wait_event(subscriber, "command.completed", count=2)
    archive = fleet.diagnostics_dir / done.data["archive"]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        status = json.load(tar.extractfile("status.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile("mqtt-config.json"))  # type: ignore[arg-type]
    assert {"status.json", "events.jsonl", "link.json", "outbox.json"} <= names
    assert status["active"]["version"] == 1 and "password" not in config

    fleet_pub(topics.cmd, command("restart"))  # no process to restart in a library agent
    fleet_pub(topics.cmd, command("self-destruct"))
    fleet_pub(topics.cmd, command("rollback", expires=1.0))
    wait_for(lambda: len(events(subscriber, "command.rejected")) >= 3, what="three rejections")
    reasons = sorted(e.reason or "" for e in events(subscriber, "command.rejected"))
    assert reasons == ["expired", "unknown-command", "unsupported"]


def test_malformed_desired_and_commands_are_rejected_while_serving_goes_on(
    fleet_device: Device, fleet_subscriber, fleet_pub, topics: Topics
) -> None:
    subscriber = fleet_subscriber(topic=topics.events)  # the garbage itself is not parseable
    fleet = fleet_device.start()
    commit_first_model(fleet_device)
    assert fleet.link.wait_subscribed(15)
    x = fleet_device.kit.x
    expected = fleet_device.agent.predict(x)["probabilities"]  # type: ignore[union-attr]
    good = json.loads(command("rollback"))
    payloads = [
        (topics.desired, b"\xff\xfe garbage \x00"),
        (topics.cmd, json.dumps({**good, "schema": 0}).encode()),
        (topics.desired, json.dumps({**good, "kind": "desired"}).encode()),  # fields missing
        (topics.cmd, b'{"a": ' + b"1" * (MAX_PAYLOAD_BYTES + 10) + b"}"),
        (topics.cmd, json.dumps({**good, "device": "someone-else"}).encode()),
    ]
    for topic, payload in payloads:
        fleet_pub(topic, payload)
        np.testing.assert_allclose(
            fleet_device.agent.predict(x)["probabilities"],  # type: ignore[union-attr]
            expected,
            rtol=1e-6,
        )
    wait_for(lambda: fleet.link.counters().invalid_messages == len(payloads), what="all refused")
    invalid = wait_event(subscriber, "protocol.invalid-message")
    assert invalid.severity.value == "warning" and invalid.data["bytes"] > 0
    # The link reports at most one invalid message per 10 s; the rest are counted in the
    # next report's data.suppressed and in the link's counters.
    assert fleet.link.counters().callback_errors == 0
    assert fleet.link.connected and fleet_device.kit.event_types().count("update-started") == 1
    assert fleet_device.agent.health()["status"] == "ok"  # type: ignore[union-attr]


@pytest.mark.parametrize(("attempts", "installs"), [(1, 1), (3, 0)])
def test_an_interrupted_rollout_is_retried_a_bounded_number_of_times(
    fleet_device: Device,
    fleet_subscriber,
    fleet_pub,
    topics: Topics,
    bundle_server: BundleServer,
    attempts: int,
    installs: int,
) -> None:
    """A previous process died while installing (its fleet.json says so): the redelivered
    desired state is tried again, until MAX_INSTALL_ATTEMPTS attempts were made."""
    subscriber = fleet_subscriber(topic=topics.events)
    desired = desired_for(bundle_server, fleet_device.kit.bundle(1, "m1"), version=1, rollout="r1")
    interrupted = Rollout.for_desired(desired, attempts=attempts, events_from=1)
    state = FleetState(event_cursor=0, rollout=interrupted)
    (fleet_device.kit.state_dir / FLEET_STATE_NAME).write_bytes(state.to_bytes())
    fleet_pub(topics.desired, desired.to_json(), retain=True)
    fleet = fleet_device.start()  # start() marks the rollout interrupted; then it is redelivered
    if installs:
        wait_event(subscriber, "update.trial")
        assert fleet.installs == 1
        received = events(subscriber, "update.received")
        assert received[0].message.endswith("(attempt 2)")
    else:
        gave_up = wait_event(subscriber, "update.failed")
        assert gave_up.reason == "interrupted" and gave_up.rollout_id == "r1"
        assert fleet.installs == 0 and fleet.state.last_update["outcome"] == "failed"
        assert "update-started" not in fleet_device.kit.event_types()


def test_events_queued_before_a_crash_are_not_queued_twice(
    fleet_device: Device, fleet_broker: Broker
) -> None:
    """The crash window between queuing agent events and saving the cursor: the events are
    still in the outbox at the next start, and are not queued again."""
    fleet_broker.stop()  # nothing leaves the outbox
    fleet = fleet_device.start()
    commit_first_model(fleet_device)
    wait_for(lambda: fleet.state.event_cursor == fleet_device.agent.events.last_seq)  # type: ignore[union-attr]
    fleet_device.stop()
    state_path = fleet_device.kit.state_dir / FLEET_STATE_NAME
    state = FleetState.from_bytes(state_path.read_bytes())
    state_path.write_bytes(replace(state, event_cursor=0).to_bytes())  # "the cursor was lost"
    fleet = fleet_device.start()
    records = fleet.outbox.pending(10_000)
    seqs = [
        json.loads(r.payload)["data"].get("event_seq")
        for r in records
        if r.kind == "events" and b"event_seq" in r.payload
    ]
    log = [e["seq"] for e in fleet_device.kit.events()]
    assert sorted(seqs) == log  # each agent event queued exactly once, the new ones too
    assert fleet.state.event_cursor == log[-1]
