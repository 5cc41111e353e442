"""Helpers shared by the fleet-link tests (the fixtures that use them are in conftest.py).

A module of its own, on sys.path through conftest.py, because tests cannot import a conftest
under ``--import-mode=importlib``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from support.mosquitto import Broker, Subscriber, wait_for

from device_agent.agent import Agent
from device_agent.config import MqttConfig
from device_agent.fleet_link import FleetLink
from edgekit.protocol import Desired, Event, Message, MessageKind

FLEET = "plant-1"
DEVICE = "cam-7"
FEATURES = 16

#: LinkConfig overrides: reconnect within a fraction of a second in tests.
FAST_LINK = {
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.3,
    "poll_interval_s": 0.02,
    "connect_timeout_s": 3.0,
    "keepalive_s": 5,
}


def baseline_samples(count: int = 256, *, seed: int = 5, shift: float = 0.0) -> np.ndarray:
    """The 'validation data' the baseline describes: standard normal features."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, FEATURES)) + shift).astype(np.float32)


def mqtt_config(broker: Broker, **options: Any) -> MqttConfig:
    settings: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "fleet": FLEET,
        "device": DEVICE,
        "telemetry_interval_s": 0.2,
        "drift_min_requests": 5,
    }
    settings.update(options)
    return MqttConfig(**settings)


class Device:
    """One agent and its fleet link, stopped (link first) at teardown."""

    def __init__(self, kit: Any, broker: Broker) -> None:
        self.kit = kit
        self.broker = broker
        self.agent: Agent | None = None
        self.fleet: FleetLink | None = None

    def start(
        self, *, health: dict[str, Any] | None = None, run: bool = True, **mqtt: Any
    ) -> FleetLink:
        """Open the agent and its fleet link (started unless ``run`` is false)."""
        config = replace(self.kit.config(**(health or {})), mqtt=mqtt_config(self.broker, **mqtt))
        self.agent = Agent(config=config)
        self.fleet = FleetLink(self.agent, config.mqtt, link_options=FAST_LINK, tick_s=0.1, seed=1)
        if run:
            self.fleet.start()
        return self.fleet

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class BundleServer:
    """``http.server`` serving one directory on 127.0.0.1; counts GET requests per path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def desired_for(
    server: BundleServer, bundle: Path, *, version: int, rollout: str, name: str = "tiny"
) -> Desired:
    """Publish ``bundle`` on ``server`` and describe it as the controller would."""
    target = server.root / bundle.name
    target.write_bytes(bundle.read_bytes())
    data = target.read_bytes()
    return Desired(
        device=DEVICE,
        seq=1,
        bundle=name,
        version=version,
        url=server.url(bundle.name),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        rollout_id=rollout,
    )


# --- reading what the broker saw ------------------------------------------------------------


def events(subscriber: Subscriber, name: str | None = None) -> list[Event]:
    found = [m for _, m in subscriber.messages(MessageKind.EVENTS) if isinstance(m, Event)]
    return [e for e in found if name is None or e.event == name]


def latest(subscriber: Subscriber, kind: MessageKind) -> Message | None:
    messages = subscriber.messages(kind)
    return messages[-1][1] if messages else None


def wait_event(subscriber: Subscriber, name: str, *, count: int = 1, timeout: float = 20) -> Event:
    found = wait_for(
        lambda: len(events(subscriber, name)) >= count and events(subscriber, name),
        timeout=timeout,
        what=f"event {name}",
    )
    return found[count - 1]
