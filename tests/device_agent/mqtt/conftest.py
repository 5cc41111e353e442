"""Fixtures for the MQTT tests: a real mosquitto broker, an independent subscriber, links.

The broker is Debian's mosquitto (``apt-get install mosquitto mosquitto-clients``), started per
test on a free loopback port with its own config; the independent observer is
``mosquitto_sub``, not our own code, so what the tests see is what any MQTT client would see.
Tests that need either binary are skipped, with the package to install, only when it is
missing. Every wait has a timeout.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mosquitto import Broker, Subscriber, require_client, require_mosquitto

from device_agent.mqtt_link import LinkConfig, MqttLink, overflow_reporter
from device_agent.outbox import Outbox
from edgekit.protocol import Topics

FLEET = "plant-1"
DEVICE = "cam-7"


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    return require_mosquitto()


@pytest.fixture
def make_broker(tmp_path: Path, mosquitto_bin: str) -> Iterator[Callable[..., Broker]]:
    """Create brokers (not started) in tmp_path; all are killed at teardown."""
    brokers: list[Broker] = []

    def make(**options: Any) -> Broker:
        broker = Broker(tmp_path / f"broker-{len(brokers)}", binary=mosquitto_bin, **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    """A running broker: anonymous, persistent (sessions survive stop/start)."""
    started = make_broker()
    started.start()
    return started


@pytest.fixture
def make_subscriber(broker: Broker) -> Iterator[Callable[..., Subscriber]]:
    binary = require_client("mosquitto_sub")
    subscribers: list[Subscriber] = []

    def make(**options: Any) -> Subscriber:
        target = options.pop("on", broker)
        subscriber = Subscriber(binary, target, **options)
        subscribers.append(subscriber)
        return subscriber

    yield make
    for subscriber in subscribers:
        subscriber.close()


@pytest.fixture
def mosquitto_pub(broker: Broker) -> Callable[..., None]:
    """Publish one message with mosquitto_pub (the controller side, independent of our code)."""
    binary = require_client("mosquitto_pub")

    def publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        args = [binary, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic]
        args.append("-s" if payload else "-n")  # -s refuses empty input; -n sends nothing
        if retain:
            args.append("-r")
        subprocess.run(args, input=payload, check=True, timeout=10)

    return publish


@pytest.fixture
def topics() -> Topics:
    return Topics(FLEET, DEVICE)


@pytest.fixture
def make_link(tmp_path: Path, broker: Broker, topics: Topics) -> Iterator[Callable[..., MqttLink]]:
    """Build links (not started) with fast test timings; all are stopped at teardown."""
    links: list[MqttLink] = []
    outboxes: list[Outbox] = []

    def make(*, outbox: Outbox | None = None, **options: Any) -> MqttLink:
        if outbox is None:
            outbox = Outbox(
                tmp_path / f"outbox-{len(outboxes)}.db", overflow=overflow_reporter(topics)
            )
            outboxes.append(outbox)
        settings: dict[str, Any] = {
            "host": broker.host,
            "port": broker.port,
            "fleet": FLEET,
            "device": DEVICE,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.3,
            "poll_interval_s": 0.02,
            "connect_timeout_s": 3.0,
            "keepalive_s": 5,
            "agent_version": "0.0-test",
        }
        callbacks = {
            key: options.pop(key) for key in ("on_desired", "on_command") if key in options
        }
        settings.update(options)
        link = MqttLink(LinkConfig(**settings), outbox, **callbacks)
        links.append(link)
        return link

    yield make
    for link in links:
        link.stop(timeout=10)
    for outbox in outboxes:
        outbox.close()
