"""``convert_tflite`` end to end on the digits CNN: measure, select, gate, golden, clean failure."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from converters import ConversionResult, convert_tflite
from converters.errors import (
    BadOption,
    BudgetExceeded,
    CalibrationDataError,
    ConvertError,
    UnsupportedModel,
)
from converters.golden import check_golden
from converters.measure import MeasureConfig

ALL = ["tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8"]


def quick() -> MeasureConfig:
    return MeasureConfig(
        batch_size=8,
        warmup=2,
        iterations=20,
        batch_iterations=5,
        max_seconds=0.5,
        memory="inprocess",
        diagnostic_samples=8,
    )


def data(keras_models, digits):
    x, y = keras_models.x, keras_models.y
    return {
        "calibration": x[digits.CALIB],
        "validation": x[digits.VALID],
        "labels": y[digits.VALID],
    }


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


def agent_outputs(path, inputs):
    from device_agent.runtime import load_runtime

    with load_runtime("tflite", path) as runtime:
        return runtime.predict(dict(inputs))


def assert_golden_reproduces(result: ConversionResult):
    golden = result.golden
    actual = agent_outputs(result.model_path, golden.inputs)
    assert set(actual) == set(golden.outputs) == {"output_0"}
    for name, expected in golden.outputs.items():
        assert expected.dtype == np.float32  # float on the device side, whatever the model's I/O
        error = float(np.max(np.abs(actual[name] - expected)))
        assert error <= golden.tolerances[name]
    assert check_golden(result.model_path, golden).passed


@pytest.fixture(scope="module")
def auto_result(keras_models, digits, tmp_path_factory):
    events = []
    result = convert_tflite(
        keras_models.keras,
        out_dir=tmp_path_factory.mktemp("auto"),
        quantize="auto",
        max_accuracy_drop=0.02,
        measure=quick(),
        progress=events.append,
        **data(keras_models, digits),
    )
    return result, events


def test_auto_measures_every_recipe_and_never_ships_a_slower_one(auto_result):
    result, _ = auto_result
    report = result.report
    assert report["runtime"] == "tflite"
    assert [c["recipe"] for c in report["candidates"]] == ALL
    assert report["fallbacks"] == [
        {
            "recipe": "tflite-int16x8",
            "built": False,
            "reason": "a int8 candidate is within the budget",
        }
    ]
    fp32 = report["candidates"][0]["measurement"]
    for c in report["candidates"]:
        m = c["measurement"]
        assert m["quality"]["accuracy"] > 0.9
        assert m["quality"]["samples"] == 297
        assert m["latency"]["batch_1"]["p50_ms"] > 0
        assert m["file_size_bytes"] > 0
        assert m["memory"]["peak_rss_delta_bytes"] is not None
        if c["verdict"] is not None and not c["verdict"]["eligible"]:
            # auto does not time at batch N what batch 1 (or accuracy) already refused.
            assert m["latency"]["batch_n"] is None
            assert m["notes"][0].startswith("batch-8 latency not measured: ")
        else:
            assert m["latency"]["batch_n"]["mode"] == "batched"  # dynamic batch: resized
            assert m["latency"]["batch_n"]["batch_size"] == 8
    chosen = next(c for c in report["candidates"] if c["recipe"] == result.recipe)
    if result.selection.fallback:
        assert result.recipe == "tflite-fp32" and result.warnings
    else:
        assert chosen["verdict"]["eligible"]
        limit = fp32["latency"]["batch_1"]["p50_ms"] * (1 + report["budget"]["speed_tolerance"])
        assert chosen["measurement"]["latency"]["batch_1"]["p50_ms"] <= limit
    assert report["runtime_hints"] == {"tflite": {"op_resolver": "auto"}}
    int8 = report["candidates"][3]
    assert int8["io_dtypes"] == {"image": "int8", "output_0": "int8"}
    assert int8["measurement"]["worst_layers"], "QuantizationDebugger ranking expected"
    assert result.model_path.name == "model.tflite" and result.model_path.is_file()
    json.dumps(report, allow_nan=False)


def test_progress_and_artifacts(auto_result, tmp_path):
    result, events = auto_result
    stages = {e.stage for e in events}
    assert {"recipe", "calibrate", "validate", "latency", "memory", "golden", "baseline"} <= stages
    paths = result.write_artifacts(tmp_path)
    assert set(paths) == {"report", "golden", "baseline"}
    with np.load(paths["golden"]) as archive:
        assert set(archive.files) == {"input:image", "output:output_0", "atol:output_0"}
        assert archive["input:image"].shape == (8, 8, 8, 1)
    baseline = json.loads(paths["baseline"].read_text())
    assert baseline["samples"] == 300 + 297
    assert baseline["inputs"]["image"]["feature_axis"] == "channel"


def test_golden_reproduces_on_the_device_runtime(auto_result):
    result, _ = auto_result
    assert_golden_reproduces(result)


def test_golden_names_match_the_bundle_manifest(auto_result):
    from edgekit.modelinfo import read_model_info

    result, _ = auto_result
    info = read_model_info(result.model_path)
    assert [t.name for t in info.inputs] == list(result.golden.inputs)
    assert [t.name for t in info.outputs] == list(result.golden.outputs)


def test_explicit_int8_with_int8_io(keras_models, digits, tmp_path):
    result = convert_tflite(
        keras_models.keras,
        out_dir=tmp_path,
        quantize="int8",
        allow_slower=True,
        max_accuracy_drop=0.03,
        measure=quick(),
        **data(keras_models, digits),
    )
    assert result.recipe == "tflite-int8" and result.precision == "int8"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(result.model_path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert_golden_reproduces(result)
    assert result.golden.tolerances["output_0"] >= 2 * 0.00390625  # two output steps
    notes = result.candidates[1].notes
    assert "calibrated on 300 samples" in notes and "I/O int8" in notes


def test_explicit_int8_with_float_io(keras_models, digits, tmp_path):
    result = convert_tflite(
        keras_models.keras,
        out_dir=tmp_path,
        quantize="tflite-int8",
        io_dtype="float",
        allow_slower=True,
        max_accuracy_drop=0.03,
        measure=quick(),
        **data(keras_models, digits),
    )
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(result.model_path))
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert result.report["candidates"][1]["config"] == {
        "io_dtype": "float",
        "allow_float_ops": False,
    }
    assert_golden_reproduces(result)


def test_budget_gate_refuses_int8_that_breaks_the_model(keras_models, digits, tmp_path):
    with pytest.raises(BudgetExceeded) as err:
        convert_tflite(
            keras_models.fragile,
            out_dir=tmp_path,
            quantize="tflite-int8",
            max_accuracy_drop=0.01,
            measure=quick(),
            **data(keras_models, digits),
        )
    error = err.value
    assert isinstance(error, ConvertError) and "\n" not in str(error)
    assert error.drop > 0.3
    assert f"accuracy drop {error.drop:.4f} exceeds the budget 0.0100" in str(error)
    assert "worst layers:" in str(error) and "fc1" in str(error)
    assert [c["recipe"] for c in error.report["candidates"]] == ["tflite-fp32", "tflite-int8"]
    # Refused by policy: the measured candidates stay for inspection, nothing is shipped.
    assert not (tmp_path / "model.tflite").exists()
    assert (tmp_path / "candidates" / "tflite-int8" / "model.tflite").is_file()


def test_int16x8_is_the_fallback_when_int8_breaks(keras_models, digits, tmp_path):
    result = convert_tflite(
        keras_models.fragile,
        out_dir=tmp_path,
        quantize="int8",
        allow_slower=True,  # int16x8 runs on reference kernels here
        max_accuracy_drop=0.02,
        measure=quick(),
        **data(keras_models, digits),
    )
    report = result.report
    assert report["fallbacks"] == [
        {"recipe": "tflite-int16x8", "built": True, "reason": "no int8 candidate within the budget"}
    ]
    verdicts = {v["recipe"]: v for v in report["selection"]["verdicts"]}
    assert not verdicts["tflite-int8"]["within_budget"]
    assert verdicts["tflite-int16x8"]["within_budget"]
    assert result.recipe == "tflite-int16x8" and result.precision == "int16x8"
    assert_golden_reproduces(result)


def test_quantize_none_without_data_and_other_sources(keras_models, tmp_path):
    result = convert_tflite(
        keras_models.h5, out_dir=tmp_path / "h5", quantize="none", measure=quick()
    )
    assert result.recipe == "tflite-fp32" and result.baseline is None
    assert result.measurements[0].quality is None
    assert result.report["source"]["kind"] == "h5"
    assert check_golden(result.model_path, result.golden).passed
    saved = convert_tflite(
        keras_models.saved_model,
        out_dir=tmp_path / "sm",
        quantize="none",
        measure=quick(),
        golden_samples=2,
    )
    assert saved.report["source"]["kind"] == "saved_model"
    assert saved.report["source"]["signature"] == "serving_default"
    assert saved.golden.samples == 2


def test_bad_inputs_raise_one_line_and_leave_no_files(keras_models, digits, tmp_path):
    out = tmp_path / "out"
    x = keras_models.x
    broken = tmp_path / "broken.keras"
    content = keras_models.keras.read_bytes()
    broken.write_bytes(content[: len(content) // 2])  # truncated download
    garbage_zip = tmp_path / "garbage.keras"
    import zipfile

    with zipfile.ZipFile(garbage_zip, "w") as archive:
        archive.writestr("config.json", "{not json")
    not_a_model = tmp_path / "readme.keras"
    not_a_model.write_text("hello")
    cases = [
        (UnsupportedModel, dict(model_path=not_a_model, calibration=x[:50]), "not a Keras"),
        (UnsupportedModel, dict(model_path=broken, calibration=x[:50]), "broken.keras"),
        (UnsupportedModel, dict(model_path=garbage_zip, calibration=x[:50]), "does not load"),
        (CalibrationDataError, dict(calibration=np.zeros((20, 8, 8, 2), np.float32)), "'image'"),
        (CalibrationDataError, dict(calibration=np.full((20, 64), "a")), "cannot be cast"),
        (CalibrationDataError, dict(calibration=np.zeros((0, 8, 8, 1), np.float32)), "no samples"),
        (CalibrationDataError, dict(calibration=x[:50], labels=[1, 2]), "labels"),
        (BadOption, dict(calibration=x[:50], quantize="int4"), "--quantize"),
        (BadOption, dict(calibration=x[:50], io_dtype="uint8"), "io_dtype"),
        (BadOption, dict(recipe_options={"tflite-int8": {"io": "int8"}}), "unknown option"),
    ]
    for error_type, kwargs, fragment in cases:
        options = {"model_path": keras_models.keras, "quantize": "int8", **kwargs}
        with pytest.raises(error_type) as err:
            convert_tflite(options.pop("model_path"), out_dir=out, measure=quick(), **options)
        message = str(err.value)
        assert "\n" not in message and fragment in message, (kwargs, message)
        assert files_under(out) == [], (kwargs, files_under(out))
