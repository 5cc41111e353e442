"""The outbox: durable FIFO until PUBACK, bounded with a reported drop policy, crash-safe.

No broker here: these tests drive the outbox directly, the way the MQTT link does (put,
pending, ack), with a fake clock for the age bound. The SIGKILL test runs a writer in a child
process and kills it mid-stream: everything it was told was committed must be there.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_agent.mqtt_link import overflow_reporter
from device_agent.outbox import ROW_OVERHEAD, DropReport, Outbox, OutboxError
from edgekit.protocol import Event, EventType, Telemetry, Topics

pytestmark = pytest.mark.timeout(120)

TOPICS = Topics("plant-1", "cam-7")
REPO = Path(__file__).resolve().parents[3]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def size_of(payload: bytes, topic: str = "t") -> int:
    return len(payload) + len(topic) + ROW_OVERHEAD


def test_put_pending_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        ids = [outbox.put("telemetry", "t", f"m{i}".encode()).id for i in range(5)]  # type: ignore[union-attr]
        assert ids == sorted(ids)
        assert [r.payload for r in outbox.pending(3)] == [b"m0", b"m1", b"m2"]
        assert [r.id for r in outbox.pending(10, after_id=ids[2])] == ids[3:]
        assert outbox.ack(ids[0], ids[2], 999_999) == 2
        assert [r.payload for r in outbox.pending()] == [b"m1", b"m3", b"m4"]
        assert outbox.stats().acked == 2


def test_sequence_numbers_are_durable_and_increase_with_ids(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        first = [outbox.put("events", "t", lambda seq: str(seq).encode()) for _ in range(3)]
        direct = outbox.next_seq()
    with Outbox(path) as outbox:
        later = outbox.put("events", "t", lambda seq: str(seq).encode())
        records = outbox.pending()
    seqs = [r.seq for r in first] + [direct, later.seq]  # type: ignore[union-attr]
    assert seqs == [1, 2, 3, 4, 5]
    assert [int(r.payload) for r in records] == [1, 2, 3, 5]


def test_wal_and_full_synchronous_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    outbox = Outbox(path)
    outbox.put("events", "t", b"kept")
    assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    outbox.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Outbox(path) as again:
        assert [r.payload for r in again.pending()] == [b"kept"]
    with pytest.raises(OutboxError, match="closed"):
        outbox.pending()


def test_a_failing_payload_builder_stores_nothing(tmp_path: Path) -> None:
    def explode(seq: int) -> bytes:
        raise ValueError("boom")

    with Outbox(tmp_path / "o.db") as outbox:
        with pytest.raises(ValueError, match="boom"):
            outbox.put("events", "t", explode)
        assert outbox.pending() == []
        assert outbox.next_seq() == 1  # the seq was not consumed
        with pytest.raises(OutboxError, match="exceeds"):
            outbox.put("events", "t", b"x" * 300_000)
        with pytest.raises(ValueError):
            outbox.put("events", "t", b"x", qos=3)


def test_oldest_telemetry_is_dropped_first_and_events_are_kept(tmp_path: Path) -> None:
    payload = b"x" * 100
    limit = 5 * size_of(payload)
    with Outbox(tmp_path / "o.db", max_bytes=limit) as outbox:
        outbox.put("events", "t", payload)
        for _ in range(10):
            outbox.put("telemetry", "t", payload)
        kinds = [r.kind for r in outbox.pending()]
        assert kinds == ["events"] + ["telemetry"] * 4
        stats = outbox.stats()
        assert stats.bytes <= limit
        assert stats.dropped_telemetry == 6 and stats.dropped_events == 0
        assert stats.unreported.telemetry == 6 and stats.unreported.by_size == 6


def test_telemetry_never_displaces_events(tmp_path: Path) -> None:
    payload = b"e" * 100
    with Outbox(tmp_path / "o.db", max_bytes=3 * size_of(payload)) as outbox:
        for _ in range(3):
            outbox.put("events", "t", payload)
        assert outbox.put("telemetry", "t", payload) is None  # dropped itself, counted
        assert [r.kind for r in outbox.pending()] == ["events"] * 3
        assert outbox.stats().dropped_telemetry == 1


def test_event_drops_are_reported_by_one_overflow_event_at_a_time(tmp_path: Path) -> None:
    payload = b"e" * 200
    limit = 4 * size_of(payload, TOPICS.events)
    reporter = overflow_reporter(TOPICS)
    with Outbox(tmp_path / "o.db", max_bytes=limit, overflow=reporter) as outbox:

        def event(i: int) -> bytes:
            return lambda seq: Event(  # type: ignore[return-value]
                device="cam-7", seq=seq, event="update.trial", message=f"{i}-" + "x" * 150
            ).to_json()

        for i in range(12):
            outbox.put("events", TOPICS.events, event(i))
        records = outbox.pending(100)
        reports = [r for r in records if b"outbox.overflow" in r.payload]
        assert len(reports) == 1, "one report pending at a time"
        first = Event.from_json(reports[0].payload)
        assert first.event == EventType.OUTBOX_OVERFLOW.value
        assert first.severity.value == "warning"
        # The newest events are kept, the oldest dropped.
        kept = [
            Event.from_json(r.payload).message.split("-")[0] for r in records if r not in reports
        ]
        assert kept == [str(i) for i in range(12 - len(kept), 12)]
        stats = outbox.stats()
        reported = first.data["events_dropped"]
        assert reported + stats.unreported.events == stats.dropped_events == 12 - len(kept)
        # Acknowledging the report lets the next one carry what accumulated meanwhile.
        outbox.ack(reports[0].id)
        second = [r for r in outbox.pending(100) if b"outbox.overflow" in r.payload]
        assert len(second) == 1
        assert Event.from_json(second[0].payload).data["events_dropped"] == (
            stats.unreported.events
        )
        assert outbox.stats().unreported.total == 0
        assert outbox.stats().overflow_reports == 2
        assert first.data["first_seq"] == 1  # the seq of the first dropped event


def test_age_bound_drops_and_reports(tmp_path: Path) -> None:
    clock = Clock()
    reports: list[DropReport] = []

    def reporter(report: DropReport, seq: int) -> tuple[str, bytes]:
        reports.append(report)
        return "t", b"report"

    with Outbox(tmp_path / "o.db", max_age_s=60, overflow=reporter, clock=clock) as outbox:
        outbox.put("telemetry", "t", b"old telemetry")
        outbox.put("events", "t", b"old event")
        clock.now += 30
        outbox.put("telemetry", "t", b"young")
        clock.now += 31
        assert outbox.enforce() == 2
        assert [r.payload for r in outbox.pending()] == [b"young", b"report"]
        assert reports[0].by_age == 2
        assert (reports[0].telemetry, reports[0].events) == (1, 1)
        clock.now += 1000
        assert outbox.enforce() == 1  # the report itself never expires
        assert [r.payload for r in outbox.pending()] == [b"report"]


def test_retained_records_supersede_older_pending_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.put("reported", "a/reported", b"v1", retain=True)
        outbox.put("events", "a/events", b"e")
        outbox.put("reported", "a/reported", b"v2", retain=True)
        assert [r.payload for r in outbox.pending()] == [b"e", b"v2"]
        assert outbox.stats().dropped_events == 0  # superseded, not dropped


def test_refused_records_are_counted_then_dropped_and_reported(tmp_path: Path) -> None:
    reports: list[DropReport] = []

    def reporter(report: DropReport, seq: int) -> tuple[str, bytes]:
        reports.append(report)
        return "t", b"report"

    with Outbox(tmp_path / "o.db", overflow=reporter) as outbox:
        record = outbox.put("events", "t", b"e")
        assert record is not None
        assert outbox.release(record.id) == 1
        assert outbox.release(record.id) == 2
        assert outbox.pending()[0].attempts == 2
        assert outbox.drop(record.id)
        assert not outbox.drop(record.id)
        assert reports[0].by_rejection == 1
        assert outbox.release(12345) == 0


def test_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with Outbox(path) as outbox:
        stats = outbox.stats()
        assert stats.recovered_from is not None
        assert Path(stats.recovered_from).read_bytes().startswith(b"this is not")
        outbox.put("events", "t", b"fresh")
        assert len(outbox.pending()) == 1
        assert stats.next_seq >= int(time.time() * 1000) - 60_000  # seq still only grows
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(OutboxError, match="cannot open"):
        Outbox(path, recover_corrupt=False)


def test_concurrent_producers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", synchronous="NORMAL") as outbox:

        def produce() -> None:
            for _ in range(50):
                outbox.put("telemetry", "t", lambda seq: str(seq).encode())

        threads = [threading.Thread(target=produce) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        records = outbox.pending(1000)
        assert len(records) == 200
        assert [r.seq for r in records] == list(range(1, 201))


WRITER = """
import sys
from device_agent.outbox import Outbox
from edgekit.protocol import Telemetry
outbox = Outbox(sys.argv[1])
i = 0
while True:
    kind = "events" if i % 3 == 0 else "telemetry"
    record = outbox.put(kind, "t", lambda seq: Telemetry(device="d", seq=seq).to_json())
    print(record.id, record.seq, flush=True)
    i += 1
"""


def test_sigkill_loses_no_committed_record(tmp_path: Path) -> None:
    """A writer killed at a random point: every record it reported as committed survives,
    the file is consistent, and sequence numbers go on from where they were."""
    path = tmp_path / "o.db"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed: list[tuple[int, int]] = []
    assert child.stdout is not None
    deadline = time.monotonic() + 30
    while len(committed) < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        rid, seq = line.split()
        committed.append((int(rid), int(seq)))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()
    assert child.stderr is not None
    stderr = child.stderr.read()
    child.stderr.close()
    assert len(committed) >= 150, stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Outbox(path) as outbox:
        records = {r.id: r for r in outbox.pending(100_000)}
        for rid, seq in committed:
            assert rid in records and records[rid].seq == seq
            message = Telemetry.from_json(records[rid].payload)  # not torn
            assert message.seq == seq
        ids = sorted(records)
        assert [records[i].seq for i in ids] == sorted(records[i].seq for i in ids)
        newer = outbox.put("events", "t", lambda seq: json.dumps(seq).encode())
        assert newer is not None and newer.seq is not None
        assert newer.seq > max(seq for _, seq in committed)
        assert outbox.stats().recovered_from is None
