"""Small real models trained on real data (scikit-learn's digits, shipped with the package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit images as float32 in [0, 1] (flattened) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def write_digits_classifier(path: Path, *, seed: int = 0) -> Path:
    """A logistic-regression digit classifier exported as ONNX (Gemm + Softmax)."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_data()
    clf = LogisticRegression(max_iter=300, random_state=seed).fit(x[:1200], y[:1200])
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["image", "W", "b"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(clf.coef_.astype(np.float32), "W"),
            numpy_helper.from_array(clf.intercept_.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
