"""The controller SIGKILLed in the middle of a rollout and started again on the same database.

All rollout state is in the database and the broker holds the retained desired states, so the
restarted controller resumes the rollout where it was: no device is sent the rollout again,
and no agent installs the bundle twice (each agent's own event log says so). The agents keep
serving while the controller is gone.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_controller_killed_mid_rollout_resumes_without_reupdating(
    make_fleet, desired_watch, release, e2e
):
    fleet = make_fleet()
    watch = desired_watch(fleet)
    e2e.wait_serving(fleet, 1)
    rid = e2e.create_rollout(fleet, release.bundles[2])
    e2e.wait_for(
        lambda: fleet.client.rollout(rid)["wave"] >= 2,
        timeout=60,
        what="the second wave to start",
    )
    fleet.controller.kill()  # SIGKILL: nothing is flushed, no goodbye to the broker
    before = {a.device: e2e.installs(a, 2) for a in fleet.agents}
    time.sleep(1.0)  # the fleet runs on without its controller for a moment
    fleet.controller.start()  # same database, same broker, same client id, same port
    assert fleet.controller.starts == 2
    done = e2e.wait_rollout(fleet, rid, "completed", "rolled-back", "paused", "aborted")
    assert done["state"] == "completed", done
    assert done["totals"]["succeeded"] == 3 and done["totals"]["failed"] == 0

    e2e.wait_serving(fleet, 2)
    # One install of v2 per agent, restart or not; the ones done before the kill stayed done.
    assert {a.device: e2e.installs(a, 2) for a in fleet.agents} == {
        a.device: 1 for a in fleet.agents
    }
    assert sum(before.values()) >= 1
    # One desired message per device ever reached the broker.
    topics = [topic for topic, payload in watch.raw() if payload not in (b"", b"(null)")]
    assert sorted(topics) == sorted(
        f"edgekit/v1/{e2e.FLEET}/{a.device}/desired" for a in fleet.agents
    )
    stats = fleet.client.stats()
    assert stats["reconcile"]["complete"] is True
    e2e.assert_answered_throughout(fleet)
    actions = [e["action"] for e in reversed(fleet.client.rollout_audit(rid))]
    assert actions.count("wave.started") == 3 and actions.count("rollout.started") == 1
