"""End to end: the controller process, mosquitto, and simulated devices on the real protocol.

Each test drives the controller the way an operator does (CLI and REST API) and checks the
outcome where a device would see it: on the broker (``mosquitto_sub`` on every ``desired``
topic) and in the simulated devices' own state.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.protocol import Desired

pytestmark = pytest.mark.slow


def cli_run(controller, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(
        cli,
        [*args],
        env={
            "EDGEKIT_CONTROLLER": controller.url,
            "EDGEKIT_FLEET_TOKEN": controller.client.token,
            "USER": "pytest",
            "COLUMNS": "200",
        },
        catch_exceptions=False,
    )
    assert result.exit_code == code, result.output
    return result.output


def create(controller, kit, bundle, **options) -> dict:
    artifact = controller.client.upload(bundle)
    return controller.client.create_rollout(kit.rollout_options(artifact["sha256"], **options))


def installs_of(sim, devices) -> dict[str, int]:
    return {d: sim.snapshot(d)["installs"] for d in devices}


def test_full_rollout_in_waves(db_url, start_controller, simulate, desired_watch, bundles, kit):
    sim = simulate(devices=12)
    controller = start_controller(db_url)
    kit.wait_devices(controller.client, 12)
    out = cli_run(
        controller,
        "rollout", "create", str(bundles[2]),
        "--fleet", kit.FLEET,
        "--target", "group=cameras",
        "--waves", "25%,50%,100%",
        "--min-wave-time", "0.5s",
        "--success-threshold", "95%",
        "--max-failures", "5%",
        "--min-inferences", "20",
        "--gate", "p95_latency_ms<=30",
        "--gate", "error_rate<=0.01",
        "--gate", "drift_psi<=0.2",
        "--gate", "golden_pass==1",
        "--json",
    )  # fmt: skip
    rid = json.loads(out)["id"]
    done = kit.wait_state(controller.client, rid, {"completed"}, timeout=60)
    assert [w["devices"] for w in done["wave_stats"]] == [3, 3, 6]
    assert done["totals"] == {
        "devices": 12, "succeeded": 12, "failed": 0, "pending": 0, "rolled_back": 0
    }  # fmt: skip
    assert {g["verdict"] for g in done["gate_results"]} == {"pass"}
    # Every device was sent this rollout exactly once, and runs it now.
    seen = kit.desired_by_device(desired_watch)
    assert sorted(seen) == sorted(sim.device_ids())
    assert all([m["rollout_id"] for m in msgs] == [rid] for msgs in seen.values())
    assert set(installs_of(sim, sim.device_ids()).values()) == {1}
    kit.wait_for(
        lambda: (
            {
                (d["current"]["name"], d["current"]["version"])
                for d in controller.client.devices(fleet=kit.FLEET)
            }
            == {("tiny", 2)}
        ),
        what="the registry to show tiny:2 everywhere",
    )
    actions = [e["action"] for e in reversed(controller.client.rollout_audit(rid))]
    assert actions[0] == "rollout.created" and actions[-1] == "rollout.completed"
    assert actions.count("wave.started") == 3
    status = cli_run(controller, "rollout", "status", rid, "--audit")
    assert "completed" in status and "operator (pytest): rollout.created" in status


def test_golden_failure_aborts_and_rolls_back(
    sqlite_url, start_controller, simulate, desired_watch, bundles, kit
):
    sim = simulate(devices=12, fail_golden=frozenset({3}))
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 12)
    v2 = create(controller, kit, bundles[2], waves="100%", min_wave_time=0)["id"]
    kit.wait_state(controller.client, v2, {"completed"}, timeout=30)
    v2_payloads = kit.last_payloads(desired_watch)

    v3 = create(controller, kit, bundles[3], waves="25%,100%")["id"]
    final = kit.wait_state(controller.client, v3, {"rolled-back", "completed"}, timeout=30)
    assert final["state"] == "rolled-back"
    assert "devices failed" in final["reason"]
    touched = [d["device"] for d in controller.client.rollout_devices(v3)]
    assert len(touched) == 3  # the first wave only: 25% of 12
    # Every touched device's desired state is its v2 one again, byte for byte, on the broker.
    kit.wait_for(
        lambda: all(kit.last_payloads(desired_watch)[d] == v2_payloads[d] for d in touched),
        what="the v2 desired state to be restored on the broker",
    )
    for device in touched:
        assert sim.snapshot(device)["current"] == ("tiny", 2)  # the self-test refused v3
    registry = {d["device"]: d for d in controller.client.devices(fleet=kit.FLEET)}
    assert {registry[d]["desired_rollout"] for d in touched} == {v2}
    actors = {(e["actor"], e["action"]) for e in controller.client.rollout_audit(v3)}
    assert ("engine", "rollout.breach") in actors and ("engine", "rollout.rolled-back") in actors


def test_latency_gate_breach_commands_installed_devices_back(
    sqlite_url, start_controller, simulate, desired_watch, bundles, kit
):
    sim = simulate(devices=8, latency_ms={3: 55.0})
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 8)
    rid = create(controller, kit, bundles[3], waves="25%,100%")["id"]
    final = kit.wait_state(controller.client, rid, {"rolled-back", "completed"}, timeout=30)
    assert final["state"] == "rolled-back"
    assert "gate p95_latency_ms<=30 failed" in final["reason"]
    touched = [d["device"] for d in controller.client.rollout_devices(rid)]
    assert len(touched) == 2
    # They had installed v3; the rollback command took them back to v1.
    kit.wait_for(
        lambda: all(sim.snapshot(d)["current"] == ("tiny", 1) for d in touched),
        what="the rollback command to reach the devices",
    )
    assert all(kit.last_payloads(desired_watch)[d] == b"" for d in touched)  # withdrawn
    untouched = set(sim.device_ids()) - set(touched)
    assert all(sim.snapshot(d)["installs"] == 0 for d in untouched)


def test_controller_killed_mid_rollout_resumes_without_resending(
    db_url, start_controller, simulate, desired_watch, bundles, kit
):
    sim = simulate(devices=10)
    controller = start_controller(db_url)
    kit.wait_devices(controller.client, 10)
    rid = create(controller, kit, bundles[2], waves="20%,60%,100%", min_wave_time="1.5s")["id"]
    kit.wait_for(
        lambda: controller.client.rollout(rid)["wave"] >= 2,
        timeout=30,
        what="the second wave to start",
    )
    controller.kill()
    seen_before = {d: len(m) for d, m in kit.desired_by_device(desired_watch).items()}
    controller.start()  # same database, same broker, same client id
    done = kit.wait_state(controller.client, rid, {"completed"}, timeout=60)
    assert done["totals"]["succeeded"] == 10
    seen = kit.desired_by_device(desired_watch)
    counts = Counter(len(messages) for messages in seen.values())
    assert counts == Counter({1: 10}), seen  # one desired message per device, restart or not
    assert all(len(seen[d]) == n for d, n in seen_before.items())
    assert set(installs_of(sim, sim.device_ids()).values()) == {1}
    assert controller.client.stats()["reconcile"]["complete"] is True


@pytest.mark.parametrize("policy", ["exclude", "fail"])
def test_device_offline_during_its_wave(
    sqlite_url, start_controller, simulate, desired_watch, bundles, kit, policy
):
    sim = simulate(devices=6)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 6)
    sim.go_offline("sim-0003")  # power lost: the broker publishes its last will
    kit.wait_for(
        lambda: not {d["device"]: d for d in controller.client.devices()}["sim-0003"]["online"],
        what="the device to be offline",
    )
    rid = create(
        controller,
        kit,
        bundles[2],
        waves="100%",
        device_timeout="2s",
        on_timeout=policy,
        on_breach="pause",
        success_threshold="100%",  # the wave waits for the offline device's fate
        max_failures="10%",
    )["id"]
    expected = "completed" if policy == "exclude" else "paused"
    final = kit.wait_state(controller.client, rid, {expected}, timeout=30)
    states = {d["device"]: d["state"] for d in controller.client.rollout_devices(rid)}
    assert states.pop("sim-0003") == ("excluded" if policy == "exclude" else "timed-out")
    assert set(states.values()) == {"succeeded"}
    if policy == "fail":
        assert "1 of 6 devices failed" in final["reason"]
    # Back online, the device finds its desired state retained on the broker and installs it.
    sim.go_online("sim-0003")
    kit.wait_for(
        lambda: sim.snapshot("sim-0003")["current"] == ("tiny", 2),
        what="the returning device to install the desired bundle",
    )
    if policy == "fail":
        controller.client.act(rid, "resume")
        kit.wait_state(controller.client, rid, {"completed"}, timeout=30)


def test_late_joiner_gets_the_current_desired_state(
    sqlite_url, start_controller, simulate, bundles, kit
):
    sim = simulate(devices=4)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 4)
    rid = create(controller, kit, bundles[2], waves="50%,100%")["id"]
    kit.wait_state(controller.client, rid, {"completed"}, timeout=30)
    sim.add_devices(["late-0001"])
    kit.wait_for(
        lambda: (
            sim.devices.get("late-0001") is not None
            and sim.snapshot("late-0001")["current"] == ("tiny", 2)
        ),
        what="the late device to install the rollout's bundle",
    )
    late = [d for d in controller.client.rollout_devices(rid) if d["late"]]
    assert [d["device"] for d in late] == ["late-0001"]
    kit.wait_for(
        lambda: controller.client.rollout(rid)["late"]["succeeded"] == 1,
        what="the late device's success to be recorded",
    )


def test_operator_rollback_with_the_cli(sqlite_url, start_controller, simulate, bundles, kit):
    sim = simulate(devices=4)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 4)
    rid = create(controller, kit, bundles[2], waves="100%", min_wave_time=0)["id"]
    kit.wait_state(controller.client, rid, {"completed"}, timeout=30)
    out = cli_run(controller, "rollout", "rollback", rid)
    assert f"rollout {rid}: rolled-back" in out
    kit.wait_for(
        lambda: all(sim.snapshot(d)["current"] == ("tiny", 1) for d in sim.device_ids()),
        what="every device to be commanded back to tiny:1",
    )
    kit.wait_for(
        lambda: all(
            d["current"]["version"] == 1 for d in controller.client.devices(fleet=kit.FLEET)
        ),
        what="the registry to show tiny:1 again",
    )
    trail = cli_run(controller, "rollout", "status", rid, "--audit")
    assert "operator (pytest): rollout.rolled-back" in trail
    out = cli_run(controller, "rollout", "resume", rid, code=1)
    assert "invalid-transition" in out


def test_cli_lists_devices_and_rollouts(sqlite_url, start_controller, simulate, bundles, kit):
    simulate(devices=3)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 3)
    devices = json.loads(
        cli_run(controller, "fleet", "devices", "--target", "group=cameras", "--json")
    )
    assert sorted(d["device"] for d in devices) == ["sim-0000", "sim-0001", "sim-0002"]
    table = cli_run(controller, "fleet", "devices")
    assert "sim-0001" in table and "online" in table
    rid = create(controller, kit, bundles[2], waves="100%", min_wave_time=0)["id"]
    assert rid in cli_run(controller, "rollout", "list")
    bad = cli_run(controller, "rollout", "create", str(bundles[3]), "--gate", "nonsense", code=2)
    assert "gate" in bad
    denied = CliRunner().invoke(
        cli,
        ["fleet", "devices", "--controller", controller.url, "--token", "wrong-token-123456789"],
    )
    assert denied.exit_code == 1 and "403" in denied.output
    assert Desired  # the protocol module parses everything the tests look at
