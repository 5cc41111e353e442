from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_agent.runtime.quant import QuantParams, dequantize, quantize

DTYPES = ("int8", "uint8", "int16")

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def params_and_dtype(draw: st.DrawFn) -> tuple[QuantParams, str]:
    dtype = draw(st.sampled_from(DTYPES))
    info = np.iinfo(dtype)
    scale = draw(st.floats(1e-4, 10.0, allow_nan=False, allow_infinity=False))
    scale = float(np.float32(scale))  # what models store
    zero_point = draw(st.integers(int(info.min), int(info.max)))
    return QuantParams(scale=(scale,), zero_point=(zero_point,)), dtype


@st.composite
def representable(draw: st.DrawFn) -> tuple[QuantParams, str, np.ndarray]:
    """Real values inside the range the integer type can represent with these params."""
    params, dtype = draw(params_and_dtype())
    info = np.iinfo(dtype)
    lo = (info.min - params.zero_point[0]) * params.scale[0]
    hi = (info.max - params.zero_point[0]) * params.scale[0]
    values = draw(
        hnp.arrays(
            np.float64,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
            elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False),
        )
    )
    return params, dtype, values


@SETTINGS
@given(representable())
def test_round_trip_error_is_at_most_half_a_step(case: tuple[QuantParams, str, np.ndarray]) -> None:
    params, dtype, x = case
    q = quantize(x, params, dtype)
    assert q.dtype == np.dtype(dtype)
    assert q.shape == x.shape
    back = dequantize(q, params)
    assert back.dtype == np.float32
    # Half a step, plus float32 rounding of the dequantized value.
    tolerance = params.scale[0] / 2 + np.abs(x) * 2e-7 + 1e-12
    assert np.all(np.abs(back.astype(np.float64) - x) <= tolerance)


@SETTINGS
@given(params_and_dtype(), st.data())
def test_integer_grid_round_trips_exactly(
    case: tuple[QuantParams, str], data: st.DataObject
) -> None:
    params, dtype = case
    q = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(max_dims=2, max_side=8)))
    np.testing.assert_array_equal(quantize(dequantize(q, params), params, dtype), q)


@SETTINGS
@given(params_and_dtype(), st.floats(1.0, 1e30))
def test_out_of_range_values_saturate(case: tuple[QuantParams, str], factor: float) -> None:
    params, dtype = case
    info = np.iinfo(dtype)
    span = (int(info.max) - int(info.min) + 1) * params.scale[0]
    x = np.array([-span * factor - 1, span * factor + 1, -np.inf, np.inf])
    np.testing.assert_array_equal(
        quantize(x, params, dtype), [info.min, info.max, info.min, info.max]
    )


@SETTINGS
@given(representable())
def test_quantize_is_monotonic(case: tuple[QuantParams, str, np.ndarray]) -> None:
    params, dtype, x = case
    flat = np.sort(x.ravel())
    assert np.all(np.diff(quantize(flat, params, dtype).astype(np.int64)) >= 0)


def test_rounds_half_to_even() -> None:
    params = QuantParams(scale=(0.5,), zero_point=(0,))
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 0.2501])  # x / scale = .5, 1.5, 2.5, ...
    np.testing.assert_array_equal(quantize(x, params, "int8"), [0, 2, 2, 0, -2, 1])


def test_zero_point_shifts_values() -> None:
    params = QuantParams(scale=(0.1,), zero_point=(-128,))
    np.testing.assert_array_equal(quantize([0.0, 1.0, 25.5], params, np.int8), [-128, -118, 127])
    np.testing.assert_allclose(dequantize(np.array([-128, -118], np.int8), params), [0.0, 1.0])


def test_uint8_and_int16_ranges() -> None:
    params = QuantParams(scale=(1.0,), zero_point=(0,))
    np.testing.assert_array_equal(quantize([-5, 300], params, "uint8"), [0, 255])
    np.testing.assert_array_equal(quantize([-40000, 40000], params, "int16"), [-32768, 32767])


@SETTINGS
@given(
    st.integers(1, 4).flatmap(
        lambda channels: st.tuples(
            st.lists(st.floats(1e-3, 5.0), min_size=channels, max_size=channels),
            st.lists(st.integers(-128, 127), min_size=channels, max_size=channels),
            hnp.arrays(
                np.float64,
                st.tuples(st.integers(1, 3), st.just(channels), st.integers(1, 3)),
                elements=st.floats(-1e3, 1e3),
            ),
        )
    )
)
def test_per_axis_matches_per_tensor_per_channel(
    case: tuple[list[float], list[int], np.ndarray],
) -> None:
    scales, zeros, x = case
    params = QuantParams(scale=tuple(scales), zero_point=tuple(zeros), axis=1)
    q = quantize(x, params, "int8")
    back = dequantize(q, params)
    for c, (s, z) in enumerate(zip(scales, zeros, strict=True)):
        one = QuantParams(scale=(s,), zero_point=(z,))
        np.testing.assert_array_equal(q[:, c, :], quantize(x[:, c, :], one, "int8"))
        np.testing.assert_array_equal(back[:, c, :], dequantize(q[:, c, :], one))


def test_per_axis_negative_axis_and_broadcast_zero_point() -> None:
    params = QuantParams(scale=(1.0, 0.5), zero_point=(3,), axis=-1)
    q = quantize(np.array([[1.0, 1.0], [2.0, -1.0]]), params, "int8")
    np.testing.assert_array_equal(q, [[4, 5], [5, 1]])
    np.testing.assert_allclose(dequantize(q, params), [[1.0, 1.0], [2.0, -1.0]])


def test_per_axis_shape_mismatch_is_refused() -> None:
    params = QuantParams(scale=(1.0, 2.0, 3.0), zero_point=(0, 0, 0), axis=1)
    with pytest.raises(ValueError, match="3 scales but dimension 1 has size 2"):
        quantize(np.zeros((4, 2)), params, "int8")
    with pytest.raises(ValueError, match="out of range"):
        quantize(np.zeros(3), QuantParams(scale=(1.0, 1.0, 1.0), zero_point=(0,), axis=2), "int8")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (), "zero_point": (0,)}, "at least one"),
        ({"scale": (0.0,), "zero_point": (0,)}, "finite and > 0"),
        ({"scale": (-1.0,), "zero_point": (0,)}, "finite and > 0"),
        ({"scale": (float("nan"),), "zero_point": (0,)}, "finite and > 0"),
        ({"scale": (1.0, 2.0), "zero_point": (0, 0, 0)}, "expected 1 or 2"),
        ({"scale": (1.0,), "zero_point": (0.5,)}, "integer"),
        ({"scale": ("0.1",), "zero_point": (0,)}, "number"),
        ({"scale": (1.0,), "zero_point": (0,), "axis": 1.5}, "axis"),
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantParams(**kwargs)  # type: ignore[arg-type]


def test_quantize_refuses_nan_float_targets_and_bad_zero_points() -> None:
    params = QuantParams(scale=(1.0,), zero_point=(0,))
    with pytest.raises(ValueError, match="NaN"):
        quantize([1.0, np.nan], params, "int8")
    with pytest.raises(ValueError, match="integer dtype"):
        quantize([1.0], params, "float32")
    with pytest.raises(ValueError, match="outside the range of uint8"):
        quantize([1.0], QuantParams(scale=(1.0,), zero_point=(-1,)), "uint8")
    with pytest.raises(ValueError, match="integer values"):
        dequantize(np.array([1.0]), params)


@SETTINGS
@given(params_and_dtype(), st.integers(0, 3))
def test_dict_round_trip(case: tuple[QuantParams, str], axis: int) -> None:
    params, _ = case
    params = QuantParams(scale=params.scale, zero_point=params.zero_point, axis=axis)
    data = params.to_dict()
    assert data == {
        "scale": list(params.scale),
        "zero_point": list(params.zero_point),
        "axis": axis,
    }
    assert QuantParams.from_dict(data) == params


def test_from_dict_accepts_scalars_and_defaults_axis() -> None:
    params = QuantParams.from_dict({"scale": 0.5, "zero_point": 3.0})
    assert params == QuantParams(scale=(0.5,), zero_point=(3,), axis=0)
    assert params.per_tensor


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"scale": [1.0]}, "lacks 'zero_point'"),
        ({"scale": [1.0], "zero_point": [0], "extra": 1}, "unknown quantization fields"),
        ({"scale": "1", "zero_point": [0]}, "list of numbers"),
        ([1.0], "must be an object"),
    ],
)
def test_from_dict_errors(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantParams.from_dict(data)  # type: ignore[arg-type]
