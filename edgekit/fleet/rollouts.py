"""The rollout engine: staged rollouts gated on install success, health and model quality.

A rollout is a state machine whose whole state is in the database. Every transition happens
inside one transaction together with its audit row and with the desired-state changes it
implies (written for :mod:`edgekit.fleet.publisher` to publish), so a controller killed at any
point restarts exactly where the last committed transaction left it, and never sends a device
the same rollout twice (see the publisher's reconciliation).

Rollout states::

    pending ──> running(wave k) ──> waiting(wave k) ──> running(wave k+1) ... ──> completed
                   │    ^               │                                          │
                   │    └── unhealthy ──┘                                          │
                   ├──> paused ──(resume)──> running/waiting                      │
                   ├──> aborted ───────────────────────────────┐                  │
                   └──> rolled-back <──────────────────────────┴──────────────────┘

* **running**: wave *k*'s devices get the desired state; the wave's installs are awaited.
* **waiting**: the wave's success threshold is met; the gates are being watched. The wave
  advances once the success threshold and every gate have held, without interruption, for the
  minimum wave time. A gate with no data yet (no device of the wave has served enough
  inferences on the new bundle) does not hold, but is no breach either.
* **breach**: more failures than ``max_failures`` in any started wave, or a gate that fails
  on data, or (with ``max_wave_time``) a wave that did not prove healthy in time. The spec's
  ``on_breach`` decides: pause, abort, or roll back.
* **rolled-back**: every device the rollout touched gets back the desired state it had
  before (or none: an empty retained message), and devices that run the rollout's bundle get
  a ``rollback`` command, since an agent refuses a desired version below its anti-rollback
  floor and only rolls back when commanded.

Devices, per rollout (``RolloutDevice.state``)::

    queued ──> sent ──> updating ──> succeeded
      ^          │          │
      └─ retry ──┴──────────┴──> failed | timed-out | excluded      (+ cancelled, rolled-back)

Waves are cumulative shares of the *current* target set, filled in a deterministic order
(sha256 of rollout id and device), so a device that joins the target later is picked up by
the next wave that needs one more device, and after completion receives the desired state at
once. Retries publish the desired state again under ``ROLLOUT.N`` (N = attempt), because an
agent acts on each rollout id once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgekit.fleet.db import Artifact, AuditEntry, Database, Device, Rollout, RolloutDevice
from edgekit.fleet.db import Command as CommandRow
from edgekit.fleet.errors import ConflictError, InvalidTransition, NotFound, SpecError
from edgekit.fleet.lease import LeaseLost
from edgekit.fleet.registry import labels_of, matching_devices
from edgekit.fleet.spec import (
    BreachPolicy,
    GateResult,
    GateVerdict,
    RolloutSpec,
    Selector,
    TimeoutPolicy,
    format_duration,
)
from edgekit.protocol import Command, CommandName, Desired, Topics

__all__ = [
    "ACTIVE_STATES",
    "DeviceState",
    "RolloutEngine",
    "RolloutState",
    "WaveStats",
    "attempt_id",
    "base_rollout_id",
]

log = logging.getLogger(__name__)

ENGINE_ACTOR = "engine"


class RolloutState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"


ACTIVE_STATES = frozenset(
    {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.WAITING, RolloutState.PAUSED}
)
_FINISHED = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK})


class DeviceState(str, Enum):
    QUEUED = "queued"
    SENT = "sent"
    UPDATING = "updating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    EXCLUDED = "excluded"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled-back"


_IN_FLIGHT = frozenset({DeviceState.SENT.value, DeviceState.UPDATING.value})
_FAILURES = frozenset({DeviceState.FAILED.value, DeviceState.TIMED_OUT.value})
_PENDING = frozenset({DeviceState.QUEUED.value, *_IN_FLIGHT})
_DEVICE_FAILURE_OUTCOMES = frozenset({"failed", "rejected", "rolled-back"})
_FAILURE_EVENTS = frozenset({"update.failed", "update.rejected", "update.rolled-back"})
_ALREADY_CURRENT = "already-current"
#: Gates judge a wave only once at least this share of its installed devices has served
#: ``min_inferences`` on the bundle: one early device is not the wave, in either direction.
GATE_QUORUM = 0.5
#: How long a finished rollout still watches its devices (late outcomes, rollback follow-up).
TRACK_FINISHED_S = 86_400.0
#: A rollback command may wait in an offline device's session this long before it expires.
ROLLBACK_COMMAND_TTL_S = 86_400.0


def attempt_id(rollout_id: str, attempt: int) -> str:
    """The ``rollout_id`` a device sees: ``r-1a2b3c4d`` first, ``r-1a2b3c4d.2`` on a retry."""
    return rollout_id if attempt <= 1 else f"{rollout_id}.{attempt}"


def base_rollout_id(value: str) -> str:
    """``r-1a2b3c4d.2`` -> ``r-1a2b3c4d`` (generated rollout ids contain no dot)."""
    head, dot, tail = value.rpartition(".")
    return head if dot and tail.isdigit() else value


def _order_key(rollout_id: str, device: Device) -> str:
    return hashlib.sha256(f"{rollout_id}/{device.fleet}/{device.device}".encode()).hexdigest()


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%".replace(".0%", "%")


@dataclass
class WaveStats:
    """One wave's figures: what the success and failure thresholds are judged on."""

    index: int
    share: float
    devices: int = 0
    succeeded: int = 0
    failed: int = 0
    excluded: int = 0
    pending: int = 0
    rolled_back: int = 0
    cancelled: int = 0

    @property
    def denominator(self) -> int:
        """Devices the thresholds count: excluded and acknowledged ones are left out."""
        return self.devices - self.excluded - self.cancelled

    @property
    def success_ratio(self) -> float:
        return self.succeeded / self.denominator if self.denominator > 0 else 1.0

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.denominator if self.denominator > 0 else 0.0

    def add(self, state: str, acknowledged: bool, count: int = 1) -> None:
        self.devices += count
        if state == DeviceState.SUCCEEDED.value:
            self.succeeded += count
        elif state in _FAILURES:
            if acknowledged:
                self.excluded += count
            else:
                self.failed += count
        elif state == DeviceState.EXCLUDED.value:
            self.excluded += count
        elif state == DeviceState.ROLLED_BACK.value:
            self.rolled_back += count
        elif state == DeviceState.CANCELLED.value:
            self.cancelled += count
        else:
            self.pending += count

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "share": self.share,
            "devices": self.devices,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "excluded": self.excluded,
            "pending": self.pending,
            "rolled_back": self.rolled_back,
            "cancelled": self.cancelled,
            "success_ratio": self.success_ratio,
            "failure_ratio": self.failure_ratio,
        }


class _Outcome(Enum):
    SUCCESS = "success"
    PROGRESS = "progress"


class _Step:
    """One rollout inside one transaction: loaded once, changed, committed by the caller."""

    def __init__(self, engine: RolloutEngine, session: Session, rollout: Rollout) -> None:
        self.engine = engine
        self.session = session
        self.rollout = rollout
        self.spec = RolloutSpec.from_dict(rollout.spec)
        self.now = engine.clock()
        self.target = (rollout.bundle, rollout.version)
        self.rds: list[RolloutDevice] = list(
            session.scalars(
                sa.select(RolloutDevice)
                .where(RolloutDevice.rollout_id == rollout.id)
                .order_by(RolloutDevice.id)
            )
        )
        self.devices: dict[int, Device] = {
            d.id: d for d in session.scalars(sa.select(Device).where(Device.fleet == rollout.fleet))
        }

    @property
    def state(self) -> RolloutState:
        return RolloutState(self.rollout.state)

    # --- bookkeeping ---

    def audit(self, action: str, actor: str, *, device: str | None = None, **detail: Any) -> None:
        self.session.add(
            AuditEntry(
                ts=self.now,
                actor=actor,
                action=action,
                rollout_id=self.rollout.id,
                device=device,
                detail=detail,
            )
        )

    def set_state(self, state: RolloutState, actor: str, action: str, **detail: Any) -> None:
        before = self.rollout.state
        self.rollout.state = state.value
        self.rollout.revision += 1
        self.rollout.updated_at = self.now
        if state in _FINISHED:
            self.rollout.finished_at = self.now
        self.audit(action, actor, **{"from": before, "to": state.value, **detail})
        log.info("rollout %s: %s -> %s (%s)", self.rollout.id, before, state.value, action)

    # --- the tick ---

    def run(self) -> None:
        if self.state is RolloutState.PENDING:
            self.start(ENGINE_ACTOR)
        self.track()
        if self.state in (RolloutState.RUNNING, RolloutState.WAITING):
            self.advance()
        elif self.state is RolloutState.COMPLETED and self.rollout.following:
            self.follow()
        elif self.state is RolloutState.ROLLED_BACK:
            self.rollback_follow_up()

    def start(self, actor: str) -> None:
        self.rollout.wave = 0
        self.rollout.wave_started_at = self.now
        self.rollout.healthy_since = None
        self.set_state(RolloutState.RUNNING, actor, "rollout.started")
        self.begin_wave(0)

    def begin_wave(self, index: int) -> None:
        targets = self.targets()
        added = self.assign(targets, index)
        self.publish_queued()
        self.audit(
            "wave.started",
            ENGINE_ACTOR,
            wave=index + 1,
            share=self.spec.waves[index],
            devices=added,
            target_size=len(targets),
        )

    def targets(self) -> list[Device]:
        selector = self.spec.target
        return [d for d in self.devices.values() if selector.matches(labels_of(d))]

    def busy_rollouts(self) -> set[str]:
        """Other rollouts whose desired state a device must not lose while they run."""
        return {
            rid
            for rid in self.session.scalars(
                sa.select(Rollout.id).where(
                    Rollout.fleet == self.rollout.fleet,
                    Rollout.state.in_([s.value for s in ACTIVE_STATES]),
                    Rollout.id != self.rollout.id,
                )
            )
        }

    def assign(self, targets: Sequence[Device], wave: int, *, late: bool = False) -> int:
        """Give wave ``wave`` its share of the target set (cumulative, in a fixed order)."""
        assigned = {rd.device_id for rd in self.rds}
        busy = self.busy_rollouts()
        candidates = [
            d
            for d in targets
            if d.id not in assigned and (d.desired_rollout is None or d.desired_rollout not in busy)
        ]
        if late:
            chosen = [d for d in candidates if self.newer_than_desired(d)]
        else:
            total = len(targets)
            cutoff = math.ceil(self.spec.waves[wave] * total - 1e-9) if total else 0
            cutoff = max(cutoff, 1) if total else 0
            need = cutoff - sum(1 for rd in self.rds if not rd.late)
            if need <= 0:
                return 0
            candidates.sort(key=lambda d: _order_key(self.rollout.id, d))
            chosen = candidates[:need]
        for device in chosen:
            rd = RolloutDevice(
                rollout_id=self.rollout.id,
                device_id=device.id,
                wave=wave,
                late=late,
                state=DeviceState.QUEUED.value,
                attempt=0,
                assigned_at=self.now,
                inferences=0,
                acknowledged=False,
                rollback_cmd_sent=False,
            )
            self.session.add(rd)
            self.rds.append(rd)
        return len(chosen)

    def newer_than_desired(self, device: Device) -> bool:
        """A completed rollout hands its state to a late device only if nothing newer did."""
        if device.desired_rollout is None:
            return True
        other = self.session.get(Rollout, device.desired_rollout)
        return other is None or other.created_at < self.rollout.created_at

    def publish_queued(self) -> None:
        for rd in self.rds:
            if rd.state == DeviceState.QUEUED.value:
                self.send(rd, self.devices[rd.device_id])

    def send(self, rd: RolloutDevice, device: Device) -> None:
        """Set the device's desired state to this rollout's bundle (the publisher sends it)."""
        if rd.attempt == 0:
            rd.prev_desired_payload = device.desired_payload
            rd.prev_desired_msg_id = device.desired_msg_id
            rd.prev_desired_rollout = device.desired_rollout
            rd.prev_model_name = device.current_name
            rd.prev_model_version = device.current_version
        rd.attempt += 1
        rd.sent_at = self.now
        rd.state = DeviceState.SENT.value
        device.seq += 1
        desired = Desired(
            device=device.device,
            seq=device.seq,
            ts=self.now,
            bundle=self.rollout.bundle,
            version=self.rollout.version,
            url=self.rollout.url,
            sha256=self.rollout.artifact_sha256,
            size=self.rollout.size,
            rollout_id=attempt_id(self.rollout.id, rd.attempt),
        )
        device.desired_payload = desired.to_json().decode("utf-8")
        device.desired_msg_id = desired.msg_id
        device.desired_rollout = self.rollout.id
        device.desired_published = False
        device.desired_at = self.now
        if rd.attempt == 1 and (device.current_name, device.current_version) == self.target:
            rd.state = DeviceState.SUCCEEDED.value
            rd.finished_at = self.now
            rd.reason = _ALREADY_CURRENT

    # --- per-device progress ---

    def track(self) -> None:
        measuring = self.state in (RolloutState.RUNNING, RolloutState.WAITING, RolloutState.PAUSED)
        for rd in self.rds:
            device = self.devices.get(rd.device_id)
            if device is None:
                continue
            if rd.state in _IN_FLIGHT:
                outcome = self.outcome(rd, device)
                if outcome is _Outcome.SUCCESS:
                    rd.state = DeviceState.SUCCEEDED.value
                    rd.finished_at = self.now
                    rd.reason = None
                elif isinstance(outcome, str):
                    self.fail(rd, device, outcome)
                elif outcome is _Outcome.PROGRESS and rd.state == DeviceState.SENT.value:
                    rd.state = DeviceState.UPDATING.value
                elif self.now - (rd.sent_at or self.now) > self.spec.device_timeout_s:
                    self.fail(rd, device, "timeout", timeout=True)
            # Gates judge the current wave only; measuring the others would rewrite rows
            # every tick for nothing.
            if (
                measuring
                and rd.wave == self.rollout.wave
                and not rd.late
                and rd.state in (DeviceState.SUCCEEDED.value, *_IN_FLIGHT)
            ):
                self.measure(rd, device)

    def outcome(self, rd: RolloutDevice, device: Device) -> _Outcome | str | None:
        """What the device says about this rollout: success, a failure reason, progress."""
        current = attempt_id(self.rollout.id, rd.attempt)
        last = device.last_update_rollout
        if last is not None and base_rollout_id(last) == self.rollout.id:
            runs_target = (device.current_name, device.current_version) == self.target
            if device.last_update_outcome == "committed" and runs_target:
                return _Outcome.SUCCESS  # any attempt of ours that committed is a success
            if last == current and device.last_update_outcome in _DEVICE_FAILURE_OUTCOMES:
                return device.last_update_reason or str(device.last_update_outcome)
        if device.event_rollout == current:
            if device.event_name == "update.committed":
                return _Outcome.SUCCESS
            if device.event_name in _FAILURE_EVENTS:
                return str(device.event_name).removeprefix("update.")
            return _Outcome.PROGRESS
        if (
            (device.current_name, device.current_version) == self.target
            and device.reported_at is not None
            and rd.sent_at is not None
            and device.reported_at >= rd.sent_at
        ):
            return _Outcome.SUCCESS
        return None

    def fail(
        self, rd: RolloutDevice, device: Device, reason: str, *, timeout: bool = False
    ) -> None:
        name = f"{device.fleet}/{device.device}"
        retry_allowed = self.state not in (RolloutState.ABORTED, RolloutState.ROLLED_BACK)
        if retry_allowed and rd.attempt < 1 + self.spec.retries:
            rd.state = DeviceState.QUEUED.value
            rd.reason = f"retry after {reason}"
            self.audit("device.retry", ENGINE_ACTOR, device=name, attempt=rd.attempt, reason=reason)
            return
        if timeout:
            excluded = self.spec.on_timeout is TimeoutPolicy.EXCLUDE
            rd.state = (DeviceState.EXCLUDED if excluded else DeviceState.TIMED_OUT).value
        else:
            rd.state = DeviceState.FAILED.value
        rd.reason = reason
        rd.finished_at = self.now
        self.audit(
            f"device.{rd.state}", ENGINE_ACTOR, device=name, attempt=rd.attempt, reason=reason
        )

    def measure(self, rd: RolloutDevice, device: Device) -> None:
        """Gate metrics from the telemetry the device sent while running the bundle."""
        if (device.tel_model_name, device.tel_model_version) != self.target:
            return
        if device.inf_count is None or device.telemetry_at is None:
            return
        if rd.sent_at is not None and device.telemetry_at < rd.sent_at:
            return
        count = device.inf_count
        errors = device.inf_errors or 0
        rejected = device.inf_rejected or 0
        if rd.base_count is None:
            rd.base_count, rd.base_errors, rd.base_rejected = count, errors, rejected
        elif count < rd.base_count:  # the agent restarted: its counters start from zero
            rd.base_count, rd.base_errors, rd.base_rejected = 0, 0, 0
        inferences = count - rd.base_count
        served_errors = max(0, errors - (rd.base_errors or 0))
        served_rejected = max(0, rejected - (rd.base_rejected or 0))
        metrics = {
            "p50_latency_ms": device.p50_ms,
            "p95_latency_ms": device.p95_ms,
            "p99_latency_ms": device.p99_ms,
            "error_rate": served_errors / inferences if inferences > 0 else None,
            "rejected_rate": served_rejected / inferences if inferences > 0 else None,
            "drift_psi": device.drift_psi,
            "golden_pass": None
            if device.self_test_ok is None
            else (1.0 if device.self_test_ok else 0.0),
            "cpu_percent": device.cpu_percent,
            "temperature_c": device.temperature_c,
        }
        if rd.inferences != inferences:
            rd.inferences = inferences
        if rd.metrics != metrics:
            rd.metrics = metrics

    # --- waves ---

    def wave_stats(self) -> list[WaveStats]:
        stats = [WaveStats(i, share) for i, share in enumerate(self.spec.waves)]
        for rd in self.rds:
            if not rd.late and rd.wave < len(stats):
                stats[rd.wave].add(rd.state, rd.acknowledged)
        return stats

    def gate_results(self, wave: int) -> list[GateResult]:
        eligible = [
            rd
            for rd in self.rds
            if rd.wave == wave
            and not rd.late
            and rd.state == DeviceState.SUCCEEDED.value
            and rd.metrics is not None
            and rd.inferences >= self.spec.min_inferences
        ]
        installed = sum(
            1
            for rd in self.rds
            if rd.wave == wave and not rd.late and rd.state == DeviceState.SUCCEEDED.value
        )
        quorum = max(1, math.ceil(GATE_QUORUM * installed))
        results = []
        for gate in self.spec.gates:
            values = [
                (float(rd.metrics[gate.metric]), float(rd.inferences))
                for rd in eligible
                if rd.metrics is not None and rd.metrics.get(gate.metric) is not None
            ]
            result = gate.evaluate(values)
            if len(values) < quorum:
                # A verdict on too few devices is "not yet", either way: one noisy device
                # neither proves nor breaks a wave.
                result = GateResult(gate, GateVerdict.NO_DATA, result.value, len(values))
            results.append(result)
        return results

    def advance(self) -> None:
        rollout, spec = self.rollout, self.spec
        wave = rollout.wave
        self.assign(self.targets(), wave)  # devices that joined the target since
        self.publish_queued()
        stats = self.wave_stats()
        for started in stats[: wave + 1]:
            if started.failure_ratio > spec.max_failures:
                self.breach(
                    f"wave {started.index + 1}: {started.failed} of {started.denominator} "
                    f"devices failed ({_pct(started.failure_ratio)}), above the "
                    f"{_pct(spec.max_failures)} allowed"
                )
                return
        results = self.gate_results(wave)
        summary = [r.to_dict() for r in results]
        if summary != rollout.gate_results:
            rollout.gate_results = summary
        failing = [r for r in results if r.verdict is GateVerdict.FAIL]
        if failing:
            self.breach(
                "; ".join(
                    f"gate {r.gate} failed: {r.value:.4g} over {r.devices} device(s)"
                    for r in failing
                )
            )
            return
        current = stats[wave]
        if current.devices == 0:
            self.audit("wave.empty", ENGINE_ACTOR, wave=wave + 1)
            self.next_wave()
            return
        installed = current.success_ratio >= spec.success_threshold
        healthy = installed and all(r.verdict is GateVerdict.PASS for r in results)
        if installed and self.state is RolloutState.RUNNING:
            self.set_state(
                RolloutState.WAITING,
                ENGINE_ACTOR,
                "wave.installed",
                wave=wave + 1,
                succeeded=current.succeeded,
                devices=current.devices,
            )
        elif not installed and self.state is RolloutState.WAITING:
            self.set_state(RolloutState.RUNNING, ENGINE_ACTOR, "wave.installing", wave=wave + 1)
        if healthy:
            if rollout.healthy_since is None:
                rollout.healthy_since = self.now
                self.audit("wave.healthy", ENGINE_ACTOR, wave=wave + 1, gates=summary)
            if self.now - rollout.healthy_since >= spec.min_wave_time_s:
                self.next_wave()
                return
        elif rollout.healthy_since is not None:
            rollout.healthy_since = None
            self.audit("wave.unhealthy", ENGINE_ACTOR, wave=wave + 1, gates=summary)
        limit = spec.max_wave_time_s
        if limit is not None and self.now - (rollout.wave_started_at or self.now) > limit:
            self.breach(f"wave {wave + 1} did not prove healthy within {format_duration(limit)}")

    def next_wave(self) -> None:
        rollout = self.rollout
        finished = rollout.wave
        if finished + 1 >= len(self.spec.waves):
            rollout.following = True
            rollout.healthy_since = None
            stats = self.wave_stats()
            self.set_state(
                RolloutState.COMPLETED,
                ENGINE_ACTOR,
                "rollout.completed",
                succeeded=sum(s.succeeded for s in stats),
                failed=sum(s.failed for s in stats),
                devices=sum(s.devices for s in stats),
            )
            return
        rollout.wave = finished + 1
        rollout.wave_started_at = self.now
        rollout.healthy_since = None
        rollout.gate_results = []
        self.set_state(RolloutState.RUNNING, ENGINE_ACTOR, "wave.advanced", wave=finished + 2)
        self.begin_wave(finished + 1)

    def follow(self) -> None:
        """After completion: devices that joined the target get the desired state at once."""
        added = self.assign(self.targets(), len(self.spec.waves) - 1, late=True)
        if added:
            self.audit("rollout.late-devices", ENGINE_ACTOR, devices=added)
        self.publish_queued()

    # --- breaches, operator actions ---

    def breach(self, reason: str) -> None:
        policy = self.spec.on_breach
        self.rollout.reason = reason
        self.audit("rollout.breach", ENGINE_ACTOR, reason=reason, policy=policy.value)
        if policy is BreachPolicy.PAUSE:
            self.pause(ENGINE_ACTOR, reason=reason)
        elif policy is BreachPolicy.ABORT:
            self.abort(ENGINE_ACTOR, reason=reason)
        else:
            self.rollback(ENGINE_ACTOR, reason=reason)

    def pause(self, actor: str, *, reason: str | None = None) -> None:
        if self.state not in (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.WAITING):
            raise InvalidTransition(f"a {self.state.value} rollout cannot be paused")
        self.rollout.paused_from = self.state.value
        self.rollout.healthy_since = None
        self.set_state(RolloutState.PAUSED, actor, "rollout.paused", reason=reason)

    def resume(self, actor: str) -> None:
        if self.state is not RolloutState.PAUSED:
            raise InvalidTransition(f"a {self.state.value} rollout is not paused")
        acknowledged = 0
        for rd in self.rds:
            if rd.state in _FAILURES and rd.wave <= self.rollout.wave and not rd.acknowledged:
                rd.acknowledged = True
                acknowledged += 1
        target = RolloutState(self.rollout.paused_from or RolloutState.RUNNING.value)
        self.rollout.paused_from = None
        self.rollout.healthy_since = None
        self.rollout.wave_started_at = self.now
        self.rollout.reason = None
        self.set_state(target, actor, "rollout.resumed", acknowledged_failures=acknowledged)

    def abort(self, actor: str, *, reason: str | None = None) -> None:
        if self.state not in ACTIVE_STATES:
            raise InvalidTransition(f"a {self.state.value} rollout cannot be aborted")
        for rd in self.rds:
            if rd.state == DeviceState.QUEUED.value:
                rd.state = DeviceState.CANCELLED.value
                rd.finished_at = self.now
        self.rollout.following = False
        if reason:
            self.rollout.reason = reason
        self.set_state(RolloutState.ABORTED, actor, "rollout.aborted", reason=reason)

    def rollback(self, actor: str, *, reason: str | None = None) -> None:
        if self.state is RolloutState.ROLLED_BACK:
            raise InvalidTransition("the rollout is already rolled back")
        restored = commands = cancelled = 0
        for rd in self.rds:
            device = self.devices[rd.device_id]
            if rd.state in (DeviceState.CANCELLED.value, DeviceState.ROLLED_BACK.value):
                continue
            if rd.state == DeviceState.QUEUED.value and rd.attempt == 0:
                rd.state = DeviceState.CANCELLED.value
                rd.finished_at = self.now
                cancelled += 1
                continue
            if device.desired_rollout == self.rollout.id:
                self.restore_desired(rd, device)
                restored += 1
            runs_target = (device.current_name, device.current_version) == self.target
            moved = rd.state in (DeviceState.UPDATING.value, DeviceState.SUCCEEDED.value)
            if (runs_target or moved) and rd.reason != _ALREADY_CURRENT:
                self.command_rollback(rd, device)
                commands += 1
            rd.reason = f"rolled back while {rd.state}"
            rd.state = DeviceState.ROLLED_BACK.value
            rd.finished_at = self.now
        self.rollout.following = False
        if reason:
            self.rollout.reason = reason
        self.set_state(
            RolloutState.ROLLED_BACK,
            actor,
            "rollout.rolled-back",
            reason=reason,
            restored=restored,
            rollback_commands=commands,
            cancelled=cancelled,
        )

    def restore_desired(self, rd: RolloutDevice, device: Device) -> None:
        """The device's desired state as it was before this rollout (or none at all)."""
        if rd.prev_desired_payload:
            device.desired_payload = rd.prev_desired_payload
            device.desired_msg_id = rd.prev_desired_msg_id
            device.desired_rollout = rd.prev_desired_rollout
        else:
            device.desired_payload = ""  # an empty retained message withdraws the state
            device.desired_msg_id = None
            device.desired_rollout = None
        device.desired_published = False
        device.desired_at = self.now

    def command_rollback(self, rd: RolloutDevice, device: Device) -> None:
        device.seq += 1
        command = Command(
            device=device.device,
            seq=device.seq,
            ts=self.now,
            command=CommandName.ROLLBACK.value,
            args={"rollout_id": self.rollout.id, "reason": "rollout-rolled-back"},
            expires=self.now + ROLLBACK_COMMAND_TTL_S,
        )
        self.session.add(
            CommandRow(
                device_id=device.id,
                topic=Topics(device.fleet, device.device).cmd,
                payload=command.to_json().decode("utf-8"),
                msg_id=command.msg_id,
                rollout_id=self.rollout.id,
                created_at=self.now,
            )
        )
        rd.rollback_cmd_sent = True

    def rollback_follow_up(self) -> None:
        """A device that finished installing after the rollback still gets the command."""
        for rd in self.rds:
            if rd.state != DeviceState.ROLLED_BACK.value or rd.rollback_cmd_sent:
                continue
            if rd.reason and _ALREADY_CURRENT in rd.reason:
                continue
            device = self.devices[rd.device_id]
            if device.desired_rollout not in (rd.prev_desired_rollout, None):
                continue  # a newer rollout owns the device now
            if (device.current_name, device.current_version) == self.target:
                self.command_rollback(rd, device)
                self.audit(
                    "device.rollback-command",
                    ENGINE_ACTOR,
                    device=f"{device.fleet}/{device.device}",
                )


class RolloutEngine:
    """Creates rollouts, runs their state machines, and carries out operator actions.

    All changes go through :meth:`_with_rollout`, which holds a process-wide lock and locks the
    rollout's row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serializes writers anyway),
    so the engine's tick and an operator's action never interleave on one rollout, whichever
    controller replica each runs on.

    With several replicas, only the holder of the engine lease ticks: ``fence`` (a
    :meth:`edgekit.fleet.lease.Lease.fence`) runs inside every transaction a tick commits, so
    a tick by a replica that lost the lease raises
    :class:`~edgekit.fleet.lease.LeaseLost` and changes nothing. Operator actions need no
    lease: they are decisions an operator made, serialized with the ticks by the row lock.
    """

    def __init__(
        self,
        db: Database,
        *,
        url_for: Callable[[str, str, int], str],
        clock: Callable[[], float] = time.time,
        tick_s: float = 1.0,
        fence: Callable[[Session], None] | None = None,
    ) -> None:
        self.db = db
        self.url_for = url_for
        self.clock = clock
        self.tick_s = tick_s
        self.fence = fence
        self.ticks = 0
        self.errors = 0
        self._lock = threading.RLock()
        self._wake = threading.Event()

    # --- lifecycle ---

    def run(self, stop: threading.Event, *, after_tick: Callable[[], Any] | None = None) -> None:
        """Tick until ``stop`` is set; ``after_tick`` publishes what the tick decided."""
        while not stop.is_set():
            try:
                self.tick()
            except LeaseLost as exc:
                log.warning("rollout engine stops: %s", exc)
                return
            if after_tick is not None:
                try:
                    after_tick()
                except Exception:
                    log.exception("publishing after a tick failed")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def idle(self, timeout: float | None = None) -> None:
        """Wait until the next tick is due (``tick_s``) or :meth:`wake` is called."""
        self._wake.wait(self.tick_s if timeout is None else timeout)
        self._wake.clear()

    def tick(self) -> None:
        """One evaluation of every rollout that is active or still watching its devices."""
        now = self.clock()
        with self.db.read() as session:
            ids = list(
                session.scalars(
                    sa.select(Rollout.id)
                    .where(
                        sa.or_(
                            Rollout.state.in_([s.value for s in ACTIVE_STATES]),
                            Rollout.following.is_(True),
                            Rollout.finished_at > now - TRACK_FINISHED_S,
                        )
                    )
                    .order_by(Rollout.created_at)
                )
            )
        for rollout_id in ids:
            try:
                self._with_rollout(rollout_id, lambda step: step.run(), fenced=True)
            except LeaseLost:
                raise  # not ours to decide any more: the caller stops ticking
            except Exception:
                self.errors += 1
                log.exception("rollout %s: tick failed", rollout_id)
        self.ticks += 1

    def _with_rollout(
        self, rollout_id: str, action: Callable[[_Step], Any], *, fenced: bool = False
    ) -> dict[str, Any]:
        with self._lock, self.db.write() as session:
            rollout = session.get(Rollout, rollout_id, with_for_update=True)
            if rollout is None:
                raise NotFound(f"no rollout {rollout_id!r}")
            step = _Step(self, session, rollout)
            action(step)
            session.flush()
            if fenced and self.fence is not None:
                # Last, right before the commit: the check that counts is the latest one.
                self.fence(session)
            return self._describe(session, rollout, step.rds)

    # --- operator actions ---

    def create(self, spec: RolloutSpec, *, actor: str) -> dict[str, Any]:
        with self._lock, self.db.write() as session:
            artifact = session.get(Artifact, spec.artifact)
            if artifact is None:
                raise NotFound(f"no artifact {spec.artifact}: upload the bundle first")
            targets = matching_devices(session, spec.fleet, spec.target)
            if not targets:
                raise SpecError(f"target {spec.target} matches no device in fleet {spec.fleet!r}")
            wanted = {d.id for d in targets}
            for other in session.scalars(
                sa.select(Rollout).where(
                    Rollout.fleet == spec.fleet,
                    Rollout.state.in_([s.value for s in ACTIVE_STATES]),
                )
            ):
                other_target = Selector.parse(other.spec.get("target", "all"))
                overlap = wanted & {
                    d.id for d in matching_devices(session, spec.fleet, other_target)
                }
                if overlap:
                    raise ConflictError(
                        f"rollout {other.id} ({other.state}) targets {len(overlap)} of the "
                        "same devices: finish, abort or roll it back first"
                    )
            rollout_id = self._new_id(session)
            now = self.clock()
            rollout = Rollout(
                id=rollout_id,
                fleet=spec.fleet,
                name=spec.name,
                artifact_sha256=artifact.sha256,
                bundle=artifact.name,
                version=artifact.version,
                display_version=artifact.display_version,
                url=self.url_for(artifact.sha256, artifact.name, artifact.version),
                size=artifact.size,
                spec=spec.to_dict(),
                state=RolloutState.PENDING.value,
                wave=-1,
                gate_results=[],
                following=False,
                created_at=now,
                created_by=actor,
                updated_at=now,
                revision=0,
            )
            session.add(rollout)
            superseded = list(
                session.scalars(
                    sa.select(Rollout).where(
                        Rollout.fleet == spec.fleet,
                        Rollout.bundle == artifact.name,
                        Rollout.following.is_(True),
                    )
                )
            )
            for old in superseded:
                old.following = False
            session.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="rollout.created",
                    rollout_id=rollout_id,
                    detail={
                        "spec": spec.to_dict(),
                        "bundle": artifact.name,
                        "version": artifact.version,
                        "target_size": len(targets),
                        "superseded": [old.id for old in superseded],
                    },
                )
            )
            if spec.start_paused:
                rollout.state = RolloutState.PAUSED.value
                rollout.paused_from = RolloutState.PENDING.value
                session.add(
                    AuditEntry(
                        ts=now,
                        actor=actor,
                        action="rollout.paused",
                        rollout_id=rollout_id,
                        detail={"from": "pending", "to": "paused", "reason": "start_paused"},
                    )
                )
            session.flush()
            result = self._describe(session, rollout, [])
        self.wake()
        return result

    def _new_id(self, session: Session) -> str:
        while True:
            candidate = f"r-{secrets.token_hex(4)}"
            if session.get(Rollout, candidate) is None:
                return candidate

    def pause(self, rollout_id: str, *, actor: str) -> dict[str, Any]:
        return self._act(rollout_id, lambda step: step.pause(actor))

    def resume(self, rollout_id: str, *, actor: str) -> dict[str, Any]:
        return self._act(rollout_id, lambda step: step.resume(actor))

    def abort(self, rollout_id: str, *, actor: str, rollback: bool = False) -> dict[str, Any]:
        def act(step: _Step) -> None:
            if rollback:
                if step.state not in ACTIVE_STATES:
                    raise InvalidTransition(f"a {step.state.value} rollout cannot be aborted")
                step.rollback(actor, reason="aborted with rollback")
            else:
                step.abort(actor, reason="aborted by operator")

        return self._act(rollout_id, act)

    def rollback(self, rollout_id: str, *, actor: str) -> dict[str, Any]:
        return self._act(rollout_id, lambda step: step.rollback(actor, reason="operator rollback"))

    def _act(self, rollout_id: str, action: Callable[[_Step], Any]) -> dict[str, Any]:
        result = self._with_rollout(rollout_id, action)
        self.wake()
        return result

    # --- reading ---

    def get(self, rollout_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None:
                raise NotFound(f"no rollout {rollout_id!r}")
            rds = list(
                session.scalars(
                    sa.select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                )
            )
            return self._describe(session, rollout, rds)

    def list_rollouts(self, *, fleet: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.read() as session:
            query = sa.select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)
            if fleet is not None:
                query = query.where(Rollout.fleet == fleet)
            rollouts = list(session.scalars(query))
            counts = self._counts(session, [r.id for r in rollouts])
            return [
                self._summary(r, self._stats_from_counts(r, counts.get(r.id, []))) for r in rollouts
            ]

    def devices(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.db.read() as session:
            if session.get(Rollout, rollout_id) is None:
                raise NotFound(f"no rollout {rollout_id!r}")
            rows = session.execute(
                sa.select(RolloutDevice, Device.fleet, Device.device)
                .join(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.rollout_id == rollout_id)
                .order_by(RolloutDevice.wave, RolloutDevice.id)
            )
            return [
                {
                    "device": device,
                    "fleet": fleet,
                    "wave": rd.wave + 1,
                    "late": rd.late,
                    "state": rd.state,
                    "attempt": rd.attempt,
                    "sent_at": rd.sent_at,
                    "finished_at": rd.finished_at,
                    "reason": rd.reason,
                    "acknowledged": rd.acknowledged,
                    "inferences": rd.inferences,
                    "metrics": rd.metrics,
                    "previous_model": None
                    if rd.prev_model_name is None
                    else f"{rd.prev_model_name}:{rd.prev_model_version}",
                }
                for rd, fleet, device in rows
            ]

    def audit(self, *, rollout_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        with self.db.read() as session:
            query = sa.select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if rollout_id is not None:
                query = query.where(AuditEntry.rollout_id == rollout_id)
            return [
                {
                    "id": e.id,
                    "ts": e.ts,
                    "actor": e.actor,
                    "action": e.action,
                    "rollout_id": e.rollout_id,
                    "device": e.device,
                    "detail": e.detail,
                }
                for e in session.scalars(query)
            ]

    @staticmethod
    def _counts(
        session: Session, ids: Sequence[str]
    ) -> dict[str, list[tuple[int, bool, str, bool, int]]]:
        if not ids:
            return {}
        rows = session.execute(
            sa.select(
                RolloutDevice.rollout_id,
                RolloutDevice.wave,
                RolloutDevice.late,
                RolloutDevice.state,
                RolloutDevice.acknowledged,
                sa.func.count(),
            )
            .where(RolloutDevice.rollout_id.in_(ids))
            .group_by(
                RolloutDevice.rollout_id,
                RolloutDevice.wave,
                RolloutDevice.late,
                RolloutDevice.state,
                RolloutDevice.acknowledged,
            )
        )
        result: dict[str, list[tuple[int, bool, str, bool, int]]] = {}
        for rid, wave, late, state, acknowledged, count in rows:
            result.setdefault(rid, []).append((wave, late, state, acknowledged, count))
        return result

    @staticmethod
    def _stats_from_counts(
        rollout: Rollout, rows: Iterable[tuple[int, bool, str, bool, int]]
    ) -> tuple[list[WaveStats], WaveStats]:
        waves = list(rollout.spec.get("waves", [1.0]))
        stats = [WaveStats(i, float(share)) for i, share in enumerate(waves)]
        late = WaveStats(len(waves), 1.0)
        for wave, is_late, state, acknowledged, count in rows:
            target = late if is_late else stats[wave] if wave < len(stats) else late
            target.add(state, acknowledged, count)
        return stats, late

    def _summary(
        self, rollout: Rollout, stats: tuple[list[WaveStats], WaveStats]
    ) -> dict[str, Any]:
        waves, late = stats
        spec = rollout.spec
        remaining = None
        if rollout.healthy_since is not None and rollout.state == RolloutState.WAITING.value:
            remaining = max(
                0.0, float(spec.get("min_wave_time", 0)) - (self.clock() - rollout.healthy_since)
            )
        return {
            "id": rollout.id,
            "name": rollout.name,
            "fleet": rollout.fleet,
            "bundle": rollout.bundle,
            "version": rollout.version,
            "display_version": rollout.display_version,
            "artifact": rollout.artifact_sha256,
            "url": rollout.url,
            "size": rollout.size,
            "state": rollout.state,
            "wave": rollout.wave + 1,
            "waves": len(waves),
            "wave_started_at": rollout.wave_started_at,
            "healthy_since": rollout.healthy_since,
            "min_wave_time_remaining": remaining,
            "reason": rollout.reason,
            "following": rollout.following,
            "created_at": rollout.created_at,
            "created_by": rollout.created_by,
            "updated_at": rollout.updated_at,
            "finished_at": rollout.finished_at,
            "spec": spec,
            "gate_results": rollout.gate_results,
            "wave_stats": [w.to_dict() for w in waves],
            "late": late.to_dict(),
            "totals": {
                "devices": sum(w.devices for w in waves) + late.devices,
                "succeeded": sum(w.succeeded for w in waves) + late.succeeded,
                "failed": sum(w.failed for w in waves) + late.failed,
                "pending": sum(w.pending for w in waves) + late.pending,
                "rolled_back": sum(w.rolled_back for w in waves) + late.rolled_back,
            },
        }

    def _describe(
        self, session: Session, rollout: Rollout, rds: Sequence[RolloutDevice]
    ) -> dict[str, Any]:
        counts: dict[tuple[int, bool, str, bool], int] = {}
        for rd in rds:
            key = (rd.wave, rd.late, rd.state, rd.acknowledged)
            counts[key] = counts.get(key, 0) + 1
        rows = [(*key, count) for key, count in counts.items()]
        return self._summary(rollout, self._stats_from_counts(rollout, rows))
