"""Baseline statistics of the data the model was validated on, for drift detection on devices.

Per input: element mean/std/min/max, a histogram for PSI (population stability index), and
per-feature (rank-2 inputs) or per-channel (image inputs) mean/std. Per model: the distribution
of predicted classes on the same data.

Histogram bins are deciles of the observed values (quantile bins make PSI sensitive everywhere
the data actually lives), computed exactly in two streamed passes: pass 1 gets min/max/moments
and the predicted classes, pass 2 fills a fine 2048-bin histogram over [min, max]; decile edges
are snapped to fine-bin edges, so coarse counts are exact sums of fine counts. Repeated values
(e.g. many zero pixels) collapse duplicate edges, so there may be fewer than 10 bins. Devices
should clip values outside [first edge, last edge] into the outer bins.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .calibration import Sample, image_layout
from .errors import CalibrationDataError
from .measure import predictions, primary_output
from .model_spec import ModelSpec, TensorSpec
from .progress import Progress, ProgressCallback, report
from .runtime import open_runner

__all__ = [
    "BaselineStats",
    "ClassDistribution",
    "InputStats",
    "compute_baseline",
]

_FINE_BINS = 2048
_MAX_FEATURES = 4096


@dataclass(frozen=True)
class InputStats:
    name: str
    samples: int
    elements: int
    mean: float
    std: float
    min: float
    max: float
    bin_edges: list[float]
    counts: list[int]
    feature_axis: str | None = None
    """``feature`` (rank-2 ``[N,D]``), ``channel`` (images) or ``None``."""
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassDistribution:
    output: str
    counts: list[int]
    fractions: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BaselineStats:
    samples: int
    inputs: dict[str, InputStats]
    output_classes: ClassDistribution | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "output_classes": None
            if self.output_classes is None
            else self.output_classes.to_dict(),
        }


def _feature_axis(spec: TensorSpec) -> tuple[int | None, str | None]:
    """Axis of per-feature statistics in a sample array, if the input has a natural one."""
    if spec.shape is None:
        return None, None
    if len(spec.shape) == 2 and isinstance(spec.shape[1], int) and spec.shape[1] <= _MAX_FEATURES:
        return 1, "feature"
    if len(spec.shape) == 4:
        try:
            layout = image_layout(spec)
        except CalibrationDataError:
            return None, None
        return (1 if layout == "NCHW" else 3), "channel"
    return None, None


class _Moments:
    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.axis, self.axis_name = _feature_axis(spec)
        self.samples = 0
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.f_sum: npt.NDArray[np.float64] | None = None
        self.f_sq: npt.NDArray[np.float64] | None = None
        self.f_count = 0

    def add(self, value: npt.NDArray[Any]) -> None:
        data = np.asarray(value, dtype=np.float64)
        finite = data[np.isfinite(data)]
        self.samples += 1
        if finite.size:
            self.count += finite.size
            self.total += float(finite.sum())
            self.total_sq += float(np.square(finite).sum())
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))
        if self.axis is not None and data.ndim > self.axis:
            moved = np.moveaxis(data, self.axis, -1).reshape(-1, data.shape[self.axis])
            if self.f_sum is None:
                self.f_sum = np.zeros(moved.shape[1])
                self.f_sq = np.zeros(moved.shape[1])
            if self.f_sum.shape[0] == moved.shape[1] and self.f_sq is not None:
                self.f_sum += moved.sum(axis=0)
                self.f_sq += np.square(moved).sum(axis=0)
                self.f_count += moved.shape[0]


def _decile_edges(fine: npt.NDArray[np.int64]) -> list[int]:
    """Indexes into the fine edges (0.._FINE_BINS) at the deciles, deduplicated."""
    cdf = np.cumsum(fine)
    total = int(cdf[-1])
    picks = {0, _FINE_BINS}
    for q in range(1, 10):
        # First fine bin whose cumulative count reaches q/10: its right edge is the cut.
        idx = int(np.searchsorted(cdf, total * q / 10.0, side="left")) + 1
        picks.add(min(idx, _FINE_BINS))
    return sorted(picks)


def compute_baseline(
    model_path: str | Path,
    data: Callable[[], Iterator[Sample]],
    *,
    spec: ModelSpec | None = None,
    primary: str | None = None,
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
    runtime: str | None = None,
) -> BaselineStats:
    """Input statistics of ``data`` and the class distribution ``model_path`` predicts on it.

    ``runtime``: ``onnxruntime`` or ``tflite`` (default: from the file suffix).
    """
    runner = open_runner(model_path, runtime=runtime, threads=threads)
    model_spec = spec or runner.spec
    out_name = primary_output(model_spec, primary)
    moments = {s.name: _Moments(s) for s in model_spec.inputs}
    class_counts: dict[int, int] = {}
    samples = 0
    for sample in data():
        for name, acc in moments.items():
            acc.add(sample[name])
        scores = runner.run(sample)[out_name]
        preds = predictions(np.asarray(scores))
        if preds is not None:
            for p in preds.tolist():
                if p >= 0:
                    class_counts[p] = class_counts.get(p, 0) + 1
        samples += 1
        report(progress, Progress("baseline", "statistics", samples, None))
    if samples == 0:
        raise CalibrationDataError("baseline statistics: no samples")
    fine = {name: np.zeros(_FINE_BINS, dtype=np.int64) for name in moments}
    for sample in data():
        for name, acc in moments.items():
            values = np.asarray(sample[name], dtype=np.float64).reshape(-1)
            values = values[np.isfinite(values)]
            if values.size and acc.high > acc.low:
                hist, _ = np.histogram(values, bins=_FINE_BINS, range=(acc.low, acc.high))
                fine[name] += hist
    stats: dict[str, InputStats] = {}
    for name, acc in moments.items():
        mean = acc.total / acc.count if acc.count else 0.0
        var = max(0.0, acc.total_sq / acc.count - mean * mean) if acc.count else 0.0
        if acc.count and acc.high > acc.low:
            fine_edges = np.linspace(acc.low, acc.high, _FINE_BINS + 1)
            cuts = _decile_edges(fine[name])
            edges = [float(fine_edges[c]) for c in cuts]
            counts = [int(fine[name][a:b].sum()) for a, b in itertools.pairwise(cuts)]
        elif acc.count:  # constant input: one degenerate bin
            edges, counts = [acc.low, acc.high], [acc.count]
        else:
            edges, counts = [], []
        f_mean = f_std = None
        if acc.f_sum is not None and acc.f_sq is not None and acc.f_count:
            fm = acc.f_sum / acc.f_count
            f_mean = [float(v) for v in fm]
            f_std = [float(v) for v in np.sqrt(np.maximum(acc.f_sq / acc.f_count - fm * fm, 0.0))]
        stats[name] = InputStats(
            name=name,
            samples=acc.samples,
            elements=acc.count,
            mean=mean,
            std=float(np.sqrt(var)),
            min=float(acc.low) if acc.count else 0.0,
            max=float(acc.high) if acc.count else 0.0,
            bin_edges=edges,
            counts=counts,
            feature_axis=acc.axis_name if f_mean is not None else None,
            feature_mean=f_mean,
            feature_std=f_std,
        )
    distribution: ClassDistribution | None = None
    if class_counts:
        n_classes = max(class_counts) + 1
        total = sum(class_counts.values())
        counts_list = [class_counts.get(i, 0) for i in range(n_classes)]
        distribution = ClassDistribution(
            output=out_name,
            counts=counts_list,
            fractions=[c / total for c in counts_list],
        )
    return BaselineStats(samples=samples, inputs=stats, output_classes=distribution)
