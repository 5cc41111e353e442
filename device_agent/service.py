"""The contract between the inference service (the Agent) and its front ends.

The local HTTP API, the serial bridge and MQTT telemetry talk to the agent only through this
protocol, so each can be built and tested against any object that serves a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from device_agent.metrics import Metrics

__all__ = ["InferenceService"]


@runtime_checkable
class InferenceService(Protocol):
    """What a front end may ask of the agent."""

    @property
    def metrics(self) -> Metrics:
        """Counters and latency histogram, updated by every ``predict``."""
        ...

    def predict(
        self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Float in, float out; raises ``device_agent.errors.InputError`` for bad input,
        ``NoModel`` when nothing is installed, ``InferenceError`` when the runtime fails."""
        ...

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded" | "no-model", ...}`` for ``/v1/health``."""
        ...

    def model_info(self) -> dict[str, Any]:
        """Name, version, runtime, sha256, inputs, outputs and slot states for ``/v1/model``."""
        ...
