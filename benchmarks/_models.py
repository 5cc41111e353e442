"""Model builders shared by the benchmarks: a trained digits CNN (Keras + ONNX) and ResNet-18.

Why these models:

* The conversion targets are about a *small but realistic* edge CNN trained on real data. A
  one-convolution toy is dominated by per-node overhead (quantize/dequantize, session call), so
  int8 can only lose there; a LeNet-sized network with 16-32-64 channels is what a
  microcontroller-class or Raspberry-Pi-class image classifier actually looks like. The 8x8
  scikit-learn digits are upsampled to 32x32 so that the convolutions do real work.
* The same trained weights must feed both runtimes, so the Keras model is trained once and its
  weights are written into an ONNX graph by hand (NHWC -> NCHW, HWIO -> OIHW, and the Dense
  layer after Flatten has its rows permuted from (h, w, c) to (c, h, w) order). Nothing here
  needs tf2onnx or torch.
* ResNet-18 (random weights, 11.7M parameters) is the "medium" model that bounds how long
  ``--quantize auto`` takes; its accuracy is meaningless, its cost is not.

TensorFlow is imported lazily: the ONNX-only helpers must not pay its start-up time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "DigitsData",
    "build_resnet18_onnx",
    "keras_cnn_to_onnx",
    "load_digits_data",
    "train_digits_cnn",
]

OPSET = 17
IR_VERSION = 9
"""Pinned: onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses."""
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn digits, upsampled, split once; images are NHWC float32 in [0, 1]."""

    x_train: FloatArray
    y_train: npt.NDArray[np.int64]
    x_test: FloatArray
    y_test: npt.NDArray[np.int64]

    @staticmethod
    def nchw(x: FloatArray) -> FloatArray:
        """NHWC -> NCHW (the ONNX model's layout), contiguous so that it memory-maps cleanly."""
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_digits_data(size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """The 1797 8x8 digits, bilinearly upsampled to ``size`` x ``size``, stratified split.

    Bilinear (not nearest) upsampling keeps the images smooth like real camera crops, so that the
    activation ranges the calibrator sees are not artificially blocky.
    """
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # 0..16 -> 0..1
    factor = size / images.shape[1]
    big = np.stack([zoom(img, factor, order=1) for img in images]).clip(0.0, 1.0)
    x = big[..., None].astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsData(x_train, y_train, x_test, y_test)


def train_digits_cnn(
    data: DigitsData,
    *,
    channels: tuple[int, ...] = (16, 32, 64),
    dense: int = 64,
    epochs: int = 20,
    seed: int = 0,
) -> Any:
    """Train a conv-relu-maxpool x len(channels) -> dense -> logits Keras model.

    Logits, not softmax, are the output: both runtimes then quantize exactly the same layers and
    top-1 is unaffected. Training is seeded; it takes a few seconds on two cores.
    """
    import keras

    keras.utils.set_random_seed(seed)
    height, width = data.x_train.shape[1:3]
    layers: list[Any] = [keras.Input((height, width, 1), name="image")]
    for i, ch in enumerate(channels, start=1):
        layers.append(
            keras.layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"conv{i}")
        )
        layers.append(keras.layers.MaxPooling2D(2, name=f"pool{i}"))
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(dense, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="logits"),
    ]
    model = keras.Sequential(layers, name="digits_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def _initializer(name: str, array: npt.NDArray[Any]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def keras_cnn_to_onnx(model: Any, path: Path) -> None:
    """Write the Keras CNN of :func:`train_digits_cnn` as an equivalent NCHW ONNX graph.

    Handles exactly the layer kinds that model uses (Conv2D same/valid with ReLU, MaxPooling2D,
    Flatten, Dense with optional ReLU); anything else is refused rather than mistranslated. The
    input is ``[N, 1, H, W]`` with a dynamic batch axis, the output ``[N, 10]`` logits.
    """
    import keras

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    in_shape = model.input_shape  # (None, H, W, C)
    height, width, chans = int(in_shape[1]), int(in_shape[2]), int(in_shape[3])
    current = "image"
    spatial: tuple[int, int, int] | None = (height, width, chans)  # NHWC dims while 4-D
    for layer in model.layers:
        name = layer.name
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            kh, kw = kernel.shape[:2]
            if layer.strides != (1, 1) or layer.dilation_rate != (1, 1):
                raise ValueError(f"{name}: only stride 1, dilation 1 convolutions are exported")
            pads = [kh // 2, kw // 2, (kh - 1) // 2, (kw - 1) // 2]
            if layer.padding == "valid":
                pads = [0, 0, 0, 0]
            inits += [
                _initializer(f"{name}.weight", kernel.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
                _initializer(f"{name}.bias", bias),
            ]
            out = f"{name}_out"
            nodes.append(
                helper.make_node(
                    "Conv",
                    [current, f"{name}.weight", f"{name}.bias"],
                    [out],
                    name=name,
                    kernel_shape=[kh, kw],
                    pads=pads,
                )
            )
            current = out
            assert spatial is not None
            h, w, _ = spatial
            if layer.padding == "valid":
                h, w = h - kh + 1, w - kw + 1
            spatial = (h, w, kernel.shape[3])
            current = _activation(layer, current, nodes)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            if layer.padding != "valid":
                raise ValueError(f"{name}: only 'valid' max pooling is exported")
            out = f"{name}_out"
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [current],
                    [out],
                    name=name,
                    kernel_shape=list(layer.pool_size),
                    strides=list(layer.strides),
                )
            )
            current = out
            assert spatial is not None
            h, w, c = spatial
            spatial = (h // layer.strides[0], w // layer.strides[1], c)
        elif isinstance(layer, keras.layers.Flatten):
            out = f"{name}_out"
            nodes.append(helper.make_node("Flatten", [current], [out], name=name, axis=1))
            current = out
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            if spatial is not None:
                # Keras flattened NHWC (h, w, c); the ONNX Flatten saw NCHW (c, h, w).
                h, w, c = spatial
                kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
                spatial = None
            inits += [
                _initializer(f"{name}.weight", kernel.T),  # [out, in], as exporters write Gemm
                _initializer(f"{name}.bias", bias),
            ]
            out = f"{name}_out"
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [current, f"{name}.weight", f"{name}.bias"],
                    [out],
                    name=name,
                    transB=1,
                )
            )
            current = _activation(layer, out, nodes)
        elif isinstance(layer, (keras.layers.Dropout, keras.layers.InputLayer)):
            continue
        else:
            raise ValueError(f"{name}: layer type {type(layer).__name__} is not exported")
    nodes.append(helper.make_node("Identity", [current], ["logits"], name="output"))
    graph = helper.make_graph(
        nodes,
        model.name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", chans, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgekit-bench",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))


def _activation(layer: Any, current: str, nodes: list[onnx.NodeProto]) -> str:
    """Append the layer's fused activation (ReLU or none) and return the new tensor name."""
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    if activation == "linear":
        return current
    if activation != "relu":
        raise ValueError(f"{layer.name}: activation {activation!r} is not exported")
    out = f"{layer.name}_relu"
    nodes.append(helper.make_node("Relu", [current], [out], name=f"{layer.name}_relu"))
    return out


# --------------------------------------------------------------------------- ResNet-18


class _GraphBuilder:
    """Tiny helper that names nodes and initializers consistently."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv_bn(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        *,
        relu: bool,
        gamma: float = 1.0,
    ) -> str:
        """Conv (no bias) + BatchNormalization (+ ReLU), as torchvision exports them."""
        std = math.sqrt(2.0 / (cin * k * k))  # He init keeps activations O(1) through ReLUs
        weight = (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        self.inits.append(_initializer(f"{name}.weight", weight))
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [f"{name}_conv"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        scale = (gamma * (1.0 + 0.1 * self.rng.standard_normal(cout))).astype(np.float32)
        bias = (0.05 * self.rng.standard_normal(cout)).astype(np.float32)
        mean = (0.05 * self.rng.standard_normal(cout)).astype(np.float32)
        var = (1.0 + 0.1 * self.rng.random(cout)).astype(np.float32)
        for suffix, value in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
            self.inits.append(_initializer(f"{name}_bn.{suffix}", value))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{name}_conv", *(f"{name}_bn.{s}" for s in ("scale", "bias", "mean", "var"))],
                [f"{name}_bn"],
                name=f"{name}_bn",
                epsilon=1e-5,
            )
        )
        if not relu:
            return f"{name}_bn"
        self.nodes.append(helper.make_node("Relu", [f"{name}_bn"], [f"{name}_relu"]))
        return f"{name}_relu"

    def basic_block(self, x: str, name: str, cin: int, cout: int, stride: int) -> str:
        """ResNet BasicBlock; the residual branch's last BN starts small (gamma 0.5) so that
        random activations do not grow by 2x per block."""
        y = self.conv_bn(x, f"{name}.conv1", cin, cout, 3, stride, relu=True)
        y = self.conv_bn(y, f"{name}.conv2", cout, cout, 3, 1, relu=False, gamma=0.5)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv_bn(x, f"{name}.downsample", cin, cout, 1, stride, relu=False)
        self.nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}_add"]))
        self.nodes.append(helper.make_node("Relu", [f"{name}_add"], [f"{name}_out"]))
        return f"{name}_out"


def build_resnet18_onnx(path: Path, *, classes: int = 1000, seed: int = 0) -> int:
    """Write ResNet-18 (torchvision topology, 224x224x3 NCHW, dynamic batch); returns params.

    Random weights with He initialisation and BatchNormalization nodes left unfused, like a
    fresh PyTorch export: the converters' pre-processing is expected to fold them.
    """
    g = _GraphBuilder(seed)
    x = g.conv_bn("input", "conv1", 3, 64, 7, 2, relu=True)
    g.nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x = "pool1"
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            x = g.basic_block(x, f"layer{stage}.{block}", cin, cout, stride)
            cin = cout
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    g.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc_w = (g.rng.standard_normal((classes, 512)) * math.sqrt(1.0 / 512)).astype(np.float32)
    g.inits += [
        _initializer("fc.weight", fc_w),
        _initializer("fc.bias", np.zeros(classes, np.float32)),
    ]
    g.nodes.append(
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)
    )
    graph = helper.make_graph(
        g.nodes,
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgekit-bench",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return sum(
        int(np.prod(t.dims))
        for t in g.inits
        if not t.name.endswith((".mean", ".var"))  # BN running stats are buffers, not params
    )
