"""The no-conversion fast path of ``Runtime.predict``.

A request whose arrays already are what the model takes (exact dtype, C-contiguous, right rank
and fixed sizes, named sizes in agreement) skips validation; everything else must behave exactly
as before: same outputs, same :class:`InputError` messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.errors import InferenceError, InputError
from device_agent.runtime import OnnxRuntime, Runtime, load_runtime
from device_agent.runtime import base as runtime_base
from device_agent.runtime.validate import prepare_input

from .conftest import QIN, QOUT, Mlp


@pytest.fixture
def prepare_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the inputs the full path converted during the test (the fast path converts none)."""
    calls: list[str] = []
    real = prepare_input

    def spy(spec: Any, value: Any, **kwargs: Any) -> Any:
        calls.append(spec.name)
        return real(spec, value, **kwargs)

    monkeypatch.setattr(runtime_base, "prepare_input", spy)
    yield calls


def _slow(rt: Runtime, inputs: Any) -> dict[str, np.ndarray]:
    """What the full path returns for ``inputs`` (both fast paths switched off: the common one
    and the ONNX adapter's direct one)."""
    saved = {
        name: getattr(rt, name)
        for name in ("_fast_inputs", "_direct", "_direct_one")
        if hasattr(rt, name)
    }
    rt._fast_inputs = None
    if isinstance(rt, OnnxRuntime):
        rt._direct, rt._direct_one = False, None
    try:
        return rt.predict(inputs)
    finally:
        for name, value in saved.items():
            setattr(rt, name, value)


def test_fast_path_output_equals_full_path(mlp_onnx: Mlp, prepare_calls: list[str]) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    fast = rt.predict({"x": x})
    assert prepare_calls == []
    slow = _slow(rt, {"x": x})
    assert prepare_calls == ["x"]
    assert fast.keys() == slow.keys() == {"y"}
    assert fast["y"].dtype == slow["y"].dtype == np.float32
    np.testing.assert_array_equal(fast["y"], slow["y"])
    np.testing.assert_allclose(fast["y"], mlp_onnx.reference(x), rtol=1e-5, atol=1e-5)


def test_bare_array_takes_the_fast_path(mlp_onnx: Mlp, prepare_calls: list[str]) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    x = np.ones((1, 4), np.float32)
    out = rt.predict(x)
    assert prepare_calls == []
    np.testing.assert_array_equal(out["y"], _slow(rt, x)["y"])


def test_nan_and_inf_pass_through_the_fast_path(mlp_onnx: Mlp, prepare_calls: list[str]) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    x = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    fast = rt.predict({"x": x})
    assert prepare_calls == []
    np.testing.assert_array_equal(fast["y"], _slow(rt, {"x": x})["y"])  # NaN == NaN here


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.astype(np.float64), id="other-dtype"),
        pytest.param(lambda x: x.tolist(), id="list"),
        pytest.param(lambda x: x.astype(">f4"), id="big-endian"),
    ],
)
def test_other_requests_take_the_full_path_with_equal_outputs(
    mlp_onnx: Mlp, prepare_calls: list[str], make: Any
) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    value = make(x)
    out = rt.predict({"x": value})
    assert prepare_calls == ["x"]
    reference = rt.predict({"x": np.ascontiguousarray(np.asarray(value, np.float32))})
    np.testing.assert_array_equal(out["y"], reference["y"])


STRIDED = [
    pytest.param(lambda x: np.asfortranarray(np.repeat(x, 2, axis=0)), id="fortran"),
    pytest.param(lambda x: np.concatenate([x, x], axis=1)[:, ::2], id="strided"),
]


@pytest.mark.parametrize("make", STRIDED)
def test_strided_arrays_go_to_onnxruntime_as_they_are(
    mlp_onnx: Mlp, prepare_calls: list[str], make: Any
) -> None:
    """The ONNX adapter's one-input path does not require C order (onnxruntime copies a
    strided array itself); the common check, used by TFLite, still does."""
    rt = OnnxRuntime(mlp_onnx.path)
    value = make(np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32))
    assert not value.flags.c_contiguous
    out = rt.predict({"x": value})
    assert prepare_calls == []
    np.testing.assert_array_equal(out["y"], rt.predict({"x": np.ascontiguousarray(value)})["y"])
    np.testing.assert_array_equal(out["y"], _slow(rt, {"x": value})["y"])
    assert rt._fast_feeds({"x": value}) is None


@pytest.mark.parametrize("make", STRIDED)
def test_strided_arrays_take_the_full_path_with_two_inputs(
    two_io_onnx: Path, prepare_calls: list[str], make: Any
) -> None:
    rt = OnnxRuntime(two_io_onnx)
    a = make(np.arange(6, dtype=np.float32).reshape(2, 3))
    ids = np.arange(a.shape[0], dtype=np.int64)
    out = rt.predict({"a": a, "ids": ids})
    assert prepare_calls == ["a", "ids"]
    np.testing.assert_array_equal(out["a_out"], a + 1)


def test_mapping_that_is_not_a_dict_takes_the_full_path(
    mlp_onnx: Mlp, prepare_calls: list[str]
) -> None:
    from types import MappingProxyType

    rt = OnnxRuntime(mlp_onnx.path)
    x = np.ones((1, 4), np.float32)
    out = rt.predict(MappingProxyType({"x": x}))
    assert prepare_calls == ["x"]
    np.testing.assert_array_equal(out["y"], rt.predict({"x": x})["y"])


def test_two_inputs_fast_path(two_io_onnx: Path, prepare_calls: list[str]) -> None:
    rt = OnnxRuntime(two_io_onnx)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([4, -7], np.int64)
    out = rt.predict({"ids": ids, "a": a})
    assert prepare_calls == []
    np.testing.assert_array_equal(out["a_out"], a + 1)
    np.testing.assert_array_equal(out["ids_out"], ids * 2)
    slow = _slow(rt, {"a": a, "ids": ids})
    assert out.keys() == slow.keys()
    for name in out:
        assert out[name].dtype == slow[name].dtype
        np.testing.assert_array_equal(out[name], slow[name])


def test_fixed_batch_model_fast_path_only_at_batch_1(
    mlp_b1_onnx: Mlp, prepare_calls: list[str]
) -> None:
    rt = OnnxRuntime(mlp_b1_onnx.path)
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    one = rt.predict({"x": x[:1]})
    assert prepare_calls == []
    many = rt.predict({"x": x})  # looped per sample by the full path
    assert prepare_calls == ["x"]
    np.testing.assert_array_equal(many["y"][:1], one["y"])
    np.testing.assert_allclose(many["y"], mlp_b1_onnx.reference(x), rtol=1e-5, atol=1e-5)


def test_quantized_model_never_takes_the_fast_path(
    quant_io_onnx: Path, prepare_calls: list[str]
) -> None:
    rt = load_runtime(
        "onnxruntime",
        quant_io_onnx,
        specs=[
            {"name": "xq", "dtype": "uint8", "shape": ["batch", 4], "quantization": QIN},
            {"name": "yq", "dtype": "int8", "shape": ["batch", 4], "quantization": QOUT},
        ],
    )
    # Already-quantized bytes are still real values to the agent: they get quantized.
    xq = np.array([[0, 1, 2, 3]], np.uint8)
    out = rt.predict({"xq": xq})
    assert prepare_calls == ["xq"]
    assert out["yq"].dtype == np.float32
    np.testing.assert_allclose(out["yq"], 2 * xq.astype(np.float32), atol=0.1)


def test_quantized_output_is_dequantized_on_the_fast_path(
    quant_io_onnx: Path, prepare_calls: list[str]
) -> None:
    # Only the output declared quantized: the uint8 input is fed as-is (fast path).
    rt = load_runtime(
        "onnxruntime",
        quant_io_onnx,
        specs=[{"name": "yq", "dtype": "int8", "shape": ["batch", 4], "quantization": QOUT}],
    )
    xq = np.array([[128, 148, 168, 108]], np.uint8)  # 0, 1, 2, -1 in real values
    out = rt.predict({"xq": xq})
    assert prepare_calls == []
    assert out["yq"].dtype == np.float32
    np.testing.assert_allclose(out["yq"], [[0.0, 2.0, 4.0, -2.0]], atol=1e-6)
    np.testing.assert_array_equal(out["yq"], _slow(rt, {"xq": xq})["yq"])


def test_unknown_rank_input_fast_path(no_shape_onnx: Path, prepare_calls: list[str]) -> None:
    rt = OnnxRuntime(no_shape_onnx)
    x = np.array([[[-1.0, 2.0]]], np.float32)
    out = rt.predict({"x": x})
    assert prepare_calls == []
    np.testing.assert_array_equal(out["y"], [[[0.0, 2.0]]])


# Requests that must be refused, with the messages the full path has always given.
MLP_ERRORS = [
    ({"x": np.ones((1, 5), np.float32)}, "input 'x': expected shape [batch, 4], got [1, 5]"),
    ({"x": np.ones((4,), np.float32)}, "input 'x': expected shape [batch, 4], got [4]"),
    ({"x": np.ones((1, 1, 4), np.float32)}, "input 'x': expected shape [batch, 4], got [1, 1, 4]"),
    (
        {"x": np.ones((1, 4), np.float32), "z": np.ones((1, 4), np.float32)},
        "unknown input 'z'; the model's inputs are 'x'",
    ),
    ({"z": np.ones((1, 4), np.float32)}, "unknown input 'z'; the model's inputs are 'x'"),
    ({}, "missing input 'x' (float32, shape [batch, 4])"),
    ({"x": np.array([["a", "b", "c", "d"]])}, "input 'x': expected float32 (or any real numbers)"),
    ({"x": np.ones((1, 4), np.float64) * 1e300}, "input 'x': values overflow float32"),
]


@pytest.mark.parametrize(("inputs", "message"), MLP_ERRORS)
def test_bad_requests_raise_the_same_errors(mlp_onnx: Mlp, inputs: Any, message: str) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    with pytest.raises(InputError) as info:
        rt.predict(inputs)
    assert str(info.value).startswith(message)


TWO_IO_ERRORS = [
    (
        np.ones((1, 3), np.float32),
        "the model has 2 inputs ('a', 'ids'); pass a mapping of name to array",
    ),
    (
        {"a": np.ones((2, 3), np.float32), "ids": np.ones((3,), np.int64)},
        "inputs disagree on dimension 'batch': 'a' has 2, 'ids' has 3",
    ),
    ({"a": np.ones((2, 3), np.float32)}, "missing input 'ids' (int64, shape [batch])"),
    (
        {"a": np.ones((2, 3), np.float32), "ids": np.array([1.5, 2.0])},
        "input 'ids': expected int64 values, got non-integral float64 values",
    ),
    (
        {"a": np.ones((2, 3), np.float32), "ids": np.ones((2,), np.int64), "b": 1},
        "unknown input 'b'; the model's inputs are 'a', 'ids'",
    ),
]


@pytest.mark.parametrize(("inputs", "message"), TWO_IO_ERRORS)
def test_bad_two_input_requests_raise_the_same_errors(
    two_io_onnx: Path, inputs: Any, message: str
) -> None:
    rt = OnnxRuntime(two_io_onnx)
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        rt.predict(inputs)


def test_fixed_batch_disagreement_message(two_io_b1_onnx: Path) -> None:
    rt = OnnxRuntime(two_io_b1_onnx)
    with pytest.raises(InputError, match=r"^inputs disagree on the batch size \('a' has 2, 'ids'"):
        rt.predict({"a": np.ones((2, 3), np.float32), "ids": np.ones((3,), np.int64)})


def test_closed_runtime_raises_on_the_fast_path(mlp_onnx: Mlp) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.predict({"x": np.ones((1, 4), np.float32)})


def test_one_input_path_declines_what_the_common_check_declines(
    mlp_onnx: Mlp, prepare_calls: list[str]
) -> None:
    """The ONNX adapter inlines the one-input check: whatever it declines must still be served
    (or refused) exactly as the full path does, and what it accepts equals the full path."""
    rt = OnnxRuntime(mlp_onnx.path)
    assert rt._direct_one is not None
    x = np.random.default_rng(8).normal(size=(3, 4)).astype(np.float32)
    for request in (
        {"x": x},
        {"x": x[:1]},
        {"x": np.asfortranarray(x)},
        {"x": x.astype(np.float64)},
        {"x": x.tolist()},
        x,
    ):
        np.testing.assert_array_equal(rt.predict(request)["y"], _slow(rt, request)["y"])
    for bad, message in MLP_ERRORS:
        with pytest.raises(InputError) as info:
            rt.predict(bad)
        assert str(info.value).startswith(message)


def test_named_size_repeated_in_one_input_is_still_checked(
    onnx_dir: Path, prepare_calls: list[str]
) -> None:
    """x: [n, n] (a square matrix): the one-input shortcut does not apply, and a request with
    unequal sizes is refused by the common path."""
    from onnx import TensorProto, helper

    from .conftest import _save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])],
    )
    rt = OnnxRuntime(_save(graph, onnx_dir / "square.onnx"))
    assert rt._direct_one is None
    square = np.eye(3, dtype=np.float32)
    np.testing.assert_array_equal(rt.predict({"x": square})["y"], square)
    assert prepare_calls == []
    with pytest.raises(InputError, match="inputs disagree on dimension 'n'"):
        rt.predict({"x": np.ones((2, 3), np.float32)})
