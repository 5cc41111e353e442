"""The controller's database: tables and sessions (SQLAlchemy 2.x; SQLite or PostgreSQL).

Everything the controller knows lives here, so that a controller killed at any moment comes
back knowing exactly what it knew: the registry (:class:`Device`), rollouts and their
per-device progress (:class:`Rollout`, :class:`RolloutDevice`), the desired state each device
should run and whether it reached the broker (columns of :class:`Device`), commands waiting to
be published (:class:`Command`), the audit log, events and a thinned telemetry history.

Times are Unix seconds in floats (what the MQTT messages carry), which compare the same way on
both databases and need no time-zone handling.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (a process crash loses nothing committed;
a power cut may lose the last transactions, which the startup reconciliation with the broker's
retained ``desired`` messages repairs) and every write transaction starts with ``BEGIN
IMMEDIATE``: two writers (ingest and the rollout engine) then queue on the busy timeout instead
of failing with "database is locked" when a read transaction tries to upgrade.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "Artifact",
    "AuditEntry",
    "Base",
    "Command",
    "Database",
    "Device",
    "DeviceEvent",
    "Lease",
    "Rollout",
    "RolloutDevice",
    "TelemetrySample",
]

_ID = 64  # protocol.MAX_ID_LENGTH: fleet and device ids are MQTT topic levels
_NAME = 64
_SHA = 64
_SCHEMA_LOCK = 0x65646B  # any constant: the advisory lock creating the schema takes


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's documented class attribute
        dict[str, Any]: sa.JSON,
        list[Any]: sa.JSON,
        int: sa.BigInteger,  # inference counters and seq reach 2**63 - 1
    }


class Device(Base):
    """One device of one fleet: what it reports, and what the controller wants it to run."""

    __tablename__ = "devices"
    __table_args__ = (sa.UniqueConstraint("fleet", "device", name="uq_devices_fleet_device"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    fleet: Mapped[str] = mapped_column(sa.String(_ID), index=True)
    device: Mapped[str] = mapped_column(sa.String(_ID))
    first_seen: Mapped[float]
    last_seen: Mapped[float]

    # Labels: set by operators (REST API) and declared by the device in its status message.
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    groups: Mapped[list[Any]] = mapped_column(default=list)
    declared_tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    declared_groups: Mapped[list[Any]] = mapped_column(default=list)

    # status
    online: Mapped[bool] = mapped_column(default=False)
    status_reason: Mapped[str | None] = mapped_column(sa.String(_NAME))
    status_at: Mapped[float | None]
    agent_version: Mapped[str | None] = mapped_column(sa.String(128))

    # reported (retained): what runs now, what a rollback returns to, how the last update ended
    reported_at: Mapped[float | None]
    current_name: Mapped[str | None] = mapped_column(sa.String(_NAME))
    current_version: Mapped[int | None]
    current_sha256: Mapped[str | None] = mapped_column(sa.String(_SHA))
    current_display: Mapped[str | None] = mapped_column(sa.String(128))
    previous_name: Mapped[str | None] = mapped_column(sa.String(_NAME))
    previous_version: Mapped[int | None]
    update_state: Mapped[str | None] = mapped_column(sa.String(_NAME))
    last_update_rollout: Mapped[str | None] = mapped_column(sa.String(_ID))
    last_update_outcome: Mapped[str | None] = mapped_column(sa.String(_NAME))
    last_update_reason: Mapped[str | None] = mapped_column(sa.String(_NAME))
    last_update_version: Mapped[int | None]

    # the latest telemetry, flattened to what gates, the API and the dashboard read
    telemetry_at: Mapped[float | None]
    tel_model_name: Mapped[str | None] = mapped_column(sa.String(_NAME))
    tel_model_version: Mapped[int | None]
    inf_count: Mapped[int | None]
    inf_errors: Mapped[int | None]
    inf_rejected: Mapped[int | None]
    p50_ms: Mapped[float | None]
    p95_ms: Mapped[float | None]
    p99_ms: Mapped[float | None]
    drift_psi: Mapped[float | None]
    self_test_ok: Mapped[bool | None]
    cpu_percent: Mapped[float | None]
    temperature_c: Mapped[float | None]
    rss_bytes: Mapped[int | None]

    # the last update event that named a rollout (progress while an update runs)
    event_rollout: Mapped[str | None] = mapped_column(sa.String(_ID))
    event_name: Mapped[str | None] = mapped_column(sa.String(_NAME))
    event_at: Mapped[float | None]

    # Which message each state above came from (msg_id, the device's seq and ts), so that
    # ingest applies a message only if it is newer than what is stored: with several
    # controller replicas (shared subscriptions) a device's messages reach different
    # processes and may commit out of order, and a redelivered or retained copy must not
    # overwrite newer state. See ``edgekit.fleet.ingest.supersedes``.
    status_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    status_seq: Mapped[int | None]
    status_ts: Mapped[float | None]
    tel_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    tel_seq: Mapped[int | None]
    tel_ts: Mapped[float | None]
    rep_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    rep_seq: Mapped[int | None]
    rep_ts: Mapped[float | None]
    event_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    event_seq: Mapped[int | None]
    event_ts: Mapped[float | None]
    history_at: Mapped[float | None]
    """When the last telemetry history sample was kept (thinning shared by all replicas)."""

    # Desired state, owned by the rollout engine. payload None: never set; "": withdrawn
    # (an empty retained message). `desired_published` turns true only after the broker
    # acknowledged exactly this msg_id, so a restart knows what may still be missing.
    desired_payload: Mapped[str | None] = mapped_column(sa.Text)
    desired_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    desired_rollout: Mapped[str | None] = mapped_column(sa.String(_ID))
    desired_published: Mapped[bool] = mapped_column(default=True, index=True)
    desired_at: Mapped[float | None]
    seq: Mapped[int] = mapped_column(default=0)
    """The controller's ``seq`` for messages to this device (protocol: per sender and device)."""


class Artifact(Base):
    """A bundle in the content-addressed store (the file is ``blobs/<sha256>.ekb``)."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(sa.String(_SHA), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(_NAME))
    version: Mapped[int]
    display_version: Mapped[str | None] = mapped_column(sa.String(128))
    size: Mapped[int]
    created_at: Mapped[float]
    uploaded_by: Mapped[str | None] = mapped_column(sa.String(128))


class Rollout(Base):
    """A rollout: its fixed spec (``spec``) and where its state machine stands."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(sa.String(_ID), primary_key=True)
    fleet: Mapped[str] = mapped_column(sa.String(_ID), index=True)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    artifact_sha256: Mapped[str] = mapped_column(sa.String(_SHA))
    bundle: Mapped[str] = mapped_column(sa.String(_NAME))
    version: Mapped[int]
    display_version: Mapped[str | None] = mapped_column(sa.String(128))
    url: Mapped[str] = mapped_column(sa.String(2048))
    size: Mapped[int]
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(sa.String(32), index=True)
    wave: Mapped[int] = mapped_column(default=-1)
    wave_started_at: Mapped[float | None]
    healthy_since: Mapped[float | None]
    paused_from: Mapped[str | None] = mapped_column(sa.String(32))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    gate_results: Mapped[list[Any]] = mapped_column(default=list)
    following: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float]
    created_by: Mapped[str] = mapped_column(sa.String(128))
    updated_at: Mapped[float]
    finished_at: Mapped[float | None]
    revision: Mapped[int] = mapped_column(default=0)


class RolloutDevice(Base):
    """One device's part in one rollout."""

    __tablename__ = "rollout_devices"
    __table_args__ = (
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices"),
        sa.Index("ix_rollout_devices_rollout_state", "rollout_id", "state"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(sa.ForeignKey("rollouts.id"))
    device_id: Mapped[int] = mapped_column(sa.Integer, sa.ForeignKey("devices.id"), index=True)
    wave: Mapped[int]
    late: Mapped[bool] = mapped_column(default=False)
    state: Mapped[str] = mapped_column(sa.String(32))
    attempt: Mapped[int] = mapped_column(default=0)
    assigned_at: Mapped[float]
    sent_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    reason: Mapped[str | None] = mapped_column(sa.String(200))
    acknowledged: Mapped[bool] = mapped_column(default=False)
    # what the device's desired state was before this rollout touched it (for a rollback)
    prev_desired_payload: Mapped[str | None] = mapped_column(sa.Text)
    prev_desired_msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    prev_desired_rollout: Mapped[str | None] = mapped_column(sa.String(_ID))
    prev_model_name: Mapped[str | None] = mapped_column(sa.String(_NAME))
    prev_model_version: Mapped[int | None]
    # inference counters when the device was first seen running the bundle (gate baseline)
    base_count: Mapped[int | None]
    base_errors: Mapped[int | None]
    base_rejected: Mapped[int | None]
    inferences: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    rollback_cmd_sent: Mapped[bool] = mapped_column(default=False)


class Command(Base):
    """A ``cmd`` message waiting for (or past) its publication: never retained, so unlike
    ``desired`` it needs a queue, not a column."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(sa.Integer, sa.ForeignKey("devices.id"), index=True)
    topic: Mapped[str] = mapped_column(sa.String(400))
    payload: Mapped[str] = mapped_column(sa.Text)
    msg_id: Mapped[str] = mapped_column(sa.String(_ID))
    rollout_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    created_at: Mapped[float]
    published_at: Mapped[float | None] = mapped_column(index=True)


class AuditEntry(Base):
    """Every rollout action, by whom (a token's name, or ``engine``) and when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    ts: Mapped[float]
    actor: Mapped[str] = mapped_column(sa.String(200))
    action: Mapped[str] = mapped_column(sa.String(64))
    rollout_id: Mapped[str | None] = mapped_column(sa.String(_ID), index=True)
    device: Mapped[str | None] = mapped_column(sa.String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DeviceEvent(Base):
    __tablename__ = "device_events"
    __table_args__ = (
        sa.Index("ix_device_events_device", "device_id", "id"),
        # A redelivered event (another replica, a resend after a reconnect) is inserted once.
        sa.Index("uq_device_events_msg", "device_id", "msg_id", unique=True),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(sa.Integer, sa.ForeignKey("devices.id"))
    received_at: Mapped[float] = mapped_column(index=True)
    ts: Mapped[float]
    event: Mapped[str] = mapped_column(sa.String(_NAME))
    severity: Mapped[str] = mapped_column(sa.String(16))
    message: Mapped[str] = mapped_column(sa.Text)
    reason: Mapped[str | None] = mapped_column(sa.String(_NAME))
    rollout_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    ref: Mapped[str | None] = mapped_column(sa.String(_ID))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))


class TelemetrySample(Base):
    """Thinned telemetry history (at most one sample per device per history interval)."""

    __tablename__ = "telemetry_samples"
    __table_args__ = (
        sa.Index("ix_telemetry_device_time", "device_id", "received_at"),
        sa.Index("uq_telemetry_samples_msg", "device_id", "msg_id", unique=True),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(sa.Integer, sa.ForeignKey("devices.id"))
    received_at: Mapped[float] = mapped_column(index=True)
    model: Mapped[str | None] = mapped_column(sa.String(_NAME + 24))
    inferences: Mapped[int | None]
    errors: Mapped[int | None]
    p95_ms: Mapped[float | None]
    drift_psi: Mapped[float | None]
    cpu_percent: Mapped[float | None]
    temperature_c: Mapped[float | None]
    msg_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    """The telemetry message's id: a redelivered copy is not sampled twice."""


class Lease(Base):
    """A named lease: who holds it, until when (on the database's clock), and its fencing
    token, which grows by one each time the lease changes hands (``edgekit.fleet.lease``).

    ``engine`` is the rollout engine's lease (one leader among the controller replicas);
    ``replica/ID`` rows are the replicas' own heartbeats, whose ``data`` says how to take
    over a dead replica's MQTT session.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    owner: Mapped[str | None] = mapped_column(sa.String(200))
    token: Mapped[int] = mapped_column(default=0)
    expires_at: Mapped[float] = mapped_column(default=0.0)
    acquired_at: Mapped[float | None]
    renewed_at: Mapped[float | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


def _sqlite_pragmas(engine: Engine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling is switched off; "begin" below issues BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine plus two session factories: :meth:`write` for transactions that change
    something (``BEGIN IMMEDIATE`` on SQLite) and :meth:`read` for the rest."""

    def __init__(self, url: str, *, echo: bool = False, busy_timeout_ms: int = 30_000) -> None:
        self.url = sa.make_url(url)
        self.dialect = self.url.get_backend_name()
        options: dict[str, Any] = {"echo": echo, "future": True}
        if self.dialect == "sqlite":
            options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            options.update(pool_pre_ping=True, pool_size=8, max_overflow=8)
        if self.url.drivername == "postgresql":
            # psycopg 3, the maintained driver; "postgresql://" would otherwise mean psycopg2.
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.engine = sa.create_engine(self.url, **options)
        if self.dialect == "sqlite":
            _sqlite_pragmas(self.engine, busy_timeout_ms=busy_timeout_ms)
            writer: Engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        else:
            writer = self.engine
        self._writer = writer
        self._reads = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._writes = sessionmaker(bind=writer, expire_on_commit=False)

    def create_all(self) -> None:
        """Create missing tables, and add the columns and indexes that later versions of the
        schema added to existing tables (all nullable: additive changes only, so a database
        written by an older controller keeps working; there are no other migrations yet)."""
        with self._writer.begin() as connection:
            if self.dialect == "postgresql":
                # Replicas starting together: one creates, the others wait and find it done.
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            Base.metadata.create_all(connection)
            inspector = sa.inspect(connection)
            for table in Base.metadata.sorted_tables:
                present = {column["name"] for column in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present:
                        continue
                    if not column.nullable:
                        raise RuntimeError(f"cannot add NOT NULL column {table.name}.{column.name}")
                    kind = column.type.compile(dialect=self.engine.dialect)
                    connection.exec_driver_sql(
                        f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'
                    )
            for table in Base.metadata.sorted_tables:
                for index in table.indexes:
                    index.create(connection, checkfirst=True)

    def clock(self) -> sa.ColumnElement[float]:
        """The database server's time in Unix seconds, as a SQL expression: leases compare
        it with itself, so replicas on different hosts need no synchronized clocks."""
        if self.dialect == "sqlite":
            return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
        return sa.literal_column(
            "CAST(extract(epoch from clock_timestamp()) AS double precision)", sa.Float
        )

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._writes.begin() as session:
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._reads() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"
