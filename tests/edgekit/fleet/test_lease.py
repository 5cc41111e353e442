"""The lease that makes one controller replica the rollout leader, on SQLite and PostgreSQL.

Each contender is a :class:`~edgekit.fleet.lease.Lease` with its own owner name on the same
database, as two replica processes would be; the clock that expires leases is the database's,
so the tests wait real (short) times-to-live rather than moving a fake clock.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import sqlalchemy as sa

from edgekit.fleet.db import Artifact, AuditEntry, Database, Device
from edgekit.fleet.db import Lease as LeaseRow
from edgekit.fleet.errors import SpecError
from edgekit.fleet.lease import Lease, LeaseKeeper, LeaseLost, list_leases
from edgekit.fleet.rollouts import RolloutEngine
from edgekit.fleet.spec import RolloutSpec

TTL = 1.2
MARGIN = 0.4


@pytest.fixture
def db(db_url: str):
    database = Database(db_url)
    database.create_all()
    yield database
    database.dispose()


def lease(db: Database, owner: str, *, name: str = "engine", ttl: float = TTL) -> Lease:
    return Lease(db, name, owner=owner, ttl_s=ttl, margin_s=MARGIN)


def paused(db: Database, owner: str) -> Lease:
    """A contender whose process is paused: its own clock stands still, so it goes on
    believing it holds the lease; only the database can tell it otherwise."""
    return Lease(db, "engine", owner=owner, ttl_s=TTL, margin_s=MARGIN, clock=lambda: 0.0)


def row(db: Database, name: str = "engine") -> LeaseRow:
    with db.read() as session:
        found = session.get(LeaseRow, name)
        assert found is not None
        return found


def expire_now(db: Database, name: str = "engine") -> None:
    """What the database's clock does after the time to live, without the wait."""
    with db.write() as session:
        session.execute(sa.update(LeaseRow).where(LeaseRow.name == name).values(expires_at=0.0))


def test_one_contender_holds_it_and_the_token_names_the_term(db):
    a, b = lease(db, "a"), lease(db, "b")
    assert a.acquire()
    assert not b.acquire()
    assert (a.token, b.token) == (1, None)
    assert a.valid() and not b.valid()
    assert a.renew() and a.token == 1  # renewing keeps the term
    assert row(db).owner == "a"


def test_exactly_one_of_many_concurrent_contenders_wins(db):
    contenders = [lease(db, f"c{i}") for i in range(8)]
    barrier = threading.Barrier(len(contenders))
    results: dict[str, bool] = {}

    def contend(item: Lease) -> None:
        barrier.wait()
        results[item.owner] = item.acquire()

    threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results.values()) == [False] * 7 + [True]
    winner = next(owner for owner, won in results.items() if won)
    assert row(db).owner == winner and row(db).token == 1


def test_an_expired_lease_changes_hands_and_the_old_holder_cannot_renew(db):
    a, b = lease(db, "a"), lease(db, "b")
    assert a.acquire()
    time.sleep(TTL + 0.2)  # a is frozen: no renewal
    assert not a.valid()
    assert b.acquire()
    assert b.token == 2
    assert not a.renew()  # the former holder learns it lost the lease
    assert a.token is None
    assert row(db).owner == "b"


def test_the_holder_stops_before_the_database_lets_anyone_else_start(db):
    a, b = lease(db, "a", ttl=3.0), lease(db, "b", ttl=3.0)
    assert a.acquire()
    deadline = time.monotonic() + 10
    while a.valid():  # no renewals: how long does a believe it holds the lease?
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not b.acquire(), "the lease was free while its holder still acted under it"
    time.sleep(MARGIN + 0.2)
    assert b.acquire()


def test_a_deposed_holder_cannot_commit_a_fenced_write(db):
    a, b = paused(db, "a"), lease(db, "b")
    assert a.acquire()
    with db.write() as session:  # the current holder writes
        session.add(AuditEntry(ts=1.0, actor="a", action="first", detail={}))
        a.fence(session)
    expire_now(db)
    assert b.acquire()
    with pytest.raises(LeaseLost), db.write() as session:
        session.add(AuditEntry(ts=2.0, actor="a", action="second", detail={}))
        assert a.valid()  # a still believes it holds term 1
        a.fence(session)
    with db.read() as session:
        actions = list(session.scalars(sa.select(AuditEntry.action)))
    assert actions == ["first"]  # the deposed holder's write was rolled back with the fence


def test_release_frees_the_lease_at_once(db):
    a, b = lease(db, "a"), lease(db, "b")
    assert a.acquire()
    a.release()
    assert not a.valid()
    assert b.acquire() and b.token == 2


def test_take_over_loses_to_whoever_came_back_first(db):
    member = lease(db, "replica-1", name="replica/r1")
    assert member.acquire(data={"client_id": "edgekit-controller-r1"})
    expire_now(db, "replica/r1")
    seen = [m for m in list_leases(db, prefix="replica/") if m.expired]
    assert [(m.name, m.token, m.data["client_id"]) for m in seen] == [
        ("replica/r1", 1, "edgekit-controller-r1")
    ]
    back = lease(db, "replica-1-again", name="replica/r1")
    assert back.acquire()  # the replica restarted before the leader acted
    adopter = lease(db, "leader/adopting", name="replica/r1")
    assert not adopter.take_over(expected_token=seen[0].token)
    back.release()
    fresh = list_leases(db, prefix="replica/")[0]
    assert adopter.take_over(expected_token=fresh.token)
    adopter.delete()
    assert list_leases(db, prefix="replica/") == []


def test_the_keeper_renews_past_the_time_to_live_and_reports_the_loss(db):
    a, b = lease(db, "a"), lease(db, "b")
    lost = threading.Event()
    keeper = LeaseKeeper(a, on_lost=lost.set)
    assert a.acquire()
    keeper.start()
    try:
        time.sleep(3 * TTL)
        assert a.valid() and keeper.renewals >= 3
        assert not b.acquire()
        expire_now(db)  # as if the database had been unreachable for a whole term
        assert b.acquire()
        assert lost.wait(5 * TTL)
        assert a.token is None
    finally:
        keeper.stop()


def test_a_deposed_leaders_engine_tick_changes_nothing(db):
    a, b = paused(db, "a"), lease(db, "b")
    engine = RolloutEngine(db, url_for=lambda s, n, v: f"http://ctl/{s}", fence=a.fence)
    now = time.time()
    sha = hashlib.sha256(b"bundle").hexdigest()
    with db.write() as session:
        session.add(Artifact(sha256=sha, name="tiny", version=2, size=10, created_at=now))
        session.add(
            Device(fleet="f", device="d1", first_seen=now, last_seen=now, declared_groups=["g"])
        )
    rollout = engine.create(
        RolloutSpec.from_dict({"fleet": "f", "artifact": sha, "target": "group=g"}), actor="t"
    )
    assert a.acquire()
    expire_now(db)
    assert b.acquire()
    assert a.valid()  # a has not noticed yet
    with pytest.raises(LeaseLost):
        engine.tick()
    assert engine.get(rollout["id"])["state"] == "pending"  # the tick's transaction rolled back
    with db.read() as session:
        assert session.scalar(sa.select(Device.desired_payload)) is None
    fenced_b = RolloutEngine(db, url_for=lambda s, n, v: f"http://ctl/{s}", fence=b.fence)
    fenced_b.tick()  # the current holder's tick goes through
    assert engine.get(rollout["id"])["state"] == "running"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl_s": 0.1}, "time to live"),
        ({"ttl_s": 2.0, "margin_s": 1.5}, "margin"),
        ({"ttl_s": 2.0, "owner": ""}, "owner"),
    ],
)
def test_bad_lease_settings_are_refused_in_one_line(db, options, message):
    settings = {"owner": "a", **options}
    with pytest.raises(SpecError, match=message):
        Lease(db, "engine", **settings)
