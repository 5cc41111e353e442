from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from converters.calibration import open_samples
from converters.diagnose import layer_errors
from converters.measure import (
    MeasureConfig,
    _time_interleaved,
    measure_candidates,
    predictions,
    primary_output,
)
from converters.memory import measure_memory
from converters.model_spec import read_model_spec
from converters.recipes import build_recipe


@pytest.fixture(scope="module")
def mlp_candidates(tmp_path_factory, digits, mlp_model):
    out = tmp_path_factory.mktemp("measure")
    spec = read_model_spec(mlp_model)
    calibration = open_samples(digits.x[digits.CALIB], spec)
    reference = build_recipe("onnx-fp32").run(mlp_model, out / "fp32")
    twin_path = out / "twin.onnx"
    shutil.copyfile(reference.path, twin_path)
    twin = dataclasses.replace(reference, recipe="fp32-copy", path=twin_path)
    qdq = build_recipe("onnx-int8-qdq").run(mlp_model, out / "qdq", calibration)
    return reference, twin, qdq


@pytest.fixture(scope="module")
def measured(mlp_candidates, digits, mlp_model, fast_measure):
    reference, twin, qdq = mlp_candidates
    validation = open_samples(digits.x[digits.VALID], read_model_spec(mlp_model))
    labels = digits.y[digits.VALID]
    return measure_candidates(
        reference, [twin, qdq], validation, labels=labels, config=fast_measure
    )


def test_reference_against_itself_is_exact(measured, digits, mlp_model, eval_accuracy):
    ref, twin, _ = measured
    assert ref.reference and not twin.reference
    q = twin.quality
    assert q is not None
    assert q.samples == len(digits.y[digits.VALID])
    assert q.top1_agreement == 1.0
    assert q.max_abs_error == 0.0 and q.mean_abs_error == 0.0
    assert q.cosine == pytest.approx(1.0, abs=1e-9)
    assert q.cosine_min == pytest.approx(1.0, abs=1e-9)
    expected = eval_accuracy(mlp_model, digits.x[digits.VALID], digits.y[digits.VALID])
    assert q.accuracy == pytest.approx(expected)
    assert ref.quality is not None and ref.quality.accuracy == pytest.approx(expected)


def test_latency_and_size_numbers_are_consistent(measured, fast_measure):
    for m in measured:
        assert m.latency_b1.p95_ms >= m.latency_b1.p50_ms > 0
        assert m.latency_b1.runs >= 5
        assert m.latency_bn is not None
        assert m.latency_bn.batch_size == fast_measure.batch_size
        assert m.latency_bn.mode == "batched"
        assert m.latency_bn.p95_ms >= m.latency_bn.p50_ms > 0
        assert m.file_size_bytes > 0
        assert m.memory.peak_rss_delta_bytes is None or m.memory.peak_rss_delta_bytes >= 0
        json.dumps(m.to_dict(), allow_nan=False)


def test_int8_quality_and_layer_diagnostics(measured):
    qdq = measured[2]
    assert qdq.precision == "int8"
    q = qdq.quality
    assert q is not None
    assert 0.95 <= q.top1_agreement <= 1.0
    assert 0.0 < q.max_abs_error < 0.5 and q.cosine > 0.99
    assert [o.name for o in q.outputs] == ["probs"]
    assert qdq.layers, "expected a layer ranking for the int8 candidate"
    added = [layer.added_error for layer in qdq.layers]
    assert added == sorted(added, reverse=True)
    assert qdq.layers[0].relative_error > 0 and qdq.layers[0].sqnr_db < 200
    assert measured[1].layers == ()  # fp32 copies are not diagnosed


def test_skip_batch_n_leaves_screened_candidates_untimed(
    mlp_candidates, digits, mlp_model, fast_measure
):
    reference, twin, qdq = mlp_candidates
    validation = open_samples(digits.x[digits.VALID][:40], read_model_spec(mlp_model))
    seen = []

    def screen(early):
        seen.extend(early)
        # Naming the reference too: it is timed regardless, every ratio needs it.
        return {twin.recipe: "refused for the test", reference.recipe: "ignored"}

    config = dataclasses.replace(fast_measure, memory="off")
    ref, copy, int8 = measure_candidates(
        reference, [twin, qdq], validation, config=config, skip_batch_n=screen
    )
    # The screen saw every model after the batch-1 timing, with quality, before batch N.
    assert [m.recipe for m in seen] == [reference.recipe, twin.recipe, qdq.recipe]
    assert all(m.latency_bn is None and m.latency_b1.runs >= 5 for m in seen)
    assert all(m.quality is not None for m in seen) and seen[0].reference
    assert copy.latency_bn is None
    assert copy.notes == ("batch-8 latency not measured: refused for the test",)
    assert ref.latency_bn is not None and int8.latency_bn is not None
    assert copy.latency_b1.runs >= 5 and copy.quality is not None


def test_slow_calls_are_timed_one_per_round_so_the_deadline_is_kept():
    import time

    def slow() -> None:
        time.sleep(0.03)

    # 20 runs asked, a 10 ms budget: a call of 30 ms stops at the minimum of 5 runs, instead
    # of finishing rounds of 4 (8 runs; each run of a ResNet-18 batch of 32 takes seconds).
    times = _time_interleaved({0: slow, 1: slow}, warmup=1, runs=20, max_seconds=0.01)
    assert [len(t) for t in times.values()] == [5, 5]
    # Fast calls keep rounds of several runs (switching models between runs costs caches).
    fast = _time_interleaved({0: lambda: None}, warmup=1, runs=20, max_seconds=1e-6)
    assert len(fast[0]) == 8
    # Without a deadline, every run asked for is made.
    full = _time_interleaved({0: lambda: None}, warmup=0, runs=20, max_seconds=60.0)
    assert len(full[0]) == 20


def test_long_calls_get_one_warm_up_run():
    import time

    counts = {"long": 0, "short": 0}

    def long_call() -> None:
        counts["long"] += 1
        time.sleep(0.26)

    def short_call() -> None:
        counts["short"] += 1

    _time_interleaved({0: long_call}, warmup=3, runs=1, max_seconds=60.0)
    _time_interleaved({0: short_call}, warmup=3, runs=1, max_seconds=60.0)
    assert counts == {"long": 1 + 1, "short": 3 + 1}


def test_layer_errors_of_identical_models_are_zero(mlp_candidates, digits):
    reference, twin, _ = mlp_candidates
    samples = [{"input": digits.x[i : i + 1]} for i in range(4)]
    layers = layer_errors(reference.path, twin.path, samples, top=10)
    assert layers and all(layer.relative_error == 0.0 for layer in layers)


def test_fixed_batch_model_loops_for_batch_n(tmp_path, digits, mlp_fixed_batch_model, fast_measure):
    reference = build_recipe("onnx-fp32").run(mlp_fixed_batch_model, tmp_path)
    spec = read_model_spec(reference.path)
    assert not spec.inputs[0].has_dynamic_batch
    validation = open_samples(digits.x[:20], spec)
    (m,) = measure_candidates(reference, [], validation, config=fast_measure)
    assert m.latency_bn is not None and m.latency_bn.mode == "looped"
    assert m.latency_bn.p50_ms > m.latency_b1.p50_ms  # 8 runs take longer than one


def test_without_validation_data_only_speed_is_measured(mlp_candidates, fast_measure):
    reference = mlp_candidates[0]
    config = dataclasses.replace(fast_measure, memory="off")
    (m,) = measure_candidates(reference, [], None, config=config)
    assert m.quality is None
    assert m.latency_b1.p50_ms > 0
    assert m.memory.peak_rss_delta_bytes is None and m.memory.method == "off"


def test_memory_probe_in_a_subprocess(mlp_candidates):
    stats = measure_memory(
        mlp_candidates[0].path,
        [{"input": ((1, 64), "float32")}, {"input": ((32, 64), "float32")}],
        mode="subprocess",
    )
    assert stats.method.startswith("subprocess")
    assert stats.peak_rss_delta_bytes is not None and stats.peak_rss_delta_bytes > 0


def test_prediction_helpers(mlp_model):
    assert predictions(np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)).tolist() == [1, 0]
    assert predictions(np.array([3, 4], np.int64)).tolist() == [3, 4]
    assert predictions(np.array([[0.3]], np.float32)) is None  # regression: no top-1
    spec = read_model_spec(mlp_model)
    assert primary_output(spec) == "probs"
    with pytest.raises(Exception, match="primary output"):
        primary_output(spec, "nope")


def test_measure_config_validation():
    with pytest.raises(Exception, match="batch_size"):
        MeasureConfig(batch_size=0)
