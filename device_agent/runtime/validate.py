"""Checking and converting caller values into what a model accepts, and outputs back.

Runtimes fail late and cryptically on a bad request (or, worse, not at all: NaN cast to int8
is whatever the CPU makes of it), so every request is checked here first and refused with an
:class:`InputError` that names the input, what was expected and what was sent.

Conversion rules (documented in ``docs/runtimes.md``):

* Quantized inputs take real numbers (any float, integer or bool array) and are quantized with
  the tensor's scale/zero point, saturating at the integer range. NaN and infinities are
  refused: they have no integer image, and an infinite reading is a sensor or caller bug that
  saturation would hide.
* Float inputs accept float, integer and bool arrays. NaN and infinities are passed through
  (they are representable, and some models use them as masks), but a finite value that
  overflows the model's float type (1e300 into float32) is refused.
* Integer inputs (token ids, class indices) accept integer and bool arrays, and float arrays
  only when every value is integral; values outside the dtype's range are refused, never
  wrapped.
* Bool inputs accept bool arrays, or numbers that are all 0 or 1.
* String inputs accept str, bytes or object arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from device_agent.errors import InputError
from device_agent.runtime.quant import dequantize, quantize
from device_agent.runtime.spec import TensorSpec, format_shape

__all__ = ["check_shared_dims", "finish_output", "prepare_input"]


def prepare_input(
    spec: TensorSpec, value: npt.ArrayLike, *, any_batch: bool = False
) -> npt.NDArray[Any]:
    """Check ``value`` against ``spec`` and return it in the model's dtype (quantized if needed).

    ``any_batch`` skips the check of the leading dimension (the caller loops over samples).
    """
    arr = _as_array(spec, value)
    _check_shape(spec, arr.shape, any_batch=any_batch)
    if spec.quantization is not None:
        return _quantized(spec, arr)
    if spec.dtype == "string":
        if arr.dtype.kind not in "USO":
            raise _dtype_error(spec, arr, "strings")
        return arr
    target = np.dtype(spec.dtype)
    if target.kind == "f":
        return _to_float(spec, arr, target)
    if target.kind in "iu":
        return _to_int(spec, arr, target)
    return _to_bool(spec, arr)


def check_shared_dims(
    specs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]], *, any_batch: bool = False
) -> None:
    """Refuse a request whose inputs disagree on a named dimension (``batch`` on two inputs).

    Runtimes do not always check this (independent branches of a graph run happily on
    different batch sizes), and the result would pair outputs with the wrong samples.
    """
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for i, dim in enumerate(spec.shape or ()):
            if not isinstance(dim, str) or (i == 0 and any_batch):
                continue
            size = shapes[spec.name][i]
            first = seen.setdefault(dim, (spec.name, size))
            if first[1] != size:
                raise InputError(
                    f"inputs disagree on dimension {dim!r}: {first[0]!r} has {first[1]}, "
                    f"{spec.name!r} has {size}"
                )


def finish_output(spec: TensorSpec, value: Any) -> npt.NDArray[Any]:
    """Return an output as the caller sees it: dequantized to float32 when it is quantized."""
    arr = np.asarray(value)
    if spec.quantization is not None and arr.dtype.kind in "iu":
        return dequantize(arr, spec.quantization)
    return arr


def _as_array(spec: TensorSpec, value: npt.ArrayLike) -> npt.NDArray[Any]:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {spec.name!r}: not an array ({exc})") from None
    if arr.dtype.kind == "O" and spec.dtype != "string":
        raise InputError(
            f"input {spec.name!r}: expected a rectangular array of numbers, got objects "
            "(ragged nesting or mixed types?)"
        )
    return arr


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], *, any_batch: bool) -> None:
    if spec.shape is None:
        return  # unknown rank: the runtime checks what it can
    bad = len(shape) != spec.rank or any(
        isinstance(want, int) and got != want and not (i == 0 and any_batch)
        for i, (want, got) in enumerate(zip(spec.shape, shape, strict=True))
    )
    if bad:
        raise InputError(
            f"input {spec.name!r}: expected shape {format_shape(spec.shape)}, got {list(shape)}"
        )


def _dtype_error(spec: TensorSpec, arr: npt.NDArray[Any], expected: str) -> InputError:
    return InputError(f"input {spec.name!r}: expected {expected}, got {arr.dtype} values")


def _quantized(spec: TensorSpec, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    assert spec.quantization is not None
    if arr.dtype.kind not in "fiub":
        raise _dtype_error(spec, arr, f"real numbers (the agent quantizes them to {spec.dtype})")
    real = arr.astype(np.float64)
    if not np.isfinite(real).all():
        raise InputError(
            f"input {spec.name!r}: contains NaN or infinity, which a quantized ({spec.dtype}) "
            "input cannot represent"
        )
    try:
        return quantize(real, spec.quantization, spec.dtype)
    except ValueError as exc:
        raise InputError(f"input {spec.name!r}: {exc}") from None


def _to_float(spec: TensorSpec, arr: npt.NDArray[Any], target: np.dtype[Any]) -> npt.NDArray[Any]:
    if arr.dtype.kind not in "fiub":
        raise _dtype_error(spec, arr, f"{target} (or any real numbers)")
    if arr.dtype == target:
        return arr
    with np.errstate(over="ignore"):
        out = arr.astype(target)
    if arr.dtype.kind != "b" and not np.can_cast(arr.dtype, target):
        source_finite = np.isfinite(arr) if arr.dtype.kind == "f" else True
        if np.any(source_finite & ~np.isfinite(out)):
            raise InputError(
                f"input {spec.name!r}: values overflow {target} (max {np.finfo(target).max:.4g})"
            )
    return out


def _to_int(spec: TensorSpec, arr: npt.NDArray[Any], target: np.dtype[Any]) -> npt.NDArray[Any]:
    kind = arr.dtype.kind
    if kind not in "fiub":
        raise _dtype_error(spec, arr, f"{target} values")
    if kind == "b" or np.can_cast(arr.dtype, target):
        return arr.astype(target)
    if kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"input {spec.name!r}: expected {target} values, got NaN or infinity")
        if not (np.trunc(arr) == arr).all():
            raise InputError(
                f"input {spec.name!r}: expected {target} values, got non-integral {arr.dtype} "
                "values"
            )
    info = np.iinfo(target)
    # Float bounds are compared as powers of two (exact in float64): float(2**63 - 1) rounds
    # up to 2**63, which would let an out-of-range value through.
    high = float(info.max) + 1 if kind == "f" else info.max + 1
    if arr.size and (arr.min() < info.min or arr.max() >= high):
        raise InputError(
            f"input {spec.name!r}: values outside the {target} range [{info.min}, {info.max}]"
        )
    return arr.astype(target)


def _to_bool(spec: TensorSpec, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind in "fiu" and np.isin(arr, (0, 1)).all():
        return arr.astype(np.bool_)
    raise _dtype_error(spec, arr, "bool values (or numbers that are all 0 or 1)")
