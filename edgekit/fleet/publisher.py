"""Getting the desired state and commands from the database onto the broker, exactly once.

The rollout engine never publishes: it writes, in the same transaction as the state change
that needs it, the ``desired`` payload of a device (``Device.desired_payload``, with
``desired_published = false``) or a row in ``commands``. This module publishes what is
outstanding at QoS 1 and marks it published only after the broker's PUBACK for exactly that
payload. A controller killed anywhere in between therefore knows on restart what may be
missing, and :meth:`Publisher.reconcile` settles the doubt by reading the broker's retained
``desired`` messages: a device whose retained ``msg_id`` already equals the database's is
marked published without a second publication (so no device ever sees the same rollout's
desired state twice because of a restart), and one whose retained state differs (or is gone,
after a broker lost its persistence) gets the database's state again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import MQTTErrorCode

from edgekit.fleet.db import Command, Database, Device
from edgekit.fleet.mqtt import BrokerAddress, ControllerLink, make_client
from edgekit.protocol import (
    TOPIC_ROOT,
    Desired,
    MessageKind,
    ProtocolError,
    Topics,
    parse_topic,
)

__all__ = ["Publisher", "ReconcileReport"]

log = logging.getLogger(__name__)

_DEVICES = cast(sa.Table, Device.__table__)
_COMMANDS = cast(sa.Table, Command.__table__)


@dataclass(frozen=True)
class ReconcileReport:
    retained: int
    matched: int
    republish: int
    complete: bool
    """False when the end-of-retained marker never came (the result rests on a quiet period)."""

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Publisher:
    """Publishes outstanding desired states and commands through a :class:`ControllerLink`."""

    def __init__(
        self,
        db: Database,
        link: ControllerLink,
        *,
        batch: int = 1000,
        ack_timeout_s: float = 15.0,
    ) -> None:
        self.db = db
        self.link = link
        self.batch = batch
        self.ack_timeout_s = ack_timeout_s
        self.published_desired = 0
        self.published_commands = 0
        self._lock = threading.Lock()

    def flush(self) -> int:
        """Publish everything outstanding; return how many messages the broker acknowledged."""
        if not self.link.connected.is_set():
            return 0
        with self._lock:
            total = 0
            for flush in (self._flush_desired, self._flush_commands):
                while True:
                    outstanding, acked = flush()
                    total += acked
                    # A full batch, all acknowledged: there may be more. Anything less: stop
                    # (the rest is retried on the next flush, not in a tight loop).
                    if outstanding < self.batch or acked < outstanding:
                        break
            return total

    def _flush_desired(self) -> tuple[int, int]:
        with self.db.read() as session:
            rows = session.execute(
                sa.select(
                    _DEVICES.c.id,
                    _DEVICES.c.fleet,
                    _DEVICES.c.device,
                    _DEVICES.c.desired_payload,
                )
                .where(_DEVICES.c.desired_published.is_(False))
                .order_by(_DEVICES.c.id)
                .limit(self.batch)
            ).all()
        if not rows:
            return 0, 0
        sent = []
        for device_id, fleet, device, payload in rows:
            topic = Topics(fleet, device).desired
            info = self.link.publish(topic, (payload or "").encode("utf-8"), retain=True)
            sent.append((device_id, payload, info))
        acked = [(device_id, payload) for device_id, payload, info in self._acked(sent)]
        if acked:
            with self.db.write() as session:
                session.execute(
                    sa.update(_DEVICES)
                    .where(
                        _DEVICES.c.id == sa.bindparam("b_id"),
                        _DEVICES.c.desired_payload == sa.bindparam("b_payload"),
                    )
                    .values(desired_published=True),
                    [{"b_id": i, "b_payload": p} for i, p in acked],
                )
            self.published_desired += len(acked)
        return len(rows), len(acked)

    def _flush_commands(self) -> tuple[int, int]:
        with self.db.read() as session:
            rows = session.execute(
                sa.select(_COMMANDS.c.id, _COMMANDS.c.topic, _COMMANDS.c.payload)
                .where(_COMMANDS.c.published_at.is_(None))
                .order_by(_COMMANDS.c.id)
                .limit(self.batch)
            ).all()
        if not rows:
            return 0, 0
        sent = [
            (row_id, None, self.link.publish(topic, payload.encode("utf-8"), retain=False))
            for row_id, topic, payload in rows
        ]
        acked = [row_id for row_id, _, _ in self._acked(sent)]
        if acked:
            now = time.time()
            with self.db.write() as session:
                session.execute(
                    sa.update(_COMMANDS)
                    .where(_COMMANDS.c.id == sa.bindparam("b_id"))
                    .values(published_at=now),
                    [{"b_id": i} for i in acked],
                )
            self.published_commands += len(acked)
        return len(rows), len(acked)

    def _acked(
        self, sent: Sequence[tuple[int, str | None, mqtt.MQTTMessageInfo]]
    ) -> Iterator[tuple[int, str | None, mqtt.MQTTMessageInfo]]:
        deadline = time.monotonic() + self.ack_timeout_s
        for row_id, payload, info in sent:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("publishing failed: %s", info.rc)
                continue  # it stays outstanding for the next flush
            remaining = deadline - time.monotonic()
            try:
                info.wait_for_publish(max(remaining, 0.001))
            except (RuntimeError, ValueError):
                continue  # not queued (no connection): it stays outstanding
            if info.is_published():
                yield row_id, payload, info

    # --- startup reconciliation ---

    def reconcile(
        self,
        address: BrokerAddress,
        *,
        fleet: str | None,
        timeout: float = 15.0,
        quiet_s: float = 1.0,
        ca_file: str | None = None,
    ) -> ReconcileReport:
        """Compare the broker's retained ``desired`` messages with the database.

        Subscribes on a separate, clean connection (to the desired topics and to a marker
        topic outside the device tree), then publishes an empty, non-retained marker: the
        broker queues it after the retained messages it sent for the subscription, so its
        arrival says they have all arrived. Without it, the result rests on a quiet period.
        """
        nonce = secrets.token_hex(6)
        # Outside the device tree (edgekit/v1/...): no device or observer of devices sees it.
        marker_topic = f"{TOPIC_ROOT}/controller/reconcile-{nonce}"
        retained: dict[tuple[str, str], str | None] = {}
        done = threading.Event()
        subscribed = threading.Event()
        last_message = [time.monotonic()]

        def on_subscribe(*_args: Any) -> None:
            subscribed.set()

        def on_message(_client: mqtt.Client, _userdata: Any, message: Any) -> None:
            last_message[0] = time.monotonic()
            try:
                topic = bytes(message._topic).decode("utf-8", errors="replace")
                if topic == marker_topic:
                    done.set()
                    return
                if not message.retain:
                    return
                try:
                    parts = parse_topic(topic)
                except ProtocolError:
                    return
                key = (parts.fleet, parts.device)
                payload = bytes(message.payload)
                try:
                    retained[key] = Desired.from_json(payload).msg_id if payload else None
                except ProtocolError:
                    retained[key] = "?"  # unreadable: differs from what the database holds
            except Exception:
                log.exception("reading a retained desired message failed")

        client = make_client(address, f"edgekit-reconcile-{nonce}", ca_file=ca_file)
        client.suppress_exceptions = True
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(address.host, address.port, keepalive=30, clean_start=True)
        client.loop_start()
        try:
            client.subscribe(
                [(Topics.subscription(fleet, None, MessageKind.DESIRED), 1), (marker_topic, 1)]
            )
            if not subscribed.wait(timeout):
                raise TimeoutError("the broker did not acknowledge the reconcile subscription")
            client.publish(marker_topic, b"", qos=1, retain=False)
            deadline = time.monotonic() + timeout
            while not done.is_set() and time.monotonic() < deadline:
                if time.monotonic() - last_message[0] > max(quiet_s, timeout / 2):
                    break
                done.wait(0.05)
        finally:
            client.disconnect()
            client.loop_stop()
        return self._settle(retained, fleet=fleet, complete=done.is_set())

    def _settle(
        self, retained: dict[tuple[str, str], str | None], *, fleet: str | None, complete: bool
    ) -> ReconcileReport:
        matched = republish = 0
        with self.db.write() as session:
            query = sa.select(
                _DEVICES.c.id,
                _DEVICES.c.fleet,
                _DEVICES.c.device,
                _DEVICES.c.desired_payload,
                _DEVICES.c.desired_msg_id,
                _DEVICES.c.desired_published,
            ).where(_DEVICES.c.desired_payload.is_not(None))
            if fleet is not None:
                query = query.where(_DEVICES.c.fleet == fleet)
            changes = []
            for device_id, dev_fleet, device, payload, msg_id, published in session.execute(query):
                on_broker = retained.get((dev_fleet, device))
                same = on_broker is None if payload == "" else on_broker == msg_id
                if same:
                    matched += 1
                else:
                    republish += 1
                if same != published:
                    changes.append({"b_id": device_id, "b_published": same})
            if changes:
                session.execute(
                    sa.update(_DEVICES)
                    .where(_DEVICES.c.id == sa.bindparam("b_id"))
                    .values(desired_published=sa.bindparam("b_published")),
                    changes,
                )
        report = ReconcileReport(len(retained), matched, republish, complete)
        log.info("reconciled desired state with the broker: %s", report)
        return report
