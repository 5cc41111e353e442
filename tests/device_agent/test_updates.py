"""The update state machine end to end: real bundles, real ONNX Runtime, a real state dir.

Attack tests read like python-tuf's: the attack in the name, the refusal reason and the
byte-identical state directory in the assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from support.bundles import Member, read_members, resign, rewrite, write_members

from device_agent.errors import (
    InferenceError,
    InputError,
    NoModel,
    NothingToRollBack,
    StateLocked,
    UpdateInProgress,
)
from device_agent.service import InferenceService
from device_agent.updates import Outcome
from edgekit._jsonutil import dumps
from edgekit.manifest import Targets

# ------------------------------------------------------------------------- basics


def test_fresh_device_serves_nothing(kit):
    agent = kit.agent()
    assert isinstance(agent, InferenceService)
    assert agent.health()["status"] == "no-model"
    assert agent.model_info()["name"] is None
    with pytest.raises(NoModel):
        agent.predict(kit.x)


def test_install_then_predict(kit):
    agent = kit.agent()
    result = agent.install(kit.bundle(1, "m1"), wait_for_health=False)
    assert result.outcome is Outcome.PENDING
    assert result.selftest is not None and result.selftest.passed and result.selftest.samples == 4
    out = agent.predict(kit.x)
    np.testing.assert_allclose(out["probabilities"], kit.expected("m1"), rtol=1e-6)
    for _ in range(4):
        agent.predict(kit.x)
    final = agent.evaluate_health()
    assert final is not None and final.outcome is Outcome.COMMITTED
    info = agent.model_info()
    assert (info["name"], info["version"], info["runtime"]) == ("tiny", 1, "onnxruntime")
    assert info["inputs"][0]["name"] == "input" and info["outputs"][0]["name"] == "probabilities"
    assert agent.health()["status"] == "ok"
    state = json.loads((kit.state_dir / "state.json").read_bytes())
    assert state["active"] == result.slot and state["installed_version"] == 1
    assert state["pending"] is None and state["schema"] == 1
    types = kit.event_types()
    for expected in ("update-started", "staged", "selftest-passed", "activated", "committed"):
        assert expected in types
    seqs = [e["seq"] for e in kit.events()]
    assert seqs == list(range(1, len(seqs) + 1))


def test_wait_for_health_commits_on_timeout_without_traffic(kit):
    agent = kit.agent(kit.config(min_inferences=1000, max_seconds=0.2))
    result = agent.install(kit.bundle(1))
    assert result.outcome is Outcome.COMMITTED
    assert result.health is not None and result.health.inferences == 0


def test_no_traffic_with_on_timeout_rollback_rolls_back(kit):
    agent = kit.agent(kit.config(min_inferences=1000, max_seconds=0.1, on_timeout="rollback"))
    result = agent.install(kit.bundle(1))
    assert result.outcome is Outcome.ROLLED_BACK and result.reason == "health-no-traffic"
    with pytest.raises(NoModel):
        agent.predict(kit.x)


def test_bad_input_is_rejected_not_counted_as_error(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1))
    with pytest.raises(InputError):
        agent.predict(np.zeros((1, 3), np.float32))
    snap = agent.metrics.snapshot()
    assert snap.rejected_inputs == 1 and snap.errors == 0


def test_second_agent_on_the_same_state_dir_is_refused(kit):
    kit.agent()
    with pytest.raises(StateLocked):
        kit.agent()


def test_install_while_a_health_window_is_open_is_refused(kit):
    agent = kit.agent()
    agent.install(kit.bundle(1), wait_for_health=False)
    with pytest.raises(UpdateInProgress):
        agent.install(kit.bundle(2), wait_for_health=False)


# ------------------------------------------------------------------------- refusals


def _untrusted_key(kit) -> Path:
    return kit.bundle(5, "m2", keys="B")


def _tampered_model(kit) -> Path:
    def flip(members: list[Member]) -> list[Member]:
        for member in members:
            if member.name.endswith(".onnx"):
                member.data = member.data[:-1] + bytes([member.data[-1] ^ 1])
        return members

    return rewrite(kit.bundle(5, "m2"), flip)


def _replayed_old_version(kit) -> Path:
    return kit.bundle(2, "m2")  # v2 is committed: same version is a rollback too


def _older_version(kit) -> Path:
    return kit.bundle(1, "m2")


def _expired(kit) -> Path:
    created = datetime.now(timezone.utc) - timedelta(days=30)
    return kit.bundle(5, "m2", created=created, expires=created + timedelta(days=1))


def _other_architecture(kit) -> Path:
    return kit.bundle(5, "m2", targets=Targets(architectures=("armv6l",)))


def _runtime_too_old(kit) -> Path:
    return kit.bundle(5, "m2", targets=Targets(runtime_version="99.0"))


def _extra_file(kit) -> Path:
    return rewrite(kit.bundle(5, "m2"), lambda m: [*m, Member("evil.sh", b"rm -rf /")])


def _missing_golden(kit) -> Path:
    return rewrite(kit.bundle(5, "m2"), lambda m: [x for x in m if x.name != "golden.npz"])


def _truncated(kit) -> Path:
    path = kit.bundle(5, "m2")
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _not_a_bundle(kit) -> Path:
    path = kit.root / "noise.ekb"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _manifest_swapped_and_resigned_by_attacker(kit) -> Path:
    def swap(members: list[Member]) -> list[Member]:
        doc = json.loads(members[0].data)
        doc["version"] = 99
        return resign(members, dumps(doc), kit.keys["B"])

    return rewrite(kit.bundle(5, "m2"), swap)


def _golden_of_another_model(kit) -> Path:
    return kit.bundle(5, "m2", golden=kit.models.goldens["m3"])


def _no_golden(kit) -> Path:
    return kit.bundle(5, "m2", golden=None)


def _signed_model_runtime_cannot_load(kit) -> Path:
    """Validly signed by the trusted key, but the model bytes are garbage."""
    members = read_members(kit.bundle(5, "m2"))
    doc = json.loads(members[0].data)
    garbage = b"\x08\x07" + bytes(range(256)) * 4
    import hashlib

    doc["files"][doc["model"]] = {"sha256": hashlib.sha256(garbage).hexdigest(), "size": 1026}
    for member in members:
        if member.name == doc["model"]:
            member.data = garbage
    out = kit.root / "garbage-model.ekb"
    return write_members(out, resign(members, dumps(doc), kit.keys["A"]))


ATTACKS: dict[str, tuple[Callable[..., Path], str, str]] = {
    "untrusted_key": (_untrusted_key, "untrusted-key", "verify"),
    "tampered_model": (_tampered_model, "hash-mismatch", "verify"),
    "replayed_same_version": (_replayed_old_version, "rollback", "verify"),
    "older_version": (_older_version, "rollback", "verify"),
    "expired": (_expired, "expired", "verify"),
    "other_architecture": (_other_architecture, "incompatible", "verify"),
    "runtime_too_old": (_runtime_too_old, "incompatible", "verify"),
    "extra_file": (_extra_file, "extra-file", "verify"),
    "missing_golden_file": (_missing_golden, "missing-file", "verify"),
    "truncated_archive": (_truncated, "malformed", "verify"),
    "not_a_bundle": (_not_a_bundle, "malformed", "verify"),
    "manifest_resigned_by_attacker": (
        _manifest_swapped_and_resigned_by_attacker,
        "untrusted-key",
        "verify",
    ),
    "golden_of_another_model": (_golden_of_another_model, "selftest-failed", "selftest"),
    "no_golden_when_required": (_no_golden, "no-golden", "selftest"),
    "signed_garbage_model": (_signed_model_runtime_cannot_load, "model-load", "load"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_refused_update_leaves_the_state_dir_byte_identical(kit, attack):
    make, reason, stage = ATTACKS[attack]
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    kit.commit(agent, kit.bundle(2, "m1"))
    bundle = make(kit)
    before = kit.snapshot()
    events_before = len(kit.events())

    result = agent.install(bundle)

    assert result.outcome is Outcome.REFUSED
    assert (result.reason, result.stage) == (reason, stage), result.message
    assert kit.snapshot() == before
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    last = kit.events()[-1]
    assert last["type"] == "update-refused" and last["reason"] == reason
    assert len(kit.events()) == events_before + 2 + (stage in ("selftest", "load"))
    assert agent.health()["status"] == "ok"


def test_golden_mismatch_message_names_the_output(kit):
    agent = kit.agent()
    result = agent.install(kit.bundle(1, "m2", golden=kit.models.goldens["m1"]))
    assert result.reason == "selftest-failed"
    assert "probabilities" in result.message and "golden" in result.message
    with pytest.raises(NoModel):
        agent.predict(kit.x)


def test_no_golden_is_accepted_when_not_required(kit):
    from dataclasses import replace

    config = replace(kit.config(), require_golden=False)
    agent = kit.agent(config)
    kit.commit(agent, kit.bundle(1, "m1", golden=None))
    assert "selftest-skipped" in kit.event_types()


def test_missing_trust_file_refuses(kit):
    (kit.state_dir / "trust.json").unlink()
    agent = kit.agent()
    result = agent.install(kit.bundle(1))
    assert result.outcome is Outcome.REFUSED and result.reason == "malformed"
    assert "trust" in result.message


# ------------------------------------------------------------------------- health window


def test_health_window_latency_bound_rolls_back_automatically(kit):
    # v1 is committed without a latency bound, then the bound is made impossible for v2.
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    agent = kit.agent(kit.config(max_p95_ms=0.00001))
    result = agent.install(kit.bundle(2, "m2"), wait_for_health=False)
    assert result.outcome is Outcome.PENDING
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m2"))
    for _ in range(4):
        agent.predict(kit.x)
    final = agent.evaluate_health()
    assert final is not None and final.outcome is Outcome.ROLLED_BACK
    assert final.reason == "health-latency" and "p95" in final.message
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    state = json.loads((kit.state_dir / "state.json").read_bytes())
    assert state["installed_version"] == 1 and state["pending"] is None
    rolled = [e for e in kit.events() if e["type"] == "rolled-back"][-1]
    assert rolled["reason"] == "health-latency" and rolled["version"] == 2
    assert len(list((kit.state_dir / "slots").iterdir())) == 1  # the failed slot is gone


def test_health_window_error_rate_rolls_back_automatically(kit):
    agent = kit.agent(kit.config(min_inferences=10, max_error_rate=0.2))
    kit.commit(agent, kit.bundle(1, "m1"))
    result = agent.install(kit.bundle(2, "gather"), wait_for_health=False)
    assert result.outcome is Outcome.PENDING, result.message
    good = np.zeros((1, 16), np.float32)
    bad = np.full((1, 16), 9.0, np.float32)  # row 9 of a 4-row table: the runtime raises
    failures = 0
    for i in range(10):
        try:
            agent.predict(bad if i % 2 else good)
        except InferenceError:
            failures += 1
    assert failures == 5
    final = agent.evaluate_health()
    assert final is not None and final.outcome is Outcome.ROLLED_BACK
    assert final.reason == "health-errors" and final.health is not None
    assert final.health.errors == 5 and final.health.inferences == 10
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))


def test_old_model_traffic_does_not_count_in_the_new_models_window(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1))
    for _ in range(20):
        agent.predict(kit.x)
    agent.install(kit.bundle(2, "m2"), wait_for_health=False)
    assert agent.evaluate_health() is None  # 20 old requests do not fill the window
    assert agent.status()["health_window"]["inferences"] == 0


def test_manual_rollback_during_health_window_aborts_the_update(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.install(kit.bundle(2, "m2"), wait_for_health=False)
    result = agent.rollback("operator")
    assert result.outcome is Outcome.ROLLED_BACK and result.reason == "operator"
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    assert agent.model_info()["installed_version"] == 1


def test_manual_rollback_of_a_committed_update_keeps_the_floor(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    kit.commit(agent, kit.bundle(2, "m2"))
    result = agent.rollback()
    assert result.outcome is Outcome.ROLLED_BACK and result.version == 1
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    assert agent.model_info()["installed_version"] == 2
    with pytest.raises(NothingToRollBack):
        agent.rollback()
    # The floor still refuses v2 again; v3 is accepted.
    assert agent.install(kit.bundle(2, "m2")).reason == "rollback"
    kit.commit(agent, kit.bundle(3, "m2"))


# ------------------------------------------------------------------------- restarts


def test_anti_rollback_floor_survives_restart(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    kit.commit(agent, kit.bundle(3, "m2"))
    agent.close()
    agent = kit.agent()
    assert agent.model_info()["installed_version"] == 3
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m2"))
    result = agent.install(kit.bundle(2, "m3"))
    assert result.outcome is Outcome.REFUSED and result.reason == "rollback"


def test_corrupt_active_model_at_startup_falls_back_to_previous(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    kit.commit(agent, kit.bundle(2, "m2"))
    active = agent.model_info()["slot"]
    agent.close()
    model = next((kit.state_dir / "slots" / active).glob("*.onnx"))
    model.write_bytes(model.read_bytes()[:100])

    agent = kit.agent()
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    health = agent.health()
    assert health["status"] == "degraded"
    assert health["fallback"]["slot"] == active and health["fallback"]["reason"] == "hash-mismatch"
    fallback = [e for e in kit.events() if e["type"] == "boot-fallback"][-1]
    assert fallback["failed_slot"] == active and fallback["reason"] == "hash-mismatch"
    # The next update replaces the broken slot; the model that served becomes previous.
    kit.commit(agent, kit.bundle(3, "m3"))
    assert agent.health()["status"] == "ok"
    state = json.loads((kit.state_dir / "state.json").read_bytes())
    assert state["previous"] != active
    assert not (kit.state_dir / "slots" / active).exists()


def test_unloadable_active_without_hash_check_also_falls_back(kit):
    from dataclasses import replace

    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    kit.commit(agent, kit.bundle(2, "m2"))
    active = agent.model_info()["slot"]
    agent.close()
    model = next((kit.state_dir / "slots" / active).glob("*.onnx"))
    model.write_bytes(b"not a model")
    agent = kit.agent(replace(kit.config(), verify_on_boot=False))
    assert agent.health()["fallback"]["reason"] == "model-load"
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))


CRASH_IN_HEALTH_WINDOW = """
import os, sys
from device_agent.agent import Agent
from device_agent.config import AgentConfig, HealthConfig
agent = Agent(config=AgentConfig(state_dir=sys.argv[1], health=HealthConfig(min_inferences=5)))
result = agent.install(sys.argv[2], wait_for_health=False)
assert result.ok, result.message
if sys.argv[3] == "crash":
    os._exit(0)  # no clean shutdown: as if the power went
agent.close()
"""


def _child(kit, bundle: Path, how: str) -> None:
    subprocess.run(
        [sys.executable, "-c", CRASH_IN_HEALTH_WINDOW, str(kit.state_dir), str(bundle), how],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )


def test_crash_during_health_window_rolls_back_at_restart(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    _child(kit, kit.bundle(2, "m2"), "crash")
    assert json.loads((kit.state_dir / "state.json").read_bytes())["pending"]["phase"] == "health"

    agent = kit.agent()
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    assert agent.model_info()["pending"] is None
    rolled = [e for e in kit.events() if e["type"] == "rolled-back"][-1]
    assert rolled["reason"] == "interrupted" and rolled["version"] == 2
    assert len(list((kit.state_dir / "slots").iterdir())) == 1


def test_clean_stop_during_health_window_resumes_it_at_restart(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    _child(kit, kit.bundle(2, "m2"), "stop")
    assert json.loads((kit.state_dir / "state.json").read_bytes())["pending"]["resume"] is True

    agent = kit.agent()
    assert "health-resumed" in kit.event_types()
    for _ in range(5):
        np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m2"))
    result = agent.evaluate_health()
    assert result is not None and result.outcome is Outcome.COMMITTED
    # A rollback after a resumed window has to load the old model from its slot.
    agent.close()
    agent = kit.agent()
    assert agent.model_info()["installed_version"] == 2


def test_resumed_window_that_fails_rolls_back_to_the_old_slot(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    _child(kit, kit.bundle(2, "m2"), "stop")
    agent = kit.agent(kit.config(max_p95_ms=0.00001))
    for _ in range(5):
        agent.predict(kit.x)
    result = agent.evaluate_health()
    assert result is not None and result.outcome is Outcome.ROLLED_BACK
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))


def test_leftovers_of_a_killed_writer_are_removed_at_start(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1))
    agent.close()
    slots = kit.state_dir / "slots"
    (slots / ".20260101T000000-deadbeef.abc.partial").mkdir()
    (kit.state_dir / ".state.json.xyz.tmp").write_bytes(b"{")
    (slots / "20260101T000000-deadbeef").mkdir()  # a slot no state refers to
    kit.agent()
    assert sorted(p.name for p in slots.iterdir()) == [
        json.loads((kit.state_dir / "state.json").read_bytes())["active"]
    ]
    assert not (kit.state_dir / ".state.json.xyz.tmp").exists()


def test_readonly_agent_serves_what_the_service_would_after_a_crash(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    _child(kit, kit.bundle(2, "m2"), "crash")
    before = kit.snapshot()
    reader = kit.agent(readonly=True)
    np.testing.assert_allclose(reader.predict(kit.x)["probabilities"], kit.expected("m1"))
    assert kit.snapshot() == before  # nothing written, no lock taken


def test_close_during_a_waiting_install_hands_the_window_over(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    bundle = kit.bundle(2, "m2")
    results = []
    waiter = threading.Thread(target=lambda: results.append(agent.install(bundle)))
    waiter.start()
    deadline = time.monotonic() + 30
    while agent.updates.window is None and time.monotonic() < deadline:
        time.sleep(0.005)
    agent.close()  # SIGTERM while install() waits for traffic that never comes
    waiter.join(timeout=30)
    assert results and results[0].outcome is Outcome.PENDING
    state = json.loads((kit.state_dir / "state.json").read_bytes())
    assert state["pending"]["phase"] == "health" and state["pending"]["resume"] is True


def test_rollback_from_another_thread_wakes_a_waiting_install(kit):
    agent = kit.agent(kit.config(max_seconds=300.0))
    kit.commit(agent, kit.bundle(1, "m1"))
    bundle = kit.bundle(2, "m2")
    results = []
    waiter = threading.Thread(target=lambda: results.append(agent.install(bundle)))
    waiter.start()
    deadline = time.monotonic() + 30
    while agent.updates.window is None and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    agent.rollback("operator")
    waiter.join(timeout=30)
    assert time.monotonic() - started < 5  # not the 300 s of the window
    assert results and results[0].outcome is Outcome.ROLLED_BACK
    assert results[0].reason == "operator"
    assert agent.status()["last_update"]["outcome"] == "rolled-back"
