"""The rollout state machine, driven tick by tick on a fake clock, on SQLite and PostgreSQL.

Devices here are rows whose reported state the tests write directly (what ingest would write),
so each rule of the state machine is checked in isolation and fast; the end-to-end tests run
the same engine against simulated devices over MQTT.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import sqlalchemy as sa

from edgekit.fleet.db import Artifact, AuditEntry, Command, Database, Device, RolloutDevice
from edgekit.fleet.errors import ConflictError, InvalidTransition, SpecError
from edgekit.fleet.rollouts import RolloutEngine, attempt_id, base_rollout_id
from edgekit.fleet.spec import RolloutSpec
from edgekit.protocol import Command as CommandMessage
from edgekit.protocol import Desired

FLEET = "plant-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fleet:
    """Writes device state the way ingest does, and reads what the engine decided."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self.counts: dict[str, int] = {}

    def add(self, device: str, *, groups: tuple[str, ...] = ("cameras",), version: int = 1):
        now = self.clock()
        with self.db.write() as s:
            s.add(
                Device(
                    fleet=FLEET,
                    device=device,
                    first_seen=now,
                    last_seen=now,
                    declared_groups=list(groups),
                    online=True,
                    current_name="tiny",
                    current_version=version,
                    reported_at=now,
                )
            )

    def _update(self, device: str, **values: Any) -> None:
        with self.db.write() as s:
            s.execute(
                sa.update(Device)
                .where(Device.fleet == FLEET, Device.device == device)
                .values(**values)
            )

    def report(self, device: str, rollout: str, outcome: str, version: int, reason=None):
        values: dict[str, Any] = {
            "reported_at": self.clock(),
            "last_update_rollout": rollout,
            "last_update_outcome": outcome,
            "last_update_reason": reason,
            "last_update_version": version,
        }
        if outcome == "committed":
            values.update(current_name="tiny", current_version=version)
        self._update(device, **values)

    def telemetry(self, device: str, version: int, *, served=100, errors=0, p95=8.0, golden=True):
        count = self.counts.get(device, 1000) + served
        self.counts[device] = count
        self._update(
            device,
            telemetry_at=self.clock(),
            tel_model_name="tiny",
            tel_model_version=version,
            inf_count=count,
            inf_errors=errors,
            inf_rejected=0,
            p95_ms=p95,
            drift_psi=0.05,
            self_test_ok=golden,
        )

    def desired(self, device: str) -> Desired | None:
        with self.db.read() as s:
            payload = s.scalar(
                sa.select(Device.desired_payload).where(
                    Device.fleet == FLEET, Device.device == device
                )
            )
        return Desired.from_json(payload) if payload else None

    def desired_raw(self) -> dict[str, str | None]:
        with self.db.read() as s:
            return dict(s.execute(sa.select(Device.device, Device.desired_payload)).all())

    def states(self, rollout: str) -> dict[str, str]:
        with self.db.read() as s:
            rows = s.execute(
                sa.select(Device.device, RolloutDevice.state)
                .join(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.rollout_id == rollout)
            )
            return dict(rows.all())

    def commands(self) -> list[tuple[str, CommandMessage]]:
        with self.db.read() as s:
            rows = s.execute(
                sa.select(Device.device, Command.payload).join(
                    Device, Device.id == Command.device_id
                )
            ).all()
        return [(device, CommandMessage.from_json(payload)) for device, payload in rows]

    def audit(self, rollout: str) -> list[tuple[str, str]]:
        with self.db.read() as s:
            rows = s.execute(
                sa.select(AuditEntry.actor, AuditEntry.action)
                .where(AuditEntry.rollout_id == rollout)
                .order_by(AuditEntry.id)
            )
            return [(a, b) for a, b in rows]


@pytest.fixture
def env(db_url: str):
    db = Database(db_url)
    db.create_all()
    clock = Clock()
    engine = RolloutEngine(
        db, url_for=lambda sha, n, v: f"http://ctl/artifacts/{sha}/{n}-{v}.ekb", clock=clock
    )
    fleet = Fleet(db, clock)
    artifacts = {}
    with db.write() as s:
        for version in (2, 3, 4):
            sha = hashlib.sha256(f"bundle {version}".encode()).hexdigest()
            s.add(
                Artifact(
                    sha256=sha,
                    name="tiny",
                    version=version,
                    size=1000 + version,
                    created_at=clock(),
                    uploaded_by="test",
                )
            )
            artifacts[version] = sha
    yield engine, fleet, clock, artifacts, db
    db.dispose()


def spec(artifact: str, **options: Any) -> RolloutSpec:
    data = {
        "fleet": FLEET,
        "artifact": artifact,
        "target": "group=cameras",
        "waves": "10%,50%,100%",
        "min_wave_time": "60s",
        "gates": ["p95_latency_ms<=30", "error_rate<=0.01", "golden_pass==1"],
        "min_inferences": 50,
        "device_timeout": "5m",
        "retries": 0,
    }
    data.update(options)
    return RolloutSpec.from_dict(data)


def sent(fleet: Fleet, rollout: str) -> list[str]:
    return sorted(d for d, state in fleet.states(rollout).items() if state == "sent")


def succeed(fleet: Fleet, devices, rollout: str, version: int, **telemetry: Any) -> None:
    for device in devices:
        fleet.report(device, rollout, "committed", version)
        fleet.telemetry(device, version, **telemetry)


def run_wave(engine, fleet, clock, rollout_id, version, *, min_wave_time=60.0):
    """Let the devices sent so far succeed and serve traffic until the wave advances."""
    devices = sent(fleet, rollout_id)
    succeed(fleet, devices, rollout_id, version)
    engine.tick()
    for device in devices:
        fleet.telemetry(device, version)
    engine.tick()
    clock.advance(min_wave_time)
    engine.tick()
    return devices


def test_waves_fill_the_target_in_a_fixed_order_and_advance_on_health(env):
    engine, fleet, clock, artifacts, _db = env
    names = [f"cam-{i:02d}" for i in range(20)]
    for name in names:
        fleet.add(name)
    fleet.add("sensor-1", groups=("sensors",))
    created = engine.create(spec(artifacts[2]), actor="alice")
    rid = created["id"]
    assert created["state"] == "pending"
    engine.tick()
    first = sent(fleet, rid)
    order = sorted(names, key=lambda d: hashlib.sha256(f"{rid}/{FLEET}/{d}".encode()).hexdigest())
    assert first == sorted(order[:2])  # 10% of 20, the first two in the rollout's order
    desired = fleet.desired(first[0])
    assert desired is not None
    assert (desired.bundle, desired.version, desired.rollout_id) == ("tiny", 2, rid)
    assert desired.sha256 == artifacts[2] and desired.size == 1002
    assert engine.get(rid)["state"] == "running"

    succeed(fleet, first, rid, 2)
    engine.tick()
    status = engine.get(rid)
    assert status["state"] == "waiting"  # installed; gates have no data yet
    assert {g["verdict"] for g in status["gate_results"]} == {"no-data"}
    for device in first:
        fleet.telemetry(device, 2)
    engine.tick()
    status = engine.get(rid)
    assert {g["verdict"] for g in status["gate_results"]} == {"pass"}
    assert status["min_wave_time_remaining"] == pytest.approx(60.0)
    clock.advance(59)
    engine.tick()
    assert engine.get(rid)["wave"] == 1  # healthy, but not for the minimum wave time yet
    clock.advance(1)
    engine.tick()
    status = engine.get(rid)
    assert (status["state"], status["wave"]) == ("running", 2)
    second = sent(fleet, rid)
    assert second == sorted(order[2:10])  # cumulative 50%
    run_wave(engine, fleet, clock, rid, 2)
    run_wave(engine, fleet, clock, rid, 2)
    status = engine.get(rid)
    assert status["state"] == "completed"
    assert status["totals"]["succeeded"] == 20
    assert fleet.desired("sensor-1") is None  # outside the target
    actions = [action for _actor, action in fleet.audit(rid)]
    assert actions[:2] == ["rollout.created", "rollout.started"]
    assert actions.count("wave.started") == 3 and actions[-1] == "rollout.completed"
    assert ("alice", "rollout.created") in fleet.audit(rid)


def test_failure_threshold_breach_rolls_back_to_the_previous_desired_state(env):
    engine, fleet, clock, artifacts, _db = env
    for i in range(10):
        fleet.add(f"cam-{i}")
    # v2 everywhere first: the state a rollback must return to
    v2 = engine.create(spec(artifacts[2], waves="100%", min_wave_time=0), actor="ci")["id"]
    engine.tick()
    run_wave(engine, fleet, clock, v2, 2, min_wave_time=0)
    assert engine.get(v2)["state"] == "completed"
    before = fleet.desired_raw()

    v3 = engine.create(spec(artifacts[3], waves="20%,100%"), actor="ci")["id"]
    engine.tick()
    touched = sent(fleet, v3)
    assert len(touched) == 2
    for device in touched:
        fleet.report(device, v3, "failed", 3, reason="self-test-failed")
    engine.tick()
    status = engine.get(v3)
    assert status["state"] == "rolled-back"
    assert "2 of 2 devices failed" in status["reason"]
    after = fleet.desired_raw()
    assert after == before  # every touched device has its v2 desired state back, byte for byte
    assert fleet.commands() == []  # nothing runs v3: no device needs a rollback command
    assert set(fleet.states(v3).values()) == {"rolled-back"}
    assert [a for a in fleet.audit(v3) if a[1].startswith("rollout.")][-2:] == [
        ("engine", "rollout.breach"),
        ("engine", "rollout.rolled-back"),
    ]


def test_gate_breach_rolls_back_and_commands_installed_devices_back(env):
    engine, fleet, _clock, artifacts, _db = env
    for i in range(10):
        fleet.add(f"cam-{i}")
    rid = engine.create(spec(artifacts[3], waves="20%,100%"), actor="ci")["id"]
    engine.tick()
    touched = sent(fleet, rid)
    succeed(fleet, touched, rid, 3, p95=55.0)
    engine.tick()
    for device in touched:
        fleet.telemetry(device, 3, p95=55.0)
    engine.tick()
    status = engine.get(rid)
    assert status["state"] == "rolled-back"
    assert "gate p95_latency_ms<=30 failed" in status["reason"]
    for device in touched:
        assert fleet.desired(device) is None  # no previous desired state: withdrawn
    commands = fleet.commands()
    assert sorted(d for d, _ in commands) == touched
    assert {(c.command, c.args["rollout_id"]) for _, c in commands} == {("rollback", rid)}


def test_pause_policy_then_resume_acknowledges_the_failures(env):
    engine, fleet, _clock, artifacts, _db = env
    for i in range(10):
        fleet.add(f"cam-{i}")
    rid = engine.create(
        spec(artifacts[2], waves="20%,100%", on_breach="pause", min_wave_time=0), actor="ci"
    )["id"]
    engine.tick()
    bad, good = sent(fleet, rid)
    fleet.report(bad, rid, "failed", 2, reason="download-failed")
    succeed(fleet, [good], rid, 2)
    engine.tick()
    assert engine.get(rid)["state"] == "paused"
    engine.tick()  # paused: nothing new is sent
    assert len(fleet.states(rid)) == 2
    with pytest.raises(InvalidTransition):
        engine.pause(rid, actor="bob")
    resumed = engine.resume(rid, actor="bob")
    assert resumed["state"] in ("running", "waiting")
    assert resumed["wave_stats"][0]["excluded"] == 1  # the acknowledged failure
    fleet.telemetry(good, 2)
    engine.tick()
    fleet.telemetry(good, 2)
    engine.tick()
    assert engine.get(rid)["wave"] == 2
    assert ("bob", "rollout.resumed") in fleet.audit(rid)


@pytest.mark.parametrize("policy", ["fail", "exclude"])
def test_device_timeout_counts_as_failure_or_is_excluded(env, policy):
    engine, fleet, clock, artifacts, _db = env
    for i in range(4):
        fleet.add(f"cam-{i}")
    rid = engine.create(
        spec(
            artifacts[2],
            waves="100%",
            min_wave_time=0,
            device_timeout="30s",
            on_timeout=policy,
            on_breach="pause",
            success_threshold="75%",
            max_failures="0%",
        ),
        actor="ci",
    )["id"]
    engine.tick()
    devices = sent(fleet, rid)
    silent = devices[0]
    succeed(fleet, devices[1:], rid, 2)
    clock.advance(31)
    engine.tick()
    assert fleet.states(rid)[silent] == ("timed-out" if policy == "fail" else "excluded")
    for device in devices[1:]:
        fleet.telemetry(device, 2)
    engine.tick()
    engine.tick()
    assert engine.get(rid)["state"] == ("paused" if policy == "fail" else "completed")


def test_retries_use_an_attempt_rollout_id(env):
    engine, fleet, _clock, artifacts, _db = env
    fleet.add("cam-0")
    rid = engine.create(spec(artifacts[2], waves="100%", retries=1, min_wave_time=0), actor="ci")[
        "id"
    ]
    engine.tick()
    first = fleet.desired("cam-0")
    assert first is not None and first.rollout_id == rid
    fleet.report("cam-0", rid, "failed", 2, reason="download-failed")
    engine.tick()
    retry = fleet.desired("cam-0")
    assert retry is not None
    assert retry.rollout_id == attempt_id(rid, 2) == f"{rid}.2"
    assert base_rollout_id(retry.rollout_id) == rid and retry.msg_id != first.msg_id
    assert retry.seq > first.seq
    succeed(fleet, ["cam-0"], retry.rollout_id, 2)
    engine.tick()
    fleet.telemetry("cam-0", 2)  # the gate baseline was the first report on the bundle
    engine.tick()
    assert fleet.states(rid) == {"cam-0": "succeeded"}
    assert engine.get(rid)["state"] == "completed"


def test_devices_joining_later_get_the_current_desired_state(env):
    engine, fleet, clock, artifacts, _db = env
    for i in range(4):
        fleet.add(f"cam-{i}")
    rid = engine.create(spec(artifacts[2], waves="50%,100%", min_wave_time=0), actor="ci")["id"]
    engine.tick()
    fleet.add("cam-new-1")  # joins mid-rollout: the target grows, the current wave tops up
    engine.tick()
    assert engine.get(rid)["wave_stats"][0]["devices"] == 3  # ceil(50% of 5)
    for _ in range(3):
        run_wave(engine, fleet, clock, rid, 2, min_wave_time=0)
    assert engine.get(rid)["state"] == "completed"
    assert fleet.states(rid)["cam-new-1"] == "succeeded"
    fleet.add("cam-new-2")  # joins after completion: gets it at once, as a late device
    engine.tick()
    late = fleet.desired("cam-new-2")
    assert late is not None and (late.version, late.rollout_id) == (2, rid)
    assert engine.get(rid)["late"]["devices"] == 1


def test_a_restarted_engine_resumes_without_resending(env):
    engine, fleet, clock, artifacts, db = env
    for i in range(10):
        fleet.add(f"cam-{i}")
    rid = engine.create(spec(artifacts[2], waves="20%,60%,100%"), actor="ci")["id"]
    engine.tick()
    run_wave(engine, fleet, clock, rid, 2)
    in_flight = sent(fleet, rid)
    assert len(in_flight) == 4
    before = {d: fleet.desired(d).msg_id for d in fleet.states(rid)}
    # A new engine on the same database: everything it knows comes from there.
    restarted = RolloutEngine(db, url_for=engine.url_for, clock=clock)
    restarted.tick()
    restarted.tick()
    assert {d: fleet.desired(d).msg_id for d in fleet.states(rid)} == before
    assert restarted.get(rid)["wave"] == 2
    run_wave(restarted, fleet, clock, rid, 2)
    run_wave(restarted, fleet, clock, rid, 2)
    assert restarted.get(rid)["state"] == "completed"


def test_overlapping_rollouts_and_empty_targets_are_refused(env):
    engine, fleet, _clock, artifacts, _db = env
    fleet.add("cam-0")
    fleet.add("sensor-0", groups=("sensors",))
    engine.create(spec(artifacts[2]), actor="ci")
    with pytest.raises(ConflictError):
        engine.create(spec(artifacts[3]), actor="ci")
    engine.create(spec(artifacts[3], target="group=sensors"), actor="ci")  # disjoint: fine
    with pytest.raises(SpecError):
        engine.create(spec(artifacts[4], target="group=nobody"), actor="ci")


def test_operator_actions_are_audited_and_checked(env):
    engine, fleet, _clock, artifacts, _db = env
    for i in range(3):
        fleet.add(f"cam-{i}")
    rid = engine.create(spec(artifacts[2], start_paused=True), actor="alice")["id"]
    engine.tick()
    assert engine.get(rid)["state"] == "paused" and fleet.states(rid) == {}
    engine.resume(rid, actor="alice")
    engine.tick()
    assert len(fleet.states(rid)) == 1
    engine.pause(rid, actor="bob (ci)")
    engine.abort(rid, actor="carol")
    with pytest.raises(InvalidTransition):
        engine.resume(rid, actor="carol")
    engine.rollback(rid, actor="dave")
    with pytest.raises(InvalidTransition):
        engine.rollback(rid, actor="dave")
    trail = fleet.audit(rid)
    for entry in [
        ("alice", "rollout.created"),
        ("alice", "rollout.resumed"),
        ("bob (ci)", "rollout.paused"),
        ("carol", "rollout.aborted"),
        ("dave", "rollout.rolled-back"),
    ]:
        assert entry in trail
    with _db.read() as s:
        detail = s.scalar(
            sa.select(AuditEntry.detail).where(
                AuditEntry.rollout_id == rid, AuditEntry.action == "rollout.created"
            )
        )
    assert json.loads(json.dumps(detail))["spec"]["target"] == "group=cameras"


def test_a_device_already_on_the_bundle_counts_as_succeeded(env):
    engine, fleet, _clock, artifacts, _db = env
    fleet.add("cam-0", version=2)
    rid = engine.create(spec(artifacts[2], waves="100%"), actor="ci")["id"]
    engine.tick()
    assert fleet.states(rid) == {"cam-0": "succeeded"}
