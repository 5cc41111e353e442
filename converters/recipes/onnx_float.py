"""Float ONNX recipes: the fp32 reference and float16."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import RecipeFailed
from ..fp16 import DEFAULT_FP16_BLOCK_LIST, convert_to_float16
from ._onnx_common import prepare_source, resolve_exclusions
from .base import CalibrationFactory, CandidateModel, Recipe, register_recipe

__all__ = [
    "OnnxFp16Config",
    "OnnxFp16Recipe",
    "OnnxFp32Config",
    "OnnxFp32Recipe",
]


@dataclass(frozen=True, kw_only=True)
class OnnxFp32Config:
    preprocess: bool = True
    """Shape inference + ORT basic optimisation (the same graph the quantizers start from)."""


@register_recipe
class OnnxFp32Recipe(Recipe[OnnxFp32Config]):
    """Pre-processed float32 copy: the reference every candidate is measured against.

    Using the pre-processed graph (not the raw file) as reference isolates what quantization
    costs from what graph optimisation changes, and gives ``--quantize none`` a slightly faster
    model for free.
    """

    name = "onnx-fp32"
    runtime = "onnxruntime"
    precision = "fp32"
    mode = "none"
    config_type = OnnxFp32Config
    summary = "float32 reference (pre-processed copy)"

    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        start = time.perf_counter()
        path, notes = prepare_source(
            Path(src_model_path),
            Path(out_dir),
            preprocess=self.config.preprocess,
            filename="model.onnx",
        )
        return self.candidate(path, notes=notes, seconds=time.perf_counter() - start)


@dataclass(frozen=True, kw_only=True)
class OnnxFp16Config:
    preprocess: bool = True
    keep_io_types: bool = True
    """Keep float32 graph inputs/outputs (casts at the boundary) so callers feed float32."""
    exclude: tuple[str, ...] = ()
    """Node names or op types kept in float32 (in addition to the default block list)."""


@register_recipe
class OnnxFp16Recipe(Recipe[OnnxFp16Config]):
    """Float16 weights and compute with float32 I/O (edgekit's own converter, no extra dep)."""

    name = "onnx-fp16"
    runtime = "onnxruntime"
    precision = "fp16"
    mode = "fp16"
    config_type = OnnxFp16Config
    summary = "float16 weights/compute, float32 inputs and outputs"

    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        start = time.perf_counter()
        src, out = Path(src_model_path), Path(out_dir)
        prepared, notes = prepare_source(src, out, preprocess=self.config.preprocess)
        model = onnx.load(str(prepared))
        nodes, op_types = resolve_exclusions(
            onnx.load(str(src), load_external_data=False), model, self.config.exclude
        )
        try:
            converted, stats = convert_to_float16(
                model,
                keep_io_types=self.config.keep_io_types,
                op_block_list=DEFAULT_FP16_BLOCK_LIST | op_types,
                node_block_list=nodes,
            )
            onnx.checker.check_model(converted)
        except Exception as exc:  # conversion of an unusual graph: report, don't crash
            raise RecipeFailed(
                f"{self.name}: float16 conversion failed: {exc}", recipe=self.name
            ) from exc
        path = out / "model.onnx"
        onnx.save(converted, str(path))
        prepared.unlink(missing_ok=True)
        notes = (
            *notes,
            f"fp16 nodes {stats.fp16_nodes}, fp32 nodes {stats.fp32_nodes},"
            f" casts {stats.casts_inserted}",
        )
        if stats.clipped_values:
            notes = (*notes, f"{stats.clipped_values} values clipped to the float16 range")
        return self.candidate(path, notes=notes, seconds=time.perf_counter() - start)
