"""Leases in the controller's database: one rollout engine among several controller replicas.

Controller replicas share one database (PostgreSQL, or SQLite for replicas on one host). Any of
them ingests and answers the REST API, but rollout decisions (starting waves, publishing
desired states, aborting, rolling back) must be made by exactly one at a time, or two replicas
would send a device two different desired states. A :class:`Lease` is a row in the ``leases``
table, ``(name, owner, token, expires_at)``:

* **acquire** is one conditional ``UPDATE ... WHERE expires_at < now`` that also adds one to
  ``token``; it succeeds for exactly one contender, on SQLite and PostgreSQL alike;
* **renew** is ``UPDATE ... WHERE owner = me AND token = mine``: a lease that changed hands
  is never extended by its former holder;
* ``expires_at`` is written and compared on the **database's clock**, so replicas need no
  synchronized clocks; the holder measures its own term on its monotonic clock, starting
  *before* it sent the renewal, and stops ``margin_s`` before the database can consider the
  lease free: a holder cut off from the database stops acting before anyone else may start;
* the **fencing token** guards every write that matters: :meth:`Lease.fence`, inside the
  writer's transaction, is ``UPDATE ... WHERE owner = me AND token = mine AND expires_at >
  now``. On PostgreSQL it locks the lease row until the transaction commits, so a contender's
  acquiring ``UPDATE`` waits for that commit; on SQLite writers are serialized anyway. A write
  by a deposed holder therefore fails, and a write by the current one is committed before the
  next holder can begin.

A :class:`LeaseKeeper` renews a held lease on its own thread, every third of its time to live,
and reports the moment it lapses.

The broker cannot check fencing tokens: what a deposed holder handed to its MQTT client before
its term ended may still reach the broker. The margin is what bounds that (a holder stops
publishing ``margin_s`` before the lease can be taken); a process frozen for longer than the
margin with messages in its socket buffer is the remaining risk, as with any lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgekit.fleet.db import Database
from edgekit.fleet.db import Lease as LeaseRow
from edgekit.fleet.errors import FleetError, SpecError

__all__ = ["Lease", "LeaseInfo", "LeaseKeeper", "LeaseLost", "list_leases"]

log = logging.getLogger(__name__)

_LEASES = cast(sa.Table, LeaseRow.__table__)
#: Names are SQL strings and log text, not MQTT topics; this keeps them readable.
_MAX_NAME = 200


class LeaseLost(FleetError):
    """This process no longer holds the lease it acted under (it expired, or another replica
    took it over): the action was not carried out."""

    reason = "lease-lost"
    http_status = 503


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as read from the database (``expires_in`` on the database's clock)."""

    name: str
    owner: str | None
    token: int
    expires_in: float
    data: Mapping[str, Any]

    @property
    def expired(self) -> bool:
        return self.expires_in <= 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "token": self.token,
            "expires_in": round(self.expires_in, 3),
            "data": dict(self.data),
        }


def list_leases(db: Database, *, prefix: str = "") -> list[LeaseInfo]:
    """Every lease whose name starts with ``prefix``, by name."""
    t = _LEASES.c
    with db.read() as session:
        rows = session.execute(
            sa.select(t.name, t.owner, t.token, t.expires_at - db.clock(), t.data)
            .where(t.name.startswith(prefix, autoescape=True))
            .order_by(t.name)
        ).all()
    return [
        LeaseInfo(name, owner, int(token), float(expires_in), dict(data or {}))
        for name, owner, token, expires_in, data in rows
    ]


class Lease:
    """One named lease as seen by one would-be holder (``owner``, unique per process).

    Not thread-safe on its own: :meth:`acquire`, :meth:`renew` and :meth:`release` are called
    from one thread at a time (the engine's, or the :class:`LeaseKeeper`'s, which the holder
    starts once it has acquired); :meth:`valid` and :meth:`fence` may be called from any thread.
    """

    def __init__(
        self,
        db: Database,
        name: str,
        *,
        owner: str,
        ttl_s: float,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not name or len(name) > _MAX_NAME:
            raise SpecError(f"lease name must be 1 to {_MAX_NAME} characters")
        if not owner or len(owner) > _MAX_NAME:
            raise SpecError(f"lease owner must be 1 to {_MAX_NAME} characters")
        if not 0.5 <= ttl_s <= 3600:
            raise SpecError(f"lease time to live must be 0.5 s to 1 h, not {ttl_s:g} s")
        margin = max(0.2, ttl_s / 5) if margin_s is None else margin_s
        if not 0.0 <= margin < ttl_s / 2:
            raise SpecError(f"lease margin must be under half the time to live ({ttl_s:g} s)")
        self.db = db
        self.name = name
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.margin_s = float(margin)
        self._clock = clock
        self._token: int | None = None
        self._valid_until = 0.0
        self._lock = threading.Lock()

    # --- the local view -----------------------------------------------------------------------

    @property
    def token(self) -> int | None:
        """The fencing token of the current term, or None when not held."""
        with self._lock:
            return self._token

    def valid(self, *, for_s: float = 0.0) -> bool:
        """Held, and still for at least ``for_s`` seconds by this process's own reckoning."""
        with self._lock:
            return self._token is not None and self._clock() + for_s < self._valid_until

    def remaining(self) -> float:
        """Seconds left in the current term (0 when not held)."""
        with self._lock:
            if self._token is None:
                return 0.0
            return max(0.0, self._valid_until - self._clock())

    def drop(self) -> None:
        """Forget the term locally (it lapsed): act no more until acquired again."""
        with self._lock:
            self._token = None
            self._valid_until = 0.0

    def _held(self, token: int, sent: float) -> None:
        with self._lock:
            self._token = token
            self._valid_until = sent + self.ttl_s - self.margin_s

    # --- the database -------------------------------------------------------------------------

    def _ensure_row(self, session: Session) -> None:
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        session.execute(
            dialect.insert(_LEASES)
            .values(name=self.name, owner=None, token=0, expires_at=0.0, data={})
            .on_conflict_do_nothing()
        )

    def acquire(self, *, data: Mapping[str, Any] | None = None) -> bool:
        """Take the lease if it is free (expired or released); a new term, a new token.

        ``data`` is stored with the lease (what other replicas need to know about the holder).
        Returns whether this process holds it now; a lease it already holds is renewed.
        """
        if self.token is not None:
            return self.renew()
        t = _LEASES.c
        now = self.db.clock()
        sent = self._clock()
        with self.db.write() as session:
            self._ensure_row(session)
            token = session.execute(
                sa.update(_LEASES)
                .where(t.name == self.name, t.expires_at < now)
                .values(
                    owner=self.owner,
                    token=t.token + 1,
                    expires_at=now + self.ttl_s,
                    acquired_at=now,
                    renewed_at=now,
                    data=dict(data or {}),
                )
                .returning(t.token)
            ).scalar()
        if token is None:
            return False
        self._held(int(token), sent)
        log.info("lease %s acquired by %s (token %d)", self.name, self.owner, token)
        return True

    def renew(self) -> bool:
        """Extend the current term; False (and the term is over) if the lease is not ours."""
        token = self.token
        if token is None:
            return False
        t = _LEASES.c
        now = self.db.clock()
        sent = self._clock()
        with self.db.write() as session:
            renewed = session.execute(
                sa.update(_LEASES)
                .where(t.name == self.name, t.owner == self.owner, t.token == token)
                .values(expires_at=now + self.ttl_s, renewed_at=now)
                .returning(t.token)
            ).scalar()
        if renewed is None:
            log.warning("lease %s (token %d) was taken over", self.name, token)
            self.drop()
            return False
        with self._lock:
            if self._token == token:  # not dropped meanwhile by the keeper's deadline
                self._valid_until = sent + self.ttl_s - self.margin_s
        return True

    def release(self) -> None:
        """Give the lease up now (a clean stop): the next contender need not wait for it to
        expire. Call only after this process stopped acting under it."""
        token = self.token
        self.drop()
        if token is None:
            return
        t = _LEASES.c
        with self.db.write() as session:
            session.execute(
                sa.update(_LEASES)
                .where(t.name == self.name, t.owner == self.owner, t.token == token)
                .values(expires_at=0.0)
            )
        log.info("lease %s released by %s", self.name, self.owner)

    def fence(self, session: Session) -> None:
        """Raise :class:`LeaseLost` unless this process holds the lease, checked in the
        database inside ``session``'s transaction (see the module's docstring)."""
        token = self.token
        if token is None or not self.valid():
            raise LeaseLost(f"lease {self.name} is not held by {self.owner}")
        t = _LEASES.c
        result = session.execute(
            sa.update(_LEASES)
            .where(
                t.name == self.name,
                t.owner == self.owner,
                t.token == token,
                t.expires_at > self.db.clock(),
            )
            .values(token=t.token)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            self.drop()
            raise LeaseLost(f"lease {self.name} (token {token}) expired or changed hands")

    def take_over(self, *, expected_token: int, data: Mapping[str, Any] | None = None) -> bool:
        """Acquire an expired lease only if nobody acquired it since it carried
        ``expected_token`` (taking a dead replica's place, without racing its return)."""
        if self.token is not None:
            return False
        t = _LEASES.c
        now = self.db.clock()
        sent = self._clock()
        with self.db.write() as session:
            token = session.execute(
                sa.update(_LEASES)
                .where(t.name == self.name, t.token == expected_token, t.expires_at < now)
                .values(
                    owner=self.owner,
                    token=t.token + 1,
                    expires_at=now + self.ttl_s,
                    acquired_at=now,
                    renewed_at=now,
                    **({} if data is None else {"data": dict(data)}),
                )
                .returning(t.token)
            ).scalar()
        if token is None:
            return False
        self._held(int(token), sent)
        return True

    def delete(self) -> None:
        """Remove the row while holding it (a dead replica's place, once taken over)."""
        token = self.token
        self.drop()
        if token is None:
            return
        t = _LEASES.c
        with self.db.write() as session:
            session.execute(
                sa.delete(_LEASES).where(
                    t.name == self.name, t.owner == self.owner, t.token == token
                )
            )

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, owner={self.owner!r}, token={self.token})"


class LeaseKeeper:
    """Renews a held :class:`Lease` every third of its time to live, on its own thread, and
    calls ``on_lost`` once when the term ends (taken over, or lapsed because renewals did
    not get through in time). Acquiring again is the owner's business."""

    def __init__(
        self,
        lease: Lease,
        *,
        on_lost: Callable[[], None] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.lease = lease
        self.on_lost = on_lost
        self.interval_s = lease.ttl_s / 3 if interval_s is None else interval_s
        self.renewals = 0
        self.failures = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"edgekit-lease-{self.lease.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def wake(self) -> None:
        """Check now (the lease was just acquired)."""
        self._wake.set()

    def _run(self) -> None:
        held = self.lease.token is not None
        next_renewal = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            if self.lease.token is None:
                if held:
                    held = False
                    self._lost()
                self._wake.wait(0.5)
                self._wake.clear()
                next_renewal = time.monotonic() + self.interval_s
                continue
            if not held:  # a new term began
                held = True
                next_renewal = time.monotonic() + self.interval_s
            if not self.lease.valid():
                log.warning("lease %s lapsed before it could be renewed", self.lease.name)
                self.lease.drop()
                continue
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + self.interval_s
                try:
                    if self.lease.renew():
                        self.renewals += 1
                except sa.exc.SQLAlchemyError as exc:
                    self.failures += 1
                    log.warning("renewing lease %s failed: %s", self.lease.name, exc)
                continue
            wait = min(next_renewal - time.monotonic(), self.lease.remaining())
            self._wake.wait(max(0.01, wait))
            self._wake.clear()

    def _lost(self) -> None:
        if self.on_lost is None:
            return
        try:
            self.on_lost()
        except Exception:
            log.exception("handling the loss of lease %s failed", self.lease.name)
