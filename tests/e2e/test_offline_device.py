"""An agent that is offline during its wave, and comes back later.

One agent process is stopped (its clean ``offline`` status reaches the controller) before the
rollout starts. Its wave does not wait for it forever: after the per-device timeout it is
left out (``--on-timeout exclude``: the rollout completes) or counted as a failure
(``--on-timeout fail``: the breach pauses the rollout). Started again, the agent finds its
desired state retained on the broker and installs the bundle by itself.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("policy", ["exclude", "fail"])
def test_device_offline_during_its_wave_rejoins_and_gets_the_desired_state(
    make_fleet, release, e2e, policy
):
    fleet = make_fleet()
    e2e.wait_serving(fleet, 1)
    away = fleet.agents[1]
    assert away.stop() == 0  # a clean stop: status offline, reason shutdown
    e2e.wait_for(
        lambda: not {d["device"]: d for d in fleet.client.devices()}[away.device]["online"],
        what="the registry to show the stopped agent offline",
    )
    rid = e2e.create_rollout(
        fleet,
        release.bundles[2],
        "--waves", "100%",
        "--min-wave-time", "0s",
        "--device-timeout", "5s",
        "--on-timeout", policy,
        "--on-breach", "pause",
    )  # fmt: skip
    expected = "completed" if policy == "exclude" else "paused"
    final = e2e.wait_rollout(fleet, rid, expected, "completed", "paused", "rolled-back")
    assert final["state"] == expected, final
    states = {d["device"]: d["state"] for d in fleet.client.rollout_devices(rid)}
    assert states.pop(away.device) == ("excluded" if policy == "exclude" else "timed-out")
    assert set(states.values()) == {"succeeded"}
    if policy == "fail":
        assert "1 of 3 devices failed" in final["reason"]
    assert e2e.installs(away, 2) == 0

    # Back online: the retained desired state brings it to v2 without anyone resending it.
    away.start()
    e2e.wait_for(
        lambda: e2e.serving(away) == ("tiny", 2),
        timeout=60,
        what="the returning agent to install v2",
    )
    assert e2e.installs(away, 2) == 1
    e2e.wait_for(
        lambda: e2e.registry_versions(fleet)[away.device] == 2,
        what="the registry to show v2 on the returning agent",
    )
    if policy == "fail":
        resumed = fleet.edgekit("rollout", "resume", rid)
        assert resumed.returncode == 0, resumed.stderr
        done = e2e.wait_rollout(fleet, rid, "completed", "rolled-back", "paused")
        assert done["state"] == "completed", done
    e2e.wait_serving(fleet, 2)
    e2e.assert_answered_throughout(fleet)
