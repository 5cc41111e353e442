"""TensorSpec, manifest reconciliation and the input conversion rules (no runtime needed)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import AgentError, InputError, ModelLoadError
from device_agent.runtime.quant import QuantParams
from device_agent.runtime.spec import TensorSpec, format_shape, merge_specs
from device_agent.runtime.validate import finish_output, prepare_input

# --------------------------------------------------------------------------- TensorSpec


def test_spec_dict_round_trip() -> None:
    data = {
        "name": "x",
        "dtype": "int8",
        "shape": [None, "h", 4],
        "quantization": {"scale": [0.5], "zero_point": [-3], "axis": 0},
    }
    spec = TensorSpec.from_dict(data)
    assert spec.shape == (None, "h", 4)
    assert spec.quantization == QuantParams(scale=(0.5,), zero_point=(-3,))
    assert spec.quantized
    assert spec.to_dict() == data
    plain = TensorSpec.from_dict({"name": "y", "dtype": "float32", "shape": [-1, 3]})
    assert plain.shape == (None, 3)
    assert "quantization" not in plain.to_dict()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"name": "x", "dtype": "float32"}, "missing fields"),
        ({"name": "x", "dtype": "complex64", "shape": []}, "unsupported dtype"),
        ({"name": "", "dtype": "float32", "shape": []}, "non-empty"),
        ({"name": "x", "dtype": "float32", "shape": [-2]}, "invalid dimension"),
        ({"name": "x", "dtype": "float32", "shape": [True]}, "invalid dimension"),
        ({"name": "x", "dtype": "float32", "shape": "1,2"}, "shape must be a list or null"),
        ({"name": "x", "dtype": "float32", "shape": [], "dims": []}, "unknown fields"),
        (
            {
                "name": "x",
                "dtype": "float32",
                "shape": [],
                "quantization": {"scale": [1.0], "zero_point": [0]},
            },
            "only meaningful on integer",
        ),
    ],
)
def test_spec_from_dict_errors(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TensorSpec.from_dict(data)


def test_unknown_rank() -> None:
    spec = TensorSpec.from_dict({"name": "x", "dtype": "float32", "shape": None})
    assert spec.shape is None and spec.rank is None
    assert spec.to_dict() == {"name": "x", "dtype": "float32", "shape": None}
    assert prepare_input(spec, np.zeros((2, 3, 4))).shape == (2, 3, 4)
    model = [TensorSpec("x", "float32", None)]
    inputs, _ = merge_specs(model, [], [{"name": "x", "dtype": "float32", "shape": [2]}])
    assert inputs[0].shape == (2,)
    inputs, _ = merge_specs(MODEL_OUT, [], [{"name": "out_0", "dtype": "float32", "shape": None}])
    assert inputs[0].shape == (None, 3)  # the model's knowledge is kept


def test_format_shape() -> None:
    assert format_shape((None, "batch", 4)) == "[?, batch, 4]"
    assert format_shape(()) == "[]"
    assert format_shape(None) == "[...]"


# --------------------------------------------------------------------------- merge_specs

MODEL_IN = [TensorSpec("serving_x", "int8", (None, 4), QuantParams((0.1,), (0,)))]
MODEL_OUT = [TensorSpec("out_0", "float32", (None, 3))]


def test_merge_takes_manifest_names_quantization_and_fixed_dims() -> None:
    given = [
        {
            "name": "x",
            "dtype": "int8",
            "shape": [1, 4],
            "quantization": {"scale": [0.2], "zero_point": [5], "axis": 0},
        }
    ]
    inputs, outputs = merge_specs(MODEL_IN, MODEL_OUT, given, aliases={"x": "serving_x"})
    assert inputs == [TensorSpec("x", "int8", (1, 4), QuantParams((0.2,), (5,)))]
    assert outputs == MODEL_OUT  # not described: the runtime's view stands


def test_merge_without_specs_is_identity() -> None:
    assert merge_specs(MODEL_IN, MODEL_OUT, None) == (MODEL_IN, MODEL_OUT)


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ([{"name": "nope", "dtype": "int8", "shape": [1, 4]}], "does not have"),
        (
            [{"name": "serving_x", "dtype": "uint8", "shape": [1, 4]}],
            "is uint8, the model has int8",
        ),
        ([{"name": "serving_x", "dtype": "int8", "shape": [4]}], "shape"),
        ([{"name": "out_0", "dtype": "float32", "shape": [None, 5]}], "shape"),
        ([{"name": "out_0", "dtype": "float32"}], "invalid tensor description"),
        (
            [
                {"name": "out_0", "dtype": "float32", "shape": [None, 3]},
                {"name": "out_0", "dtype": "float32", "shape": [None, 3]},
            ],
            "twice",
        ),
    ],
)
def test_merge_refuses_a_manifest_that_does_not_describe_the_model(
    given: list[dict[str, object]], match: str
) -> None:
    with pytest.raises(ModelLoadError, match=match):
        merge_specs(MODEL_IN, MODEL_OUT, given)


# --------------------------------------------------------------------------- prepare_input

F32 = TensorSpec("x", "float32", ("batch", 4))
I64 = TensorSpec("ids", "int64", (None,))
Q8 = TensorSpec("q", "int8", (None, 2), QuantParams((0.5,), (-1,)))


def test_float_input_accepts_float64_ints_and_bools() -> None:
    out = prepare_input(F32, np.arange(8, dtype=np.float64).reshape(2, 4))
    assert out.dtype == np.float32
    assert prepare_input(F32, [[1, 2, 3, 4]]).dtype == np.float32
    assert prepare_input(F32, np.ones((1, 4), bool)).dtype == np.float32
    same = np.zeros((3, 4), np.float32)
    assert prepare_input(F32, same) is same  # no copy when nothing to convert


def test_float_input_passes_nan_but_refuses_overflow() -> None:
    out = prepare_input(F32, np.array([[np.nan, np.inf, -np.inf, 1.0]]))
    assert np.isnan(out[0, 0]) and np.isinf(out[0, 1])
    with pytest.raises(InputError, match="'x': values overflow float32"):
        prepare_input(F32, np.array([[1e300, 0, 0, 0]]))
    half = TensorSpec("h", "float16", (1,))
    with pytest.raises(InputError, match="overflow float16"):
        prepare_input(half, np.array([70000], np.int64))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([["a", "b", "c", "d"]]), "'x': expected float32 .*got <U1"),
        (np.ones((1, 4), np.complex64), "complex64"),
        ([[1, 2], [3]], "'x'"),
    ],
)
def test_float_input_refuses_non_numbers(value: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        prepare_input(F32, value)  # type: ignore[arg-type]


def test_shape_errors_name_input_expected_and_got() -> None:
    with pytest.raises(InputError) as err:
        prepare_input(F32, np.zeros((2, 5)))
    assert str(err.value) == "input 'x': expected shape [batch, 4], got [2, 5]"
    with pytest.raises(InputError, match=r"expected shape \[batch, 4\], got \[4\]"):
        prepare_input(F32, np.zeros(4))
    fixed = TensorSpec("x", "float32", (1, 4))
    with pytest.raises(InputError, match=r"got \[3, 4\]"):
        prepare_input(fixed, np.zeros((3, 4)))
    assert prepare_input(fixed, np.zeros((3, 4)), any_batch=True).shape == (3, 4)


def test_integer_input_rules() -> None:
    assert prepare_input(I64, np.array([1.0, -2.0])).tolist() == [1, -2]
    assert prepare_input(I64, np.array([1, 2], np.uint8)).dtype == np.int64
    with pytest.raises(InputError, match="'ids': expected int64 values, got non-integral"):
        prepare_input(I64, np.array([1.5]))
    with pytest.raises(InputError, match="NaN"):
        prepare_input(I64, np.array([np.nan]))
    with pytest.raises(InputError, match="outside the int64 range"):
        prepare_input(I64, np.array([2.0**63]))
    with pytest.raises(InputError, match="outside the int64 range"):
        prepare_input(I64, np.array([2**64 - 1], np.uint64))
    i8 = TensorSpec("small", "int8", (None,))
    with pytest.raises(InputError, match="outside the int8 range"):
        prepare_input(i8, np.array([200]))
    u32 = TensorSpec("u", "uint32", (None,))
    with pytest.raises(InputError, match="outside the uint32 range"):
        prepare_input(u32, np.array([-1]))


def test_bool_and_string_inputs() -> None:
    b = TensorSpec("b", "bool", (2,))
    assert prepare_input(b, [0, 1]).dtype == np.bool_
    with pytest.raises(InputError, match="bool"):
        prepare_input(b, [0, 2])
    s = TensorSpec("s", "string", (1,))
    assert prepare_input(s, np.array(["hi"])).dtype.kind == "U"
    with pytest.raises(InputError, match="strings"):
        prepare_input(s, np.array([1.0]))


def test_quantized_input_is_quantized_and_refuses_non_finite() -> None:
    out = prepare_input(Q8, np.array([[0.0, 1.0], [-100.0, 100.0]]))
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, [[-1, 1], [-128, 127]])  # saturates
    with pytest.raises(InputError, match=r"'q': contains NaN or infinity.*int8"):
        prepare_input(Q8, np.array([[np.nan, 0.0]]))
    with pytest.raises(InputError, match="infinity"):
        prepare_input(Q8, np.array([[np.inf, 0.0]]))
    with pytest.raises(InputError, match="real numbers"):
        prepare_input(Q8, np.array([["a", "b"]]))


def test_per_axis_mismatch_on_dynamic_dim_is_an_input_error() -> None:
    spec = TensorSpec("q", "int8", (None, None), QuantParams((1.0, 1.0), (0, 0), axis=1))
    with pytest.raises(InputError, match="'q': per-axis quantization has 2 scales"):
        prepare_input(spec, np.zeros((1, 3)))


def test_finish_output_dequantizes_only_quantized_outputs() -> None:
    out = finish_output(Q8, np.array([[-1, 1]], np.int8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 1.0]])
    ids = np.array([3, 4], np.int64)
    assert finish_output(I64, ids) is ids


def test_errors_are_agent_errors_with_reasons() -> None:
    with pytest.raises(AgentError) as err:
        prepare_input(F32, np.zeros(3))
    assert err.value.reason == "bad-input"
