"""OnnxRuntime against real onnxruntime sessions."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from device_agent.errors import InferenceError, InputError, ModelLoadError
from device_agent.runtime import OnnxRuntime, TensorSpec
from device_agent.runtime.onnx import resolve_providers

from .conftest import QAXIS, QIN, QOUT, Mlp

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_mlp_matches_numpy_reference_with_dynamic_batch(mlp_onnx: Mlp) -> None:
    rng = np.random.default_rng(7)
    with OnnxRuntime(mlp_onnx.path) as rt:
        assert rt.name == "onnxruntime"
        assert rt.version == ort.__version__
        assert rt.providers == ("CPUExecutionProvider",)
        assert rt.inputs == (TensorSpec("x", "float32", ("batch", 4)),)
        assert rt.outputs == (TensorSpec("y", "float32", ("batch", 3)),)
        for batch in (1, 5, 64):
            x = rng.normal(size=(batch, 4))  # float64: the agent casts
            out = rt.predict({"x": x})
            assert list(out) == ["y"]
            assert out["y"].shape == (batch, 3)
            np.testing.assert_allclose(out["y"], mlp_onnx.reference(x), rtol=1e-5, atol=1e-5)
        # A bare array is fine for a single-input model; lists too.
        np.testing.assert_allclose(rt.predict(x)["y"], mlp_onnx.reference(x), atol=1e-5)
        assert rt.predict([[0.0, 0.0, 0.0, 0.0]])["y"].shape == (1, 3)


def test_fixed_batch_one_model_is_run_per_sample(mlp_b1_onnx: Mlp) -> None:
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    with OnnxRuntime(mlp_b1_onnx.path) as rt:
        assert rt.inputs[0].shape == (1, 4)
        out = rt.predict(x)["y"]
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out, mlp_b1_onnx.reference(x), rtol=1e-5, atol=1e-5)


def test_fixed_batch_loop_with_two_inputs(two_io_b1_onnx: Path) -> None:
    rt = OnnxRuntime(two_io_b1_onnx)
    out = rt.predict({"a": np.zeros((3, 3)), "ids": np.array([1, 2, 3])})
    assert out["ids_out"].tolist() == [2, 4, 6]
    np.testing.assert_array_equal(out["a_out"], np.ones((3, 3)))
    with pytest.raises(InputError, match="disagree on the batch size \\('a' has 2, 'ids' has 3\\)"):
        rt.predict({"a": np.zeros((2, 3)), "ids": np.array([1, 2, 3])})
    with pytest.raises(InputError, match="'a': empty batch"):
        rt.predict({"a": np.zeros((0, 3)), "ids": np.zeros(0)})


def test_provider_fallback_warns_and_ends_with_cpu(
    mlp_onnx: Mlp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    rt = OnnxRuntime(mlp_onnx.path, providers=GPU_PROVIDERS)
    assert rt.providers == ("CPUExecutionProvider",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "TensorrtExecutionProvider" in text and "CUDAExecutionProvider" in text
    assert "using CPUExecutionProvider" in text
    caplog.clear()
    # CPU is appended even when the config forgot it.
    rt = OnnxRuntime(mlp_onnx.path, providers=["CUDAExecutionProvider"])
    assert rt.providers == ("CPUExecutionProvider",)
    assert "CUDAExecutionProvider" in caplog.text
    rt.predict(np.zeros((1, 4)))


def test_no_warning_when_providers_are_available(
    mlp_onnx: Mlp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    OnnxRuntime(mlp_onnx.path, providers=["CPUExecutionProvider"])
    assert caplog.records == []


def test_resolve_providers_keeps_order_dedupes_and_puts_cpu_last() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider", "CUDAExecutionProvider"], available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers(GPU_PROVIDERS + GPU_PROVIDERS, available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers([], available) == ["CPUExecutionProvider"]
    with pytest.raises(TypeError):
        resolve_providers("CUDAExecutionProvider", available)


def test_thread_options_reach_the_session(mlp_onnx: Mlp) -> None:
    rt = OnnxRuntime(mlp_onnx.path, intra_op_threads=2, inter_op_threads=3)
    assert rt.intra_op_threads == 2
    assert rt.inter_op_threads == 3
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(rt.predict(x)["y"], mlp_onnx.reference(x), atol=1e-5)
    default = OnnxRuntime(mlp_onnx.path)
    assert default.intra_op_threads == 0  # onnxruntime's "choose for me"
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxRuntime(mlp_onnx.path, intra_op_threads=0)


def test_wrong_inputs_raise_input_error_naming_the_problem(two_io_onnx: Path) -> None:
    rt = OnnxRuntime(two_io_onnx)
    good = {"a": np.zeros((2, 3)), "ids": np.array([1, 2])}
    out = rt.predict(good)
    np.testing.assert_array_equal(out["a_out"], np.ones((2, 3), np.float32))
    assert out["ids_out"].dtype == np.int64 and out["ids_out"].tolist() == [2, 4]

    with pytest.raises(InputError, match=r"unknown input 'b'; the model's inputs are 'a', 'ids'"):
        rt.predict({"b": np.zeros((2, 3)), "ids": np.array([1, 2])})
    with pytest.raises(InputError, match=r"missing input 'ids' \(int64, shape \[batch\]\)"):
        rt.predict({"a": np.zeros((2, 3))})
    with pytest.raises(InputError, match=r"'a': expected shape \[batch, 3\], got \[2, 4\]"):
        rt.predict({**good, "a": np.zeros((2, 4))})
    with pytest.raises(InputError, match=r"'ids': expected int64 values, got non-integral"):
        rt.predict({**good, "ids": np.array([0.5, 1.0])})
    with pytest.raises(InputError, match=r"'a': expected float32 .* got <U1"):
        rt.predict({**good, "a": np.full((2, 3), "x")})
    with pytest.raises(InputError, match="2 inputs"):
        rt.predict(np.zeros((2, 3)))


def test_inputs_must_agree_on_named_dimensions(two_io_onnx: Path) -> None:
    # Both inputs share the symbolic "batch"; onnxruntime would run the two independent
    # branches on different sizes without complaint.
    rt = OnnxRuntime(two_io_onnx)
    with pytest.raises(InputError, match="disagree on dimension 'batch': 'a' has 2, 'ids' has 3"):
        rt.predict({"a": np.zeros((2, 3)), "ids": np.array([1, 2, 3])})


def test_manifest_quantization_makes_integer_io_float(quant_io_onnx: Path) -> None:
    specs = [
        {"name": "xq", "dtype": "uint8", "shape": ["batch", 4], "quantization": QIN},
        {"name": "yq", "dtype": "int8", "shape": ["batch", 4], "quantization": QOUT},
    ]
    rt = OnnxRuntime(quant_io_onnx, specs=specs)
    assert [s.to_dict() for s in rt.inputs + rt.outputs] == specs
    x = np.random.default_rng(0).uniform(-5, 5, size=(8, 4))
    y = rt.predict(x)["yq"]
    assert y.dtype == np.float32
    # Input step 0.05 doubled, then output step 0.1: at most 0.05 + 0.05 away from 2x.
    np.testing.assert_allclose(y, 2 * x, atol=0.1 + 1e-6)
    # Out-of-range values saturate: the input at (0 - 128) * 0.05 = -6.4, and 2 * -6.4 at the
    # output's lower bound (-128 + 3) * 0.1 = -12.5.
    np.testing.assert_allclose(rt.predict(np.full((1, 4), -100.0))["yq"], np.full((1, 4), -12.5))
    # Without the manifest the agent cannot know the scales and passes integers through.
    raw = OnnxRuntime(quant_io_onnx)
    assert raw.inputs[0].quantization is None
    out = raw.predict(np.full((1, 4), 138, np.uint8))["yq"]
    assert out.dtype == np.int8 and out.tolist() == [[7, 7, 7, 7]]  # 2 * 0.5 / 0.1 - 3


def test_per_axis_manifest_quantization(per_axis_onnx: Path) -> None:
    specs = [{"name": "xq", "dtype": "int8", "shape": [None, 3], "quantization": QAXIS}]
    rt = OnnxRuntime(per_axis_onnx, specs=specs)
    rng = np.random.default_rng(5)
    x = np.stack(
        [rng.uniform(-12, 12, 50), rng.uniform(-2.6, 2.4, 50), rng.uniform(-55, 65, 50)], 1
    )
    y = rt.predict(x)["x"]
    half_steps = np.array(QAXIS["scale"]) / 2
    assert np.all(np.abs(y - x) <= half_steps + 1e-6)
    with pytest.raises(InputError, match=r"'xq': expected shape \[batch, 3\], got \[50, 2\]"):
        rt.predict(x[:, :2])


def test_nan_into_a_quantized_input_is_refused(quant_io_onnx: Path) -> None:
    rt = OnnxRuntime(
        quant_io_onnx,
        specs=[{"name": "xq", "dtype": "uint8", "shape": [None, 4], "quantization": QIN}],
    )
    with pytest.raises(InputError, match="'xq': contains NaN"):
        rt.predict(np.array([[0.0, np.nan, 0.0, 0.0]]))


def test_manifest_that_does_not_match_the_model_is_a_load_error(mlp_onnx: Mlp) -> None:
    with pytest.raises(ModelLoadError, match="the model has float32"):
        OnnxRuntime(mlp_onnx.path, specs=[{"name": "x", "dtype": "int8", "shape": [None, 4]}])
    with pytest.raises(ModelLoadError, match="model tensors: 'x', 'y'"):
        OnnxRuntime(mlp_onnx.path, specs=[{"name": "z", "dtype": "float32", "shape": [1]}])


def test_manifest_can_fix_a_dynamic_dimension(mlp_onnx: Mlp) -> None:
    rt = OnnxRuntime(mlp_onnx.path, specs=[{"name": "x", "dtype": "float32", "shape": [2, 4]}])
    assert rt.inputs[0].shape == (2, 4)
    with pytest.raises(InputError, match=r"expected shape \[2, 4\]"):
        rt.predict(np.zeros((3, 4)))


def test_corrupt_missing_and_truncated_models_are_load_errors(
    corrupt_file: Path, mlp_onnx: Mlp, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=r"onnxruntime cannot load corrupt.bin"):
        OnnxRuntime(corrupt_file)
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxRuntime(tmp_path / "absent.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp_onnx.path.read_bytes()[:100])
    with pytest.raises(ModelLoadError):
        # An accelerator provider in the list: the load is retried on CPU alone, then refused.
        OnnxRuntime(truncated, providers=["AzureExecutionProvider", "CPUExecutionProvider"])


def test_unknown_rank_accepts_any_shape_unless_the_manifest_pins_it(no_shape_onnx: Path) -> None:
    rt = OnnxRuntime(no_shape_onnx)
    assert rt.inputs == (TensorSpec("x", "float32", None),)
    for shape in [(), (3,), (2, 3, 4)]:
        x = np.full(shape, -1.5)
        np.testing.assert_array_equal(rt.predict(x)["y"], np.zeros(shape, np.float32))
    pinned = OnnxRuntime(
        no_shape_onnx, specs=[{"name": "x", "dtype": "float32", "shape": ["n", 2]}]
    )
    assert pinned.inputs[0].shape == ("n", 2)
    with pytest.raises(InputError, match=r"expected shape \[n, 2\], got \[3\]"):
        pinned.predict(np.zeros(3))


def test_non_tensor_outputs_are_refused_at_load(sequence_output_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"output 'seq' has type seq\(tensor\(float\)\)"):
        OnnxRuntime(sequence_output_onnx)


def test_closed_runtime_refuses_requests(mlp_onnx: Mlp) -> None:
    rt = OnnxRuntime(mlp_onnx.path)
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.predict(np.zeros((1, 4)))


def test_agent_imports_neither_onnx_nor_tensorflow(mlp_onnx: Mlp) -> None:
    code = (
        "import json, sys, numpy as np\n"
        "import device_agent.runtime as r\n"
        "before = sorted(m for m in ('onnx', 'onnxruntime', 'tensorflow') if m in sys.modules)\n"
        f"rt = r.load_runtime('onnxruntime', {str(mlp_onnx.path)!r})\n"
        "rt.predict(np.zeros((1, 4)))\n"
        "print(json.dumps([before, 'onnx' in sys.modules, 'tensorflow' in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[], False, False]


# ------------------------------------------------------------- the direct call to the session


def test_requests_go_to_the_cxx_session_with_the_public_results(two_io_onnx: Path) -> None:
    rt = OnnxRuntime(two_io_onnx)
    session = ort.InferenceSession(str(two_io_onnx), providers=["CPUExecutionProvider"])
    assert rt._call == rt._session._sess.run  # not the Python wrapper InferenceSession.run
    rng = np.random.default_rng(11)
    for batch in (1, 7):
        feeds = {
            "a": rng.normal(size=(batch, 3)).astype(np.float32),
            "ids": rng.integers(-5, 5, size=batch),
        }
        out = rt.predict(feeds)
        assert list(out) == ["a_out", "ids_out"]
        for name, expected in zip(out, session.run(None, feeds), strict=True):
            assert out[name].dtype == expected.dtype
            np.testing.assert_array_equal(out[name], expected)


def test_runtime_failure_is_reported_once_and_keeps_the_direct_call(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from ..conftest import write_gather_model  # a model onnxruntime fails on for some inputs

    rt = OnnxRuntime(write_gather_model(tmp_path / "gather.onnx"))
    direct = rt._call
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 9  # row 9 of a 4-row table
    capfd.readouterr()
    with pytest.raises(InferenceError, match=r"^onnxruntime failed: .*out of data bounds") as info:
        rt.predict({"input": x})
    assert "\n" not in str(info.value)
    # onnxruntime logs each failed run on stderr: the request ran once, it was not retried.
    assert capfd.readouterr().err.count("indices element out of data bounds") == 1
    assert rt._call == direct  # a genuine failure is not the binding's fault
    x[0, 0] = 2
    np.testing.assert_array_equal(rt.predict({"input": x})["probabilities"], [[8, 9, 10, 11]])


def test_an_unusable_direct_call_is_replaced_by_the_public_run(
    mlp_onnx: Mlp, caplog: pytest.LogCaptureFixture
) -> None:
    """An onnxruntime whose C++ ``run`` took other arguments would fail every direct call:
    the request is served by ``InferenceSession.run`` and the direct call is dropped."""
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    rt = OnnxRuntime(mlp_onnx.path)
    calls = []

    def other_signature(*args: object) -> None:
        calls.append(args)
        raise TypeError("run(): incompatible function arguments")

    rt._call = other_signature
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(rt.predict({"x": x})["y"], mlp_onnx.reference(x), atol=1e-5)
    assert len(calls) == 1 and rt._call == rt._session.run
    assert "using InferenceSession.run from now on" in caplog.text
    np.testing.assert_allclose(rt.predict({"x": x})["y"], mlp_onnx.reference(x), atol=1e-5)
    assert len(calls) == 1


def test_an_execution_provider_failure_goes_through_onnxruntimes_fallback(
    mlp_onnx: Mlp, caplog: pytest.LogCaptureFixture
) -> None:
    """``InferenceSession.run`` recovers from an EPFail by recreating the session on its
    fallback providers; the adapter retries through it and then binds the new C++ session.
    (An EPFail cannot be caused on a CPU-only machine, so the direct call raises one.)"""
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    rt = OnnxRuntime(mlp_onnx.path)

    def failing_provider(*args: object) -> None:
        raise EPFail("CUDA failure 700: an illegal memory access was encountered")

    rt._call = failing_provider
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(rt.predict(x)["y"], mlp_onnx.reference(x), atol=1e-5)
    assert rt._call == rt._session._sess.run
    assert "an execution provider failed during a run" in caplog.text
    assert rt.providers == ("CPUExecutionProvider",)
