"""Fixtures for the serial tests: a pty-backed device simulator and a bridge factory.

The simulator module is loaded by path (the suite runs with ``--import-mode=importlib``, so
test-tree modules are not importable by name) and reached through fixtures only.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.serial import SerialBridge


def _load_simulator() -> Any:
    name = "edgekit_tests_serial_simulator"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("simulator.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


simulator_module = _load_simulator()

WINDOW = 4
CHANNELS = 3
CLASSES = 5


class LinearModel:
    """A fixed linear layer + argmax: real numpy arithmetic whose answers the test can check."""

    def __init__(self, window: int = WINDOW, channels: int = CHANNELS, classes: int = CLASSES):
        rng = np.random.default_rng(1234)
        self.weights = rng.normal(size=(window * channels, classes)).astype(np.float32)
        self.calls = 0

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"logits": (x.reshape(1, -1) @ self.weights).astype(np.float32)}

    def expected(self, rows: np.ndarray) -> tuple[int, float]:
        logits = self(np.asarray(rows, dtype=np.float32))["logits"][0]
        self.calls -= 1
        index = int(np.argmax(logits))
        return index, float(logits[index])


@pytest.fixture
def wait_until() -> Callable[..., None]:
    return simulator_module.wait_until  # type: ignore[no-any-return]


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "ttyEDGE0"


@pytest.fixture
def device(link: Path) -> Iterator[Any]:
    sim = simulator_module.DeviceSimulator(link, channels=CHANNELS)
    sim.plug()
    yield sim
    sim.close()


@pytest.fixture
def model() -> LinearModel:
    return LinearModel()


@pytest.fixture
def make_bridge(link: Path, model: LinearModel) -> Iterator[Callable[..., SerialBridge]]:
    """Build and start bridges on the simulator's link; every one is stopped at teardown."""
    bridges: list[SerialBridge] = []

    def make(**options: Any) -> SerialBridge:
        settings: dict[str, Any] = {
            "predict": model,
            "window": WINDOW,
            "hop": 2,
            "channels": CHANNELS,
            "reconnect_interval": 0.02,
            "max_reconnect_interval": 0.1,
            "read_timeout": 0.02,
        }
        settings.update(options)
        port = str(settings.pop("port", link))
        bridge = SerialBridge(port, **settings)
        bridges.append(bridge)
        bridge.start()
        return bridge

    yield make
    for bridge in bridges:
        bridge.stop(timeout=5.0)
        assert not bridge.running, "bridge thread did not stop"
