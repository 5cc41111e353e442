"""Local inference runtimes for the device agent.

:func:`load_runtime` opens a model file with the runtime its bundle names and returns a
:class:`Runtime`: one ``predict`` contract (real values in, real values out, named tensors,
typed errors) whether ONNX Runtime or a TFLite interpreter does the work. Importing this package
imports NumPy only; the runtime libraries are imported when a model is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from device_agent.errors import UnsupportedRuntime
from device_agent.runtime.base import Runtime
from device_agent.runtime.onnx import (
    CPU_PROVIDER,
    MANIFEST_DISABLED_OPTIMIZERS,
    OnnxRuntime,
    disabled_optimizers_hint,
)
from device_agent.runtime.quant import QuantParams, dequantize, quantize
from device_agent.runtime.spec import TensorSpec
from device_agent.runtime.tflite import TFLiteRuntime

__all__ = [
    "RUNTIMES",
    "OnnxRuntime",
    "QuantParams",
    "Runtime",
    "RuntimeOptions",
    "TFLiteRuntime",
    "TensorSpec",
    "dequantize",
    "load_runtime",
    "quantize",
]

logger = logging.getLogger(__name__)

#: Runtime names a bundle manifest may ask for.
RUNTIMES = ("onnxruntime", "tflite")


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Device-side tuning, from the agent's configuration rather than from the bundle.

    ``providers`` is the ONNX Runtime execution-provider preference list (unavailable ones are
    dropped with a warning; CPU is always last). ``threads`` is the intra-op thread count for
    ONNX Runtime and ``num_threads`` for TFLite; ``inter_op_threads`` applies to ONNX Runtime
    only. ``None`` leaves the library's default (usually one thread per core).

    ``disabled_optimizers`` overrides the bundle's request for ONNX Runtime graph optimizers to
    be switched off (:data:`~device_agent.runtime.onnx.MANIFEST_DISABLED_OPTIMIZERS`): ``None``
    follows the bundle, a tuple (even an empty one) replaces what it asks for. The device
    decides in the end because the same bundle may serve devices where the hint does not pay.
    """

    providers: tuple[str, ...] = (CPU_PROVIDER,)
    threads: int | None = None
    inter_op_threads: int | None = None
    disabled_optimizers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.providers, str):
            raise ValueError("providers must be a list of provider names, not a string")
        object.__setattr__(self, "providers", tuple(self.providers))
        names = self.disabled_optimizers
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError("disabled_optimizers must be a list of optimizer names or None")
            object.__setattr__(self, "disabled_optimizers", tuple(names))
        for name in ("threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def load_runtime(
    runtime: str,
    model_path: str | os.PathLike[str],
    *,
    specs: Sequence[Mapping[str, Any] | TensorSpec] | None = None,
    options: RuntimeOptions | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> Runtime:
    """Load ``model_path`` with ``runtime`` (``"onnxruntime"`` or ``"tflite"``).

    ``specs`` are the manifest's tensor descriptions (inputs then outputs, one flat list);
    their names and quantization take precedence over what the runtime reports. ``manifest``
    is the whole bundle manifest (its JSON form), read for runtime hints such as the ONNX
    Runtime optimizers to disable; ``options`` override them. Raises
    :class:`UnsupportedRuntime`, :class:`RuntimeUnavailable` or :class:`ModelLoadError`.
    """
    options = options or RuntimeOptions()
    if runtime == "onnxruntime":
        disabled = options.disabled_optimizers
        source = "the agent configuration (runtime.disabled_optimizers)"
        if disabled is None:
            disabled = disabled_optimizers_hint(manifest) or ()
            source = f"the bundle manifest ({'.'.join(MANIFEST_DISABLED_OPTIMIZERS)})"
        return OnnxRuntime(
            model_path,
            providers=options.providers,
            intra_op_threads=options.threads,
            inter_op_threads=options.inter_op_threads,
            specs=specs,
            disabled_optimizers=disabled,
            optimizers_from=source,
        )
    if runtime == "tflite":
        if (
            options.inter_op_threads is not None
            or options.providers != (CPU_PROVIDER,)
            or options.disabled_optimizers
        ):
            logger.debug(
                "providers, inter_op_threads and disabled_optimizers do not apply to tflite; "
                "ignored"
            )
        return TFLiteRuntime(model_path, num_threads=options.threads, specs=specs)
    raise UnsupportedRuntime(
        f"unknown runtime {runtime!r}; this agent supports {', '.join(map(repr, RUNTIMES))}"
    )
