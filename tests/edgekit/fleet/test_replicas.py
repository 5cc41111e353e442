"""Controller replicas: a shared ingest (MQTT 5 shared subscriptions) and one rollout leader.

The process tests run two ``edgekit fleet serve`` processes on one PostgreSQL database and one
mosquitto broker, with simulated devices, and look from outside: the REST API of either
replica, ``mosquitto_sub`` on every ``desired`` topic, the simulator's own counters, and the
database's rows. What they hold the replicas to:

* every telemetry message is stored exactly once, whichever replica received it;
* a rollout completes with two replicas, decided by one of them;
* SIGKILL of the leader mid-rollout: the other takes the lease over and completes the rollout,
  each device having been sent the rollout once and having installed it once;
* SIGKILL of the other replica: the leader drains its broker session; nothing is lost.

The first tests drive two :class:`~edgekit.fleet.ingest.Ingest` instances (two replicas'
writers) on one database, SQLite and PostgreSQL, to pin the rules that make a redelivered,
replayed or overtaken message harmless.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgekit.fleet.db import Database, Device, DeviceEvent, TelemetrySample
from edgekit.fleet.ingest import SEQ_RESET_S, Ingest, Stamp, supersedes
from edgekit.protocol import (
    Event,
    InferenceStats,
    ModelRef,
    Reported,
    Status,
    StatusState,
    Telemetry,
    Topics,
)

FLEET = "plant-1"
SHA = "5e" * 32
#: Replica options: fast failover for tests, every telemetry message kept as a sample.
REPLICA = ("--shared-group", "edgekit", "--lease-ttl", "3s", "--history-interval", "0s")


# --- ingest rules, two writers on one database ----------------------------------------------


@pytest.fixture
def two_ingests(db_url: str):
    db = Database(db_url)
    db.create_all()
    first, second = Ingest(db, history_interval_s=0.0), Ingest(db, history_interval_s=0.0)
    first.start()
    second.start()
    yield first, second, db
    first.stop()
    second.stop()
    db.dispose()


def send(ingest: Ingest, *messages: Any) -> None:
    for message in messages:
        topic = Topics(FLEET, message.device).for_kind(message.KIND)
        ingest.submit(topic, message.to_json(), time.time())
    assert ingest.flush(timeout=10)


def device_row(db: Database, device: str) -> Device:
    with db.read() as session:
        row = session.scalar(sa.select(Device).where(Device.device == device))
        assert row is not None
        return row


def count(db: Database, table: Any) -> int:
    with db.read() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def telemetry(device: str, seq: int, inferences: int, **fields: Any) -> Telemetry:
    return Telemetry(device=device, seq=seq, inference=InferenceStats(count=inferences), **fields)


def test_a_message_redelivered_to_the_other_replica_is_stored_once(two_ingests):
    first, second, db = two_ingests
    message = telemetry("cam-1", 10, 100)
    event = Event(device="cam-1", seq=11, event="error", message="io")
    send(first, message, event)
    send(second, message, event)  # the same msg_ids, as after a replica died before its ack
    assert count(db, TelemetrySample) == 1
    assert count(db, DeviceEvent) == 1
    assert second.stats.stale["telemetry"] == 1
    assert device_row(db, "cam-1").inf_count == 100


def test_a_message_overtaken_on_the_other_replica_does_not_win(two_ingests):
    first, second, db = two_ingests
    newer, older = telemetry("cam-2", 21, 210), telemetry("cam-2", 20, 200)
    send(first, newer)
    send(second, older)  # committed later, sent earlier: history keeps it, state does not
    row = device_row(db, "cam-2")
    assert (row.inf_count, row.tel_seq) == (210, 21)
    assert count(db, TelemetrySample) == 2
    model = ModelRef(name="tiny", version=2, sha256=SHA)
    send(first, Reported(device="cam-2", seq=31, current=model, update_state="idle"))
    send(second, Reported(device="cam-2", seq=30, current=None, update_state="downloading"))
    row = device_row(db, "cam-2")
    assert (row.current_version, row.update_state) == (2, "idle")


def test_a_retained_copy_replayed_to_a_new_replica_changes_nothing(two_ingests):
    first, second, db = two_ingests
    reported = Reported(device="cam-3", seq=5, current=ModelRef(name="tiny", version=1, sha256=SHA))
    send(first, reported)
    before = device_row(db, "cam-3").reported_at
    send(second, reported)  # what the broker replays to every new subscriber
    assert device_row(db, "cam-3").reported_at == before
    assert second.stats.stale["reported"] == 1


def test_the_last_will_orders_after_its_connection_and_before_the_next(two_ingests):
    first, second, db = two_ingests
    # As the agent does: the will is composed at connect with the next seq, then "online".
    will_1 = Status(device="cam-4", seq=40, state=StatusState.OFFLINE, reason="connection-lost")
    online_1 = Status(device="cam-4", seq=41, state=StatusState.ONLINE)
    send(first, online_1)
    send(second, will_1)  # the connection died: the broker published the will
    assert device_row(db, "cam-4").online is False
    online_2 = Status(device="cam-4", seq=43, state=StatusState.ONLINE, ts=will_1.ts + 45)
    send(first, online_2)  # the device came back
    assert device_row(db, "cam-4").online is True
    send(second, will_1)  # a late copy of the old will (a drained session): stays online
    send(second, online_1)
    assert device_row(db, "cam-4").online is True


def test_a_sender_that_restarted_its_seq_is_believed_when_clearly_newer(two_ingests):
    first, second, db = two_ingests
    now = time.time()
    send(first, telemetry("cam-5", 9000, 900, ts=now - 2 * SEQ_RESET_S))
    send(second, telemetry("cam-5", 1, 5, ts=now))  # re-flashed: its counter starts over
    assert device_row(db, "cam-5").inf_count == 5
    send(first, telemetry("cam-5", 2, 4, ts=now - 1))  # seq decides again from there on
    assert device_row(db, "cam-5").inf_count == 4
    send(second, telemetry("cam-5", 1, 6, ts=now))  # seq 1 is older than 2 again
    assert device_row(db, "cam-5").inf_count == 4


def test_supersedes_rules() -> None:
    stored = Stamp("a" * 10, 5, 1000.0)
    assert supersedes(Stamp("b" * 10, 6, 1000.0), stored)
    assert not supersedes(Stamp("a" * 10, 6, 2000.0), stored)  # the same message
    assert not supersedes(Stamp("b" * 10, 4, 1001.0), stored)
    assert supersedes(Stamp("b" * 10, 0, 900.0), stored)  # unsequenced: arrival order
    assert supersedes(Stamp("b" * 10, 4, 999.0, will=True), stored)  # its own connection
    assert not supersedes(Stamp("b" * 10, 4, 900.0, will=True), stored)  # an older one
    assert supersedes(Stamp("b" * 10, 4, 1000.0 + SEQ_RESET_S + 1), stored)
    assert supersedes(Stamp("b" * 10, 1, 0.0), None)


# --- two controller processes ---------------------------------------------------------------


@pytest.fixture
def pg_url(pg_server) -> str:
    return str(pg_server.create_database("replicas"))


@pytest.fixture
def replicas(start_controller, pg_url: str, tmp_path: Path):
    """``start(n)``: n replicas on one PostgreSQL database, sharing the artifact store."""
    shared = tmp_path / "artifacts"

    def start(n: int = 2) -> list[Any]:
        started = []
        for index in range(n):
            started.append(
                start_controller(
                    pg_url, "--replica-id", f"r{index}", "--artifacts", str(shared), *REPLICA
                )
            )
        return started

    return start


def stats(controller: Any) -> dict[str, Any]:
    return dict(controller.client.stats())


def wait_leader(kit: Any, controllers: list[Any], *, timeout: float = 30.0) -> Any:
    def leader() -> Any:
        leaders = [c for c in controllers if c.alive() and stats(c)["replica"]["leader"]]
        return leaders[0] if len(leaders) == 1 else None

    return kit.wait_for(leader, timeout=timeout, what="exactly one leader")


def drained(controller: Any, lease: str) -> bool:
    return any(
        a["replica"] == lease and a["ended"] for a in stats(controller)["replica"]["adopted"]
    )


def stored_counts(pg_url: str) -> tuple[int, int]:
    db = Database(pg_url)
    try:
        return count(db, TelemetrySample), count(db, DeviceEvent)
    finally:
        db.dispose()


def wait_everything_stored(kit: Any, pg_url: str, sim: Any) -> None:
    """Stop the devices, then wait until the database holds every telemetry message and
    every event they published, once."""
    sim.stop()
    published = (sim.stats.telemetry, sim.stats.events)
    kit.wait_for(
        lambda: stored_counts(pg_url) == published,
        timeout=30,
        what=f"{published} telemetry messages and events stored (have {stored_counts(pg_url)})",
    )
    time.sleep(1.0)  # and not one more (a late duplicate would show now)
    assert stored_counts(pg_url) == published


def create_rollout(controller: Any, kit: Any, bundle: Path, **options: Any) -> str:
    artifact = controller.client.upload(bundle)
    created = controller.client.create_rollout(kit.rollout_options(artifact["sha256"], **options))
    return str(created["id"])


def assert_sent_and_installed_once(kit: Any, watch: Any, sim: Any, rollout_id: str) -> None:
    seen = kit.desired_by_device(watch)
    assert sorted(seen) == sorted(sim.device_ids())
    assert all([m["rollout_id"] for m in msgs] == [rollout_id] for msgs in seen.values()), seen
    installs = {d: sim.snapshot(d)["installs"] for d in sim.device_ids()}
    assert set(installs.values()) == {1}, installs


@pytest.mark.slow
def test_two_replicas_store_every_telemetry_message_exactly_once(replicas, simulate, pg_url, kit):
    first, second = replicas(2)  # subscribed before the devices speak: none is missed
    wait_leader(kit, [first, second])
    sim = simulate(devices=20, interval_s=0.3)
    kit.wait_devices(first.client, 20)
    time.sleep(4.0)
    wait_everything_stored(kit, pg_url, sim)
    received = [stats(c)["ingest"]["received"].get("telemetry", 0) for c in (first, second)]
    assert all(r > 0 for r in received), received  # the stream was shared...
    assert sum(received) == sim.stats.telemetry  # ...each message went to one replica
    # The newest state is the newest message, whichever replica stored it.
    devices = {d["device"]: d for d in second.client.devices(fleet=kit.FLEET)}
    db = Database(pg_url)
    try:
        with db.read() as session:
            newest = dict(
                session.execute(
                    sa.select(Device.device, sa.func.max(TelemetrySample.inferences))
                    .join(Device, Device.id == TelemetrySample.device_id)
                    .group_by(Device.device)
                ).all()
            )
    finally:
        db.dispose()
    assert {d: v["telemetry"]["inferences"] for d, v in devices.items()} == newest


@pytest.mark.slow
def test_a_rollout_completes_with_two_replicas(replicas, simulate, desired_watch, bundles, kit):
    sim = simulate(devices=12)
    first, second = replicas(2)
    leader = wait_leader(kit, [first, second])
    other = second if leader is first else first
    kit.wait_devices(other.client, 12)
    rollout_id = create_rollout(other, kit, bundles[2])  # the REST API works on any replica
    done = kit.wait_state(other.client, rollout_id, {"completed"}, timeout=60)
    assert done["totals"]["succeeded"] == 12
    assert_sent_and_installed_once(kit, desired_watch, sim, rollout_id)
    assert stats(leader)["replica"]["terms"] == 1
    assert stats(other)["replica"]["terms"] == 0  # it never ticked
    assert stats(leader)["publisher"]["desired"] == 12
    assert stats(other)["publisher"]["desired"] == 0


@pytest.mark.slow
def test_leader_killed_mid_rollout_the_other_completes_it(
    replicas, simulate, desired_watch, bundles, pg_url, kit
):
    first, second = replicas(2)
    leader = wait_leader(kit, [first, second])
    sim = simulate(devices=10)
    survivor = second if leader is first else first
    kit.wait_devices(survivor.client, 10)
    # Devices download from the URL of the replica the rollout was created on: the survivor
    # (in production, --public-url names a load balancer in front of every replica).
    rollout_id = create_rollout(
        survivor, kit, bundles[2], waves="20%,60%,100%", min_wave_time="1.5s"
    )
    kit.wait_for(
        lambda: survivor.client.rollout(rollout_id)["wave"] >= 2,
        timeout=30,
        what="the second wave to start",
    )
    killed = f"replica/{stats(leader)['replica']['id']}"
    leader.kill()
    assert wait_leader(kit, [survivor]) is survivor
    done = kit.wait_state(survivor.client, rollout_id, {"completed"}, timeout=60)
    assert done["totals"]["succeeded"] == 10
    assert_sent_and_installed_once(kit, desired_watch, sim, rollout_id)
    replica = stats(survivor)["replica"]
    assert replica["terms"] == 1 and replica["retained"]["complete"] is True
    assert stats(survivor)["reconcile"]["complete"] is True
    kit.wait_for(
        lambda: drained(survivor, killed),
        timeout=30,
        what="the killed leader's session to be drained",
    )
    wait_everything_stored(kit, pg_url, sim)
    audit = Counter(e["action"] for e in survivor.client.rollout_audit(rollout_id))
    assert audit["wave.started"] == 3 and audit["rollout.completed"] == 1


@pytest.mark.slow
def test_non_leader_killed_loses_nothing(replicas, simulate, desired_watch, bundles, pg_url, kit):
    first, second = replicas(2)
    leader = wait_leader(kit, [first, second])
    sim = simulate(devices=12, interval_s=0.2)
    other = second if leader is first else first
    kit.wait_devices(leader.client, 12)
    rollout_id = create_rollout(leader, kit, bundles[2], waves="25%,100%", min_wave_time="1s")
    time.sleep(1.0)
    killed = f"replica/{stats(other)['replica']['id']}"
    other.kill()  # with unacknowledged messages, and its share still routed to its session
    done = kit.wait_state(leader.client, rollout_id, {"completed"}, timeout=60)
    assert done["totals"]["succeeded"] == 12
    assert_sent_and_installed_once(kit, desired_watch, sim, rollout_id)
    kit.wait_for(
        lambda: drained(leader, killed),
        timeout=30,
        what="the killed replica's session to be drained",
    )
    wait_everything_stored(kit, pg_url, sim)
    # It comes back under the same name and shares the stream again.
    other.start()
    assert stats(other)["replica"]["leader"] is False
    assert stats(leader)["replica"]["leader"] is True
