"""A durable, bounded outbox: every telemetry and event record waits here until PUBACK.

Store-and-forward in one SQLite file. A record is committed *before* anything tries to send it
and deleted only when the broker has acknowledged it, so a broker outage, a dead network, an
agent crash or a power cut loses nothing that was committed; after a crash the worst case is a
record sent twice (it was in flight when the process died), which receivers remove by
``msg_id``.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode ``NORMAL`` survives a crashed
*process* but may lose the last commits on *power loss* (the WAL is not fsynced at commit);
``FULL`` fsyncs the WAL on every commit, so a record that :meth:`Outbox.put` returned for is on
stable storage. The cost is one fsync per put (telemetry every 10 s plus events) and one per
batch of acknowledgements; the publisher batches PUBACKs into one :meth:`Outbox.ack` call. A
lost acknowledgement only means a duplicate, never a loss.

Bounds and the drop policy (applied inside the transaction of each put, ack and
:meth:`Outbox.enforce`):

1. *Age*: records older than ``max_age_s`` are dropped.
2. *Size*: when a new record would take the total over ``max_bytes``, the oldest telemetry goes
   first. Telemetry never displaces events: a new telemetry record that still does not fit is
   itself dropped. An event (any non-telemetry record) that does not fit displaces the oldest
   events.
3. *Reporting*: drops are counted. With an ``overflow`` reporter configured, the counts become
   one synthetic ``outbox.overflow`` event, queued like any other record; it is exempt from the
   bounds, and while one is pending further drops accumulate into the next one, so reporting
   takes constant space however long the outage lasts. Events are therefore never dropped
   silently, and the controller can tell a telemetry gap it was told about from a loss.

``max_bytes`` bounds the records' payload and topic bytes plus a fixed per-row overhead; the
file itself stays near its high-water mark (SQLite reuses freed pages) plus the WAL, which is
truncated to ``journal_size_limit`` after checkpoints.

One process owns an outbox file; within it, an :class:`Outbox` is safe to share between
threads (one connection behind a lock: writes are serialized by SQLite anyway).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from device_agent.errors import AgentError

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ROW_OVERHEAD",
    "DropReason",
    "DropReport",
    "Outbox",
    "OutboxError",
    "OutboxRecord",
    "OutboxStats",
    "OverflowReporter",
    "Synchronous",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""16 MiB: about four days of 10 s telemetry at ~1.5 KiB a record, small next to an SD card."""
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
"""A week: older telemetry describes a device state nobody acts on any more."""
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
"""Larger records are a caller bug (the protocol caps payloads at 64 KiB)."""
ROW_OVERHEAD = 64
"""Bytes counted per record on top of payload and topic (row header, index entry, columns)."""

_T = TypeVar("_T")

TELEMETRY_KIND = "telemetry"
_SCHEMA_VERSION = 1
_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024


class OutboxError(AgentError):
    """The outbox cannot store or read records (disk full, I/O error, record too large)."""

    reason = "outbox"


class Synchronous(str, Enum):
    """SQLite ``synchronous`` settings that make sense with WAL (see the module docstring)."""

    NORMAL = "NORMAL"
    FULL = "FULL"
    EXTRA = "EXTRA"


class DropReason(str, Enum):
    SIZE = "size"
    AGE = "age"
    REJECTED = "rejected"
    """The broker refused the record repeatedly (PUBACK with an error reason code)."""


_UNREPORTED_BY = {
    DropReason.SIZE: "u_by_size",
    DropReason.AGE: "u_by_age",
    DropReason.REJECTED: "u_by_rejection",
}


@dataclass(frozen=True)
class OutboxRecord:
    """One stored message, exactly as it will be published."""

    id: int
    """Increasing, never reused (AUTOINCREMENT): publish order and the PUBACK bookkeeping key."""
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    seq: int | None
    attempts: int
    """Times the broker refused this record."""


@dataclass(frozen=True)
class DropReport:
    """Records dropped since the last report (the content of an ``outbox.overflow`` event)."""

    telemetry: int = 0
    events: int = 0
    """Non-telemetry records (events, and any other kind queued here)."""
    by_size: int = 0
    by_age: int = 0
    by_rejection: int = 0
    first_seq: int | None = None
    """Lowest and highest ``seq`` among the dropped records (where known)."""
    last_seq: int | None = None
    oldest_created: float | None = None
    newest_created: float | None = None

    @property
    def total(self) -> int:
        return self.telemetry + self.events


OverflowReporter = Callable[[DropReport, int], tuple[str, bytes]]
"""Builds the overflow event: ``(report, seq) -> (topic, payload)``."""


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    """Counted size (payload + topic + :data:`ROW_OVERHEAD` per row)."""
    telemetry_rows: int
    event_rows: int
    oldest_created: float | None
    next_seq: int
    dropped_telemetry: int
    """Dropped over the life of the file, reported or not."""
    dropped_events: int
    overflow_reports: int
    """Overflow events queued over the life of the file."""
    unreported: DropReport
    """Drops not yet turned into an overflow event."""
    puts: int
    """Records stored by this process (since this :class:`Outbox` was opened)."""
    acked: int
    recovered_from: str | None
    """Where a corrupt file found at open was moved (None when the file was fine)."""


_META_DEFAULTS: dict[str, float | None] = {
    "next_seq": 1,
    "dropped_telemetry": 0,
    "dropped_events": 0,
    "overflow_reports": 0,
    "u_telemetry": 0,
    "u_events": 0,
    "u_by_size": 0,
    "u_by_age": 0,
    "u_by_rejection": 0,
    "u_first_seq": None,
    "u_last_seq": None,
    "u_oldest": None,
    "u_newest": None,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    seq INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    protected INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, id);
CREATE INDEX IF NOT EXISTS records_by_created ON records (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""

_COLUMNS = "id, kind, topic, payload, qos, retain, created, seq, attempts"


def _record(row: tuple[object, ...]) -> OutboxRecord:
    rid, kind, topic, payload, qos, retain, created, seq, attempts = row
    return OutboxRecord(
        id=int(rid),  # type: ignore[call-overload]
        kind=str(kind),
        topic=str(topic),
        payload=bytes(payload),  # type: ignore[call-overload]
        qos=int(qos),  # type: ignore[call-overload]
        retain=bool(retain),
        created=float(created),  # type: ignore[arg-type]
        seq=None if seq is None else int(seq),  # type: ignore[call-overload]
        attempts=int(attempts),  # type: ignore[call-overload]
    )


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """True for "not a database" / "malformed" (never for "locked" or "disk full")."""
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    if isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


class Outbox:
    """Durable FIFO of records to publish, bounded by ``max_bytes`` and ``max_age_s``.

    ``overflow`` builds the synthetic event that reports drops (see the module docstring);
    without it drops are still counted in :meth:`stats`. ``clock`` gives the wall-clock time
    stored with each record (for the age bound). A corrupt file found at open is moved aside
    (``<name>.corrupt-<unix time>``) and a new one started, unless ``recover_corrupt`` is
    false: a device that cannot report is worse off than one that lost its backlog. ``seq``
    then restarts from the wall clock in milliseconds, so that it still only grows.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        overflow: OverflowReporter | None = None,
        synchronous: Synchronous | str = Synchronous.FULL,
        recover_corrupt: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0 or max_message_bytes <= 0:
            raise ValueError("max_bytes, max_age_s and max_message_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_message_bytes = max_message_bytes
        self.overflow = overflow
        self.synchronous = Synchronous(synchronous)
        self._clock = clock
        self._lock = threading.RLock()
        self._puts = 0
        self._acked = 0
        self._recovered_from: str | None = None
        self._connection: sqlite3.Connection | None = None
        try:
            self._connection = self._open()
        except sqlite3.DatabaseError as exc:
            if not (recover_corrupt and _is_corruption(exc)):
                raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
            self._recovered_from = self._move_aside(exc)
            try:
                self._connection = self._open()
            except sqlite3.Error as again:
                raise OutboxError(f"cannot open outbox {self.path}: {again}") from again
            # The old seq is lost with the file. Restart from the wall clock in milliseconds:
            # above any seq the old file can have reached (fewer than one message per ms),
            # so receivers still see seq grow.
            floor = max(1, int(self._clock() * 1000))
            self._transaction(lambda: self._set_meta("next_seq", floor))
        except OSError as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc

    # --- setup ------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"outbox {self.path}: the file system does not support WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous.value}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                conn.execute("ROLLBACK")
                raise OutboxError(f"outbox {self.path} has schema {version}, expected 1")
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", _META_DEFAULTS.items()
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, exc: sqlite3.DatabaseError) -> str:
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        logger.error("outbox %s is corrupt (%s); moved to %s", self.path, exc, target)
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.replace(Path(str(target) + suffix))
        return str(target)

    # --- helpers inside a transaction -------------------------------------------------------

    def _meta(self, key: str) -> float | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _meta_int(self, key: str) -> int:
        value = self._meta(key)
        return int(value) if value is not None else 0

    def _set_meta(self, key: str, value: float | None) -> None:
        self._conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _add_meta(self, key: str, amount: int) -> None:
        self._conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (amount, key))

    def _take_seq(self) -> int:
        seq = self._meta_int("next_seq")
        self._set_meta("next_seq", seq + 1)
        return seq

    def _total_bytes(self) -> int:
        row = self._conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()
        return int(row[0])

    def _count_drop(self, kind: str, reason: DropReason, seq: int | None, created: float) -> None:
        is_telemetry = kind == TELEMETRY_KIND
        self._add_meta("dropped_telemetry" if is_telemetry else "dropped_events", 1)
        self._add_meta("u_telemetry" if is_telemetry else "u_events", 1)
        self._add_meta(_UNREPORTED_BY[reason], 1)
        if seq is not None:
            first, last = self._meta("u_first_seq"), self._meta("u_last_seq")
            self._set_meta("u_first_seq", seq if first is None else min(int(first), seq))
            self._set_meta("u_last_seq", seq if last is None else max(int(last), seq))
        oldest, newest = self._meta("u_oldest"), self._meta("u_newest")
        self._set_meta("u_oldest", created if oldest is None else min(oldest, created))
        self._set_meta("u_newest", created if newest is None else max(newest, created))

    def _delete(self, rows: Iterable[tuple[int, str, int | None, float]], why: DropReason) -> int:
        count = 0
        for rid, kind, seq, created in rows:
            self._conn.execute("DELETE FROM records WHERE id = ?", (rid,))
            self._count_drop(kind, why, seq, created)
            count += 1
        return count

    def _expire(self, now: float) -> int:
        rows = self._conn.execute(
            "SELECT id, kind, seq, created FROM records WHERE protected = 0 AND created < ?",
            (now - self.max_age_s,),
        ).fetchall()
        return self._delete(rows, DropReason.AGE)

    def _free(self, need: int, *, telemetry: bool) -> int:
        """Delete the oldest unprotected records of one class until ``need`` bytes are freed;
        return the bytes freed."""
        where = "kind = ?" if telemetry else "kind != ?"
        freed = 0
        victims: list[tuple[int, str, int | None, float]] = []
        cursor = self._conn.execute(
            f"SELECT id, kind, seq, created, size FROM records "
            f"WHERE protected = 0 AND {where} ORDER BY id",
            (TELEMETRY_KIND,),
        )
        for rid, kind, seq, created, size in cursor:
            if freed >= need:
                break
            victims.append((rid, kind, seq, created))
            freed += int(size)
        cursor.close()
        self._delete(victims, DropReason.SIZE)
        return freed

    def _unreported(self) -> DropReport:
        def opt_int(key: str) -> int | None:
            value = self._meta(key)
            return None if value is None else int(value)

        return DropReport(
            telemetry=self._meta_int("u_telemetry"),
            events=self._meta_int("u_events"),
            by_size=self._meta_int("u_by_size"),
            by_age=self._meta_int("u_by_age"),
            by_rejection=self._meta_int("u_by_rejection"),
            first_seq=opt_int("u_first_seq"),
            last_seq=opt_int("u_last_seq"),
            oldest_created=self._meta("u_oldest"),
            newest_created=self._meta("u_newest"),
        )

    def _maybe_report(self, now: float) -> None:
        """Queue one overflow event for the unreported drops, unless one is still pending."""
        if self.overflow is None:
            return
        report = self._unreported()
        if report.total == 0:
            return
        if self._conn.execute("SELECT 1 FROM records WHERE protected = 1 LIMIT 1").fetchone():
            return  # the pending one is still in flight; these drops go into the next report
        seq = self._take_seq()
        topic, payload = self.overflow(report, seq)
        self._conn.execute(
            "INSERT INTO records (kind, topic, payload, qos, retain, created, size, seq, "
            "protected) VALUES (?, ?, ?, 1, 0, ?, ?, ?, 1)",
            ("events", topic, payload, now, len(payload) + len(topic) + ROW_OVERHEAD, seq),
        )
        for key in ("u_telemetry", "u_events", "u_by_size", "u_by_age", "u_by_rejection"):
            self._set_meta(key, 0)
        for key in ("u_first_seq", "u_last_seq", "u_oldest", "u_newest"):
            self._set_meta(key, None)
        self._add_meta("overflow_reports", 1)
        logger.warning(
            "outbox: dropped %d telemetry and %d event records (full: %d, expired: %d, "
            "refused: %d); reported as seq %d",
            report.telemetry,
            report.events,
            report.by_size,
            report.by_age,
            report.by_rejection,
            seq,
        )

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._connection

    def _transaction(self, body: Callable[[], _T], *, write: bool = True) -> _T:
        """Run ``body`` in one transaction; SQLite errors become :class:`OutboxError` and
        anything that fails rolls the whole transaction back."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc
            try:
                result = body()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise OutboxError(f"outbox {self.path}: {exc}") from exc
                raise
            return result

    # --- public API -------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        topic: str,
        payload: bytes | Callable[[int], bytes],
        qos: int = 1,
        *,
        retain: bool = False,
    ) -> OutboxRecord | None:
        """Store one record durably and return it (None: a telemetry record that did not fit
        and was dropped, counted like any other drop).

        ``payload`` may be a callable: it receives the next per-device ``seq``, allocated in
        the same transaction, so sequence numbers are durable, gap-free among stored records
        and increase in publish order. A retained record replaces older pending records for
        the same topic (the broker keeps only the last one anyway).
        """
        kind = str(getattr(kind, "value", kind))
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")

        def body() -> OutboxRecord | None:
            now = self._clock()
            seq = self._take_seq() if callable(payload) else None
            data = payload(seq) if callable(payload) and seq is not None else payload
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("payload must be bytes")
            data = bytes(data)
            size = len(data) + len(topic.encode("utf-8")) + ROW_OVERHEAD
            if size > self.max_message_bytes:
                raise OutboxError(
                    f"record of {size} bytes exceeds the {self.max_message_bytes}-byte limit"
                )
            if retain:
                self._conn.execute(
                    "DELETE FROM records WHERE retain = 1 AND topic = ? AND protected = 0",
                    (topic,),
                )
            self._expire(now)
            need = self._total_bytes() + size - self.max_bytes
            if need > 0:
                need -= self._free(need, telemetry=True)
            record: OutboxRecord | None = None
            if need > 0 and kind == TELEMETRY_KIND:
                self._count_drop(kind, DropReason.SIZE, seq, now)
            else:
                if need > 0:
                    self._free(need, telemetry=False)
                cursor = self._conn.execute(
                    "INSERT INTO records (kind, topic, payload, qos, retain, created, size, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, topic, data, qos, int(retain), now, size, seq),
                )
                record = OutboxRecord(
                    id=int(cursor.lastrowid or 0),
                    kind=kind,
                    topic=topic,
                    payload=data,
                    qos=qos,
                    retain=retain,
                    created=now,
                    seq=seq,
                    attempts=0,
                )
            self._maybe_report(now)
            return record

        record = self._transaction(body)
        with self._lock:
            self._puts += 1
        return record

    def next_seq(self) -> int:
        """Allocate one ``seq`` durably, for a message that does not go through the outbox
        (the retained ``status`` and the last will)."""
        return self._transaction(self._take_seq)

    def pending(self, limit: int = 100, *, after_id: int = 0) -> list[OutboxRecord]:
        """Up to ``limit`` records with ``id > after_id``, oldest first."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc
        return [_record(row) for row in rows]

    def ack(self, *ids: int) -> int:
        """Delete acknowledged records (one transaction, one fsync); unknown ids are ignored
        (a record may have been dropped while in flight). Returns how many were deleted."""
        if not ids:
            return 0

        def body() -> int:
            deleted = 0
            for rid in ids:
                deleted += self._conn.execute("DELETE FROM records WHERE id = ?", (rid,)).rowcount
            self._maybe_report(self._clock())
            return deleted

        deleted = self._transaction(body)
        with self._lock:
            self._acked += deleted
        return deleted

    def release(self, record_id: int) -> int:
        """Count one broker refusal of a record; returns its refusal count (0: no such row)."""

        def body() -> int:
            self._conn.execute(
                "UPDATE records SET attempts = attempts + 1 WHERE id = ?", (record_id,)
            )
            row = self._conn.execute(
                "SELECT attempts FROM records WHERE id = ?", (record_id,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return self._transaction(body)

    def drop(self, record_id: int, *, reason: DropReason = DropReason.REJECTED) -> bool:
        """Remove a record that can never be delivered; counted and reported like any drop
        (except a refused overflow report itself, which would otherwise loop)."""

        def body() -> bool:
            row = self._conn.execute(
                "SELECT id, kind, seq, created, protected FROM records WHERE id = ?",
                (record_id,),
            ).fetchone()
            if row is None:
                return False
            self._conn.execute("DELETE FROM records WHERE id = ?", (record_id,))
            if not row[4]:
                self._count_drop(row[1], reason, row[2], row[3])
            self._maybe_report(self._clock())
            return True

        return self._transaction(body)

    def enforce(self) -> int:
        """Apply the age bound now (puts do it too); returns the number of records dropped."""

        def body() -> int:
            now = self._clock()
            dropped = self._expire(now)
            self._maybe_report(now)
            return dropped

        return self._transaction(body)

    def stats(self) -> OutboxStats:
        def body() -> OutboxStats:
            rows, total, telemetry, oldest = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), "
                "COALESCE(SUM(kind = ?), 0), MIN(created) FROM records",
                (TELEMETRY_KIND,),
            ).fetchone()
            return OutboxStats(
                rows=int(rows),
                bytes=int(total),
                telemetry_rows=int(telemetry),
                event_rows=int(rows) - int(telemetry),
                oldest_created=None if oldest is None else float(oldest),
                next_seq=self._meta_int("next_seq"),
                dropped_telemetry=self._meta_int("dropped_telemetry"),
                dropped_events=self._meta_int("dropped_events"),
                overflow_reports=self._meta_int("overflow_reports"),
                unreported=self._unreported(),
                puts=self._puts,
                acked=self._acked,
                recovered_from=self._recovered_from,
            )

        return self._transaction(body, write=False)

    def close(self) -> None:
        with self._lock:
            conn, self._connection = self._connection, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
