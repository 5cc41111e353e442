from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from converters.calibration import open_samples
from converters.errors import BadOption, CalibrationDataError, UnsupportedModel
from converters.model_spec import read_model_spec
from converters.onnx_prep import PrepOptions, check_onnx_model, preprocess_model
from converters.recipes import (
    CandidateModel,
    Recipe,
    build_recipe,
    get_recipe,
    recipes_for,
    register_recipe,
    registered_recipes,
)
from converters.recipes import base as recipes_base
from converters.recipes.onnx_int8 import shallow_stem_convs
from converters.runtime import make_session

ONNX_RECIPES = ["onnx-fp32", "onnx-fp16", "onnx-dynamic-int8", "onnx-int8-qdq"]


@pytest.fixture(scope="module")
def mlp_calibration(digits, mlp_model):
    return open_samples(digits.x[digits.CALIB], read_model_spec(mlp_model))


@pytest.fixture(scope="module")
def cnn_calibration(digits, cnn_model):
    return open_samples(digits.images[digits.CALIB], read_model_spec(cnn_model))


def _weight_producers(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> op type of whatever produces its second input (the weight)."""
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    inits = {i.name for i in model.graph.initializer}
    result = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            weight = node.input[1]
            result[node.name] = "initializer" if weight in inits else producers.get(weight, "?")
    return result


# --------------------------------------------------------------------------- registry


def test_registry_lists_onnx_recipes_and_modes():
    names = [c.name for c in registered_recipes("onnxruntime")]
    assert names[:4] == ONNX_RECIPES
    assert [c.name for c in recipes_for("onnxruntime", "int8")] == ["onnx-int8-qdq"]
    assert [c.name for c in recipes_for("onnxruntime", "dynamic")] == ["onnx-dynamic-int8"]
    assert [c.name for c in recipes_for("onnxruntime", "onnx-fp16")] == ["onnx-fp16"]
    assert {c.name for c in recipes_for("onnxruntime", "auto")} >= set(ONNX_RECIPES)
    assert get_recipe("onnx-int8-qdq").needs_calibration
    assert build_recipe("onnx-fp32").applies_to("onnxruntime")
    assert not build_recipe("onnx-fp32").applies_to("tflite")
    with pytest.raises(BadOption, match="selects no recipe"):
        recipes_for("onnxruntime", "int4")
    assert [c.name for c in recipes_for("tflite", "int8")] == ["tflite-int8", "tflite-int16x8"]
    with pytest.raises(BadOption, match="selects no recipe"):
        recipes_for("tflite", "onnx-int8-qdq")
    with pytest.raises(BadOption, match="unknown recipe"):
        get_recipe("nope")


def test_recipe_options_are_typed_and_checked():
    recipe = build_recipe(
        "onnx-int8-qdq", {"calibration_method": "entropy", "exclude": ["conv1"], "percentile": 99}
    )
    assert recipe.config.calibration_method == "entropy"
    assert recipe.config.exclude == ("conv1",)
    assert recipe.config.percentile == 99.0
    with pytest.raises(BadOption, match="unknown option"):
        build_recipe("onnx-int8-qdq", {"calibraton_method": "entropy"})
    with pytest.raises(BadOption, match="not one of"):
        build_recipe("onnx-int8-qdq", {"calibration_method": "mse"})
    with pytest.raises(BadOption, match="true/false"):
        build_recipe("onnx-int8-qdq", {"per_channel": "yes"})
    with pytest.raises(BadOption, match="percentile"):
        build_recipe("onnx-int8-qdq", {"percentile": 10.0})


def test_a_runtime_can_register_its_own_recipes(tmp_path):
    @dataclass(frozen=True, kw_only=True)
    class NoopConfig:
        level: int = 1

    @register_recipe
    class NoopTflite(Recipe[NoopConfig]):
        name = "test-tflite-noop"
        runtime = "tflite"
        precision = "int8"
        mode = "int8"
        config_type = NoopConfig

        def run(self, src_model_path, out_dir, calibration=None) -> CandidateModel:
            return self.candidate(Path(out_dir) / "model.tflite")

    try:
        assert [c.name for c in recipes_for("tflite", "auto")][-1] == "test-tflite-noop"
        assert [c.name for c in recipes_for("tflite", "test-tflite-noop")] == ["test-tflite-noop"]
        assert "test-tflite-noop" not in [c.name for c in registered_recipes("onnxruntime")]
        recipe = build_recipe("test-tflite-noop", {"level": 3})
        assert recipe.applies_to("tflite") and recipe.config.level == 3
        assert recipe.run(tmp_path, tmp_path).to_dict()["config"] == {"level": 3}
        with pytest.raises(TypeError, match="already registered"):

            @register_recipe
            class Clash(NoopTflite):  # same name, different class
                pass

    finally:
        recipes_base._REGISTRY.pop("test-tflite-noop", None)


# --------------------------------------------------------------------------- every recipe works


@pytest.mark.parametrize("name", ONNX_RECIPES)
def test_recipe_output_loads_and_stays_accurate(
    name, tmp_path, digits, mlp_model, mlp_calibration, eval_accuracy
):
    recipe = build_recipe(name)
    candidate = recipe.run(mlp_model, tmp_path / name, mlp_calibration)
    assert candidate.path.is_file() and candidate.recipe == name
    make_session(candidate.path)  # loads in onnxruntime
    x, y = digits.x[digits.VALID], digits.y[digits.VALID]
    fp32 = eval_accuracy(mlp_model, x, y)
    assert fp32 > 0.9
    assert abs(eval_accuracy(candidate.path, x, y) - fp32) <= 0.03
    assert candidate.to_dict()["precision"] == recipe.precision


def test_int8_recipes_shrink_the_model(tmp_path, mlp_model, mlp_calibration):
    fp32 = build_recipe("onnx-fp32").run(mlp_model, tmp_path / "a").path.stat().st_size
    for name in ("onnx-dynamic-int8", "onnx-int8-qdq"):
        size = build_recipe(name).run(mlp_model, tmp_path / name, mlp_calibration).path
        assert size.stat().st_size < 0.6 * fp32


def test_fp16_keeps_float32_io(tmp_path, mlp_model, digits):
    candidate = build_recipe("onnx-fp16").run(mlp_model, tmp_path)
    model = onnx.load(str(candidate.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights["fc1.weight"] == TensorProto.FLOAT16
    session = make_session(candidate.path)
    (probs,) = session.run(None, {"input": digits.x[:4]})
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-2)


def test_qdq_per_channel_conv(tmp_path, digits, cnn_model, cnn_calibration, eval_accuracy):
    # float_stem off: conv1 (one input channel) would otherwise stay float.
    recipe = build_recipe("onnx-int8-qdq", {"float_stem": False})
    candidate = recipe.run(cnn_model, tmp_path, cnn_calibration)
    model = onnx.load(str(candidate.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("conv1.weight")
    )
    assert inits[dq.input[0]].dtype == np.int8
    assert inits[dq.input[1]].shape == (8,)  # one scale per output channel
    x, y = digits.images[digits.VALID], digits.y[digits.VALID]
    assert abs(eval_accuracy(candidate.path, x, y) - eval_accuracy(cnn_model, x, y)) <= 0.03


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_qdq_calibration_methods(
    method, tmp_path, digits, cnn_model, cnn_calibration, eval_accuracy
):
    recipe = build_recipe("onnx-int8-qdq", {"calibration_method": method})
    candidate = recipe.run(cnn_model, tmp_path, cnn_calibration)
    assert any(method in note for note in candidate.notes)
    x, y = digits.images[digits.VALID], digits.y[digits.VALID]
    assert abs(eval_accuracy(candidate.path, x, y) - eval_accuracy(cnn_model, x, y)) <= 0.05


def test_qdq_needs_calibration(tmp_path, mlp_model):
    with pytest.raises(CalibrationDataError, match="needs calibration"):
        build_recipe("onnx-int8-qdq").run(mlp_model, tmp_path)


# --------------------------------------------------------------------------- exclusions


def test_qdq_exclude_node_name_keeps_it_float(tmp_path, cnn_model, cnn_calibration):
    no_stem = {"float_stem": False}
    model = onnx.load(
        str(
            build_recipe("onnx-int8-qdq", no_stem)
            .run(cnn_model, tmp_path / "a", cnn_calibration)
            .path
        )
    )
    assert _weight_producers(model) == {"conv1": "DequantizeLinear", "fc": "DequantizeLinear"}
    recipe = build_recipe("onnx-int8-qdq", {"exclude": ["conv1"], **no_stem})
    model = onnx.load(str(recipe.run(cnn_model, tmp_path / "b", cnn_calibration).path))
    assert _weight_producers(model) == {"conv1": "initializer", "fc": "DequantizeLinear"}
    conv = next(n for n in model.graph.node if n.name == "conv1")
    assert conv.input[0] == "image"  # not fed through Quantize/DequantizeLinear


def test_qdq_exclude_op_type(tmp_path, cnn_model, cnn_calibration):
    recipe = build_recipe("onnx-int8-qdq", {"exclude": ["Gemm"], "float_stem": False})
    model = onnx.load(str(recipe.run(cnn_model, tmp_path, cnn_calibration).path))
    assert _weight_producers(model) == {"conv1": "DequantizeLinear", "fc": "initializer"}


def test_qdq_exclude_follows_fused_node_names(tmp_path, mlp_model, mlp_calibration):
    # fc2_matmul + fc2_add are fused into one Gemm by pre-processing; either name excludes it.
    for name in ("fc2_matmul", "fc2_add"):
        recipe = build_recipe("onnx-int8-qdq", {"exclude": [name]})
        model = onnx.load(str(recipe.run(mlp_model, tmp_path / name, mlp_calibration).path))
        producers = _weight_producers(model)
        assert producers.pop("fc1") == "DequantizeLinear"
        assert list(producers.values()) == ["initializer"]


def test_dynamic_exclude(tmp_path, mlp_model, cnn_model):
    model = onnx.load(
        str(
            build_recipe("onnx-dynamic-int8", {"exclude": ["fc1"]})
            .run(mlp_model, tmp_path / "a")
            .path
        )
    )
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["fc1_MatMul"] == "MatMul"
    assert "MatMulInteger" in ops.values()  # fc2 is still quantized
    model = onnx.load(
        str(
            build_recipe("onnx-dynamic-int8", {"exclude": ["Conv"]})
            .run(cnn_model, tmp_path / "b")
            .path
        )
    )
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["conv1"] == "Conv" and "ConvInteger" not in ops.values()


def test_fp16_exclude(tmp_path, cnn_model):
    recipe = build_recipe("onnx-fp16", {"exclude": ["conv1"]})
    model = onnx.load(str(recipe.run(cnn_model, tmp_path).path))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights["conv1.weight"] == TensorProto.FLOAT
    assert weights["fc.weight"] == TensorProto.FLOAT16
    make_session(tmp_path / "model.onnx")


def test_exclude_typo_is_refused(tmp_path, mlp_model, mlp_calibration):
    with pytest.raises(BadOption, match="matches no node name or op type"):
        build_recipe("onnx-int8-qdq", {"exclude": ["fc9"]}).run(
            mlp_model, tmp_path, mlp_calibration
        )


# --------------------------------------------------------------------------- float stem


def _conv(name: str, x: str, y: str, cin: int, cout: int, k: int, group: int = 1):
    """A Conv node and its weight initializer ``[cout, cin / group, k, k]``."""
    weight = np.full((cout, cin // group, k, k), 0.1, np.float32)
    node = onnx.helper.make_node(
        "Conv", [x, f"{name}.w"], [y], name=name, kernel_shape=[k, k], group=group
    )
    return node, numpy_helper.from_array(weight, f"{name}.w")


def _model(nodes_and_inits, inputs: dict[str, list], output: str, extra_inits=()):
    nodes = [n for n, _ in nodes_and_inits if n is not None]
    nodes += [n for n in extra_inits if isinstance(n, onnx.NodeProto)]
    inits = [i for _, i in nodes_and_inits if i is not None]
    inits += [i for i in extra_inits if isinstance(i, onnx.TensorProto)]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [onnx.helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _stems(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in shallow_stem_convs(model, max_channels=3, max_depth=75)]


@pytest.mark.parametrize(
    ("channels", "kernel", "shallow"),
    [
        (1, 3, True),  # grayscale 3x3: depth 9 (the digits CNN)
        (1, 5, True),
        (3, 3, True),  # RGB 3x3 (MobileNet-style stems)
        (3, 5, True),  # depth 75
        (3, 7, False),  # ResNet's 7x7 RGB stem, depth 147: faster in int8
        (4, 3, False),  # 4 channels: int8 won in every stem measured
    ],
)
def test_shallow_stem_rule(channels, kernel, shallow):
    stem = _conv("stem", "x", "s", channels, 16, kernel)
    body = _conv("body", "s", "y", 16, 16, 3)
    model = _model([stem, body], {"x": ["N", channels, 32, 32]}, "y")
    assert _stems(model) == (["stem"] if shallow else [])


def test_stem_is_found_behind_weightless_ops_but_not_behind_weighted_ones():
    mean = numpy_helper.from_array(np.full((1, 3, 1, 1), 0.5, np.float32), "mean")
    normalise = onnx.helper.make_node("Sub", ["x", "mean"], ["xn"], name="normalise")
    stem = _conv("stem", "xn", "y", 3, 8, 3)
    model = _model([(normalise, mean), stem], {"x": ["N", 3, 32, 32]}, "y")
    assert _stems(model) == ["stem"]
    # A one-channel Conv after another Conv is not a stem: it is the body of the network.
    first = _conv("first", "x", "f", 3, 1, 7)  # itself a deep stem (147): stays int8
    second = _conv("second", "f", "y", 1, 8, 3)
    assert _stems(_model([first, second], {"x": ["N", 3, 32, 32]}, "y")) == []
    # Nor is one behind a MatMul (e.g. a projection reshaped into an image).
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "proj.w")
    shape = numpy_helper.from_array(np.array([-1, 1, 8, 8], np.int64), "shape")
    project = onnx.helper.make_node("MatMul", ["x", "proj.w"], ["p"], name="proj")
    reshape = onnx.helper.make_node("Reshape", ["p", "shape"], ["img"], name="reshape")
    conv = _conv("conv", "img", "y", 1, 8, 3)
    model = _model([(project, w), (reshape, shape), conv], {"x": ["N", 64]}, "y")
    assert _stems(model) == []


def test_stem_rule_per_input_and_per_group():
    gray = _conv("gray", "a", "ya", 1, 8, 3)
    rgb = _conv("rgb", "b", "yb", 3, 64, 7)
    concat = onnx.helper.make_node("Add", ["ya", "yb"], ["y"], name="join")
    model = _model([gray, rgb, (concat, None)], {"a": ["N", 1, 16, 16], "b": ["N", 3, 16, 16]}, "y")
    assert _stems(model) == ["gray"]
    # A depthwise stem: one channel per group, depth 9.
    depthwise = _conv("dw", "x", "y", 3, 3, 3, group=3)
    assert _stems(_model([depthwise], {"x": ["N", 3, 16, 16]}, "y")) == ["dw"]
    # A weight computed at run time has no shape to judge: left alone.
    dynamic = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="dyn", kernel_shape=[3, 3])
    model = _model([(dynamic, None)], {"x": ["N", 1, 8, 8], "w": [8, 1, 3, 3]}, "y")
    assert _stems(model) == []


def test_qdq_keeps_a_shallow_stem_float_by_default(
    tmp_path, digits, cnn_model, cnn_calibration, eval_accuracy
):
    candidate = build_recipe("onnx-int8-qdq").run(cnn_model, tmp_path, cnn_calibration)
    model = onnx.load(str(candidate.path))
    assert _weight_producers(model) == {"conv1": "initializer", "fc": "DequantizeLinear"}
    conv = next(n for n in model.graph.node if n.name == "conv1")
    assert conv.input[0] == "image"
    assert any(n.startswith("float stem: kept float conv1") for n in candidate.notes)
    assert candidate.config["float_stem"] is True
    x, y = digits.images[digits.VALID], digits.y[digits.VALID]
    assert abs(eval_accuracy(candidate.path, x, y) - eval_accuracy(cnn_model, x, y)) <= 0.03


def test_unnamed_stem_is_named_so_that_only_it_stays_float(tmp_path, cnn_model, cnn_calibration):
    # The quantizer excludes nodes by name: excluding "" would keep every unnamed node float.
    model = onnx.load(str(cnn_model))
    for node in model.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model, str(unnamed))
    candidate = build_recipe("onnx-int8-qdq").run(unnamed, tmp_path / "out", cnn_calibration)
    quantized = onnx.load(str(candidate.path))
    producers = {out: n.op_type for n in quantized.graph.node for out in n.output}
    inits = {i.name for i in quantized.graph.initializer}
    weights = {
        n.op_type: "initializer" if n.input[1] in inits else producers.get(n.input[1])
        for n in quantized.graph.node
        if n.op_type in ("Conv", "Gemm")
    }
    assert weights == {"Conv": "initializer", "Gemm": "DequantizeLinear"}
    assert any("edgekit_float_stem_0" in n for n in candidate.notes)


def _stem_pool_cnn(path: Path) -> Path:
    """conv1 (1->8) -> relu -> maxpool -> conv2 (8->16) -> relu -> flatten -> gemm, random."""
    rng = np.random.default_rng(0)
    inits = {
        "conv1.w": rng.normal(0, 0.5, (8, 1, 3, 3)),
        "conv2.w": rng.normal(0, 0.2, (16, 8, 3, 3)),
        "fc.w": rng.normal(0, 0.1, (10, 16 * 8 * 8)),
        "fc.b": np.zeros(10),
    }
    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "conv1.w"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        make("Relu", ["c1"], ["r1"], name="relu1"),
        make("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        make("Conv", ["p1", "conv2.w"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        make("Relu", ["c2"], ["r2"], name="relu2"),
        make("Flatten", ["r2"], ["f"], name="flatten"),
        make("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "stem_pool_cnn",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_measuring_sessions_keep_the_pool_after_a_float_stem_float(tmp_path):
    # onnxruntime's QDQPropagationTransformer would hoist the QuantizeLinear after pool1 above
    # it, turning the fast float MaxPool into a slow uint8 one; every converters session
    # disables it (and the bundle asks devices to).
    source = _stem_pool_cnn(tmp_path / "cnn.onnx")
    x = np.random.default_rng(1).random((64, 1, 16, 16), dtype=np.float32)
    calibration = open_samples(x, read_model_spec(source))
    candidate = build_recipe("onnx-int8-qdq").run(source, tmp_path / "q", calibration)

    def pool_input_producer(**kwargs) -> str:
        path = tmp_path / "optimized.onnx"
        make_session(candidate.path, optimized_model_path=path, **kwargs)
        graph = onnx.load(str(path)).graph
        producers = {out: n.op_type for n in graph.node for out in n.output}
        (pool,) = [n for n in graph.node if n.op_type == "MaxPool"]
        return producers.get(pool.input[0], "input")

    assert pool_input_producer() != "QuantizeLinear"  # float MaxPool, quantized after it
    assert pool_input_producer(disabled_optimizers=()) == "QuantizeLinear"


def test_float_stem_options_are_checked():
    with pytest.raises(BadOption, match="float_stem_max_channels"):
        build_recipe("onnx-int8-qdq", {"float_stem_max_channels": 0})
    recipe = build_recipe("onnx-int8-qdq", {"float_stem_max_depth": 147})
    assert recipe.config.float_stem_max_depth == 147


# --------------------------------------------------------------------------- pre-processing


def test_preprocess_steps_and_switches(tmp_path, mlp_model):
    result = preprocess_model(mlp_model, tmp_path / "p.onnx")
    assert "ort-basic-optimization" in result.steps
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert ops == ["Gemm", "Relu", "Gemm", "Softmax"]  # MatMul + Add fused
    copied = preprocess_model(
        mlp_model, tmp_path / "c.onnx", options=PrepOptions(shape_inference=False, optimize=False)
    )
    assert copied.steps == ("copy",)
    assert copied.path.read_bytes() == Path(mlp_model).read_bytes()
    candidate = build_recipe("onnx-fp32", {"preprocess": False}).run(mlp_model, tmp_path / "r")
    assert "pre-processing: off" in candidate.notes


def test_check_model_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf \x00\xff")
    with pytest.raises(UnsupportedModel):
        check_onnx_model(bad)
    with pytest.raises(UnsupportedModel, match="not found"):
        check_onnx_model(tmp_path / "missing.onnx")
