"""What a model expects and returns: names, shapes and dtypes of its graph inputs and outputs.

Data readers validate samples against these specs, measurement builds batched feeds from them and
the pipeline records them in the report. Read from the ONNX graph (not an ORT session) so that it
works before any optimisation and without allocating weights for large models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .errors import UnsupportedModel

__all__ = [
    "Dim",
    "ModelSpec",
    "TensorSpec",
    "read_model_spec",
    "spec_from_proto",
]

#: One dimension: a fixed size, or the symbolic name (``str``) / ``None`` of a dynamic one.
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as declared by the model."""

    name: str
    shape: tuple[Dim, ...] | None
    """``None`` when the rank itself is unknown."""
    dtype: np.dtype[Any]

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def has_dynamic_batch(self) -> bool:
        """True when the first axis may take any size, so N samples can be stacked into one run."""
        return bool(self.shape) and not isinstance(self.shape[0], int)  # type: ignore[index]

    @property
    def is_float(self) -> bool:
        return bool(np.issubdtype(self.dtype, np.floating))

    def shape_text(self) -> str:
        """Human form used in error messages, e.g. ``[N,1,8,8]``."""
        if self.shape is None:
            return "[?]"
        return "[" + ",".join(str(d) if d is not None else "?" for d in self.shape) + "]"

    def describe(self) -> str:
        return f"{self.dtype.name} {self.shape_text()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": None if self.shape is None else list(self.shape),
            "dtype": self.dtype.name,
        }


@dataclass(frozen=True)
class ModelSpec:
    """Inputs and outputs of a model, in graph order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "opset": self.opset,
        }


def _tensor_spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise UnsupportedModel(
            f"graph input/output {value_info.name!r} is not a tensor (sequences and maps are not"
            " supported)"
        )
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModel(
            f"graph input/output {value_info.name!r} has unsupported element type {ttype.elem_type}"
        ) from exc
    shape: tuple[Dim, ...] | None = None
    if ttype.HasField("shape"):
        dims: list[Dim] = []
        for dim in ttype.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorSpec(name=value_info.name, shape=shape, dtype=dtype)


def spec_from_proto(model: onnx.ModelProto) -> ModelSpec:
    """Specs from an in-memory model (initializers listed as inputs, an old IR habit, skipped)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_spec(v) for v in model.graph.output)
    opset = max(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        default=0,
    )
    if not inputs:
        raise UnsupportedModel("model has no graph inputs")
    if not outputs:
        raise UnsupportedModel("model has no graph outputs")
    return ModelSpec(inputs=inputs, outputs=outputs, opset=int(opset))


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read input/output specs of the ONNX model at ``path`` (external weights are not loaded)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as exc:
        raise UnsupportedModel(f"model file not found: {path}") from exc
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for non-ONNX files
        raise UnsupportedModel(f"{path} is not a readable ONNX model: {exc}") from exc
    return spec_from_proto(model)
