"""TFLiteRuntime against real LiteRT interpreters and models converted by TensorFlow."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import InferenceError, InputError, ModelLoadError, RuntimeUnavailable
from device_agent.runtime import TensorSpec, TFLiteRuntime
from device_agent.runtime.tflite import INTERPRETER_LIBRARIES, load_interpreter_class

from .conftest import TFLiteModels


def _samples(n: int, seed: int = 0) -> np.ndarray:
    # The representative dataset's distribution, kept inside the calibrated range.
    return np.clip(np.random.default_rng(seed).normal(size=(n, 4)), -2.5, 2.5)


def test_float_model_matches_keras(tflite_models: TFLiteModels) -> None:
    x = _samples(16)
    with TFLiteRuntime(tflite_models.float_dyn) as rt:
        assert rt.name == "tflite"
        assert rt.library == "ai_edge_litert"  # first in the chain, installed here
        assert rt.providers == ("CPU",)
        # One signature covers all I/O: its keys are the public names.
        assert rt.inputs == (TensorSpec("x", "float32", (None, 4)),)
        assert rt.outputs == (TensorSpec("output_0", "float32", (None, 3)),)
        out = rt.predict({"x": x})
    assert list(out) == ["output_0"]
    np.testing.assert_allclose(out["output_0"], tflite_models.reference(x), rtol=1e-5, atol=1e-5)


def test_dynamic_batch_resizes_the_interpreter(tflite_models: TFLiteModels) -> None:
    rt = TFLiteRuntime(tflite_models.float_dyn)
    for n in (1, 7, 2, 7, 1):
        x = _samples(n, seed=n)
        y = rt.predict(x)["output_0"]
        assert y.shape == (n, 3)
        np.testing.assert_allclose(y, tflite_models.reference(x), rtol=1e-5, atol=1e-5)


def test_fixed_batch_model_loops_per_sample(tflite_models: TFLiteModels) -> None:
    rt = TFLiteRuntime(tflite_models.float_b1, num_threads=2)
    assert rt.num_threads == 2
    assert rt.inputs[0].shape == (1, 4)
    x = _samples(5)
    y = rt.predict(x)["output_0"]
    assert y.shape == (5, 3)
    np.testing.assert_allclose(y, tflite_models.reference(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"'x': expected shape \[1, 4\], got \[5, 3\]"):
        rt.predict(x[:, :3])


def test_int8_model_takes_and_returns_floats(tflite_models: TFLiteModels) -> None:
    rt = TFLiteRuntime(tflite_models.int8_b1)
    (spec_in,) = rt.inputs
    (spec_out,) = rt.outputs
    assert spec_in.dtype == "int8" and spec_in.quantization is not None
    assert spec_out.dtype == "int8" and spec_out.quantization is not None
    x = _samples(64, seed=11)
    y = rt.predict(x)["output_0"]
    assert y.dtype == np.float32 and y.shape == (64, 3)
    expected = tflite_models.reference(x)
    out_scale = spec_out.quantization.scale[0]
    error = np.abs(y - expected)
    # Within a few output steps of the float model (measured: max ~1.4 steps, mean ~0.4).
    assert error.max() <= 3 * out_scale
    assert error.mean() <= out_scale
    # The check has teeth: both zero points are far from 0, so dropping either (or not scaling)
    # would move the outputs by more than the tolerance.
    assert abs(spec_in.quantization.zero_point[0]) * spec_in.quantization.scale[0] > 0.1
    assert abs(spec_out.quantization.zero_point[0]) > 3


def test_manifest_may_use_tensor_names_and_override_quantization(
    tflite_models: TFLiteModels,
) -> None:
    probe = TFLiteRuntime(tflite_models.int8_b1)
    q_in = probe.inputs[0].quantization
    q_out = probe.outputs[0].quantization
    assert q_in is not None and q_out is not None
    specs = [
        {
            "name": "serving_default_x:0",
            "dtype": "int8",
            "shape": [1, 4],
            "quantization": q_in.to_dict(),
        },
        {"name": "output_0", "dtype": "int8", "shape": [1, 3], "quantization": q_out.to_dict()},
    ]
    rt = TFLiteRuntime(tflite_models.int8_b1, specs=specs)
    assert [s.name for s in rt.inputs] == ["serving_default_x:0"]
    x = _samples(3)
    np.testing.assert_array_equal(
        rt.predict({"serving_default_x:0": x})["output_0"], probe.predict(x)["output_0"]
    )
    # The manifest's parameters win over the interpreter's: a doubled output scale doubles
    # the dequantized output.
    doubled = {**q_out.to_dict(), "scale": [2 * q_out.scale[0]]}
    rt2 = TFLiteRuntime(tflite_models.int8_b1, specs=[{**specs[1], "quantization": doubled}])
    np.testing.assert_allclose(
        rt2.predict(x)["output_0"], 2 * probe.predict(x)["output_0"], rtol=1e-6
    )


def test_wrong_inputs_raise_input_error(tflite_models: TFLiteModels) -> None:
    rt = TFLiteRuntime(tflite_models.int8_b1)
    with pytest.raises(InputError, match=r"unknown input 'y'; the model's inputs are 'x'"):
        rt.predict({"y": _samples(1)})
    with pytest.raises(InputError, match=r"'x': expected shape \[1, 4\], got \[4\]"):
        rt.predict(np.zeros(4))
    with pytest.raises(InputError, match="'x': contains NaN or infinity"):
        rt.predict(np.array([[0.0, np.inf, 0.0, 0.0]]))
    with pytest.raises(InputError, match="'x': expected real numbers"):
        rt.predict(np.full((1, 4), "a"))


def test_corrupt_and_missing_models_are_load_errors(
    tflite_models: TFLiteModels, corrupt_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=r"ai_edge_litert cannot load corrupt\.bin"):
        TFLiteRuntime(corrupt_file)
    with pytest.raises(ModelLoadError, match="not found"):
        TFLiteRuntime(tmp_path / "absent.tflite")
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(tflite_models.float_dyn.read_bytes()[:64])
    with pytest.raises(ModelLoadError):
        TFLiteRuntime(truncated)


def test_manifest_mismatch_is_a_load_error(tflite_models: TFLiteModels) -> None:
    with pytest.raises(ModelLoadError, match="is float32, the model has int8"):
        TFLiteRuntime(
            tflite_models.int8_b1, specs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}]
        )


def test_concurrent_predicts_are_serialized(tflite_models: TFLiteModels) -> None:
    """Without the lock, resizes and set/invoke/get from several threads interleave."""
    rt = TFLiteRuntime(tflite_models.float_dyn)
    failures: list[str] = []

    def worker(seed: int) -> None:
        for i in range(15):
            x = _samples(1 + (seed + i) % 4, seed=seed * 100 + i)
            y = rt.predict(x)["output_0"]
            if not np.allclose(y, tflite_models.reference(x), rtol=1e-5, atol=1e-5):
                failures.append(f"thread {seed} request {i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_closed_runtime_refuses_requests(tflite_models: TFLiteModels) -> None:
    rt = TFLiteRuntime(tflite_models.float_dyn)
    rt.close()
    with pytest.raises(InferenceError, match="closed"):
        rt.predict(_samples(1))


def test_chain_order_and_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [lib for lib, _ in INTERPRETER_LIBRARIES] == [
        "ai_edge_litert",
        "tflite_runtime",
        "tensorflow",
    ]
    cls, library, version = load_interpreter_class()
    assert library == "ai_edge_litert" and cls.__name__ == "Interpreter" and version
    # A module set to None in sys.modules raises ImportError on import: nothing is importable.
    for lib, module in INTERPRETER_LIBRARIES:
        monkeypatch.setitem(sys.modules, lib, None)
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(RuntimeUnavailable, match=r"pip install ai-edge-litert.*NumPy<2") as err:
        load_interpreter_class()
    assert "tried ai_edge_litert (ModuleNotFoundError), tflite_runtime" in str(err.value)
