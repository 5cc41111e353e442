"""Golden set: K validation inputs, the chosen model's outputs, and a tolerance per output.

Format (``golden.npz``, what ``edgekit bundle`` checks): ``input:NAME`` for every model input
(the K samples stacked on the batch axis: one feed), ``output:NAME`` the chosen model's outputs
for that feed, ``atol:NAME`` the absolute tolerance per output (float32 scalar).

A device (or CI) re-runs the shipped model on the golden inputs and compares with the stored
outputs: a mismatch means the wrong model, a broken runtime or a corrupted file, caught before
real traffic is served.

Tolerance, per float output ``o`` (absolute, compared with ``max |actual - golden|``)::

    tol_o = max(atol + rtol * max|golden_o|,  spread_factor * spread_o,  0.1 * qerr_o)

* ``atol + rtol * scale`` (1e-5 and 1e-3 by default) covers float re-association between CPUs,
  SIMD widths and onnxruntime versions, which moves fp32 results by ~1e-6..1e-4 relative.
* ``spread_o`` is the largest difference observed here between execution configurations of the
  *same* model: graph optimisation fully on (fused kernels, the golden outputs) vs off (the
  reference arithmetic; for QDQ models, dequantize -> float op -> quantize instead of int8
  kernels). That is the kind of difference a device with other kernels produces; 4x of it
  leaves headroom for requantization rounding differing by one step in several layers.
* ``qerr_o`` is the chosen model's max absolute error vs fp32 on the validation set (0 for
  fp32). Kernel differences between devices move a quantized model's outputs by a small
  fraction of what quantization itself did; 10% of it is a floor for int8 models whose kernels
  happen to agree exactly on this machine (dynamic quantization does).

Integer outputs (class labels) must match exactly. A different model typically misses by orders
of magnitude more than either term (the tests check that).

TFLite models (:func:`build_golden_tflite`) are run with the device agent's own runtime
(``device_agent.runtime.load_runtime("tflite", ...)``), so names and float semantics are exactly
what a device sees: inputs and outputs are float (quantized I/O is quantized / dequantized with
the tensor's parameters) and named as the agent names them. There, ``spread_o`` is the largest
difference between the default kernels (XNNPACK) and TFLite's built-in optimized and reference
kernels (what devices without the delegate run), and a quantized output gets at least
``quant_steps`` (2) steps of its own scale: one requantization rounding differing in a layer
moves it by about one step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .calibration import Sample
from .errors import CalibrationDataError
from .model_spec import read_model_spec
from .runtime import (
    RUNTIME_TFLITE,
    Optimization,
    TfliteRunner,
    batch_feed,
    make_session,
    run_session,
    runtime_for_path,
)

__all__ = [
    "GoldenCheck",
    "GoldenSet",
    "build_golden",
    "build_golden_tflite",
    "check_golden",
]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-3
DEFAULT_SPREAD_FACTOR = 4.0
DEFAULT_ERROR_FRACTION = 0.1
DEFAULT_QUANT_STEPS = 2.0


@dataclass(frozen=True)
class GoldenSet:
    """One model feed (K samples stacked on the batch axis), its outputs, per-output tolerances.

    Stored as one feed because that is what a device can replay without knowing anything about
    the data: ``session.run(None, inputs)`` once, compare every output. Models without a dynamic
    batch axis get a single-sample feed (K = 1).
    """

    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: Mapping[str, npt.NDArray[Any]]
    tolerances: Mapping[str, float]
    samples: int = 1
    method: str = ""

    def to_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Arrays for ``np.savez``: ``input:NAME``, ``output:NAME`` and ``atol:NAME`` (the
        layout ``edgekit bundle`` checks)."""
        arrays = {f"input:{k}": np.asarray(v) for k, v in self.inputs.items()}
        arrays.update({f"output:{k}": np.asarray(v) for k, v in self.outputs.items()})
        arrays.update({f"atol:{k}": np.float32(v) for k, v in self.tolerances.items()})
        return arrays

    def to_dict(self) -> dict[str, Any]:
        """JSON metadata: shapes, dtypes, tolerances and how they were derived."""
        return {
            "samples": self.samples,
            "inputs": {
                k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in self.inputs.items()
            },
            "outputs": {
                k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in self.outputs.items()
            },
            "tolerances": {k: float(v) for k, v in self.tolerances.items()},
            "method": self.method,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``golden.npz`` (numpy appends ``.npz`` when missing; the real path is returned)."""
        target = Path(path)
        np.savez(target, **self.to_arrays())  # type: ignore[arg-type]
        return target if target.suffix == ".npz" else target.with_name(target.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> GoldenSet:
        with np.load(Path(path), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        inputs = {k[6:]: v for k, v in arrays.items() if k.startswith("input:")}
        outputs = {k[7:]: v for k, v in arrays.items() if k.startswith("output:")}
        tolerances = {k[5:]: float(v) for k, v in arrays.items() if k.startswith("atol:")}
        first = next(iter(inputs.values()), None)
        count = int(first.shape[0]) if first is not None and first.ndim else 1
        return cls(inputs=inputs, outputs=outputs, tolerances=tolerances, samples=count)


@dataclass(frozen=True)
class GoldenCheck:
    """Result of re-running a model on a golden set."""

    passed: bool
    max_abs_error: Mapping[str, float]
    tolerances: Mapping[str, float]
    failures: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_error": dict(self.max_abs_error),
            "tolerances": dict(self.tolerances),
            "failures": list(self.failures),
        }


def _run(
    model_path: str | Path, feed: Sample, *, optimization: Optimization, threads: int | None
) -> dict[str, npt.NDArray[Any]]:
    return run_session(make_session(model_path, threads=threads, optimization=optimization), feed)


def build_golden(
    model_path: str | Path,
    samples: Sequence[Sample],
    *,
    threads: int | None = 1,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    quantization_error: Mapping[str, float] | None = None,
    error_fraction: float = DEFAULT_ERROR_FRACTION,
) -> GoldenSet:
    """Run ``model_path`` on ``samples`` and derive per-output tolerances (see module docs).

    ``quantization_error``: per output, the model's measured max absolute error vs fp32.
    """
    if not samples:
        raise CalibrationDataError("golden set needs at least one sample")
    batched = batch_feed(samples, read_model_spec(model_path))
    inputs = batched if batched is not None else dict(samples[0])
    count = len(samples) if batched is not None else 1
    golden = _run(model_path, inputs, optimization="all", threads=threads)
    plain = _run(model_path, inputs, optimization="disable", threads=threads)
    tolerances: dict[str, float] = {}
    for name, value in golden.items():
        if not np.issubdtype(value.dtype, np.floating):
            tolerances[name] = 0.0
            continue
        ref = value.astype(np.float64)
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        spread = float(np.max(np.abs(plain[name].astype(np.float64) - ref))) if ref.size else 0.0
        qerr = float((quantization_error or {}).get(name, 0.0))
        tolerances[name] = max(atol + rtol * scale, spread_factor * spread, error_fraction * qerr)
    method = (
        f"max(atol {atol:g} + rtol {rtol:g} * max|output|, {spread_factor:g} * max difference"
        f" between onnxruntime graph optimisation on and off, {error_fraction:g} * max error vs"
        " fp32); integer outputs exact"
    )
    return GoldenSet(
        inputs=inputs, outputs=golden, tolerances=tolerances, samples=count, method=method
    )


def _stack_tflite(samples: Sequence[Sample], runner: TfliteRunner) -> tuple[Sample, int]:
    """K samples as one feed when the model takes any batch (or runs batch 1 per sample)."""
    stackable = all(
        s.has_dynamic_batch or (s.shape is not None and len(s.shape) > 0 and s.shape[0] == 1)
        for s in runner.spec.inputs
    )
    if stackable:
        try:
            feed = {
                s.name: np.concatenate([sample[s.name] for sample in samples], axis=0)
                for s in runner.spec.inputs
            }
            return feed, len(samples)
        except ValueError:
            pass
    return dict(samples[0]), 1


def _agent_predict(
    model_path: str | Path, inputs: Mapping[str, npt.NDArray[Any]], threads: int | None
) -> dict[str, npt.NDArray[Any]]:
    """Outputs as the device agent computes them (its runtime class, its names)."""
    from device_agent.runtime import RuntimeOptions, load_runtime

    with load_runtime(
        RUNTIME_TFLITE, model_path, options=RuntimeOptions(threads=threads)
    ) as runtime:
        return {k: np.asarray(v) for k, v in runtime.predict(dict(inputs)).items()}


def build_golden_tflite(
    model_path: str | Path,
    samples: Sequence[Sample],
    *,
    threads: int | None = 1,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    quantization_error: Mapping[str, float] | None = None,
    error_fraction: float = DEFAULT_ERROR_FRACTION,
    quant_steps: float = DEFAULT_QUANT_STEPS,
) -> GoldenSet:
    """The golden set of a ``.tflite`` model, computed by the device agent's runtime.

    ``samples`` are float-facing feeds named as :class:`~converters.runtime.TfliteRunner` names
    them (the agent's rule). See the module docs for the tolerance.
    """
    if not samples:
        raise CalibrationDataError("golden set needs at least one sample")
    runner = TfliteRunner(model_path, threads=threads)
    inputs, count = _stack_tflite(samples, runner)
    golden = _agent_predict(model_path, inputs, threads)
    expected = set(runner.spec.output_names)
    if set(golden) != expected:  # the agent and the converter must agree on names
        raise CalibrationDataError(
            f"golden set: the device runtime names outputs {sorted(golden)}, the converter"
            f" {sorted(expected)}"
        )
    others = [
        TfliteRunner(model_path, threads=threads, kernels=kind).run(inputs)
        for kind in ("builtin", "reference")
    ]
    steps = runner.output_quantization
    tolerances: dict[str, float] = {}
    for name, value in golden.items():
        if not np.issubdtype(value.dtype, np.floating):
            tolerances[name] = 0.0
            continue
        ref = value.astype(np.float64)
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        spread = max(
            (float(np.max(np.abs(o[name].astype(np.float64) - ref))) for o in others if ref.size),
            default=0.0,
        )
        qerr = float((quantization_error or {}).get(name, 0.0))
        step = steps.get(name)
        floor = quant_steps * step[0] if step is not None else 0.0
        tolerances[name] = max(
            atol + rtol * scale, spread_factor * spread, error_fraction * qerr, floor
        )
    method = (
        f"max(atol {atol:g} + rtol {rtol:g} * max|output|, {spread_factor:g} * max difference"
        " between the default (XNNPACK), built-in and reference TFLite kernels,"
        f" {error_fraction:g} * max error vs fp32, {quant_steps:g} output quantization steps);"
        " outputs computed by device_agent's TFLite runtime; integer outputs exact"
    )
    return GoldenSet(
        inputs=inputs, outputs=golden, tolerances=tolerances, samples=count, method=method
    )


def check_golden(
    model_path: str | Path,
    golden: GoldenSet,
    *,
    threads: int | None = 1,
    runtime: str | None = None,
) -> GoldenCheck:
    """Re-run ``model_path`` on the golden inputs; pass when every output is within tolerance.

    ``runtime``: ``onnxruntime`` or ``tflite`` (default: from the file suffix); TFLite models
    run in the device agent's runtime, as on a device.
    """
    kind = runtime or runtime_for_path(model_path)
    try:
        if kind == RUNTIME_TFLITE:
            actual = _agent_predict(model_path, golden.inputs, threads)
        else:
            actual = _run(model_path, dict(golden.inputs), optimization="all", threads=threads)
    except Exception as exc:  # wrong input names/shapes: a different model
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return GoldenCheck(False, {}, dict(golden.tolerances), (f"model does not run: {first}",))
    errors: dict[str, float] = {}
    failures: list[str] = []
    for name, expected in golden.outputs.items():
        tol = float(golden.tolerances.get(name, 0.0))
        got = actual.get(name)
        if got is None or got.shape != expected.shape:
            shape = None if got is None else tuple(got.shape)
            failures.append(f"output {name!r}: shape {shape}, expected {tuple(expected.shape)}")
            errors[name] = float("inf")
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        errors[name] = err
        if not err <= tol:
            failures.append(f"output {name!r}: max abs error {err:.6g} > tolerance {tol:.6g}")
    return GoldenCheck(not failures, errors, dict(golden.tolerances), tuple(failures))
