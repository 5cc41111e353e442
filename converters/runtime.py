"""Model runners and feeds, configured the same way everywhere measurements are taken.

Every number edgekit reports comes from a real runtime: an onnxruntime ``InferenceSession`` on
the CPU execution provider, or a TFLite/LiteRT interpreter. Both default to one thread: on a
shared workstation that gives stable, comparable latencies, and edge devices run models on one
or few cores anyway.

:func:`open_runner` hides which one it is behind :class:`ModelRunner` (float-facing named inputs
and outputs, a :class:`~converters.model_spec.ModelSpec`), so that measurement, baseline
statistics and memory probes are written once for both runtimes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .calibration import Sample
from .model_spec import ModelSpec, TensorSpec, read_model_spec

__all__ = [
    "ORT_DISABLED_OPTIMIZERS",
    "RUNTIME_ONNX",
    "RUNTIME_TFLITE",
    "TFLITE_KERNELS",
    "ModelRunner",
    "Optimization",
    "OrtRunner",
    "TfliteKernels",
    "TfliteRunner",
    "batch_feed",
    "make_session",
    "open_runner",
    "run_session",
    "runtime_for_path",
    "runtime_hints",
    "synthetic_sample",
]

RUNTIME_ONNX = "onnxruntime"
RUNTIME_TFLITE = "tflite"

Optimization = Literal["all", "basic", "disable"]

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


ORT_DISABLED_OPTIMIZERS: tuple[str, ...] = ("QDQPropagationTransformer",)
"""Graph transformers switched off in every session edgekit measures with (and, through the
bundle's ``runtime_hints``, on devices). ``QDQPropagationTransformer`` moves a QuantizeLinear
above the MaxPool/Reshape/Transpose that precede it. When a float stem Conv feeds a MaxPool
and then the first int8 Conv (see ``onnx-int8-qdq``'s ``float_stem``), that turns the fast
float NCHWc MaxPool into a slow uint8 NCHW one: 73 -> 1379 µs per batch of 32 on the digits
CNN of ``benchmarks/bench_convert.py``, and the int8 model runs at 1.50x of fp32 instead of
0.71x. On the all-int8 digits CNN switching it off was neutral (1.16x of fp32 either way), as
it was on ResNet-18 int8. Models without QDQ nodes are unaffected."""


def _inference_session(
    source: str | bytes,
    options: ort.SessionOptions,
    disabled_optimizers: Sequence[str],
) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    if not disabled_optimizers:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    try:
        return ort.InferenceSession(
            source,
            sess_options=options,
            providers=providers,
            disabled_optimizers=list(disabled_optimizers),
        )
    except TypeError:
        # An onnxruntime without the keyword (it exists since 1.8; 1.31 accepts it and ignores
        # names it does not know): measure with the defaults rather than not at all.
        return ort.InferenceSession(source, sess_options=options, providers=providers)


def make_session(
    model: str | Path | bytes,
    *,
    threads: int | None = 1,
    optimization: Optimization = "all",
    disabled_optimizers: Sequence[str] = ORT_DISABLED_OPTIMIZERS,
    optimized_model_path: str | Path | None = None,
) -> ort.InferenceSession:
    """A CPU session; ``threads=None`` lets onnxruntime pick (all physical cores).

    ``disabled_optimizers`` defaults to :data:`ORT_DISABLED_OPTIMIZERS`, the setting the
    bundle asks devices to use, so that what is measured is what the device runs.
    ``optimized_model_path``: also write the graph as onnxruntime optimised it (fused and
    re-laid-out kernels), to see what actually runs.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return _inference_session(source, options, disabled_optimizers)


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


# --------------------------------------------------------------------------- runners


class ModelRunner(Protocol):
    """A loaded model behind one contract, whichever runtime runs it.

    ``spec`` describes what callers feed and receive: the *float-facing* view (a TFLite model
    with int8 I/O still takes and returns float32; the runner quantizes and dequantizes with the
    tensor's own parameters, as the device agent does). ``run`` takes one feed (any batch size
    the model accepts) and returns every output by name.
    """

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def runtime(self) -> str: ...

    def run(self, feed: Sample) -> dict[str, npt.NDArray[Any]]: ...

    def timed_call(self, feed: Sample) -> Callable[[], object]:
        """The cheapest call that does the full work for ``feed`` (what latency measures)."""
        ...


class OrtRunner:
    """An onnxruntime session (see :func:`make_session`) behind :class:`ModelRunner`."""

    runtime = RUNTIME_ONNX

    def __init__(
        self, path: str | Path, *, threads: int | None = 1, optimization: Optimization = "all"
    ) -> None:
        self._spec = read_model_spec(path)
        self.session = make_session(path, threads=threads, optimization=optimization)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def run(self, feed: Sample) -> dict[str, npt.NDArray[Any]]:
        return run_session(self.session, feed)

    def timed_call(self, feed: Sample) -> Callable[[], object]:
        session = self.session
        return lambda: session.run(None, feed)


TfliteKernels = Literal["default", "builtin", "reference"]
"""Which kernels a TFLite interpreter uses: ``default`` (the XNNPACK delegate where it applies,
what devices run), ``builtin`` (optimized built-in kernels, no delegate) or ``reference``
(TFLite's reference kernels, the numerical definition of each op)."""

_RESOLVERS = {
    "default": "AUTO",
    "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "reference": "BUILTIN_REF",
}


TFLITE_KERNELS: TfliteKernels = "default"
"""The kernels TFLite candidates are measured with, and the bundle's hint to devices.

XNNPACK (the default delegate) is the fastest for float32 *and* int8 on the AVX2 workstation
these figures come from (digits CNN, batch 32, 1 thread, µs per sample): fp32 64 with XNNPACK
vs 253 built-in; int8 113 with XNNPACK vs 200 built-in (ruy). Built-in int8 beats built-in
fp32 (0.8x), but not XNNPACK fp32, so switching kernels cannot make int8 the faster model there
(see docs/convert.md, "Why TFLite int8 is slower here")."""


def runtime_hints(runtime: str) -> dict[str, Any]:
    """The manifest's ``runtime_hints`` for a model measured with ``runtime``.

    The session settings every measurement was taken with, for the device to use too:
    ``{"onnxruntime": {"disabled_optimizers": [...]}}`` or ``{"tflite": {"op_resolver": ...}}``
    (the lower-cased name of LiteRT's ``OpResolverType``: ``auto`` = default delegates).
    """
    if runtime == RUNTIME_ONNX:
        return {"onnxruntime": {"disabled_optimizers": list(ORT_DISABLED_OPTIMIZERS)}}
    if runtime == RUNTIME_TFLITE:
        return {"tflite": {"op_resolver": _RESOLVERS[TFLITE_KERNELS].lower()}}
    raise ValueError(f"unknown runtime {runtime!r}")


def _signature_names(interpreter: Any, details: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Tensor index -> public name, by the device agent's rule.

    Signature keys when the model has exactly one signature that covers every input and output
    with distinct keys, else the TFLite tensor names: the names a device reports, so that
    measurement, golden sets and manifests all speak of the same tensors.
    """
    names = {int(d["index"]): str(d["name"]) for d in details}
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return names
        (key,) = signatures
        runner = interpreter.get_signature_runner(key)
        by_key = {**runner.get_input_details(), **runner.get_output_details()}
        del runner  # holds a reference that blocks resize_tensor_input while it lives
    except Exception:
        return names
    sig = {int(d["index"]): str(k) for k, d in by_key.items()}
    if set(sig) != set(names) or len(set(sig.values())) != len(sig):
        return names
    return sig


def _tflite_quant(detail: Mapping[str, Any]) -> tuple[float, int] | None:
    """Per-tensor ``(scale, zero_point)`` of an integer I/O tensor; ``None`` when not quantized."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale or float(scale) <= 0.0:
        return None
    return float(scale), int(zero_point)


class TfliteRunner:
    """A ``.tflite`` model in a TFLite/LiteRT interpreter behind :class:`ModelRunner`.

    The interpreter library is the device agent's choice (``ai_edge_litert``, else
    ``tflite_runtime``, else ``tensorflow.lite``). Inputs with a dynamic (``-1``) dimension are
    resized to each feed's shape, re-allocating only when the shape changes; a fixed-batch model
    given N samples runs them one at a time. Quantized integer inputs are quantized from float
    and integer outputs dequantized, with the arithmetic of :mod:`device_agent.runtime.quant`.
    """

    runtime = RUNTIME_TFLITE

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = 1,
        kernels: TfliteKernels = TFLITE_KERNELS,
        preserve_all_tensors: bool = False,
    ) -> None:
        from device_agent.runtime.tflite import load_interpreter_class

        interpreter_class, self.library, self.library_version = load_interpreter_class()
        module = sys.modules[interpreter_class.__module__]
        resolver_type = getattr(module, "OpResolverType", None)
        if resolver_type is None and self.library == "tensorflow":
            import tensorflow as tf

            resolver_type = tf.lite.experimental.OpResolverType
        options: dict[str, Any] = {}
        if resolver_type is not None:
            options["experimental_op_resolver_type"] = getattr(resolver_type, _RESOLVERS[kernels])
        elif kernels != "default":
            raise RuntimeError(f"{self.library} cannot select {kernels} kernels")
        if preserve_all_tensors:
            options["experimental_preserve_all_tensors"] = True
        from .tflite_source import captured_output

        # LiteRT announces its XNNPACK delegate on stderr; a library must not print.
        with captured_output():
            self.interpreter: Any = interpreter_class(
                model_path=str(path), num_threads=threads, **options
            )
            self.interpreter.allocate_tensors()
        in_details = list(self.interpreter.get_input_details())
        out_details = list(self.interpreter.get_output_details())
        names = _signature_names(self.interpreter, in_details + out_details)
        self._inputs = [(names[int(d["index"])], d) for d in in_details]
        self._outputs = [(names[int(d["index"])], d) for d in out_details]
        self._in_quant = {name: _tflite_quant(d) for name, d in self._inputs}
        self._out_quant = {name: _tflite_quant(d) for name, d in self._outputs}
        self._current = {name: tuple(int(x) for x in d["shape"]) for name, d in self._inputs}
        self._resizable = {
            name: tuple(int(x) == -1 for x in d.get("shape_signature", d["shape"]))
            for name, d in self._inputs
        }
        self._spec = ModelSpec(
            inputs=tuple(self._tensor_spec(n, d, self._in_quant[n]) for n, d in self._inputs),
            outputs=tuple(self._tensor_spec(n, d, self._out_quant[n]) for n, d in self._outputs),
            opset=0,
        )

    @staticmethod
    def _tensor_spec(
        name: str, detail: Mapping[str, Any], quant: tuple[float, int] | None
    ) -> TensorSpec:
        signature = detail.get("shape_signature")
        if signature is None or (len(signature) == 0 and len(detail["shape"]) > 0):
            signature = detail["shape"]
        shape = tuple(None if int(d) == -1 else int(d) for d in signature)
        dtype = np.dtype(np.float32) if quant is not None else np.dtype(detail["dtype"])
        return TensorSpec(name=name, shape=shape, dtype=dtype)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def output_quantization(self) -> dict[str, tuple[float, int] | None]:
        """``(scale, zero_point)`` of each quantized output (``None`` for float outputs)."""
        return dict(self._out_quant)

    @property
    def io_dtypes(self) -> dict[str, str]:
        """The model's own I/O dtypes by name (``int8`` for a full-integer model's I/O)."""
        return {name: np.dtype(d["dtype"]).name for name, d in self._inputs + self._outputs}

    def _fixed_batch_one(self, feed: Sample) -> int:
        """N when every input has a fixed batch of 1 and the feed holds N > 1 samples, else 0."""
        sizes = set()
        for name, _ in self._inputs:
            shape = self._current[name]
            if not shape or shape[0] != 1 or self._resizable[name][0]:
                return 0
            sizes.add(int(np.shape(feed[name])[0]) if np.ndim(feed[name]) else 1)
        return sizes.pop() if len(sizes) == 1 and next(iter(sizes)) > 1 else 0

    def _invoke(self, feed: Sample) -> dict[str, npt.NDArray[Any]]:
        from device_agent.runtime.quant import QuantParams, dequantize, quantize

        interpreter = self.interpreter
        changed = False
        for name, detail in self._inputs:
            shape = tuple(int(x) for x in np.shape(feed[name]))
            if shape != self._current[name]:
                interpreter.resize_tensor_input(int(detail["index"]), list(shape), strict=True)
                self._current[name] = shape
                changed = True
        if changed:
            interpreter.allocate_tensors()
        for name, detail in self._inputs:
            value = feed[name]
            quant = self._in_quant[name]
            if quant is not None:
                params = QuantParams(scale=(quant[0],), zero_point=(quant[1],))
                value = quantize(value, params, detail["dtype"])
            interpreter.set_tensor(int(detail["index"]), np.ascontiguousarray(value))
        interpreter.invoke()
        outputs: dict[str, npt.NDArray[Any]] = {}
        for name, detail in self._outputs:
            value = interpreter.get_tensor(int(detail["index"]))
            quant = self._out_quant[name]
            if quant is not None:
                value = dequantize(value, QuantParams(scale=(quant[0],), zero_point=(quant[1],)))
            outputs[name] = value
        return outputs

    def run(self, feed: Sample) -> dict[str, npt.NDArray[Any]]:
        batch = self._fixed_batch_one(feed)
        if not batch:
            return self._invoke(feed)
        parts = [self._invoke({k: v[i : i + 1] for k, v in feed.items()}) for i in range(batch)]
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}

    def timed_call(self, feed: Sample) -> Callable[[], object]:
        """Set inputs, invoke, read outputs: what the interpreter does for one request.

        Float inputs of a quantized model are quantized once, here, not in every timed run:
        that conversion belongs to the caller (a C++ caller does it in nanoseconds, the Python
        agent in tens of microseconds) and would otherwise dominate the latency of small
        models, hiding what the model itself costs.
        """
        if self._fixed_batch_one(feed):
            parts = [
                self.timed_call({k: v[i : i + 1] for k, v in feed.items()})
                for i in range(self._fixed_batch_one(feed))
            ]
            return lambda: [part() for part in parts]
        self._invoke(feed)  # resizes and allocates for this shape
        from device_agent.runtime.quant import QuantParams, quantize

        interpreter = self.interpreter
        prepared: list[tuple[int, npt.NDArray[Any]]] = []
        for name, detail in self._inputs:
            value = feed[name]
            quant = self._in_quant[name]
            if quant is not None:
                params = QuantParams(scale=(quant[0],), zero_point=(quant[1],))
                value = quantize(value, params, detail["dtype"])
            prepared.append((int(detail["index"]), np.ascontiguousarray(value)))
        outputs = [int(d["index"]) for _, d in self._outputs]

        def call() -> object:
            for index, value in prepared:
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            return [interpreter.get_tensor(index) for index in outputs]

        return call


def runtime_for_path(path: str | Path) -> str:
    """``tflite`` for ``.tflite`` files, else ``onnxruntime``."""
    return RUNTIME_TFLITE if Path(path).suffix.lower() == ".tflite" else RUNTIME_ONNX


def open_runner(
    path: str | Path, *, runtime: str | None = None, threads: int | None = 1
) -> ModelRunner:
    """Load ``path`` with ``runtime`` (by default from the file suffix)."""
    kind = runtime or runtime_for_path(path)
    if kind == RUNTIME_TFLITE:
        return TfliteRunner(path, threads=threads)
    if kind == RUNTIME_ONNX:
        return OrtRunner(path, threads=threads)
    raise ValueError(f"unknown runtime {kind!r}")
