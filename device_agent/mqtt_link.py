"""The device's MQTT transport: drain the outbox to the broker, receive desired state and commands.

Three parts, each with one job:

* :class:`Publisher` turns protocol messages into outbox records: it stamps the durable
  per-device ``seq`` and stores the JSON. Anything that wants to say something (the telemetry
  loop, the agent's update state machine, the link itself) goes through it, so *producing* a
  message never depends on being connected.
* :class:`MqttLink` owns one paho-mqtt client and one thread. It connects (MQTT 5 by default,
  3.1.1 on request) with a persistent session, a retained ``offline`` last will and a retained
  ``online`` status, then publishes outbox records in order at QoS 1, at most ``max_inflight``
  at a time, and deletes a record only when its PUBACK arrives. It subscribes to ``desired``
  and ``cmd``, validates what arrives and hands it to callbacks. Invalid payloads are counted,
  logged and reported as an event; nothing a broker or controller sends can stop the thread.
* :class:`TelemetryLoop` builds a :class:`~edgekit.protocol.Telemetry` every ``interval_s``
  from a callable and queues it.

Delivery: the outbox gives at-least-once. A record in flight when the connection drops is
resent by paho on reconnect (same ``msg_id``, DUP flag); one in flight when the process dies is
sent again by the next process. Receivers deduplicate by ``msg_id``
(:class:`edgekit.protocol.Deduplicator`).

Reconnection runs on the link's own loop rather than paho's ``loop_start``: exponential backoff
with jitter (a fleet that lost its broker must not reconnect in lock-step when it returns), a
CONNACK timeout, and the draining of the outbox all happen on one thread, so paho is only ever
called from that thread.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.errors import AgentError
from device_agent.metrics import MetricsSnapshot
from device_agent.outbox import DropReport, Outbox, OutboxError, OverflowReporter
from device_agent.sysinfo import SystemSample
from edgekit.protocol import (
    Command,
    Deduplicator,
    Desired,
    Direction,
    Drift,
    Event,
    EventType,
    InferenceStats,
    Message,
    MessageKind,
    ModelRef,
    ProtocolError,
    SelfTest,
    Severity,
    Status,
    StatusState,
    SystemStats,
    Telemetry,
    Topics,
    decode,
)

__all__ = [
    "Backoff",
    "LinkConfig",
    "LinkCounters",
    "LinkError",
    "LinkState",
    "MqttLink",
    "MqttVersion",
    "Publisher",
    "TelemetryLoop",
    "TlsConfig",
    "build_telemetry",
    "overflow_reporter",
]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=Message)

#: Reason codes below 0x80 are successes in MQTT 5 (0x10 "no matching subscribers" included).
_FAILURE = 0x80
_LOG_EVERY_S = 30.0
_ENFORCE_EVERY_S = 60.0
_REJECTION_PAUSE_S = 5.0


class LinkError(AgentError):
    """The MQTT link is misconfigured (bad TLS files, invalid ids)."""

    reason = "mqtt-link"


class MqttVersion(str, Enum):
    V5 = "5"
    V311 = "3.1.1"

    @property
    def paho(self) -> MQTTProtocolVersion:
        return (
            MQTTProtocolVersion.MQTTv5 if self is MqttVersion.V5 else MQTTProtocolVersion.MQTTv311
        )


class LinkState(str, Enum):
    STOPPED = "stopped"
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    """TCP (and TLS) is up, CONNECT sent, waiting for CONNACK."""
    CONNECTED = "connected"


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Server verification against ``ca_file`` (system CAs when None) and, with ``cert_file``
    and ``key_file``, a client certificate. TLS 1.2 is the minimum."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True
    """Off only for brokers addressed by an IP that their certificate does not name."""

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=None if self.ca_file is None else str(self.ca_file),
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = self.check_hostname
            if self.cert_file is not None:
                ctx.load_cert_chain(
                    str(self.cert_file),
                    None if self.key_file is None else str(self.key_file),
                    password=self.key_password,
                )
            elif self.key_file is not None:
                raise LinkError("tls: key_file given without cert_file")
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"tls: {exc}") from exc
        return ctx


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """Where and how to connect. Only ``host``, ``fleet`` and ``device`` are required."""

    host: str
    fleet: str
    device: str
    port: int = 1883
    client_id: str | None = None
    """Defaults to ``edgekit-{fleet}-{device}``: stable, so the broker keeps the session."""
    version: MqttVersion = MqttVersion.V5
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    """MQTT 5: how long the broker keeps the session (subscriptions, queued commands) while the
    device is offline. MQTT 3.1.1 sessions (clean_session=0) last until the broker drops them."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    max_inflight: int = 10
    """Unacknowledged publishes at once; kept below the broker's receive maximum (mosquitto:
    20), and clamped to the value the broker announces in CONNACK."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_jitter: float = 0.5
    """Each delay is drawn from [(1 - jitter) * d, d]."""
    connect_timeout_s: float = 10.0
    """For the TCP/TLS connect and, separately, for the CONNACK."""
    poll_interval_s: float = 0.1
    """Longest the loop sleeps in select(); bounds the latency of a freshly queued record."""
    agent_version: str | None = None
    max_rejections: int = 3
    """A record the broker refuses this many times (PUBACK error) is dropped and reported."""
    stop_timeout_s: float = 2.0
    """How long :meth:`MqttLink.stop` waits for the broker to acknowledge the offline status."""
    paho_logging: bool = False
    """Route paho's own log lines to the ``device_agent.mqtt_link.paho`` logger."""

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edgekit-{self.fleet}-{self.device}"


class Backoff:
    """Exponential backoff with jitter: initial, 2x, 4x... capped at ``maximum``."""

    __slots__ = ("_attempt", "_rng", "initial", "jitter", "maximum")

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial or not 0.0 <= jitter <= 1.0:
            raise ValueError("backoff needs 0 < initial <= maximum and 0 <= jitter <= 1")
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2.0 ** min(self._attempt, 62)))
        self._attempt += 1
        return ceiling * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self._attempt = 0


@dataclass(frozen=True)
class LinkCounters:
    """A snapshot of the link's counters (monotonic over its life) for telemetry and tests."""

    state: LinkState
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0
    """Outbox records acknowledged by the broker."""
    rejected: int = 0
    """PUBACKs with an error reason code."""
    inflight: int = 0
    desired_received: int = 0
    commands_received: int = 0
    duplicates: int = 0
    invalid_messages: int = 0
    callback_errors: int = 0
    cleared: int = 0
    """Empty retained messages on ``desired`` (the controller cleared the desired state)."""
    session_present: bool = False


class _RateLimit:
    """Lets one thing through every ``every_s`` seconds and counts what it held back."""

    __slots__ = ("_last", "every_s", "suppressed")

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


def _one_line(text: str, limit: int = 1024) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- producing messages ---------------------------------------------------------------------


class Publisher:
    """Queues protocol messages in the outbox for :class:`MqttLink` to send. Thread-safe."""

    def __init__(self, outbox: Outbox, topics: Topics) -> None:
        self.outbox = outbox
        self.topics = topics

    @property
    def device(self) -> str:
        return self.topics.device

    def publish(self, message: _M) -> _M | None:
        """Store ``message`` with the next ``seq``; returns the stamped copy (None: telemetry
        that the outbox dropped at once because it is full of events).

        Raises :class:`ProtocolError` for a message of another device or a kind devices do
        not send, :class:`~device_agent.outbox.OutboxError` when storage fails."""
        kind = message.KIND
        if kind.direction is not Direction.UP:
            raise ProtocolError(f"devices do not publish {kind.value} messages")
        if kind is MessageKind.STATUS:
            raise ProtocolError("status is published by MqttLink itself (online, will, offline)")
        if message.device != self.topics.device:
            raise ProtocolError(
                f"message is for device {message.device!r}, this link is {self.device!r}"
            )
        stamped: list[_M] = []

        def build(seq: int) -> bytes:
            copy = message.with_seq(seq)
            stamped.append(copy)
            return copy.to_json()

        record = self.outbox.put(
            kind.value, self.topics.for_kind(kind), build, int(kind.qos), retain=kind.retained
        )
        return stamped[-1] if record is not None else None

    def event(
        self,
        event: EventType | str,
        *,
        severity: Severity | str = Severity.INFO,
        message: str = "",
        reason: str | None = None,
        ref: str | None = None,
        rollout_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Event | None:
        """Queue an event; ``message`` is collapsed to one line and truncated as needed."""
        return self.publish(
            Event(
                device=self.device,
                event=str(getattr(event, "value", event)),
                severity=Severity(severity),
                message=_one_line(message),
                reason=reason,
                ref=ref,
                rollout_id=rollout_id,
                data=dict(data or {}),
            )
        )

    def ack_command(
        self,
        command: Command,
        event: EventType | str = EventType.COMMAND_ACCEPTED,
        *,
        message: str = "",
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Event | None:
        """Answer ``command`` on ``events`` (``ref`` = the command's ``msg_id``)."""
        failed = str(getattr(event, "value", event)) in (
            EventType.COMMAND_FAILED.value,
            EventType.COMMAND_REJECTED.value,
        )
        return self.event(
            event,
            severity=Severity.WARNING if failed else Severity.INFO,
            message=message or f"{command.command}",
            reason=reason,
            ref=command.msg_id,
            data={"command": command.command, **(data or {})},
        )


def overflow_reporter(topics: Topics) -> OverflowReporter:
    """The outbox's overflow event builder for one device (``outbox.overflow`` on events)."""

    def build(report: DropReport, seq: int) -> tuple[str, bytes]:
        event = Event(
            device=topics.device,
            seq=seq,
            event=EventType.OUTBOX_OVERFLOW.value,
            severity=Severity.WARNING,
            message=(
                f"outbox dropped {report.telemetry} telemetry and {report.events} event "
                f"records (full: {report.by_size}, expired: {report.by_age}, "
                f"refused: {report.by_rejection})"
            ),
            reason="outbox-overflow",
            data={
                "telemetry_dropped": report.telemetry,
                "events_dropped": report.events,
                "by_size": report.by_size,
                "by_age": report.by_age,
                "by_rejection": report.by_rejection,
                "first_seq": report.first_seq,
                "last_seq": report.last_seq,
                "oldest_ts": report.oldest_created,
                "newest_ts": report.newest_created,
            },
        )
        return topics.events, event.to_json()

    return build


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def build_telemetry(
    device: str,
    *,
    metrics: MetricsSnapshot,
    interval_s: float,
    system: SystemSample | None = None,
    model: ModelRef | None = None,
    active_slot: str | None = None,
    slots: Mapping[str, str] | None = None,
    drift: Drift | None = None,
    self_test: SelfTest | None = None,
) -> Telemetry:
    """Assemble a telemetry message from the agent's parts (metrics, host sample, model)."""
    sample = system or SystemSample()
    return Telemetry(
        device=device,
        interval_s=interval_s,
        uptime_s=round(metrics.uptime_s, 3),
        inference=InferenceStats(
            count=metrics.inferences,
            errors=metrics.errors,
            rejected=metrics.rejected_inputs,
            p50_ms=_round(metrics.p50_ms),
            p95_ms=_round(metrics.p95_ms),
            p99_ms=_round(metrics.p99_ms),
        ),
        model=model,
        active_slot=active_slot,
        slots=dict(slots or {}),
        system=SystemStats(
            cpu_percent=sample.cpu_percent,
            mem_total_bytes=sample.mem_total_bytes,
            mem_available_bytes=sample.mem_available_bytes,
            rss_bytes=sample.rss_bytes,
            disk_free_bytes=sample.disk_free_bytes,
            temperature_c=sample.temperature_c,
            uptime_s=sample.uptime_s,
        ),
        drift=drift,
        self_test=self_test,
    )


class TelemetryLoop:
    """Queues one telemetry message every ``interval_s`` (fixed rate; missed ticks are skipped,
    not bunched). ``build`` runs on the loop's thread; if it raises, the tick is skipped,
    counted and reported (rate-limited) as an ``error`` event."""

    def __init__(
        self,
        publisher: Publisher,
        build: Callable[[], Telemetry],
        *,
        interval_s: float = 10.0,
        name: str = "edgekit-telemetry",
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.publisher = publisher
        self.build = build
        self.interval_s = interval_s
        self.name = name
        self.produced = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report = _RateLimit(300.0)

    def tick(self) -> Telemetry | None:
        """Build and queue one message now; returns it (None when it failed or was dropped)."""
        try:
            message = self.publisher.publish(self.build())
        except Exception as exc:
            self.failures += 1
            if self._report.ready():
                logger.exception("telemetry: building or queueing failed")
                with contextlib.suppress(Exception):
                    self.publisher.event(
                        EventType.ERROR,
                        severity=Severity.ERROR,
                        message=f"telemetry failed: {exc}",
                        reason=str(getattr(exc, "reason", "telemetry-failed")),
                        data={"suppressed": self._report.take_suppressed()},
                    )
            return None
        if message is not None:
            self.produced += 1
        return message

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # we fell behind (a slow build, a suspended board): skip ahead
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


# --- the link -------------------------------------------------------------------------------


class MqttLink:
    """The MQTT connection of one device (see the module docstring).

    ``on_desired`` and ``on_command`` receive validated, deduplicated messages on the link's
    thread: they must return quickly (hand work to another thread), and whatever they raise
    is logged, counted and reported as an ``error`` event. A retained ``desired`` is delivered
    again by the broker on every reconnect; the link passes each ``msg_id`` on only once per
    process.
    """

    def __init__(
        self,
        config: LinkConfig,
        outbox: Outbox,
        *,
        on_desired: Callable[[Desired], None] | None = None,
        on_command: Callable[[Command], None] | None = None,
        publisher: Publisher | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self.topics = Topics(config.fleet, config.device)
        except ProtocolError as exc:
            raise LinkError(exc.message) from None
        if config.max_inflight < 1:
            raise LinkError("max_inflight must be at least 1")
        self.config = config
        self.outbox = outbox
        self.publisher = publisher or Publisher(outbox, self.topics)
        self.on_desired = on_desired
        self.on_command = on_command
        self._backoff = Backoff(
            config.backoff_initial_s,
            config.backoff_max_s,
            jitter=config.backoff_jitter,
            rng=rng,
        )
        self._tls_context = config.tls.context() if config.tls is not None else None
        self._client = self._make_client()
        self._dedup = Deduplicator(per_device=1024)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        # Everything below is touched only by the link thread (paho runs its callbacks there).
        self._state = LinkState.STOPPED
        self._next_attempt = 0.0
        self._connecting_since = 0.0
        self._window = config.max_inflight
        self._inflight: dict[int, int] = {}  # paho mid -> outbox record id
        self._inflight_rows: set[int] = set()
        self._direct: dict[int, str] = {}  # paho mid -> what (status messages, not in outbox)
        self._acked: list[int] = []
        self._refused: list[tuple[int, ReasonCode]] = []
        self._cursor = 0
        self._pause_until = 0.0
        self._next_enforce = 0.0
        self._log_invalid = _RateLimit(_LOG_EVERY_S)
        self._report_invalid = _RateLimit(10.0)
        self._log_connect = _RateLimit(_LOG_EVERY_S)
        self._counts: dict[str, int] = {
            name: 0
            for name in (
                "connects",
                "connect_failures",
                "disconnects",
                "published",
                "rejected",
                "desired_received",
                "commands_received",
                "duplicates",
                "invalid_messages",
                "callback_errors",
                "cleared",
            )
        }
        self._session_present = False

    # --- paho setup -------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        config = self.config
        v5 = config.version is MqttVersion.V5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.effective_client_id,
            clean_session=None if v5 else False,
            protocol=config.version.paho,
            reconnect_on_failure=False,
        )
        # paho may hold one more than our window (the online status published in on_connect).
        client.max_inflight_messages_set(config.max_inflight + 1)
        client.max_queued_messages_set(0)
        client.connect_timeout = config.connect_timeout_s
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        if config.paho_logging:
            # paho logs every failed socket read at ERROR: useful when debugging a broker,
            # noise during an ordinary outage (the link logs its own rate-limited warnings).
            client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        return client

    def _status(self, state: StatusState, reason: str | None, seq: int) -> Status:
        return Status(
            device=self.topics.device,
            seq=seq,
            state=state,
            reason=reason,
            agent_version=self.config.agent_version,
        )

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged the ``desired``/``cmd`` subscriptions of the
        current connection (from then on, commands reach ``on_command``)."""
        return self._subscribed.wait(timeout)

    def start(self) -> None:
        """Start the link thread; it connects in the background and keeps reconnecting."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._state = LinkState.DISCONNECTED
        self._next_attempt = 0.0
        self._thread = threading.Thread(target=self._run, name="edgekit-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Publish a retained ``offline`` status (reason ``shutdown``), disconnect cleanly (so
        the broker does not send the last will; it does if that status is not acknowledged
        within ``stop_timeout_s``) and end the thread. Queued records stay in the outbox."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else self.config.stop_timeout_s + 5.0)
            self._thread = None

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def counters(self) -> LinkCounters:
        with self._lock:
            counts = dict(self._counts)
        return LinkCounters(
            state=self._state,
            inflight=len(self._inflight),
            session_present=self._session_present,
            **counts,
        )

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:
                    # A bug or an unexpected library error must not end the link: log it and
                    # go on after a pause, like after a lost connection.
                    logger.exception("mqtt link: unexpected error")
                    self._stop.wait(1.0)
        finally:
            try:
                self._shutdown()
            except Exception:
                logger.exception("mqtt link: error during shutdown")
            self._state = LinkState.STOPPED
            self._connected.clear()
            self._subscribed.clear()

    def _step(self) -> None:
        now = time.monotonic()
        if self._state is LinkState.DISCONNECTED:
            if now < self._next_attempt:
                self._stop.wait(min(self._next_attempt - now, 0.25))
                self._housekeeping(now)
                return
            if not self._attempt():
                return
        elif (
            self._state is LinkState.CONNECTING
            and now - self._connecting_since > self.config.connect_timeout_s
        ):
            self._connect_failed("no CONNACK within the connect timeout")
            self._client.disconnect()
        if self._client.socket() is None:
            # paho closed the socket without telling us (it happens on some TLS failures);
            # calling loop() now would return at once and spin.
            self._lost("socket closed")
        else:
            self._client.loop(timeout=self.config.poll_interval_s)
        self._settle()
        if self._state is LinkState.CONNECTED:
            self._drain()
        self._housekeeping(time.monotonic())

    def _attempt(self) -> bool:
        """One connection attempt: fresh last will, then TCP/TLS connect and CONNECT; True when
        CONNECT went out (the CONNACK is read by the loop)."""
        config = self.config
        try:
            will = self._status(StatusState.OFFLINE, "connection-lost", self.outbox.next_seq())
            self._client.will_set(self.topics.status, will.to_json(), qos=1, retain=True)
        except (OutboxError, ProtocolError) as exc:
            self._connect_failed(f"cannot prepare the last will: {exc}")
            return False
        try:
            if config.version is MqttVersion.V5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = config.session_expiry_s
                self._client.connect(
                    config.host,
                    config.port,
                    config.keepalive_s,
                    clean_start=False,
                    properties=properties,
                )
            else:
                self._client.connect(config.host, config.port, config.keepalive_s)
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS (SSLError), DNS
            self._connect_failed(f"{type(exc).__name__}: {exc}")
            return False
        self._state = LinkState.CONNECTING
        self._connecting_since = time.monotonic()
        return True

    def _connect_failed(self, why: str) -> None:
        self._count("connect_failures")
        delay = self._backoff.next_delay()
        self._state = LinkState.DISCONNECTED
        self._connected.clear()
        self._next_attempt = time.monotonic() + delay
        if self._log_connect.ready():
            logger.warning(
                "mqtt: cannot connect to %s:%d (%s); retrying in %.1fs",
                self.config.host,
                self.config.port,
                why,
                delay,
            )

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_enforce:
            self._next_enforce = now + _ENFORCE_EVERY_S
            try:
                self.outbox.enforce()
            except OutboxError as exc:
                logger.error("outbox: %s", exc)

    def _settle(self) -> None:
        """Apply what the last loop() learned: delete acknowledged records in one transaction,
        count refusals (dropping records refused too often)."""
        if self._acked:
            try:
                self.outbox.ack(*self._acked)
            except OutboxError as exc:
                logger.error("outbox: cannot delete acknowledged records: %s", exc)
            else:
                self._count("published", len(self._acked))
                self._acked.clear()
        while self._refused:
            record_id, reason_code = self._refused.pop()
            self._count("rejected")
            try:
                attempts = self.outbox.release(record_id)
                if attempts >= self.config.max_rejections:
                    logger.error(
                        "mqtt: broker refused record %d %d times (%s); dropping it",
                        record_id,
                        attempts,
                        reason_code,
                    )
                    self.outbox.drop(record_id)
                else:
                    self._cursor = min(self._cursor, record_id - 1)
                    self._pause_until = time.monotonic() + _REJECTION_PAUSE_S
            except OutboxError as exc:
                logger.error("outbox: %s", exc)

    def _drain(self) -> None:
        """Hand the oldest records that are not in flight to paho, up to the window."""
        room = self._window - len(self._inflight)
        if room <= 0 or time.monotonic() < self._pause_until:
            return
        try:
            records = self.outbox.pending(room + len(self._inflight_rows), after_id=self._cursor)
        except OutboxError as exc:
            logger.error("outbox: %s", exc)
            return
        for record in records:
            if room <= 0:
                break
            if record.id in self._inflight_rows:
                continue
            try:
                info = self._client.publish(
                    record.topic, record.payload, qos=record.qos, retain=record.retain
                )
            except ValueError as exc:  # a topic or payload paho refuses: it never will be sent
                logger.error("mqtt: dropping record %d: %s", record.id, exc)
                with contextlib.suppress(OutboxError):
                    self.outbox.drop(record.id)
                continue
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                break
            self._cursor = max(self._cursor, record.id)
            if record.qos == 0:
                self._acked.append(record.id)  # no PUBACK will come
                continue
            self._inflight[info.mid] = record.id
            self._inflight_rows.add(record.id)
            room -= 1
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                break  # the connection just dropped: paho keeps the message and resends it

    def _shutdown(self) -> None:
        """Graceful end: retained offline status, wait briefly for its PUBACK, DISCONNECT.

        If the broker does not acknowledge the offline status in time, the link leaves in a way
        that makes the broker publish the last will instead (MQTT 5: DISCONNECT with reason
        0x04; 3.1.1: no DISCONNECT at all): a cleanly stopped device must never stay
        "online" in its retained status."""
        if self._state is LinkState.CONNECTED:
            acknowledged = False
            try:
                status = self._status(StatusState.OFFLINE, "shutdown", self.outbox.next_seq())
                info = self._client.publish(
                    self.topics.status, status.to_json(), qos=1, retain=True
                )
                self._direct[info.mid] = "status"
                deadline = time.monotonic() + self.config.stop_timeout_s
                while (
                    info.mid in self._direct
                    and self._connected.is_set()
                    and time.monotonic() < deadline
                ):
                    self._client.loop(timeout=0.05)
                    self._settle()
                acknowledged = info.mid not in self._direct
            except (OutboxError, ProtocolError, ValueError) as exc:
                logger.warning("mqtt: could not publish the offline status: %s", exc)
            if not self._connected.is_set():
                pass  # the connection died meanwhile: the broker sends the will by itself
            elif acknowledged:
                self._client.disconnect()
            elif self.config.version is MqttVersion.V5:
                logger.warning("mqtt: offline status not acknowledged; leaving with the will")
                self._client.disconnect(
                    reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
                )
            else:
                logger.warning("mqtt: offline status not acknowledged; leaving with the will")
                sock = self._client.socket()
                if sock is not None:
                    sock.close()
                self._connected.clear()
            deadline = time.monotonic() + 1.0
            while self._connected.is_set() and time.monotonic() < deadline:
                if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        elif self._state is LinkState.CONNECTING:
            self._client.disconnect()
        self._settle()

    # --- paho callbacks (on the link thread, inside loop()) ---------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # paho closes the connection and calls on_disconnect, which counts the failure and
            # schedules the next attempt.
            logger.warning("mqtt: broker refused the connection: %s", reason_code)
            return
        self._state = LinkState.CONNECTED
        self._session_present = bool(flags.session_present)
        self._backoff.reset()
        self._count("connects")
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        window = self.config.max_inflight
        if isinstance(receive_max, int) and receive_max > 1:
            window = min(window, receive_max - 1)  # one slot for the status message
        self._window = window
        logger.info(
            "mqtt: connected to %s:%d (session present: %s)",
            self.config.host,
            self.config.port,
            self._session_present,
        )
        client.subscribe([(self.topics.desired, 1), (self.topics.cmd, 1)])
        try:
            status = self._status(StatusState.ONLINE, None, self.outbox.next_seq())
            info = client.publish(self.topics.status, status.to_json(), qos=1, retain=True)
            self._direct[info.mid] = "status"
        except (OutboxError, ProtocolError) as exc:
            logger.error("mqtt: cannot publish the online status: %s", exc)
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._lost(str(reason_code))

    def _lost(self, why: str) -> None:
        """The connection is gone: schedule the next attempt (idempotent)."""
        was_connected = self._state is LinkState.CONNECTED
        self._connected.clear()
        self._subscribed.clear()
        if self._stop.is_set():
            self._state = LinkState.DISCONNECTED
            return
        if was_connected:
            self._count("disconnects")
            delay = self._backoff.next_delay()
            logger.warning("mqtt: connection lost (%s); reconnecting in %.1fs", why, delay)
            self._state = LinkState.DISCONNECTED
            self._next_attempt = time.monotonic() + delay
        elif self._state is LinkState.CONNECTING:
            self._connect_failed(f"closed before CONNACK: {why}")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        record_id = self._inflight.pop(mid, None)
        if record_id is None:
            self._direct.pop(mid, None)
            return
        self._inflight_rows.discard(record_id)
        if reason_code.value >= _FAILURE:
            self._refused.append((record_id, reason_code))
        else:
            self._acked.append(record_id)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(code) for code in reason_codes if code.value >= _FAILURE]
        if failed:
            logger.error("mqtt: subscription to desired/cmd refused: %s", ", ".join(failed))
        else:
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._receive(message)
        except Exception:
            self._count("callback_errors")
            logger.exception("mqtt: error while handling a message")

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._invalid("<not UTF-8>", 0, ProtocolError("topic is not UTF-8"))
            return
        payload = bytes(message.payload)
        if not payload and topic == self.topics.desired:
            self._count("cleared")  # an empty retained message deletes the desired state
            return
        try:
            parts, parsed = decode(topic, payload)
            if parts.fleet != self.topics.fleet or parts.device != self.topics.device:
                raise ProtocolError(f"message for another device on {topic}")
            if parts.kind.direction is not Direction.DOWN:
                raise ProtocolError(f"devices do not accept {parts.kind.value} messages")
        except ProtocolError as exc:
            self._invalid(topic, len(payload), exc)
            return
        if not self._dedup.accept(parsed):
            self._count("duplicates")
            return
        try:
            if isinstance(parsed, Desired):
                self._count("desired_received")
                if self.on_desired is not None:
                    self.on_desired(parsed)
            elif isinstance(parsed, Command):
                self._count("commands_received")
                if self.on_command is not None:
                    self.on_command(parsed)
        except Exception as exc:
            self._count("callback_errors")
            logger.exception("mqtt: %s handler failed", parts.kind.value)
            with contextlib.suppress(Exception):
                self.publisher.event(
                    EventType.ERROR,
                    severity=Severity.ERROR,
                    message=f"{parts.kind.value} handler failed: {exc}",
                    reason=str(getattr(exc, "reason", "handler-failed")),
                    ref=parsed.msg_id,
                )

    def _invalid(self, topic: str, size: int, exc: ProtocolError) -> None:
        """Count, log (rate-limited) and report (rate-limited) an invalid incoming message."""
        self._count("invalid_messages")
        if self._log_invalid.ready():
            logger.warning(
                "mqtt: invalid message on %s (%s); %d similar not logged",
                topic,
                exc.message,
                self._log_invalid.take_suppressed(),
            )
        if self._report_invalid.ready():
            try:
                self.publisher.event(
                    EventType.INVALID_MESSAGE,
                    severity=Severity.WARNING,
                    message=exc.message,
                    reason=exc.reason,
                    data={
                        "topic": _one_line(topic, 256),
                        "bytes": size,
                        "suppressed": self._report_invalid.take_suppressed(),
                    },
                )
            except (OutboxError, ProtocolError) as error:
                logger.error("mqtt: cannot report an invalid message: %s", error)

    # --- for tests and the agent ------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._inflight and not self._acked and not self.outbox.pending(1):
                return True
            time.sleep(0.02)
        return False
