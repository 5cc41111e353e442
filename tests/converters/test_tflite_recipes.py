"""TFLite recipes and sources on a real Keras CNN: each recipe converts, loads, stays accurate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from converters.calibration import open_samples
from converters.errors import UnsupportedModel
from converters.recipes import build_recipe, recipes_for
from converters.runtime import TfliteRunner
from converters.tflite_source import align_io_names, detect_source, prepare_source

TFLITE_RECIPES = ["tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "tflite-int16x8"]


@pytest.fixture(scope="module")
def reference(keras_models, tmp_path_factory):
    return build_recipe("tflite-fp32").run(keras_models.keras, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def calibration(keras_models, reference, digits):
    spec = TfliteRunner(reference.path).spec
    return open_samples(keras_models.x[digits.CALIB], spec)


def accuracy(path, x, y) -> float:
    (probs,) = TfliteRunner(path).run({"image": x}).values()
    return float((probs.argmax(axis=1) == y).mean())


def interpreter_dtypes(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return (
        interpreter.get_input_details()[0]["dtype"],
        interpreter.get_output_details()[0]["dtype"],
    )


def test_registry_has_the_tflite_recipes():
    assert [c.name for c in recipes_for("tflite", "auto")][:5] == TFLITE_RECIPES
    assert [c.name for c in recipes_for("tflite", "int8")] == ["tflite-int8", "tflite-int16x8"]
    assert [c.name for c in recipes_for("tflite", "dynamic")] == ["tflite-dynamic"]
    int16 = recipes_for("tflite", "tflite-int16x8")[0]
    assert int16.fallback and int16.needs_calibration and int16.precision == "int16x8"


@pytest.mark.parametrize("name", TFLITE_RECIPES[1:])
def test_every_recipe_loads_and_keeps_accuracy(
    name, keras_models, reference, calibration, digits, tmp_path
):
    recipe = build_recipe(name)
    candidate = recipe.run(
        keras_models.keras, tmp_path, calibration if recipe.needs_calibration else None
    )
    assert candidate.path.name == "model.tflite" and candidate.runtime == "tflite"
    x, y = keras_models.x[digits.VALID], keras_models.y[digits.VALID]
    fp32 = accuracy(reference.path, x, y)
    assert fp32 > 0.9
    assert accuracy(candidate.path, x, y) >= fp32 - 0.03
    assert candidate.path.stat().st_size < reference.path.stat().st_size
    in_dtype, out_dtype = interpreter_dtypes(candidate.path)
    if name == "tflite-int8":
        assert (in_dtype, out_dtype) == (np.int8, np.int8)  # full integer by default
        assert "calibrated on 300 samples" in candidate.notes
        assert candidate.diagnose is not None
    else:
        assert (in_dtype, out_dtype) == (np.float32, np.float32)


def test_full_int8_with_float_io(keras_models, calibration, digits, tmp_path):
    candidate = build_recipe("tflite-int8", {"io_dtype": "float"}).run(
        keras_models.keras, tmp_path, calibration
    )
    assert interpreter_dtypes(candidate.path) == (np.float32, np.float32)
    x, y = keras_models.x[digits.VALID], keras_models.y[digits.VALID]
    assert accuracy(candidate.path, x, y) > 0.9


def test_h5_and_saved_model_sources_give_the_same_model(keras_models, reference, tmp_path):
    x = keras_models.x[:16]
    expected = TfliteRunner(reference.path).run({"image": x})["output_0"]
    for source, kind in ((keras_models.h5, "h5"), (keras_models.saved_model, "saved_model")):
        assert detect_source(source) == kind
        candidate = build_recipe("tflite-fp32").run(source, tmp_path / kind)
        got = TfliteRunner(candidate.path).run({"image": x})
        assert list(got) == ["output_0"]
        np.testing.assert_allclose(got["output_0"], expected, atol=1e-5)
    assert prepare_source(keras_models.saved_model).signature_key == "serving_default"


def test_io_names_agree_between_manifest_device_and_converter(reference, tmp_path):
    from device_agent.runtime import load_runtime
    from edgekit.modelinfo import read_model_info

    info = read_model_info(reference.path)
    assert [t.name for t in info.inputs] == ["image"]
    assert [t.name for t in info.outputs] == ["output_0"]
    with load_runtime("tflite", reference.path) as runtime:
        assert [t.name for t in runtime.inputs] == ["image"]
        assert [t.name for t in runtime.outputs] == ["output_0"]
    # Already aligned: a second pass changes nothing.
    content = reference.path.read_bytes()
    assert align_io_names(content) == (content, {})


def test_quantization_debugger_ranks_layers(keras_models, reference, calibration, tmp_path):
    candidate = build_recipe("tflite-int8").run(keras_models.keras, tmp_path, calibration)
    assert candidate.diagnose is not None
    samples = [{"image": keras_models.x[i : i + 1]} for i in range(1500, 1508)]
    layers = candidate.diagnose(reference.path, samples, 3)
    assert 1 <= len(layers) <= 3
    errors = [layer["relative_error"] for layer in layers]
    assert errors == sorted(errors, reverse=True)
    assert all(0 <= e < 0.5 for e in errors)
    assert all(layer["rmse_over_scale"] > 0 for layer in layers)
    assert {"node", "op_type", "tensor", "sqnr_db", "added_error"} <= set(layers[0])


def test_not_a_model_is_refused_in_one_line(tmp_path, keras_models):
    cases = {
        "notes.keras": b"just text",
        "weights.h5": b"\x00" * 64,
        "model.onnx": b"\x08\x01",
        "model.pt2": b"PK",
        "model.bin": b"?",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UnsupportedModel) as err:
            prepare_source(path)
        assert "\n" not in str(err.value)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UnsupportedModel, match=r"saved_model\.pb"):
        prepare_source(empty_dir)
    with pytest.raises(UnsupportedModel, match="not found"):
        prepare_source(tmp_path / "missing.keras")
