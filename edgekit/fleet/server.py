"""``edgekit fleet serve``: the parts of the controller wired together in one process.

Threads, each with one job:

* paho's network thread (``ControllerLink``) receives device messages and queues them;
* the ingest writer (``Ingest``) writes them to the registry in batches and acknowledges them
  to the broker once committed;
* the engine thread contends for the **engine lease** (``edgekit.fleet.lease``) and, while it
  holds it, leads: it takes over the broker sessions of dead replicas, reads the retained
  ``status`` and ``reported`` of every device, reconciles the retained ``desired`` messages
  with the database, and only then ticks the rollout state machines and publishes what they
  decide. That order is what makes a restart or a failover safe: no tick ever judges a device
  on state older than what the broker holds, so a new leader neither times out a device that
  finished while nobody led nor sends it the same rollout again;
* lease keepers renew the engine lease (while held) and the replica's own membership lease;
* uvicorn serves the REST API, the artifact downloads and the dashboard (on every replica:
  all state is in the database).

One controller is one replica. Several replicas on one database (PostgreSQL; SQLite only on
one host) and one broker share the ingest through an MQTT 5 shared subscription
(``share_group``); each needs its own ``replica_id``, which names its MQTT session and its
membership lease ``replica/ID``. A replica that holds no membership lease does not consume, so
once its lease has expired the leader may connect as it and drain what the broker kept for it
(``edgekit.fleet.mqtt.drain_session``): a replica killed mid-stream loses no message.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from edgekit.fleet.api import ApiContext, create_app
from edgekit.fleet.artifacts import ArtifactStore
from edgekit.fleet.auth import TokenRing
from edgekit.fleet.db import Database
from edgekit.fleet.errors import SpecError
from edgekit.fleet.ingest import Ingest
from edgekit.fleet.lease import Lease, LeaseKeeper, LeaseLost, list_leases
from edgekit.fleet.mqtt import (
    DEFAULT_RECEIVE_MAXIMUM,
    BrokerAddress,
    ControllerLink,
    DrainReport,
    drain_session,
    read_retained,
    validate_share_group,
)
from edgekit.fleet.publisher import Publisher, ReconcileReport
from edgekit.fleet.registry import Registry
from edgekit.fleet.rollouts import RolloutEngine
from edgekit.protocol import MessageKind, Topics

__all__ = ["ENGINE_LEASE", "REPLICA_LEASE_PREFIX", "Controller", "ServeConfig", "serve"]

log = logging.getLogger(__name__)

#: The lease whose holder runs the rollout engine and publishes desired states.
ENGINE_LEASE = "engine"
#: ``replica/ID``: a replica's membership, renewed while it consumes its MQTT session.
REPLICA_LEASE_PREFIX = "replica/"
DEFAULT_CLIENT_ID = "edgekit-controller"
#: Desired states handed to paho per round: few enough that a broker's receive window (20 on
#: mosquitto) drains them in a few round trips, so that a leader whose term ends does not
#: leave a long queue in its MQTT client.
PUBLISH_BATCH = 200
_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_replica_id(value: str) -> str:
    if not _REPLICA_ID.fullmatch(value):
        raise SpecError(f"replica id {value!r} must be 1 to 64 of [A-Za-z0-9._-]")
    return value


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    broker: str
    db_url: str
    artifacts: Path
    tokens: TokenRing
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    """Base URL devices download bundles from (default: http://HOST:PORT)."""
    fleet: str | None = None
    """Ingest only this fleet (default: every fleet under ``edgekit/v1``)."""
    client_id: str | None = None
    """MQTT client id (default ``edgekit-controller``, or ``edgekit-controller-REPLICA``)."""
    replica_id: str | None = None
    """This replica's name among several controllers on one database (required with a
    ``share_group``, unless ``client_id`` is given, which then doubles as the name)."""
    share_group: str | None = None
    """Ingest through MQTT 5 shared subscriptions ``$share/GROUP/...`` (several replicas)."""
    session_expiry_s: int = 3600
    ca_file: str | None = None
    cert_file: str | None = None
    """This controller's client certificate (``edgekit fleet ca controller-cert``), for a
    broker that requires one; with ``key_file``."""
    key_file: str | None = None
    tick_s: float = 1.0
    lease_ttl_s: float = 10.0
    """Engine and membership leases: a dead leader is replaced after at most this long."""
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    stale_after_s: float = 120.0
    history_interval_s: float = 60.0
    dashboard_refresh_s: int = 5
    log_level: str = "info"

    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def resolved_client_id(self) -> str:
        if self.client_id:
            return self.client_id
        if self.replica_id:
            return f"{DEFAULT_CLIENT_ID}-{self.replica_id}"
        return DEFAULT_CLIENT_ID

    def resolved_replica_id(self) -> str:
        """The replica's name: ``replica_id``, else the client id (one replica)."""
        if self.replica_id:
            return validate_replica_id(self.replica_id)
        if self.share_group and not self.client_id:
            raise SpecError(
                "a shared group needs --replica-id: each replica needs its own MQTT session"
            )
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.resolved_client_id())[:64]


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Controller:
    """Everything but the HTTP server; usable in-process (tests) or by :func:`serve`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.address = BrokerAddress.parse(config.broker).with_client_cert(
            config.cert_file, config.key_file
        )
        self.share_group = (
            None if config.share_group is None else validate_share_group(config.share_group)
        )
        self.replica_id = config.resolved_replica_id()
        self.client_id = config.resolved_client_id()
        if not 1 <= config.receive_maximum <= 65535:
            raise SpecError("receive maximum must be 1 to 65535 (MQTT 5)")
        self.owner = (
            f"{self.replica_id}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        self.db = Database(config.db_url)
        self.db.create_all()
        self.artifacts = ArtifactStore(
            config.artifacts, self.db, public_url=config.resolved_public_url()
        )
        self.artifacts.import_dir()
        self.registry = Registry(self.db, stale_after_s=config.stale_after_s)
        self.engine_lease = Lease(self.db, ENGINE_LEASE, owner=self.owner, ttl_s=config.lease_ttl_s)
        self.engine = RolloutEngine(
            self.db,
            url_for=self.artifacts.url_for,
            tick_s=config.tick_s,
            fence=self.engine_lease.fence,
        )
        self.ingest = Ingest(self.db, history_interval_s=config.history_interval_s)
        self.link = ControllerLink(
            self.address,
            client_id=self.client_id,
            fleet=config.fleet,
            share_group=self.share_group,
            session_expiry_s=config.session_expiry_s,
            on_message=self.ingest.submit,
            ca_file=config.ca_file,
            receive_maximum=config.receive_maximum,
            may_publish=self.engine_lease.valid,
        )
        self.publisher = Publisher(self.db, self.link, batch=PUBLISH_BATCH)
        self.member_lease: Lease | None = None
        if self.share_group is not None:
            self.member_lease = Lease(
                self.db,
                f"{REPLICA_LEASE_PREFIX}{self.replica_id}",
                owner=self.owner,
                ttl_s=config.lease_ttl_s,
            )
        self.reconciled: ReconcileReport | None = None
        self.retained: dict[str, Any] | None = None
        self.adopted: list[dict[str, Any]] = []
        self.terms = 0
        self.ready = threading.Event()
        """Set once the first subscription is up and what it brought is stored."""
        self.leading = threading.Event()
        """Set while this replica leads (holds the engine lease and ticks)."""
        self._stop = threading.Event()
        self._link_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._keepers = [LeaseKeeper(self.engine_lease)]
        if self.member_lease is not None:
            self._keepers.append(LeaseKeeper(self.member_lease, on_lost=self._membership_lost))

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.ingest.start()
        for keeper in self._keepers:
            keeper.start()
        if self.member_lease is None:
            self._start_link()
        else:
            self._spawn(self._run_membership, "edgekit-membership")
        self._spawn(self._run_engine, "edgekit-engine")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop leading (releasing the engine lease), store what was received, disconnect
        (the broker keeps the session), and give up the membership lease so the leader can
        drain the session if this replica does not come back."""
        self._stop.set()
        self.engine.wake()
        for thread in self._threads:
            thread.join(15)
        self.ingest.flush(timeout=10)
        self._stop_link()
        self.ingest.stop()
        for keeper in self._keepers:
            keeper.stop()
        if self.member_lease is not None:
            try:
                self.member_lease.release()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("releasing the membership lease failed: %s", exc)
        self.db.dispose()

    def _start_link(self) -> None:
        with self._link_lock:
            if not self._stop.is_set():
                self.link.start()

    def _stop_link(self) -> None:
        with self._link_lock:
            self.link.stop()

    # --- membership (shared ingest) -------------------------------------------------------------

    def _replica_data(self) -> dict[str, Any]:
        """What another replica needs to take this one's MQTT session over."""
        return {
            "client_id": self.client_id,
            "subscriptions": self.link.subscriptions(),
            "session_expiry_s": self.config.session_expiry_s,
            "receive_maximum": self.config.receive_maximum,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "api": self.config.resolved_public_url(),
            "started_at": self.started_at,
        }

    def _run_membership(self) -> None:
        """Consume the shared subscription only while holding ``replica/ID``: a replica whose
        lease lapsed (cut off from the database) must not fight the leader for its session."""
        lease = self.member_lease
        assert lease is not None
        waiting_logged = False
        while not self._stop.is_set():
            try:
                acquired = lease.acquire(data=self._replica_data())
            except sa.exc.SQLAlchemyError as exc:
                log.warning("membership lease: %s", exc)
                acquired = False
            if not acquired:
                if not waiting_logged:
                    waiting_logged = True
                    log.info("waiting for %s to be free (a previous run of this replica?)", lease)
                self._stop.wait(min(1.0, lease.ttl_s / 4))
                continue
            waiting_logged = False
            for keeper in self._keepers:
                keeper.wake()
            self._start_link()
            while not self._stop.is_set() and lease.token is not None:
                self._stop.wait(0.2)

    def _membership_lost(self) -> None:
        log.warning("membership lease lost: disconnecting until it is held again")
        self._stop_link()

    # --- leading ---------------------------------------------------------------------------------

    def _run_engine(self) -> None:
        while not self._stop.is_set():
            if self.link.subscribed.wait(0.5):
                break
        if self._stop.is_set():
            return
        self.ingest.flush(timeout=30.0)  # what the subscription brought (retained state)
        self.ready.set()
        log.info("controller ready (replica %s, client id %s)", self.replica_id, self.client_id)
        while not self._stop.is_set():
            try:
                acquired = self.engine_lease.acquire(data={"replica": self.replica_id})
            except sa.exc.SQLAlchemyError as exc:
                log.warning("engine lease: %s", exc)
                acquired = False
            if not acquired:
                self._stop.wait(min(1.0, self.engine_lease.ttl_s / 4))
                continue
            for keeper in self._keepers:
                keeper.wake()
            try:
                self._lead()
            except LeaseLost as exc:
                log.warning("stopped leading: %s", exc)
            except Exception:
                log.exception("leading failed; standing down")
                self.engine_lease.drop()
            finally:
                self.leading.clear()
        if self.engine_lease.token is not None:
            try:
                self.engine_lease.release()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("releasing the engine lease failed: %s", exc)

    def _lead(self) -> None:
        """One term as leader: catch up with what the broker holds, then tick until the
        lease is lost or the process stops."""
        lease = self.engine_lease
        self.terms += 1
        log.info("leading (engine lease token %s)", lease.token)
        if self.share_group is not None:
            self._adopt_dead_replicas()
            self._read_retained_state()
        else:
            self.ingest.flush(timeout=30.0)
        while not self._stop.is_set() and lease.valid():
            try:
                self.reconciled = self.publisher.reconcile(
                    self.address, fleet=self.config.fleet, ca_file=self.config.ca_file
                )
                break
            except Exception as exc:
                log.warning("reconciling with the broker failed (%s); retrying", exc)
                self._stop.wait(2.0)
        if not lease.valid():
            raise LeaseLost("the engine lease lapsed while catching up")
        self.leading.set()
        last_adoption = time.monotonic()
        while not self._stop.is_set():
            if not lease.valid():
                raise LeaseLost("the engine lease lapsed")
            self.engine.tick()
            if lease.valid(for_s=lease.margin_s):
                try:
                    self.publisher.flush()
                except Exception:
                    log.exception("publishing after a tick failed")
            if self.share_group is not None and time.monotonic() - last_adoption > lease.ttl_s:
                last_adoption = time.monotonic()
                self._adopt_dead_replicas()
            self.engine.idle()

    def _read_retained_state(self) -> None:
        """Shared subscriptions get no retained messages: read every device's retained
        ``status`` and ``reported`` on a separate connection (the database keeps each only if
        newer than what it holds, so this is harmless when nothing changed)."""
        filters = [
            Topics.subscription(self.config.fleet, None, kind)
            for kind in (MessageKind.STATUS, MessageKind.REPORTED)
        ]
        started = time.monotonic()
        count, complete = read_retained(
            self.address,
            filters,
            self.ingest.submit,
            client_id=f"{self.client_id}-retained-{secrets.token_hex(3)}",
            ca_file=self.config.ca_file,
        )
        stored = self.ingest.flush(timeout=60.0)
        self.retained = {
            "messages": count,
            "complete": complete and stored,
            "seconds": round(time.monotonic() - started, 3),
        }
        log.info("read the retained device state: %s", self.retained)

    def _adopt_dead_replicas(self) -> None:
        """Drain and end the broker session of every replica whose membership lease expired
        (the broker keeps routing its share of the shared subscription there)."""
        own = None if self.member_lease is None else self.member_lease.name
        try:
            members = list_leases(self.db, prefix=REPLICA_LEASE_PREFIX)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("listing replicas failed: %s", exc)
            return
        for member in members:
            if member.name == own or not member.expired or not self.engine_lease.valid():
                continue
            client_id = member.data.get("client_id")
            filters = member.data.get("subscriptions")
            if not isinstance(client_id, str) or not isinstance(filters, list):
                continue
            lease = Lease(
                self.db, member.name, owner=f"{self.owner}/adopting", ttl_s=self.engine_lease.ttl_s
            )
            try:
                if not lease.take_over(expected_token=member.token):
                    continue
            except sa.exc.SQLAlchemyError as exc:
                log.warning("taking over %s failed: %s", member.name, exc)
                continue
            keeper = LeaseKeeper(lease)
            keeper.start()
            report: DrainReport | None = None
            try:
                log.info("replica %s is gone: draining session %s", member.name, client_id)
                report = drain_session(
                    self.address,
                    client_id=client_id,
                    filters=[str(f) for f in filters],
                    sink=self.ingest.submit,
                    settle=lambda timeout: self.ingest.flush(timeout=timeout),
                    session_expiry_s=int(
                        member.data.get("session_expiry_s", self.config.session_expiry_s)
                    ),
                    receive_maximum=self.config.receive_maximum,
                    ca_file=self.config.ca_file,
                )
            except Exception as exc:
                log.warning("draining the session of %s failed: %s", member.name, exc)
            finally:
                keeper.stop()
            try:
                if report is not None and report.ended:
                    lease.delete()
                else:
                    lease.release()  # left expired: tried again later
            except sa.exc.SQLAlchemyError as exc:
                log.warning("settling %s failed: %s", member.name, exc)
            if report is not None:
                record = {"replica": member.name, "at": time.time(), **report.to_dict()}
                self.adopted.append(record)
                log.info("took over the session of %s: %s", member.name, record)

    # --- reading ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        try:
            members = [m.to_dict() for m in list_leases(self.db)]
        except sa.exc.SQLAlchemyError:
            members = []
        return {
            "uptime_s": time.time() - self.started_at,
            "ready": self.ready.is_set(),
            "rss_bytes": _rss_bytes(),
            "pid": os.getpid(),
            "mqtt": {
                "broker": str(self.address),
                "client_id": self.client_id,
                "connected": self.link.connected.is_set(),
                "connects": self.link.connects,
                "subscriptions": self.link.subscriptions(),
            },
            "replica": {
                "id": self.replica_id,
                "owner": self.owner,
                "shared_group": self.share_group,
                "leader": self.leading.is_set(),
                "engine_token": self.engine_lease.token,
                "terms": self.terms,
                "adopted": self.adopted[-20:],
                "retained": self.retained,
                "leases": members,
            },
            "ingest": self.ingest.stats.to_dict(),
            "engine": {"ticks": self.engine.ticks, "errors": self.engine.errors},
            "publisher": {
                "desired": self.publisher.published_desired,
                "commands": self.publisher.published_commands,
            },
            "reconcile": None if self.reconciled is None else self.reconciled.to_dict(),
        }

    def api_context(self) -> ApiContext:
        return ApiContext(
            registry=self.registry,
            engine=self.engine,
            artifacts=self.artifacts,
            tokens=self.config.tokens,
            stats=self.stats,
            default_fleet=self.config.fleet,
            dashboard_refresh_s=self.config.dashboard_refresh_s,
        )


def serve(config: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM (uvicorn handles the signals), then stop the threads."""
    import uvicorn

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    controller = Controller(config)
    controller.start()
    try:
        app = create_app(controller.api_context())
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level=config.log_level.lower(),
                access_log=False,
                lifespan="off",
            )
        )
        server.run()
    finally:
        controller.stop()
