"""Affine quantization of tensors: real value = scale * (q - zero_point).

Callers of the agent always send and receive real (float) values; a model with integer I/O
(full-integer TFLite models, or ONNX models whose manifest declares quantized I/O) needs its
inputs quantized and its outputs dequantized with the tensor's own parameters. That arithmetic
lives here, independent of any runtime, so that it can be tested exhaustively.

Conventions (those of TFLite and ONNX QuantizeLinear):

* ``q = clip(round(x / scale) + zero_point, qmin, qmax)`` where ``round`` is round half to even
  (``numpy.rint``) and ``[qmin, qmax]`` is the full range of the integer dtype: out-of-range
  values saturate rather than wrap.
* Per-tensor parameters are one-element ``scale``/``zero_point``; per-axis parameters have one
  entry per index along ``axis`` (a ``zero_point`` of one element is broadcast).
* The division is done in float64 so that results do not depend on the platform's float32
  rounding; this matches float32 kernels everywhere except on values within float32 rounding
  error of a rounding tie (one step of difference at most).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["QuantParams", "dequantize", "quantize"]


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a quantized tensor (per-tensor or along ``axis``).

    Construction validates the numbers (``ValueError``): a zero, negative or non-finite scale
    would turn every request into garbage silently, so it is refused where it is declared.
    """

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        scale = tuple(_as_float(s) for s in self.scale)
        zero_point = tuple(_as_int(z) for z in self.zero_point)
        if not scale:
            raise ValueError("quantization scale must have at least one element")
        if not all(math.isfinite(s) and s > 0 for s in scale):
            raise ValueError(f"quantization scale must be finite and > 0, got {list(scale)}")
        if len(zero_point) not in (1, len(scale)):
            raise ValueError(
                f"quantization zero_point has {len(zero_point)} elements; expected 1 or "
                f"{len(scale)} (one per scale)"
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"quantization axis must be an integer, got {self.axis!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def per_tensor(self) -> bool:
        """True when one scale and zero point apply to the whole tensor (``axis`` is unused)."""
        return len(self.scale) == 1 and len(self.zero_point) == 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantParams:
        """Read the manifest form ``{"scale": [...], "zero_point": [...], "axis": int}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"quantization must be an object, got {type(data).__name__}")
        unknown = set(data) - {"scale", "zero_point", "axis"}
        if unknown:
            raise ValueError(f"unknown quantization fields: {sorted(unknown)}")
        try:
            scale, zero_point = data["scale"], data["zero_point"]
        except KeyError as exc:
            raise ValueError(f"quantization lacks {exc.args[0]!r}") from None
        return cls(
            scale=tuple(_as_list(scale, "scale")),
            zero_point=tuple(_as_list(zero_point, "zero_point")),
            axis=data.get("axis", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (plain lists, JSON-ready)."""
        return {"scale": list(self.scale), "zero_point": list(self.zero_point), "axis": self.axis}


def quantize(
    values: npt.ArrayLike, params: QuantParams, dtype: npt.DTypeLike
) -> npt.NDArray[np.integer[Any]]:
    """Map real values to the integer ``dtype`` (round half to even, saturating).

    Raises ``ValueError`` for a non-integer dtype, a zero point outside the dtype's range, a
    per-axis shape mismatch, or NaN in ``values`` (NaN has no integer image; infinities
    saturate like any other out-of-range value).
    """
    target = np.dtype(dtype)
    if target.kind not in "iu":
        raise ValueError(f"can only quantize to an integer dtype, not {target}")
    info = np.iinfo(target)
    x = np.asarray(values, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("cannot quantize NaN")
    scale, zero_point = _broadcast(params, x.ndim, x.shape)
    if np.any(zero_point < info.min) or np.any(zero_point > info.max):
        raise ValueError(f"zero_point {list(params.zero_point)} is outside the range of {target}")
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(target)


def dequantize(values: npt.ArrayLike, params: QuantParams) -> npt.NDArray[np.float32]:
    """Map integer values back to real values as float32 (what float models produce)."""
    q = np.asarray(values)
    if q.dtype.kind not in "iu":
        raise ValueError(f"can only dequantize integer values, not {q.dtype}")
    scale, zero_point = _broadcast(params, q.ndim, q.shape)
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


def _broadcast(
    params: QuantParams, ndim: int, shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Scale and zero point as arrays that broadcast against a tensor of ``shape``."""
    scale = np.asarray(params.scale, dtype=np.float64)
    zero_point = np.asarray(params.zero_point, dtype=np.float64)
    if params.per_tensor:
        return scale.reshape(()), zero_point.reshape(())
    axis = params.axis + ndim if params.axis < 0 else params.axis
    if not 0 <= axis < ndim:
        raise ValueError(f"quantization axis {params.axis} is out of range for rank {ndim}")
    if shape[axis] != scale.size:
        raise ValueError(
            f"per-axis quantization has {scale.size} scales but dimension {axis} has size "
            f"{shape[axis]}"
        )
    view = [1] * ndim
    view[axis] = scale.size
    return scale.reshape(view), np.broadcast_to(zero_point, scale.shape).reshape(view)


def _as_list(value: object, field: str) -> Sequence[Any]:
    """Accept a list or a bare number (some tools write per-tensor parameters as scalars)."""
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise ValueError(f"quantization {field} must be a list of numbers, got {value!r}")


def _as_float(value: object) -> float:
    """A numeric scale (``"0.1"`` or ``True`` in a manifest is a mistake, not a number)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"quantization scale must be a number, got {value!r}")


def _as_int(value: object) -> int:
    """An integral zero point (``13`` or ``13.0``, not ``13.5`` or ``True``)."""
    if isinstance(value, bool):
        raise ValueError(f"quantization zero_point must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"quantization zero_point must be an integer, got {value!r}")
