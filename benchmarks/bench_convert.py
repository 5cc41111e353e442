"""What static int8 buys on this CPU, as ratios against the conversion targets.

Targets (issue: convert). On a small CNN trained on real data, static int8 must give:

* model size <= 0.30x fp32,
* a top-1 accuracy drop <= 0.5 points,
* batch-32 latency <= 0.9x fp32,

for both ONNX Runtime and TFLite; and ``--quantize auto`` on a ResNet-18-sized ONNX model must
finish within 3 minutes on 2 cores.

The small CNN is the scikit-learn digits set upsampled to 32x32 and a 16-32-64 channel
conv/pool network trained with Keras (~98% held-out accuracy); the same weights are exported to
ONNX (see ``_models.py``), so both runtimes are judged on one model. Every ratio comes from the
report ``converters`` writes; an independent timing of the same files with plain onnxruntime
sessions (and the LiteRT interpreter) in the same run cross-checks converters' figures. Ratios
are medians over ``--runs`` conversions, each of which timed fp32 and int8 interleaved.

The ONNX recipe keeps its one-channel stem conv float (``float_stem``) and every session runs
without ``QDQPropagationTransformer``; the previous recipe (``float_stem=False``) is measured in
the same run for comparison. ``--diagnose`` adds per-node profiles, option variants, the TFLite
kernel/thread/stem matrix and single-conv throughput (why TFLite int8 is not faster here).

    python benchmarks/bench_convert.py --runs 3 --diagnose --fresh --json bench_convert.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import inspect
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The sibling module _models is importable through the path set above.
from _models import (
    DigitsData,
    build_resnet18_onnx,
    keras_cnn_to_onnx,
    load_digits_data,
    train_digits_cnn,
)

import converters
from converters import MeasureConfig, Progress
from converters.runtime import ORT_DISABLED_OPTIMIZERS

TARGET_SIZE_RATIO = 0.30
TARGET_ACCURACY_DROP_POINTS = 0.5
TARGET_B32_LATENCY_RATIO = 0.90
TARGET_AUTO_SECONDS = 180.0

CACHE_VERSION = "v1"  # bump when _models.py changes what it builds
CALIBRATION_SAMPLES = 300  # converters' default max_samples
RESNET_CALIBRATION = 50
RESNET_VALIDATION = 32
QDQ = "onnx-int8-qdq"
# The recipe before float_stem existed: conv1 (one input channel) quantized. Its int8 im2col
# GEMM has K = 9 and runs ~6x slower than the fp32 NCHWc kernel (see --diagnose).
PREVIOUS_RECIPE: dict[str, dict[str, Any]] = {QDQ: {"float_stem": False}}
# Options the issue suspected; measured with --diagnose (on top of the shipped recipe).
DIAGNOSE_VARIANTS: dict[str, dict[str, Any]] = {
    "reduce_range=false": {"reduce_range": False},
    "per_channel=false": {"per_channel": False},
}


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class PairFigures:
    """fp32 reference vs one int8 candidate, from one conversion report."""

    recipe: str
    fp32_bytes: int
    int8_bytes: int
    fp32_accuracy: float
    int8_accuracy: float
    top1_agreement: float | None
    fp32_b1_ms: float
    int8_b1_ms: float
    fp32_b32_ms_per_sample: float
    int8_b32_ms_per_sample: float
    batch_mode: str
    seconds: float

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_drop_points(self) -> float:
        return (self.fp32_accuracy - self.int8_accuracy) * 100.0

    @property
    def b1_ratio(self) -> float:
        return self.int8_b1_ms / self.fp32_b1_ms

    @property
    def b32_ratio(self) -> float:
        return self.int8_b32_ms_per_sample / self.fp32_b32_ms_per_sample

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("size_ratio", "accuracy_drop_points", "b1_ratio", "b32_ratio"):
            data[name] = getattr(self, name)
        return data


def _measurements(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(c.get("measurement") or {}) | {"_candidate": c} for c in report["candidates"]]


def pair_from_report(
    report: Mapping[str, Any], recipe: str | None = None, *, seconds: float = 0.0
) -> PairFigures:
    """Extract fp32-vs-int8 figures; ``recipe=None`` takes the report's static int8 candidate.

    Written against the report schema only (``candidates[].measurement``), so that it reads the
    ONNX and the TFLite reports alike.
    """
    rows = _measurements(report)
    ref = next(m for m in rows if m.get("reference"))
    if recipe is None:
        int8 = [m for m in rows if m.get("precision") == "int8" and not m.get("reference")]
        static = [m for m in int8 if m["_candidate"].get("mode") == "int8"]
        if not (static or int8):
            raise LookupError("the report has no int8 candidate")
        cand = (static or int8)[0]
    else:
        cand = next(m for m in rows if m.get("recipe") == recipe)

    def latency(m: Mapping[str, Any], key: str, field: str) -> float:
        timed = m["latency"][key]  # None: auto skipped it (refused at batch 1)
        return float("nan") if timed is None else float(timed[field])

    return PairFigures(
        recipe=str(cand["recipe"]),
        fp32_bytes=int(ref["file_size_bytes"]),
        int8_bytes=int(cand["file_size_bytes"]),
        fp32_accuracy=float(ref["quality"]["accuracy"]),
        int8_accuracy=float(cand["quality"]["accuracy"]),
        top1_agreement=cand["quality"].get("top1_agreement"),
        fp32_b1_ms=latency(ref, "batch_1", "p50_ms"),
        int8_b1_ms=latency(cand, "batch_1", "p50_ms"),
        fp32_b32_ms_per_sample=latency(ref, "batch_n", "per_sample_p50_ms"),
        int8_b32_ms_per_sample=latency(cand, "batch_n", "per_sample_p50_ms"),
        batch_mode=str((cand["latency"]["batch_n"] or {}).get("mode", "not timed")),
        seconds=seconds,
    )


def median_pair(runs: Sequence[PairFigures]) -> dict[str, Any]:
    """Median of every figure over runs; ratios are medians of the per-run (paired) ratios."""
    keys = [
        "fp32_bytes",
        "int8_bytes",
        "fp32_accuracy",
        "int8_accuracy",
        "fp32_b1_ms",
        "int8_b1_ms",
        "fp32_b32_ms_per_sample",
        "int8_b32_ms_per_sample",
        "size_ratio",
        "accuracy_drop_points",
        "b1_ratio",
        "b32_ratio",
        "seconds",
    ]
    out: dict[str, Any] = {k: statistics.median(getattr(r, k) for r in runs) for k in keys}
    out["b32_ratio_range"] = [min(r.b32_ratio for r in runs), max(r.b32_ratio for r in runs)]
    out["recipe"] = runs[0].recipe
    out["runs"] = len(runs)
    return out


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """CPU, load and versions: the ratios are only meaningful next to these."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    versions: dict[str, str | None] = {}
    for dist in ("onnx", "onnxruntime", "numpy", "tensorflow-cpu", "keras", "ai-edge-litert"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "fma", "f16c")) or "vnni" in f),
        "vnni": any("vnni" in f for f in flags),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- models and data


@dataclass(frozen=True)
class DigitsModels:
    keras_path: Path
    onnx_path: Path
    data: DigitsData
    params: int
    keras_accuracy: float
    export_max_abs_diff: float
    train_seconds: float | None


def prepare_digits(cache: Path, *, fresh: bool) -> DigitsModels:
    """Train (or reuse) the digits CNN and its ONNX twin; check the twin matches Keras."""
    import keras
    import onnxruntime as ort

    data = load_digits_data()
    keras_path = cache / "digits_cnn.keras"
    onnx_path = cache / "digits_cnn.onnx"
    train_seconds: float | None = None
    if fresh or not keras_path.exists():
        start = time.perf_counter()
        model = train_digits_cnn(data)
        train_seconds = time.perf_counter() - start
        model.save(keras_path)
    else:
        model = keras.models.load_model(keras_path)
    if fresh or not onnx_path.exists():
        keras_cnn_to_onnx(model, onnx_path)
    keras_logits = np.asarray(model.predict(data.x_test, verbose=0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": data.nchw(data.x_test)})[0]
    return DigitsModels(
        keras_path=keras_path,
        onnx_path=onnx_path,
        data=data,
        params=int(model.count_params()),
        keras_accuracy=float(np.mean(keras_logits.argmax(1) == data.y_test)),
        export_max_abs_diff=float(np.max(np.abs(onnx_logits - keras_logits))),
        train_seconds=train_seconds,
    )


# --------------------------------------------------------------------------- timing helpers


def time_interleaved(
    calls: Mapping[str, Callable[[], object]], *, rounds: int, reps: int
) -> dict[str, float]:
    """Median seconds per call; calls alternate in rounds so load bursts hit all of them alike."""
    for call in calls.values():
        call()
        call()
    per_round: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            per_round[key].append(statistics.median(times))
    return {k: statistics.median(v) for k, v in per_round.items()}


def ort_session(
    path: Path, *, disabled: Sequence[str] = ORT_DISABLED_OPTIMIZERS, threads: int = 1
) -> Any:
    """An onnxruntime session configured like converters' (ENABLE_ALL, one intra-op thread).

    Written out here, not taken from converters, so that it is an independent check; the
    disabled optimizers are the bundle's hint (``disabled=()``: onnxruntime's defaults).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled) or None,
    )


def direct_ort(
    models: Mapping[str, tuple[Path, Sequence[str]]],
    data: DigitsData,
    *,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Accuracy and b1 / b32 latency of ONNX files with plain sessions, outside converters."""
    x_test = data.nchw(data.x_test)
    x1, x32 = x_test[:1], x_test[:32]
    sessions = {k: ort_session(path, disabled=dis) for k, (path, dis) in models.items()}
    result: dict[str, dict[str, float]] = {}
    for key, sess in sessions.items():
        logits = sess.run(None, {"image": x_test})[0]
        result[key] = {"accuracy": float(np.mean(logits.argmax(1) == data.y_test))}
    b1 = time_interleaved(
        {k: functools.partial(s.run, None, {"image": x1}) for k, s in sessions.items()},
        rounds=rounds,
        reps=20,
    )
    b32 = time_interleaved(
        {k: functools.partial(s.run, None, {"image": x32}) for k, s in sessions.items()},
        rounds=rounds,
        reps=5,
    )
    for key in sessions:
        result[key]["b1_ms"] = b1[key] * 1e3
        result[key]["b32_ms_per_sample"] = b32[key] * 1e3 / 32
    return result


# --------------------------------------------------------------------------- ONNX Runtime


def onnx_runs(
    models: DigitsModels,
    work: Path,
    *,
    quantize: str,
    runs: int,
    measure: MeasureConfig,
    recipe_options: Mapping[str, Mapping[str, Any]] | None = None,
    tag: str = "default",
) -> tuple[list[PairFigures], list[dict[str, Any]]]:
    """``runs`` conversions; returns per-run fp32-vs-int8 figures and the reports.

    ``allow_slower=True``: an explicit ``int8`` conversion that is slower than fp32 at batch 1
    raises ``SlowerThanReference`` otherwise, and then there are no figures to compare.
    """
    data = models.data
    calibration = data.nchw(data.x_train[:CALIBRATION_SAMPLES])
    validation = data.nchw(data.x_test)
    figures: list[PairFigures] = []
    reports: list[dict[str, Any]] = []
    for run in range(runs):
        out = work / f"onnx-{quantize}-{tag}-{run}"
        start = time.perf_counter()
        result = converters.convert_onnx(
            models.onnx_path,
            out_dir=out,
            quantize=quantize,
            calibration=calibration,
            validation=validation,
            labels=data.y_test,
            recipe_options=recipe_options,
            measure=measure,
            allow_slower=True,
        )
        seconds = time.perf_counter() - start
        figures.append(pair_from_report(result.report, QDQ, seconds=seconds))
        reports.append(result.report)
    return figures, reports


def chosen_summary(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``auto`` chose in each run, and the chosen candidate's ratios vs fp32."""
    chosen = []
    for report in reports:
        name = report["selection"]["chosen"]
        rows = {m["recipe"]: m for m in _measurements(report)}
        ref = next(m for m in rows.values() if m.get("reference"))
        pick = rows[name]
        chosen.append(
            {
                "chosen": name,
                "fallback": report["selection"].get("fallback"),
                "size_ratio": pick["file_size_bytes"] / ref["file_size_bytes"],
                "b1_ratio": pick["latency"]["batch_1"]["p50_ms"]
                / ref["latency"]["batch_1"]["p50_ms"],
                "b32_ratio": pick["latency"]["batch_n"]["per_sample_p50_ms"]
                / ref["latency"]["batch_n"]["per_sample_p50_ms"],
                "reasons": {
                    v["recipe"]: v["reasons"]
                    for v in report["selection"]["verdicts"]
                    if v.get("reasons")
                },
            }
        )
    # Stability: equally fast variants must not flip from run to run (speed_tolerance).
    return {"runs": chosen, "same_choice_every_run": len({c["chosen"] for c in chosen}) == 1}


# --------------------------------------------------------------------------- TFLite


def tflite_edgekit_runs(
    models: DigitsModels, work: Path, *, quantize: str, runs: int, measure: MeasureConfig
) -> tuple[list[PairFigures], list[dict[str, Any]]]:
    """``converters.convert_tflite(quantize=...)`` on the Keras model, if it exists yet.

    Only the keyword arguments the function accepts are passed (it is being written while this
    benchmark is), and ``allow_slower`` for the same reason as on the ONNX side.
    """
    convert_tflite = converters.convert_tflite
    accepted = set(inspect.signature(convert_tflite).parameters)
    data = models.data
    figures: list[PairFigures] = []
    reports: list[dict[str, Any]] = []
    for run in range(runs):
        kwargs: dict[str, Any] = {
            "out_dir": work / f"tflite-{quantize}-{run}",
            "quantize": quantize,
            "calibration": data.x_train[:CALIBRATION_SAMPLES],
            "validation": data.x_test,
            "labels": data.y_test,
            "measure": measure,
            "allow_slower": True,
        }
        start = time.perf_counter()
        with _quiet():
            result = convert_tflite(
                models.keras_path, **{k: v for k, v in kwargs.items() if k in accepted}
            )
        seconds = time.perf_counter() - start
        figures.append(pair_from_report(result.report, seconds=seconds))
        reports.append(result.report)
    return figures, reports


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence TensorFlow and TFLiteConverter, which print from C++ straight to fds 1 and 2.

    Redirecting ``sys.stdout`` is not enough for those (the converter's "fully_quantize: ..."
    line and the absl/oneDNN start-up banners), so the file descriptors are redirected too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def tflite_reference_models(models: DigitsModels) -> dict[str, bytes]:
    """fp32 and full-integer (float I/O) TFLite files made with TFLiteConverter directly.

    An independent reference for what converters' TFLite path should reach: same Keras model,
    same 300 calibration samples, the converter's standard int8 recipe (and, for --diagnose,
    the same with per-tensor weight scales).
    """
    import keras
    import tensorflow as tf

    model = keras.models.load_model(models.keras_path)
    calibration = models.data.x_train[:CALIBRATION_SAMPLES]

    def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(calibration.shape[0]):
            yield [calibration[i : i + 1]]

    out = {}
    with _quiet():
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        out["fp32"] = converter.convert()
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        out["int8"] = converter.convert()
        # Per-tensor weight scales (a private converter switch): one of the suspects, --diagnose.
        converter._experimental_disable_per_channel = True
        out["int8 per-tensor"] = converter.convert()
    return out


class LiteRT:
    """One LiteRT interpreter at a fixed batch size (1 thread, XNNPACK unless disabled).

    ``prepare`` turns float images into what the input tensor takes: models with int8 I/O (the
    default of converters' ``tflite-int8``) get them quantized with the input's scale and zero
    point. Preparation is kept out of ``invoke`` so that timing covers the interpreter only, as
    converters' own measurement does.
    """

    def __init__(
        self, content: bytes, batch: int, *, xnnpack: bool = True, threads: int = 1
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = (
            OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
        with _quiet():
            self.interp = Interpreter(
                model_content=content, num_threads=threads, experimental_op_resolver_type=resolver
            )
        self.inp = self.interp.get_input_details()[0]
        self.interp.resize_tensor_input(self.inp["index"], [batch, *self.inp["shape"][1:]])
        self.interp.allocate_tensors()
        self.out = self.interp.get_output_details()[0]

    def prepare(self, x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        dtype = np.dtype(self.inp["dtype"])
        if dtype.kind != "i":
            return x
        scale, zero = self.inp["quantization"]
        info = np.iinfo(dtype)
        return np.asarray(np.clip(np.round(x / scale) + zero, info.min, info.max), dtype=dtype)

    def invoke(self, prepared: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.interp.set_tensor(self.inp["index"], prepared)
        self.interp.invoke()
        return np.asarray(self.interp.get_tensor(self.out["index"]))

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        y = self.invoke(self.prepare(x))
        scale, zero = self.out["quantization"]
        if y.dtype.kind == "i" and scale:
            return np.asarray((y.astype(np.float32) - zero) * scale, dtype=np.float32)
        return y.astype(np.float32)


def direct_tflite(
    files: Mapping[str, bytes],
    data: DigitsData,
    *,
    rounds: int,
    xnnpack: bool = True,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """Accuracy and b1 / b32 latency with the LiteRT interpreter (1 thread, XNNPACK default)."""
    x1, x32 = data.x_test[:1], data.x_test[:32]
    result: dict[str, dict[str, float]] = {}
    b1_calls: dict[str, Callable[[], object]] = {}
    b32_calls: dict[str, Callable[[], object]] = {}
    for key, content in files.items():
        whole = LiteRT(content, data.x_test.shape[0], xnnpack=xnnpack, threads=threads)
        logits = whole.predict(data.x_test)
        result[key] = {"accuracy": float(np.mean(logits.argmax(1) == data.y_test))}
        r1 = LiteRT(content, 1, xnnpack=xnnpack, threads=threads)
        r32 = LiteRT(content, 32, xnnpack=xnnpack, threads=threads)
        f1, f32 = r1.prepare(x1), r32.prepare(x32)
        b1_calls[key] = functools.partial(r1.invoke, f1)
        b32_calls[key] = functools.partial(r32.invoke, f32)
    b1 = time_interleaved(b1_calls, rounds=rounds, reps=20)
    b32 = time_interleaved(b32_calls, rounds=rounds, reps=5)
    for key in files:
        result[key]["b1_ms"] = b1[key] * 1e3
        result[key]["b32_ms_per_sample"] = b32[key] * 1e3 / 32
    return result


# --------------------------------------------------------------------------- diagnosis


def ort_node_profile(
    path: Path,
    x: npt.NDArray[np.float32],
    *,
    runs: int = 100,
    disabled: Sequence[str] = ORT_DISABLED_OPTIMIZERS,
) -> list[Any]:
    """Per-node kernel time (µs per run) from onnxruntime's profiler, largest first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(disabled) or None,
        )
        for _ in range(runs):
            session.run(None, {"image": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[tuple[str, str], float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["name"].removesuffix("_kernel_time"))
            totals[key] = totals.get(key, 0.0) + event["dur"] / runs
    return sorted(([op, node, us] for (op, node), us in totals.items()), key=lambda r: -r[2])


def tflite_prefix_costs(models: DigitsModels, *, rounds: int) -> dict[str, dict[str, float]]:
    """b32 µs/sample of the network cut after each stage, fp32 vs int8 (XNNPACK).

    LiteRT has no per-op profiler in Python; differences between consecutive prefixes give
    each stage's cost.
    """
    import keras
    import tensorflow as tf

    full = keras.models.load_model(models.keras_path)
    calibration = models.data.x_train[:CALIBRATION_SAMPLES]

    def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(calibration.shape[0]):
            yield [calibration[i : i + 1]]

    calls: dict[str, Callable[[], object]] = {}
    x32 = models.data.x_test[:32]
    for upto in ("conv1", "pool1", "pool2", "pool3", "logits"):
        sub = keras.Model(full.inputs, full.get_layer(upto).output)
        for precision in ("fp32", "int8"):
            with _quiet():
                converter = tf.lite.TFLiteConverter.from_keras_model(sub)
                if precision == "int8":
                    converter.optimizations = [tf.lite.Optimize.DEFAULT]
                    converter.representative_dataset = representative
                    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                runner = LiteRT(converter.convert(), 32)
            feed = runner.prepare(x32)
            calls[f"{upto}/{precision}"] = functools.partial(runner.invoke, feed)
    times = time_interleaved(calls, rounds=rounds, reps=5)
    out: dict[str, dict[str, float]] = {}
    for key, seconds in times.items():
        upto, precision = key.split("/")
        out.setdefault(upto, {})[precision] = seconds * 1e6 / 32
    return out


def tflite_float_stem_model(models: DigitsModels) -> bytes:
    """Full int8 with conv1 left float: TFLite's selective quantization (QuantizationDebugger
    ``denylisted_nodes``), the TFLite counterpart of the ONNX ``float_stem``."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    model = keras.models.load_model(models.keras_path)
    calibration = models.data.x_train[:CALIBRATION_SAMPLES]

    def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(calibration.shape[0]):
            yield [calibration[i : i + 1]]

    def converter() -> Any:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        return conv

    with _quiet():
        interp = Interpreter(model_content=converter().convert())
        tensors = interp.get_tensor_details()
        conv1 = next(
            tensors[op["outputs"][0]]["name"]
            for op in interp._get_ops_details()
            if op["op_name"] == "CONV_2D"
        )
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter(),
            debug_dataset=lambda: ([calibration[i : i + 1]] for i in range(16)),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=[conv1]),
        )
        return bytes(debugger.get_nondebug_quantized_model())


def tflite_kernel_matrix(
    files: Mapping[str, bytes], data: DigitsData, *, rounds: int
) -> dict[str, dict[str, float]]:
    """b32 µs/sample of every file with XNNPACK / built-in kernels and 1 / 2 threads."""
    x32 = data.x_test[:32]
    calls: dict[str, Callable[[], object]] = {}
    for key, content in files.items():
        for kernels in ("xnnpack", "builtin"):
            for threads in (1, 2):
                runner = LiteRT(content, 32, xnnpack=kernels == "xnnpack", threads=threads)
                feed = runner.prepare(x32)
                calls[f"{key}|{kernels}|{threads}"] = functools.partial(runner.invoke, feed)
    times = time_interleaved(calls, rounds=rounds, reps=5)
    out: dict[str, dict[str, float]] = {}
    for label, seconds in times.items():
        name, kind, count = label.split("|")
        out.setdefault(name, {})[f"{kind}, {count} thread(s)"] = seconds * 1e6 / 32
    return out


def single_conv_throughput(*, rounds: int) -> list[dict[str, Any]]:
    """GMAC/s of one 3x3 conv (+ReLU), fp32 vs int8, in LiteRT/XNNPACK and in onnxruntime.

    Random weights and inputs; batch 32, 1 thread. What each runtime's int8 kernels gain over
    its fp32 kernels on this CPU, free of any network structure.
    """
    import keras
    import tensorflow as tf
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, x: npt.NDArray[np.float32]) -> None:
            self.items = iter([{"x": x[i : i + 1]} for i in range(x.shape[0])])

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            return next(self.items, None)

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cin, cout, hw in ((1, 16, 32), (16, 32, 16), (64, 64, 16)):
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((hw, hw, cin)),
                    keras.layers.Conv2D(cout, 3, padding="same", activation="relu"),
                ]
            )
            cal = rng.random((64, hw, hw, cin), dtype=np.float32)
            with _quiet():
                fp32 = tf.lite.TFLiteConverter.from_keras_model(model).convert()
                conv = tf.lite.TFLiteConverter.from_keras_model(model)
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.representative_dataset = lambda cal=cal: (
                    [cal[i : i + 1]] for i in range(cal.shape[0])
                )
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                conv.inference_input_type = tf.int8
                conv.inference_output_type = tf.int8
                int8 = conv.convert()
            kernel, bias = model.layers[0].get_weights()
            nodes = [
                helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
                helper.make_node("Relu", ["c"], ["y"], name="relu"),
            ]
            graph = helper.make_graph(
                nodes,
                "conv",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                [
                    numpy_helper.from_array(kernel.transpose(3, 2, 0, 1).copy(), "w"),
                    numpy_helper.from_array(bias, "b"),
                ],
            )
            onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            onnx_model.ir_version = 9
            f_path, q_path = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
            onnx.save(onnx_model, str(f_path))
            with _quiet():
                quantize_static(
                    str(f_path),
                    str(q_path),
                    Reader(np.ascontiguousarray(cal.transpose(0, 3, 1, 2))),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
            x = rng.random((32, hw, hw, cin), dtype=np.float32)
            x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            calls: dict[str, Callable[[], object]] = {}
            for key, content in (("LiteRT fp32", fp32), ("LiteRT int8", int8)):
                runner = LiteRT(content, 32)
                feed = runner.prepare(x)
                calls[key] = functools.partial(runner.invoke, feed)
            for key, path in (("ORT fp32", f_path), ("ORT int8", q_path)):
                session = ort_session(path)
                calls[key] = functools.partial(session.run, None, {"x": x_nchw})
            times = time_interleaved(calls, rounds=rounds, reps=5)
            macs = 32 * hw * hw * cin * cout * 9
            rows.append(
                {
                    "layer": f"{cin}->{cout} 3x3 on {hw}x{hw}",
                    "gemm_depth": cin * 9,
                    **{f"{k} GMAC/s": macs / t / 1e9 for k, t in times.items()},
                }
            )
    return rows


# --------------------------------------------------------------------------- ResNet-18


def _phase(event: Progress) -> str:
    if event.stage in ("recipe", "calibrate"):
        return "convert+calibrate"
    if event.stage == "latency":
        return f"latency {event.label}"
    if event.stage in ("memory", "diagnose"):
        return "memory+diagnose"
    if event.stage in ("golden", "baseline"):
        return "golden+baseline"
    return str(event.stage)


def resnet_auto(
    path: Path, work: Path, *, runs: int, measure: MeasureConfig | None = None, tag: str = ""
) -> dict[str, Any]:
    """Wall time of ``convert_onnx(quantize="auto")`` with default measurement settings.

    The defaults are what ``edgekit convert`` uses (batch 32, one thread), so this is the time
    a user waits, minus bundle signing. Random inputs stand in for images; with random weights
    accuracy is meaningless and top-1 agreement is what the budget checks.
    """
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((RESNET_CALIBRATION, 3, 224, 224), dtype=np.float32)
    validation = rng.standard_normal((RESNET_VALIDATION, 3, 224, 224), dtype=np.float32)
    walls: list[float] = []
    phases_per_run: list[dict[str, float]] = []
    last: dict[str, Any] = {}
    for run in range(runs):
        marks: list[tuple[float, str]] = []
        start = time.perf_counter()

        def on_progress(event: Progress, marks: list[tuple[float, str]] = marks) -> None:
            phase = _phase(event)
            if not marks or marks[-1][1] != phase:
                marks.append((time.perf_counter(), phase))

        result = converters.convert_onnx(
            path,
            out_dir=work / f"resnet18-auto{tag}-{run}",
            quantize="auto",
            calibration=calibration,
            validation=validation,
            measure=measure,
            progress=on_progress,
        )
        end = time.perf_counter()
        walls.append(end - start)
        phases: dict[str, float] = {}
        bounds = [start] + [t for t, _ in marks[1:]] + [end]
        for (_, phase), begin, finish in zip(marks, bounds[:-1], bounds[1:], strict=True):
            phases[phase] = phases.get(phase, 0.0) + finish - begin
        phases_per_run.append(phases)
        last = result.report
    candidates = []
    for m in _measurements(last):
        candidates.append(
            {
                "recipe": m["recipe"],
                "size_mib": m["file_size_bytes"] / 2**20,
                "b1_ms": m["latency"]["batch_1"]["p50_ms"],
                "b32_ms_per_sample": (m["latency"]["batch_n"] or {}).get("per_sample_p50_ms"),
                "top1_agreement": m["quality"]["top1_agreement"],
                "recipe_seconds": m["_candidate"].get("seconds"),
            }
        )
    return {
        "wall_s": statistics.median(walls),
        "wall_runs_s": walls,
        "phases_s": {k: statistics.median(p.get(k, 0.0) for p in phases_per_run) for k in phases},
        "phases_runs_s": phases_per_run,
        "chosen": last["selection"]["chosen"],
        "candidates": candidates,
        "calibration_samples": RESNET_CALIBRATION,
        "validation_samples": RESNET_VALIDATION,
    }


# --------------------------------------------------------------------------- printing


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "MISS"


def print_pairs(title: str, summary: Mapping[str, Any]) -> None:
    print(f"\n{title} (medians of {summary['runs']} conversions)")
    print(
        f"  size      fp32 {summary['fp32_bytes'] / 1024:8.1f} KiB  int8"
        f" {summary['int8_bytes'] / 1024:8.1f} KiB"
    )
    print(
        f"  accuracy  fp32 {summary['fp32_accuracy'] * 100:8.2f} %    int8"
        f" {summary['int8_accuracy'] * 100:8.2f} %"
    )
    print(
        f"  b1 p50    fp32 {summary['fp32_b1_ms'] * 1e3:8.1f} µs   int8"
        f" {summary['int8_b1_ms'] * 1e3:8.1f} µs"
    )
    print(
        f"  b32 p50   fp32 {summary['fp32_b32_ms_per_sample'] * 1e3:8.1f} µs/sample"
        f"  int8 {summary['int8_b32_ms_per_sample'] * 1e3:8.1f} µs/sample"
        f"  (b32 ratio per run {summary['b32_ratio_range'][0]:.2f}..."
        f"{summary['b32_ratio_range'][1]:.2f})"
    )


def print_direct(title: str, figures: Mapping[str, Mapping[str, float]], ref: str) -> None:
    print(f"\n{title}")
    base = figures[ref]
    for key, f in figures.items():
        print(
            f"  {key:40s} acc {f['accuracy'] * 100:6.2f} %   b1 {f['b1_ms'] * 1e3:7.1f} µs"
            f" ({f['b1_ms'] / base['b1_ms']:.2f}x)   b32 {f['b32_ms_per_sample'] * 1e3:7.1f}"
            f" µs/sample ({f['b32_ms_per_sample'] / base['b32_ms_per_sample']:.2f}x)"
        )


def print_auto(runtime: str, auto: Mapping[str, Any]) -> None:
    print(f"\n{runtime}, --quantize auto on the digits CNN, per run:")
    for i, run in enumerate(auto["runs"], start=1):
        print(
            f"  run {i}: chose {run['chosen']}{' (fallback)' if run['fallback'] else ''}:"
            f" size {run['size_ratio']:.2f}x, b1 {run['b1_ratio']:.2f}x,"
            f" b32 {run['b32_ratio']:.2f}x of fp32"
        )
    print(f"  same choice in every run: {auto['same_choice_every_run']}")
    for name, reasons in auto["runs"][-1]["reasons"].items():
        print(f"    last run, {name}: {'; '.join(reasons)}")


def print_targets(onnx: Mapping[str, Any], tflite: Mapping[str, Any] | None) -> None:
    def col(s: Mapping[str, Any] | None, key: str, limit: float | None, fmt: str) -> str:
        if s is None:
            return f"{'not available':>16s}"
        value = s[key]
        verdict = "" if limit is None else f" {_verdict(value, limit)}"
        return f"{fmt.format(value):>11s}{verdict:5s}"

    print("\nTargets: static int8 vs fp32 on the digits CNN (this CPU, 1 thread)")
    print(f"  {'figure':36s} {'target':>8s}   {'ONNX Runtime':>16s}   {'TFLite':>16s}")
    rows = [
        ("model size int8/fp32", "<= 0.30", "size_ratio", TARGET_SIZE_RATIO, "{:.3f}x"),
        (
            "top-1 accuracy drop (points)",
            "<= 0.5",
            "accuracy_drop_points",
            TARGET_ACCURACY_DROP_POINTS,
            "{:+.2f}",
        ),
        ("batch-32 latency int8/fp32", "<= 0.90", "b32_ratio", TARGET_B32_LATENCY_RATIO, "{:.2f}x"),
        ("batch-1 latency int8/fp32", "(info)", "b1_ratio", None, "{:.2f}x"),
    ]
    for label, target, key, limit, fmt in rows:
        print(
            f"  {label:36s} {target:>8s}   {col(onnx, key, limit, fmt)}   "
            f"{col(tflite, key, limit, fmt)}"
        )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="conversions per figure (median)")
    parser.add_argument(
        "--quick", action="store_true", help="1 run, shorter timing (smoke test, noisier)"
    )
    parser.add_argument("--skip-resnet", action="store_true", help="skip the ResNet-18 timing")
    parser.add_argument(
        "--diagnose", action="store_true", help="per-node ORT profile and TFLite per-stage costs"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"edgekit-bench-convert-{CACHE_VERSION}",
        help="trained/built models are kept here between invocations",
    )
    parser.add_argument("--fresh", action="store_true", help="retrain and rebuild the models")
    args = parser.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    rounds = 5 if args.quick else 15
    measure = (
        MeasureConfig(iterations=50, batch_iterations=20, max_seconds=2.0)
        if args.quick
        else MeasureConfig(iterations=200, batch_iterations=100)
    )
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"{env['date']}  {env['cpu']}  ({env['cpu_count']} CPUs, VNNI: {env['vnni']})")
    print("  " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    figures: dict[str, Any] = {"environment": env, "runs": runs, "measure": measure.to_dict()}

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-convert-") as tmp:
        work = Path(tmp)
        # 1. The model, trained once and cached.
        with _quiet():
            models = prepare_digits(args.cache_dir, fresh=args.fresh)
        trained = (
            f"trained in {models.train_seconds:.1f} s"
            if models.train_seconds is not None
            else "cached"
        )
        print(
            "\ndigits CNN 32x32x1 -> conv16-32-64 -> fc64 -> 10:"
            f" {models.params} params, {trained};"
            f" held-out accuracy {models.keras_accuracy * 100:.2f} % ({len(models.data.y_test)}"
            f" samples); ONNX export max |logit diff| vs Keras {models.export_max_abs_diff:.1e}"
        )
        figures["digits_model"] = {
            "params": models.params,
            "keras_accuracy": models.keras_accuracy,
            "export_max_abs_diff": models.export_max_abs_diff,
            "train_seconds": models.train_seconds,
            "train_samples": len(models.data.y_train),
            "test_samples": len(models.data.y_test),
            "calibration_samples": CALIBRATION_SAMPLES,
        }

        # 2. ONNX Runtime, the shipped recipe.
        int8_runs, int8_reports = onnx_runs(
            models, work, quantize="int8", runs=runs, measure=measure
        )
        onnx_summary = median_pair(int8_runs)
        qdq_config = next(c["config"] for c in int8_reports[-1]["candidates"] if c["recipe"] == QDQ)
        qdq_notes = next(c["notes"] for c in int8_reports[-1]["candidates"] if c["recipe"] == QDQ)
        print_pairs("ONNX Runtime, --quantize int8 (onnx-int8-qdq, default options)", onnx_summary)
        print("  " + "; ".join(n for n in qdq_notes if n.startswith("float stem")))
        print(f"  runtime_hints: {json.dumps(int8_reports[-1]['runtime_hints'])}")
        figures["onnx_int8"] = {
            "median": onnx_summary,
            "runs": [r.to_dict() for r in int8_runs],
            "config": qdq_config,
            "runtime_hints": int8_reports[-1]["runtime_hints"],
        }
        _, auto_reports = onnx_runs(models, work, quantize="auto", runs=runs, measure=measure)
        auto = chosen_summary(auto_reports)
        figures["onnx_auto"] = auto
        print_auto("ONNX Runtime", auto)

        # 3. The previous recipe (stem conv quantized), same run, for comparison.
        old_runs, old_reports = onnx_runs(
            models,
            work,
            quantize="int8",
            runs=runs,
            measure=measure,
            recipe_options=PREVIOUS_RECIPE,
            tag="quantized-stem",
        )
        old_summary = median_pair(old_runs)
        print_pairs(
            f"ONNX Runtime, previous recipe: recipe_options {json.dumps(PREVIOUS_RECIPE)}",
            old_summary,
        )
        figures["onnx_int8_quantized_stem"] = {
            "median": old_summary,
            "runs": [r.to_dict() for r in old_runs],
        }

        # 4. Independent cross-check with plain onnxruntime sessions.
        cands = {c["recipe"]: Path(c["path"]) for c in int8_reports[-1]["candidates"]}
        old_path = next(
            Path(c["path"]) for c in old_reports[-1]["candidates"] if c["recipe"] == QDQ
        )
        direct = direct_ort(
            {
                "fp32": (cands["onnx-fp32"], ORT_DISABLED_OPTIMIZERS),
                "int8 (shipped; bundle's runtime_hints)": (cands[QDQ], ORT_DISABLED_OPTIMIZERS),
                "int8 (shipped; ORT defaults, no hint)": (cands[QDQ], ()),
                "int8 stem quantized (previous)": (old_path, ORT_DISABLED_OPTIMIZERS),
                "int8 stem quantized, ORT defaults": (old_path, ()),
            },
            models.data,
            rounds=rounds,
        )
        print_direct(
            "Independent check: plain onnxruntime sessions (ENABLE_ALL, 1 thread), same files",
            direct,
            "fp32",
        )
        figures["onnx_direct"] = direct

        # 5. TFLite.
        tflite_summary: dict[str, Any] | None = None
        if hasattr(converters, "convert_tflite"):
            tfl_runs, tfl_reports = tflite_edgekit_runs(
                models, work, quantize="int8", runs=runs, measure=measure
            )
            tflite_summary = median_pair(tfl_runs)
            print_pairs("TFLite, convert_tflite(quantize='int8')", tflite_summary)
            figures["tflite_int8"] = {
                "median": tflite_summary,
                "runs": [r.to_dict() for r in tfl_runs],
                "config": next(
                    c["config"]
                    for c in tfl_reports[-1]["candidates"]
                    if c["recipe"] == tfl_runs[-1].recipe
                ),
            }
            _, tfl_auto_reports = tflite_edgekit_runs(
                models, work, quantize="auto", runs=runs, measure=measure
            )
            tfl_auto = chosen_summary(tfl_auto_reports)
            figures["tflite_auto"] = tfl_auto
            print_auto("TFLite", tfl_auto)
            ref_files = {
                f"edgekit {m['recipe']}": Path(m["path"]).read_bytes()
                for m in _measurements(tfl_reports[-1])
                if m.get("reference") or m["recipe"] == tfl_runs[-1].recipe
            }
        else:
            print("\nTFLite: not available yet (converters.convert_tflite does not exist)")
            figures["tflite_int8"] = None
            ref_files = {}
        with _quiet():
            reference = tflite_reference_models(models)
        files = {
            "TFLiteConverter fp32": reference["fp32"],
            "TFLiteConverter int8": reference["int8"],
            **ref_files,
        }
        tfl_direct = direct_tflite(files, models.data, rounds=rounds)
        for key, content in files.items():
            tfl_direct[key]["file_size_bytes"] = len(content)
        print_direct(
            "Independent reference: TFLiteConverter + LiteRT interpreter (XNNPACK, 1 thread)",
            tfl_direct,
            "TFLiteConverter fp32",
        )
        size_ratio = len(reference["int8"]) / len(reference["fp32"])
        print(f"  TFLiteConverter int8/fp32 size {size_ratio:.3f}x")
        figures["tflite_direct"] = tfl_direct

        print_targets(onnx_summary, tflite_summary)
        print(
            f"  (ONNX previous recipe, stem conv quantized: b32 {old_summary['b32_ratio']:.2f}x;"
            " TFLite: see --diagnose for why no kernel choice makes int8 faster on this CPU)"
        )

        # 6. Diagnosis.
        if args.diagnose:
            print("\nonnx-int8-qdq option variants on top of the shipped recipe (medians)")
            variants: dict[str, Any] = {}
            for label, options in DIAGNOSE_VARIANTS.items():
                var_runs, _ = onnx_runs(
                    models,
                    work,
                    quantize="int8",
                    runs=runs,
                    measure=measure,
                    recipe_options={QDQ: options},
                    tag=f"variant-{len(variants)}",
                )
                variants[label] = median_pair(var_runs) | {"options": options}
                v = variants[label]
                print(
                    f"  {label:22s} size {v['size_ratio']:.3f}x  accuracy"
                    f" {v['int8_accuracy'] * 100:.2f} % ({-v['accuracy_drop_points']:+.2f})"
                    f"  b1 {v['b1_ratio']:.2f}x  b32 {v['b32_ratio']:.2f}x"
                )
            x32 = models.data.nchw(models.data.x_test[:32])
            profile = {
                "fp32": ort_node_profile(cands["onnx-fp32"], x32),
                "int8 (shipped)": ort_node_profile(cands[QDQ], x32),
                "int8 (shipped), ORT defaults": ort_node_profile(cands[QDQ], x32, disabled=()),
                "int8 stem quantized": ort_node_profile(old_path, x32),
            }
            print("\nonnxruntime per-node kernel time at batch 32 (µs per run, 1 thread)")
            for key, rows in profile.items():
                total = sum(r[2] for r in rows)
                top = ", ".join(f"{node} {op} {us:.0f}" for op, node, us in rows[:6])
                print(f"  {key:30s} total {total:7.0f}: {top}")
            with _quiet():
                files["TFLiteConverter int8, conv1 float"] = tflite_float_stem_model(models)
            files["TFLiteConverter int8, per-tensor"] = reference["int8 per-tensor"]
            stem_direct = direct_tflite(
                {
                    k: files[k]
                    for k in ("TFLiteConverter fp32", "TFLiteConverter int8, conv1 float")
                },
                models.data,
                rounds=rounds,
            )
            print_direct(
                "LiteRT (XNNPACK, 1 thread): full int8 with conv1 left float (selective)",
                stem_direct,
                "TFLiteConverter fp32",
            )
            matrix_files = {
                k: files[k]
                for k in (
                    "TFLiteConverter fp32",
                    "TFLiteConverter int8",
                    "TFLiteConverter int8, per-tensor",
                    "TFLiteConverter int8, conv1 float",
                )
            }
            matrix = tflite_kernel_matrix(matrix_files, models.data, rounds=rounds)
            print("\nLiteRT b32 µs/sample by kernels and threads (same files)")
            for key, row in matrix.items():
                print(f"  {key:36s} " + "  ".join(f"{k} {v:6.1f}" for k, v in row.items()))
            best_ratio = {}
            for threads in (1, 2):
                cols = [f"{k}, {threads} thread(s)" for k in ("xnnpack", "builtin")]
                best_fp32 = min(matrix["TFLiteConverter fp32"][c] for c in cols)
                best_int8 = min(matrix[k][c] for k in matrix_files if "int8" in k for c in cols)
                best_ratio[threads] = best_int8 / best_fp32
                print(
                    f"  {threads} thread(s): best int8 / best fp32 = {best_ratio[threads]:.2f}x"
                    f" (target <= {TARGET_B32_LATENCY_RATIO})"
                )
            prefixes = tflite_prefix_costs(models, rounds=rounds)
            print("\nLiteRT (XNNPACK) b32 µs/sample of the network cut after each stage")
            for upto, costs in prefixes.items():
                print(f"  up to {upto:7s} fp32 {costs['fp32']:7.1f}   int8 {costs['int8']:7.1f}")
            convs = single_conv_throughput(rounds=rounds)
            print("\nOne 3x3 conv + ReLU, batch 32, 1 thread: GMAC/s (higher is faster)")
            for row in convs:
                print(
                    f"  {row['layer']:22s} depth {row['gemm_depth']:4d}   "
                    + "  ".join(
                        f"{k.removesuffix(' GMAC/s')} {v:5.1f}"
                        for k, v in row.items()
                        if k.endswith("GMAC/s")
                    )
                )
            figures["diagnosis"] = {
                "qdq_variants": variants,
                "ort_profile_b32_us": profile,
                "tflite_conv1_float": stem_direct,
                "tflite_kernel_matrix_b32_us": matrix,
                "tflite_best_int8_over_best_fp32": best_ratio,
                "tflite_prefix_us": prefixes,
                "single_conv_gmacs": convs,
            }

        # 7. ResNet-18, --quantize auto.
        if not args.skip_resnet:
            resnet_path = args.cache_dir / "resnet18.onnx"
            if args.fresh or not resnet_path.exists():
                build_resnet18_onnx(resnet_path)
            resnet = resnet_auto(resnet_path, work, runs=runs)
            resnet["size_mib"] = resnet_path.stat().st_size / 2**20
            figures["resnet18_auto"] = resnet
            print(
                f"\nResNet-18 ({resnet['size_mib']:.1f} MiB, random weights), --quantize auto,"
                f" {RESNET_CALIBRATION} calibration + {RESNET_VALIDATION} validation samples:"
            )
            print(
                f"  wall {resnet['wall_s']:.1f} s (runs: "
                + ", ".join(f"{w:.1f}" for w in resnet["wall_runs_s"])
                + f")  target <= {TARGET_AUTO_SECONDS:.0f} s:"
                f" {_verdict(resnet['wall_s'], TARGET_AUTO_SECONDS)}; chose {resnet['chosen']}"
            )
            for i, phases in enumerate(resnet["phases_runs_s"], start=1):
                print(f"  run {i}: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
            for c in resnet["candidates"]:
                b32 = c["b32_ms_per_sample"]
                b32_text = "not timed (refused at b1)" if b32 is None else f"{b32:7.1f} ms/sample"
                print(
                    f"  {c['recipe']:20s} {c['size_mib']:6.1f} MiB  b1 {c['b1_ms']:7.1f} ms"
                    f"  b32 {b32_text}  agreement {c['top1_agreement']:.3f}"
                )

    env["loadavg_end"] = list(os.getloadavg())
    print(f"\nload average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
