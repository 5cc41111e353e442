"""onnxruntime sessions and feeds, configured the same way everywhere measurements are taken.

Every number edgekit reports comes from a real ``InferenceSession`` on the CPU execution
provider. Sessions default to one intra-op thread: on a shared workstation that gives stable,
comparable latencies, and edge devices run models on one or few cores anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .calibration import Sample
from .model_spec import ModelSpec

__all__ = [
    "Optimization",
    "batch_feed",
    "make_session",
    "run_session",
    "synthetic_sample",
]

Optimization = Literal["all", "basic", "disable"]

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def make_session(
    model: str | Path | bytes,
    *,
    threads: int | None = 1,
    optimization: Optimization = "all",
) -> ort.InferenceSession:
    """A CPU session; ``threads=None`` lets onnxruntime pick (all physical cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, feed: Sample) -> dict[str, npt.NDArray[Any]]:
    """Run and return outputs by name (onnxruntime returns a positional list)."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feed)
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def batch_feed(samples: Sequence[Sample], spec: ModelSpec) -> Sample | None:
    """Stack samples into one batched feed, or ``None`` when an input has no dynamic batch axis."""
    if not samples or not all(s.has_dynamic_batch for s in spec.inputs):
        return None
    try:
        return {
            s.name: np.concatenate([sample[s.name] for sample in samples], axis=0)
            for s in spec.inputs
        }
    except ValueError:  # samples of different shapes (dynamic non-batch dims): cannot stack
        return None


def synthetic_sample(spec: ModelSpec, *, seed: int = 0) -> Sample:
    """A deterministic random sample for models measured without data (dynamic dims -> 1)."""
    rng = np.random.default_rng(seed)
    sample: Sample = {}
    for s in spec.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in (s.shape or ()))
        if s.is_float:
            sample[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            sample[s.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            sample[s.name] = rng.integers(0, 10, shape).astype(s.dtype)
    return sample
