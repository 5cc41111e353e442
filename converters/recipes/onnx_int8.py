"""Int8 ONNX recipes: dynamic quantization and static QDQ quantization with calibration."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from ..errors import BadOption, CalibrationDataError, RecipeFailed
from ._onnx_common import (
    StreamCalibrationReader,
    capture_quantizer_logs,
    prepare_source,
    resolve_exclusions,
)
from .base import CalibrationFactory, CandidateModel, Recipe, register_recipe

__all__ = [
    "OnnxDynamicInt8Config",
    "OnnxDynamicInt8Recipe",
    "OnnxQdqInt8Config",
    "OnnxQdqInt8Recipe",
    "shallow_stem_convs",
]

IntType = Literal["int8", "uint8"]


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _op_types(
    model: onnx.ModelProto, registry: set[str], excluded: set[str], *, gemm_as_matmul: bool = False
) -> list[str] | None:
    """Op types to quantize: ``None`` (quantizer default) unless some op type is excluded.

    An empty list would mean "everything" to onnxruntime, so excluding every quantizable op type
    is refused instead.
    """
    if not excluded:
        return None
    present = {n.op_type for n in model.graph.node}
    if gemm_as_matmul and "Gemm" in present:
        present = (present - {"Gemm"}) | {"MatMul"}
    chosen = sorted((present & registry) - excluded)
    if not chosen:
        raise BadOption(f"exclude {sorted(excluded)} leaves nothing to quantize")
    return chosen


_WEIGHTED_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "Gemm",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "Einsum",
        "LSTM",
        "GRU",
        "RNN",
    }
)
"""Ops that do a model's real work: a Conv behind one of these is not a stem."""


def shallow_stem_convs(
    model: onnx.ModelProto, *, max_channels: int, max_depth: int
) -> list[onnx.NodeProto]:
    """The stem Convs whose GEMM is too shallow for int8 to pay off, in graph order.

    A stem Conv takes (as its data input) a tensor computed from a model input through ops
    without weights (normalisation, Transpose, Pad, Concat, ...), not through another
    Conv/Gemm/MatMul. It is *shallow* when its weight (an initializer ``[M, C/group, kH,
    kW]``) has at most ``max_channels`` channels per group and ``C/group * kH * kW <=
    max_depth``. Convs whose weight is computed at run time are left alone.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(index)
    reached = {i.name for i in graph.input if i.name not in initializers}
    frontier = sorted(reached)
    visited: set[int] = set()
    stems: set[int] = set()
    while frontier:
        tensor = frontier.pop()
        for index in consumers.get(tensor, ()):
            node = graph.node[index]
            if node.op_type == "Conv":
                if node.input[0] == tensor:
                    stems.add(index)
                continue
            if node.op_type in _WEIGHTED_OPS or index in visited:
                continue
            visited.add(index)
            for out in node.output:
                if out and out not in reached:
                    reached.add(out)
                    frontier.append(out)
    shallow: list[onnx.NodeProto] = []
    for index in sorted(stems):
        node = graph.node[index]
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) < 3:
            continue
        channels = int(weight.dims[1])
        depth = channels * math.prod(int(d) for d in weight.dims[2:])
        if channels <= max_channels and depth <= max_depth:
            shallow.append(node)
    return shallow


def _float_stems(
    model: onnx.ModelProto, prepared: Path, config: OnnxQdqInt8Config, excluded: list[str]
) -> tuple[list[str], tuple[str, ...]]:
    """Names of the shallow stem Convs to keep float (see ``float_stem``), and a note.

    The quantizer excludes nodes by name; an unnamed stem is given one and the prepared model
    is saved again (an empty name would exclude every unnamed node).
    """
    if not config.float_stem:
        return [], ("float stem: off",)
    stems = shallow_stem_convs(
        model,
        max_channels=config.float_stem_max_channels,
        max_depth=config.float_stem_max_depth,
    )
    if not stems:
        return [], ()
    taken = {n.name for n in model.graph.node}
    renamed = False
    for i, node in enumerate(stems):
        if not node.name:
            name = f"edgekit_float_stem_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            renamed = True
    if renamed:
        onnx.save(model, str(prepared))
    names = [n.name for n in stems if n.name not in excluded]
    rule = (
        f"<= {config.float_stem_max_channels} input channels, depth"
        f" <= {config.float_stem_max_depth}"
    )
    listed = ", ".join(n.name for n in stems)
    return names, (f"float stem: kept float {listed} ({rule}; int8 is slower there)",)


@dataclass(frozen=True, kw_only=True)
class OnnxDynamicInt8Config:
    preprocess: bool = True
    per_channel: bool = False
    reduce_range: bool = False
    """7-bit weights: avoids int16 accumulation overflow on x86 CPUs without VNNI."""
    weight_type: IntType = "int8"
    exclude: tuple[str, ...] = ()
    """Node names or op types that stay float."""


@register_recipe
class OnnxDynamicInt8Recipe(Recipe[OnnxDynamicInt8Config]):
    """int8 weights, activations quantized at run time (no calibration data needed).

    Often *slower* than fp32 on CPUs for small convolutional models (the run-time quantization of
    every activation costs more than it saves), which is why it is measured, never assumed.
    """

    name = "onnx-dynamic-int8"
    runtime = "onnxruntime"
    precision = "int8"
    mode = "dynamic"
    config_type = OnnxDynamicInt8Config
    summary = "int8 weights, activations quantized at run time"

    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        start = time.perf_counter()
        src, out = Path(src_model_path), Path(out_dir)
        prepared, notes = prepare_source(src, out, preprocess=self.config.preprocess)
        model = onnx.load(str(prepared))
        nodes, op_types = resolve_exclusions(
            onnx.load(str(src), load_external_data=False), model, self.config.exclude
        )
        # quantize_dynamic first rewrites Gemm(transA=0, alpha=beta=1) as MatMul "<name>_MatMul"
        # + Add and then quantizes the MatMul: exclusions must name the rewritten node.
        gemms = {n.name for n in model.graph.node if n.op_type == "Gemm" and n.name}
        excluded_gemms = gemms if "Gemm" in op_types else gemms & set(nodes)
        nodes = [*nodes, *(f"{name}_MatMul" for name in sorted(excluded_gemms))]
        op_types.discard("Gemm")
        op_list = _op_types(model, set(IntegerOpsRegistry), op_types, gemm_as_matmul=True)
        path = out / "model.onnx"
        try:
            with capture_quantizer_logs() as logs:
                quantize_dynamic(
                    str(prepared),
                    str(path),
                    op_types_to_quantize=op_list,
                    per_channel=self.config.per_channel,
                    reduce_range=self.config.reduce_range,
                    weight_type=_quant_type(self.config.weight_type),
                    nodes_to_exclude=nodes or None,
                )
        except Exception as exc:
            raise RecipeFailed(
                f"{self.name}: quantize_dynamic failed: {exc}", recipe=self.name
            ) from exc
        prepared.unlink(missing_ok=True)
        return self.candidate(
            path, notes=(*notes, *dict.fromkeys(logs)), seconds=time.perf_counter() - start
        )


CalibrationMethodName = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True, kw_only=True)
class OnnxQdqInt8Config:
    preprocess: bool = True
    calibration_method: CalibrationMethodName = "minmax"
    """minmax: full observed range; entropy: KL-optimal clipping; percentile: clip outliers."""
    percentile: float = 99.999
    """Used by ``percentile`` calibration only."""
    per_channel: bool = True
    """One scale per output channel of Conv/Gemm/MatMul weights (much better for convolutions)."""
    reduce_range: bool = True
    """7-bit weights. On x86 CPUs without VNNI onnxruntime's fused uint8 x int8 kernels can
    saturate their 16-bit intermediate sums; on the digits CNN that cost 1% accuracy and made
    fused results differ from the QDQ reference arithmetic by 9 quantization steps. 7-bit weights
    remove the saturation everywhere at a negligible cost with per-channel scales; set False
    when every target has VNNI or is ARM."""
    activation_type: IntType = "uint8"
    """uint8 activations + int8 weights (U8S8) is onnxruntime's fast path on x86 and ARM."""
    weight_type: IntType = "int8"
    symmetric_activations: bool = False
    exclude: tuple[str, ...] = ()
    """Node names or op types that must stay float."""
    calibration_stride: int = 32
    """Samples per calibration chunk: bounds the activations held in memory."""
    float_stem: bool = True
    """Keep float the *stem* convolutions (fed by a model input with no weighted op in between)
    whose input has at most ``float_stem_max_channels`` channels per group and whose GEMM depth
    (channels per group x kernel area) is at most ``float_stem_max_depth``. Such a conv is
    cheap in float (onnxruntime has an NCHWc kernel for few-channel inputs) and slow in int8
    (a GEMM with K = 9 for a grayscale 3x3 conv): on the digits CNN of
    ``benchmarks/bench_convert.py`` its QLinearConv took 1166 µs of 2484 per batch of 32,
    against 207 µs in float, and the int8 model ran at 1.13x of fp32; with the stem float, at
    0.71x. Sessions must then run without ``QDQPropagationTransformer`` (see
    :data:`converters.runtime.ORT_DISABLED_OPTIMIZERS`)."""
    float_stem_max_channels: int = 3
    """Grayscale, two-channel and RGB stems stay float; with 4 or more input channels int8 won
    in every stem measured (see docs/convert.md)."""
    float_stem_max_depth: int = 75
    """Up to 5x5 RGB kernels. A 7x7 stride-2 RGB stem (ResNet's, depth 147) is faster in int8
    (0.63x vs 0.80x of fp32 for stem + one conv), so it is quantized."""

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise BadOption(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calibration_stride < 1:
            raise BadOption(f"calibration_stride must be >= 1, got {self.calibration_stride}")
        if self.float_stem_max_channels < 1 or self.float_stem_max_depth < 1:
            raise BadOption(
                "float_stem_max_channels and float_stem_max_depth must be >= 1, got"
                f" {self.float_stem_max_channels} and {self.float_stem_max_depth}"
            )


@register_recipe
class OnnxQdqInt8Recipe(Recipe[OnnxQdqInt8Config]):
    """Static int8 in QDQ format, calibrated on real samples, per-channel weights."""

    name = "onnx-int8-qdq"
    runtime = "onnxruntime"
    precision = "int8"
    mode = "int8"
    config_type = OnnxQdqInt8Config
    needs_calibration = True
    summary = "static int8 (QDQ), calibrated activations, per-channel weights"

    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        if calibration is None:
            raise CalibrationDataError(f"{self.name} needs calibration data")
        start = time.perf_counter()
        cfg = self.config
        src, out = Path(src_model_path), Path(out_dir)
        prepared, notes = prepare_source(src, out, preprocess=cfg.preprocess)
        model = onnx.load(str(prepared))
        nodes, op_types = resolve_exclusions(
            onnx.load(str(src), load_external_data=False), model, cfg.exclude
        )
        stems, stem_notes = (
            _float_stems(model, prepared, cfg, nodes) if "Conv" not in op_types else ([], ())
        )
        nodes = [*nodes, *stems]
        reader = StreamCalibrationReader(calibration, stride=cfg.calibration_stride)
        if reader.total == 0:
            raise CalibrationDataError(f"{self.name}: calibration data is empty")
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.calibration_method]
        extra: dict[str, Any] = {
            "ActivationSymmetric": cfg.symmetric_activations,
            "WeightSymmetric": cfg.weight_type == "int8",
            "CalibStridedMinMax": reader.stride,
        }
        if cfg.calibration_method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        path = out / "model.onnx"
        try:
            with capture_quantizer_logs() as logs:
                quantize_static(
                    str(prepared),
                    str(path),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=_op_types(
                        model, set(QDQRegistry) | set(QLinearOpsRegistry), op_types
                    ),
                    per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range,
                    activation_type=_quant_type(cfg.activation_type),
                    weight_type=_quant_type(cfg.weight_type),
                    nodes_to_exclude=nodes or None,
                    calibrate_method=method,
                    extra_options=extra,
                )
        except (CalibrationDataError, BadOption):
            raise
        except Exception as exc:
            raise RecipeFailed(
                f"{self.name}: quantize_static failed: {exc}", recipe=self.name
            ) from exc
        prepared.unlink(missing_ok=True)
        notes = (
            *notes,
            f"calibrated on {reader.total} samples ({cfg.calibration_method},"
            f" chunks of {reader.stride})",
            *stem_notes,
            *dict.fromkeys(logs),
        )
        return self.candidate(path, notes=notes, seconds=time.perf_counter() - start)
