"""state.json round trips, its forward/backward compatibility, and the crash-recovery table."""

from __future__ import annotations

import json

import pytest

from device_agent.errors import StateError
from device_agent.store import Pending, Phase, State, Store
from device_agent.updates import recovered_state

A, B, C, D = (f"20260101T00000{i}-0000000{i}" for i in range(4))


def _pending(phase: Phase, **fields) -> Pending:
    return Pending(phase=phase, slot=C, source="b.ekb", started="2026-01-01T00:00:00Z", **fields)


def test_state_round_trip_keeps_unknown_fields():
    state = State(
        active=A,
        previous=B,
        installed_version=7,
        pending=_pending(Phase.HEALTH, name="tiny", version=8, restore_active=A, from_slot=A),
        extra={"future": {"x": 1}},
    )
    doc = json.loads(state.to_bytes())
    assert doc["staging"] is None and doc["schema"] == 1 and doc["future"] == {"x": 1}
    assert State.from_bytes(state.to_bytes()) == state
    staging = State(pending=_pending(Phase.SELFTEST))
    assert json.loads(staging.to_bytes())["staging"] == C


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "must hold a JSON object"),
        (b'{"schema": 2}', "newer than this agent"),
        (b'{"schema": 1, "active": "../../etc"}', "not a slot id"),
        (b'{"schema": 1, "installed_version": -1}', "non-negative integer"),
        (b'{"schema": 1, "pending": {"phase": "dancing"}}', "unknown update phase"),
    ],
)
def test_bad_state_file_is_refused_not_guessed(data, message):
    with pytest.raises(StateError, match=message):
        State.from_bytes(data)


def test_floor_never_decreases():
    state = State(installed_version=5)
    assert state.with_floor(3).installed_version == 5
    assert state.with_floor(9).installed_version == 9
    assert State().with_floor(2).installed_version == 2


def test_garbage_collection_keeps_every_referenced_slot(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    for slot in (A, B, C, D):
        store.slot_dir(slot).mkdir()
    (store.slots_dir / "not-a-slot").mkdir()  # foreign: left alone
    state = State(active=A, pending=_pending(Phase.HEALTH, restore_previous=B))
    assert store.collect_garbage(state) == [D]
    assert sorted(p.name for p in store.slots_dir.iterdir()) == sorted([A, B, C, "not-a-slot"])


# The crash-recovery rules, one row each (docs/agent.md has the same table).


def test_crash_while_staging_or_selftesting_abandons_the_update():
    for phase in (Phase.DOWNLOAD, Phase.STAGING, Phase.SELFTEST):
        state = State(active=A, previous=B, installed_version=3, pending=_pending(phase))
        after, action = recovered_state(state)
        assert action == "abandoned"
        assert after == State(active=A, previous=B, installed_version=3)


def test_crash_in_health_window_restores_the_committed_pointers():
    state = State(
        active=C,
        previous=A,
        installed_version=3,
        pending=_pending(Phase.HEALTH, restore_active=A, restore_previous=B, from_slot=A),
    )
    after, action = recovered_state(state)
    assert action == "rolled-back"
    assert after == State(active=A, previous=B, installed_version=3)


def test_clean_stop_in_health_window_is_resumed():
    state = State(active=C, previous=A, pending=_pending(Phase.HEALTH, resume=True))
    assert recovered_state(state) == (state, None)


def test_no_update_in_flight_changes_nothing():
    state = State(active=A, previous=B, installed_version=3)
    assert recovered_state(state) == (state, None)
