"""Real models for the converter tests, trained once per session on scikit-learn's digits.

* ``mlp_model``: 64 -> 32 (ReLU) -> 10 softmax MLP fitted with scikit-learn, exported by hand
  with onnx.helper (a Gemm, then MatMul + Add that pre-processing fuses into a Gemm).
* ``cnn_model``: Conv(1->8, 3x3) + ReLU + MaxPool + Flatten + Gemm + Softmax on 8x8 images; the
  conv filters are random (fixed seed), the dense head is fitted by ridge regression on the
  conv features, so the model is genuinely accurate and exercises per-channel conv quantization.
* ``wrong_mlp_model``: same graph and I/O as the MLP with the class columns rotated: a
  "different model" for golden-set checks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.measure import MeasureConfig

TRAIN = slice(0, 1200)
CALIB = slice(1200, 1500)
VALID = slice(1500, None)


@dataclass(frozen=True)
class Digits:
    x: np.ndarray  # (1797, 64) float32 in [0, 1]
    y: np.ndarray  # (1797,) int64
    TRAIN: ClassVar[slice] = TRAIN
    CALIB: ClassVar[slice] = CALIB
    VALID: ClassVar[slice] = VALID

    @property
    def images(self) -> np.ndarray:
        return self.x.reshape(-1, 1, 8, 8)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32)
    y = data.target[order].astype(np.int64)
    return Digits(x=x, y=y)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekit-tests"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_mlp(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, path: Path, *, batch="N"
) -> Path:
    """w1: (64, H), w2: (H, 10) as scikit-learn stores them."""
    inits = [
        numpy_helper.from_array(w1.T.astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(b1.astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(w2.astype(np.float32), "fc2.weight"),
        numpy_helper.from_array(b2.astype(np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["h1r"], name="relu1"),
        helper.make_node("MatMul", ["h1r", "fc2.weight"], ["h2"], name="fc2_matmul"),
        helper.make_node("Add", ["h2", "fc2.bias"], ["logits"], name="fc2_add"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    return _save(graph, path)


@dataclass(frozen=True)
class MlpWeights:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


@pytest.fixture(scope="session")
def mlp_weights(digits: Digits) -> MlpWeights:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=150, random_state=0)
        clf.fit(digits.x[TRAIN], digits.y[TRAIN])
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    return MlpWeights(w1, b1, w2, b2)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_model(mlp_weights: MlpWeights, models_dir: Path) -> Path:
    w = mlp_weights
    return build_mlp(w.w1, w.b1, w.w2, w.b2, models_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def mlp_fixed_batch_model(mlp_weights: MlpWeights, models_dir: Path) -> Path:
    w = mlp_weights
    return build_mlp(w.w1, w.b1, w.w2, w.b2, models_dir / "mlp_b1.onnx", batch=1)


@pytest.fixture(scope="session")
def wrong_mlp_model(mlp_weights: MlpWeights, models_dir: Path) -> Path:
    w = mlp_weights
    return build_mlp(
        w.w1, w.b1, np.roll(w.w2, 1, axis=1), np.roll(w.b2, 1), models_dir / "mlp_wrong.onnx"
    )


def _cnn_graph(conv_w: np.ndarray, conv_b: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None):
    channels = conv_w.shape[0]
    inits = [
        numpy_helper.from_array(conv_w, "conv1.weight"),
        numpy_helper.from_array(conv_b, "conv1.bias"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten", axis=1),
    ]
    outputs = [helper.make_tensor_value_info("f1", TensorProto.FLOAT, ["N", channels * 16])]
    if head is not None:
        w, b = head
        inits += [
            numpy_helper.from_array(w.astype(np.float32), "fc.weight"),
            numpy_helper.from_array(b.astype(np.float32), "fc.bias"),
        ]
        nodes += [
            helper.make_node(
                "Gemm", ["f1", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
            ),
            helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        ]
        outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])]
    return helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        outputs,
        inits,
    )


@pytest.fixture(scope="session")
def cnn_model(digits: Digits, models_dir: Path) -> Path:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    conv_w = rng.normal(0.0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0.0, 0.1, 8).astype(np.float32)
    features_path = _save(_cnn_graph(conv_w, conv_b, None), models_dir / "cnn_features.onnx")
    session = ort.InferenceSession(str(features_path), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"image": digits.images[TRAIN]})
    # Ridge regression onto one-hot targets: closed form, fast, accurate enough (~95%).
    f = np.hstack([features, np.ones((features.shape[0], 1), dtype=np.float32)])
    targets = np.eye(10, dtype=np.float32)[digits.y[TRAIN]] * 8.0
    coef = np.linalg.solve(f.T @ f + 1.0 * np.eye(f.shape[1]), f.T @ targets)
    head = (coef[:-1].T, coef[-1])
    return _save(_cnn_graph(conv_w, conv_b, head), models_dir / "cnn.onnx")


@pytest.fixture(scope="session")
def fast_measure() -> MeasureConfig:
    """Few timed runs and in-process memory: numbers are real, just less averaged."""
    return MeasureConfig(
        batch_size=8,
        warmup=2,
        iterations=20,
        batch_iterations=5,
        max_seconds=1.0,
        memory="inprocess",
        diagnostic_samples=8,
    )


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from converters.runtime import make_session

    session = make_session(model_path)
    name = session.get_inputs()[0].name
    (probs,) = session.run(None, {name: x})
    return float((probs.argmax(axis=1) == y).mean())


@pytest.fixture(scope="session")
def eval_accuracy():
    """``eval_accuracy(model_path, x, y)``: plain top-1 accuracy with one batched ORT run."""
    return accuracy


@pytest.fixture(scope="session")
def mlp_build():
    """The MLP exporter, for tests that need a variant graph."""
    return build_mlp


# --------------------------------------------------------------------------- TFLite sources


@dataclass(frozen=True)
class KerasModels:
    """One small Keras CNN trained on digits (8x8x1, NHWC), saved in every supported format.

    ``fragile`` is the same network with one extra hidden unit that always outputs ~8000 and is
    ignored downstream: its activation range swamps int8 (steps of ~30 for signals of ~1) but
    not int16 (steps of ~0.12), so full int8 breaks and int16x8 recovers.
    """

    keras: Path
    h5: Path
    saved_model: Path
    fragile: Path
    x: np.ndarray  # (1797, 8, 8, 1) float32
    y: np.ndarray


@pytest.fixture(scope="session")
def keras_models(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> KerasModels:
    pytest.importorskip("tensorflow")
    from converters.tflite_source import captured_output, import_tensorflow

    tf = import_tensorflow()
    keras = tf.keras
    out = tmp_path_factory.mktemp("keras")
    x = digits.x.reshape(-1, 8, 8, 1)
    with captured_output():
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(8, 8, 1), name="image")
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
        h = keras.layers.MaxPooling2D(name="pool1")(h)
        h = keras.layers.Flatten(name="flatten")(h)
        h = keras.layers.Dense(32, activation="relu", name="fc1")(h)
        outputs = keras.layers.Dense(10, activation="softmax", name="probs")(h)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        model.fit(x[TRAIN], digits.y[TRAIN], epochs=8, batch_size=64, verbose=0)
        model.save(out / "digits.keras")
        model.save(out / "digits.h5")
        model.export(str(out / "digits_saved_model"), verbose=False)

        (w1, b1), (w2, b2) = (
            model.get_layer("fc1").get_weights(),
            model.get_layer("probs").get_weights(),
        )
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
        h = keras.layers.MaxPooling2D(name="pool1")(h)
        h = keras.layers.Flatten(name="flatten")(h)
        h = keras.layers.Dense(33, activation="relu", name="fc1")(h)
        fragile_out = keras.layers.Dense(10, activation="softmax", name="probs")(h)
        fragile = keras.Model(inputs, fragile_out)
        fragile.get_layer("conv1").set_weights(model.get_layer("conv1").get_weights())
        fragile.get_layer("fc1").set_weights(
            [np.hstack([w1, np.zeros((w1.shape[0], 1), np.float32)]), np.append(b1, 8000.0)]
        )
        fragile.get_layer("probs").set_weights([np.vstack([w2, np.zeros((1, 10))]), b2])
        fragile.save(out / "fragile.keras")
    return KerasModels(
        keras=out / "digits.keras",
        h5=out / "digits.h5",
        saved_model=out / "digits_saved_model",
        fragile=out / "fragile.keras",
        x=x,
        y=digits.y,
    )
