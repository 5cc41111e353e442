"""The outbox: durable FIFO until PUBACK, bounded with a reported drop policy, crash-safe.

No broker here: these tests drive the outbox directly, the way the MQTT link does (put,
pending, ack), with a fake clock for the age bound. The SIGKILL tests run writers in a child
process and kill them mid-stream: everything they were told was committed must be there, and
the running totals must equal what the table really holds. The group-commit tests hold the
first writer inside its payload builder until the others have queued behind it, so that the
batch they form is known rather than left to thread timing.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.mqtt_link import overflow_reporter
from device_agent.outbox import (
    ROW_OVERHEAD,
    DropReport,
    Outbox,
    OutboxError,
    OutboxItem,
    OutboxRecord,
)
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
        record_id, record_seq = line.split()
        committed.append((int(record_id), int(record_seq)))
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
        seqs = [records[i].seq or 0 for i in sorted(records)]
        assert seqs == sorted(seqs)
        newer = outbox.put("events", "t", lambda seq: json.dumps(seq).encode())
        assert newer is not None and newer.seq is not None
        assert newer.seq > max(seq for _, seq in committed)
        assert outbox.stats().recovered_from is None


# --- running totals ---------------------------------------------------------------------------


def table_totals(path: Path) -> tuple[int, int, int]:
    """(rows, bytes, telemetry rows) counted from the table itself, from outside."""
    with sqlite3.connect(path) as conn:
        rows, size, telemetry = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(kind = 'telemetry'), 0) "
            "FROM records"
        ).fetchone()
    return int(rows), int(size), int(telemetry)


def stored_totals(path: Path) -> tuple[int, int, int]:
    """The running totals as stored in the file (read without opening an Outbox, whose open
    would repair them)."""
    with sqlite3.connect(path) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    return int(meta["rows"]), int(meta["bytes"]), int(meta["telemetry_rows"])


def test_running_totals_follow_every_operation(tmp_path: Path) -> None:
    """Random puts, batches, acks, refusals and expiries under tight bounds: after each, the
    totals that stats() reports (no table scan) equal the table, and the size bound holds."""
    path = tmp_path / "o.db"
    clock = Clock()
    rng = random.Random(5)
    limit = 6_000
    with Outbox(
        path, max_bytes=limit, max_age_s=50, overflow=overflow_reporter(TOPICS), clock=clock
    ) as outbox:
        for step in range(300):
            op = rng.random()
            kind = "events" if rng.random() < 0.2 else "telemetry"
            payload = b"p" * rng.randrange(10, 400)
            if op < 0.45:
                outbox.put(kind, "t", payload, retain=rng.random() < 0.05)
            elif op < 0.65:
                outbox.put_many(
                    OutboxItem(rng.choice(["events", "telemetry"]), "t", payload)
                    for _ in range(rng.randrange(1, 6))
                )
            elif op < 0.8:
                records = outbox.pending(rng.randrange(1, 8))
                outbox.ack(*(r.id for r in records))
            elif op < 0.88 and (records := outbox.pending(3)):
                outbox.drop(rng.choice(records).id)
            elif op < 0.93 and (records := outbox.pending(3)):
                outbox.release(records[0].id)
            else:
                clock.now += rng.randrange(0, 30)
                outbox.enforce()
            stats = outbox.stats()
            assert (stats.rows, stats.bytes, stats.telemetry_rows) == table_totals(path), step
            with sqlite3.connect(path) as conn:
                (reports,) = conn.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM records WHERE protected = 1"
                ).fetchone()
            # Events may displace only events and overflow reports are exempt; with at most a
            # fifth of the records events, the bound holds for everything but the reports.
            assert stats.bytes - reports <= limit, step
        assert stats.dropped_telemetry > 0 and stats.overflow_reports > 0  # bounds were hit
        assert not stats.counters_repaired


def test_wrong_totals_are_repaired_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        for index in range(4):
            outbox.put("telemetry" if index % 2 else "events", "t", b"x" * (10 * index))
    with sqlite3.connect(path) as conn:  # an edit from outside, behind the triggers' back
        conn.execute("UPDATE meta SET value = 999 WHERE key IN ('rows', 'bytes')")
    assert stored_totals(path) != table_totals(path)
    with caplog.at_level(logging.WARNING, logger="device_agent.outbox"), Outbox(path) as outbox:
        stats = outbox.stats()
    assert stats.counters_repaired
    assert (stats.rows, stats.bytes, stats.telemetry_rows) == table_totals(path)
    assert "running totals" in caplog.text
    assert stored_totals(path) == table_totals(path)  # the repair was committed
    with Outbox(path) as outbox:
        assert not outbox.stats().counters_repaired


OLD_SCHEMA = """
CREATE TABLE records (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    created REAL NOT NULL, size INTEGER NOT NULL, seq INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, protected INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX records_by_kind ON records (kind, id);
CREATE INDEX records_by_created ON records (created);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
INSERT INTO meta VALUES ('next_seq', 3);
PRAGMA user_version = 1;
"""


def test_a_file_from_before_the_running_totals_gets_them(tmp_path: Path) -> None:
    """A file written by an agent without the totals (no triggers, no counter rows): the
    first open counts the table once, quietly, and from then on the triggers keep count."""
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        for seq in (1, 2):
            conn.execute(
                "INSERT INTO records (kind, topic, payload, qos, retain, created, size, seq) "
                "VALUES ('telemetry', 't', ?, 1, 0, ?, ?, ?)",
                (b"old", time.time(), 3 + 1 + ROW_OVERHEAD, seq),
            )
    with Outbox(path) as outbox:
        stats = outbox.stats()
        assert (stats.rows, stats.bytes, stats.telemetry_rows) == (2, 2 * (4 + ROW_OVERHEAD), 2)
        assert not stats.counters_repaired  # a first count, not a repair
        new = outbox.put("events", "t", lambda seq: str(seq).encode())
        assert new is not None and new.seq == 3
        outbox.ack(outbox.pending(1)[0].id)
    assert stored_totals(path) == table_totals(path) == (2, 2 * ROW_OVERHEAD + 4 + 2, 1)


def test_bounds_and_reports_use_indexes_not_scans(tmp_path: Path) -> None:
    """The queries every put runs, planned against the real schema: none walks the table
    (that was the SUM over every record that made puts slow down with the backlog)."""
    with Outbox(tmp_path / "o.db") as outbox:
        conn = outbox._conn
        expected = [
            (
                "SELECT id FROM records WHERE protected = 0 AND created < ?",
                (0.0,),
                "SEARCH records USING INDEX records_by_created",
            ),
            (
                "SELECT id FROM records WHERE protected = 0 AND kind = ? ORDER BY id",
                ("telemetry",),
                "SEARCH records USING INDEX records_by_kind",
            ),
            # A scan, but of the partial index: it holds only the pending overflow report.
            (
                "SELECT 1 FROM records WHERE protected = 1 LIMIT 1",
                (),
                "INDEX records_protected",  # SQLite may call it a covering index
            ),
            (
                "SELECT MIN(created) FROM records",
                (),
                "SEARCH records USING COVERING INDEX records_by_created",
            ),
        ]
        for query, args, wanted in expected:
            plan = " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", args))
            assert wanted in plan, (query, plan)
            # Whatever SQLite chooses, it never walks the table itself.
            assert "SCAN records" not in plan or "USING" in plan, (query, plan)


# --- put_many -----------------------------------------------------------------------------------


def test_put_many_stores_a_batch_in_one_commit(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.put("events", "t", b"before")
        commits = outbox.stats().commits
        records = outbox.put_many(
            [
                OutboxItem("telemetry", "a/telemetry", lambda seq: f"t{seq}".encode()),
                OutboxItem("events", "a/events", b"plain bytes", qos=0),
                OutboxItem("reported", "a/reported", lambda seq: f"r{seq}".encode(), retain=True),
            ]
        )
        stats = outbox.stats()
        assert stats.commits == commits + 1
        assert stats.puts == 4
        assert [r.payload for r in records if r] == [b"t1", b"plain bytes", b"r2"]
        assert [r.seq for r in records if r] == [1, None, 2]
        assert [r.id for r in records if r] == sorted(r.id for r in records if r)
        assert outbox.pending()[1:] == records
        assert outbox.put_many([]) == []
        assert outbox.stats().commits == commits + 1  # an empty batch commits nothing
        newer = [
            OutboxItem("reported", "a/reported", f"v{i}".encode(), retain=True) for i in (2, 3)
        ]
        outbox.put_many(newer)
        retained = [r.payload for r in outbox.pending() if r.topic == "a/reported"]
        assert retained == [b"v3"]  # superseded within the batch too, and not counted as drops
        assert outbox.stats().dropped_events == 0


def test_put_many_is_all_or_nothing(tmp_path: Path) -> None:
    def explode(seq: int) -> bytes:
        raise ValueError("boom")

    with Outbox(tmp_path / "o.db") as outbox:
        good = OutboxItem("events", "t", lambda seq: b"ok")
        with pytest.raises(ValueError, match="boom"):
            outbox.put_many([good, good, OutboxItem("events", "t", explode)])
        with pytest.raises(OutboxError, match="exceeds"):
            outbox.put_many([good, OutboxItem("events", "t", b"x" * 300_000)])
        assert outbox.pending() == []
        assert outbox.next_seq() == 1  # no seq was consumed
        assert outbox.stats().rows == 0


@pytest.mark.parametrize(
    ("item", "error", "match"),
    [
        (OutboxItem("events", "t", b"x", qos=3), ValueError, "put_many item 1: qos"),
        (OutboxItem("events", "", b"x"), ValueError, "put_many item 1: topic"),
        (OutboxItem("", "t", b"x"), ValueError, "put_many item 1: kind"),
        (OutboxItem("events", "t", "text"), TypeError, "put_many item 1: payload"),  # type: ignore[arg-type]
    ],
)
def test_put_many_refuses_bad_items_before_storing_any(
    tmp_path: Path, item: OutboxItem, error: type[Exception], match: str
) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        with pytest.raises(error, match=match):
            outbox.put_many([OutboxItem("events", "t", b"fine"), item])
        assert outbox.pending() == []


def test_put_many_applies_the_bounds_exactly_like_puts_in_a_row(tmp_path: Path) -> None:
    """The same records through put() one by one and through put_many(): same records kept,
    same drops, same overflow report, same seq."""
    payload = b"x" * 100
    limit = 6 * size_of(payload, "t")
    items = [OutboxItem("events", "t", lambda seq: payload)]
    items += [OutboxItem("telemetry", "t", lambda seq: payload) for _ in range(8)]
    items += [OutboxItem("reported", "t", payload, retain=True) for _ in range(2)]
    items += [OutboxItem("events", "t", lambda seq: payload) for _ in range(6)]
    items += [OutboxItem("telemetry", "t", lambda seq: payload)]  # no room left: dropped

    Outcome = tuple[
        list[tuple[str, int | None] | None],
        list[tuple[str, int | None, bytes]],
        int,
        int,
        int,
        int,
        int,
    ]

    def run(name: str, store: Callable[[Outbox], list[OutboxRecord | None]]) -> Outcome:
        def reporter(report: DropReport, seq: int) -> tuple[str, bytes]:
            return "t", json.dumps([report.telemetry, report.events, report.first_seq]).encode()

        with Outbox(tmp_path / name, max_bytes=limit, overflow=reporter) as outbox:
            results = store(outbox)
            stats = outbox.stats()
            kept = [(r.kind, r.seq, r.payload) for r in outbox.pending(100)]
            return (
                [None if r is None else (r.kind, r.seq) for r in results],
                kept,
                stats.dropped_telemetry,
                stats.dropped_events,
                stats.rows,
                stats.bytes,
                stats.next_seq,
            )

    one_by_one = run(
        "puts.db",
        lambda outbox: [
            outbox.put(i.kind, i.topic, i.payload, i.qos, retain=i.retain) for i in items
        ],
    )
    batched = run("batch.db", lambda outbox: outbox.put_many(items))
    assert batched == one_by_one
    results, _, dropped_telemetry, dropped_events, *_ = one_by_one
    assert results[-1] is None  # the last telemetry found only events and did not fit
    assert dropped_telemetry == 9  # every telemetry record made way for the events
    assert dropped_events > 0  # then events displaced the oldest events


# --- group commit ---------------------------------------------------------------------------


def queued_behind(outbox: Outbox, writers: list[threading.Thread], *, timeout: float = 10) -> None:
    """Start ``writers`` and wait until all have queued behind the writer now committing."""
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + timeout
    while len(outbox._queue) < len(writers) + 1:  # +1: the blocked leader's own write
        assert time.monotonic() < deadline, "the writers did not queue"
        time.sleep(0.005)


def test_writers_that_queue_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        release = threading.Event()
        entered = threading.Event()
        results: dict[str, object] = {}

        def slow(seq: int) -> bytes:
            entered.set()
            assert release.wait(10)
            return b"first"

        def put(name: str, payload: bytes | Callable[[int], bytes]) -> None:
            results[name] = outbox.put("telemetry", "t", payload)

        before = outbox.put("events", "t", b"acked by a writer in the batch")
        assert before is not None

        def ack() -> None:
            assert before is not None
            results["ack"] = outbox.ack(before.id)

        commits = outbox.stats().commits
        leader = threading.Thread(target=put, args=("first", slow))
        leader.start()
        assert entered.wait(10)
        others = [
            threading.Thread(target=put, args=(f"w{i}", lambda seq: b"later")) for i in range(3)
        ]
        others.append(threading.Thread(target=ack))
        queued_behind(outbox, others)
        release.set()
        for thread in [leader, *others]:
            thread.join(10)
        stats = outbox.stats()
        assert stats.commits == commits + 1  # five writes, one transaction, one fsync
        assert results["ack"] == 1
        records = outbox.pending()
        assert [r.payload for r in records] == [b"first"] + [b"later"] * 3
        assert [r.seq for r in records] == [1, 2, 3, 4]


def test_a_failing_write_in_a_shared_commit_fails_alone(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        release = threading.Event()
        entered = threading.Event()
        outcome: dict[str, object] = {}

        def slow(seq: int) -> bytes:
            entered.set()
            assert release.wait(10)
            return b"first"

        def explode(seq: int) -> bytes:
            raise ValueError("builder failed")

        def put(name: str, payload: bytes | Callable[[int], bytes]) -> None:
            try:
                record = outbox.put("events", "t", payload)
                outcome[name] = None if record is None else record.seq
            except Exception as exc:  # the test inspects what each caller got
                outcome[name] = exc

        leader = threading.Thread(target=put, args=("first", slow))
        leader.start()
        assert entered.wait(10)
        others = [
            threading.Thread(target=put, args=("explodes", explode)),
            threading.Thread(target=put, args=("too-large", b"x" * 300_000)),
            threading.Thread(target=put, args=("fine", lambda seq: b"fine")),
        ]
        queued_behind(outbox, others)
        release.set()
        for thread in [leader, *others]:
            thread.join(10)
        assert isinstance(outcome["explodes"], ValueError)
        assert isinstance(outcome["too-large"], OutboxError)
        assert (outcome["first"], outcome["fine"]) == (1, 2)  # the failed write's seq reused
        assert [r.payload for r in outbox.pending()] == [b"first", b"fine"]
        stats = outbox.stats()
        assert (stats.commits, stats.puts, stats.rows) == (1, 2, 2)


def test_an_interrupted_leader_leaves_the_queue_moving(tmp_path: Path) -> None:
    """A KeyboardInterrupt inside the committing caller's builder: that caller gets it, its
    write is not stored, and the writes queued behind it are committed by the next caller
    in line instead of waiting for a leader that is gone."""
    with Outbox(tmp_path / "o.db") as outbox:
        entered = threading.Event()
        release = threading.Event()
        outcome: dict[str, BaseException | int | None] = {}

        def interrupted(seq: int) -> bytes:
            entered.set()
            assert release.wait(10)
            raise KeyboardInterrupt

        def lead() -> None:
            try:
                outbox.put("events", "t", interrupted)
            except KeyboardInterrupt as exc:
                outcome["leader"] = exc

        def follow(name: str) -> None:
            record = outbox.put("events", "t", lambda seq: name.encode())
            outcome[name] = None if record is None else record.seq

        leader = threading.Thread(target=lead)
        leader.start()
        assert entered.wait(10)
        followers = [threading.Thread(target=follow, args=(f"f{i}",)) for i in range(2)]
        queued_behind(outbox, followers)
        release.set()
        for thread in [leader, *followers]:
            thread.join(10)
            assert not thread.is_alive()
        assert isinstance(outcome["leader"], KeyboardInterrupt)
        assert {outcome["f0"], outcome["f1"]} == {1, 2}  # the lost write's seq reused
        assert sorted(r.payload for r in outbox.pending()) == [b"f0", b"f1"]
        assert len(outbox._queue) == 0


def test_a_payload_builder_cannot_write_to_the_outbox(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:

        def reentrant(seq: int) -> bytes:
            outbox.put("events", "t", b"inner")
            return b"outer"

        with pytest.raises(OutboxError, match="must not write"):
            outbox.put("events", "t", reentrant)
        assert outbox.pending() == []
        assert outbox.put("events", "t", b"later") is not None  # nothing is left locked


def test_a_full_disk_fails_the_write_with_a_one_line_error(tmp_path: Path) -> None:
    """SQLITE_FULL, raised for real by capping the file's page count: the write fails with
    OutboxError, nothing of it is stored, and the outbox works again once there is room."""
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.put("events", "t", b"kept")
        (pages,) = outbox._conn.execute("PRAGMA page_count").fetchone()
        outbox._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(OutboxError, match="full") as caught:
            outbox.put_many([OutboxItem("events", "t", b"x" * 50_000) for _ in range(4)])
        assert "\n" not in str(caught.value)
        stats = outbox.stats()
        assert (stats.rows, stats.bytes, stats.telemetry_rows) == table_totals(outbox.path)
        assert [r.payload for r in outbox.pending()] == [b"kept"]
        outbox._conn.execute("PRAGMA max_page_count = 1073741823")
        assert outbox.put("events", "t", b"x" * 50_000) is not None


def test_writes_after_close_fail_cleanly(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.put("events", "t", b"x")
    with pytest.raises(OutboxError, match="closed"):
        outbox.put_many([OutboxItem("events", "t", b"x")])
    with pytest.raises(OutboxError, match="closed"):
        outbox.ack(1)


COUNTING_WRITER = """
import sys, threading
from device_agent.outbox import Outbox, OutboxItem
outbox = Outbox(sys.argv[1], max_bytes=30_000)
lock = threading.Lock()

def work(worker):
    i = 0
    while True:
        if i % 4 == 3:
            outbox.put_many(
                OutboxItem("telemetry", "t", lambda seq: b"b" * (80 + seq % 300)) for _ in range(5)
            )
        else:
            kind = "events" if i % 9 == 0 else "telemetry"
            outbox.put(kind, "t", lambda seq: b"p" * (40 + seq % 400))
        if i % 5 == 4:
            outbox.ack(*(record.id for record in outbox.pending(4)))
        with lock:
            print(worker, i, flush=True)
        i += 1

for worker in range(3):
    threading.Thread(target=work, args=(worker,), daemon=True).start()
threading.Event().wait()
"""


def test_sigkill_leaves_the_running_totals_equal_to_the_table(tmp_path: Path) -> None:
    """Three threads putting (single and batched, so group commits form), acking and dropping
    against a tight bound, killed at a random moment: the totals in the file equal what the
    table holds before any repair could run, and the next open finds nothing to repair."""
    path = tmp_path / "o.db"
    rng = random.Random()
    child = subprocess.Popen(
        [sys.executable, "-c", COUNTING_WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    lines = 0
    deadline = time.monotonic() + 30
    wanted = rng.randrange(400, 800)
    while lines < wanted and time.monotonic() < deadline:
        if not child.stdout.readline():
            break
        lines += 1
    time.sleep(rng.random() * 0.02)  # land anywhere inside a transaction
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    stderr = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    assert lines >= wanted, stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows, size, telemetry = table_totals(path)
    assert stored_totals(path) == (rows, size, telemetry)
    assert 0 < size <= 30_000 + 1_000  # the bound held (+ at most a stray event's share)
    with Outbox(path) as outbox:
        stats = outbox.stats()
        assert not stats.counters_repaired
        assert stats.dropped_telemetry > 0  # the bound was exercised
        assert (stats.rows, stats.bytes, stats.telemetry_rows) == (rows, size, telemetry)
