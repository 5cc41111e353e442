"""An InferenceService over a real ONNX Runtime model, for the HTTP tests and the benchmark.

It stands in for the Agent (written separately) with the same contract: metrics are updated
the way the Agent must update them (``observe`` on success, ``observe(ok=False)`` when the
runtime fails, ``reject`` for bad input), and every error is the agent's typed one. Loaded by
path (the suite runs with ``--import-mode=importlib``), by the conftest and by
``benchmarks/bench_agent_http.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.errors import InferenceError, InputError, NoModel
from device_agent.metrics import Metrics
from device_agent.runtime import Runtime, RuntimeOptions, load_runtime


class RuntimeService:
    """Serves one model file, or none (``model_path=None``: an agent before its first install)."""

    def __init__(
        self,
        model_path: Path | None,
        *,
        name: str = "tiny",
        version: str = "1.0.0",
        threads: int = 1,
    ) -> None:
        self._metrics = Metrics()
        self.name = name
        self.version = version
        self.runtime: Runtime | None = None
        if model_path is not None:
            self.runtime = load_runtime(
                "onnxruntime", model_path, options=RuntimeOptions(threads=threads)
            )
        #: Set to "degraded" to make health() report it.
        self.status_override: str | None = None
        #: Set to an exception to make the next predict() raise it (a bug in the service).
        self.fail_with: BaseException | None = None

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def predict(
        self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike
    ) -> dict[str, npt.NDArray[np.generic]]:
        if self.fail_with is not None:
            raise self.fail_with
        runtime = self.runtime
        if runtime is None:
            raise NoModel("no model is installed yet")
        start = time.perf_counter()
        try:
            outputs = runtime.predict(inputs)
        except InputError:
            self._metrics.reject()
            raise
        except InferenceError:
            self._metrics.observe(time.perf_counter() - start, ok=False)
            raise
        self._metrics.observe(time.perf_counter() - start)
        return outputs

    def health(self) -> dict[str, Any]:
        status = self.status_override or ("ok" if self.runtime is not None else "no-model")
        snap = self._metrics.snapshot()
        return {"status": status, "model": self.name, "inferences": snap.inferences}

    def model_info(self) -> dict[str, Any]:
        runtime = self.runtime
        if runtime is None:
            raise NoModel("no model is installed yet")
        return {
            "name": self.name,
            "version": self.version,
            "runtime": runtime.name,
            "inputs": [spec.to_dict() for spec in runtime.inputs],
            "outputs": [spec.to_dict() for spec in runtime.outputs],
        }
