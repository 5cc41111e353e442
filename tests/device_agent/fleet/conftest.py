"""Fixtures for the fleet-link tests: a real mosquitto, mosquitto_sub/pub as the controller side,
real agents with real signed bundles (the ``kit`` fixture of tests/device_agent/conftest.py),
bundles that carry a baseline.json computed by the real converter, and an HTTP server that
serves bundles for ``desired`` to point at.

Fixture names start with ``fleet_`` where they could collide with the MQTT tests' own; plain
helpers live in fleet_support.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mosquitto import Broker, Subscriber, require_client, require_mosquitto

sys.path.append(str(Path(__file__).parent))

from fleet_support import (
    DEVICE,
    FLEET,
    BundleServer,
    Device,
    baseline_samples,
)

from edgekit.protocol import Topics


@pytest.fixture(scope="session")
def fleet_mosquitto_bin() -> str:
    return require_mosquitto()


@pytest.fixture
def fleet_broker(tmp_path: Path, fleet_mosquitto_bin: str) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker", binary=fleet_mosquitto_bin)
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def fleet_subscriber(fleet_broker: Broker) -> Iterator[Callable[..., Subscriber]]:
    binary = require_client("mosquitto_sub")
    made: list[Subscriber] = []

    def make(**options: Any) -> Subscriber:
        subscriber = Subscriber(binary, fleet_broker, **options)
        made.append(subscriber)
        return subscriber

    yield make
    for subscriber in made:
        subscriber.close()


@pytest.fixture
def fleet_pub(fleet_broker: Broker) -> Callable[..., None]:
    """Publish as the controller would, with mosquitto_pub (independent of our code)."""
    binary = require_client("mosquitto_pub")

    def publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        args = [binary, "-h", fleet_broker.host, "-p", str(fleet_broker.port), "-q", "1"]
        args += ["-t", topic, "-s" if payload else "-n"]
        if retain:
            args.append("-r")
        subprocess.run(args, input=payload, check=True, timeout=10)

    return publish


@pytest.fixture
def topics() -> Topics:
    return Topics(FLEET, DEVICE)


# --- bundles with a baseline ----------------------------------------------------------------


@pytest.fixture(scope="session")
def fleet_baselines(tmp_path_factory: pytest.TempPathFactory, kit_models: Any) -> dict[str, Path]:
    """baseline.json per model, computed by converters/baseline.py on standard normal data."""
    from converters.baseline import compute_baseline

    root = tmp_path_factory.mktemp("baselines")
    data = baseline_samples()
    out: dict[str, Path] = {}
    for name in ("m1", "m2", "m3"):
        stats = compute_baseline(
            kit_models.files[name], lambda: iter({"input": row[None, :]} for row in data)
        )
        path = root / f"{name}-baseline.json"
        path.write_text(json.dumps(stats.to_dict()))
        out[name] = path
    return out


@pytest.fixture
def fleet_kit(kit: Any, fleet_baselines: dict[str, Path]) -> Any:
    """``kit`` whose bundles carry baseline.json (``kit.bundle(version, model)``)."""
    plain = kit.bundle

    def bundle(version: int, model: str = "m1", **options: Any) -> Path:
        options.setdefault("baseline", fleet_baselines[model])
        return plain(version, model, **options)

    kit.bundle = bundle
    return kit


# --- agents with a fleet link ---------------------------------------------------------------


@pytest.fixture
def fleet_device(fleet_kit: Any, fleet_broker: Broker) -> Iterator[Device]:
    device = Device(fleet_kit, fleet_broker)
    yield device
    device.stop()


# --- serving bundles over HTTP --------------------------------------------------------------


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[BundleServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = BundleServer(root)
    yield server
    server.close()
