"""The controller's MQTT connection: broker addresses, one paho client, subscribe and publish.

One connection carries both directions. It is MQTT 5 with a persistent session (a stable
client id, ``clean_start=False`` and a session expiry), so QoS 1 events published while the
controller restarts wait for it at the broker; retained ``status`` and ``reported`` arrive
again on every subscription anyway, which is what rollout decisions are made from.

With ``share_group`` the upstream subscriptions become MQTT 5 shared subscriptions
(``$share/GROUP/edgekit/v1/...``): several ingest processes then split the message stream.
Brokers send no retained messages to shared subscriptions, so a shared ingest learns a silent
device's state only when it next speaks; a single controller should not use one.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit.fleet.errors import SpecError
from edgekit.protocol import MessageKind, Topics

__all__ = ["UPSTREAM_KINDS", "BrokerAddress", "ControllerLink", "make_client"]

log = logging.getLogger(__name__)

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

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def make_client(
    address: BrokerAddress,
    client_id: str,
    *,
    ca_file: str | None = None,
) -> mqtt.Client:
    """An MQTT 5 paho client for ``address`` (credentials and TLS applied, not connected)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def connect_properties(session_expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    return properties


class ControllerLink:
    """One paho client on its own network thread, reconnecting by itself.

    ``on_message(topic, payload, received_at)`` runs on paho's thread and must be quick
    (ingest only queues). :meth:`publish` may be called from any thread.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        fleet: str | None = None,
        share_group: str | None = None,
        session_expiry_s: int = 3600,
        on_message: Callable[[str, bytes, float], None] | None = None,
        ca_file: str | None = None,
        max_inflight: int = 200,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.fleet = fleet
        self.share_group = share_group
        self.session_expiry_s = session_expiry_s
        self._on_message = on_message
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker acknowledged the upstream subscriptions (retained state follows)."""
        self.connects = 0
        self._client = make_client(address, client_id, ca_file=ca_file)
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
        if self.share_group:
            filters = [f"$share/{self.share_group}/{f}" for f in filters]
        return filters

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
            properties=connect_properties(self.session_expiry_s),
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool, qos: int = 1
    ) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    # --- paho callbacks (network thread) ---

    def _handle_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s refused the connection: %s", self.address, reason)
            return
        self.connects += 1
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
            self._on_message(topic, bytes(message.payload), time.time())
        except Exception:
            log.exception("dropping a message the ingest could not queue")
