from __future__ import annotations

import json

import numpy as np
import pytest

from converters import convert_onnx
from converters.errors import (
    BadOption,
    BudgetExceeded,
    CalibrationDataError,
    ConvertError,
    UnsupportedModel,
)
from converters.golden import GoldenSet, build_golden, check_golden
from converters.runtime import make_session


@pytest.fixture(scope="module")
def auto_result(tmp_path_factory, digits, mlp_model, fast_measure):
    events = []
    result = convert_onnx(
        mlp_model,
        out_dir=tmp_path_factory.mktemp("auto"),
        quantize="auto",
        calibration=digits.x[digits.CALIB],
        validation=digits.x[digits.VALID],
        labels=digits.y[digits.VALID],
        max_accuracy_drop=0.02,
        measure=fast_measure,
        progress=events.append,
    )
    return result, events


def test_auto_measures_every_recipe_and_chooses_one(auto_result):
    result, _ = auto_result
    report = result.report
    names = [c["recipe"] for c in report["candidates"]]
    assert names == ["onnx-fp32", "onnx-fp16", "onnx-dynamic-int8", "onnx-int8-qdq"]
    assert report["selection"]["chosen"] == result.recipe in names
    assert result.model_path.is_file()
    make_session(result.model_path)
    chosen = next(c for c in report["candidates"] if c["recipe"] == result.recipe)
    if result.recipe == "onnx-fp32":
        assert result.selection.fallback and result.warnings
    else:  # whatever was chosen passed the budget and is not slower than fp32 (beyond noise)
        assert chosen["verdict"]["eligible"]
        fp32 = report["candidates"][0]["measurement"]["latency"]["batch_1"]["p50_ms"]
        tolerance = report["budget"]["speed_tolerance"]
        assert tolerance == 0.05
        assert chosen["measurement"]["latency"]["batch_1"]["p50_ms"] <= fp32 * (1 + tolerance)
    for c in report["candidates"]:
        # auto times at batch N only what could still be chosen after batch 1.
        refused = c["verdict"] is not None and not c["verdict"]["eligible"]
        assert (c["measurement"]["latency"]["batch_n"] is None) == refused
    assert report["runtime_hints"] == result.runtime_hints
    assert result.runtime_hints == {
        "onnxruntime": {"disabled_optimizers": ["QDQPropagationTransformer"]}
    }
    for c in report["candidates"]:
        quality = c["measurement"]["quality"]
        assert quality["accuracy"] > 0.9
        assert quality["samples"] == 297
    json.dumps(report, allow_nan=False)
    assert report["source"]["inputs"][0]["name"] == "input"
    assert report["data"]["labels"] == 297 and report["data"]["split"] is None


def test_auto_skips_batch_n_timing_of_a_refused_candidate(tmp_path, digits, mlp_model):
    # An outlier in the calibration data ruins static int8 (every real input quantizes to the
    # same step): refused on accuracy, it is not timed at batch N; the others are.
    calibration = digits.x[digits.CALIB].copy()
    calibration[0, :] = 1e5
    result = convert_onnx(
        mlp_model,
        out_dir=tmp_path,
        quantize="auto",
        calibration=calibration,
        validation=digits.x[digits.VALID][:100],
        labels=digits.y[digits.VALID][:100],
        max_accuracy_drop=0.05,
        measure=_quick(),
    )
    by_recipe = {m.recipe: m for m in result.measurements}
    qdq = by_recipe["onnx-int8-qdq"]
    assert qdq.latency_bn is None
    assert qdq.notes[0].startswith("batch-4 latency not measured: accuracy drop")
    assert by_recipe["onnx-fp32"].latency_bn is not None
    verdicts = {v.recipe: v for v in result.selection.verdicts}
    assert not verdicts["onnx-int8-qdq"].within_budget
    assert result.recipe != "onnx-int8-qdq"
    json.dumps(result.report, allow_nan=False)


def test_progress_reports_every_stage(auto_result):
    _, events = auto_result
    stages = {e.stage for e in events}
    assert {"recipe", "calibrate", "validate", "latency", "memory", "golden", "baseline"} <= stages
    validate = [e for e in events if e.stage == "validate"]
    assert validate[-1].completed == validate[-1].total == 297
    calibrate = [e for e in events if e.stage == "calibrate"]
    assert calibrate[0].label == "onnx-int8-qdq" and calibrate[0].total == 300


def test_golden_set_accepts_the_model_and_catches_a_different_one(
    auto_result, wrong_mlp_model, tmp_path
):
    result, _ = auto_result
    golden = result.golden
    assert golden.samples == 8
    assert golden.inputs["input"].shape == (8, 64)  # one batched feed
    assert golden.outputs["probs"].shape == (8, 10)
    tol = golden.tolerances["probs"]
    assert 1e-5 < tol < 0.05
    assert check_golden(result.model_path, golden).passed
    wrong = check_golden(wrong_mlp_model, golden)
    assert not wrong.passed
    assert wrong.max_abs_error["probs"] > 10 * tol
    assert "max abs error" in wrong.failures[0]
    # Round trip through the files the bundle will carry.
    saved = golden.save(tmp_path / "golden")
    assert saved.name == "golden.npz"
    loaded = GoldenSet.load(saved)
    assert loaded.tolerances == pytest.approx(dict(golden.tolerances))
    assert loaded.samples == 8
    assert check_golden(result.model_path, loaded).passed


def test_golden_tolerance_covers_int8_kernels(tmp_path, digits, mlp_model, wrong_mlp_model):
    result = convert_onnx(
        mlp_model,
        out_dir=tmp_path,
        quantize="int8",
        calibration=digits.x[digits.CALIB],
        validation=digits.x[digits.VALID][:50],
        allow_slower=True,
        max_accuracy_drop=0.05,
        measure=_quick(),
    )
    assert result.precision == "int8"
    assert check_golden(result.model_path, result.golden).passed
    assert result.golden.tolerances["probs"] < 0.05
    assert not check_golden(wrong_mlp_model, result.golden).passed
    # The int8 model itself is "a different model" for the fp32 golden set.
    fp32_golden = build_golden(result.candidates[0].path, [dict(result.golden.inputs)])
    assert check_golden(result.model_path, fp32_golden).max_abs_error["probs"] > 0


def test_golden_tolerance_floor_from_quantization_error(auto_result):
    result, _ = auto_result
    samples = [{"input": result.golden.inputs["input"][i : i + 1]} for i in range(3)]
    plain = build_golden(result.model_path, samples)
    floored = build_golden(result.model_path, samples, quantization_error={"probs": 0.5})
    assert floored.tolerances["probs"] == pytest.approx(0.05)
    assert plain.tolerances["probs"] < floored.tolerances["probs"]
    assert "max error vs fp32" in floored.method


def test_baseline_statistics(auto_result, digits):
    result, _ = auto_result
    baseline = result.baseline
    assert baseline is not None
    assert baseline.samples == 300 + 297
    stats = baseline.inputs["input"]
    assert stats.elements == baseline.samples * 64
    assert sum(stats.counts) == stats.elements
    assert len(stats.bin_edges) == len(stats.counts) + 1
    assert stats.bin_edges == sorted(stats.bin_edges)
    assert stats.min == 0.0 and stats.max == 1.0
    data = np.concatenate([digits.x[digits.CALIB], digits.x[digits.VALID]])
    assert stats.mean == pytest.approx(float(data.mean()), rel=1e-5)
    assert stats.std == pytest.approx(float(data.std()), rel=1e-4)
    assert stats.feature_axis == "feature" and len(stats.feature_mean) == 64
    classes = baseline.output_classes
    assert classes is not None and len(classes.counts) == 10
    assert sum(classes.counts) == baseline.samples
    assert sum(classes.fractions) == pytest.approx(1.0)
    json.dumps(baseline.to_dict(), allow_nan=False)


def test_write_artifacts(auto_result, tmp_path):
    result, _ = auto_result
    paths = result.write_artifacts(tmp_path)
    assert set(paths) == {"report", "golden", "baseline"}
    report = json.loads(paths["report"].read_text())
    assert report["schema"] == "edgekit.convert.report/1"
    assert report["golden"]["tolerances"]["probs"] > 0
    with np.load(paths["golden"]) as archive:
        assert set(archive.files) == {"input:input", "output:probs", "atol:probs"}
        assert archive["atol:probs"].dtype == np.float32


def _quick():
    from converters.measure import MeasureConfig

    return MeasureConfig(
        batch_size=4,
        warmup=1,
        iterations=10,
        batch_iterations=3,
        max_seconds=0.5,
        memory="off",
        layer_diagnostics=True,
        diagnostic_samples=4,
    )


def test_explicit_int8_over_budget_raises_with_the_drop(tmp_path, digits, mlp_model):
    # Calibrating on inputs scaled down 50x clips real activations: accuracy collapses.
    with pytest.raises(BudgetExceeded) as err:
        convert_onnx(
            mlp_model,
            out_dir=tmp_path,
            quantize="int8",
            calibration=digits.x[digits.CALIB] * 0.02,
            validation=digits.x[digits.VALID],
            labels=digits.y[digits.VALID],
            max_accuracy_drop=0.01,
            measure=_quick(),
        )
    error = err.value
    assert error.drop > 0.1
    assert f"accuracy drop {error.drop:.4f} exceeds the budget 0.0100 by" in str(error)
    assert "worst layers:" in str(error)
    assert [c["recipe"] for c in error.report["candidates"]] == ["onnx-fp32", "onnx-int8-qdq"]
    assert isinstance(error, ConvertError)


def test_single_source_is_split_and_labels_follow(tmp_path, digits, mlp_model):
    path = tmp_path / "all.npy"
    np.save(path, digits.x[digits.CALIB.start :])
    result = convert_onnx(
        mlp_model,
        out_dir=tmp_path / "out",
        quantize="int8",
        calibration=path,
        labels=digits.y[digits.CALIB.start :],
        allow_slower=True,
        max_accuracy_drop=0.05,
        measure=_quick(),
    )
    data = result.report["data"]
    assert data["split"] == {"validation_fraction": 0.25, "seed": 0}
    assert data["calibration"]["samples"] == 300  # capped
    assert 100 < data["validation"]["samples"] < 200
    fp32_quality = result.measurements[0].quality
    assert fp32_quality is not None and fp32_quality.accuracy > 0.9  # labels stayed aligned


def test_single_source_is_not_split_without_a_calibrating_recipe(tmp_path, digits, mlp_model):
    result = convert_onnx(
        mlp_model,
        out_dir=tmp_path,
        quantize="dynamic",
        validation=digits.x[digits.VALID],
        labels=digits.y[digits.VALID],
        allow_slower=True,
        max_accuracy_drop=0.05,
        measure=_quick(),
    )
    data = result.report["data"]
    assert data["split"] is None and data["calibration"] is None
    assert data["validation"]["samples"] == 297
    assert result.baseline is not None and result.baseline.samples == 297


def test_quantize_none_without_data(tmp_path, mlp_model):
    result = convert_onnx(mlp_model, out_dir=tmp_path, quantize="none", measure=_quick())
    assert result.recipe == "onnx-fp32" and result.baseline is None
    assert result.measurements[0].quality is None
    assert check_golden(result.model_path, result.golden).passed
    assert result.report["data"]["calibration"] is None


def test_input_errors(tmp_path, digits, mlp_model):
    with pytest.raises(CalibrationDataError, match="needs calibration or validation data"):
        convert_onnx(mlp_model, out_dir=tmp_path, quantize="int8")
    with pytest.raises(BadOption, match="--quantize"):
        convert_onnx(mlp_model, out_dir=tmp_path, quantize="int4")
    with pytest.raises(BadOption, match="unknown recipe"):
        convert_onnx(mlp_model, out_dir=tmp_path, quantize="none", recipe_options={"onnx-int9": {}})
    with pytest.raises(BadOption, match="unknown option"):
        convert_onnx(
            mlp_model,
            out_dir=tmp_path,
            quantize="int8",
            calibration=digits.x[:100],
            recipe_options={"onnx-int8-qdq": {"method": "entropy"}},
        )
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01garbage")
    with pytest.raises(UnsupportedModel):
        convert_onnx(garbage, out_dir=tmp_path, quantize="none")
    with pytest.raises(CalibrationDataError, match="labels: 10 labels for 297 samples"):
        convert_onnx(
            mlp_model,
            out_dir=tmp_path,
            quantize="dynamic",
            calibration=digits.x[digits.CALIB],
            validation=digits.x[digits.VALID],
            labels=digits.y[:10],
        )
    with pytest.raises(CalibrationDataError, match="'input'"):
        convert_onnx(mlp_model, out_dir=tmp_path, quantize="int8", calibration=np.zeros((10, 63)))


def test_golden_for_a_fixed_batch_model_is_one_sample(digits, mlp_fixed_batch_model):
    samples = [{"input": digits.x[i : i + 1]} for i in range(4)]
    golden = build_golden(mlp_fixed_batch_model, samples)
    assert golden.samples == 1 and golden.inputs["input"].shape == (1, 64)
    assert check_golden(mlp_fixed_batch_model, golden).passed


def test_auto_skips_a_broken_recipe_and_explicit_mode_raises(tmp_path, digits, mlp_model):
    from dataclasses import dataclass

    from converters.errors import RecipeFailed
    from converters.recipes import Recipe, register_recipe
    from converters.recipes import base as recipes_base

    @dataclass(frozen=True, kw_only=True)
    class BrokenConfig:
        pass

    @register_recipe
    class Broken(Recipe[BrokenConfig]):
        name = "test-broken"
        runtime = "onnxruntime"
        precision = "int8"
        mode = "dynamic"
        config_type = BrokenConfig

        def run(self, src_model_path, out_dir, calibration=None):
            raise ZeroDivisionError("simulated converter bug")

    try:
        result = convert_onnx(
            mlp_model,
            out_dir=tmp_path / "auto",
            quantize="auto",
            calibration=digits.x[digits.CALIB],
            validation=digits.x[digits.VALID][:60],
            measure=_quick(),
        )
        assert result.report["failed"] == [
            {"recipe": "test-broken", "error": "ZeroDivisionError: simulated converter bug"}
        ]
        assert any("test-broken failed" in w for w in result.warnings)
        with pytest.raises(RecipeFailed, match="simulated converter bug") as err:
            convert_onnx(
                mlp_model,
                out_dir=tmp_path / "explicit",
                quantize="test-broken",
                validation=digits.x[digits.VALID][:60],
                measure=_quick(),
            )
        assert err.value.recipe == "test-broken"
    finally:
        recipes_base._REGISTRY.pop("test-broken", None)
