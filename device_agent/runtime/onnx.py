"""ONNX Runtime adapter.

Imports ``onnxruntime`` only when a model is loaded (never the ``onnx`` package: the agent does
not need the protobuf tooling, and devices do not have it). Execution providers come from the
device configuration; a provider this build of onnxruntime does not have is dropped with a
warning instead of failing the load, and the CPU provider always closes the list, so a config
written for a Jetson still runs (slowly) on a device without CUDA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from device_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from device_agent.runtime.base import Runtime
from device_agent.runtime.spec import TensorSpec, merge_specs

__all__ = ["CPU_PROVIDER", "OnnxRuntime", "resolve_providers"]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

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


class OnnxRuntime(Runtime):
    """An ONNX model in an ``onnxruntime.InferenceSession``.

    ``session.run`` is thread safe, so :meth:`predict` takes no lock. ``intra_op_threads``
    bounds the threads used inside one operator (the knob that matters on a small CPU);
    ``inter_op_threads`` only has an effect when operators run in parallel, so giving it a
    value above 1 also switches the session to parallel execution.
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
    ) -> None:
        _check_threads("intra_op_threads", intra_op_threads)
        _check_threads("inter_op_threads", inter_op_threads)
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
        chosen = resolve_providers(providers, ort.get_available_providers())
        self._session: Any = _open_session(ort, path, options, chosen)
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
        model_in = [_spec(arg, "input", path) for arg in self._session.get_inputs()]
        model_out = [_spec(arg, "output", path) for arg in self._session.get_outputs()]
        inputs, outputs = merge_specs(model_in, model_out, specs)
        # Public (manifest) name -> graph name; they differ only if a manifest used an alias.
        self._feed_names = {s.name: m.name for s, m in zip(inputs, model_in, strict=True)}
        self._fetch_names = [m.name for m in model_out]
        self._output_names = [s.name for s in outputs]
        # Feeds go to session.run as they are unless a manifest renamed an input.
        self._renamed = any(public != graph for public, graph in self._feed_names.items())
        super().__init__(inputs=inputs, outputs=outputs)

    @property
    def version(self) -> str:
        return self._version

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def intra_op_threads(self) -> int:
        """Threads per operator as the session reports it (0 means onnxruntime's default)."""
        return int(self._live_session().get_session_options().intra_op_num_threads)

    @property
    def inter_op_threads(self) -> int:
        """Threads across operators as the session reports it (0 means onnxruntime's default)."""
        return int(self._live_session().get_session_options().inter_op_num_threads)

    def close(self) -> None:
        self._session = None

    def _live_session(self) -> Any:
        session = self._session
        if session is None:
            raise InferenceError("the onnxruntime session is closed")
        return session

    def _run(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        session = self._session
        if session is None:
            raise InferenceError("the onnxruntime session is closed")
        if self._renamed:
            feeds = {self._feed_names[name]: value for name, value in feeds.items()}
        try:
            results = session.run(self._fetch_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {_one_line(exc)}") from exc
        # Tensor outputs come back as ndarrays already (the only kind _spec admits).
        return dict(zip(self._output_names, results, strict=True))


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


def _open_session(ort: Any, path: Path, options: Any, providers: list[str]) -> Any:
    """Create the session; if an accelerator provider breaks it, retry on CPU alone.

    A provider can be present in the build yet fail at session creation (missing CUDA or
    TensorRT libraries, unsupported GPU): the device should keep serving on CPU and say so.
    """
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        first = exc
    if providers != [CPU_PROVIDER]:
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=[CPU_PROVIDER]
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
