"""Runners and sessions: configured as the bundle tells devices to configure theirs."""

from __future__ import annotations

import pytest

from converters.runtime import (
    ORT_DISABLED_OPTIMIZERS,
    TFLITE_KERNELS,
    make_session,
    runtime_hints,
)


def test_runtime_hints_are_what_measurement_uses():
    # The exact manifest path the device agent reads.
    assert runtime_hints("onnxruntime") == {
        "onnxruntime": {"disabled_optimizers": ["QDQPropagationTransformer"]}
    }
    assert list(ORT_DISABLED_OPTIMIZERS) == ["QDQPropagationTransformer"]
    # TFLite is measured with the interpreter's default (XNNPACK) kernels.
    assert TFLITE_KERNELS == "default"
    assert runtime_hints("tflite") == {"tflite": {"op_resolver": "auto"}}
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime_hints("tensorrt")


def test_make_session_runs_with_and_without_disabled_optimizers(mlp_model, digits):
    x = digits.x[:4]
    default = make_session(mlp_model).run(None, {"input": x})[0]
    plain = make_session(mlp_model, disabled_optimizers=()).run(None, {"input": x})[0]
    assert default.shape == (4, 10)
    assert abs(default - plain).max() < 1e-6
