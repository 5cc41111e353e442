"""ONNX Runtime adapter.

Imports ``onnxruntime`` only when a model is loaded (never the ``onnx`` package: the agent does
not need the protobuf tooling, and devices do not have it). Execution providers come from the
device configuration; a provider this build of onnxruntime does not have is dropped with a
warning instead of failing the load, and the CPU provider always closes the list, so a config
written for a Jetson still runs (slowly) on a device without CUDA.

Two things here exist for speed, and both keep every guarantee of the public API:

* Requests go to the C++ session's ``run`` (``InferenceSession._sess.run``) rather than the
  Python wrapper ``InferenceSession.run``. The wrapper re-checks what the agent has already
  checked (input names, OrtValue ownership, WebGPU graph capture) and costs ~2.8 µs per call,
  a quarter of a small model's inference. Its one other job, falling back to CPU when an
  execution provider fails during a run, is kept: such a failure of the direct call is retried
  through the public ``run``, which does that fallback (see :meth:`OnnxRuntime._run_public`).
* Bundles may ask for graph optimizers to be switched off (a static-int8 QDQ model runs faster
  with ``QDQPropagationTransformer`` disabled). The request is read from the manifest at
  :data:`MANIFEST_DISABLED_OPTIMIZERS` and can be overridden by the agent's configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from device_agent.runtime.base import Runtime
from device_agent.runtime.spec import TensorSpec, merge_specs

__all__ = [
    "CPU_PROVIDER",
    "MANIFEST_DISABLED_OPTIMIZERS",
    "ORT_OPTIMIZERS",
    "OnnxRuntime",
    "disabled_optimizers_hint",
    "resolve_providers",
]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

#: Where a bundle manifest asks for onnxruntime graph optimizers to be switched off: the keys
#: from the manifest's top level down to a list of optimizer names. The one place that knows
#: this path (the converter writes it; change both together).
MANIFEST_DISABLED_OPTIMIZERS: tuple[str, ...] = (
    "runtime_hints",
    "onnxruntime",
    "disabled_optimizers",
)

#: Names onnxruntime 1.31 accepts in ``disabled_optimizers``: its graph transformers and the
#: rewrite rules inside its two rule-based transformers. onnxruntime itself ignores a name it
#: does not have without a word (checked with 1.31.1), so a misspelt name would silently
#: disable nothing; the agent warns instead. The transformers are those onnxruntime logs
#: ("Applying graph transformer ...") when a CPU session is created with verbose logging, plus
#: those it adds only under options or for other providers (GeluApproximation, Avx2WeightS8ToU8
#: Transformer, the MatMulNBits fusions, GqaValueLayoutTransformer); a test checks the logged
#: ones against the installed onnxruntime. Rule names are not logged; they come from the
#: rules' sources and differ from their class names (``Pad_Fusion``, ``ClipQuantRewrite``).
ORT_OPTIMIZERS: frozenset[str] = frozenset(
    {
        # graph transformers, levels 1-3 and the layout transformers
        "AttentionFusion",
        "Avx2WeightS8ToU8Transformer",
        "BiasDropoutFusion",
        "BiasGeluFusion",
        "BiasSkipLayerNormFusion",
        "BiasSoftmaxFusion",
        "CommonSubexpressionElimination",
        "ConstantFolding",
        "ConstantSharing",
        "ConvActivationFusion",
        "ConvAddActivationFusion",
        "DQMatMulNBitsFusion",
        "DoubleQDQPairsRemover",
        "DynamicQuantizeMatMulFusion",
        "EmbedLayerNormFusion",
        "EnsureUniqueDQForNodeUnit",
        "FastGeluFusion",
        "FreeDimensionOverrideTransformer",
        "FuseFp16InitializerToFp32NodeTransformer",
        "GatherSliceToSplitFusion",
        "GatherToSliceFusion",
        "GeluApproximation",
        "GeluFusionL1",
        "GeluFusionL2",
        "GemmActivationFusion",
        "GqaValueLayoutTransformer",
        "GroupQueryAttentionFusion",
        "GroupQueryAttentionPreNormFusion",
        "LayerNormFusionL1",
        "LayerNormFusionL2",
        "Level1_RuleBasedTransformer",
        "Level2_RuleBasedTransformer",
        "MatMulActivationFusion",
        "MatMulAddFusion",
        "MatMulIntegerToFloatFusion",
        "MatMulNBitsFusion",
        "MatMulNBitsMlpFusion",
        "MatMulNBitsQkvFusion",
        "MatMulScaleFusion",
        "MatmulTransposeFusion",
        "NchwcTransformer",
        "NhwcTransformer",
        "QDQFinalCleanupTransformer",
        "QDQPropagationTransformer",
        "QDQS8ToU8Transformer",
        "QDQSelectorActionTransformer",
        "QuickGeluFusion",
        "ReshapeFusion",
        "SimplifiedLayerNormFusion",
        "SkipLayerNormFusion",
        "SliceConcatToSpaceToDepthFusion",
        "TransposeOptimizer",
        "TransposeOptimizer_CPUExecutionProvider",
        "WeightBiasQuantization",
        "WhereDummyDq",
        # rewrite rules (Level1_/Level2_RuleBasedTransformer)
        "CastChainElimination",
        "CastElimination",
        "ClipQuantRewrite",
        "ConvAddFusion",
        "ConvBNFusion",
        "ConvMulFusion",
        "DivMulFusion",
        "EliminateDropout",
        "EliminateIdentity",
        "EliminateSlice",
        "ExpandElimination",
        "FuseReluClip",
        "GemmSumFusion",
        "GemmTransposeFusion",
        "LabelEncoderFusion",
        "MatMul_BatchNormalization_Fusion",
        "NoopElimination",
        "NotWhereFusion",
        "Pad_Fusion",
        "PreShapeNodeElimination",
        "ReluQuantRewrite",
        "UnsqueezeElimination",
    }
)

# ONNX tensor element types (as onnxruntime spells them) the agent can feed and read.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers this onnxruntime build has, in order, ending with CPU.

    Logs one warning naming every dropped provider: on a device, "TensorRT was configured but
    we are running on CPU" is the first thing an operator needs to know about slow inference.
    """
    if isinstance(requested, str):
        raise TypeError("providers must be a sequence of provider names, not a string")
    kept: list[str] = []
    dropped: list[str] = []
    for name in requested:
        if name in available and name not in kept:
            kept.append(name)
        elif name not in available and name not in dropped:
            dropped.append(name)
    if dropped:
        logger.warning(
            "onnxruntime %s: execution provider(s) %s not available in this build "
            "(available: %s); using %s",
            _ort_version(),
            ", ".join(dropped),
            ", ".join(available),
            ", ".join([*(p for p in kept if p != CPU_PROVIDER), CPU_PROVIDER]),
        )
    kept = [p for p in kept if p != CPU_PROVIDER]
    return [*kept, CPU_PROVIDER]


def disabled_optimizers_hint(manifest: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The optimizer names a bundle manifest asks to disable, or None when it asks nothing.

    Read from :data:`MANIFEST_DISABLED_OPTIMIZERS`. A malformed hint (not an object on the way
    down, not a list of names at the end) is logged as a warning and ignored: optimizers change
    how fast a graph runs, not what it computes (up to float rounding), so a bad hint must not
    stop a verified model from serving. Duplicates are dropped, order kept.
    """
    if manifest is None:
        return None
    node: Any = manifest
    for depth, key in enumerate(MANIFEST_DISABLED_OPTIMIZERS):
        if not isinstance(node, Mapping):
            where = ".".join(MANIFEST_DISABLED_OPTIMIZERS[:depth]) or "the manifest"
            logger.warning(
                "bundle manifest: %s must be an object, not %s; its onnxruntime hints are ignored",
                where,
                _kind(node),
            )
            return None
        node = node.get(key)
        if node is None:
            return None
    if not isinstance(node, list) or not all(isinstance(n, str) and n.strip() for n in node):
        logger.warning(
            "bundle manifest: %s must be a list of optimizer names, not %s; ignored",
            ".".join(MANIFEST_DISABLED_OPTIMIZERS),
            _short(node),
        )
        return None
    return tuple(dict.fromkeys(node))


class OnnxRuntime(Runtime):
    """An ONNX model in an ``onnxruntime.InferenceSession``.

    ``session.run`` is thread safe, so :meth:`predict` takes no lock. ``intra_op_threads``
    bounds the threads used inside one operator (the knob that matters on a small CPU);
    ``inter_op_threads`` only has an effect when operators run in parallel, so giving it a
    value above 1 also switches the session to parallel execution. ``disabled_optimizers``
    names graph optimizers the session must not apply; names onnxruntime does not have
    (:data:`ORT_OPTIMIZERS`) are logged as a warning and left out (``optimizers_from`` says
    where the list came from, for that message).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] = (CPU_PROVIDER,),
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        specs: Sequence[Mapping[str, Any] | TensorSpec] | None = None,
        disabled_optimizers: Sequence[str] = (),
        optimizers_from: str = "disabled_optimizers",
    ) -> None:
        _check_threads("intra_op_threads", intra_op_threads)
        _check_threads("inter_op_threads", inter_op_threads)
        if isinstance(disabled_optimizers, str) or not all(
            isinstance(n, str) for n in disabled_optimizers
        ):
            raise TypeError("disabled_optimizers must be a sequence of optimizer names")
        ort = _import_ort()
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
            if inter_op_threads > 1:
                options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        self._disabled = _known_optimizers(disabled_optimizers, optimizers_from, path.name)
        chosen = resolve_providers(providers, ort.get_available_providers())
        self._session: Any = _open_session(ort, path, options, chosen, self._disabled)
        self._version: str = ort.__version__
        self._providers = tuple(self._session.get_providers())
        missing = [p for p in chosen if p not in self._providers]
        if missing:
            logger.warning(
                "onnxruntime could not enable %s for %s; running on %s",
                ", ".join(missing),
                path.name,
                ", ".join(self._providers),
            )
        if self._disabled:
            logger.info(
                "onnxruntime session for %s: optimizers disabled (%s): %s",
                path.name,
                optimizers_from,
                ", ".join(self._disabled),
            )
        model_in = [_spec(arg, "input", path) for arg in self._session.get_inputs()]
        model_out = [_spec(arg, "output", path) for arg in self._session.get_outputs()]
        inputs, outputs = merge_specs(model_in, model_out, specs)
        # Public (manifest) name -> graph name; they differ only if a manifest used an alias.
        self._feed_names = {s.name: m.name for s, m in zip(inputs, model_in, strict=True)}
        self._fetch_names = [m.name for m in model_out]
        self._output_names = [s.name for s in outputs]
        # Feeds go to session.run as they are unless a manifest renamed an input.
        self._renamed = any(public != graph for public, graph in self._feed_names.items())
        self._call: _RunCall | None = _direct_run(self._session)
        # One output (the usual case) is named without zip(): see _named().
        self._single_output = self._output_names[0] if len(self._output_names) == 1 else None
        super().__init__(inputs=inputs, outputs=outputs)
        # predict()'s own fast path: feeds as given, outputs as onnxruntime returns them.
        self._direct = not self._renamed and all(s.quantization is None for s in outputs)
        self._direct_one = self._one_input if self._direct else None

    @property
    def version(self) -> str:
        return self._version

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def disabled_optimizers(self) -> tuple[str, ...]:
        """The optimizers this session was created without (unknown names left out)."""
        return self._disabled

    @property
    def intra_op_threads(self) -> int:
        """Threads per operator as the session reports it (0 means onnxruntime's default)."""
        return int(self._live_session().get_session_options().intra_op_num_threads)

    @property
    def inter_op_threads(self) -> int:
        """Threads across operators as the session reports it (0 means onnxruntime's default)."""
        return int(self._live_session().get_session_options().inter_op_num_threads)

    def close(self) -> None:
        # Both references: the bound C++ ``run`` alone would keep the session alive.
        self._call = None
        self._session = None

    def _live_session(self) -> Any:
        session = self._session
        if session is None:
            raise InferenceError("the onnxruntime session is closed")
        return session

    def predict(
        self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike
    ) -> dict[str, npt.NDArray[Any]]:
        """:meth:`Runtime.predict`, with an already-valid request served in this one frame.

        A request that :meth:`Runtime._fast_feeds` would pass goes straight to the session and
        its outputs straight back when no input is renamed and no output quantized (nothing to
        convert); anything else takes the common path, whose results and errors are the same.
        For a one-input model given a dict (the usual request) the check is inlined here: at
        batch 1 on a 10 µs model, the extra method call alone cost ~0.45 µs (measured). It
        also leaves out the C-contiguity test (~0.2 µs here): onnxruntime copies a strided
        array itself, and the common path would hand it the same array anyway.
        """
        one = self._direct_one
        feeds: dict[str, Any] | None = None
        if one is not None and type(inputs) is dict and len(inputs) == 1:
            # Runtime._fast_feeds for one input, the same tests in the same order.
            name, dtype, rank, fixed = one
            arr = inputs.get(name)
            if type(arr) is np.ndarray and arr.dtype is dtype:
                shape = arr.shape
                if rank is None or len(shape) == rank:
                    feeds = inputs
                    for axis, size in fixed:
                        if shape[axis] != size:
                            feeds = None
                            break
        elif self._direct:
            feeds = self._fast_feeds(inputs)
        if feeds is None:
            return super().predict(inputs)
        call = self._call
        if call is None:
            raise InferenceError("the onnxruntime session is closed")
        try:
            results = call(self._fetch_names, feeds, None)
        except Exception as exc:
            results = self._run_public(feeds, exc)
        single = self._single_output
        if single is not None:
            return {single: results[0]}
        return self._named(results)

    def _run(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        call = self._call
        if call is None:
            raise InferenceError("the onnxruntime session is closed")
        if self._renamed:
            feeds = {self._feed_names[name]: value for name, value in feeds.items()}
        try:
            results = call(self._fetch_names, feeds, None)
        except Exception as exc:
            results = self._run_public(feeds, exc)
        return self._named(results)

    def _named(self, results: list[Any]) -> dict[str, npt.NDArray[Any]]:
        """Name the session's results (ndarrays already: the only kind :func:`_spec` admits).

        ``{name: results[0]}`` for one output: ``dict(zip(...))`` costs ~0.9 µs right after
        an inference (measured), a tenth of a small model's run.
        """
        single = self._single_output
        if single is not None:
            return {single: results[0]}
        return dict(zip(self._output_names, results, strict=True))

    def _run_public(self, feeds: dict[str, npt.NDArray[Any]], first: Exception) -> list[Any]:
        """Handle a failure of the direct call: an :class:`InferenceError`, or a retry.

        The public ``InferenceSession.run`` adds one thing at run time: when an execution
        provider fails (``EPFail``) it recreates the session on its fallback providers and runs
        again. So that failure is retried through it, and the new C++ session is bound after.
        A ``TypeError`` may mean the direct call does not take these arguments in this
        onnxruntime: retried through the public ``run`` too, which is used from then on if it
        works. Anything else is the model failing on this request, which the public ``run``
        would report with the same exception: reported without running it again.
        """
        ep_failure = type(first).__name__ == "EPFail"
        if not (ep_failure or isinstance(first, TypeError)):
            raise InferenceError(f"onnxruntime failed: {_one_line(first)}") from first
        session = self._live_session()
        try:
            results: list[Any] = session.run(self._fetch_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {_one_line(exc)}") from exc
        if ep_failure:
            self._providers = tuple(session.get_providers())
            logger.warning(
                "onnxruntime: an execution provider failed during a run (%s); now running on %s",
                _one_line(first),
                ", ".join(self._providers),
            )
            self._call = _direct_run(session)
        else:
            logger.warning(
                "onnxruntime: the session's direct run failed (%s: %s) where "
                "InferenceSession.run succeeded; using InferenceSession.run from now on",
                type(first).__name__,
                _one_line(first),
            )
            self._call = session.run
        return results


#: ``run(output_names, feeds, run_options)`` of a session: the C++ one or the Python wrapper.
_RunCall = Callable[[list[str], dict[str, Any], Any], list[Any]]


def _direct_run(session: Any) -> _RunCall:
    """The C++ session's ``run`` behind ``session``, or ``session.run`` where there is none.

    ``InferenceSession._sess`` is private to onnxruntime but has had the same ``run(names,
    feeds, run_options)`` since 1.0; a build without it gets the public method, and a build
    whose direct call fails is switched to it by :meth:`OnnxRuntime._run_public`.
    """
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    return run if callable(run) else session.run  # type: ignore[no-any-return]


def _known_optimizers(names: Sequence[str], source: str, model: str) -> tuple[str, ...]:
    """``names`` without duplicates and without those onnxruntime does not have (warned)."""
    wanted = tuple(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in ORT_OPTIMIZERS]
    if unknown:
        logger.warning(
            "onnxruntime %s: ignoring %s in %s for %s: not an optimizer onnxruntime has "
            "(see docs/runtimes.md for the names)",
            _ort_version(),
            ", ".join(map(repr, unknown)),
            source,
            model,
        )
    return tuple(n for n in wanted if n in ORT_OPTIMIZERS)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except Exception as exc:
        raise RuntimeUnavailable(
            f"onnxruntime cannot be imported ({type(exc).__name__}: {_one_line(exc)}); "
            "install it with `pip install onnxruntime` (on Jetson, NVIDIA's onnxruntime-gpu "
            "wheel for your JetPack)"
        ) from exc
    return onnxruntime


def _ort_version() -> str:
    try:
        import onnxruntime
    except Exception:
        return "?"
    return str(onnxruntime.__version__)


def _open_session(
    ort: Any, path: Path, options: Any, providers: list[str], disabled: Sequence[str]
) -> Any:
    """Create the session; if an accelerator provider breaks it, retry on CPU alone.

    A provider can be present in the build yet fail at session creation (missing CUDA or
    TensorRT libraries, unsupported GPU): the device should keep serving on CPU and say so.
    ``disabled`` goes to onnxruntime's ``disabled_optimizers`` (a keyword its Python API
    accepts without documenting it; given only when non-empty).
    """
    extra: dict[str, Any] = {"disabled_optimizers": list(disabled)} if disabled else {}
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers, **extra)
    except Exception as exc:
        first = exc
    if providers != [CPU_PROVIDER]:
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=[CPU_PROVIDER], **extra
            )
        except Exception:
            pass
        else:
            logger.warning(
                "onnxruntime could not create a session for %s with %s (%s); running on %s",
                path.name,
                ", ".join(providers),
                _one_line(first),
                CPU_PROVIDER,
            )
            return session
    raise ModelLoadError(f"onnxruntime cannot load {path.name}: {_one_line(first)}") from first


def _spec(arg: Any, kind: str, path: Path) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(
            f"{path.name}: {kind} {arg.name!r} has type {arg.type}, which the agent cannot "
            f"exchange (tensors of {', '.join(sorted(set(_DTYPES.values())))} only)"
        )
    shape = arg.shape if isinstance(arg.shape, (list, tuple)) else []
    if not shape:
        # onnxruntime reports both a scalar and an unknown rank as []: claim nothing (it still
        # checks real scalars itself); a manifest can state the shape.
        return TensorSpec(name=arg.name, dtype=dtype, shape=None)
    dims = tuple(d if isinstance(d, (int, str)) and d != -1 else None for d in shape)
    return TensorSpec(name=arg.name, dtype=dtype, shape=dims)


def _check_threads(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _one_line(exc: BaseException) -> str:
    """A runtime message in one bounded line (onnxruntime's run to several lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "..."


def _kind(value: object) -> str:
    """How a JSON value is named in messages (``a list``, ``a string``)."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    """``repr(value)`` cut to a length that fits one log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
