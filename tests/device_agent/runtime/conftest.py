"""Small real models for the runtime tests, built once per session.

ONNX models are written with ``onnx.helper`` (fast); TFLite models are converted from Keras
with TensorFlow, whose import alone takes ~10 s, so they live in one session-scoped fixture
that only the TFLite tests request.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class Mlp:
    path: Path
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def reference(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x.astype(np.float64) @ self.w1 + self.b1, 0.0)
        return (h @ self.w2 + self.b2).astype(np.float32)


def _save(graph: Any, path: Path, opset: int = 17, *, check: bool = True) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _mlp(path: Path, batch: int | str) -> Mlp:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(4, 8)).astype(np.float32)
    b1 = rng.normal(size=(8,)).astype(np.float32)
    w2 = rng.normal(size=(8, 3)).astype(np.float32)
    b2 = rng.normal(size=(3,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    return Mlp(_save(graph, path), w1, b1, w2, b2)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def mlp_onnx(onnx_dir: Path) -> Mlp:
    """x: float32 [batch, 4] -> y: float32 [batch, 3], symbolic batch."""
    return _mlp(onnx_dir / "mlp.onnx", "batch")


@pytest.fixture(scope="session")
def mlp_b1_onnx(onnx_dir: Path) -> Mlp:
    """The same MLP exported with a fixed batch of 1."""
    return _mlp(onnx_dir / "mlp_b1.onnx", 1)


def _two_io(path: Path, batch: int | str) -> Path:
    """a: float32 [batch, 3], ids: int64 [batch] -> a_out = a + 1, ids_out = ids * 2."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "one"], ["a_out"]),
            helper.make_node("Mul", ["ids", "two"], ["ids_out"]),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch]),
        ],
        [
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, [batch]),
        ],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(2, np.int64), "two"),
        ],
    )
    return _save(graph, path)


@pytest.fixture(scope="session")
def two_io_onnx(onnx_dir: Path) -> Path:
    return _two_io(onnx_dir / "two_io.onnx", "batch")


@pytest.fixture(scope="session")
def two_io_b1_onnx(onnx_dir: Path) -> Path:
    return _two_io(onnx_dir / "two_io_b1.onnx", 1)


#: Quantization of the ONNX quantized-I/O model (only the manifest tells the agent).
QIN = {"scale": [0.05], "zero_point": [128], "axis": 0}
QOUT = {"scale": [0.1], "zero_point": [-3], "axis": 0}


@pytest.fixture(scope="session")
def quant_io_onnx(onnx_dir: Path) -> Path:
    """xq: uint8 [batch, 4] -> yq: int8 [batch, 4] computing y = 2 * x on real values."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(QIN["scale"][0], np.float32), "s_in"),
        numpy_helper.from_array(np.array(QIN["zero_point"][0], np.uint8), "z_in"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(QOUT["scale"][0], np.float32), "s_out"),
        numpy_helper.from_array(np.array(QOUT["zero_point"][0], np.int8), "z_out"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["x"]),
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["yq"]),
        ],
        "quant_io",
        [helper.make_tensor_value_info("xq", TensorProto.UINT8, ["batch", 4])],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, ["batch", 4])],
        inits,
    )
    return _save(graph, onnx_dir / "quant_io.onnx")


#: Per-channel quantization along axis 1 of the per-axis model's input.
QAXIS = {"scale": [0.1, 0.02, 0.5], "zero_point": [0, 5, -10], "axis": 1}


@pytest.fixture(scope="session")
def per_axis_onnx(onnx_dir: Path) -> Path:
    """xq: int8 [batch, 3] per-channel quantized -> x: float32 [batch, 3] (dequantized)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], axis=1)],
        "per_axis",
        [helper.make_tensor_value_info("xq", TensorProto.INT8, ["batch", 3])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.array(QAXIS["scale"], np.float32), "s"),
            numpy_helper.from_array(np.array(QAXIS["zero_point"], np.int8), "z"),
        ],
    )
    return _save(graph, onnx_dir / "per_axis.onnx")


@pytest.fixture(scope="session")
def no_shape_onnx(onnx_dir: Path) -> Path:
    """x: float32 of unknown rank -> y = relu(x), also of unknown rank."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    # The checker insists on a shape field on graph inputs; onnxruntime does not.
    return _save(graph, onnx_dir / "no_shape.onnx", check=False)


@pytest.fixture(scope="session")
def sequence_output_onnx(onnx_dir: Path) -> Path:
    """An output that is a sequence, not a tensor (what sklearn's ZipMap-style exports do)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
    )
    return _save(graph, onnx_dir / "seq.onnx")


@dataclass(frozen=True)
class QdqDigits:
    """A digit classifier (logistic regression on scikit-learn's digits) and its static-int8
    QDQ quantization by ``onnxruntime.quantization``, with held-out data to score them on."""

    fp32: Path
    qdq: Path
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def qdq_digits(onnx_dir: Path) -> QdqDigits:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from support.models import digits_data, write_digits_classifier

    x, y = digits_data()
    fp32 = write_digits_classifier(onnx_dir / "digits.onnx")

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"image": x[i : i + 1]} for i in range(200)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    qdq = onnx_dir / "digits-qdq.onnx"
    quantize_static(
        str(fp32),
        str(qdq),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return QdqDigits(fp32=fp32, qdq=qdq, x_test=x[1200:], y_test=y[1200:])


# --------------------------------------------------------------------------- TFLite


@dataclass(frozen=True)
class TFLiteModels:
    float_dyn: Path  # float32, x: [-1, 4] -> [-1, 3]
    float_b1: Path  # float32, x: [1, 4] -> [1, 3]
    int8_b1: Path  # full int8 I/O, x: [1, 4] -> [1, 3]
    reference: Any  # float Keras model: np.ndarray [N, 4] -> np.ndarray [N, 3]


@pytest.fixture(scope="session")
def tflite_models(tmp_path_factory: pytest.TempPathFactory) -> TFLiteModels:
    import keras
    import tensorflow as tf

    out = tmp_path_factory.mktemp("tflite")
    keras.utils.set_random_seed(0)
    x = keras.Input(shape=(4,), name="x")
    h = keras.layers.Dense(16, activation="relu")(x)
    model = keras.Model(x, keras.layers.Dense(3)(h))

    def convert(m: Any, path: Path, *, int8: bool = False) -> Path:
        converter = tf.lite.TFLiteConverter.from_keras_model(m)
        if int8:
            rng = np.random.default_rng(0)

            def representative() -> Any:
                for _ in range(200):
                    yield [rng.normal(size=(1, 4)).astype(np.float32)]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": expected for int8 I/O.
            warnings.simplefilter("ignore", UserWarning)
            path.write_bytes(converter.convert())
        return path

    x1 = keras.Input(shape=(4,), batch_size=1, name="x")
    model_b1 = keras.Model(x1, model(x1))

    def reference(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model(batch.astype(np.float32))).astype(np.float32)

    return TFLiteModels(
        float_dyn=convert(model, out / "float_dyn.tflite"),
        float_b1=convert(model_b1, out / "float_b1.tflite"),
        int8_b1=convert(model_b1, out / "int8_b1.tflite", int8=True),
        reference=reference,
    )


@pytest.fixture
def corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.bin"
    path.write_bytes(b"this is not a model\x00\x01\x02" * 10)
    return path
