"""Fixtures for the agent-core tests: real signed bundles, a device state dir, real ONNX Runtime.

Everything is reached through the ``kit`` fixture (one object, one name: this conftest also
sits above the runtime/, serial/ and http/ test folders, whose fixtures must not collide with
ours). Models are tiny (16 features, 4 classes) so that a whole update takes milliseconds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.bundles import write_onnx_model

from device_agent.agent import Agent
from device_agent.config import AgentConfig, HealthConfig
from edgekit.bundle import build_bundle
from edgekit.keys import SigningKey, generate_key
from edgekit.trust import TrustEnvelope, TrustPolicy

REPO = Path(__file__).resolve().parents[2]
FEATURES = 16


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    """The model's output computed by ONNX Runtime directly, not through the agent."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


def write_golden(model: Path, path: Path, *, seed: int = 0, samples: int = 4, **extra: Any) -> Path:
    """A golden set computed from ``model`` itself (so it passes on that model)."""
    x = np.random.default_rng(seed).standard_normal((samples, FEATURES)).astype(np.float32)
    arrays = {
        "input:input": x,
        "output:probabilities": reference(model, x),
        "atol:probabilities": np.float32(1e-5),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def write_gather_model(path: Path) -> Path:
    """A model that *raises* on some inputs: x[:, 0] indexes a 4-row table (>= 4 fails).

    Real ONNX Runtime raises "indices element out of data bounds" for such requests, so it
    injects genuine inference errors into a health window.
    """
    table = np.arange(16, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["input", "start", "end", "axis"], ["first"]),
            helper.make_node("Squeeze", ["first", "axis"], ["first1"]),
            helper.make_node("Cast", ["first1"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["probabilities"], axis=0),
        ],
        "gather",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([1], np.int64), "end"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@dataclass
class Models:
    """Model files and their golden sets, built once per session."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    goldens: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="session")
def kit_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("agent-models")
    models = Models(root)
    for name, seed in (("m1", 1), ("m2", 2), ("m3", 3)):
        path = write_onnx_model(root / f"{name}.onnx", seed=seed)
        models.files[name] = path
        models.goldens[name] = write_golden(path, root / f"{name}-golden.npz", seed=seed)
    gather = write_gather_model(root / "gather.onnx")
    x = np.zeros((4, FEATURES), np.float32)
    x[:, 0] = [0, 1, 2, 3]
    models.files["gather"] = gather
    np.savez(
        root / "gather-golden.npz",
        **{"input:input": x, "output:probabilities": reference(gather, x)},
    )
    models.goldens["gather"] = root / "gather-golden.npz"
    return models


@pytest.fixture(scope="session")
def kit_keys() -> dict[str, SigningKey]:
    return {"A": generate_key(), "B": generate_key()}


class Kit:
    """A device under test: its state dir, trust, bundles and agents."""

    def __init__(self, root: Path, models: Models, keys: dict[str, SigningKey]) -> None:
        self.root = root
        self.models = models
        self.keys = keys
        self.state_dir = root / "state"
        self.state_dir.mkdir()
        policy = TrustPolicy.create([("A", keys["A"].public)], threshold=1)
        self.trust_bytes = TrustEnvelope.unsigned(policy).to_bytes()
        self.trust_source = root / "trust.json"
        self.trust_source.write_bytes(self.trust_bytes)
        (self.state_dir / "trust.json").write_bytes(self.trust_bytes)
        self._counter = itertools.count()
        self._agents: list[Agent] = []
        self.x = np.random.default_rng(99).standard_normal((3, FEATURES)).astype(np.float32)

    # ---------------------------------------------------------------- bundles

    def bundle(
        self,
        version: int,
        model: str = "m1",
        *,
        golden: str | Path | None = "own",
        keys: str = "A",
        name: str = "tiny",
        **options: Any,
    ) -> Path:
        """A signed bundle of ``model``; ``golden="own"`` uses the model's own golden set."""
        out = self.root / f"bundle-{next(self._counter)}-v{version}.ekb"
        golden_path = self.models.goldens[model] if golden == "own" else golden
        options.setdefault("created", datetime.now(timezone.utc) - timedelta(minutes=1))
        build_bundle(
            self.models.files[model],
            out,
            name=name,
            version=version,
            keys=[self.keys[k] for k in keys],
            golden=golden_path,
            **options,
        )
        return out

    def expected(self, model: str, x: np.ndarray | None = None) -> np.ndarray:
        return reference(self.models.files[model], self.x if x is None else x)

    # ---------------------------------------------------------------- agents

    def config(self, **health: Any) -> AgentConfig:
        options: dict[str, Any] = {"min_inferences": 5, "max_seconds": 30.0}
        options.update(health)
        return AgentConfig(state_dir=self.state_dir, health=HealthConfig(**options))

    def agent(self, config: AgentConfig | None = None, **kwargs: Any) -> Agent:
        agent = Agent(config=config or self.config(), **kwargs)
        self._agents.append(agent)
        return agent

    def commit(self, agent: Agent, bundle: Path) -> None:
        """Install ``bundle`` and drive its health window with traffic until it commits."""
        result = agent.install(bundle, wait_for_health=False)
        assert result.ok, result.message
        for _ in range(agent.config.health.min_inferences):
            agent.predict(self.x)
        final = agent.evaluate_health()
        assert final is not None and final.outcome.value == "committed", final

    def close_all(self) -> None:
        for agent in self._agents:
            agent.close()

    # ---------------------------------------------------------------- inspection

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        """Every file under the state dir with mode and bytes, except the event log."""
        state: dict[str, tuple[int, bytes]] = {}
        for directory, dirs, files in os.walk(self.state_dir):
            for name in dirs + files:
                path = Path(directory, name)
                rel = str(path.relative_to(self.state_dir))
                if rel.startswith("events.jsonl"):
                    continue
                content = path.read_bytes() if path.is_file() else b""
                state[rel] = (path.lstat().st_mode, content)
        return state

    def events(self) -> list[dict[str, Any]]:
        from device_agent.events import read_events

        return read_events(self.state_dir / "events.jsonl")

    def event_types(self) -> list[str]:
        return [e["type"] for e in self.events()]


@pytest.fixture
def kit(tmp_path: Path, kit_models: Models, kit_keys: dict[str, SigningKey]) -> Iterator[Kit]:
    device = Kit(tmp_path, kit_models, kit_keys)
    yield device
    device.close_all()
