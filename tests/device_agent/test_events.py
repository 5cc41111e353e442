"""The event log: consecutive seq across restarts, torn tails repaired, size bounded."""

from __future__ import annotations

import json

from device_agent.events import EventLog, EventType, read_events


def test_seq_continues_across_reopen(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        first = log.append(EventType.AGENT_STARTED)
        log.append(EventType.COMMITTED, bundle="tiny", version=3, reason=None, message="ok")
    with EventLog(path) as log:
        third = log.append(EventType.AGENT_STOPPED, pid=1)
    events = read_events(path)
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert first["seq"] == 1 and third["seq"] == 3
    committed = events[1]
    assert committed["type"] == "committed" and committed["bundle"] == "tiny"
    assert committed["version"] == 3 and committed["schema"] == 1
    assert committed["time"].endswith("Z")


def test_torn_last_line_is_cut_and_the_log_stays_parseable(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.append(EventType.AGENT_STARTED)
        log.append(EventType.UPDATE_STARTED)
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 3, "type": "sta')  # the power went mid-write
    with EventLog(path) as log:
        event = log.append(EventType.STAGED)
    assert event["seq"] == 3
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]


def test_rotation_bounds_the_size_and_keeps_seq(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path, max_bytes=4096, keep=2) as log:
        for _ in range(200):
            log.append(EventType.SLOT_REMOVED, message="x" * 100)
        assert len(log.files()) == 3
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert max(sizes) <= 4096 and len(sizes) == 3
    events = read_events(path, keep=2)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], 201))
    with EventLog(path, max_bytes=4096, keep=2) as log:
        assert log.append(EventType.AGENT_STARTED)["seq"] == 201
    assert [e["seq"] for e in read_events(path, keep=2, since=199)] == [200, 201]
    assert [e["seq"] for e in read_events(path, keep=2, limit=1)] == [201]


def test_seq_is_recovered_from_the_rotated_file_when_the_current_is_empty(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path, max_bytes=1024, keep=1) as log:
        for _ in range(4):
            log.append(EventType.SLOT_REMOVED, message="y" * 300)
    # A rotation that crashed after renaming the file, before the first new line.
    path.replace(tmp_path / "events.jsonl.1")
    path.write_bytes(b"")
    with EventLog(path, max_bytes=1024, keep=1) as log:
        assert log.append(EventType.AGENT_STARTED)["seq"] == 5
