"""The golden self-test: does the candidate model compute the right thing *on this device*?

A signature proves who built a bundle, not that this device's runtime, build flags, execution
provider and CPU give the answers the workstation saw (a TensorRT fp16 kernel, a missing
XNNPACK op or an old onnxruntime can all change them). So before a model serves, the agent
runs it on the bundle's ``golden.npz`` and compares (docs/bundle-format.md):

* ``input:NAME`` arrays, axis 0 = sample; each sample runs alone, as a batch of one (a batch
  axis is added when the model's input rank asks for it);
* ``output:NAME`` expected outputs, same first axis;
* ``atol:NAME`` the absolute tolerance of one output (else a bare ``atol``, else
  ``1e-4 + 1e-3 * max|expected|``); optional ``rtol:NAME``/``rtol`` add ``rtol * |expected|``
  per element. Integer outputs must match exactly. A NaN matches only a NaN.

Samples run one at a time on purpose: that is how requests arrive, and a model that is right
on a batch of 8 but wrong on a batch of 1 (a mis-exported batch dimension) must fail here.
"""

from __future__ import annotations

import math
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.errors import AgentError, GoldenMissing, SelfTestFailed
from device_agent.runtime.base import Runtime
from device_agent.runtime.spec import TensorSpec

__all__ = ["Golden", "OutputCheck", "SelfTestReport", "default_atol", "load_golden", "run_selftest"]

Array = npt.NDArray[Any]


def default_atol(expected: Array) -> float:
    """The tolerance of an output whose golden set names none: tight, but scale-aware."""
    finite = np.abs(expected[np.isfinite(expected)]) if expected.size else expected
    peak = float(finite.max()) if finite.size else 0.0
    return 1e-4 + 1e-3 * peak


@dataclass(frozen=True)
class Golden:
    """A parsed golden set."""

    inputs: Mapping[str, Array]
    outputs: Mapping[str, Array]
    atol: Mapping[str, float]
    rtol: Mapping[str, float]
    samples: int


@dataclass(frozen=True)
class OutputCheck:
    """How one output compared over all samples."""

    name: str
    max_abs_error: float
    atol: float
    rtol: float
    exact: bool
    passed: bool
    worst_sample: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_error": _json_float(self.max_abs_error),
            "atol": self.atol,
            "rtol": self.rtol,
            "exact": self.exact,
            "passed": self.passed,
            "worst_sample": self.worst_sample,
        }


@dataclass(frozen=True)
class SelfTestReport:
    """The outcome of a self-test that ran (or was skipped: no golden set, not required)."""

    samples: int
    outputs: tuple[OutputCheck, ...]
    seconds: float
    skipped: bool = False

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.outputs)

    def summary(self) -> str:
        if self.skipped:
            return "self-test skipped: the bundle has no golden.npz"
        worst = ", ".join(
            f"{c.name} max error {c.max_abs_error:.3g} (atol {c.atol:.3g})" for c in self.outputs
        )
        return f"{self.samples} golden samples: {worst}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "skipped": self.skipped,
            "passed": self.passed,
            "seconds": round(self.seconds, 4),
            "outputs": [c.to_dict() for c in self.outputs],
        }


def load_golden(path: str | Path) -> Golden:
    """Read and check a ``golden.npz``; raise :class:`SelfTestFailed` if it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.asarray(archive[name]) for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SelfTestFailed(f"golden.npz cannot be read: {exc}") from None
    inputs: dict[str, Array] = {}
    outputs: dict[str, Array] = {}
    atol: dict[str, float] = {}
    rtol: dict[str, float] = {}
    for key, value in arrays.items():
        kind, _, name = key.partition(":")
        if kind in ("atol", "rtol"):
            if value.size != 1 or value.dtype.kind not in "iuf":
                raise SelfTestFailed(f"golden.npz: {key} must be one number")
            number = float(value.reshape(()))
            if not math.isfinite(number) or number < 0:
                raise SelfTestFailed(f"golden.npz: {key} must be a finite number >= 0")
            (atol if kind == "atol" else rtol)[name] = number
        elif kind in ("input", "output") and name:
            if value.ndim < 1 or value.shape[0] < 1:
                raise SelfTestFailed(f"golden.npz: {key} must hold at least one sample on axis 0")
            (inputs if kind == "input" else outputs)[name] = value
        # Other keys are ignored: a newer writer may add companions older agents do not use.
    if not inputs or not outputs:
        raise SelfTestFailed("golden.npz must hold input:NAME and output:NAME arrays")
    counts = {key: arr.shape[0] for key, arr in (*inputs.items(), *outputs.items())}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise SelfTestFailed(f"golden.npz arrays disagree on the number of samples ({listed})")
    return Golden(inputs, outputs, atol, rtol, samples=next(iter(counts.values())))


def run_selftest(
    runtime: Runtime, golden_path: str | Path | None, *, require: bool = True
) -> SelfTestReport:
    """Run ``runtime`` on every golden sample; raise :class:`SelfTestFailed` on any mismatch.

    ``golden_path`` None means the bundle has no golden set: :class:`GoldenMissing` when
    ``require``, else a skipped report.
    """
    started = time.perf_counter()
    if golden_path is None:
        if require:
            raise GoldenMissing(
                "the bundle has no golden.npz, so it cannot be self-tested on this device "
                "(set require_golden = false to accept such bundles)"
            )
        return SelfTestReport(samples=0, outputs=(), seconds=0.0, skipped=True)
    golden = load_golden(golden_path)
    _check_names(runtime, golden)
    errors: dict[str, Array] = {name: np.zeros(golden.samples) for name in golden.outputs}
    passed: dict[str, Array] = {name: np.ones(golden.samples, bool) for name in golden.outputs}
    for index in range(golden.samples):
        feeds = {
            spec.name: _as_request(spec, golden.inputs[spec.name][index]) for spec in runtime.inputs
        }
        try:
            actual = runtime.predict(feeds)
        except AgentError as exc:
            raise SelfTestFailed(f"golden sample {index} failed to run: {exc.message}") from None
        for name, expected_all in golden.outputs.items():
            expected = expected_all[index]
            got = _align(np.asarray(actual[name]), expected, name, index)
            error, ok = _compare(got, expected, golden, name)
            errors[name][index], passed[name][index] = error, ok
    checks = []
    for name, expected_all in golden.outputs.items():
        exact = expected_all.dtype.kind in "iub"
        worst = int(np.argmax(errors[name]))
        checks.append(
            OutputCheck(
                name=name,
                max_abs_error=float(errors[name][worst]),
                atol=0.0 if exact else _atol(golden, name, expected_all),
                rtol=0.0 if exact else golden.rtol.get(name, golden.rtol.get("", 0.0)),
                exact=exact,
                passed=bool(passed[name].all()),
                worst_sample=int(np.argmin(passed[name])) if not passed[name].all() else worst,
            )
        )
    report = SelfTestReport(
        samples=golden.samples, outputs=tuple(checks), seconds=time.perf_counter() - started
    )
    failed = [c for c in checks if not c.passed]
    if failed:
        first = failed[0]
        bound = "exact match" if first.exact else f"atol {first.atol:.3g}"
        raise SelfTestFailed(
            f"output {first.name!r} differs from golden.npz on sample {first.worst_sample}: "
            f"max |error| {first.max_abs_error:.3g} > {bound}"
            + (f" ({len(failed) - 1} more output(s) differ)" if len(failed) > 1 else "")
        )
    return report


def _check_names(runtime: Runtime, golden: Golden) -> None:
    model_inputs = {spec.name for spec in runtime.inputs}
    model_outputs = {spec.name for spec in runtime.outputs}
    missing = sorted(model_inputs - set(golden.inputs))
    if missing:
        raise SelfTestFailed(f"golden.npz has no input:{missing[0]} for the model's input")
    for kind, names, known in (
        ("input", golden.inputs, model_inputs),
        ("output", golden.outputs, model_outputs),
    ):
        unknown = sorted(set(names) - known)
        if unknown:
            raise SelfTestFailed(
                f"golden.npz has {kind}:{unknown[0]}, which the model does not have "
                f"(its {kind}s: {', '.join(sorted(known))})"
            )


def _as_request(spec: TensorSpec, sample: Array) -> Array:
    """One golden sample as a batch-of-one request for ``spec``."""
    rank = spec.rank
    if rank is None or sample.ndim == rank - 1:
        return sample[np.newaxis, ...]
    if sample.ndim == rank:  # stored with its own batch axis of 1
        return sample
    raise SelfTestFailed(
        f"golden input {spec.name!r} has samples of rank {sample.ndim}; the model input has "
        f"rank {rank}"
    )


def _align(actual: Array, expected: Array, name: str, index: int) -> Array:
    if actual.shape == expected.shape:
        return actual
    if actual.shape == (1, *expected.shape):
        return np.asarray(actual[0])
    if actual.size == expected.size and actual.squeeze().shape == expected.squeeze().shape:
        return actual.reshape(expected.shape)
    raise SelfTestFailed(
        f"output {name!r} has shape {list(actual.shape)} on golden sample {index}, "
        f"golden.npz expects {list(expected.shape)}"
    )


def _atol(golden: Golden, name: str, expected: Array) -> float:
    if name in golden.atol:
        return golden.atol[name]
    if "" in golden.atol:
        return golden.atol[""]
    return default_atol(expected.astype(np.float64))


def _compare(actual: Array, expected: Array, golden: Golden, name: str) -> tuple[float, bool]:
    """Max absolute error of one sample and whether it is within tolerance."""
    if expected.dtype.kind in "iub":
        try:
            same = bool(np.array_equal(actual, expected))
        except (TypeError, ValueError):
            same = False
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        return (float(diff.max()) if diff.size else 0.0), same
    got = actual.astype(np.float64)
    want = expected.astype(np.float64)
    diff = np.abs(got - want)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    diff[nan_got & nan_want] = 0.0
    diff[nan_got ^ nan_want] = np.inf
    same_inf = np.isinf(got) & np.isinf(want) & (got == want)
    diff[same_inf] = 0.0
    atol = _atol(golden, name, golden.outputs[name])
    rtol = golden.rtol.get(name, golden.rtol.get("", 0.0))
    allowed = atol + rtol * np.abs(np.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0))
    ok = bool(np.all(diff <= allowed))
    return (float(diff.max()) if diff.size else 0.0), ok


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)
