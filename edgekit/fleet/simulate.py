"""``edgekit simulate``: many devices in one process, each speaking the real MQTT protocol.

Every simulated device is a real MQTT 5 client with its own connection, client id, persistent
session and retained ``offline`` last will, and every message it sends or accepts is built or
parsed by :mod:`edgekit.protocol`, so the controller cannot tell a simulated device from an
agent by the messages. What a device *does* is simulated: it downloads the bundle a ``desired``
message names (HTTP, checking size and sha256, unless ``download=False``), "installs" it after
a short delay, runs a golden self-test that fails for the versions listed in
``fail_golden``, and reports progress on ``events`` and the outcome on ``reported``, the way
``docs/mqtt-protocol.md`` describes. Telemetry carries inference counters, latency percentiles
(per version: ``latency_ms``), error rates (``error_rate``), drift and the last self-test.

One thread drives all connections through a selector (paho's external-loop API), so a thousand
devices cost a thousand sockets, not a thousand threads; downloads run in a small thread pool
and hand their results back to that thread, which is the only one that touches paho.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import http.client
import itertools
import logging
import queue
import random
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgekit._version import __version__
from edgekit.fleet.mqtt import BrokerAddress, connect_properties
from edgekit.protocol import (
    Command,
    CommandName,
    Desired,
    Drift,
    Event,
    EventType,
    InferenceStats,
    Message,
    ModelRef,
    ProtocolError,
    Reported,
    SelfTest,
    Severity,
    Status,
    StatusState,
    SystemStats,
    Telemetry,
    Topics,
    UpdateOutcome,
    UpdateResult,
    UpdateState,
    parse_topic,
)

__all__ = ["SimConfig", "SimDevice", "Simulator"]

log = logging.getLogger(__name__)

_AGENT_VERSION = f"sim-{__version__}"
_CHUNK = 1024 * 1024


class _Progress:
    """A download so far: its length and running sha256."""

    __slots__ = ("digest", "size")

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def reset(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()


class _TooLarge(Exception):
    """The server sent more than ``desired.size``."""


def _model_sha(name: str, version: int) -> str:
    """A stand-in for the model file's sha256 (the simulator has no model file)."""
    return hashlib.sha256(f"simulated model {name} {version}".encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    broker: str
    fleet: str = "sim"
    devices: int = 10
    prefix: str = "sim"
    interval_s: float = 10.0
    """Telemetry period of each device (phases are spread evenly over it)."""
    inference_rate: float = 20.0
    """Simulated inferences per second per device."""
    model: str = "tiny"
    initial_version: int | None = 1
    groups: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    latency_ms: Mapping[int, float] = field(default_factory=dict)
    """p95 latency by bundle version (others: ``base_latency_ms``)."""
    base_latency_ms: float = 8.0
    error_rate: Mapping[int, float] = field(default_factory=dict)
    """Share of failed inferences by bundle version (others: 0)."""
    drift_psi: Mapping[int, float] = field(default_factory=dict)
    fail_golden: frozenset[int] = frozenset()
    """Versions whose golden self-test fails: the update is refused, the old model stays."""
    download: bool = True
    download_workers: int = 16
    download_retries: int = 5
    """Further attempts after a failed download, with exponential backoff, resuming with a
    ``Range`` request (as the agent's downloader does)."""
    download_backoff_s: float = 0.5
    install_s: float = 0.2
    """Time between a verified download and the commit (load, self-test, health window)."""
    offline: frozenset[str] = frozenset()
    """Device ids that start disconnected (see :meth:`Simulator.go_online`)."""
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    seed: int = 0


@dataclass(eq=False)  # identity hashing: devices live in sets
class SimDevice:
    """One simulated device's state (touched only by the simulator's loop thread)."""

    device: str
    topics: Topics
    client: mqtt.Client
    current: ModelRef | None = None
    previous: ModelRef | None = None
    floor: int = 0
    last_update: UpdateResult | None = None
    update_state: str = UpdateState.IDLE.value
    self_test: SelfTest | None = None
    seq: int = 0
    online: bool = False
    wanted_online: bool = True
    subscribed: bool = False
    count: int = 0
    errors: float = 0.0
    started: float = field(default_factory=time.time)
    last_tick: float = field(default_factory=time.time)
    seen_msg_ids: set[str] = field(default_factory=set)
    desired_seen: int = 0
    installs: int = 0
    busy: bool = False


@dataclass
class SimStats:
    connected: int = 0
    telemetry: int = 0
    events: int = 0
    reported: int = 0
    desired: int = 0
    downloads: int = 0
    download_bytes: int = 0
    download_failures: int = 0
    installs: int = 0
    refused: int = 0
    commands: int = 0
    invalid: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Simulator:
    """The devices, their connections and the loop thread."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.address = BrokerAddress.parse(config.broker)
        self.stats = SimStats()
        self.devices: dict[str, SimDevice] = {}
        self._random = random.Random(config.seed)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._dirty: set[SimDevice] = set()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, config.download_workers), thread_name_prefix="sim-download"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- public API (any thread) ---

    def device_ids(self) -> list[str]:
        return [f"{self.config.prefix}-{i:04d}" for i in range(self.config.devices)]

    def start(self, *, timeout: float = 60.0) -> None:
        """Connect every device; return once those meant to be online are subscribed."""
        self._thread = threading.Thread(target=self._loop, name="edgekit-sim", daemon=True)
        self._thread.start()
        ids = self.device_ids()
        self.add_devices(ids)
        self.wait(
            lambda: (
                len(self.devices) >= len(ids)
                and all(d.subscribed for d in list(self.devices.values()) if d.wanted_online)
            ),
            timeout=timeout,
            what="simulated devices to connect",
        )

    def stop(self) -> None:
        """Disconnect cleanly (``offline``/``shutdown``), as a stopping agent does."""
        if self._thread is None:
            return
        done = threading.Event()

        def shutdown() -> None:
            for dev in self.devices.values():
                if dev.online:
                    self._publish(
                        dev,
                        Status(
                            device=dev.device,
                            state=StatusState.OFFLINE,
                            reason="shutdown",
                            agent_version=_AGENT_VERSION,
                        ),
                    )
            self._flush_writes()
            for dev in self.devices.values():
                if dev.online:
                    with contextlib.suppress(Exception):
                        dev.client.disconnect()
            self._flush_writes()
            done.set()

        self.call(shutdown)
        done.wait(10)
        self._stop.set()
        self._wake()
        self._thread.join(10)
        self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                sock = dev.client.socket()
                if sock is not None:
                    sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop thread."""
        self._inbox.put(action)
        self._wake()

    def add_devices(self, ids: Iterable[str]) -> None:
        """Devices that join the fleet now (the first start, or later joiners)."""
        wanted = list(ids)

        def add() -> None:
            for device in wanted:
                self._add(device)

        self.call(add)

    def go_offline(self, device: str) -> None:
        """Drop the connection without a clean stop: the broker publishes the last will."""
        self.call(lambda: self._go_offline(self.devices[device]))

    def go_online(self, device: str) -> None:
        self.call(lambda: self._go_online(self.devices[device]))

    def snapshot(self, device: str) -> dict[str, Any]:
        """A copy of a device's state, read on the loop thread."""
        result: dict[str, Any] = {}
        done = threading.Event()

        def read() -> None:
            dev = self.devices[device]
            result.update(
                online=dev.online,
                current=None if dev.current is None else (dev.current.name, dev.current.version),
                previous=None
                if dev.previous is None
                else (dev.previous.name, dev.previous.version),
                floor=dev.floor,
                installs=dev.installs,
                desired_seen=dev.desired_seen,
                last_update=None if dev.last_update is None else dev.last_update.to_dict(),
            )
            done.set()

        self.call(read)
        if not done.wait(10):
            raise TimeoutError("the simulator's loop did not answer")
        return result

    def wait(self, predicate: Callable[[], Any], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    # --- the loop thread ---

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), action))

    def _loop(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            timeout = 0.5
            if self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
            try:
                ready = self._selector.select(timeout)
            except OSError:
                ready = []
            for key, mask in ready:
                dev = key.data
                if dev is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._guard(dev, mask)
            while True:
                try:
                    action = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._run(action)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, action = heapq.heappop(self._timers)
                self._run(action)
            if now - last_misc >= 1.0:
                last_misc = now
                for dev in list(self.devices.values()):
                    if dev.client.socket() is not None:
                        self._run(dev.client.loop_misc)
            self._flush_writes()

    def _run(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:
            log.exception("simulator action failed")

    def _guard(self, dev: SimDevice, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                dev.client.loop_read()
            if mask & selectors.EVENT_WRITE:
                dev.client.loop_write()
        except Exception:
            log.exception("simulated device %s: socket error", dev.device)

    def _flush_writes(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for dev in dirty:
            sock = dev.client.socket()
            if sock is None:
                continue
            with contextlib.suppress(Exception):
                dev.client.loop_write()
            if dev.client.want_write():
                self._watch(dev, write=True)

    def _watch(self, dev: SimDevice, *, write: bool) -> None:
        sock = dev.client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.modify(sock, events, dev)
        except KeyError:
            with contextlib.suppress(ValueError, OSError):
                self._selector.register(sock, events, dev)
        except (ValueError, OSError):
            pass

    # --- devices ---

    def _add(self, device: str) -> None:
        if device in self.devices:
            return
        config = self.config
        topics = Topics(config.fleet, device)
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edgekit-{config.fleet}-{device}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.suppress_exceptions = True
        client.max_inflight_messages_set(20)
        dev = SimDevice(device=device, topics=topics, client=client)
        if config.initial_version is not None:
            dev.current = ModelRef(
                name=config.model,
                version=config.initial_version,
                sha256=_model_sha(config.model, config.initial_version),
            )
            dev.floor = config.initial_version
        dev.wanted_online = device not in config.offline
        # No outbox survives a simulator run, so counters start from the clock: they keep
        # increasing across runs, as an agent's persisted counter does, and the controller
        # (which orders a device's messages by seq) does not take a new run for old news.
        dev.seq = time.time_ns() // 1_000_000
        client.on_connect = lambda _c, _u, _f, rc, _p: self._on_connect(dev, rc)
        client.on_disconnect = lambda *_a: self._on_disconnect(dev)
        client.on_subscribe = lambda *_a: self._on_subscribe(dev)
        client.on_message = lambda _c, _u, msg: self._on_message(dev, msg)
        client.on_socket_open = lambda _c, _u, sock: self._watch(dev, write=False)
        client.on_socket_close = lambda _c, _u, sock: self._unwatch(sock)
        client.on_socket_register_write = lambda _c, _u, _s: self._dirty.add(dev)
        client.on_socket_unregister_write = lambda _c, _u, _s: self._watch(dev, write=False)
        self.devices[device] = dev
        self._schedule(
            self._random.uniform(0, config.interval_s), lambda: self._telemetry_tick(dev)
        )
        if dev.wanted_online:
            self._connect(dev)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _connect(self, dev: SimDevice) -> None:
        # As the agent does: the last will is composed for each connection, with the next seq
        # (older than the online status that follows it, which the controller allows for).
        dev.seq += 1
        dev.client.will_set(
            dev.topics.status,
            Status(
                device=dev.device,
                seq=dev.seq,
                state=StatusState.OFFLINE,
                reason="connection-lost",
                agent_version=_AGENT_VERSION,
            ).to_json(),
            qos=1,
            retain=True,
        )
        try:
            dev.client.connect(
                self.address.host,
                self.address.port,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=connect_properties(self.config.session_expiry_s),
            )
        except OSError as exc:
            log.warning("simulated device %s cannot connect: %s; retrying", dev.device, exc)
            self._schedule(1.0 + self._random.random(), lambda: self._retry_connect(dev))

    def _retry_connect(self, dev: SimDevice) -> None:
        if dev.wanted_online and dev.client.socket() is None:
            self._connect(dev)

    def _go_offline(self, dev: SimDevice) -> None:
        dev.wanted_online = False
        if dev.client.socket() is None:
            return
        # MQTT 5 reason 0x04, "disconnect with will message": the broker publishes the will,
        # as if the device had lost power.
        dev.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        self._dirty.add(dev)

    def _go_online(self, dev: SimDevice) -> None:
        dev.wanted_online = True
        if dev.client.socket() is None:
            self._connect(dev)

    def _on_connect(self, dev: SimDevice, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("simulated device %s refused: %s", dev.device, reason)
            return
        dev.online = True
        self.stats.connected += 1
        dev.client.subscribe([(dev.topics.desired, 1), (dev.topics.cmd, 1)])
        self._publish(
            dev,
            Status(
                device=dev.device,
                state=StatusState.ONLINE,
                agent_version=_AGENT_VERSION,
                extra=self._labels(),
            ),
        )
        self._report(dev)

    def _labels(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.config.groups:
            extra["groups"] = list(self.config.groups)
        if self.config.tags:
            extra["tags"] = dict(self.config.tags)
        return extra

    def _on_subscribe(self, dev: SimDevice) -> None:
        dev.subscribed = True

    def _on_disconnect(self, dev: SimDevice) -> None:
        dev.online = False
        dev.subscribed = False
        if dev.wanted_online and not self._stop.is_set():
            self._schedule(1.0 + self._random.random(), lambda: self._retry_connect(dev))

    def _publish(self, dev: SimDevice, message: Message) -> None:
        if not dev.online:
            return  # a real agent keeps it in its outbox; the simulator forgets it
        dev.seq += 1
        kind = message.KIND
        dev.client.publish(
            dev.topics.for_kind(kind),
            message.with_seq(dev.seq).to_json(),
            qos=1,
            retain=kind.retained,
        )
        self._dirty.add(dev)

    def _event(self, dev: SimDevice, event: EventType | str, **fields: Any) -> None:
        name = event.value if isinstance(event, EventType) else event
        self._publish(dev, Event(device=dev.device, event=name, **fields))
        self.stats.events += 1

    def _report(self, dev: SimDevice) -> None:
        self._publish(
            dev,
            Reported(
                device=dev.device,
                current=dev.current,
                previous=dev.previous,
                active_slot="a",
                slots={"a": "committed", "b": "previous" if dev.previous else "empty"},
                update_state=dev.update_state,
                last_update=dev.last_update,
                agent_version=_AGENT_VERSION,
            ),
        )
        self.stats.reported += 1

    # --- telemetry ---

    def _telemetry_tick(self, dev: SimDevice) -> None:
        self._schedule(self.config.interval_s, lambda: self._telemetry_tick(dev))
        now = time.time()
        elapsed = max(0.0, now - dev.last_tick)
        dev.last_tick = now
        version = dev.current.version if dev.current else 0
        served = round(self.config.inference_rate * elapsed)
        dev.count += served
        dev.errors += served * self.config.error_rate.get(version, 0.0)
        if not dev.online:
            return
        p95 = self.config.latency_ms.get(version, self.config.base_latency_ms)
        jitter = 1.0 + self._random.uniform(-0.05, 0.05)
        psi = self.config.drift_psi.get(version, 0.02)
        telemetry = Telemetry(
            device=dev.device,
            interval_s=self.config.interval_s,
            uptime_s=now - dev.started,
            inference=InferenceStats(
                count=dev.count,
                errors=int(dev.errors),
                rejected=0,
                p50_ms=round(p95 * 0.5 * jitter, 3) if dev.count else None,
                p95_ms=round(p95 * jitter, 3) if dev.count else None,
                p99_ms=round(p95 * 1.4 * jitter, 3) if dev.count else None,
            ),
            model=dev.current,
            active_slot="a",
            slots={"a": "committed"},
            system=SystemStats(
                cpu_percent=round(self._random.uniform(5, 40), 1),
                mem_total_bytes=4 * 1024**3,
                mem_available_bytes=3 * 1024**3,
                rss_bytes=80 * 1024**2,
                disk_free_bytes=20 * 1024**3,
                temperature_c=round(self._random.uniform(40, 60), 1),
                uptime_s=now - dev.started + 1000.0,
            ),
            drift=Drift(
                samples=500,
                input_psi={"feature_0": psi},
                output_psi=psi / 2,
                output_distribution={"ok": 0.9, "fault": 0.1},
                baseline_distribution={"ok": 0.9, "fault": 0.1},
            ),
            self_test=dev.self_test,
        )
        self._publish(dev, telemetry)
        self.stats.telemetry += 1

    # --- desired state and commands ---

    def _on_message(self, dev: SimDevice, message: Any) -> None:
        try:
            parts = parse_topic(message.topic)
        except ProtocolError:
            self.stats.invalid += 1
            return
        payload = bytes(message.payload)
        if not payload:
            return  # a withdrawn desired state: keep running what runs
        try:
            if parts.kind.value == "desired":
                self._on_desired(dev, Desired.from_json(payload))
            elif parts.kind.value == "cmd":
                self._on_command(dev, Command.from_json(payload))
        except ProtocolError as exc:
            self.stats.invalid += 1
            self._event(
                dev,
                EventType.INVALID_MESSAGE,
                severity=Severity.WARNING,
                message=exc.message[:200],
                reason="protocol",
            )

    def _on_desired(self, dev: SimDevice, desired: Desired) -> None:
        self.stats.desired += 1
        dev.desired_seen += 1
        if desired.msg_id in dev.seen_msg_ids or dev.busy:
            return
        dev.seen_msg_ids.add(desired.msg_id)
        if dev.last_update is not None and dev.last_update.rollout_id == desired.rollout_id:
            return  # acted on this rollout already
        if dev.current is not None and (dev.current.name, dev.current.version) == (
            desired.bundle,
            desired.version,
        ):
            return  # already runs it: nothing to do
        ref = {"ref": desired.msg_id, "rollout_id": desired.rollout_id}
        self._event(
            dev, EventType.UPDATE_RECEIVED, message=f"{desired.bundle} {desired.version}", **ref
        )
        if desired.version <= dev.floor:
            self._finish(
                dev, desired, UpdateOutcome.REJECTED, "rollback", EventType.UPDATE_REJECTED
            )
            return
        dev.busy = True
        dev.update_state = UpdateState.DOWNLOADING.value
        self._event(dev, EventType.UPDATE_DOWNLOADING, **ref)
        self._report(dev)
        future = self._pool.submit(self._download, desired)

        def done(_future: Any) -> None:
            self.call(lambda: self._downloaded(dev, desired, _future.result()))

        future.add_done_callback(done)

    def _download(self, desired: Desired) -> str | None:
        """Runs in the pool: fetch and check the bundle; ``None`` or a failure reason."""
        if not self.config.download:
            time.sleep(self.config.install_s)
            return None
        progress = _Progress()
        for attempt in range(self.config.download_retries + 1):
            if attempt:
                delay = self.config.download_backoff_s * 2 ** (attempt - 1)
                time.sleep(delay * random.uniform(0.5, 1.0))
            try:
                self._fetch(desired, progress)
                break
            except _TooLarge:
                return "too-large"
            except (OSError, http.client.HTTPException):
                continue
            except Exception:  # a device reports a failure, it never hangs
                log.exception("simulated download failed")
                return "download-failed"
        else:
            with self._lock:
                self.stats.download_failures += 1
            return "download-failed"
        with self._lock:
            self.stats.downloads += 1
            self.stats.download_bytes += progress.size
        if progress.size != desired.size or progress.digest.hexdigest() != desired.sha256:
            return "hash-mismatch"
        time.sleep(self.config.install_s)
        return None

    @staticmethod
    def _fetch(desired: Desired, progress: _Progress) -> None:
        """Hash the rest of the bundle into ``progress``; resume with ``Range`` after a
        broken transfer (the bytes are hashed as they arrive, never held whole)."""
        request = urllib.request.Request(desired.url)
        if progress.size:
            request.add_header("Range", f"bytes={progress.size}-")
        with urllib.request.urlopen(request, timeout=30) as response:
            if progress.size and (
                response.status != 206
                or not str(response.headers.get("Content-Range", "")).startswith(
                    f"bytes {progress.size}-"
                )
            ):
                progress.reset()  # the server ignored the range: start over
            while chunk := response.read(_CHUNK):
                progress.size += len(chunk)
                if progress.size > desired.size:
                    raise _TooLarge
                progress.digest.update(chunk)
        if progress.size < desired.size:
            # http.client's read(n) returns short, without an error, when the server dies
            # mid-body: that is a broken transfer to resume, not a wrong file.
            raise ConnectionError(f"transfer ended at {progress.size} of {desired.size} bytes")

    def _downloaded(self, dev: SimDevice, desired: Desired, failure: str | None) -> None:
        dev.busy = False
        ref = {"ref": desired.msg_id, "rollout_id": desired.rollout_id}
        if failure is not None:
            self._finish(dev, desired, UpdateOutcome.FAILED, failure, EventType.UPDATE_FAILED)
            return
        self._event(dev, EventType.UPDATE_DOWNLOADED, **ref)
        self._event(dev, EventType.UPDATE_VERIFIED, **ref)
        golden_ok = desired.version not in self.config.fail_golden
        dev.self_test = SelfTest(
            ok=golden_ok,
            ts=time.time(),
            detail="golden samples within tolerance"
            if golden_ok
            else "golden samples outside tolerance",
        )
        if not golden_ok:
            self.stats.refused += 1
            self._finish(
                dev, desired, UpdateOutcome.FAILED, "self-test-failed", EventType.UPDATE_FAILED
            )
            return
        self._event(dev, EventType.UPDATE_INSTALLING, **ref)
        dev.previous = dev.current
        dev.current = ModelRef(
            name=desired.bundle,
            version=desired.version,
            sha256=_model_sha(desired.bundle, desired.version),
        )
        dev.floor = max(dev.floor, desired.version)
        dev.installs += 1
        self.stats.installs += 1
        self._finish(dev, desired, UpdateOutcome.COMMITTED, None, EventType.UPDATE_COMMITTED)

    def _finish(
        self,
        dev: SimDevice,
        desired: Desired,
        outcome: UpdateOutcome,
        reason: str | None,
        event: EventType,
    ) -> None:
        dev.update_state = UpdateState.IDLE.value
        dev.last_update = UpdateResult(
            rollout_id=desired.rollout_id,
            outcome=outcome,
            bundle=desired.bundle,
            version=desired.version,
            reason=reason,
            ts=time.time(),
        )
        failed = outcome is not UpdateOutcome.COMMITTED
        self._event(
            dev,
            event,
            severity=Severity.ERROR if failed else Severity.INFO,
            message=f"{desired.bundle} {desired.version}: {outcome.value}",
            reason=reason,
            ref=desired.msg_id,
            rollout_id=desired.rollout_id,
        )
        self._report(dev)

    def _on_command(self, dev: SimDevice, command: Command) -> None:
        self.stats.commands += 1
        if command.msg_id in dev.seen_msg_ids:
            return
        dev.seen_msg_ids.add(command.msg_id)
        ref = {"ref": command.msg_id, "data": {"command": command.command}}
        if command.expired():
            self._event(dev, EventType.COMMAND_REJECTED, reason="expired", **ref)
            return
        if command.known is not CommandName.ROLLBACK:
            self._event(dev, EventType.COMMAND_REJECTED, reason="unknown-command", **ref)
            return
        if dev.previous is None:
            self._event(dev, EventType.COMMAND_FAILED, reason="nothing-to-roll-back", **ref)
            return
        self._event(dev, EventType.COMMAND_ACCEPTED, **ref)
        rolled_back = dev.current
        dev.current, dev.previous = dev.previous, rolled_back
        rollout = command.args.get("rollout_id")
        dev.last_update = UpdateResult(
            rollout_id=rollout if isinstance(rollout, str) and rollout else "manual",
            outcome=UpdateOutcome.ROLLED_BACK,
            bundle=None if rolled_back is None else rolled_back.name,
            version=None if rolled_back is None else rolled_back.version,
            reason="commanded",
            ts=time.time(),
        )
        self._event(
            dev,
            EventType.UPDATE_ROLLED_BACK,
            reason="commanded",
            ref=command.msg_id,
            rollout_id=dev.last_update.rollout_id,
        )
        self._event(dev, EventType.COMMAND_COMPLETED, **ref)
        self._report(dev)
