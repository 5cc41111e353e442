"""TFLite / LiteRT adapter.

Three libraries ship the same interpreter, and which one a device can install depends on its
Python and NumPy versions, so the interpreter class is looked up in order of preference:

1. ``ai_edge_litert.interpreter`` - LiteRT, the maintained package (NumPy 2).
2. ``tflite_runtime.interpreter`` - the legacy slim wheel. Every PyPI release (2.14 is the
   last) was built against NumPy 1: under NumPy 2 it fails on import (``AttributeError:
   _ARRAY_API not found``, ImportError, ...) or on first use. So a PyPI tflite-runtime is
   skipped under NumPy 2 without importing it, any exception on import means "try the next
   one", and so does a NumPy error while the model is opened.
3. ``tensorflow.lite`` - full TensorFlow, last because importing it costs seconds and hundreds
   of megabytes on a device.

Each library is imported only when a model is loaded, never at module import.

The interpreter is not thread safe (it owns its input and output buffers), so
:meth:`TFLiteRuntime.predict` serializes requests with a lock.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from device_agent.runtime.base import Runtime
from device_agent.runtime.quant import QuantParams
from device_agent.runtime.spec import TensorSpec, merge_specs

__all__ = [
    "INTERPRETER_LIBRARIES",
    "TFLiteRuntime",
    "interpreter_classes",
    "load_interpreter_class",
]

logger = logging.getLogger(__name__)

#: (library name, module to import) in the order they are tried.
INTERPRETER_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow"),
)

_INSTALL_HINT = (
    "install one with `pip install ai-edge-litert` (or `pip install tflite-runtime` on systems "
    "that must keep NumPy<2)"
)


def interpreter_classes(failures: list[str] | None = None) -> Iterator[tuple[type[Any], str, str]]:
    """Yield ``(Interpreter class, library name, library version)`` for each library that
    imports, in preference order, importing each only when the previous one was rejected.

    A library that cannot be used is logged at debug level with the reason and, when
    ``failures`` is given, appended to it as ``"library (reason)"``.
    """
    for library, module_name in INTERPRETER_LIBRARIES:
        reason = _known_incompatible(library)
        if reason is None:
            try:
                module = importlib.import_module(module_name)
                cls = module.lite.Interpreter if library == "tensorflow" else module.Interpreter
            except Exception as exc:
                reason = f"{type(exc).__name__}: {_one_line(exc)}"
                kind = type(exc).__name__
            else:
                version = _library_version(library)
                logger.debug("found the TFLite interpreter in %s %s", library, version)
                yield cls, library, version
                continue
        else:
            kind = "built for NumPy 1"
        logger.debug("TFLite interpreter from %s unavailable: %s", library, reason)
        if failures is not None:
            failures.append(f"{library} ({kind})")


def load_interpreter_class() -> tuple[type[Any], str, str]:
    """The first entry of :func:`interpreter_classes`; :class:`RuntimeUnavailable` if none."""
    failures: list[str] = []
    for found in interpreter_classes(failures):
        return found
    raise _unavailable(failures)


def _unavailable(failures: list[str]) -> RuntimeUnavailable:
    return RuntimeUnavailable(
        f"no usable TFLite interpreter library (tried {', '.join(failures)}); " + _INSTALL_HINT
    )


class TFLiteRuntime(Runtime):
    """A ``.tflite`` model in a TFLite/LiteRT interpreter.

    Tensor names are the model's signature names (``x``, ``output_0``) when it has exactly one
    signature covering its inputs and outputs, else the TFLite tensor names; a manifest may use
    either. Inputs whose signature has a dynamic (``-1``) dimension are resized to each
    request's shape; a fixed batch of 1 is served sample by sample (see :class:`Runtime`).
    """

    name = "tflite"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        specs: Sequence[Mapping[str, Any] | TensorSpec] | None = None,
    ) -> None:
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        failures: list[str] = []
        for interpreter_class, library, version in interpreter_classes(failures):
            try:
                interpreter = _open(interpreter_class, path, num_threads)
            except Exception as exc:
                if not _is_numpy_abi_error(exc):
                    raise ModelLoadError(
                        f"{library} cannot load {path.name}: {_one_line(exc)}"
                    ) from exc
                # Imported, but built against another NumPy: it fails on first use.
                logger.warning(
                    "TFLite interpreter from %s %s cannot run under NumPy %s (%s); trying the "
                    "next library",
                    library,
                    version,
                    np.__version__,
                    _one_line(exc),
                )
                failures.append(f"{library} (NumPy ABI)")
                continue
            break
        else:
            raise _unavailable(failures)
        self._library, self._version = library, version
        logger.debug("using the TFLite interpreter from %s %s for %s", library, version, path.name)
        self._interpreter: Any = interpreter
        self._num_threads = num_threads
        self._lock = threading.Lock()

        in_details = list(interpreter.get_input_details())
        out_details = list(interpreter.get_output_details())
        names = _signature_names(interpreter, in_details, out_details)
        try:
            model_in = [_spec(d, names) for d in in_details]
            model_out = [_spec(d, names) for d in out_details]
        except ValueError as exc:
            raise ModelLoadError(f"{path.name}: {exc}") from None
        aliases = {str(d["name"]): names[int(d["index"])] for d in in_details + out_details}
        inputs, outputs = merge_specs(model_in, model_out, specs, aliases=aliases)

        self._in_index = {s.name: int(d["index"]) for s, d in zip(inputs, in_details, strict=True)}
        self._out_index = {
            s.name: int(d["index"]) for s, d in zip(outputs, out_details, strict=True)
        }
        # Which dimensions the model lets us resize (-1 in its shape signature).
        self._resizable = {
            s.name: tuple(int(x) == -1 for x in d.get("shape_signature", d["shape"]))
            for s, d in zip(inputs, in_details, strict=True)
        }
        self._current = {
            s.name: tuple(int(x) for x in d["shape"])
            for s, d in zip(inputs, in_details, strict=True)
        }
        super().__init__(inputs=inputs, outputs=outputs)

    @property
    def library(self) -> str:
        """Which library provides the interpreter: ai_edge_litert, tflite_runtime or tensorflow."""
        return self._library

    @property
    def version(self) -> str:
        return self._version

    @property
    def providers(self) -> tuple[str, ...]:
        # No delegates are configured: the interpreter's built-in CPU kernels (with the default
        # XNNPACK delegate where the library applies it) run everything.
        return ("CPU",)

    @property
    def num_threads(self) -> int | None:
        """Threads given to the interpreter (None: the library's default)."""
        return self._num_threads

    def close(self) -> None:
        with self._lock:
            self._interpreter = None

    def _run(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError("the TFLite interpreter is closed")
            try:
                self._resize(interpreter, feeds)
                for name, value in feeds.items():
                    interpreter.set_tensor(self._in_index[name], np.ascontiguousarray(value))
                interpreter.invoke()
                # get_tensor returns a copy, so nothing aliases the interpreter's buffers.
                return {name: interpreter.get_tensor(i) for name, i in self._out_index.items()}
            except InferenceError:
                raise
            except Exception as exc:
                raise InferenceError(f"{self._library} failed: {_one_line(exc)}") from exc

    def _resize(self, interpreter: Any, feeds: Mapping[str, npt.NDArray[Any]]) -> None:
        """Resize dynamic inputs to this request's shapes (re-allocating only on change)."""
        changed = False
        for name, value in feeds.items():
            shape = tuple(value.shape)
            if shape == self._current[name]:
                continue
            resizable = self._resizable[name]
            if any(
                got != had and not free
                for got, had, free in zip(shape, self._current[name], resizable, strict=True)
            ):
                raise InferenceError(
                    f"input {name!r}: the model cannot be resized from "
                    f"{list(self._current[name])} to {list(shape)}"
                )
            interpreter.resize_tensor_input(self._in_index[name], list(shape), strict=True)
            self._current[name] = shape
            changed = True
        if changed:
            interpreter.allocate_tensors()


def _open(interpreter_class: type[Any], path: Path, num_threads: int | None) -> Any:
    """Create and allocate the interpreter, and read one tensor back.

    Reading a tensor goes through the library's NumPy bridge, so a library built against an
    incompatible NumPy fails here, at load time, rather than on the first request.
    """
    interpreter = interpreter_class(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    if details:
        interpreter.get_tensor(details[0]["index"])
    return interpreter


_ABI_MARKERS = (
    "_ARRAY_API",
    "compiled using NumPy 1.x",
    "multiarray failed to import",
    "numpy.core._multiarray_umath",
)


def _is_numpy_abi_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is a NumPy 1/2 binary incompatibility."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(marker in str(current) for marker in _ABI_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _known_incompatible(library: str) -> str | None:
    """Why ``library`` cannot work here without importing it, or None.

    Every tflite-runtime release on PyPI (the last is 2.14) was built against NumPy 1; under
    NumPy 2 importing it prints a long ABI warning and fails on import or on first use.
    Custom builds with higher versions are tried normally.
    """
    if library != "tflite_runtime" or _major(np.__version__) < 2:
        return None
    try:
        installed = metadata.version("tflite-runtime")
    except metadata.PackageNotFoundError:
        return None
    if _release(installed) >= (2, 15):
        return None
    return (
        f"tflite-runtime {installed} is built against NumPy 1 and cannot run under NumPy "
        f"{np.__version__}"
    )


def _major(version: str) -> int:
    return _release(version)[0]


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``"2.14.0"``, ``"2.1.0rc1"``)."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _signature_names(
    interpreter: Any, in_details: list[dict[str, Any]], out_details: list[dict[str, Any]]
) -> dict[int, str]:
    """Tensor index -> public name: signature keys when one signature covers all I/O."""
    names = {int(d["index"]): str(d["name"]) for d in in_details + out_details}
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return names
        (key,) = signatures
        # The runner holds a reference into the interpreter that blocks resizing while it
        # lives; it is local to this function and gone when it returns.
        runner = interpreter.get_signature_runner(key)
        by_key = {**runner.get_input_details(), **runner.get_output_details()}
        del runner
    except Exception as exc:
        logger.debug("no usable signature, using tensor names: %s", _one_line(exc))
        return names
    sig = {int(d["index"]): str(k) for k, d in by_key.items()}
    if set(sig) != set(names) or len(set(sig.values())) != len(sig):
        return names
    return sig


def _spec(detail: Mapping[str, Any], names: Mapping[int, str]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"]).name
    if dtype in ("str", "bytes", "object") or dtype.startswith(("str", "bytes")):
        dtype = "string"
    signature = detail.get("shape_signature")
    if signature is None or (len(signature) == 0 and len(detail["shape"]) > 0):
        signature = detail["shape"]
    shape = tuple(None if int(d) == -1 else int(d) for d in signature)
    return TensorSpec(
        name=names[int(detail["index"])],
        dtype=dtype,
        shape=shape,
        quantization=_quant(detail) if dtype in ("int8", "uint8", "int16") else None,
    )


def _quant(detail: Mapping[str, Any]) -> QuantParams | None:
    """Quantization from the interpreter's details; None when the tensor is not quantized."""
    params = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in np.asarray(params.get("scales", []), dtype=np.float64).ravel()]
    zeros = [int(z) for z in np.asarray(params.get("zero_points", []), dtype=np.int64).ravel()]
    axis = int(params.get("quantized_dimension", 0))
    if not scales:
        # Old interpreters only report the per-tensor pair.
        scale, zero = detail.get("quantization", (0.0, 0))
        scales, zeros = [float(scale)], [int(zero)]
    if not any(scales) or not all(s > 0 for s in scales):
        return None  # scale 0 is TFLite's "not quantized" (e.g. a plain int32 index input)
    return QuantParams(scale=tuple(scales), zero_point=tuple(zeros or [0]), axis=axis)


def _library_version(library: str) -> str:
    module = sys.modules.get(library)
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version(library.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


def _one_line(exc: BaseException) -> str:
    """A runtime message in one bounded line (LiteRT's run to several lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "..."
