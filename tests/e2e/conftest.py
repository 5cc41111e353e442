"""Fixtures for the end-to-end tests: the whole fleet as real processes on one machine.

Nothing here is simulated. Each test gets, through :class:`edgekit.launcher.LocalFleet` (the
launcher ``./demo.sh`` uses too):

* a real mosquitto broker on a free loopback port;
* the real controller (``python -m edgekit fleet serve``) on SQLite or on PostgreSQL
  (``db_url`` is parametrized; the PostgreSQL variant is skipped, naming the Debian package,
  only when the server binaries are missing);
* three real agents (``python -m device_agent run --config agent.toml``), each with its own
  state directory, trust file, HTTP API on a free port and ``[mqtt]`` pointing at the broker,
  sideloaded with bundle v1 and answering predictions from a traffic thread throughout.

Bundles are built by the real signing code from small ONNX models: v1 and v2 with golden sets
computed from their own models, and a "broken" v3 whose ``golden.npz`` holds v2's outputs,
so the self-test on the devices fails. Every bundle carries a ``baseline.json`` from the
converter's own code, so the drift gate has data.

The tests observe from outside, the way an operator would: the REST API and the CLI, the
agents' HTTP APIs, ``edgekit-agent status``, their event logs, and ``mosquitto_sub``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from support import db_fixtures
from support.bundles import write_onnx_model
from support.mosquitto import Subscriber, require_client, require_mosquitto, wait_for

from device_agent.events import read_events
from edgekit.bundle import build_bundle
from edgekit.keys import generate_key
from edgekit.launcher import AgentProcess, AgentSettings, LocalFleet, watch_rollout
from edgekit.trust import TrustEnvelope, TrustPolicy

FLEET = "e2e"
FEATURES = 16
AGENTS = 3
#: Agents tuned for tests: telemetry twice a second, a health window of 10 inferences (half
#: a second of the test traffic), reconnects within a fraction of a second. Drift is scored
#: once a window holds 32 requests: one pass over the traffic's rows, which are the data
#: the baseline was computed on, so an unchanged model shows (almost) no drift.
AGENT_SETTINGS = AgentSettings(
    telemetry_interval_s=0.5,
    keepalive_s=5,
    health_min_inferences=10,
    health_max_seconds=10.0,
    drift_min_requests=32,
    reconnect_initial_s=0.1,
    reconnect_max_s=1.0,
)

#: ``edgekit rollout create`` options shared by the tests: one device per wave, a short
#: minimum wave time, every gate the issue names, nothing tolerated.
ROLLOUT_OPTIONS = (
    "--target", "all",
    "--waves", "30%,60%,100%",
    "--min-wave-time", "1s",
    "--success-threshold", "100%",
    "--max-failures", "0%",
    "--min-inferences", "10",
    "--gate", "golden_pass==1",
    "--gate", "error_rate<=0.01",
    "--gate", "p95_latency_ms<=250",
    "--gate", "drift_psi<=0.25",
    "--device-timeout", "60s",
    "--retries", "0",
    "--on-breach", "rollback",
)  # fmt: skip


# --- bundles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The signed bundles, the devices' trust file, and the inputs the traffic sends."""

    trust: Path
    bundles: dict[int, Path]
    rows: list[list[float]]


def _outputs(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# The shared database fixtures: each test that takes db_url runs on SQLite and PostgreSQL.
pg_server = db_fixtures.pg_server
db_url = db_fixtures.db_url


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    from converters.baseline import compute_baseline

    root = tmp_path_factory.mktemp("release")
    key = generate_key()
    trust = root / "trust.json"
    policy = TrustPolicy.create([("release", key.public)], threshold=1)
    trust.write_bytes(TrustEnvelope.unsigned(policy).to_bytes())
    rng = np.random.default_rng(7)
    data = rng.standard_normal((32, FEATURES)).astype(np.float32)
    golden_x = data[:4]
    models = {v: write_onnx_model(root / f"tiny-{v}.onnx", seed=v) for v in (1, 2, 3)}
    goldens = {}
    for version in (1, 2):
        path = root / f"golden-{version}.npz"
        np.savez(
            path,
            **{
                "input:input": golden_x,
                "output:probabilities": _outputs(models[version], golden_x),
                "atol:probabilities": np.float32(1e-5),
            },
        )
        goldens[version] = path
    goldens[3] = goldens[2]  # the broken release: v3's model shipped with v2's golden set
    bundles = {}
    for version, model in models.items():
        stats = compute_baseline(model, lambda: iter({"input": row[None, :]} for row in data))
        baseline = root / f"baseline-{version}.json"
        baseline.write_text(json.dumps(stats.to_dict()))
        bundles[version] = root / f"tiny-{version}.ekb"
        build_bundle(
            model,
            bundles[version],
            name="tiny",
            version=version,
            keys=[key],
            golden=goldens[version],
            baseline=baseline,
            created=datetime.now(timezone.utc) - timedelta(minutes=1),
        )
    return Release(trust=trust, bundles=bundles, rows=data.tolist())


# --- infrastructure --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    return require_mosquitto()


@pytest.fixture
def make_fleet(
    tmp_path: Path, db_url: str, mosquitto_bin: str, release: Release
) -> Iterator[Callable[..., LocalFleet]]:
    """``make_fleet(start=True, install=1, traffic=True)``: broker, controller and three
    agents sideloaded with bundle ``install``, all stopped at teardown. The traffic thread
    keeps every serving agent answering predictions."""
    made: list[LocalFleet] = []

    def make(*, start: bool = True, install: int | None = 1, traffic: bool = True) -> LocalFleet:
        fleet = LocalFleet(
            tmp_path / f"fleet-{len(made)}",
            trust_file=release.trust,
            fleet=FLEET,
            agents=AGENTS,
            db_url=db_url,
            mosquitto=mosquitto_bin,
            agent_settings=AGENT_SETTINGS,
            broker_options=("max_queued_messages 100000",),
        )
        made.append(fleet)
        if install is not None:
            fleet.install(release.bundles[install])
        if start:
            fleet.start()
            if traffic:
                fleet.start_traffic(release.rows, rate_hz=20.0)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


@pytest.fixture
def desired_watch() -> Iterator[Callable[[LocalFleet], Subscriber]]:
    """``mosquitto_sub`` on every ``desired`` topic of a fleet's broker (retained ones too)."""
    binary = require_client("mosquitto_sub")
    made: list[Subscriber] = []

    def watch(fleet: LocalFleet) -> Subscriber:
        subscriber = Subscriber(binary, fleet.broker, topic="edgekit/v1/+/+/desired")
        made.append(subscriber)
        return subscriber

    yield watch
    for subscriber in made:
        subscriber.close()


# --- helpers for the tests -------------------------------------------------------------------


def create_rollout(fleet: LocalFleet, bundle: Path, *options: str) -> str:
    """``edgekit rollout create BUNDLE`` through the real CLI; returns the rollout id.
    ``options`` come after the defaults, so a test overrides any of them."""
    result = fleet.edgekit(
        "rollout", "create", str(bundle), "--fleet", FLEET, *ROLLOUT_OPTIONS, *options, "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(result.stdout)["id"])


def wait_rollout(fleet: LocalFleet, rollout_id: str, *states: str, timeout: float = 90) -> Any:
    return watch_rollout(fleet.client, rollout_id, set(states), timeout=timeout)


def serving(agent: AgentProcess) -> tuple[str, int]:
    """(name, version) the agent's HTTP API says it serves."""
    model = agent.model()
    return model["name"], model["version"]


def installs(agent: AgentProcess, version: int) -> int:
    """How many times the agent installed ``version``, by its own event log: ``staged`` is
    the first event that names the version (the bundle was downloaded and verified)."""
    events = read_events(agent.state_dir / "events.jsonl")
    return sum(e["type"] == "staged" and e.get("version") == version for e in events)


def wait_serving(fleet: LocalFleet, version: int, *, timeout: float = 30) -> None:
    """Every agent serves tiny ``version`` (its HTTP API) with no update in progress (its
    ``reported`` state, as the registry shows it): a sideloaded bundle has finished its
    health window, a rolled-out one has committed."""

    def settled() -> bool:
        if not all(serving(agent) == ("tiny", version) for agent in fleet.agents):
            return False
        devices = fleet.client.devices(fleet=FLEET)
        return len(devices) == len(fleet.agents) and all(
            (d["current"] or {}).get("version") == version and d["update_state"] == "idle"
            for d in devices
        )

    wait_for(settled, timeout=timeout, what=f"every agent to serve tiny v{version}, settled")


def assert_answered_throughout(fleet: LocalFleet) -> None:
    """The traffic saw no failed prediction, and every agent answered some."""
    assert fleet.traffic is not None
    counts = fleet.traffic.snapshot()
    for device, count in counts.items():
        assert count.failed == 0, f"{device}: {count.failed} predictions failed: {count.errors}"
        assert count.answered > 0, f"{device} answered no prediction"


def registry_versions(fleet: LocalFleet) -> dict[str, int | None]:
    return {
        d["device"]: (d["current"] or {}).get("version") for d in fleet.client.devices(fleet=FLEET)
    }


@pytest.fixture
def e2e() -> SimpleNamespace:
    """The helpers above, for test modules (a conftest is not importable under importlib)."""
    return SimpleNamespace(
        FLEET=FLEET,
        create_rollout=create_rollout,
        wait_rollout=wait_rollout,
        serving=serving,
        installs=installs,
        wait_serving=wait_serving,
        assert_answered_throughout=assert_answered_throughout,
        registry_versions=registry_versions,
        wait_for=wait_for,
    )
