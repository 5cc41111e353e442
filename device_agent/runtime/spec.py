"""Description of a model's tensors, in the manifest's format, and its reconciliation.

A bundle's manifest describes each input and output (name, dtype, shape, quantization); the
runtime reports its own view of the same tensors. :class:`TensorSpec` is the common currency
and :func:`merge_specs` decides, once at load time, what the agent enforces on every request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from device_agent.errors import ModelLoadError
from device_agent.runtime.quant import QuantParams

__all__ = ["DTYPES", "Dim", "TensorSpec", "format_shape", "merge_specs"]

#: One dimension of a tensor shape: a fixed size, a symbolic name (``"batch"``) or unknown.
Dim: TypeAlias = "int | str | None"

#: Tensor element types a manifest may name (numpy names, plus ``string``).
DTYPES = frozenset(
    {
        "bool",
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "string",
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type, shape and (optional) quantization of one model input or output.

    ``dtype`` is the type *inside the model* (``int8`` for a full-integer model), not what the
    caller sends: callers always exchange real values with quantized tensors. Dynamic
    dimensions are ``None`` or a symbolic name; ``-1`` in a manifest is read as ``None``. A
    ``shape`` of ``None`` means the rank itself is unknown (nothing is checked).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None
    quantization: QuantParams | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(_dim(d, self.name) for d in self.shape))
        if self.quantization is not None and self.dtype not in _QUANTIZABLE:
            raise ValueError(
                f"tensor {self.name!r}: quantization is only meaningful on integer tensors, "
                f"not {self.dtype}"
            )

    @property
    def quantized(self) -> bool:
        """True when callers exchange real values that the agent (de)quantizes."""
        return self.quantization is not None

    @property
    def rank(self) -> int | None:
        """Number of dimensions, or None when unknown."""
        return None if self.shape is None else len(self.shape)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Read the manifest form; raises ``ValueError`` naming what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"tensor description must be an object, got {type(data).__name__}")
        unknown = set(data) - {"name", "dtype", "shape", "quantization"}
        if unknown:
            raise ValueError(f"tensor {data.get('name')!r}: unknown fields {sorted(unknown)}")
        missing = {"name", "dtype", "shape"} - set(data)
        if missing:
            raise ValueError(f"tensor {data.get('name')!r}: missing fields {sorted(missing)}")
        shape = data["shape"]
        if shape is not None and not isinstance(shape, (list, tuple)):
            raise ValueError(
                f"tensor {data['name']!r}: shape must be a list or null, got {shape!r}"
            )
        quant = data.get("quantization")
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=None if shape is None else tuple(shape),
            quantization=None if quant is None else QuantParams.from_dict(quant),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (JSON-ready); ``quantization`` only when the tensor has it."""
        shape = None if self.shape is None else list(self.shape)
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": shape}
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return out


_QUANTIZABLE = frozenset({"int8", "uint8", "int16", "uint16", "int32", "uint32"})


def _dim(value: object, name: str) -> Dim:
    if value is None or isinstance(value, str):
        return value if value != "" else None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value == -1:
            return None
        if value >= 0:
            return int(value)
    raise ValueError(f"tensor {name!r}: invalid dimension {value!r}")


def format_shape(shape: Sequence[Dim] | None) -> str:
    """``[batch, 4]`` / ``[?, 4]`` / ``[...]``: how shapes appear in error messages."""
    if shape is None:
        return "[...]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def merge_specs(
    model_inputs: Sequence[TensorSpec],
    model_outputs: Sequence[TensorSpec],
    given: Sequence[Mapping[str, Any] | TensorSpec] | None,
    *,
    aliases: Mapping[str, str] | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Reconcile the manifest's tensor descriptions with what the runtime reports.

    ``given`` is a flat list (a manifest's inputs followed by its outputs); each entry is
    matched by name to an input or else an output of the model (``aliases`` maps other accepted
    names, e.g. TFLite tensor names, to the model's names). Tensors it does not mention keep the
    runtime's description. A matched tensor takes the manifest's name and quantization; its
    dtype and rank must agree with the model and fixed sizes may not conflict. Returns the
    merged inputs and outputs in the model's order; raises :class:`ModelLoadError` when the
    manifest does not describe this model, because running it anyway would feed wrong values.
    """
    inputs, outputs = list(model_inputs), list(model_outputs)
    if not given:
        return inputs, outputs
    aliases = dict(aliases or {})
    index = {spec.name: ("input", i) for i, spec in enumerate(inputs)}
    for i, spec in enumerate(outputs):
        index.setdefault(spec.name, ("output", i))
    seen: set[str] = set()
    for entry in given:
        try:
            spec = entry if isinstance(entry, TensorSpec) else TensorSpec.from_dict(entry)
        except ValueError as exc:
            raise ModelLoadError(f"invalid tensor description in the manifest: {exc}") from None
        if spec.name in seen:
            raise ModelLoadError(f"the manifest describes tensor {spec.name!r} twice")
        seen.add(spec.name)
        where = index.get(spec.name) or index.get(aliases.get(spec.name, ""))
        if where is None:
            known = ", ".join(repr(s.name) for s in inputs + outputs)
            raise ModelLoadError(
                f"the manifest describes tensor {spec.name!r}, which the model does not have "
                f"(model tensors: {known})"
            )
        kind, i = where
        target = inputs if kind == "input" else outputs
        target[i] = _merge_one(target[i], spec, kind)
    return inputs, outputs


def _merge_one(model: TensorSpec, given: TensorSpec, kind: str) -> TensorSpec:
    what = f"{kind} {given.name!r}"
    if given.dtype != model.dtype:
        raise ModelLoadError(
            f"the manifest says {what} is {given.dtype}, the model has {model.dtype}"
        )
    if model.shape is None or given.shape is None:
        merged = given.shape if model.shape is None else model.shape
    elif given.rank != model.rank:
        raise ModelLoadError(
            f"the manifest says {what} has shape {format_shape(given.shape)}, "
            f"the model has {format_shape(model.shape)}"
        )
    else:
        dims: list[Dim] = []
        for m, g in zip(model.shape, given.shape, strict=True):
            if isinstance(m, int) and isinstance(g, int) and m != g:
                raise ModelLoadError(
                    f"the manifest says {what} has shape {format_shape(given.shape)}, "
                    f"the model has {format_shape(model.shape)}"
                )
            # The stricter of the two: a fixed size wins over a dynamic one.
            dims.append(m if isinstance(m, int) else g if g is not None else m)
        merged = tuple(dims)
    return TensorSpec(
        name=given.name,
        dtype=model.dtype,
        shape=merged,
        quantization=given.quantization or model.quantization,
    )
