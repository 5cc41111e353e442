"""ONNX pre-processing before quantization: validation, shape inference, graph optimisation.

Why: onnxruntime's quantizer only sees what the graph declares. Shape inference gives it the
tensor types/shapes it needs to decide what to quantize, and ORT's *basic* graph optimisations
(constant folding, Conv+BatchNorm and MatMul+Add fusion...) remove nodes whose separate
quantization would cost accuracy and speed. Both are what onnxruntime's own
``quant_pre_process`` does; we wrap it so that each recipe can switch it off, and so that a
failure of the optional symbolic shape inference degrades gracefully instead of aborting.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .errors import UnsupportedModel

__all__ = [
    "MAX_MODEL_BYTES",
    "PrepOptions",
    "PrepResult",
    "check_onnx_model",
    "preprocess_model",
]

_log = logging.getLogger(__name__)

#: Models above the protobuf limit need external data files; not supported (edge models aren't).
MAX_MODEL_BYTES = 2 * 1024**3 - 1


@dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """Which pre-processing steps a recipe wants (all on by default)."""

    shape_inference: bool = True
    """ONNX + symbolic shape inference, so the quantizer knows every tensor's type and shape."""
    optimize: bool = True
    """ORT basic graph optimisation (folding and fusions that keep the graph standard ONNX)."""


@dataclass(frozen=True)
class PrepResult:
    """The pre-processed model and what was actually done to it."""

    path: Path
    steps: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "warnings": list(self.warnings)}


def check_onnx_model(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX model, mapping every failure to :class:`UnsupportedModel`."""
    src = Path(path)
    if not src.is_file():
        raise UnsupportedModel(f"model file not found: {src}")
    if src.stat().st_size > MAX_MODEL_BYTES:
        raise UnsupportedModel(f"{src.name}: models over 2 GiB (external data) are not supported")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # DecodeError, ValueError...: the bytes are not an ONNX model
        raise UnsupportedModel(f"{src.name} is not a readable ONNX model: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise UnsupportedModel(f"{src.name} is not a valid ONNX model: {first}") from exc
    if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph.node):
        _log.info("%s has control-flow subgraphs; they are left in float", src.name)
    return model


def _quant_pre_process(src: Path, dst: Path, *, skip_opt: bool, skip_symbolic: bool) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # quant_pre_process prints progress on stdout/stderr; keep the caller's terminal clean.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quant_pre_process(
            str(src),
            str(dst),
            skip_optimization=skip_opt,
            skip_onnx_shape=False,
            skip_symbolic_shape=skip_symbolic,
        )


def preprocess_model(
    src: str | Path, dst: str | Path, *, options: PrepOptions | None = None
) -> PrepResult:
    """Write a pre-processed copy of ``src`` to ``dst`` and say which steps were applied.

    Falls back step by step: if symbolic shape inference fails (common with exotic ops), ONNX
    shape inference alone is used; if ORT optimisation fails, the model is kept unoptimised.
    With every step disabled the model is copied verbatim.
    """
    opts = options or PrepOptions()
    src_path, dst_path = Path(src), Path(dst)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    if not opts.shape_inference and not opts.optimize:
        shutil.copyfile(src_path, dst_path)
        return PrepResult(path=dst_path, steps=("copy",))

    warnings: list[str] = []
    symbolic = opts.shape_inference and importlib.util.find_spec("sympy") is not None
    if opts.shape_inference and not symbolic:
        # Symbolic inference (dims like "N*2") needs sympy; plain ONNX inference still runs.
        warnings.append("symbolic shape inference skipped (sympy is not installed)")
    # (skip_optimization, skip_symbolic_shape) from most to least complete.
    attempts: list[tuple[bool, bool]] = []
    for skip_opt in (False, True) if opts.optimize else (True,):
        for skip_symbolic in (False, True) if symbolic else (True,):
            attempts.append((skip_opt, skip_symbolic))
    last_error: Exception | None = None
    for skip_opt, skip_symbolic in attempts:
        try:
            _quant_pre_process(src_path, dst_path, skip_opt=skip_opt, skip_symbolic=skip_symbolic)
        except Exception as exc:  # the ORT helper raises exceptions of all kinds
            last_error = exc
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.append(f"pre-processing attempt failed, retrying with less: {first_line}")
            continue
        # quant_pre_process always runs ONNX shape inference (harmless even when not asked for).
        steps = ["onnx-shape-inference"]
        if not skip_symbolic:
            steps.insert(0, "symbolic-shape-inference")
        if not skip_opt:
            steps.append("ort-basic-optimization")
        return PrepResult(path=dst_path, steps=tuple(steps), warnings=tuple(warnings))
    _log.warning("pre-processing failed (%s); using the model as is", last_error)
    shutil.copyfile(src_path, dst_path)
    warnings.append("pre-processing failed; the model was copied unchanged")
    return PrepResult(path=dst_path, steps=("copy",), warnings=tuple(warnings))
