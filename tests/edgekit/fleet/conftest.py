"""Fixtures for the fleet controller tests: mosquitto, PostgreSQL, bundles, the controller as a
real process, and simulated devices.

The end-to-end tests run the controller exactly as an operator does (``python -m edgekit
fleet serve ...`` in a subprocess, so it can be SIGKILLed), a real mosquitto broker, and
devices from :mod:`edgekit.fleet.simulate` that speak the real protocol. They observe the
controller only from outside: its REST API and what ``mosquitto_sub`` sees on the broker.

``db_url`` is parametrized over SQLite and PostgreSQL; the PostgreSQL variant is skipped,
naming the Debian package, only when the server binaries are missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import db_fixtures
from support.mosquitto import (
    Broker,
    Subscriber,
    free_port,
    require_client,
    require_mosquitto,
    wait_for,
)

from edgekit.bundle import build_bundle
from edgekit.fleet.client import FleetClient
from edgekit.fleet.errors import RemoteError
from edgekit.fleet.simulate import SimConfig, Simulator
from edgekit.keys import SigningKey
from edgekit.protocol import Desired

FLEET = "plant-1"
TOKEN = "test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[3]


# --- infrastructure --------------------------------------------------------------------------


# The shared database fixtures: each test that takes db_url runs on SQLite and PostgreSQL.
pg_server = db_fixtures.pg_server
db_url = db_fixtures.db_url


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    return require_mosquitto()


@pytest.fixture
def broker(tmp_path: Path, mosquitto_bin: str) -> Iterator[Broker]:
    # Many simulated devices queue messages for the controller while it restarts.
    broker = Broker(
        tmp_path / "broker",
        binary=mosquitto_bin,
        options=["max_queued_messages 100000"],
    )
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def desired_watch(broker: Broker) -> Iterator[Subscriber]:
    """``mosquitto_sub`` on every desired topic: what devices were sent, seen from outside."""
    binary = require_client("mosquitto_sub")
    watcher = Subscriber(binary, broker, topic="edgekit/v1/+/+/desired")
    yield watcher
    watcher.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# --- bundles ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, signers: dict[str, SigningKey]
) -> dict[int, Path]:
    """Signed bundles ``tiny`` versions 2, 3 and 4 (the simulated devices start on 1)."""
    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for version in (2, 3, 4):
        path = out / f"tiny-{version}.ekb"
        build_bundle(
            model_file,
            path,
            name="tiny",
            version=version,
            keys=[signers["A"]],
            created=datetime.now(timezone.utc) - timedelta(minutes=1),
        )
        made[version] = path
    return made


# --- the controller process ------------------------------------------------------------------


class ControllerProcess:
    """``python -m edgekit fleet serve`` with a given database, restartable and killable."""

    def __init__(
        self, *, broker: Broker, db_url: str, workdir: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.broker = broker
        self.db_url = db_url
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.log_path = workdir / "controller.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = FleetClient(self.url, token=TOKEN, user="pytest")
        self.starts = 0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "edgekit",
            "fleet",
            "serve",
            "--broker",
            f"mqtt://{self.broker.host}:{self.broker.port}",
            "--db",
            self.db_url,
            "--artifacts",
            str(self.workdir / "artifacts"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--token",
            TOKEN,
            "--tick",
            "0.2s",
            "--history-interval",
            "1s",
            *self.extra,
        ]

    def start(self, *, timeout: float = 30.0) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        log.close()

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the controller exited: {self.log()}")
            try:
                return bool(self.client.stats()["ready"])
            except RemoteError:
                return False

        wait_for(ready, timeout=timeout, what=f"the controller to be ready\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a crash or a power cut of the host."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture
def start_controller(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    started: list[ControllerProcess] = []

    def start(db_url: str, *extra: str) -> ControllerProcess:
        controller = ControllerProcess(
            broker=broker,
            db_url=db_url,
            workdir=tmp_path / f"controller-{len(started)}",
            extra=extra,
        )
        started.append(controller)
        controller.start()
        return controller

    yield start
    for controller in started:
        controller.stop()


# --- simulated devices -----------------------------------------------------------------------


@pytest.fixture
def simulate(broker: Broker) -> Iterator[Callable[..., Simulator]]:
    """Start simulated devices on the test's broker; all stop at teardown."""
    running: list[Simulator] = []

    def start(**options: Any) -> Simulator:
        config: dict[str, Any] = {
            "broker": f"mqtt://{broker.host}:{broker.port}",
            "fleet": FLEET,
            "devices": 12,
            "interval_s": 0.3,
            "inference_rate": 100.0,
            "groups": ("cameras",),
            "install_s": 0.05,
        }
        config.update(options)
        simulator = Simulator(SimConfig(**config))
        running.append(simulator)
        simulator.start(timeout=30)
        return simulator

    yield start
    for simulator in running:
        simulator.stop()


# --- helpers for the tests -------------------------------------------------------------------


def wait_state(
    client: FleetClient, rollout_id: str, states: set[str], *, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the REST API until the rollout is in one of ``states``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        data = client.rollout(rollout_id)
        step = f"{data['state']}@{data['wave']} {data['totals']} {data['reason'] or ''}"
        if not seen or seen[-1] != step:
            seen.append(step)
        if data["state"] in states:
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout {rollout_id} never reached {states}: {seen}")
        time.sleep(0.1)


def wait_devices(client: FleetClient, count: int, *, timeout: float = 20.0) -> None:
    wait_for(
        lambda: sum(d["online"] for d in client.devices(fleet=FLEET)) >= count,
        timeout=timeout,
        what=f"{count} devices online in the registry",
    )


def _payloads(watch: Subscriber) -> list[tuple[str, bytes]]:
    """(device, payload) of every desired message seen; mosquitto_sub prints an empty payload
    (a withdrawn desired state) as "(null)"."""
    return [
        (topic.split("/")[3], b"" if payload == b"(null)" else payload)
        for topic, payload in watch.raw()
    ]


def desired_by_device(watch: Subscriber) -> dict[str, list[dict[str, Any]]]:
    """Every non-empty desired message mosquitto_sub saw, per device, in arrival order,
    validated by the protocol module."""
    seen: dict[str, list[dict[str, Any]]] = {}
    for device, payload in _payloads(watch):
        if payload:
            seen.setdefault(device, []).append(Desired.from_json(payload).to_dict())
    return seen


def last_payloads(watch: Subscriber) -> dict[str, bytes]:
    """The last desired payload per device (b"" for a withdrawn state)."""
    return dict(_payloads(watch))


def rollout_options(artifact: str, **overrides: Any) -> dict[str, Any]:
    """A quick rollout spec for tests: short waves, small inference minimum."""
    spec: dict[str, Any] = {
        "fleet": FLEET,
        "artifact": artifact,
        "target": "group=cameras",
        "waves": "25%,50%,100%",
        "min_wave_time": "0.5s",
        "success_threshold": "95%",
        "max_failures": "5%",
        "gates": ["p95_latency_ms<=30", "error_rate<=0.01", "drift_psi<=0.2", "golden_pass==1"],
        "min_inferences": 20,
        "device_timeout": "20s",
        "retries": 0,
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (conftest is not importable under importlib)."""
    return SimpleNamespace(
        FLEET=FLEET,
        TOKEN=TOKEN,
        wait_state=wait_state,
        wait_devices=wait_devices,
        desired_by_device=desired_by_device,
        last_payloads=last_payloads,
        rollout_options=rollout_options,
        wait_for=wait_for,
    )
