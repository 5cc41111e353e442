"""Helpers shared by the ONNX recipes: source preparation, exclusions, calibration adapter."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from ..errors import BadOption
from ..onnx_prep import PrepOptions, PrepResult, check_onnx_model, preprocess_model
from .base import CalibrationFactory

__all__ = [
    "StreamCalibrationReader",
    "capture_quantizer_logs",
    "prepare_source",
    "resolve_exclusions",
]

# Pre-processing is deterministic for a given file and options, so the recipes of one conversion
# share it: results are kept in a private temporary directory (removed at interpreter exit).
_PREP_CACHE: dict[tuple[str, int, int, PrepOptions], PrepResult] = {}
_PREP_DIR: tempfile.TemporaryDirectory[str] | None = None


def _cache_dir() -> Path:
    global _PREP_DIR
    if _PREP_DIR is None:
        _PREP_DIR = tempfile.TemporaryDirectory(prefix="edgekit-prep-")
    return Path(_PREP_DIR.name)


def prepare_source(
    src: Path, out_dir: Path, *, preprocess: bool, filename: str = "prepared.onnx"
) -> tuple[Path, tuple[str, ...]]:
    """Validate ``src`` and return the model the recipe should convert, plus notes.

    With ``preprocess`` the model goes through :func:`preprocess_model` (shape inference and ORT
    basic optimisation); without it the recipe works on a verbatim copy.
    """
    check_onnx_model(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / filename
    if not preprocess:
        shutil.copyfile(src, dst)
        return dst, ("pre-processing: off",)
    options = PrepOptions()
    stat = src.stat()
    key = (str(src.resolve()), stat.st_size, stat.st_mtime_ns, options)
    cached = _PREP_CACHE.get(key)
    if cached is not None and cached.path.is_file():
        shutil.copyfile(cached.path, dst)
        result = PrepResult(path=dst, steps=cached.steps, warnings=cached.warnings)
    else:
        result = preprocess_model(src, dst, options=options)
        keep = _cache_dir() / f"{len(_PREP_CACHE)}.onnx"
        shutil.copyfile(dst, keep)
        _PREP_CACHE[key] = PrepResult(path=keep, steps=result.steps, warnings=result.warnings)
    notes = (f"pre-processing: {', '.join(result.steps)}", *result.warnings)
    return dst, notes


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def resolve_exclusions(
    original: onnx.ModelProto, prepared: onnx.ModelProto, exclude: Sequence[str]
) -> tuple[list[str], set[str]]:
    """Split ``exclude`` into node names (of ``prepared``) and op types.

    Users name nodes of *their* model, but pre-processing may rename or fuse them (MatMul+Add ->
    Gemm "x/MatMulAddFusion"). A name is therefore mapped, in order: exact node name in the
    prepared model; nodes that now produce the original node's outputs; nodes whose name starts
    with ``name/`` (ORT's fusion naming). Anything else must be an op type present in the model.
    Entries matching nothing raise :class:`BadOption` (a typo must not silently quantize).
    """
    prepared_names = {n.name for n in prepared.graph.node}
    prepared_ops = {n.op_type for n in prepared.graph.node}
    original_by_name = {n.name: n for n in original.graph.node if n.name}
    producers = _producers(prepared)
    nodes: list[str] = []
    op_types: set[str] = set()
    for entry in exclude:
        matched: list[str] = []
        if entry in prepared_names:
            matched.append(entry)
        elif entry in original_by_name:
            for out in original_by_name[entry].output:
                node = producers.get(out)
                if node is not None and node.name:
                    matched.append(node.name)
            matched += [n for n in prepared_names if n.startswith(entry + "/")]
        if matched:
            nodes.extend(m for m in matched if m not in nodes)
        elif entry in prepared_ops:
            op_types.add(entry)
        elif entry in original_by_name:
            raise BadOption(
                f"exclude: node {entry!r} was fused away by pre-processing; exclude its op type"
                " or set preprocess=false"
            )
        else:
            raise BadOption(f"exclude: {entry!r} matches no node name or op type in the model")
    return nodes, op_types


@contextlib.contextmanager
def capture_quantizer_logs() -> Iterator[list[str]]:
    """Collect onnxruntime.quantization's root-logger warnings and prints instead of showing them.

    The quantizer logs advice through the root logger and prints progress; a library must not
    write to the caller's terminal, so the messages become candidate notes instead.
    """
    captured: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and record.levelno >= logging.WARNING:
            captured.append(record.getMessage().strip().splitlines()[0][:300])
            return False
        return True

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield captured
    finally:
        root.removeFilter(keep)


def _count(factory: CalibrationFactory) -> int:
    hint = getattr(factory, "length_hint", None)
    if isinstance(hint, int):
        return hint
    return sum(1 for _ in factory())


class StreamCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over a re-openable sample stream.

    Implements ``__len__``/``set_range`` so that the quantizer's strided calibration
    (``CalibStridedMinMax``) collects statistics ``stride`` samples at a time: intermediate
    activations of at most ``stride`` samples are held in memory, for every calibration method
    (the histogram calibrators otherwise keep all of them until the end).
    """

    def __init__(self, factory: CalibrationFactory, *, stride: int = 32) -> None:
        total = _count(factory)
        self.stride = max(1, min(stride, total))
        # The strided loop needs a multiple of the stride: drop at most stride-1 samples.
        self.total = total - total % self.stride
        self._factory = factory
        self._iter: Iterator[dict[str, Any]] = factory()
        self._position = 0
        self._end = self.total

    def __len__(self) -> int:
        return self.total

    def set_range(self, start_index: int, end_index: int) -> None:
        if start_index != self._position:
            self._iter = self._factory()
            self._position = 0
            for _ in range(start_index):
                next(self._iter, None)
                self._position += 1
        self._end = min(end_index, self.total)

    def get_next(self) -> dict[str, Any] | None:
        if self._position >= self._end:
            return None
        sample = next(self._iter, None)
        if sample is None:
            return None
        self._position += 1
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (sample := self.get_next()) is not None:
            yield sample
