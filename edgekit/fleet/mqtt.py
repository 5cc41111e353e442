"""The controller's MQTT connection: broker addresses, one paho client, subscribe and publish.

One connection carries both directions. It is MQTT 5 with a persistent session (a stable
client id, ``clean_start=False`` and a session expiry), so QoS 1 events published while the
controller restarts wait for it at the broker; retained ``status`` and ``reported`` arrive
again on every subscription anyway, which is what rollout decisions are made from.

Messages are acknowledged by hand (paho's ``manual_ack``): the ingest acknowledges each one
only after its batch is committed, so a controller killed with messages still in its queue
leaves them unacknowledged in its broker session, to be delivered again. The session's
``ReceiveMaximum`` bounds how many are unacknowledged at once.

With ``share_group`` the upstream subscriptions become MQTT 5 shared subscriptions
(``$share/GROUP/edgekit/v1/...``): several controller replicas then split the message stream,
each message going to one of them. Brokers send no retained messages to shared subscriptions;
:func:`read_retained` reads them on a separate connection. A broker may keep routing a dead
replica's share to its persistent session (mosquitto does); :func:`drain_session` takes such a
session over, delivers what it holds to the ingest, and ends it.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit.fleet.errors import SpecError
from edgekit.protocol import TOPIC_ROOT, MessageKind, Topics

__all__ = [
    "UPSTREAM_KINDS",
    "BrokerAddress",
    "ControllerLink",
    "DrainReport",
    "MessageSink",
    "drain_session",
    "make_client",
    "read_retained",
    "shared_filters",
    "validate_share_group",
]

log = logging.getLogger(__name__)

#: Where the ingest takes a message: ``(topic, payload, received_at, ack)``; ``ack`` (None for
#: a message that needs none) is to be called once the message is safely stored.
MessageSink = Callable[[str, bytes, float, Callable[[], None] | None], None]

#: Unacknowledged messages the broker may send the controller at once: enough for the ingest's
#: batches (thousands of messages per second at 50 ms per batch), well under its queue bound.
DEFAULT_RECEIVE_MAXIMUM = 4000

#: What the controller ingests: everything devices publish.
UPSTREAM_KINDS = (
    MessageKind.STATUS,
    MessageKind.TELEMETRY,
    MessageKind.EVENTS,
    MessageKind.REPORTED,
)


@dataclass(frozen=True)
class BrokerAddress:
    """``mqtt://[user:password@]host[:1883]`` or ``mqtts://host[:8883]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    cert_file: str | None = None
    """Client certificate (PEM) for brokers that require one (``edgekit fleet broker-config``
    writes such a broker); not part of the URL, set with :meth:`with_client_cert`."""
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise SpecError(f"broker {url!r}: the scheme must be mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise SpecError(f"broker {url!r} names no host")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise SpecError(f"broker {url!r} has an invalid port") from None
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def with_client_cert(self, cert_file: str | None, key_file: str | None) -> BrokerAddress:
        """This address presenting ``cert_file``/``key_file``: both or neither, mqtts only."""
        if cert_file is None and key_file is None:
            return self
        if cert_file is None or key_file is None:
            raise SpecError("a client certificate needs both the certificate and its key file")
        if not self.tls:
            raise SpecError(f"broker {self}: a client certificate needs an mqtts:// broker")
        return replace(self, cert_file=cert_file, key_file=key_file)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def validate_share_group(name: str) -> str:
    """A shared subscription's group name: one topic level, no wildcards (MQTT 5, 4.8.2)."""
    if not name or len(name) > 64 or any(c in name for c in "/+#") or not name.isprintable():
        raise SpecError(
            f"shared group {name!r} must be 1 to 64 printable characters without / + or #"
        )
    return name


def shared_filters(filters: Sequence[str], group: str | None) -> list[str]:
    """``filters`` as the shared subscriptions of ``group`` (unchanged without a group)."""
    if not group:
        return list(filters)
    return [f"$share/{group}/{f}" for f in filters]


def make_client(
    address: BrokerAddress,
    client_id: str,
    *,
    ca_file: str | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """An MQTT 5 paho client for ``address`` (credentials and TLS applied, not connected)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(
            ca_certs=ca_file,
            certfile=address.cert_file,
            keyfile=address.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return client


def connect_properties(session_expiry_s: int, *, receive_maximum: int | None = None) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties


def _end_session_properties() -> Properties:
    """DISCONNECT with a session expiry of 0: the broker drops the session at once."""
    properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    return properties


def _not_sent() -> mqtt.MQTTMessageInfo:
    """What :meth:`ControllerLink.publish` returns for a message it refused to send."""
    info = mqtt.MQTTMessageInfo(0)
    info.rc = MQTTErrorCode.MQTT_ERR_NO_CONN
    return info


class ControllerLink:
    """One paho client on its own network thread, reconnecting by itself.

    ``on_message(topic, payload, received_at, ack)`` runs on paho's thread and must be quick
    (ingest only queues); ``ack`` acknowledges the message to the broker and may be called from
    any thread. :meth:`publish` may be called from any thread; with ``may_publish`` it refuses
    (returns a message info with an error code) whenever that says no, which is how a replica
    that is not, or no longer, the leader is kept from publishing desired states.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        fleet: str | None = None,
        share_group: str | None = None,
        session_expiry_s: int = 3600,
        on_message: MessageSink | None = None,
        ca_file: str | None = None,
        max_inflight: int = 200,
        receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
        may_publish: Callable[[], bool] | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.fleet = fleet
        self.share_group = None if share_group is None else validate_share_group(share_group)
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self._on_message = on_message
        self._may_publish = may_publish
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker acknowledged the upstream subscriptions (retained state follows)."""
        self.connects = 0
        self.session_present = False
        self._generation = 0
        self._client = make_client(
            address, client_id, ca_file=ca_file, manual_ack=on_message is not None
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.suppress_exceptions = True
        self._started = False

    def subscriptions(self) -> list[str]:
        filters = [Topics.subscription(self.fleet, None, kind) for kind in UPSTREAM_KINDS]
        return shared_filters(filters, self.share_group)

    def start(self) -> None:
        """Connect in the background (returns at once; see :meth:`wait_connected`)."""
        if self._started:
            return
        self._started = True
        self._client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=30,
            clean_start=False,
            properties=connect_properties(
                self.session_expiry_s,
                receive_maximum=self.receive_maximum if self._on_message is not None else None,
            ),
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect. The broker keeps the session (and queues for it) unless
        ``end_session``, which ends it at once."""
        if not self._started:
            return
        self._started = False
        self.connected.clear()
        self.subscribed.clear()
        try:
            self._client.disconnect(properties=_end_session_properties() if end_session else None)
        finally:
            self._client.loop_stop()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool, qos: int = 1
    ) -> mqtt.MQTTMessageInfo:
        if self._may_publish is not None and not self._may_publish():
            return _not_sent()
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        # A message from an earlier connection is redelivered on this one under the same
        # packet id, which the broker may by now have given to another message: acknowledging
        # it would acknowledge a message not yet stored. Its redelivered copy gets acked.
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)

    # --- paho callbacks (network thread) ---

    def _handle_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s refused the connection: %s", self.address, reason)
            return
        self.connects += 1
        self._generation += 1
        self.session_present = bool(getattr(_flags, "session_present", False))
        if self._on_message is not None:
            options = SubscribeOptions(qos=1)
            topics: Sequence[tuple[str, SubscribeOptions]] = [
                (topic, options) for topic in self.subscriptions()
            ]
            result, _mid = client.subscribe(list(topics))
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("subscribing failed: %s", result)
        self.connected.set()
        log.info("connected to %s as %s", self.address, self.client_id)

    def _handle_subscribe(self, *_args: Any) -> None:
        self.subscribed.set()

    def _handle_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self.connected.clear()
        if self._started:
            log.warning("disconnected from %s (%s); reconnecting", self.address, reason)

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, message: Any) -> None:
        if self._on_message is None:
            return
        try:
            # Brokers refuse topics that are not UTF-8, but nothing a peer sends may raise on
            # paho's thread: an exception there would end the network loop.
            topic = bytes(message._topic).decode("utf-8", errors="replace")
            generation, mid, qos = self._generation, message.mid, message.qos

            def ack() -> None:
                self._ack(generation, mid, qos)

            self._on_message(topic, bytes(message.payload), time.time(), ack)
        except Exception:
            log.exception("dropping a message the ingest could not queue")
            self._ack(self._generation, message.mid, message.qos)  # or it blocks the window


def _marker_topic(purpose: str) -> str:
    """A topic outside the device tree (``edgekit/v1/...``) that no device sees."""
    return f"{TOPIC_ROOT}/controller/{purpose}-{secrets.token_hex(6)}"


def read_retained(
    address: BrokerAddress,
    filters: Sequence[str],
    sink: MessageSink,
    *,
    client_id: str,
    ca_file: str | None = None,
    timeout: float = 60.0,
) -> tuple[int, bool]:
    """Hand every retained message under ``filters`` to ``sink``; return how many, and
    whether the broker's end-of-retained marker arrived (else the timeout ended the read).

    Shared subscriptions receive no retained messages, so a replica that must know every
    device's current ``status`` and ``reported`` (the leader, before its first rollout
    decision) reads them here, on a separate clean connection. The marker is an empty message
    the connection publishes to itself after the subscription is acknowledged: the broker
    queues it behind the retained messages it sends for that subscription.
    """
    marker = _marker_topic("retained")
    done = threading.Event()
    subscribed = threading.Event()
    count = [0]

    def on_message(_client: mqtt.Client, _userdata: Any, message: Any) -> None:
        try:
            topic = bytes(message._topic).decode("utf-8", errors="replace")
            if topic == marker:
                done.set()
            elif message.retain:
                count[0] += 1
                sink(topic, bytes(message.payload), time.time(), None)
        except Exception:
            log.exception("reading a retained message failed")

    client = make_client(address, client_id, ca_file=ca_file)
    client.suppress_exceptions = True
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = on_message
    client.connect(address.host, address.port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        client.subscribe([(f, 1) for f in filters] + [(marker, 1)])
        if not subscribed.wait(timeout):
            raise TimeoutError("the broker did not acknowledge the retained-state subscription")
        client.publish(marker, b"", qos=1, retain=False)
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return count[0], done.is_set()


@dataclass(frozen=True)
class DrainReport:
    """What taking over a session found: whether the broker still had it, how many messages it
    delivered, and whether it was drained and ended (else it is left for a later attempt)."""

    session_present: bool
    messages: int
    ended: bool

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def drain_session(
    address: BrokerAddress,
    *,
    client_id: str,
    filters: Sequence[str],
    sink: MessageSink,
    settle: Callable[[float], bool],
    session_expiry_s: int = 3600,
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
    ca_file: str | None = None,
    timeout: float = 60.0,
) -> DrainReport:
    """Take over the broker session of ``client_id`` (a dead replica), give what it holds to
    ``sink``, and end it.

    A broker may keep routing a shared subscription's share to a member whose persistent
    session outlives its connection (mosquitto does), and the messages the dead replica had
    received but not acknowledged are in that session too. Connecting with its client id
    resumes the session; unsubscribing its ``filters`` stops new messages from being routed
    to it; a marker published to a topic this connection subscribed to arrives after what the
    session had queued. Once ``settle(timeout)`` says the sink has stored everything (and so
    acknowledged it), the session is ended (session expiry 0). If anything fails on the way
    the session is kept, with what was not acknowledged, for the next attempt.
    """
    marker = _marker_topic("drain")
    connected = threading.Event()
    unsubscribed = threading.Event()
    done = threading.Event()
    present = [False]
    count = [0]
    client = make_client(address, client_id, ca_file=ca_file, manual_ack=True)
    client.suppress_exceptions = True

    def on_connect(cl: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("taking over session %s refused: %s", client_id, reason)
            return
        present[0] = bool(getattr(flags, "session_present", False))
        connected.set()
        if present[0]:
            cl.subscribe([(marker, 1)])
            if filters:
                cl.unsubscribe(list(filters))
            else:
                unsubscribed.set()

    def on_unsubscribe(cl: mqtt.Client, *_args: Any) -> None:
        unsubscribed.set()
        cl.publish(marker, b"", qos=1, retain=False)

    def on_message(cl: mqtt.Client, _userdata: Any, message: Any) -> None:
        mid, qos = message.mid, message.qos
        try:
            topic = bytes(message._topic).decode("utf-8", errors="replace")
            if topic == marker:
                cl.ack(mid, qos)
                done.set()
                return
            count[0] += 1

            def ack() -> None:
                cl.ack(mid, qos)

            sink(topic, bytes(message.payload), time.time(), ack)
        except Exception:
            log.exception("a message of session %s could not be queued", client_id)

    client.on_connect = on_connect
    client.on_unsubscribe = on_unsubscribe
    client.on_message = on_message
    client.connect(
        address.host,
        address.port,
        keepalive=30,
        clean_start=False,
        properties=connect_properties(session_expiry_s, receive_maximum=receive_maximum),
    )
    client.loop_start()
    ended = False
    try:
        deadline = time.monotonic() + timeout
        if not connected.wait(timeout):
            raise TimeoutError(f"the broker did not accept a connection as {client_id}")
        if present[0] and not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"session {client_id} was not drained within {timeout:g}s")
        if not settle(max(1.0, deadline - time.monotonic())):
            raise TimeoutError(f"the messages of session {client_id} were not stored in time")
        client.disconnect(properties=_end_session_properties())
        ended = True
    finally:
        if not ended:
            client.disconnect()
        client.loop_stop()
    return DrainReport(present[0], count[0], ended)
