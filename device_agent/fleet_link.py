"""The agent's link to its fleet: telemetry, events and reported state up; bundles, commands down.

:class:`FleetLink` wires an :class:`~device_agent.agent.Agent` to the MQTT contract of
``edgekit.protocol`` (``docs/mqtt-protocol.md``). It owns the store-and-forward outbox
(``STATE/outbox.sqlite``), the :class:`~device_agent.mqtt_link.MqttLink`, a
:class:`~device_agent.mqtt_link.TelemetryLoop` fed by
:class:`~device_agent.telemetry.TelemetryBuilder`, and two threads of its own:

* the **bridge** tails the agent's event log (``STATE/events.jsonl``) and forwards every event
  to ``events``, publishes the retained ``reported`` state whenever it changes and after
  every (re)connect, finishes rollouts whose health window was decided, and runs commands;
* the **installer** applies ``desired`` states: it downloads, verifies, self-tests and
  activates through :meth:`Agent.install` (never on the MQTT thread: a download takes
  minutes).

Events are bridged from the log rather than from an in-process callback because the log is
what survives a crash: the bridge keeps a durable cursor (the last forwarded event ``seq``, in
``STATE/fleet.json``), so an event recorded while the broker was away, or while the agent was
dead, is forwarded when the bridge next runs. The cursor is written after the events are in
the outbox; a crash between the two would forward them again, so at start the bridge skips
events whose copy is still queued in the outbox, and every bridged event carries a
``msg_id`` derived from the device and the event (its ``seq`` and time) and the event's
``seq`` as ``data.event_seq``: whichever of those a receiver deduplicates by, each event
counts once.

``desired`` is idempotent per rollout: the rollout a desired state names (``rollout_id``,
bundle, version, sha256) is acted on once, and its outcome recorded in ``STATE/fleet.json``,
so the retained message the broker delivers again after every reconnect or restart does not
install again. A rollout interrupted by a crash before it was activated is retried when the
desired state arrives again, at most :data:`MAX_INSTALL_ATTEMPTS` times; one that was serving
on probation when the agent died is rolled back by the agent and reported as such (the new
model may be what crashed it). A controller retries a finished rollout by publishing a new
``rollout_id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from device_agent.config import MqttConfig
from device_agent.errors import AgentError, ConfigError
from device_agent.events import read_events
from device_agent.mqtt_link import (
    LinkConfig,
    MqttLink,
    MqttVersion,
    Publisher,
    TelemetryLoop,
    TlsConfig,
    overflow_reporter,
)
from device_agent.outbox import Outbox, OutboxError
from device_agent.store import Phase
from device_agent.sysinfo import SystemProbe
from device_agent.telemetry import (
    DriftMonitor,
    SelfTestTracker,
    TelemetryBuilder,
    model_ref,
    slot_states,
    update_state,
)
from device_agent.updates import Outcome
from edgekit._version import __version__
from edgekit.fsutil import atomic_write_bytes
from edgekit.protocol import (
    Command,
    CommandName,
    Desired,
    Event,
    EventType,
    ModelRef,
    ProtocolError,
    Reported,
    Severity,
    Topics,
    UpdateOutcome,
    UpdateResult,
    validate_id,
)

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.updates import UpdateResult as AgentUpdateResult

__all__ = [
    "BACKFILL_EVENTS",
    "DIAGNOSTICS_DIR",
    "FLEET_STATE_NAME",
    "LINK_DEFAULTS",
    "MAX_INSTALL_ATTEMPTS",
    "OUTBOX_NAME",
    "FleetLink",
    "FleetState",
    "Rollout",
    "event_msg_id",
    "link_config",
    "protocol_event",
]

logger = logging.getLogger(__name__)

OUTBOX_NAME = "outbox.sqlite"
FLEET_STATE_NAME = "fleet.json"
DIAGNOSTICS_DIR = "diagnostics"
#: Attempts at one rollout that crashes were interrupting (power cuts during a download are
#: ordinary on a device; a bundle that takes the agent down every time must stop somewhere).
MAX_INSTALL_ATTEMPTS = 3
#: Events of the log a device forwards the first time its fleet link starts: the recent
#: history, not years of it.
BACKFILL_EVENTS = 100
#: Diagnostics archives kept in ``STATE/diagnostics`` (each a few hundred KiB at most).
KEEP_DIAGNOSTICS = 3
#: Agent events put into a diagnostics archive.
DIAGNOSTIC_EVENTS = 500
#: LinkConfig settings of the agent's link. The link thread wakes every ``poll_interval_s``
#: to look for newly queued records; every wake-up of a Python thread costs the request
#: thread a GIL hand-off, which on a small model measured about 2% of throughput at the
#: link's default 0.1 s. Half a second of extra latency on a telemetry record does not.
LINK_DEFAULTS: dict[str, Any] = {"poll_interval_s": 0.5}

_FLEET_STATE_SCHEMA = 1
_NAME_CHARS = re.compile(r"[^a-z0-9._-]+")
_TEXT_LIMIT = 1024
_RETRY_BUSY_S = 1.0


def _name(value: object) -> str | None:
    """A protocol name (``[a-z0-9._-]``, max 64) made from free text: ``"field test"`` ->
    ``"field-test"``; None when nothing is left."""
    if not isinstance(value, str):
        return None
    text = _NAME_CHARS.sub("-", value.lower()).strip("-._")[:64]
    return text or None


def _one_line(value: object, limit: int = _TEXT_LIMIT) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ts(value: object) -> float:
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
        return min(max(stamp, 0.0), 1e11)
    return 0.0


# --- events ---------------------------------------------------------------------------------

#: Agent event type -> (protocol event name, severity). Types not listed (a newer agent's) are
#: forwarded as ``agent.<type>``: the ``event`` field is open, so nothing is dropped.
_EVENT_NAMES: dict[str, tuple[str, Severity]] = {
    "agent-started": (EventType.AGENT_STARTED.value, Severity.INFO),
    "agent-stopped": (EventType.AGENT_STOPPING.value, Severity.INFO),
    "recovered": (EventType.UPDATE_FAILED.value, Severity.WARNING),
    "boot-fallback": ("agent.boot-fallback", Severity.ERROR),
    "boot-failed": ("agent.boot-failed", Severity.CRITICAL),
    "update-started": (EventType.UPDATE_INSTALLING.value, Severity.INFO),
    "update-refused": (EventType.UPDATE_FAILED.value, Severity.WARNING),
    "staged": (EventType.UPDATE_VERIFIED.value, Severity.INFO),
    "selftest-passed": ("update.self-test-passed", Severity.INFO),
    "selftest-skipped": ("update.self-test-skipped", Severity.WARNING),
    "activated": (EventType.UPDATE_TRIAL.value, Severity.INFO),
    "health-resumed": (EventType.UPDATE_TRIAL.value, Severity.INFO),
    "committed": (EventType.UPDATE_COMMITTED.value, Severity.INFO),
    "rolled-back": (EventType.UPDATE_ROLLED_BACK.value, Severity.WARNING),
    "slot-removed": ("agent.slot-removed", Severity.INFO),
}

#: Refusals at these stages mean the bundle itself is unacceptable (signature, version floor,
#: compatibility, wrong digest): ``rejected``. Anything else (network, disk, self-test, load)
#: is ``failed``.
_REJECTING_STAGES = frozenset({"verify"})
_REJECTING_REASONS = frozenset({"download-mismatch", "download-too-large", "bad-request"})

_ENVELOPE_KEYS = ("schema", "seq", "time", "type", "bundle", "version", "reason", "message")


def event_msg_id(device: str, event: Mapping[str, Any]) -> str:
    """The ``msg_id`` of a bridged agent event: derived from the device and the event's
    ``seq`` and time, so forwarding the same event twice yields the same id."""
    key = f"{device}\0{event.get('seq')}\0{event.get('time')}\0{event.get('type')}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _flatten(details: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Event details as protocol ``data`` (scalars only): nested objects become dotted keys,
    lists comma-joined text."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        name = f"{prefix}{key}"[:128]
        if isinstance(value, Mapping) and depth < 2:
            out.update(_flatten(value, f"{name}.", depth + 1))
        elif isinstance(value, (list, tuple)):
            out[name] = _one_line(",".join(str(v) for v in value))
        elif value is None or isinstance(value, bool):
            out[name] = value
        elif isinstance(value, float):
            if math.isfinite(value):
                out[name] = value
        elif isinstance(value, int):
            if abs(value) < 2**63:
                out[name] = value
        else:
            out[name] = _one_line(value)
    return out


def protocol_event(
    device: str,
    event: Mapping[str, Any],
    *,
    rollout_id: str | None = None,
    ref: str | None = None,
) -> Event:
    """The ``events`` message for one line of the agent's event log."""
    kind = str(event.get("type") or "unknown")
    name, severity = _EVENT_NAMES.get(kind, (f"agent.{_name(kind) or 'event'}", Severity.INFO))
    source = event.get("source")
    if kind == "update-started" and isinstance(source, str) and "://" in source:
        name = EventType.UPDATE_DOWNLOADING.value
    reason = _name(event.get("reason"))
    if kind == "update-refused" and (
        event.get("stage") in _REJECTING_STAGES or reason in _REJECTING_REASONS
    ):
        name = EventType.UPDATE_REJECTED.value
    bundle = event.get("bundle")
    version = event.get("version")
    message = event.get("message")
    if not message:
        subject = f" {bundle} v{version}" if bundle is not None else ""
        message = f"{kind}{subject}"
    data = _flatten({k: v for k, v in event.items() if k not in _ENVELOPE_KEYS})
    data.update(
        event_seq=event.get("seq") if isinstance(event.get("seq"), int) else None,
        agent_event=kind,
        bundle=None if bundle is None else _one_line(bundle, 128),
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
    )
    if isinstance(event.get("reason"), str) and event["reason"] != reason:
        data["reason_text"] = _one_line(event["reason"])
    return Event(
        device=device,
        msg_id=event_msg_id(device, event),
        ts=_ts(event.get("time")),
        event=name,
        severity=severity,
        message=_one_line(message),
        reason=reason,
        ref=ref,
        rollout_id=rollout_id,
        data=dict(list(data.items())[:1024]),
    )


# --- persisted state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """A rollout the device has started and not finished."""

    rollout_id: str
    msg_id: str
    bundle: str
    version: int
    sha256: str
    size: int
    url: str
    attempts: int = 1
    phase: str = "installing"
    """``installing`` (download to activation), ``trial`` (serving in its health window),
    ``interrupted`` (a previous process died before activation; retried on redelivery)."""
    events_from: int = 0
    """The first agent event ``seq`` that belongs to this rollout."""

    @classmethod
    def for_desired(cls, desired: Desired, *, attempts: int, events_from: int) -> Rollout:
        return cls(
            rollout_id=desired.rollout_id,
            msg_id=desired.msg_id,
            bundle=desired.bundle,
            version=desired.version,
            sha256=desired.sha256,
            size=desired.size,
            url=desired.url,
            attempts=attempts,
            events_from=events_from,
        )

    def key(self) -> tuple[str, str, int, str]:
        return (self.rollout_id, self.bundle, self.version, self.sha256)


def _key(value: Any) -> tuple[str, str, int, str]:
    rollout_id, bundle, version, sha256 = value
    return (str(rollout_id), str(bundle), int(version), str(sha256))


def _desired_key(desired: Desired) -> tuple[str, str, int, str]:
    return (desired.rollout_id, desired.bundle, desired.version, desired.sha256)


@dataclass(frozen=True)
class FleetState:
    """``STATE/fleet.json``: what the fleet link must remember across restarts."""

    event_cursor: int = 0
    """``seq`` of the last agent event forwarded to the outbox."""
    rollout: Rollout | None = None
    last_update: dict[str, Any] | None = None
    """``reported.last_update`` (a protocol ``UpdateResult``)."""
    last_key: tuple[str, str, int, str] | None = None
    """The finished rollout's (rollout_id, bundle, version, sha256): redeliveries are ignored."""
    last_ref: str | None = None
    last_events: tuple[int, int] | None = None
    """Agent event ``seq`` range of the finished rollout (to attribute late-forwarded ones)."""
    restart_ref: str | None = None
    """``msg_id`` of a restart command the next process reports as completed."""

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["schema"] = _FLEET_STATE_SCHEMA
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> FleetState:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("schema") != _FLEET_STATE_SCHEMA:
            raise ValueError("not a fleet state of schema 1")
        rollout = doc.get("rollout")
        last_key = doc.get("last_key")
        last_events = doc.get("last_events")
        return cls(
            event_cursor=int(doc.get("event_cursor") or 0),
            rollout=None if rollout is None else Rollout(**rollout),
            last_update=doc.get("last_update"),
            last_key=None if last_key is None else _key(last_key),
            last_ref=doc.get("last_ref"),
            last_events=None if last_events is None else (int(last_events[0]), int(last_events[1])),
            restart_ref=doc.get("restart_ref"),
        )


# --- configuration --------------------------------------------------------------------------


def link_config(config: MqttConfig, **overrides: Any) -> LinkConfig:
    """The :class:`LinkConfig` for ``[mqtt]``; reads the password file. ``overrides`` replace
    fields (tests shorten timeouts)."""
    if config.fleet is None:
        raise ConfigError("mqtt.fleet must be set to start the fleet link")
    device = config.device_id
    try:
        validate_id(device, what="device id")
    except ProtocolError as exc:
        raise ConfigError(
            f"mqtt.device: {exc.message} (the default is the host name; set mqtt.device)"
        ) from None
    password = config.password
    if config.password_file is not None:
        try:
            password = config.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"mqtt.password_file: cannot read {config.password_file}: {exc}"
            ) from None
    tls = None
    if config.tls.enabled:
        tls = TlsConfig(
            ca_file=config.tls.ca_file,
            cert_file=config.tls.cert_file,
            key_file=config.tls.key_file,
            check_hostname=config.tls.check_hostname,
        )
    settings: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "fleet": config.fleet,
        "device": device,
        "version": MqttVersion(config.version),
        "keepalive_s": config.keepalive_s,
        "username": config.username,
        "password": password,
        "tls": tls,
        "backoff_initial_s": config.reconnect_initial_s,
        "backoff_max_s": config.reconnect_max_s,
        "agent_version": __version__,
    }
    settings.update(overrides)
    return LinkConfig(**settings)


# --- the link -------------------------------------------------------------------------------


class FleetLink:
    """Connects one agent to the fleet (see the module docstring). ``start`` and ``stop``.

    ``on_restart`` is how the ``restart`` command restarts the process (``edgekit-agent run``
    re-executes itself); without it the command is rejected. ``drive_health`` makes the
    bridge decide finished health windows (:meth:`Agent.poll`), for an agent that has no
    service loop of its own doing it. ``tick_s`` is how often the bridge looks at the event
    log and the reported state (commands and desired states wake it at once; a device pays
    for every wake-up). ``link_options`` override :class:`LinkConfig` fields.
    """

    def __init__(
        self,
        agent: Agent,
        config: MqttConfig,
        *,
        on_restart: Callable[[], None] | None = None,
        drive_health: bool = True,
        tick_s: float = 1.0,
        link_options: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        if agent.events is None:
            raise AgentError("the fleet link needs an agent that owns its state directory")
        self.agent = agent
        self.config = config
        self.on_restart = on_restart
        self.drive_health = drive_health
        self.tick_s = tick_s
        link_cfg = link_config(config, **{**LINK_DEFAULTS, **dict(link_options or {})})
        self.device = link_cfg.device
        self.topics = Topics(link_cfg.fleet, link_cfg.device)
        root = agent.store.root
        self.state_path = root / FLEET_STATE_NAME
        self.diagnostics_dir = root / DIAGNOSTICS_DIR
        self.outbox = Outbox(
            root / OUTBOX_NAME,
            max_bytes=config.outbox_max_bytes,
            max_age_s=config.outbox_max_age_s,
            overflow=overflow_reporter(self.topics),
        )
        try:
            self.publisher = Publisher(self.outbox, self.topics)
            self.link = MqttLink(
                link_cfg,
                self.outbox,
                on_desired=self._on_desired,
                on_command=self._on_command,
                publisher=self.publisher,
            )
        except BaseException:
            self.outbox.close()
            raise
        self.monitor = DriftMonitor(
            every=config.drift_every,
            max_requests=config.drift_max_requests,
            max_bytes=config.drift_max_bytes,
            seed=seed,
        )
        self.selftest = SelfTestTracker()
        self.telemetry = TelemetryBuilder(
            agent,
            device=self.device,
            interval_s=config.telemetry_interval_s,
            probe=SystemProbe(root),
            monitor=self.monitor,
            selftest=self.selftest,
            min_drift_requests=config.drift_min_requests,
        )
        self.loop = TelemetryLoop(
            self.publisher, self.telemetry.build, interval_s=config.telemetry_interval_s
        )
        self._lock = threading.RLock()  # fleet state, rollout bookkeeping, reported
        self._state = self._load_state()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._desired_ready = threading.Event()
        self._next_desired: Desired | None = None
        self._commands: list[Command] = []
        self._threads: list[threading.Thread] = []
        self._reported: dict[str, Any] | None = None
        self._connects = 0
        self._queued_event_seqs: set[int] = set()
        self._previous_ref: tuple[str | None, ModelRef | None] = (None, None)
        self._started = False
        #: Counters for operators and tests.
        self.installs = 0
        self.ignored_desired = 0

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Forward what the log holds, report, then start the threads and the link."""
        if self._started:
            return
        self._started = True
        self._stop.clear()
        self._queued_event_seqs = self._queued_bridge_seqs()
        self.selftest.seed(read_events(self.agent.store.events_path, keep=self._keep()))
        self._bridge_events()
        self._queued_event_seqs.clear()
        self._reconcile_rollout()
        self._finish_restart()
        self._publish_reported(force=True)
        self.agent.set_observer(self.monitor)
        self.link.start()
        self.loop.start()
        for target, name in ((self._bridge_run, "bridge"), (self._installer_run, "installer")):
            thread = threading.Thread(target=target, name=f"edgekit-fleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "fleet link: %s as device %s of fleet %s",
            f"{self.link.config.host}:{self.link.config.port}",
            self.topics.device,
            self.topics.fleet,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop telemetry, forward the last events, stop the link (its retained ``offline``
        status) and close the outbox. Unsent records stay in the outbox for the next start.
        An install in progress is not interrupted; the agent's shutdown hands it over."""
        if not self._started:
            return
        self._started = False
        self.agent.set_observer(None)
        self.loop.stop(timeout)
        self._stop.set()
        self._wake.set()
        self._desired_ready.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._threads.clear()
        with contextlib.suppress(Exception):
            self._bridge_events()
            self._publish_reported()
        self.link.stop()
        self.outbox.close()

    def close(self) -> None:
        """:meth:`stop`, and release the outbox of a link that never started."""
        self.stop()
        self.outbox.close()

    def __enter__(self) -> FleetLink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far was acknowledged by the broker."""
        return self.link.wait_idle(timeout)

    @property
    def state(self) -> FleetState:
        with self._lock:
            return self._state

    def _keep(self) -> int:
        return self.agent.config.events.keep

    # --- persisted state ----------------------------------------------------------------

    def _load_state(self) -> FleetState:
        try:
            return FleetState.from_bytes(self.state_path.read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            logger.error("fleet link: %s is unusable (%s); starting afresh", self.state_path, exc)
        events = self.agent.events
        last = events.last_seq if events is not None else 0
        return FleetState(event_cursor=max(0, last - BACKFILL_EVENTS))

    def _save(self, state: FleetState) -> None:
        """Persist (fsynced, atomic); the in-memory state advances even if the disk refuses,
        so a full disk costs at most repeated work after a restart, never a wedged link."""
        with self._lock:
            self._state = state
            try:
                atomic_write_bytes(self.state_path, state.to_bytes())
            except OSError as exc:
                logger.error("fleet link: cannot write %s: %s", self.state_path, exc)

    # --- the bridge ---------------------------------------------------------------------

    def _bridge_run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                logger.exception("fleet link: bridge error")
                self._stop.wait(1.0)
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _tick(self) -> None:
        if self.drive_health:
            try:
                self.agent.poll()
            except AgentError as exc:
                logger.error("fleet link: deciding the health window failed: %s", exc)
        self._bridge_events()
        while True:
            with self._lock:
                command = self._commands.pop(0) if self._commands else None
            if command is None:
                break
            self._run_command(command)
            self._bridge_events()
        connects = self.link.counters().connects
        force = connects != self._connects
        self._connects = connects
        self._publish_reported(force=force)

    def _queued_bridge_seqs(self) -> set[int]:
        """``data.event_seq`` of bridged events still in the outbox (see the module
        docstring: events forwarded just before a crash that had no time to save the
        cursor)."""
        seqs: set[int] = set()
        after = 0
        try:
            while True:
                records = self.outbox.pending(500, after_id=after)
                if not records:
                    break
                after = records[-1].id
                for record in records:
                    if record.kind != "events" or b'"event_seq"' not in record.payload:
                        continue
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        seq = json.loads(record.payload)["data"]["event_seq"]
                        if isinstance(seq, int):
                            seqs.add(seq)
        except (OutboxError, KeyError) as exc:
            logger.warning("fleet link: cannot scan the outbox: %s", exc)
        return seqs

    def _bridge_events(self) -> None:
        """Forward agent events after the cursor to the outbox, then move the cursor."""
        events_log = self.agent.events
        if events_log is None:
            return
        with self._lock:
            cursor = self._state.event_cursor
            last = events_log.last_seq
            if last < cursor:
                logger.warning(
                    "fleet link: the event log restarted at %d (cursor %d); following it",
                    last,
                    cursor,
                )
                self._save(replace(self._state, event_cursor=last))
                return
            if last == cursor:
                return
            events = read_events(self.agent.store.events_path, keep=self._keep(), since=cursor)
            forwarded = cursor
            try:
                for event in events:
                    seq = event["seq"]
                    if seq in self._queued_event_seqs:
                        forwarded = seq
                        continue
                    rollout_id, ref = self._attribution(seq)
                    self.publisher.publish(
                        protocol_event(self.device, event, rollout_id=rollout_id, ref=ref)
                    )
                    forwarded = seq
                    self.selftest.note(event)
                    self._follow_rollout(event)
            except (OutboxError, ProtocolError) as exc:
                logger.error("fleet link: cannot queue agent event: %s", exc)
            finally:
                if forwarded != cursor:
                    self._save(replace(self._state, event_cursor=forwarded))
        self._publish_reported()

    def _attribution(self, seq: int) -> tuple[str | None, str | None]:
        """(rollout_id, ref) for the agent event ``seq``: events during a rollout belong to it."""
        state = self._state
        rollout = state.rollout
        if rollout is not None and seq >= rollout.events_from:
            return rollout.rollout_id, rollout.msg_id
        if state.last_events is not None and state.last_update is not None:
            low, high = state.last_events
            if low <= seq <= high:
                return state.last_update.get("rollout_id"), state.last_ref
        return None, None

    def _follow_rollout(self, event: Mapping[str, Any]) -> None:
        """Finish the rollout in flight when its health window is decided."""
        rollout = self._state.rollout
        kind = event.get("type")
        if rollout is None or kind not in ("committed", "rolled-back"):
            return
        if event.get("bundle") != rollout.bundle or event.get("version") != rollout.version:
            return
        seq = event.get("seq")
        if not isinstance(seq, int) or seq < rollout.events_from:
            return
        if kind == "committed":
            self._finish(UpdateOutcome.COMMITTED, events_to=seq)
        else:
            self._finish(
                UpdateOutcome.ROLLED_BACK, reason=_name(event.get("reason")), events_to=seq
            )

    # --- reported -----------------------------------------------------------------------

    def _previous_model(self) -> ModelRef | None:
        """What a rollback would return to (its manifest is read once per slot)."""
        slot = self.agent.updates.state.previous
        cached_slot, cached = self._previous_ref
        if slot == cached_slot:
            return cached
        info = self.agent.store.describe(slot)
        previous: ModelRef | None = None
        if info is not None and "error" not in info:
            with contextlib.suppress(ProtocolError, KeyError):
                previous = ModelRef(
                    name=info["name"],
                    version=info["version"],
                    sha256=info["sha256"],
                    display_version=info.get("display_version"),
                )
        self._previous_ref = (slot, previous)
        return previous

    def _reported_message(self) -> Reported:
        agent = self.agent
        serving = agent.serving
        previous = self._previous_model()
        active, slots = slot_states(agent)
        last = self._state.last_update
        return Reported(
            device=self.device,
            current=None if serving is None else model_ref(serving.manifest),
            previous=previous,
            active_slot=active,
            slots=slots,
            update_state=update_state(agent),
            last_update=None if last is None else UpdateResult.from_dict(last),
            agent_version=__version__,
        )

    def _publish_reported(self, *, force: bool = False) -> None:
        """Queue ``reported`` if it differs from the last one queued (or ``force``)."""
        with self._lock:
            try:
                message = self._reported_message()
            except (ProtocolError, AgentError) as exc:
                logger.error("fleet link: cannot build reported: %s", exc)
                return
            content = message.to_dict()
            for key in ("seq", "msg_id", "ts"):
                content.pop(key, None)
            if not force and content == self._reported:
                return
            try:
                self.publisher.publish(message)
            except (OutboxError, ProtocolError) as exc:
                logger.error("fleet link: cannot queue reported: %s", exc)
                return
            self._reported = content

    # --- desired ------------------------------------------------------------------------

    def _on_desired(self, desired: Desired) -> None:
        """On the MQTT thread: hand over and return (the newest desired state wins)."""
        with self._lock:
            self._next_desired = desired
        self._desired_ready.set()

    def _installer_run(self) -> None:
        while not self._stop.is_set():
            self._desired_ready.wait()
            if self._stop.is_set():
                return
            with self._lock:
                desired, self._next_desired = self._next_desired, None
                self._desired_ready.clear()
            if desired is None:
                continue
            try:
                self._apply(desired)
            except Exception as exc:
                logger.exception("fleet link: applying desired state failed")
                with contextlib.suppress(Exception):
                    self.publisher.event(
                        EventType.ERROR,
                        severity=Severity.ERROR,
                        message=f"applying desired state failed: {exc}",
                        reason="fleet-link",
                        ref=desired.msg_id,
                        rollout_id=desired.rollout_id,
                    )

    def _decide(self, desired: Desired) -> str:
        """``ignore``, ``install``, ``already-running`` or ``give-up`` (see the module
        docstring for the rules)."""
        key = _desired_key(desired)
        with self._lock:
            state = self._state
            if state.last_key is not None and tuple(state.last_key) == key:
                return "ignore"
            rollout = state.rollout
            if rollout is not None and rollout.key() == key:
                if rollout.phase != "interrupted":
                    return "ignore"
                return "install" if rollout.attempts < MAX_INSTALL_ATTEMPTS else "give-up"
        serving = self.agent.serving
        if (
            serving is not None
            and serving.manifest.name == desired.bundle
            and serving.manifest.version == desired.version
            and self.agent.updates.state.pending is None
        ):
            return "already-running"
        return "install"

    def _apply(self, desired: Desired) -> None:
        action = self._decide(desired)
        if action == "ignore":
            self.ignored_desired += 1
            logger.info("fleet link: rollout %s was handled already", desired.rollout_id)
            return
        # Another update on probation (the previous rollout, or one from before): wait for it
        # to be decided, unless a newer desired state replaces this one meanwhile.
        while self.agent.updates.state.pending is not None:
            if self._stop.wait(0.25):
                return
            with self._lock:
                if self._next_desired is not None:
                    return
        with self._lock:
            previous = self._state.rollout
            before = previous
            attempts = 1
            if previous is not None and previous.key() == _desired_key(desired):
                attempts = previous.attempts + 1
            elif previous is not None:
                self._finish(UpdateOutcome.FAILED, reason="superseded")
                before = None
            rollout = Rollout.for_desired(
                desired, attempts=attempts, events_from=self._last_event_seq() + 1
            )
            self._save(replace(self._state, rollout=rollout))
        if action == "already-running":
            self._finish(
                UpdateOutcome.COMMITTED,
                announce=f"{desired.bundle} v{desired.version} is already running",
            )
            return
        if action == "give-up":
            self._finish(
                UpdateOutcome.FAILED,
                reason="interrupted",
                announce=f"gave up after {MAX_INSTALL_ATTEMPTS} interrupted attempts",
            )
            return
        self.installs += 1
        self.publisher.event(
            EventType.UPDATE_RECEIVED,
            message=f"desired {desired.bundle} v{desired.version} (attempt {attempts})",
            ref=desired.msg_id,
            rollout_id=desired.rollout_id,
            data={"bundle": desired.bundle, "version": desired.version, "size": desired.size},
        )
        self._publish_reported()
        try:
            result = self.agent.install(
                desired.url, sha256=desired.sha256, size=desired.size, wait_for_health=False
            )
        except AgentError as exc:
            if exc.reason == "update-in-progress" and not self._stop.is_set():
                # Raced with another update (a local one): try again shortly.
                with self._lock:
                    if self._next_desired is None:
                        self._next_desired = desired
                self._save(replace(self._state, rollout=before))  # not an attempt
                self._stop.wait(_RETRY_BUSY_S)
                self._desired_ready.set()
                return
            self._finish(UpdateOutcome.FAILED, reason=_name(exc.reason), announce=exc.message)
            return
        self._wake.set()  # forward the update's events now
        self._after_install(rollout, result)

    def _after_install(self, rollout: Rollout, result: AgentUpdateResult) -> None:
        if result.outcome is Outcome.REFUSED:
            reason = _name(result.reason)
            rejected = result.stage in _REJECTING_STAGES or reason in _REJECTING_REASONS
            self._finish(
                UpdateOutcome.REJECTED if rejected else UpdateOutcome.FAILED, reason=reason
            )
        elif result.outcome is Outcome.COMMITTED:
            self._finish(UpdateOutcome.COMMITTED)
        elif result.outcome is Outcome.ROLLED_BACK:
            self._finish(UpdateOutcome.ROLLED_BACK, reason=_name(result.reason))
        else:
            with self._lock:
                current = self._state.rollout
                if current is not None and current.key() == rollout.key():
                    self._save(replace(self._state, rollout=replace(current, phase="trial")))
        self._publish_reported()

    def _last_event_seq(self) -> int:
        events = self.agent.events
        return events.last_seq if events is not None else 0

    def _finish(
        self,
        outcome: UpdateOutcome,
        *,
        reason: str | None = None,
        announce: str | None = None,
        events_to: int | None = None,
    ) -> None:
        """Record the rollout in flight as finished; ``announce`` publishes the outcome as an
        event too (when no agent event says it: already running, gave up, errors)."""
        with self._lock:
            rollout = self._state.rollout
            if rollout is None:
                return
            result = UpdateResult(
                rollout_id=rollout.rollout_id,
                outcome=outcome,
                bundle=rollout.bundle,
                version=rollout.version,
                reason=reason,
                ts=time.time(),
            )
            high = events_to if events_to is not None else self._last_event_seq()
            self._save(
                replace(
                    self._state,
                    rollout=None,
                    last_update=result.to_dict(),
                    last_key=rollout.key(),
                    last_ref=rollout.msg_id,
                    last_events=(rollout.events_from, max(high, rollout.events_from)),
                )
            )
        logger.info(
            "fleet link: rollout %s %s%s",
            rollout.rollout_id,
            outcome.value,
            f" ({reason})" if reason else "",
        )
        if announce is not None:
            name = {
                UpdateOutcome.COMMITTED: EventType.UPDATE_COMMITTED,
                UpdateOutcome.ROLLED_BACK: EventType.UPDATE_ROLLED_BACK,
                UpdateOutcome.FAILED: EventType.UPDATE_FAILED,
                UpdateOutcome.REJECTED: EventType.UPDATE_REJECTED,
            }[outcome]
            try:
                self.publisher.event(
                    name,
                    severity=Severity.INFO
                    if outcome is UpdateOutcome.COMMITTED
                    else Severity.WARNING,
                    message=announce,
                    reason=reason,
                    ref=rollout.msg_id,
                    rollout_id=rollout.rollout_id,
                    data={"bundle": rollout.bundle, "version": rollout.version},
                )
            except (OutboxError, ProtocolError) as exc:
                logger.error("fleet link: cannot queue the rollout outcome: %s", exc)
        self._publish_reported()

    def _reconcile_rollout(self) -> None:
        """At start, after the backlog of events was forwarded: a rollout still in flight was
        cut short by the previous process's end."""
        with self._lock:
            rollout = self._state.rollout
            if rollout is None or rollout.phase == "interrupted":
                return
            pending = self.agent.updates.state.pending
            if (
                pending is not None
                and pending.phase is Phase.HEALTH
                and pending.name == rollout.bundle
                and pending.version == rollout.version
            ):
                phase = "trial"  # a clean stop handed the health window over
            else:
                phase = "interrupted"
            self._save(replace(self._state, rollout=replace(rollout, phase=phase)))
        if phase == "interrupted":
            logger.warning(
                "fleet link: rollout %s was interrupted (attempt %d of %d)",
                rollout.rollout_id,
                rollout.attempts,
                MAX_INSTALL_ATTEMPTS,
            )

    # --- commands -----------------------------------------------------------------------

    def _on_command(self, command: Command) -> None:
        """On the MQTT thread: queue for the bridge thread and return."""
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _run_command(self, command: Command) -> None:
        publisher = self.publisher
        if command.expired():
            publisher.ack_command(
                command, EventType.COMMAND_REJECTED, message="expired", reason="expired"
            )
            return
        known = command.known
        if known is None:
            publisher.ack_command(
                command,
                EventType.COMMAND_REJECTED,
                message=f"unknown command {command.command!r}",
                reason="unknown-command",
            )
            return
        problem = _check_args(known, command.args)
        if problem is not None:
            publisher.ack_command(
                command, EventType.COMMAND_REJECTED, message=problem, reason="bad-arguments"
            )
            return
        if known is CommandName.RESTART and self.on_restart is None:
            publisher.ack_command(
                command,
                EventType.COMMAND_REJECTED,
                message="this agent cannot restart itself (not run by edgekit-agent run)",
                reason="unsupported",
            )
            return
        publisher.ack_command(command, EventType.COMMAND_ACCEPTED)
        try:
            if known is CommandName.ROLLBACK:
                data = self._rollback(command)
            elif known is CommandName.COLLECT_DIAGNOSTICS:
                data = self._collect_diagnostics(command)
            else:
                self._save(replace(self._state, restart_ref=command.msg_id))
                assert self.on_restart is not None
                logger.info("fleet link: restart requested by command %s", command.msg_id)
                self.on_restart()
                return  # the next process reports command.completed
        except AgentError as exc:
            publisher.ack_command(
                command, EventType.COMMAND_FAILED, message=exc.message, reason=_name(exc.reason)
            )
            return
        except OSError as exc:
            publisher.ack_command(
                command, EventType.COMMAND_FAILED, message=str(exc), reason="io-error"
            )
            return
        publisher.ack_command(command, EventType.COMMAND_COMPLETED, data=data)
        self._publish_reported()

    def _rollback(self, command: Command) -> dict[str, Any]:
        reason = _name(command.args.get("reason")) or "fleet-command"
        result = self.agent.rollback(reason, message=f"rollback command {command.msg_id}")
        return {"bundle": result.name, "version": result.version, "outcome": result.outcome.value}

    def _finish_restart(self) -> None:
        ref = self._state.restart_ref
        if ref is None:
            return
        try:
            self.publisher.event(
                EventType.COMMAND_COMPLETED,
                message="restart",
                ref=ref,
                data={"command": CommandName.RESTART.value, "pid": os.getpid()},
            )
        except (OutboxError, ProtocolError) as exc:
            logger.error("fleet link: cannot report the restart: %s", exc)
            return
        self._save(replace(self._state, restart_ref=None))

    def _collect_diagnostics(self, command: Command) -> dict[str, Any]:
        """A tar.gz in ``STATE/diagnostics`` with what an operator asks for first: status,
        model, link and outbox counters, the last telemetry, recent events, the [mqtt]
        settings without secrets. Named in the completion event; fetched out of band."""
        agent = self.agent
        counters = asdict(self.link.counters())
        documents: dict[str, Any] = {
            "status.json": agent.status(),
            "model.json": agent.model_info(),
            "link.json": counters,
            "outbox.json": asdict(self.outbox.stats()),
            "fleet.json": json.loads(self._state.to_bytes()),
            "telemetry.json": None
            if self.telemetry.last is None
            else self.telemetry.last.to_dict(),
            "mqtt-config.json": {
                k: v for k, v in asdict(self.config).items() if k not in ("password",)
            },
            "host.json": {"hostname": socket.gethostname(), "pid": os.getpid()},
        }
        events = read_events(agent.store.events_path, keep=self._keep(), limit=DIAGNOSTIC_EVENTS)
        minutes = command.args.get("minutes")
        if isinstance(minutes, (int, float)) and not isinstance(minutes, bool):
            since = time.time() - 60.0 * minutes
            events = [e for e in events if _ts(e.get("time")) >= since]
        self.diagnostics_dir.mkdir(parents=True, exist_ok=True)
        name = f"diag-{int(time.time())}-{command.msg_id[:8]}.tar.gz"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            members = {
                key: json.dumps(value, indent=2, sort_keys=True, default=str).encode()
                for key, value in documents.items()
            }
            members["events.jsonl"] = b"".join(
                json.dumps(e, sort_keys=True, default=str).encode() + b"\n" for e in events
            )
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mtime = int(time.time())
                archive.addfile(info, io.BytesIO(data))
        atomic_write_bytes(self.diagnostics_dir / name, buffer.getvalue(), mode=0o640)
        old = sorted(self.diagnostics_dir.glob("diag-*.tar.gz"), key=lambda p: p.stat().st_mtime)
        for stale in old[:-KEEP_DIAGNOSTICS]:
            with contextlib.suppress(OSError):
                stale.unlink()
        return {"archive": name, "bytes": len(buffer.getvalue()), "events": len(events)}


def _check_args(command: CommandName, args: Mapping[str, Any]) -> str | None:
    """A one-line problem with a known command's arguments, or None. Unknown arguments are
    ignored (a newer controller may send more)."""
    if command is CommandName.ROLLBACK:
        reason = args.get("reason")
        if reason is not None and (not isinstance(reason, str) or _name(reason) is None):
            return "rollback: args.reason must be a short text"
    if command is CommandName.COLLECT_DIAGNOSTICS:
        minutes = args.get("minutes")
        if minutes is not None and (
            isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0
        ):
            return "collect-diagnostics: args.minutes must be a positive number"
    return None
