"""Measure what conversion cost: run the fp32 reference and each candidate on real data.

Everything here runs the real runtime on validation samples (onnxruntime sessions or TFLite
interpreters, through :func:`~converters.runtime.open_runner`); nothing is estimated. The same
engine serves both runtimes: the reference and every candidate must share one runtime.

* **Quality** (one streamed pass; every session sees each sample once, so memory stays bounded):
  top-1 agreement with fp32 on the *primary output* (first float output unless configured),
  max / mean absolute error and mean / min per-sample cosine similarity on every float output,
  and accuracy when labels are given.
* **Latency**: p50 / p95 wall time of one run at batch 1 and at batch N. Batch N stacks
  N samples into one run when every input has a dynamic first axis, otherwise it times N
  back-to-back batch-1 runs (``mode = "looped"``). Sessions are timed in interleaved rounds, so
  a burst of load on a shared machine hits every candidate alike instead of the unlucky one.
* **Size** of the model file and **peak memory** (see :mod:`converters.memory`).
* **Layer diagnostics** for int8 candidates, best effort: the candidate's own ``diagnose`` hook
  when its recipe provides one (TFLite: the QuantizationDebugger), else
  :mod:`converters.diagnose` for ONNX models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .calibration import Sample, SampleStream
from .diagnose import LayerError, layer_errors
from .errors import BadOption, CalibrationDataError, RecipeFailed
from .memory import MemoryMode, MemoryStats, measure_memory
from .model_spec import ModelSpec
from .progress import Progress, ProgressCallback, report
from .recipes.base import CandidateModel
from .runtime import RUNTIME_ONNX, ModelRunner, batch_feed, open_runner, synthetic_sample

__all__ = [
    "LatencyStats",
    "MeasureConfig",
    "Measurement",
    "OutputError",
    "QualityStats",
    "measure_candidates",
    "predictions",
    "primary_output",
]


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """How measurements are taken. Defaults favour stable numbers over speed."""

    batch_size: int = 32
    warmup: int = 5
    iterations: int = 100
    """Timed runs per session at batch 1 (fewer if ``max_seconds`` runs out)."""
    batch_iterations: int = 20
    """Timed runs per session at batch N."""
    max_seconds: float = 5.0
    """Time budget per session and batch size for the timed runs."""
    threads: int | None = 1
    """Intra-op threads of every session (``None``: onnxruntime's default, all cores)."""
    memory: MemoryMode = "subprocess"
    primary_output: str | None = None
    """Output used for top-1 agreement and accuracy (default: first float output)."""
    layer_diagnostics: bool = True
    diagnostic_samples: int = 16
    top_layers: int = 5

    def __post_init__(self) -> None:
        for name in ("batch_size", "iterations", "batch_iterations", "diagnostic_samples"):
            if getattr(self, name) < 1:
                raise BadOption(f"measure {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.max_seconds <= 0:
            raise BadOption("measure warmup must be >= 0 and max_seconds > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one ``session.run`` call (or of N looped calls), in milliseconds."""

    batch_size: int
    mode: Literal["batched", "looped"]
    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int

    @property
    def per_sample_p50_ms(self) -> float:
        return self.p50_ms / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_sample_p50_ms"] = self.per_sample_p50_ms
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in data.items()}


@dataclass(frozen=True)
class OutputError:
    """Candidate vs fp32 on one float output, over all validation samples."""

    name: str
    max_abs: float
    mean_abs: float
    cosine_mean: float
    cosine_min: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class QualityStats:
    """How closely a candidate follows the fp32 reference (and the labels, when given)."""

    samples: int
    primary_output: str
    top1_agreement: float | None
    """Fraction of samples whose top-1 class equals fp32's (``None``: no class output)."""
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    """Mean per-sample cosine similarity of the primary output."""
    cosine_min: float
    accuracy: float | None
    outputs: tuple[OutputError, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            k: (round(v, 7) if isinstance(v, float) else v)
            for k, v in asdict(self).items()
            if k != "outputs"
        }
        data["outputs"] = [o.to_dict() for o in self.outputs]
        return data


@dataclass(frozen=True)
class Measurement:
    """Everything measured about one candidate (the fp32 reference included)."""

    recipe: str
    precision: str
    path: str
    file_size_bytes: int
    latency_b1: LatencyStats
    latency_bn: LatencyStats | None
    quality: QualityStats | None
    memory: MemoryStats = field(default_factory=lambda: MemoryStats(None, "off"))
    layers: tuple[LayerError, ...] = ()
    reference: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "precision": self.precision,
            "path": self.path,
            "reference": self.reference,
            "file_size_bytes": self.file_size_bytes,
            "latency": {
                "batch_1": self.latency_b1.to_dict(),
                "batch_n": None if self.latency_bn is None else self.latency_bn.to_dict(),
            },
            "quality": None if self.quality is None else self.quality.to_dict(),
            "memory": self.memory.to_dict(),
            "worst_layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- helpers


def primary_output(spec: ModelSpec, requested: str | None = None) -> str:
    """The output that carries the prediction: ``requested``, else the first float output."""
    if requested is not None:
        if requested not in spec.output_names:
            raise BadOption(f"primary output {requested!r} is not one of {spec.output_names}")
        return requested
    for out in spec.outputs:
        if out.is_float:
            return out.name
    return spec.outputs[0].name


def predictions(value: npt.NDArray[Any]) -> npt.NDArray[np.int64] | None:
    """Top-1 class per row: argmax over the last axis of float scores, or integer labels as is.

    ``None`` for single-value float outputs (regression), where top-1 has no meaning.
    """
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.reshape(-1).astype(np.int64)
    if array.ndim == 0 or array.shape[-1] <= 1:
        return None
    return np.asarray(array.reshape(-1, array.shape[-1]).argmax(axis=-1), dtype=np.int64)


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


class _OutputAccumulator:
    def __init__(self, name: str) -> None:
        self.name = name
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.cos_sum = 0.0
        self.cos_min = 1.0
        self.samples = 0

    def add(self, ref: npt.NDArray[Any], cand: npt.NDArray[Any]) -> None:
        r = np.asarray(ref, dtype=np.float64).reshape(-1)
        c = np.asarray(cand, dtype=np.float64).reshape(-1)
        if r.shape != c.shape:
            raise RecipeFailed(
                f"output {self.name!r} has {c.size} values, fp32 has {r.size}", recipe="measure"
            )
        diff = np.abs(c - r)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.abs_sum += float(diff.sum())
            self.count += diff.size
        cos = _cosine(r, c)
        self.cos_sum += cos
        self.cos_min = min(self.cos_min, cos)
        self.samples += 1

    def result(self) -> OutputError:
        return OutputError(
            name=self.name,
            max_abs=self.max_abs,
            mean_abs=self.abs_sum / self.count if self.count else 0.0,
            cosine_mean=self.cos_sum / self.samples if self.samples else 1.0,
            cosine_min=self.cos_min,
        )


class _QualityAccumulator:
    def __init__(self, float_outputs: Sequence[str], primary: str) -> None:
        self.outputs = {name: _OutputAccumulator(name) for name in float_outputs}
        self.primary = primary
        self.agree = 0
        self.compared = 0
        self.correct = 0
        self.labelled = 0

    def add(
        self,
        ref: dict[str, npt.NDArray[Any]],
        cand: dict[str, npt.NDArray[Any]],
        label: int | None,
    ) -> None:
        for name, acc in self.outputs.items():
            acc.add(ref[name], cand[name])
        ref_pred = predictions(ref[self.primary])
        cand_pred = predictions(cand[self.primary])
        if ref_pred is not None and cand_pred is not None and ref_pred.shape == cand_pred.shape:
            self.compared += 1
            self.agree += int(np.array_equal(ref_pred, cand_pred))
        if label is not None and cand_pred is not None and cand_pred.size == 1:
            self.labelled += 1
            self.correct += int(cand_pred[0] == label)

    def result(self, samples: int) -> QualityStats:
        outputs = tuple(acc.result() for acc in self.outputs.values())
        primary = self.outputs.get(self.primary)
        prim = primary.result() if primary is not None else None
        return QualityStats(
            samples=samples,
            primary_output=self.primary,
            top1_agreement=self.agree / self.compared if self.compared else None,
            max_abs_error=max((o.max_abs for o in outputs), default=0.0),
            mean_abs_error=prim.mean_abs if prim else 0.0,
            cosine=prim.cosine_mean if prim else 1.0,
            cosine_min=prim.cosine_min if prim else 1.0,
            accuracy=self.correct / self.labelled if self.labelled else None,
            outputs=outputs,
        )


def _indexed(
    validation: SampleStream | Callable[[], Iterator[Sample]],
) -> Iterator[tuple[int, Sample]]:
    if isinstance(validation, SampleStream):
        return validation.indexed()
    return enumerate(validation())


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _latency(
    times: Sequence[float], batch: int, mode: Literal["batched", "looped"]
) -> LatencyStats:
    ms = [t * 1000.0 for t in times]
    return LatencyStats(
        batch_size=batch,
        mode=mode,
        p50_ms=_percentile(ms, 50),
        p95_ms=_percentile(ms, 95),
        mean_ms=float(np.mean(ms)),
        runs=len(ms),
    )


_SLOW_CALL_SECONDS = 0.02
"""Calls at least this long are timed one per session per round (see :func:`_time_interleaved`)."""
_LONG_CALL_SECONDS = 0.25
"""Calls at least this long get one warm-up run: the first run makes the allocations for the
shape, and further warm-up of a call this long only costs time (seconds per ResNet batch)."""


def _time_interleaved(
    calls: dict[int, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    max_seconds: float,
    min_runs: int = 5,
    on_round: Callable[[int], None] | None = None,
) -> dict[int, list[float]]:
    """Time each call ``runs`` times, alternating between calls in small rounds.

    A round runs each call ``chunk`` times back to back: up to 10 for fast calls, whose timing
    suffers from switching models between runs (caches), but 1 when the slowest call takes
    ``_SLOW_CALL_SECONDS`` or more, so that the time budget (``max_seconds`` per call) is
    checked after every run of every call rather than after rounds of several seconds each.
    Every call gets at least ``min(runs, min_runs)`` timed runs, after ``warmup`` untimed ones
    (one for calls of ``_LONG_CALL_SECONDS`` or more).
    """
    slowest = 0.0
    for call in calls.values():
        for _ in range(warmup):
            start = time.perf_counter()
            call()
            took = time.perf_counter() - start
            slowest = max(slowest, took)
            if took >= _LONG_CALL_SECONDS:
                break
    times: dict[int, list[float]] = {key: [] for key in calls}
    chunk = 1 if slowest >= _SLOW_CALL_SECONDS else max(1, min(10, runs // 5 or 1))
    deadline = time.perf_counter() + max_seconds * len(calls)
    done = 0
    while done < runs:
        step = min(chunk, runs - done)
        for key, call in calls.items():
            series = times[key]
            for _ in range(step):
                start = time.perf_counter()
                call()
                series.append(time.perf_counter() - start)
        done += step
        if on_round is not None:
            on_round(done)
        if time.perf_counter() > deadline and done >= min(runs, min_runs):
            break
    return times


# --------------------------------------------------------------------------- main entry


def measure_candidates(
    reference: CandidateModel,
    candidates: Sequence[CandidateModel],
    validation: SampleStream | Callable[[], Iterator[Sample]] | None,
    *,
    labels: npt.NDArray[np.int64] | None = None,
    config: MeasureConfig | None = None,
    progress: ProgressCallback | None = None,
    skip_batch_n: Callable[[Sequence[Measurement]], Mapping[str, str]] | None = None,
) -> list[Measurement]:
    """Measure ``reference`` and every candidate; returns one :class:`Measurement` each.

    The reference comes first in the result. Quality is ``None`` when there is no validation
    data (latency and memory are then taken on one synthetic sample). ``labels`` are indexed by
    each sample's position in its source (see :class:`SampleStream`).

    ``skip_batch_n`` (e.g. :func:`converters.select.refused_before_batch_n` with the budget)
    gets the measurements known after the batch-1 timing (``latency_bn`` ``None``) and returns
    ``{recipe: reason}`` for candidates not worth timing at batch N: they get no batch-N
    latency (and no batch-N memory probe), and a note says why. The reference is always timed.
    """
    cfg = config or MeasureConfig()
    models = [reference, *candidates]
    mixed = sorted({c.runtime for c in models} - {reference.runtime})
    if mixed:
        raise BadOption(
            f"candidates for {mixed} cannot be measured against a {reference.runtime} reference"
        )
    sessions: list[ModelRunner] = []
    for cand in models:
        try:
            sessions.append(open_runner(cand.path, runtime=cand.runtime, threads=cfg.threads))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RecipeFailed(
                f"{cand.recipe}: the candidate does not load in {cand.runtime}: {first}",
                recipe=cand.recipe,
            ) from exc
    spec = sessions[0].spec
    primary = primary_output(spec, cfg.primary_output)
    float_outputs = [o.name for o in spec.outputs if o.is_float]

    # 1. Quality: one streamed pass, every session runs each sample once.
    accumulators = [_QualityAccumulator(float_outputs, primary) for _ in candidates]
    ref_correct = 0
    ref_labelled = 0
    kept: list[Sample] = []  # the first batch_size samples, reused for latency and diagnostics
    keep = max(cfg.batch_size, cfg.diagnostic_samples)
    count = 0
    total = validation.length_hint if isinstance(validation, SampleStream) else None
    if validation is not None:
        for index, sample in _indexed(validation):
            ref_out = sessions[0].run(sample)
            label: int | None = None
            if labels is not None:
                if index >= labels.shape[0]:
                    raise CalibrationDataError(
                        f"labels: {labels.shape[0]} labels for at least {index + 1} samples"
                    )
                label = int(labels[index])
                ref_pred = predictions(ref_out[primary])
                if ref_pred is not None and ref_pred.size == 1:
                    ref_labelled += 1
                    ref_correct += int(ref_pred[0] == label)
            for session, accumulator in zip(sessions[1:], accumulators, strict=True):
                accumulator.add(ref_out, session.run(sample), label)
            if len(kept) < keep:
                kept.append(sample)
            count += 1
            report(progress, Progress("validate", "all candidates", count, total))
        if count == 0:
            raise CalibrationDataError("validation data produced no samples")
    if not kept:
        kept = [synthetic_sample(spec)]

    # 2. Latency, interleaved across sessions.
    b1_feed = kept[0]
    n = cfg.batch_size
    batch_samples = [kept[i % len(kept)] for i in range(n)]
    bn_feed = batch_feed(batch_samples, spec)
    mode: Literal["batched", "looped"] = "batched" if bn_feed is not None else "looped"

    def call_b1(index: int) -> Callable[[], object]:
        return sessions[index].timed_call(b1_feed)

    def call_bn(index: int) -> Callable[[], object]:
        if bn_feed is not None:
            return sessions[index].timed_call(bn_feed)
        calls = [sessions[index].timed_call(s) for s in batch_samples]
        return lambda: [call() for call in calls]

    keys = range(len(models))
    report(progress, Progress("latency", "batch 1", 0, cfg.iterations))
    b1_times = _time_interleaved(
        {i: call_b1(i) for i in keys},
        warmup=cfg.warmup,
        runs=cfg.iterations,
        max_seconds=cfg.max_seconds,
        on_round=lambda d: report(progress, Progress("latency", "batch 1", d, cfg.iterations)),
    )
    qualities = _qualities(
        accumulators, float_outputs, primary, count, ref_correct, ref_labelled, validation
    )
    skipped: Mapping[str, str] = {}
    if skip_batch_n is not None and n > 1:
        early = [
            Measurement(
                recipe=cand.recipe,
                precision=cand.precision,
                path=str(cand.path),
                file_size_bytes=Path(cand.path).stat().st_size,
                latency_b1=_latency(b1_times[i], 1, "batched"),
                latency_bn=None,
                quality=qualities[i],
                reference=i == 0,
            )
            for i, cand in enumerate(models)
        ]
        skipped = {k: v for k, v in skip_batch_n(early).items() if k != reference.recipe}
    bn_keys = [i for i in keys if models[i].recipe not in skipped]
    bn_times: dict[int, list[float]] = {}
    if n > 1:
        label_n = f"batch {n}"
        report(progress, Progress("latency", label_n, 0, cfg.batch_iterations))
        bn_times = _time_interleaved(
            {i: call_bn(i) for i in bn_keys},
            warmup=min(cfg.warmup, 2),
            runs=cfg.batch_iterations,
            max_seconds=cfg.max_seconds,
            on_round=lambda d: report(
                progress, Progress("latency", label_n, d, cfg.batch_iterations)
            ),
        )
    sessions.clear()  # free the sessions before the memory probes

    # 3. Memory, 4. layer diagnostics, and assembly.
    feed_b1 = {k: (tuple(v.shape), v.dtype.name) for k, v in b1_feed.items()}
    feed_bn = (
        {k: (tuple(v.shape), v.dtype.name) for k, v in bn_feed.items()}
        if bn_feed is not None
        else None
    )
    results: list[Measurement] = []
    for i, cand in enumerate(models):
        report(progress, Progress("memory", cand.recipe, i, len(models)))
        timed_bn = i in bn_times
        memory = measure_memory(
            cand.path,
            [feed_b1, feed_bn] if feed_bn is not None and timed_bn else [feed_b1],
            mode=cfg.memory,
            threads=cfg.threads,
            runtime=cand.runtime,
        )
        quality = qualities[i]
        layers: tuple[LayerError, ...] = ()
        notes: list[str] = []
        if cand.recipe in skipped:
            notes.append(f"batch-{n} latency not measured: {skipped[cand.recipe]}")
        if cfg.layer_diagnostics and cand.precision == "int8" and validation is not None:
            report(progress, Progress("diagnose", cand.recipe, 0, 1))
            try:
                if cand.diagnose is not None:
                    found = cand.diagnose(
                        Path(reference.path), kept[: cfg.diagnostic_samples], cfg.top_layers
                    )
                    layers = tuple(LayerError(**layer) for layer in found)
                elif cand.runtime == RUNTIME_ONNX:
                    layers = layer_errors(
                        reference.path,
                        cand.path,
                        kept[: cfg.diagnostic_samples],
                        top=cfg.top_layers,
                        threads=cfg.threads,
                    )
                else:
                    notes.append(f"layer diagnostics: none for {cand.runtime} {cand.recipe}")
            except Exception as exc:  # diagnostics are best effort, never fatal
                notes.append(f"layer diagnostics unavailable: {str(exc).splitlines()[0][:200]}")
        results.append(
            Measurement(
                recipe=cand.recipe,
                precision=cand.precision,
                path=str(cand.path),
                file_size_bytes=Path(cand.path).stat().st_size,
                latency_b1=_latency(b1_times[i], 1, "batched"),
                latency_bn=_latency(bn_times[i], n, mode) if timed_bn else None,
                quality=quality,
                memory=memory,
                layers=layers,
                reference=i == 0,
                notes=tuple(notes),
            )
        )
    report(progress, Progress("memory", "done", len(models), len(models)))
    return results


def _qualities(
    accumulators: Sequence[_QualityAccumulator],
    float_outputs: Sequence[str],
    primary: str,
    count: int,
    ref_correct: int,
    ref_labelled: int,
    validation: object | None,
) -> list[QualityStats | None]:
    """Quality per model, reference first; all ``None`` without validation data."""
    if validation is None:
        return [None] * (1 + len(accumulators))
    return [
        _reference_quality(float_outputs, primary, count, ref_correct, ref_labelled),
        *(acc.result(count) for acc in accumulators),
    ]


def _reference_quality(
    float_outputs: Sequence[str], primary: str, count: int, correct: int, labelled: int
) -> QualityStats:
    """The reference against itself: exact by definition (not re-run)."""
    return QualityStats(
        samples=count,
        primary_output=primary,
        top1_agreement=1.0,
        max_abs_error=0.0,
        mean_abs_error=0.0,
        cosine=1.0,
        cosine_min=1.0,
        accuracy=correct / labelled if labelled else None,
        outputs=tuple(OutputError(name, 0.0, 0.0, 1.0, 1.0) for name in float_outputs),
    )
