"""A rollout v1 -> v2 in waves reaching every real agent, and a broken v3 that aborts itself.

The agents run v1 (sideloaded) and answer predictions throughout. v2 goes out through the
real CLI in three waves of one device, gated on the golden self-test, error rate, latency and
drift the agents report. v3's golden set does not match its model: the first device's
self-test refuses it, the failure breaches the rollout, and the controller rolls it back
without any other device ever being sent v3.
"""

from __future__ import annotations

import urllib.request
from http.cookiejar import CookieJar

import pytest

from edgekit.protocol import Desired

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_full_rollout_in_waves_reaches_every_agent(make_fleet, desired_watch, release, e2e):
    fleet = make_fleet()
    watch = desired_watch(fleet)
    e2e.wait_serving(fleet, 1)
    rid = e2e.create_rollout(fleet, release.bundles[2])
    done = e2e.wait_rollout(fleet, rid, "completed", "rolled-back", "paused", "aborted")
    assert done["state"] == "completed", done
    assert [w["devices"] for w in done["wave_stats"]] == [1, 1, 1]
    assert done["totals"]["succeeded"] == 3 and done["totals"]["failed"] == 0
    assert {g["verdict"] for g in done["gate_results"]} == {"pass"}, done["gate_results"]

    # Each agent serves v2: its HTTP API and `edgekit-agent status` say so.
    e2e.wait_serving(fleet, 2)
    for agent in fleet.agents:
        status = agent.status()
        assert status["active"]["version"] == 2, status
        assert status["installed_version"] == 2
        assert e2e.installs(agent, 2) == 1
    e2e.wait_for(
        lambda: set(e2e.registry_versions(fleet).values()) == {2},
        what="the registry to show v2 on every device",
    )
    # Waves were one device each, in sequence: the audit log has three wave starts.
    actions = [e["action"] for e in reversed(fleet.client.rollout_audit(rid))]
    assert actions.count("wave.started") == 3 and actions[-1] == "rollout.completed"
    # One desired message per device on the broker.
    seen = [topic for topic, payload in watch.raw() if payload not in (b"", b"(null)")]
    assert sorted(seen) == sorted(
        f"edgekit/v1/{e2e.FLEET}/{a.device}/desired" for a in fleet.agents
    )
    e2e.assert_answered_throughout(fleet)

    status = fleet.edgekit("rollout", "status", rid, "--audit")
    assert status.returncode == 0 and "completed" in status.stdout, status.stderr
    # The dashboard shows the devices and the rollout (token once, then the session cookie).
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    with opener.open(fleet.controller.dashboard_url, timeout=10) as page:
        html = page.read().decode()
    assert rid in html and all(agent.device in html for agent in fleet.agents)


def test_broken_bundle_aborts_itself_and_agents_keep_serving_v2(
    make_fleet, desired_watch, release, e2e
):
    fleet = make_fleet()
    e2e.wait_serving(fleet, 1)
    v2 = e2e.create_rollout(fleet, release.bundles[2], "--waves", "100%", "--min-wave-time", "0s")
    assert e2e.wait_rollout(fleet, v2, "completed", "rolled-back")["state"] == "completed"
    e2e.wait_serving(fleet, 2)
    watch = desired_watch(fleet)  # retained: it sees every device's v2 desired state first
    e2e.wait_for(lambda: len(watch.raw()) == 3, what="the retained v2 desired states")
    v2_payloads = dict(watch.raw())

    v3 = e2e.create_rollout(fleet, release.bundles[3])
    final = e2e.wait_rollout(fleet, v3, "completed", "rolled-back", "paused", "aborted")
    assert final["state"] == "rolled-back", final
    assert "devices failed" in final["reason"]
    touched = fleet.client.rollout_devices(v3)
    assert len(touched) == 1, touched  # the first wave only: nobody else was sent v3
    assert touched[0]["state"] == "rolled-back" and "failed" in touched[0]["reason"]
    canary = fleet.agent(touched[0]["device"])
    # The canary's own log: it tried v3 once, and its self-test refused it.
    assert e2e.installs(canary, 3) == 1
    refusal = [e for e in canary.status()["events"] if e["type"] == "update-refused"]
    assert refusal and refusal[-1]["reason"] == "selftest-failed", refusal
    assert all(e2e.installs(agent, 3) == 0 for agent in fleet.agents if agent is not canary)
    # Its desired state went v2 -> v3 -> v2 again, byte for byte, on the broker.
    topic = f"edgekit/v1/{e2e.FLEET}/{canary.device}/desired"
    e2e.wait_for(
        lambda: [p for t, p in watch.raw() if t == topic][-1] == v2_payloads[topic],
        what="the v2 desired state restored on the broker",
    )
    history = [Desired.from_json(p).rollout_id for t, p in watch.raw() if t == topic]
    assert history == [v2, v3, v2], history
    # Every agent still serves v2, and answered every prediction along the way.
    e2e.wait_serving(fleet, 2)
    assert set(e2e.registry_versions(fleet).values()) == {2}
    e2e.assert_answered_throughout(fleet)
    audit = {(e["actor"], e["action"]) for e in fleet.client.rollout_audit(v3)}
    assert ("engine", "rollout.breach") in audit and ("engine", "rollout.rolled-back") in audit
