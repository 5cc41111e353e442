"""MQTT ingest: device messages into the registry, in batches, without ever stopping.

paho's network thread only puts ``(topic, payload, received_at)`` on a bounded queue; one
writer thread parses with :mod:`edgekit.protocol`, drops duplicates, and applies a whole batch
in one transaction with ``executemany`` statements, so the database sees a few statements per
batch rather than one transaction per message. Within a batch only the newest ``status``,
``telemetry`` and ``reported`` of each device is written (they are state: the older ones would
be overwritten in the same transaction); every event is kept.

Failure rules, each counted in :class:`IngestStats` and exposed by the REST API:

* a payload that does not parse (bad JSON, wrong types, a topic that is not ours, a payload
  whose ``device`` is not the topic's) is counted per topic kind as ``malformed`` and dropped;
* when the queue is full, telemetry is dropped (``dropped``; the next report supersedes it)
  while state and events wait for room, which pushes back on the broker instead of losing them;
* a batch the database refuses is retried message by message, so one unstorable message costs
  only itself (``db_errors``); when the database is unreachable the batch waits and retries.

Several controller replicas may ingest at once (MQTT 5 shared subscriptions split the stream
between them), so nothing here relies on seeing every message, or seeing them in order:

* a message is acknowledged to the broker (``ack``, paho's manual acknowledgements) only once
  its batch is committed: a replica killed with messages in its queue leaves them unacknowledged
  in its broker session, which another replica takes over (``edgekit.fleet.server``);
* the database, not memory, decides what is a duplicate: each state column group remembers the
  ``msg_id``, ``seq`` and ``ts`` of the message it came from, and a message is applied only if
  :func:`supersedes` says it is newer (a resend, a redelivery to another replica, a retained
  copy replayed to a new subscriber, or a message overtaken by a newer one on another replica
  changes nothing); events and telemetry samples are unique per ``(device, msg_id)``. The rows
  of a batch's devices are locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serializes
  writers) while the decision is made.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgekit.fleet.db import Database, Device, DeviceEvent, TelemetrySample
from edgekit.fleet.registry import declared_labels
from edgekit.protocol import (
    Deduplicator,
    Event,
    MessageKind,
    ModelRef,
    ProtocolError,
    Reported,
    Status,
    StatusState,
    Telemetry,
    decode,
    parse_topic,
)

__all__ = ["SEQ_RESET_S", "WILL_SLACK_S", "Ingest", "IngestStats", "Stamp", "supersedes"]

log = logging.getLogger(__name__)

_DEVICES = cast(sa.Table, Device.__table__)
_EVENTS = cast(sa.Table, DeviceEvent.__table__)
_SAMPLES = cast(sa.Table, TelemetrySample.__table__)
_JSON_OR_NULL = sa.JSON(none_as_null=True)

#: A sender's ``seq`` restarts when it loses its state (a re-flashed agent, a simulator run):
#: a message with a lower ``seq`` whose own ``ts`` is this much newer than the stored one is
#: believed. Reordering and redelivery only ever bring back messages seconds old.
SEQ_RESET_S = 60.0
#: The last will is composed when the device connects, so it carries that moment's ``seq``
#: and ``ts``: older than the ``online`` status it follows. A will supersedes a status with a
#: higher ``seq`` if that status is no more than this much newer (the same connection's
#: handshake), and not a later connection's ``online``.
WILL_SLACK_S = 30.0
_WILL_REASON = "connection-lost"

#: Acknowledges one message to the broker (None: nothing to acknowledge).
Ack = Callable[[], None] | None
#: The topic of a queue item that is no message: :meth:`Ingest.flush`'s marker.
_BARRIER = "\x00barrier"


@dataclass(frozen=True, slots=True)
class Stamp:
    """Where a piece of device state came from: the message's id, the device's ``seq`` and
    ``ts`` for it, and whether it is a last will (``status`` offline, ``connection-lost``)."""

    msg_id: str
    seq: int
    ts: float
    will: bool = False


def supersedes(new: Stamp, old: Stamp | None) -> bool:
    """Whether the message stamped ``new`` is newer device state than the stored ``old``.

    The same ``msg_id`` is a copy (never newer). ``seq`` orders one sender's messages; a
    ``seq`` of 0 means unsequenced (arrival order decides). A last will orders after the
    connection it was registered for (see :data:`WILL_SLACK_S`), and a ``seq`` that went back
    is a restarted sender when the message is clearly newer by its own clock
    (:data:`SEQ_RESET_S`).
    """
    if old is None:
        return True
    if new.msg_id == old.msg_id:
        return False
    if new.seq == 0 or old.seq == 0:
        return True
    if new.seq > old.seq:
        return True
    if new.will and not old.will and old.ts - new.ts <= WILL_SLACK_S:
        return True
    return new.ts - old.ts > SEQ_RESET_S


def _stamp(message: Any) -> Stamp:
    will = (
        isinstance(message, Status)
        and message.state is StatusState.OFFLINE
        and message.reason == _WILL_REASON
    )
    return Stamp(message.msg_id, message.seq, message.ts, will)


@dataclass
class IngestStats:
    """Counters since the controller started (read by the API and the benchmark)."""

    received: Counter[str] = field(default_factory=Counter)
    processed: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    empty: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    """Copies dropped in memory (the same ``msg_id`` seen by this process recently)."""
    stale: Counter[str] = field(default_factory=Counter)
    """State messages not applied: copies of the stored state, or older than it."""
    dropped: int = 0
    db_errors: int = 0
    batches: int = 0
    last_batch: int = 0
    max_batch: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    lag_s: float = 0.0
    """Seconds from receipt to commit, averaged over the last batch."""
    max_lag_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "processed": dict(self.processed),
            "processed_total": sum(self.processed.values()),
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "empty": dict(self.empty),
            "duplicates": self.duplicates,
            "stale": dict(self.stale),
            "stale_total": sum(self.stale.values()),
            "dropped": self.dropped,
            "db_errors": self.db_errors,
            "batches": self.batches,
            "last_batch": self.last_batch,
            "max_batch": self.max_batch,
            "queue_depth": self.queue_depth,
            "max_queue_depth": self.max_queue_depth,
            "lag_s": round(self.lag_s, 4),
            "max_lag_s": round(self.max_lag_s, 4),
        }


@dataclass
class _Record:
    fleet: str
    device: str
    kind: MessageKind
    message: Any
    received_at: float
    stamp: Stamp


_STAMPS = {  # the Device columns holding the stamp of each kind's state
    MessageKind.STATUS: ("status_msg_id", "status_seq", "status_ts"),
    MessageKind.TELEMETRY: ("tel_msg_id", "tel_seq", "tel_ts"),
    MessageKind.REPORTED: ("rep_msg_id", "rep_seq", "rep_ts"),
    MessageKind.EVENTS: ("event_msg_id", "event_seq", "event_ts"),
}


@dataclass
class _Stored:
    """One device's stored stamps, advanced as the batch's messages are accepted."""

    stamps: dict[MessageKind, Stamp | None]
    history_at: float | None


def _call(ack: Ack) -> None:
    if ack is not None:
        try:
            ack()
        except Exception:  # the link is gone: the broker redelivers, the database dedups
            log.debug("acknowledging a message failed", exc_info=True)


def _model(ref: ModelRef | None) -> tuple[str | None, int | None, str | None, str | None]:
    if ref is None:
        return None, None, None, None
    return ref.name, ref.version, ref.sha256, ref.display_version


def _drift(telemetry: Telemetry) -> float | None:
    """The largest PSI the device reports, input features and output alike."""
    drift = telemetry.drift
    if drift is None:
        return None
    values = [*drift.input_psi.values()]
    if drift.output_psi is not None:
        values.append(drift.output_psi)
    return max(values) if values else None


class Ingest:
    """The queue and the writer thread."""

    def __init__(
        self,
        db: Database,
        *,
        queue_size: int = 50_000,
        batch_max: int = 2_000,
        batch_wait_s: float = 0.05,
        history_interval_s: float = 60.0,
        history_retention_s: float = 86_400.0,
        event_retention_s: float = 7 * 86_400.0,
    ) -> None:
        self.db = db
        self.stats = IngestStats()
        self._queue: queue.Queue[tuple[str, bytes, float, Ack]] = queue.Queue(maxsize=queue_size)
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_s
        self._history_interval_s = history_interval_s
        self._history_retention_s = history_retention_s
        self._event_retention_s = event_retention_s
        self._dedup = Deduplicator()
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self._malformed_logged = 0.0

    # --- producer side (paho's thread) ---

    def submit(self, topic: str, payload: bytes, received_at: float, ack: Ack = None) -> None:
        """Queue one message; never raises. ``ack`` is called once the message is settled
        (committed, or refused for good): until then the broker keeps it for redelivery."""
        kind = topic.rsplit("/", 1)[-1]
        with self._lock:
            self.stats.received[kind] += 1
        item = (topic, payload, received_at, ack)
        if kind == MessageKind.TELEMETRY.value:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                with self._lock:
                    self.stats.dropped += 1
                _call(ack)  # dropped on purpose: the next report supersedes it
            return
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # --- writer thread ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-ingest", daemon=True)
        self._thread.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, *, timeout: float = 30.0) -> bool:
        """Wait until every message submitted before this call is settled (stored and
        acknowledged), however many arrive meanwhile; False on timeout."""
        done = threading.Event()
        try:
            self._queue.put((_BARRIER, b"", time.time(), done.set), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def drain(self, *, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty and all of it written (tests and benchmarks; under a
        steady stream of messages use :meth:`flush`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._maybe_prune()
                continue
            items = [first]
            deadline = time.monotonic() + self._batch_wait_s
            while len(items) < self._batch_max:
                remaining = deadline - time.monotonic()
                try:
                    items.append(
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            settled = True
            try:
                settled = self._process(items)
            except Exception:
                log.exception("ingest batch of %d messages failed", len(items))
            finally:
                if settled:  # else: stopping with the database away; the broker keeps them
                    for item in items:
                        _call(item[3])
                for _ in items:
                    self._queue.task_done()
            self._maybe_prune()

    def _process(self, items: Sequence[tuple[str, bytes, float, Ack]]) -> bool:
        """Write a batch; False if it was given up unwritten because the process stops."""
        messages = [item for item in items if item[0] is not _BARRIER]
        records = [r for r in (self._parse(*item[:3]) for item in messages) if r is not None]
        settled = self._write(records) if records else True
        depth = self._queue.qsize()
        now = time.time()
        with self._lock:
            stats = self.stats
            stats.batches += 1
            stats.last_batch = len(messages)
            stats.max_batch = max(stats.max_batch, len(messages))
            stats.queue_depth = depth
            stats.max_queue_depth = max(stats.max_queue_depth, depth)
            if messages:
                stats.lag_s = sum(now - item[2] for item in messages) / len(messages)
                stats.max_lag_s = max(stats.max_lag_s, stats.lag_s)
        return settled

    def _parse(self, topic: str, payload: bytes, received_at: float) -> _Record | None:
        try:
            kind = parse_topic(topic).kind.value
        except ProtocolError:
            kind = "topic"
        if not payload and kind != "topic":
            with self._lock:
                self.stats.empty[kind] += 1  # a retained message being cleared
            return None
        try:
            parts, message = decode(topic, payload)
            if parts.kind not in (
                MessageKind.STATUS,
                MessageKind.TELEMETRY,
                MessageKind.EVENTS,
                MessageKind.REPORTED,
            ):
                raise ProtocolError(f"{parts.kind.value} travels controller-to-device")
        except ProtocolError as exc:
            self._count_malformed(kind, topic, exc)
            return None
        except Exception as exc:
            self._count_malformed(kind, topic, exc)
            return None
        if not self._dedup.accept(message, fleet=parts.fleet):
            with self._lock:
                self.stats.duplicates += 1
            return None
        return _Record(parts.fleet, parts.device, parts.kind, message, received_at, _stamp(message))

    def _count_malformed(self, kind: str, topic: str, exc: Exception) -> None:
        with self._lock:
            self.stats.malformed[kind] += 1
        now = time.monotonic()
        if now - self._malformed_logged > 10.0:  # at most one line per 10 s
            self._malformed_logged = now
            log.warning("dropped a malformed message on %.120r: %s", topic, exc)

    # --- writing ---

    def _write(self, records: Sequence[_Record]) -> bool:
        """Apply ``records``; False only when stopping while the database is unavailable."""
        delay = 0.5
        while True:
            try:
                stale = self._apply(records)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                # Unreachable, busy, or a deadlock with another replica: the batch waits and
                # is applied again from scratch (the queue absorbs the meantime).
                if self._stop.is_set():
                    self._count_failed(records, exc)
                    return False
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            except Exception as exc:
                if len(records) == 1:
                    self._count_failed(records, exc)
                    return True
                log.warning("a batch failed (%s); writing its messages one by one", exc)
                return all([self._write([record]) for record in records])
            with self._lock:
                for record in records:
                    self.stats.processed[record.kind.value] += 1
                self.stats.stale.update(stale)
            return True

    def _count_failed(self, records: Sequence[_Record], exc: Exception) -> None:
        with self._lock:
            self.stats.db_errors += len(records)
        log.warning("could not store %d message(s): %s", len(records), exc)

    def _apply(self, records: Sequence[_Record]) -> Counter[str]:
        """One transaction for the batch; returns the state messages found stale, per kind."""
        keys = {(r.fleet, r.device) for r in records}
        first_seen: dict[tuple[str, str], float] = {}
        for r in records:
            first_seen.setdefault((r.fleet, r.device), r.received_at)
        stale: Counter[str] = Counter()
        with self.db.write() as session:
            ids = self._resolve(session, keys, first_seen)
            stored = self._lock_devices(session, ids.values())
            latest: dict[tuple[MessageKind, int], _Record] = {}
            progress: dict[int, _Record] = {}
            events: list[tuple[int, _Record]] = []
            samples: list[tuple[int, _Record]] = []
            seen: dict[int, float] = {}
            for r in records:  # arrival order; supersedes() decides which state is newest
                device_id = ids[(r.fleet, r.device)]
                seen[device_id] = max(seen.get(device_id, 0.0), r.received_at)
                row = stored[device_id]
                current = row.stamps[r.kind]
                if r.kind is MessageKind.EVENTS:
                    events.append((device_id, r))  # unique per (device, msg_id) in the table
                    event: Event = r.message
                    if (
                        event.rollout_id is not None
                        and event.event.startswith("update.")
                        and supersedes(r.stamp, current)
                    ):
                        row.stamps[r.kind] = r.stamp
                        progress[device_id] = r
                    continue
                if (
                    r.kind is MessageKind.TELEMETRY
                    and (current is None or current.msg_id != r.stamp.msg_id)
                    and r.received_at - (row.history_at or 0.0) >= self._history_interval_s
                ):
                    row.history_at = r.received_at
                    samples.append((device_id, r))
                if supersedes(r.stamp, current):
                    row.stamps[r.kind] = r.stamp
                    latest[(r.kind, device_id)] = r
                else:
                    stale[r.kind.value] += 1
            by_kind: dict[MessageKind, list[tuple[int, _Record]]] = {}
            for (kind, device_id), record in latest.items():
                by_kind.setdefault(kind, []).append((device_id, record))
            self._statuses(session, by_kind.get(MessageKind.STATUS, []))
            history = {device_id: stored[device_id].history_at for device_id, _ in samples}
            telemetry = by_kind.get(MessageKind.TELEMETRY, [])
            self._telemetry(session, telemetry, history)
            self._samples(session, samples, history, {device_id for device_id, _ in telemetry})
            self._reported(session, by_kind.get(MessageKind.REPORTED, []))
            self._events(session, events, list(progress.items()))
            session.execute(
                sa.update(_DEVICES)
                .where(_DEVICES.c.id == sa.bindparam("b_id"))
                .values(last_seen=sa.func.max(_DEVICES.c.last_seen, sa.bindparam("b_seen")))
                if self.db.dialect == "sqlite"
                else sa.update(_DEVICES)
                .where(_DEVICES.c.id == sa.bindparam("b_id"))
                .values(last_seen=sa.func.greatest(_DEVICES.c.last_seen, sa.bindparam("b_seen"))),
                [{"b_id": i, "b_seen": t} for i, t in sorted(seen.items())],
            )
        # Only now: ids of devices inserted by a transaction that rolled back must not stay.
        self._ids.update(ids)
        return stale

    def _lock_devices(self, session: Session, ids: Iterable[int]) -> dict[int, _Stored]:
        """Read (and on PostgreSQL lock, in id order: no deadlock between replicas) the stamps
        of the devices a batch touches, so the newer-than test and the write are one step."""
        c = _DEVICES.c
        columns = [c.id, c.history_at, c.online, c.status_reason]
        for names in _STAMPS.values():
            columns.extend(c[name] for name in names)
        query = sa.select(*columns).where(c.id.in_(sorted(set(ids)))).order_by(c.id)
        if self.db.dialect == "postgresql":
            query = query.with_for_update()
        stored = {}
        for row in session.execute(query):
            mapping = row._mapping
            stamps: dict[MessageKind, Stamp | None] = {}
            for kind, (msg_id, seq, ts) in _STAMPS.items():
                if mapping[msg_id] is None:
                    stamps[kind] = None
                    continue
                will = (
                    kind is MessageKind.STATUS
                    and not mapping["online"]
                    and mapping["status_reason"] == _WILL_REASON
                )
                stamps[kind] = Stamp(
                    mapping[msg_id], int(mapping[seq] or 0), float(mapping[ts] or 0.0), will
                )
            stored[mapping["id"]] = _Stored(stamps, mapping["history_at"])
        return stored

    def _resolve(
        self, session: Session, keys: Iterable[tuple[str, str]], first_seen: Mapping[Any, float]
    ) -> dict[tuple[str, str], int]:
        ids = {key: self._ids[key] for key in keys if key in self._ids}
        missing = [key for key in keys if key not in ids]
        if not missing:
            return ids
        rows = [
            {
                "fleet": fleet,
                "device": device,
                "first_seen": first_seen[(fleet, device)],
                "last_seen": first_seen[(fleet, device)],
                "tags": {},
                "groups": [],
                "declared_tags": {},
                "declared_groups": [],
                "online": False,
                "desired_published": True,
                "seq": 0,
            }
            for fleet, device in sorted(missing)  # one order for every replica: no deadlock
        ]
        session.execute(self._insert(_DEVICES).on_conflict_do_nothing(), rows)
        fleets = {fleet for fleet, _ in missing}
        names = {device for _, device in missing}
        found = session.execute(
            sa.select(_DEVICES.c.fleet, _DEVICES.c.device, _DEVICES.c.id).where(
                _DEVICES.c.fleet.in_(fleets), _DEVICES.c.device.in_(names)
            )
        )
        for fleet, device, device_id in found:
            if (fleet, device) in first_seen:
                ids[(fleet, device)] = device_id
        return ids

    def _insert(self, table: sa.Table) -> Any:
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        return dialect.insert(table)

    @staticmethod
    def _stamp_values(kind: MessageKind) -> dict[str, Any]:
        """``SET`` clauses recording which message a kind's state came from."""
        msg_id, seq, ts = _STAMPS[kind]
        return {
            msg_id: sa.bindparam("b_msg"),
            seq: sa.bindparam("b_seq"),
            ts: sa.bindparam("b_ts"),
        }

    @staticmethod
    def _stamp_params(record: _Record) -> dict[str, Any]:
        return {"b_msg": record.stamp.msg_id, "b_seq": record.stamp.seq, "b_ts": record.stamp.ts}

    def _statuses(self, session: Session, items: Sequence[tuple[int, _Record]]) -> None:
        if not items:
            return
        params = []
        for device_id, r in items:
            status: Status = r.message
            labels = declared_labels(status.extra)
            params.append(
                {
                    "b_id": device_id,
                    "b_online": status.state is StatusState.ONLINE,
                    "b_reason": status.reason,
                    "b_at": r.received_at,
                    "b_agent": status.agent_version,
                    "b_dtags": None if labels is None else labels[0],
                    "b_dgroups": None if labels is None else labels[1],
                    **self._stamp_params(r),
                }
            )
        c = _DEVICES.c
        session.execute(
            sa.update(_DEVICES)
            .where(c.id == sa.bindparam("b_id"))
            .values(
                online=sa.bindparam("b_online"),
                status_reason=sa.bindparam("b_reason"),
                status_at=sa.bindparam("b_at"),
                agent_version=sa.func.coalesce(sa.bindparam("b_agent"), c.agent_version),
                declared_tags=sa.func.coalesce(
                    sa.bindparam("b_dtags", type_=_JSON_OR_NULL), c.declared_tags
                ),
                declared_groups=sa.func.coalesce(
                    sa.bindparam("b_dgroups", type_=_JSON_OR_NULL), c.declared_groups
                ),
                **self._stamp_values(MessageKind.STATUS),
            ),
            sorted(params, key=lambda p: int(p["b_id"])),
        )

    def _telemetry(
        self,
        session: Session,
        items: Sequence[tuple[int, _Record]],
        history: Mapping[int, float | None],
    ) -> None:
        """The newest telemetry of each device (and, in the same statement, when its last
        history sample was kept, for the devices that got one)."""
        if not items:
            return
        params = []
        for device_id, r in items:
            t: Telemetry = r.message
            name, version, _sha, _display = _model(t.model)
            drift = _drift(t)
            self_test = None if t.self_test is None else t.self_test.ok
            params.append(
                {
                    "b_id": device_id,
                    "b_at": r.received_at,
                    "b_name": name,
                    "b_version": version,
                    "b_count": t.inference.count,
                    "b_errors": t.inference.errors,
                    "b_rejected": t.inference.rejected,
                    "b_p50": t.inference.p50_ms,
                    "b_p95": t.inference.p95_ms,
                    "b_p99": t.inference.p99_ms,
                    "b_drift": drift,
                    "b_selftest": self_test,
                    "b_cpu": t.system.cpu_percent,
                    "b_temp": t.system.temperature_c,
                    "b_rss": t.system.rss_bytes,
                    "b_hist": history.get(device_id),
                    **self._stamp_params(r),
                }
            )
        c = _DEVICES.c
        session.execute(
            sa.update(_DEVICES)
            .where(c.id == sa.bindparam("b_id"))
            .values(
                telemetry_at=sa.bindparam("b_at"),
                tel_model_name=sa.bindparam("b_name"),
                tel_model_version=sa.bindparam("b_version"),
                inf_count=sa.bindparam("b_count"),
                inf_errors=sa.bindparam("b_errors"),
                inf_rejected=sa.bindparam("b_rejected"),
                p50_ms=sa.bindparam("b_p50"),
                p95_ms=sa.bindparam("b_p95"),
                p99_ms=sa.bindparam("b_p99"),
                # drift: null means "too few requests to score yet" (the window carries
                # over): the last score of the same model stays, or a drift gate would
                # flap to "no data" between two scored reports and never hold.
                drift_psi=sa.func.coalesce(
                    sa.cast(sa.bindparam("b_drift"), sa.Float),
                    sa.case(
                        (
                            (c.tel_model_name == sa.bindparam("b_name"))
                            & (c.tel_model_version == sa.bindparam("b_version")),
                            c.drift_psi,
                        ),
                        else_=None,
                    ),
                ),
                self_test_ok=sa.bindparam("b_selftest"),
                cpu_percent=sa.bindparam("b_cpu"),
                temperature_c=sa.bindparam("b_temp"),
                rss_bytes=sa.bindparam("b_rss"),
                history_at=sa.func.coalesce(sa.bindparam("b_hist", type_=sa.Float), c.history_at),
                **self._stamp_values(MessageKind.TELEMETRY),
            ),
            sorted(params, key=lambda p: int(p["b_id"])),
        )

    def _samples(
        self,
        session: Session,
        items: Sequence[tuple[int, _Record]],
        history: Mapping[int, float | None],
        written: set[int],
    ) -> None:
        """Telemetry history: one row per kept message, unique per (device, msg_id);
        ``history_at`` of devices whose telemetry update (``written``) did not set it."""
        if not items:
            return
        rows = []
        for device_id, r in items:
            t: Telemetry = r.message
            name, version, _sha, _display = _model(t.model)
            rows.append(
                {
                    "device_id": device_id,
                    "received_at": r.received_at,
                    "model": None if name is None else f"{name}:{version}",
                    "inferences": t.inference.count,
                    "errors": t.inference.errors,
                    "p95_ms": t.inference.p95_ms,
                    "drift_psi": _drift(t),
                    "cpu_percent": t.system.cpu_percent,
                    "temperature_c": t.system.temperature_c,
                    "msg_id": r.stamp.msg_id,
                }
            )
        session.execute(self._insert(_SAMPLES).on_conflict_do_nothing(), rows)
        rest = sorted((i, t) for i, t in history.items() if i not in written and t is not None)
        if rest:
            session.execute(
                sa.update(_DEVICES)
                .where(_DEVICES.c.id == sa.bindparam("b_id"))
                .values(history_at=sa.bindparam("b_at")),
                [{"b_id": i, "b_at": t} for i, t in rest],
            )

    def _reported(self, session: Session, items: Sequence[tuple[int, _Record]]) -> None:
        if not items:
            return
        params = []
        for device_id, r in items:
            rep: Reported = r.message
            name, version, sha, display = _model(rep.current)
            prev_name, prev_version, _, _ = _model(rep.previous)
            last = rep.last_update
            params.append(
                {
                    "b_id": device_id,
                    "b_at": r.received_at,
                    "b_name": name,
                    "b_version": version,
                    "b_sha": sha,
                    "b_display": display,
                    "b_pname": prev_name,
                    "b_pversion": prev_version,
                    "b_state": rep.update_state,
                    "b_lrollout": None if last is None else last.rollout_id,
                    "b_loutcome": None if last is None else last.outcome.value,
                    "b_lreason": None if last is None else last.reason,
                    "b_lversion": None if last is None else last.version,
                    "b_agent": rep.agent_version,
                    **self._stamp_params(r),
                }
            )
        c = _DEVICES.c
        session.execute(
            sa.update(_DEVICES)
            .where(c.id == sa.bindparam("b_id"))
            .values(
                reported_at=sa.bindparam("b_at"),
                current_name=sa.bindparam("b_name"),
                current_version=sa.bindparam("b_version"),
                current_sha256=sa.bindparam("b_sha"),
                current_display=sa.bindparam("b_display"),
                previous_name=sa.bindparam("b_pname"),
                previous_version=sa.bindparam("b_pversion"),
                update_state=sa.bindparam("b_state"),
                last_update_rollout=sa.bindparam("b_lrollout"),
                last_update_outcome=sa.bindparam("b_loutcome"),
                last_update_reason=sa.bindparam("b_lreason"),
                last_update_version=sa.bindparam("b_lversion"),
                agent_version=sa.func.coalesce(sa.bindparam("b_agent"), c.agent_version),
                **self._stamp_values(MessageKind.REPORTED),
            ),
            sorted(params, key=lambda p: int(p["b_id"])),
        )

    def _events(
        self,
        session: Session,
        items: Sequence[tuple[int, _Record]],
        progress: Sequence[tuple[int, _Record]],
    ) -> None:
        """Every event once (unique per device and ``msg_id``); ``progress`` are the newest
        update events of their devices, which say how an update is going."""
        if items:
            rows = []
            for device_id, r in items:
                e: Event = r.message
                rows.append(
                    {
                        "device_id": device_id,
                        "received_at": r.received_at,
                        "ts": e.ts,
                        "event": e.event,
                        "severity": e.severity.value,
                        "message": e.message,
                        "reason": e.reason,
                        "rollout_id": e.rollout_id,
                        "ref": e.ref,
                        "data": dict(e.data),
                        "msg_id": e.msg_id,
                    }
                )
            session.execute(self._insert(_EVENTS).on_conflict_do_nothing(), rows)
        if progress:
            c = _DEVICES.c
            session.execute(
                sa.update(_DEVICES)
                .where(c.id == sa.bindparam("b_id"))
                .values(
                    event_rollout=sa.bindparam("b_rollout"),
                    event_name=sa.bindparam("b_event"),
                    event_at=sa.bindparam("b_at"),
                    **self._stamp_values(MessageKind.EVENTS),
                ),
                [
                    {
                        "b_id": device_id,
                        "b_rollout": r.message.rollout_id,
                        "b_event": r.message.event,
                        "b_at": r.received_at,
                        **self._stamp_params(r),
                    }
                    for device_id, r in sorted(progress, key=lambda item: item[0])
                ],
            )

    def _maybe_prune(self) -> None:
        """Drop telemetry history and events past their retention, once a minute."""
        now = time.time()
        if now - self._last_prune < 60.0:
            return
        self._last_prune = now
        try:
            with self.db.write() as session:
                session.execute(
                    sa.delete(_SAMPLES).where(
                        _SAMPLES.c.received_at < now - self._history_retention_s
                    )
                )
                session.execute(
                    sa.delete(_EVENTS).where(_EVENTS.c.received_at < now - self._event_retention_s)
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("pruning history failed: %s", exc)
