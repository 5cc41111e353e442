"""A durable, bounded outbox: every telemetry and event record waits here until PUBACK.

Store-and-forward in one SQLite file. A record is committed *before* anything tries to send it
and deleted only when the broker has acknowledged it, so a broker outage, a dead network, an
agent crash or a power cut loses nothing that was committed; after a crash the worst case is a
record sent twice (it was in flight when the process died), which receivers remove by
``msg_id``.

Durability: WAL journal with ``synchronous=FULL`` by default. ``FULL`` fsyncs the WAL on every
commit, so a record that :meth:`Outbox.put` or :meth:`Outbox.put_many` returned for is on
stable storage and survives a power cut. ``synchronous=NORMAL`` is available as an explicit
option only (never chosen silently): in WAL mode it survives a crashed *process* (the commit is
in the WAL, which the OS writes out) but may lose the last commits on *power loss*, because the
WAL is fsynced only at checkpoints.

Throughput: with ``FULL`` a commit is an fsync, and the fsync, not the bookkeeping, is what a
put costs; one record per commit cannot beat a bare SQLite INSERT + COMMIT however little the
outbox adds. So commits are shared instead:

* :meth:`Outbox.put_many` stores several records in one transaction: one fsync for all.
* *Group commit*: every write (put, put_many, ack, release, drop, enforce, next_seq) joins a
  queue. The caller at its head leads: it runs the queued writes in one transaction, picking
  up those that arrive while it works (up to 256), each in a savepoint of its own, commits
  once, and wakes their callers; the next head leads whatever queued up during that commit.
  Nothing waits for company, so a lone producer commits alone with no added delay, while N
  producers that write at the same time share fsyncs. The guarantee is unchanged: a call
  returns only after the commit that holds its write, so with ``FULL`` everything a call
  returned for is on stable storage, and a call that raised stored nothing. A batch behaves
  exactly like its writes run one after another, each atomic: one that fails (its payload
  builder raises, its record is too large) is rolled back to its savepoint and raises in its
  own caller while the others commit. Only a failed COMMIT (disk full, I/O error), an error
  after which SQLite rolled the whole transaction back, or a ``BaseException`` such as
  ``KeyboardInterrupt`` in the batch fails every write in it, and then none of them is stored.
* Running totals: the record count, the counted bytes and the number of telemetry records
  are kept in the ``meta`` table by SQLite triggers, in the same transaction as every insert
  and delete, so the size bound reads one row instead of summing the table (which made every
  put slower as the backlog grew) and no crash can make them drift. They are checked against
  the table at open (which reads the whole file for ``quick_check`` anyway) and recomputed,
  with a warning, if they disagree (:attr:`OutboxStats.counters_repaired`); a file written
  before they existed gets them at its first open. The triggers live in the file, so an older
  agent that opens it keeps the totals right too, and the schema version stays 1. Drops are
  added to their counters once per write, not once per record.

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
threads (one connection; writes are group-committed as above, reads wait for the connection).
Payload builders and the overflow reporter may run on another producer's thread, inside the
shared transaction: they must be quick and must not write to the outbox themselves (that is
refused with :class:`OutboxError`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TypeVar, cast

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
    "OutboxItem",
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
"""Still 1 with the running totals: they only add meta rows, an index and triggers, which an
older agent neither reads nor breaks (its inserts and deletes fire the triggers too)."""
_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
_MAX_BATCH = 256
"""Most writes one group commit takes: bounds how long the leading caller works for others."""


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
class OutboxItem:
    """One record to store with :meth:`Outbox.put_many` (the arguments of :meth:`Outbox.put`)."""

    kind: str
    topic: str
    payload: bytes | Callable[[int], bytes]
    """The bytes, or a builder that receives the record's ``seq`` (see :meth:`Outbox.put`)."""
    qos: int = 1
    retain: bool = False


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
    """Records offered to :meth:`Outbox.put` / :meth:`Outbox.put_many` by this process (since
    this :class:`Outbox` was opened), including telemetry dropped at once."""
    acked: int
    recovered_from: str | None
    """Where a corrupt file found at open was moved (None when the file was fine)."""
    commits: int
    """Write transactions committed by this process, one fsync each with ``FULL``: ``puts``
    over ``commits`` is what batching and group commit saved."""
    counters_repaired: bool
    """The running totals disagreed with the table at open and were recomputed (a file edited
    from outside, or a bug: they are kept in the same transactions as the rows)."""


_COUNTERS = ("rows", "bytes", "telemetry_rows")
"""Running totals over ``records``, kept by the triggers in :data:`_SCHEMA`."""

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

_UNREPORTED_KEYS = (
    "u_telemetry",
    "u_events",
    "u_by_size",
    "u_by_age",
    "u_by_rejection",
    "u_first_seq",
    "u_last_seq",
    "u_oldest",
    "u_newest",
)

_IS_TELEMETRY = f"kind = '{TELEMETRY_KIND}'"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
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
    )""",
    # _free: the oldest telemetry first, without walking past the events.
    "CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, id)",
    # _expire: only what is past the age bound.
    "CREATE INDEX IF NOT EXISTS records_by_created ON records (created)",
    # _maybe_report asks "is an overflow report pending?" after every drop; without this
    # (partial, so nearly free: only reports are in it) the answer is a table scan.
    "CREATE INDEX IF NOT EXISTS records_protected ON records (id) WHERE protected = 1",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    # The running totals. Triggers rather than code: they run in the statement's own
    # transaction whoever deletes or inserts, this code, an older agent or a person with the
    # sqlite3 shell, so the totals cannot drift from the rows.
    # Three plain UPDATEs: measured cheaper than one UPDATE ... CASE over three keys.
    f"""CREATE TRIGGER IF NOT EXISTS records_count_insert AFTER INSERT ON records BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'rows';
        UPDATE meta SET value = value + NEW.size WHERE key = 'bytes';
        UPDATE meta SET value = value + (NEW.{_IS_TELEMETRY}) WHERE key = 'telemetry_rows';
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS records_count_delete AFTER DELETE ON records BEGIN
        UPDATE meta SET value = value - 1 WHERE key = 'rows';
        UPDATE meta SET value = value - OLD.size WHERE key = 'bytes';
        UPDATE meta SET value = value - (OLD.{_IS_TELEMETRY}) WHERE key = 'telemetry_rows';
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS records_count_update AFTER UPDATE OF kind, size ON records
    BEGIN
        UPDATE meta SET value = value + NEW.size - OLD.size WHERE key = 'bytes';
        UPDATE meta SET value = value + (NEW.{_IS_TELEMETRY}) - (OLD.{_IS_TELEMETRY})
            WHERE key = 'telemetry_rows';
    END""",
)

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


def _checked(item: OutboxItem, where: str) -> OutboxItem:
    """``item`` with its kind as a plain string, or a one-line error naming ``where``."""
    kind = str(getattr(item.kind, "value", item.kind))
    if not kind:
        raise ValueError(f"{where}: kind must not be empty")
    if not isinstance(item.topic, str) or not item.topic:
        raise ValueError(f"{where}: topic must be a non-empty string, not {item.topic!r}")
    if item.qos not in (0, 1, 2) or isinstance(item.qos, bool):
        raise ValueError(f"{where}: qos must be 0, 1 or 2, not {item.qos!r}")
    if not callable(item.payload) and not isinstance(item.payload, (bytes, bytearray)):
        raise TypeError(f"{where}: payload must be bytes or a callable, not {item.payload!r:.40}")
    if kind is item.kind:
        return item
    return OutboxItem(kind, item.topic, item.payload, item.qos, item.retain)


class _Write:
    """One caller's write, queued for the next group commit (see :meth:`Outbox._write`)."""

    __slots__ = ("body", "done", "error", "result", "taken")

    def __init__(self, body: Callable[[], object]) -> None:
        self.body = body
        self.taken = False
        """A leader has it in its transaction: it will finish it, come what may."""
        self.done = False
        self.error: BaseException | None = None
        self.result: object = None


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
        """Owns the connection: held by readers and by the thread committing a batch."""
        self._queue: deque[_Write] = deque()
        """Writes not yet committed, oldest first; the head's caller is committing them."""
        self._queue_changed = threading.Condition(threading.Lock())
        """Guards ``_queue`` and the ``done`` flags; notified after every commit."""
        self._leader: int | None = None
        """The thread running a batch, while it does (payload builders run on it)."""
        self._counts_lock = threading.Lock()
        self._puts = 0
        self._acked = 0
        self._commits = 0
        self._counters_repaired = False
        self._unreported_hint = True
        """False only when no drop can be waiting for an overflow report: lets
        :meth:`_maybe_report` skip its queries after the writes that drop nothing. Set by
        every counted drop and every rollback, so it is never wrongly False."""
        self._drops: list[tuple[str, int | None, float, DropReason]] = []
        """Drops noted by the write running now, not yet added to the meta counters."""
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
            self._write(lambda: self._set_meta("next_seq", floor))
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
            for statement in _SCHEMA:
                conn.execute(statement)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                conn.execute("ROLLBACK")
                raise OutboxError(f"outbox {self.path} has schema {version}, expected 1")
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", _META_DEFAULTS.items()
            )
            self._check_counters(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_counters(self, conn: sqlite3.Connection) -> None:
        """Make the running totals equal the table (inside the open transaction)."""
        actual = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM({_IS_TELEMETRY}), 0) "
            "FROM records"
        ).fetchone()
        placeholders = ", ".join("?" * len(_COUNTERS))
        stored = dict(
            conn.execute(
                f"SELECT key, value FROM meta WHERE key IN ({placeholders})", _COUNTERS
            ).fetchall()
        )
        wanted = dict(zip(_COUNTERS, (int(value) for value in actual), strict=True))
        if all(stored.get(key) == value for key, value in wanted.items()):
            return
        if len(stored) == len(_COUNTERS):
            self._counters_repaired = True
            logger.warning(
                "outbox %s: running totals %s disagree with the table %s; recomputed",
                self.path,
                {key: stored.get(key) for key in _COUNTERS},
                wanted,
            )
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", wanted.items())

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

    def _metas(self, keys: Sequence[str]) -> dict[str, float | None]:
        """Several meta values in one query (absent keys are None)."""
        placeholders = ", ".join("?" * len(keys))
        rows = self._conn.execute(
            f"SELECT key, value FROM meta WHERE key IN ({placeholders})", tuple(keys)
        ).fetchall()
        found = dict(rows)
        return {key: found.get(key) for key in keys}

    def _set_meta(self, key: str, value: float | None) -> None:
        self._conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _take_seq(self) -> int:
        """Allocate the next ``seq`` (one statement: the increment returns the new value)."""
        rows = self._conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'next_seq' RETURNING value"
        ).fetchall()
        return int(rows[0][0]) - 1

    def _count_drops(
        self, dropped: Iterable[tuple[str, int | None, float]], reason: DropReason
    ) -> None:
        """Note ``(kind, seq, created)`` of dropped records. They reach the meta counters in
        :meth:`_flush_drops`, once per write (a full outbox drops a record for every record
        it takes: counting each one in the table costs more than the insert)."""
        self._drops.extend((kind, seq, created, reason) for kind, seq, created in dropped)

    def _flush_drops(self) -> None:
        """Add the drops noted by this write to the meta counters: one read, one write."""
        if not self._drops:
            return
        drops, self._drops = self._drops, []
        self._unreported_hint = True
        telemetry = sum(1 for kind, _, _, _ in drops if kind == TELEMETRY_KIND)
        events = len(drops) - telemetry
        seqs = [seq for _, seq, _, _ in drops if seq is not None]
        created = [when for _, _, when, _ in drops]
        old = self._metas(("dropped_telemetry", "dropped_events", *_UNREPORTED_KEYS))

        def plus(key: str, amount: int) -> int:
            return int(old[key] or 0) + amount

        new: dict[str, float | None] = {
            "dropped_telemetry": plus("dropped_telemetry", telemetry),
            "dropped_events": plus("dropped_events", events),
            "u_telemetry": plus("u_telemetry", telemetry),
            "u_events": plus("u_events", events),
        }
        for reason, key in _UNREPORTED_BY.items():
            count = sum(1 for _, _, _, why in drops if why is reason)
            if count:
                new[key] = plus(key, count)
        if seqs:
            first, last = old["u_first_seq"], old["u_last_seq"]
            new["u_first_seq"] = min(seqs) if first is None else min(int(first), *seqs)
            new["u_last_seq"] = max(seqs) if last is None else max(int(last), *seqs)
        oldest, newest = old["u_oldest"], old["u_newest"]
        new["u_oldest"] = min(created) if oldest is None else min(oldest, *created)
        new["u_newest"] = max(created) if newest is None else max(newest, *created)
        self._conn.executemany(
            "UPDATE meta SET value = ? WHERE key = ?", [(v, k) for k, v in new.items()]
        )

    def _delete(self, rows: Sequence[tuple[int, str, int | None, float]], why: DropReason) -> int:
        if rows:
            self._conn.executemany("DELETE FROM records WHERE id = ?", [(row[0],) for row in rows])
            self._count_drops([(kind, seq, created) for _, kind, seq, created in rows], why)
        return len(rows)

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
        meta = self._metas(_UNREPORTED_KEYS)

        def count(key: str) -> int:
            value = meta[key]
            return 0 if value is None else int(value)

        def opt_int(key: str) -> int | None:
            value = meta[key]
            return None if value is None else int(value)

        return DropReport(
            telemetry=count("u_telemetry"),
            events=count("u_events"),
            by_size=count("u_by_size"),
            by_age=count("u_by_age"),
            by_rejection=count("u_by_rejection"),
            first_seq=opt_int("u_first_seq"),
            last_seq=opt_int("u_last_seq"),
            oldest_created=meta["u_oldest"],
            newest_created=meta["u_newest"],
        )

    def _maybe_report(self, now: float) -> int:
        """Queue one overflow event for the unreported drops, unless one is still pending;
        returns the bytes it added to the total (0: none queued)."""
        if self.overflow is None or not (self._drops or self._unreported_hint):
            return 0
        if self._conn.execute("SELECT 1 FROM records WHERE protected = 1 LIMIT 1").fetchone():
            return 0  # the pending one is still in flight; these drops go into the next report
        self._flush_drops()
        report = self._unreported()
        if report.total == 0:
            self._unreported_hint = False
            return 0
        seq = self._take_seq()
        topic, payload = self.overflow(report, seq)
        size = len(payload) + len(topic) + ROW_OVERHEAD
        self._conn.execute(
            "INSERT INTO records (kind, topic, payload, qos, retain, created, size, seq, "
            "protected) VALUES (?, ?, ?, 1, 0, ?, ?, ?, 1)",
            ("events", topic, payload, now, size, seq),
        )
        reset: list[tuple[float | None, str]] = [(0, key) for key in _UNREPORTED_KEYS[:5]]
        reset += [(None, key) for key in _UNREPORTED_KEYS[5:]]
        self._conn.executemany("UPDATE meta SET value = ? WHERE key = ?", reset)
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'overflow_reports'")
        self._unreported_hint = False
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
        return size

    def _store(self, items: Sequence[OutboxItem]) -> list[OutboxRecord | None]:
        """The body of :meth:`put` and :meth:`put_many`: ``items`` in order, each exactly as
        a put of its own would store it (seq, bounds, drops, overflow report), at one time."""
        conn = self._conn
        now = self._clock()
        self._expire(now)
        total = self._meta_int("bytes")  # kept exact below, without reading it again
        records: list[OutboxRecord | None] = []
        for item in items:
            seq: int | None = None
            if callable(item.payload):
                seq = self._take_seq()
                data = item.payload(seq)
            else:
                data = item.payload
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("payload must be bytes")
            data = bytes(data)
            size = len(data) + len(item.topic.encode("utf-8")) + ROW_OVERHEAD
            if size > self.max_message_bytes:
                raise OutboxError(
                    f"record of {size} bytes exceeds the {self.max_message_bytes}-byte limit"
                )
            if item.retain:
                superseded = conn.execute(
                    "DELETE FROM records WHERE retain = 1 AND topic = ? AND protected = 0 "
                    "RETURNING size",
                    (item.topic,),
                ).fetchall()
                total -= sum(int(row[0]) for row in superseded)
            need = total + size - self.max_bytes
            if need > 0:
                freed = self._free(need, telemetry=True)
                total, need = total - freed, need - freed
            if need > 0 and item.kind == TELEMETRY_KIND:
                self._count_drops([(item.kind, seq, now)], DropReason.SIZE)
                records.append(None)
                total += self._maybe_report(now)
                continue
            if need > 0:
                total -= self._free(need, telemetry=False)
            cursor = conn.execute(
                "INSERT INTO records (kind, topic, payload, qos, retain, created, size, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item.kind, item.topic, data, item.qos, int(item.retain), now, size, seq),
            )
            total += size
            records.append(
                OutboxRecord(
                    id=int(cursor.lastrowid or 0),
                    kind=item.kind,
                    topic=item.topic,
                    payload=data,
                    qos=item.qos,
                    retain=item.retain,
                    created=now,
                    seq=seq,
                    attempts=0,
                )
            )
            total += self._maybe_report(now)
        return records

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._connection

    # --- transactions -----------------------------------------------------------------------

    def _error(self, exc: BaseException) -> BaseException:
        """What a caller sees: SQLite errors as :class:`OutboxError`, the rest unchanged."""
        if isinstance(exc, sqlite3.Error):
            error = OutboxError(f"outbox {self.path}: {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _write(self, body: Callable[[], _T]) -> _T:
        """Run ``body`` in a write transaction shared with whatever other writes are queued
        (group commit, see the module docstring) and return its result once committed.

        The write joins the queue. The caller at the head of the queue leads: it runs the
        queued writes in one transaction, picking up those that arrive while it works, commits,
        and wakes their callers; the next head leads the writes that queued up during the
        commit. The others wait on a condition, not on the connection, so they return as soon
        as their commit is over."""
        if self._leader == threading.get_ident():
            raise OutboxError(
                f"outbox {self.path}: a payload builder or overflow reporter must not write "
                "to the outbox"
            )
        request = _Write(body)
        with self._queue_changed:
            self._queue.append(request)
            try:
                while not request.done and self._queue[0] is not request:
                    self._queue_changed.wait()
            except BaseException:  # interrupted while waiting: withdraw, unless being run
                if not request.taken:
                    self._queue.remove(request)
                    self._queue_changed.notify_all()  # it may have been the head
                raise
        if not request.done:
            try:
                with self._lock:
                    self._leader = threading.get_ident()
                    try:
                        self._run_batch()
                    finally:
                        self._leader = None
            finally:
                with self._queue_changed:
                    while self._queue and self._queue[0].taken:
                        self._queue.popleft().done = True
                    if not request.taken:  # interrupted before it ran: withdraw it
                        self._queue.remove(request)
                    self._queue_changed.notify_all()
        if request.error is not None:
            raise request.error
        return cast(_T, request.result)

    def _run_batch(self) -> None:
        """Run queued writes from the head of the queue in one transaction, including those
        queued meanwhile (up to :data:`_MAX_BATCH`), and commit. The caller holds ``_lock``
        and is the head of the queue; the writes it takes are marked ``taken``."""
        batch: list[_Write] = []
        stored: list[_Write] = []  # run in the open transaction, not committed yet
        try:
            while len(batch) < _MAX_BATCH:
                with self._queue_changed:
                    fresh = list(itertools.islice(self._queue, len(batch), _MAX_BATCH))
                    for request in fresh:
                        request.taken = True
                if not fresh:
                    break
                batch += fresh
                for request in fresh:
                    self._run_one(request, stored)
            if stored:
                conn = self._conn
                if not conn.in_transaction:  # SQLite rolled it back on an I/O error
                    raise OutboxError("the transaction was rolled back")
                conn.execute("COMMIT")
                self._commits += 1
        except BaseException as exc:
            # The transaction is gone (a failed COMMIT, an interrupt, an error that SQLite
            # answered with an automatic rollback): nothing it held is stored.
            self._drops.clear()
            self._unreported_hint = True
            with contextlib.suppress(OutboxError, sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            detail = str(exc) or type(exc).__name__
            for request in batch:  # all but those that failed on their own, run or not
                if request.error is None:
                    error = OutboxError(f"outbox {self.path}: nothing stored: {detail}")
                    error.__cause__ = exc
                    request.error, request.result = error, None
            if not isinstance(exc, Exception):
                raise

    def _run_one(self, request: _Write, stored: list[_Write]) -> None:
        """Run one queued write inside the batch's transaction, in a savepoint of its own
        unless it opens the transaction: a write that fails is undone alone and its error
        kept for its caller."""
        try:
            conn = self._conn
            first = not conn.in_transaction
            conn.execute("BEGIN IMMEDIATE" if first else "SAVEPOINT write")
        except (OutboxError, sqlite3.Error) as exc:
            text = str(exc) if isinstance(exc, OutboxError) else f"outbox {self.path}: {exc}"
            request.error = OutboxError(text)  # its own object: each caller raises its own
            request.error.__cause__ = exc
            return
        try:
            request.result = request.body()
            self._flush_drops()
        except Exception as exc:
            request.error = self._error(exc)  # first: the rollback itself may fail
            self._drops.clear()
            self._unreported_hint = True
            if not first:
                conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
            return
        if not first:
            conn.execute("RELEASE write")
        stored.append(request)

    def _read(self, body: Callable[[], _T]) -> _T:
        """Run ``body`` in one read transaction (a consistent snapshot)."""
        with self._lock:
            try:
                conn = self._conn
                conn.execute("BEGIN")
                try:
                    return body()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from exc

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
        the same topic (the broker keeps only the last one anyway). Concurrent puts share
        commits (see the module docstring); each returns once its record is committed.
        """
        item = _checked(OutboxItem(kind, topic, payload, qos, retain), "put")
        record = self._write(lambda: self._store((item,)))[0]
        with self._counts_lock:
            self._puts += 1
        return record

    def put_many(self, items: Iterable[OutboxItem]) -> list[OutboxRecord | None]:
        """Store several records in one transaction (one fsync) and return them in order.

        All or nothing: if any item fails (its payload builder raises, it is too large), none
        is stored and no ``seq`` is consumed. Each item is otherwise treated exactly as
        :meth:`put` would treat it at that point (bounds, drops, retained topics; None for
        telemetry dropped at once), so ``put_many(items)`` equals the puts in a row, only
        cheaper: use it where several records are produced at once."""
        checked = [_checked(item, f"put_many item {i}") for i, item in enumerate(items)]
        if not checked:
            return []
        records = self._write(lambda: self._store(checked))
        with self._counts_lock:
            self._puts += len(checked)
        return records

    def next_seq(self) -> int:
        """Allocate one ``seq`` durably, for a message that does not go through the outbox
        (the retained ``status`` and the last will)."""
        return self._write(self._take_seq)

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
            cursor = self._conn.executemany(
                "DELETE FROM records WHERE id = ?", [(rid,) for rid in ids]
            )
            deleted = cursor.rowcount
            self._maybe_report(self._clock())
            return deleted

        deleted = self._write(body)
        with self._counts_lock:
            self._acked += deleted
        return deleted

    def release(self, record_id: int) -> int:
        """Count one broker refusal of a record; returns its refusal count (0: no such row)."""

        def body() -> int:
            rows = self._conn.execute(
                "UPDATE records SET attempts = attempts + 1 WHERE id = ? RETURNING attempts",
                (record_id,),
            ).fetchall()
            return int(rows[0][0]) if rows else 0

        return self._write(body)

    def drop(self, record_id: int, *, reason: DropReason = DropReason.REJECTED) -> bool:
        """Remove a record that can never be delivered; counted and reported like any drop
        (except a refused overflow report itself, which would otherwise loop)."""

        def body() -> bool:
            rows = self._conn.execute(
                "DELETE FROM records WHERE id = ? RETURNING kind, seq, created, protected",
                (record_id,),
            ).fetchall()
            if not rows:
                return False
            kind, seq, created, protected = rows[0]
            if not protected:
                self._count_drops([(kind, seq, created)], reason)
            self._maybe_report(self._clock())
            return True

        return self._write(body)

    def enforce(self) -> int:
        """Apply the age bound now (puts do it too); returns the number of records dropped."""

        def body() -> int:
            now = self._clock()
            dropped = self._expire(now)
            self._maybe_report(now)
            return dropped

        return self._write(body)

    def stats(self) -> OutboxStats:
        """Counters and totals, without scanning the table (the totals are kept running)."""

        def body() -> OutboxStats:
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            (oldest,) = self._conn.execute("SELECT MIN(created) FROM records").fetchone()

            def count(key: str) -> int:
                value = meta.get(key)
                return 0 if value is None else int(value)

            with self._counts_lock:
                puts, acked = self._puts, self._acked
            return OutboxStats(
                rows=count("rows"),
                bytes=count("bytes"),
                telemetry_rows=count("telemetry_rows"),
                event_rows=count("rows") - count("telemetry_rows"),
                oldest_created=None if oldest is None else float(oldest),
                next_seq=count("next_seq"),
                dropped_telemetry=count("dropped_telemetry"),
                dropped_events=count("dropped_events"),
                overflow_reports=count("overflow_reports"),
                unreported=self._unreported(),
                puts=puts,
                acked=acked,
                recovered_from=self._recovered_from,
                commits=self._commits,
                counters_repaired=self._counters_repaired,
            )

        return self._read(body)

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
