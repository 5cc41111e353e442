"""Which layers hurt most: compare intermediate activations of fp32 and a quantized model.

Why: when int8 breaks the accuracy budget, the useful next step is to keep the one or two
sensitive layers in float (``exclude``), not to give up on quantization. This module finds them.

How (best effort): every float tensor produced by a node of the fp32 model that also exists in
the quantized model (same name, or ``<name>_DequantizeLinear_Output`` -- what QDQ consumers
read) is exposed as an extra graph output in both models. Both run on a few validation samples
with graph optimisation off, so that the tensors exist as written (QDQ then computes in
"fake-quant" float, the numerical definition that the fused int8 kernels implement). For each
tensor the relative error ``||q - f|| / ||f||`` is accumulated; a node's *added* error is its
output's error minus the largest error among its inputs, so the ranking points at the layers
that introduce error rather than those that merely inherit it downstream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .calibration import Sample
from .runtime import make_session

__all__ = ["LayerError", "layer_errors"]

_DQ_SUFFIX = "_DequantizeLinear_Output"


@dataclass(frozen=True)
class LayerError:
    """Error of one node's output in the quantized model relative to fp32."""

    node: str
    op_type: str
    tensor: str
    relative_error: float
    """``||quantized - fp32|| / ||fp32||`` over the diagnostic samples."""
    sqnr_db: float
    """Signal-to-quantization-noise ratio, ``-20 log10(relative_error)`` (capped at 200)."""
    added_error: float
    """``relative_error`` minus the largest relative error among the node's inputs."""
    rmse_over_scale: float | None = None
    """RMS error in units of the layer's quantization step (TFLite's QuantizationDebugger
    figure; about 0.29 for plain rounding). ``None`` where not computed (ONNX)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.FLOAT16):
            types[value.name] = elem
    return types


def _with_outputs(model: onnx.ModelProto, tensors: dict[str, int]) -> bytes:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name, elem in tensors.items():
        if name not in existing:
            augmented.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return bytes(augmented.SerializeToString())


def _fused_group(
    node: onnx.NodeProto, tracked: dict[str, str], producers: dict[str, onnx.NodeProto]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The node plus upstream nodes whose outputs vanished in the candidate (fused into it).

    QDQ quantization folds e.g. Relu into the preceding Conv's output range, so the Conv output
    has no counterpart; its error shows at the Relu output and belongs to "conv+relu" together.
    Returns the group (upstream first) and the tensors entering it.
    """
    group = [node]
    inputs: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for name in current.input:
            if not name:
                continue
            upstream = producers.get(name)
            if name in tracked or upstream is None:
                inputs.add(name)
            elif upstream not in group:
                group.insert(0, upstream)
                stack.append(upstream)
    return group, inputs


def layer_errors(
    reference_path: str | Path,
    candidate_path: str | Path,
    samples: Sequence[Sample],
    *,
    top: int = 5,
    threads: int | None = 1,
) -> tuple[LayerError, ...]:
    """Rank the fp32 model's nodes by the error they add in the candidate (worst first).

    Returns an empty tuple when nothing can be matched (e.g. a graph renamed beyond recognition)
    or the models are too large to serialise in memory.
    """
    if not samples:
        return ()
    ref_model = onnx.load(str(reference_path))
    cand_model = onnx.load(str(candidate_path))
    if ref_model.ByteSize() > 1_500_000_000 or cand_model.ByteSize() > 1_500_000_000:
        return ()
    ref_types = _float_tensors(ref_model)
    cand_types = _float_tensors(cand_model)
    cand_produced = {out for node in cand_model.graph.node for out in node.output}
    pairs: dict[str, str] = {}  # reference tensor -> candidate tensor
    producers: dict[str, onnx.NodeProto] = {}
    for node in ref_model.graph.node:
        for out in node.output:
            if out not in ref_types:
                continue
            producers[out] = node
            if out + _DQ_SUFFIX in cand_produced and out + _DQ_SUFFIX in cand_types:
                pairs[out] = out + _DQ_SUFFIX
            elif out in cand_produced and out in cand_types:
                pairs[out] = out
    if not pairs:
        return ()
    ref_session = make_session(
        _with_outputs(ref_model, {t: ref_types[t] for t in pairs}),
        threads=threads,
        optimization="disable",
    )
    cand_session = make_session(
        _with_outputs(cand_model, {pairs[t]: cand_types[pairs[t]] for t in pairs}),
        threads=threads,
        optimization="disable",
    )
    ref_names = list(pairs)
    cand_names = [pairs[t] for t in ref_names]
    signal = dict.fromkeys(ref_names, 0.0)
    noise = dict.fromkeys(ref_names, 0.0)
    for sample in samples:
        ref_values = ref_session.run(ref_names, sample)
        cand_values = cand_session.run(cand_names, sample)
        for name, f, q in zip(ref_names, ref_values, cand_values, strict=True):
            f64 = np.asarray(f, dtype=np.float64)
            q64 = np.asarray(q, dtype=np.float64)
            if f64.shape != q64.shape:
                continue
            signal[name] += float(np.sum(f64 * f64))
            noise[name] += float(np.sum((q64 - f64) ** 2))
    relative = {
        name: math.sqrt(noise[name] / signal[name]) if signal[name] > 0 else math.sqrt(noise[name])
        for name in ref_names
    }
    results: list[LayerError] = []
    for name in ref_names:
        nodes, inputs = _fused_group(producers[name], pairs, producers)
        inherited = max((relative.get(i, 0.0) for i in inputs), default=0.0)
        rel = relative[name]
        results.append(
            LayerError(
                node="+".join(n.name or n.output[0] for n in nodes),
                op_type="+".join(n.op_type for n in nodes),
                tensor=name,
                relative_error=rel,
                sqnr_db=min(200.0, -20.0 * math.log10(rel)) if rel > 0 else 200.0,
                added_error=rel - inherited,
            )
        )
    results.sort(key=lambda e: (-e.added_error, -e.relative_error))
    return tuple(results[:top])
