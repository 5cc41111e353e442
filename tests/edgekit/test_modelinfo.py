"""Tests for edgekit.modelinfo against real ONNX and TFLite files and their reference runtimes.

The module under test is pure standard library; these tests build models with onnx / tensorflow
and check the parsed interface against what onnx, onnxruntime and the LiteRT interpreter report.
"""

from __future__ import annotations

import ast
import os
import sys
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgekit import modelinfo
from edgekit.errors import EdgekitError, ModelInfoError
from edgekit.modelinfo import (
    RUNTIME_ONNX,
    RUNTIME_TFLITE,
    ModelInfo,
    TensorInfo,
    detect_runtime,
    read_model_info,
)

# --------------------------------------------------------------------------------------------
# Helpers

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(string)": "string",
    "tensor(bool)": "bool",
    **{f"tensor({t})": t for t in ("int8", "int16", "int32", "int64")},
    **{f"tensor({t})": t for t in ("uint8", "uint16", "uint32", "uint64")},
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ort_io(path: Path) -> tuple[list[tuple[str, str, list[object]]], list[object]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def convert(args: list[ort.NodeArg]) -> list[tuple[str, str, list[object]]]:
        return [(a.name, _ORT_TYPES[a.type], list(a.shape)) for a in args]

    return convert(session.get_inputs()), convert(session.get_outputs())


def _as_tuples(tensors: tuple[TensorInfo, ...]) -> list[tuple[str, str, list[object]]]:
    return [(t.name, t.dtype, list(t.shape)) for t in tensors]


def _assert_parses_or_model_info_error(path: Path) -> ModelInfo | None:
    """The contract under corruption: a ModelInfo or a one-line ModelInfoError, nothing else."""
    try:
        return read_model_info(path)
    except ModelInfoError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return None


# --------------------------------------------------------------------------------------------
# ONNX fixtures


def _multi_model() -> onnx.ModelProto:
    """Symbolic batch dim, several inputs/outputs, an int64 input, extra opset domains."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [None])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 3])
    ids_out = helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", 5])
    mask_out = helper.make_tensor_value_info("mask_out", TensorProto.BOOL, [None])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Identity", ["ids"], ["ids_out"]),
        helper.make_node("Not", ["mask"], ["mask_out"]),
    ]
    graph = helper.make_graph(
        nodes, "multi", [image, ids, mask], [pooled, ids_out, mask_out], doc_string="a graph"
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("ai.onnx.ml", 3),
            helper.make_opsetid("com.microsoft", 1),
        ],
        producer_name="edgekit-tests",
        producer_version="1.2.3",
        doc_string="a model",
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model)
    return model


def _ir3_model() -> onnx.ModelProto:
    """Old-IR style: every initializer is also listed as a graph input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])
    b_info = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    b = numpy_helper.from_array(np.ones(4, dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "ir3", [x, w_info, b_info], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    return model


_DTYPE_CASES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "bool": TensorProto.BOOL,
    "string": TensorProto.STRING,
}


def _dtypes_model() -> onnx.ModelProto:
    """One Identity per element type, to check the enum table against onnxruntime."""
    inputs, outputs, nodes = [], [], []
    for name, elem in _DTYPE_CASES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, [2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, [2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    graph = helper.make_graph(nodes, "dtypes", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes its newest IR; keep within what onnxruntime loads
    return model


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx")
    onnx.save(_multi_model(), root / "multi.onnx")
    onnx.save(_ir3_model(), root / "ir3.onnx")
    onnx.save(_dtypes_model(), root / "dtypes.onnx")
    return root


# --------------------------------------------------------------------------------------------
# ONNX: agreement with onnx and onnxruntime


@pytest.mark.parametrize("name", ["multi", "ir3", "dtypes"])
def test_onnx_matches_onnxruntime(onnx_dir: Path, name: str) -> None:
    path = onnx_dir / f"{name}.onnx"
    info = read_model_info(path)
    ort_inputs, ort_outputs = _ort_io(path)
    assert info.runtime == RUNTIME_ONNX
    assert _as_tuples(info.inputs) == ort_inputs
    assert _as_tuples(info.outputs) == ort_outputs
    assert all(t.quantization is None for t in info.inputs + info.outputs)


def test_onnx_multi_details_match_onnx_load(onnx_dir: Path) -> None:
    path = onnx_dir / "multi.onnx"
    model = onnx.load(str(path))
    info = read_model_info(path)
    assert [t.name for t in info.inputs] == [v.name for v in model.graph.input]
    assert [t.name for t in info.outputs] == [v.name for v in model.graph.output]
    assert info.inputs[0] == TensorInfo("image", "float32", ("batch", 3, 4, 4))
    assert info.inputs[1] == TensorInfo("ids", "int64", ("batch", 5))
    assert info.inputs[2] == TensorInfo("mask", "bool", (None,))
    assert info.opsets == {"ai.onnx": 17, "ai.onnx.ml": 3, "com.microsoft": 1}
    assert info.opsets == {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    assert info.details == {
        "ir_version": model.ir_version,
        "producer_name": "edgekit-tests",
        "producer_version": "1.2.3",
    }


def test_onnx_initializers_listed_as_inputs_are_dropped(onnx_dir: Path) -> None:
    path = onnx_dir / "ir3.onnx"
    assert [v.name for v in onnx.load(str(path)).graph.input] == ["x", "w", "b"]
    info = read_model_info(path)
    assert info.inputs == (TensorInfo("x", "float32", (2, 3)),)
    assert info.outputs == (TensorInfo("y", "float32", (2, 4)),)
    assert info.details["ir_version"] == 3
    assert info.opsets == {"ai.onnx": 8}


def test_onnx_external_data(tmp_path: Path) -> None:
    """Weights in a side file: only the TensorProto name is read, so this is the same path."""
    path = tmp_path / "ext.onnx"
    onnx.save(
        _ir3_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.data").exists()
    info = read_model_info(path)
    assert [t.name for t in info.inputs] == ["x"]


def test_onnx_non_tensor_types_and_unknown_rank(tmp_path: Path) -> None:
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
    no_shape = helper.make_tensor_value_info("anything", TensorProto.UINT8, None)
    out = helper.make_tensor_sequence_value_info("seq_out", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["seq"], ["seq_out"])], "g", [seq, no_shape], [out]
    )
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph), str(path))
    info = read_model_info(path)
    assert info.inputs == (
        TensorInfo("seq", "sequence", ()),
        TensorInfo("anything", "uint8", ()),
    )
    assert info.outputs == (TensorInfo("seq_out", "sequence", ()),)


def test_onnx_fields_out_of_canonical_order_are_merged(tmp_path: Path) -> None:
    """Protobuf allows any field order and merges repeated messages; so must the reader."""
    model = _multi_model()
    graph_only = onnx.ModelProto()
    graph_only.graph.CopyFrom(model.graph)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    extra = onnx.ModelProto()
    extra.graph.output.append(helper.make_tensor_value_info("late", TensorProto.INT32, [7]))
    data = graph_only.SerializeToString() + rest.SerializeToString() + extra.SerializeToString()
    path = _write(tmp_path / "shuffled.onnx", data)
    expected = onnx.load_from_string(data)
    info = read_model_info(path)
    assert [t.name for t in info.outputs] == [v.name for v in expected.graph.output]
    assert info.outputs[-1] == TensorInfo("late", "int32", (7,))
    assert info.opsets == {"ai.onnx": 17, "ai.onnx.ml": 3, "com.microsoft": 1}
    assert info.details["producer_name"] == "edgekit-tests"


def test_onnx_runtime_argument_bypasses_extension_check(onnx_dir: Path, tmp_path: Path) -> None:
    renamed = _write(tmp_path / "model.bin", (onnx_dir / "ir3.onnx").read_bytes())
    with pytest.raises(ModelInfoError, match="unknown model format"):
        detect_runtime(renamed)
    info = read_model_info(renamed, RUNTIME_ONNX)
    assert [t.name for t in info.inputs] == ["x"]
    assert read_model_info(renamed, runtime=RUNTIME_ONNX) == info


@pytest.mark.slow
def test_onnx_large_model_is_read_in_constant_memory(tmp_path: Path) -> None:
    """A ~200 MiB initializer must be skipped by seeking, never read into memory."""
    rows, cols = 1024, 51_200  # 1024 * 51200 * 4 bytes = 200 MiB
    weights = np.zeros((rows, cols), dtype=np.float32)
    weights[0, 0] = 1.0
    w = numpy_helper.from_array(weights, "w")
    del weights
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [rows, cols])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big", [x, w_info], [y], initializer=[w]
    )
    del w
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del graph
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    del model
    try:
        assert path.stat().st_size > 200 * 1024 * 1024
        tracemalloc.start()
        try:
            info = read_model_info(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 5 * 1024 * 1024, f"peak traced memory {peak} bytes"
        assert info.inputs == (TensorInfo("x", "float32", ("n", rows)),)
        assert info.outputs == (TensorInfo("y", "float32", ("n", cols)),)
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------------
# TFLite fixtures


@pytest.fixture(scope="module")
def tflite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert a float32 two-in/two-out model and a fully int8-quantized conv model."""
    pytest.importorskip("tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("tflite")
    keras.utils.set_random_seed(0)

    features = keras.Input(shape=(8,), name="features")
    extra = keras.Input(shape=(4,), name="extra")
    hidden = keras.layers.Dense(16, activation="relu")(features)
    joined = keras.layers.Concatenate()([hidden, extra])
    logits = keras.layers.Dense(3, name="logits")(joined)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(joined)
    float_model = keras.Model([features, extra], [logits, score])
    converter = tf.lite.TFLiteConverter.from_keras_model(float_model)
    (root / "float.tflite").write_bytes(converter.convert())

    image = keras.Input(shape=(6, 6, 2), name="image")
    conv = keras.layers.Conv2D(4, 3, activation="relu")(image)
    probs = keras.layers.Dense(5, name="probs")(keras.layers.Flatten()(conv))
    int8_model = keras.Model(image, probs)

    def representative() -> Iterator[list[np.ndarray]]:
        rng = np.random.default_rng(0)
        for _ in range(16):
            yield [rng.standard_normal((1, 6, 6, 2)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(int8_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": irrelevant with a representative set.
        warnings.simplefilter("ignore", UserWarning)
        (root / "int8.tflite").write_bytes(converter.convert())
    return root


def _interpreter_view(details: list[dict[str, object]]) -> list[dict[str, object]]:
    """LiteRT's tensor details in TensorInfo.to_dict() form."""
    out = []
    for d in details:
        signature = np.asarray(d["shape_signature"])
        params = d["quantization_parameters"]
        assert isinstance(params, dict)
        entry: dict[str, object] = {
            "name": d["name"],
            "dtype": np.dtype(d["dtype"]).name,
            "shape": [None if int(v) < 0 else int(v) for v in signature],
        }
        if len(params["scales"]):
            entry["quantization"] = {
                "scale": [float(v) for v in params["scales"]],
                "zero_point": [int(v) for v in params["zero_points"]],
                "axis": int(params["quantized_dimension"]),
            }
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# TFLite: agreement with the LiteRT interpreter


@pytest.mark.parametrize("name", ["float", "int8"])
def test_tflite_matches_litert_interpreter(tflite_dir: Path, name: str) -> None:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")

    path = tflite_dir / f"{name}.tflite"
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    info = read_model_info(path)
    assert detect_runtime(path) == RUNTIME_TFLITE
    assert info.runtime == RUNTIME_TFLITE
    assert [t.to_dict() for t in info.inputs] == _interpreter_view(interpreter.get_input_details())
    assert [t.to_dict() for t in info.outputs] == _interpreter_view(
        interpreter.get_output_details()
    )
    assert info.opsets == {}
    assert info.details["subgraphs"] == 1
    assert isinstance(info.details["version"], int) and info.details["version"] >= 3
    assert isinstance(info.details["description"], str)


def test_tflite_float_model_details(tflite_dir: Path) -> None:
    info = read_model_info(tflite_dir / "float.tflite")
    assert sorted(t.name.split("_")[-1] for t in info.inputs) == ["extra:0", "features:0"]
    assert all(t.dtype == "float32" and t.quantization is None for t in info.inputs)
    assert {t.shape for t in info.inputs} == {(None, 8), (None, 4)}
    assert "FULLY_CONNECTED" in info.details["operator_codes"]
    assert "CONCATENATION" in info.details["operator_codes"]


def test_tflite_int8_quantization(tflite_dir: Path) -> None:
    info = read_model_info(tflite_dir / "int8.tflite")
    (tensor,) = info.inputs
    assert tensor.dtype == "int8"
    assert tensor.shape == (None, 6, 6, 2)
    assert tensor.quantization is not None
    assert set(tensor.quantization) == {"scale", "zero_point", "axis"}
    scale = tensor.quantization["scale"]
    assert isinstance(scale, list) and len(scale) == 1 and scale[0] > 0
    assert info.outputs[0].dtype == "int8"
    assert "CONV_2D" in info.details["operator_codes"]
    as_dict = tensor.to_dict()
    assert as_dict["quantization"] == tensor.quantization
    assert as_dict["shape"] == [None, 6, 6, 2]


def test_tflite_detected_by_content_not_extension(tflite_dir: Path, tmp_path: Path) -> None:
    renamed = _write(tmp_path / "model.onnx", (tflite_dir / "float.tflite").read_bytes())
    assert detect_runtime(renamed) == RUNTIME_TFLITE
    assert read_model_info(renamed) == read_model_info(tflite_dir / "float.tflite")


# --------------------------------------------------------------------------------------------
# Errors


def test_errors_are_model_info_errors() -> None:
    assert issubclass(ModelInfoError, EdgekitError)


@pytest.mark.parametrize(
    ("filename", "data", "match"),
    [
        ("empty.onnx", b"", "empty"),
        ("empty.tflite", b"", "unknown model format"),
        ("garbage.onnx", b"hello, this is not a model\n", "not an ONNX model"),
        ("garbage.bin", os.urandom(64), "unknown model format"),
        ("text.tflite", b"just some text, longer than eight bytes", "unknown model format"),
        ("model.ort", b"\x00" * 64, "ORT format"),
        ("renamed.onnx", b"\x10\x00\x00\x00ORTM" + b"\x00" * 64, "ORT format"),
        ("huge_len.onnx", b"\x3a\xff\xff\xff\xff\x0f", "not an ONNX model"),
        ("short.tflite", b"\x08\x00\x00\x00TFL3", "outside"),
    ],
)
def test_bad_files_raise_one_line_model_info_error(
    tmp_path: Path, filename: str, data: bytes, match: str
) -> None:
    path = _write(tmp_path / filename, data)
    with pytest.raises(ModelInfoError, match=match) as excinfo:
        read_model_info(path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert filename in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelInfoError, match="cannot read"):
        read_model_info(tmp_path / "missing.onnx")
    with pytest.raises(ModelInfoError, match="cannot read"):
        read_model_info(tmp_path / "missing.onnx", RUNTIME_ONNX)
    directory = tmp_path / "dir.onnx"
    directory.mkdir()
    with pytest.raises(ModelInfoError, match="cannot read"):
        read_model_info(directory)
    with pytest.raises(ModelInfoError, match="cannot read"):
        read_model_info(directory, RUNTIME_TFLITE)


def test_unknown_runtime_argument(onnx_dir: Path) -> None:
    with pytest.raises(ModelInfoError, match="unsupported runtime"):
        read_model_info(onnx_dir / "ir3.onnx", "tensorrt")


def test_onnx_without_graph(tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.ir_version = 8
    path = _write(tmp_path / "nograph.onnx", model.SerializeToString())
    with pytest.raises(ModelInfoError, match="no graph"):
        read_model_info(path)


def test_onnx_wrong_wire_type(tmp_path: Path) -> None:
    # ir_version (field 1) then graph (field 7) encoded as a varint instead of a message.
    path = _write(tmp_path / "wire.onnx", b"\x08\x08\x38\x01")
    with pytest.raises(ModelInfoError, match="wire type"):
        read_model_info(path)


def test_onnx_absurd_length(tmp_path: Path) -> None:
    # ir_version, then a graph claiming 2**40 bytes in a tiny file.
    path = _write(tmp_path / "absurd.onnx", b"\x08\x08\x3a\x80\x80\x80\x80\x80\x20" + b"\x00" * 8)
    with pytest.raises(ModelInfoError, match="past the end"):
        read_model_info(path)


def test_onnx_invalid_utf8_name(tmp_path: Path) -> None:
    value = helper.make_tensor_value_info("@@@@", TensorProto.FLOAT, [1])
    graph = helper.make_graph([], "g", [value], [value])
    data = helper.make_model(graph).SerializeToString().replace(b"@@@@", b"\xff\xfe\xfd\xfc")
    path = _write(tmp_path / "utf8.onnx", data)
    with pytest.raises(ModelInfoError, match="UTF-8"):
        read_model_info(path)


def test_onnx_every_truncation(onnx_dir: Path, tmp_path: Path) -> None:
    data = (onnx_dir / "multi.onnx").read_bytes()
    full = read_model_info(onnx_dir / "multi.onnx")
    path = tmp_path / "cut.onnx"
    successes = 0
    for length in range(len(data)):
        path.write_bytes(data[:length])
        info = _assert_parses_or_model_info_error(path)
        if info is not None:
            # Success needs the whole graph field, so the interface is complete; only trailing
            # top-level fields (opset imports, metadata) can be missing.
            successes += 1
            assert info.inputs == full.inputs and info.outputs == full.outputs
    assert successes <= 5


def test_tflite_every_truncation(tflite_dir: Path, tmp_path: Path) -> None:
    for name in ("float", "int8"):
        data = (tflite_dir / f"{name}.tflite").read_bytes()
        full = read_model_info(tflite_dir / f"{name}.tflite")
        path = tmp_path / "cut.tflite"
        for length in range(len(data)):
            path.write_bytes(data[:length])
            info = _assert_parses_or_model_info_error(path)
            # Every read is bounds-checked, so a successful parse read the same bytes.
            assert info is None or info == full


# --------------------------------------------------------------------------------------------
# Fuzzing: corruption must give ModelInfoError (or a result), and parsing must terminate


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=5000,  # milliseconds: a hang or a quadratic blow-up shows up as a failure
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # reproducible in CI; no example database written into the tree
    database=None,
)

_FLIPS = st.lists(
    st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    min_size=1,
    max_size=8,
)
_OVERWRITES = st.lists(
    st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=4)), max_size=3
)


def _mutate(
    seed: bytes, flips: list[tuple[int, int]], overwrites: list[tuple[int, bytes]]
) -> bytes:
    data = bytearray(seed)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    for position, chunk in overwrites:
        start = position % len(data)
        data[start : start + len(chunk)] = chunk
    return bytes(data)


@_FUZZ_SETTINGS
@given(
    data=st.binary(max_size=512),
    suffix=st.sampled_from([".onnx", ".tflite", ".bin"]),
    tflite_header=st.booleans(),
)
def test_fuzz_random_bytes(fuzz_dir: Path, data: bytes, suffix: str, tflite_header: bool) -> None:
    if tflite_header:
        data = data[:4] + b"TFL3" + data[8:]
    _assert_parses_or_model_info_error(_write(fuzz_dir / f"random{suffix}", data))


@_FUZZ_SETTINGS
@given(ir3=st.booleans(), flips=_FLIPS, overwrites=_OVERWRITES)
def test_fuzz_bit_flipped_onnx(
    fuzz_dir: Path,
    onnx_dir: Path,
    ir3: bool,
    flips: list[tuple[int, int]],
    overwrites: list[tuple[int, bytes]],
) -> None:
    seed = (onnx_dir / ("ir3.onnx" if ir3 else "multi.onnx")).read_bytes()
    path = _write(fuzz_dir / "flipped.onnx", _mutate(seed, flips, overwrites))
    _assert_parses_or_model_info_error(path)


@_FUZZ_SETTINGS
@given(quantized=st.booleans(), flips=_FLIPS, overwrites=_OVERWRITES)
def test_fuzz_bit_flipped_tflite(
    fuzz_dir: Path,
    tflite_dir: Path,
    quantized: bool,
    flips: list[tuple[int, int]],
    overwrites: list[tuple[int, bytes]],
) -> None:
    seed = (tflite_dir / ("int8.tflite" if quantized else "float.tflite")).read_bytes()
    path = _write(fuzz_dir / "flipped.tflite", _mutate(seed, flips, overwrites))
    _assert_parses_or_model_info_error(path)


# --------------------------------------------------------------------------------------------
# API surface


def test_tensor_info_to_dict() -> None:
    plain = TensorInfo("x", "float32", ("batch", 3, None))
    assert plain.to_dict() == {"name": "x", "dtype": "float32", "shape": ["batch", 3, None]}
    quantized = TensorInfo(
        "q", "int8", (1, 4), {"scale": [0.5, 0.25], "zero_point": [0, 1], "axis": 1}
    )
    assert quantized.to_dict()["quantization"] == {
        "scale": [0.5, 0.25],
        "zero_point": [0, 1],
        "axis": 1,
    }
    with pytest.raises(AttributeError):
        plain.name = "y"  # type: ignore[misc]


def test_module_imports_only_the_standard_library() -> None:
    """The signing path runs on boards without numpy/onnx/tensorflow wheels."""
    source = Path(modelinfo.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"edgekit"}
    assert set(modelinfo.__all__) == {
        "RUNTIME_ONNX",
        "RUNTIME_TFLITE",
        "ModelInfo",
        "TensorInfo",
        "detect_runtime",
        "read_model_info",
    }
