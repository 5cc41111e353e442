from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import AgentError, RuntimeUnavailable, UnsupportedRuntime
from device_agent.runtime import (
    RUNTIMES,
    OnnxRuntime,
    RuntimeOptions,
    TFLiteRuntime,
    load_runtime,
)

from .conftest import Mlp, TFLiteModels


def test_loads_onnx_with_options(mlp_onnx: Mlp) -> None:
    options = RuntimeOptions(
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"), threads=1, inter_op_threads=2
    )
    rt = load_runtime("onnxruntime", mlp_onnx.path, options=options)
    assert isinstance(rt, OnnxRuntime)
    assert rt.providers == ("CPUExecutionProvider",)
    assert (rt.intra_op_threads, rt.inter_op_threads) == (1, 2)
    x = np.ones((2, 4))
    np.testing.assert_allclose(rt.predict(x)["y"], mlp_onnx.reference(x), atol=1e-5)


def test_loads_onnx_with_specs(mlp_onnx: Mlp) -> None:
    specs = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    rt = load_runtime("onnxruntime", str(mlp_onnx.path), specs=specs)
    assert rt.inputs[0].shape == ("batch", 4)


def test_loads_tflite_with_threads(tflite_models: TFLiteModels) -> None:
    rt = load_runtime("tflite", tflite_models.float_dyn, options=RuntimeOptions(threads=2))
    assert isinstance(rt, TFLiteRuntime)
    assert rt.num_threads == 2
    x = np.zeros((1, 4))
    np.testing.assert_allclose(rt.predict(x)["output_0"], tflite_models.reference(x), atol=1e-5)


@pytest.mark.parametrize("name", ["tensorrt", "ONNXRUNTIME", "", "tflite "])
def test_unknown_runtime_is_refused(name: str, mlp_onnx: Mlp) -> None:
    with pytest.raises(UnsupportedRuntime, match=r"unknown runtime .*'onnxruntime', 'tflite'"):
        load_runtime(name, mlp_onnx.path)
    assert issubclass(UnsupportedRuntime, AgentError)
    assert not issubclass(UnsupportedRuntime, RuntimeUnavailable)
    assert RUNTIMES == ("onnxruntime", "tflite")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threads": 0},
        {"threads": True},
        {"inter_op_threads": -1},
        {"providers": "CPUExecutionProvider"},
    ],
)
def test_invalid_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RuntimeOptions(**kwargs)  # type: ignore[arg-type]


def test_options_are_keyword_only_and_lists_become_tuples() -> None:
    options = RuntimeOptions(providers=["CPUExecutionProvider"])  # type: ignore[arg-type]
    assert options.providers == ("CPUExecutionProvider",)
    with pytest.raises(TypeError):
        RuntimeOptions(("CPUExecutionProvider",))  # type: ignore[misc]
