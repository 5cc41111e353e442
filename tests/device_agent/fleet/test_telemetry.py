"""Drift scores and the request-path sampler: the arithmetic, the bounds, the baseline reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fleet_support import baseline_samples

from device_agent.telemetry import (
    PSI_EPSILON,
    Baseline,
    BaselineError,
    DriftMonitor,
    DriftSample,
    InputHistogram,
    compute_drift,
    population_stability_index,
    total_variation,
)
from edgekit.protocol import Drift, Telemetry


def test_psi_matches_its_definition():
    assert population_stability_index([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    actual, expected = np.array([0.2, 0.3, 0.5]), np.array([0.3, 0.3, 0.4])
    by_hand = sum((a - e) * math.log(a / e) for a, e in zip(actual, expected, strict=True))
    assert population_stability_index(actual * 70, expected * 10) == pytest.approx(by_hand)
    # An empty bin is floored at epsilon instead of making the score infinite.
    score = population_stability_index([0, 50, 50], [1, 1, 1])
    third = 1 / 3
    floor = (PSI_EPSILON - third) * math.log(PSI_EPSILON / third)
    assert score == pytest.approx(floor + 2 * (0.5 - third) * math.log(0.5 / third))
    assert population_stability_index([1, 0], [0, 1]) > 10
    with pytest.raises(ValueError):
        population_stability_index([0, 0], [1, 1])
    with pytest.raises(ValueError):
        population_stability_index([1, 2, 3], [1, 2])


def test_total_variation():
    assert total_variation([1, 1], [5, 5]) == 0.0
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert total_variation([3, 1], [1, 1]) == pytest.approx(0.25)


def test_binning_uses_the_baseline_edges_and_clips_outliers():
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    histogram = InputHistogram("x", edges, np.array([1.0, 1.0, 1.0]))
    inside = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.9, 4.0])
    np.testing.assert_array_equal(histogram.bin_counts(inside), np.histogram(inside, edges)[0])
    np.testing.assert_array_equal(histogram.bin_counts(np.array([-9.0, 99.0])), [1, 0, 1])
    constant = InputHistogram("c", np.array([2.0, 2.0]), np.array([5.0]))
    np.testing.assert_array_equal(constant.bin_counts(np.array([1.0, 2.0, 3.0])), [3])


def test_baseline_reads_the_converters_format(fleet_baselines: dict[str, Path]):
    doc = json.loads(fleet_baselines["m1"].read_text())
    baseline = Baseline.from_dict(doc)
    assert set(baseline.inputs) == {"input"}
    histogram = baseline.inputs["input"]
    assert histogram.edges.tolist() == doc["inputs"]["input"]["bin_edges"]
    assert histogram.expected.sum() == sum(doc["inputs"]["input"]["counts"])
    assert baseline.output == "probabilities"
    assert list(baseline.class_counts) == doc["output_classes"]["counts"]


@pytest.mark.parametrize(
    "broken",
    [
        {"bin_edges": [0, 1], "counts": [1, 2]},  # one edge too few
        {"bin_edges": [1, 0, 2], "counts": [1, 1]},  # edges not sorted
        {"bin_edges": [0, 1], "counts": [0]},  # empty
        {"bin_edges": [0, "x"], "counts": [1]},
        {"bin_edges": [0, 1], "counts": [-1]},
        {"bin_edges": [0, 1], "counts": [True]},
        "not an object",
    ],
)
def test_unusable_input_histograms_are_left_out(broken: object):
    doc = {"inputs": {"good": {"bin_edges": [0, 1], "counts": [3]}, "bad": broken}}
    assert set(Baseline.from_dict(doc).inputs) == {"good"}


def test_a_baseline_that_is_not_one_is_refused(tmp_path: Path):
    with pytest.raises(BaselineError):
        Baseline.from_dict([1, 2])
    with pytest.raises(BaselineError):
        Baseline.from_dict({"samples": 3})
    bad = tmp_path / "baseline.json"
    bad.write_bytes(b'{"inputs": {}, "inputs": {}}')  # duplicate keys: strict JSON refuses
    with pytest.raises(Exception, match="duplicate"):
        Baseline.load(bad)
    assert Baseline.from_dict({"inputs": {}, "output_classes": {"output": "y"}}).output is None


def test_monitor_keeps_a_bounded_uniform_sample():
    monitor = DriftMonitor(max_requests=100, max_bytes=10**9, seed=3)
    outputs = {"y": np.zeros((1, 2), np.float32)}
    for index in range(20_000):
        monitor.observe("s", np.array([[float(index)]], np.float32), outputs)
    window = monitor.take()
    assert window is not None and window.offered == 20_000 and len(window.samples) == 100
    kept = np.array([float(np.asarray(s.inputs).reshape(-1)[0]) for s in window.samples])
    # Uniform over the whole period, not the first or the last 100 requests.
    assert kept.min() < 2_000 and kept.max() > 18_000
    assert 7_000 < kept.mean() < 13_000
    assert monitor.pending == 0 and monitor.take() is None


def test_monitor_memory_is_bounded_by_bytes_and_the_sampling_rate_is_honoured():
    monitor = DriftMonitor(every=4, max_requests=1000, max_bytes=64 * 1024, seed=1)
    big = np.zeros((1, 4096), np.float32)  # 16 KiB a request
    for _ in range(400):
        monitor.observe("s", big, {"y": np.zeros((1, 2), np.float32)})
    window = monitor.take()
    assert window is not None and window.offered == 400
    assert len(window.samples) == 4 and window.nbytes <= 64 * 1024 + 16 * 1024 + 64
    roomy = DriftMonitor(every=4, max_requests=1000)
    for _ in range(400):
        roomy.observe("s", np.zeros((1, 1)), {})
    assert len(roomy.take().samples) == 100  # type: ignore[union-attr]  # every 4th request


def test_monitor_copies_what_it_keeps():
    monitor = DriftMonitor()
    buffer = np.ones((1, 3), np.float32)
    monitor.observe("s", {"x": buffer}, {"y": buffer})
    buffer[:] = 7  # a caller reusing its buffer must not rewrite the sample
    window = monitor.take()
    assert window is not None
    sample = window.samples[0]
    assert isinstance(sample.inputs, dict)
    assert sample.inputs["x"].tolist() == [[1, 1, 1]] and sample.outputs["y"].tolist() == [
        [1, 1, 1]
    ]


def test_a_small_window_carries_over_and_other_slots_are_not_counted():
    monitor = DriftMonitor()
    outputs = {"y": np.zeros((1, 2), np.float32)}
    for _ in range(3):
        monitor.observe("old", np.zeros((1, 1)), outputs)
        monitor.observe("new", np.zeros((1, 1)), outputs)
    assert monitor.take(4, slot="new") is None and monitor.pending == 6
    monitor.observe("new", np.zeros((1, 1)), outputs)
    window = monitor.take(4, slot="new")
    assert window is not None and len(window.samples) == 7


def _samples(rows: np.ndarray, *, named: bool = True) -> list[DriftSample]:
    weights = np.random.default_rng(1).standard_normal((rows.shape[1], 4))
    out = []
    for row in rows:
        x = row[None, :].astype(np.float32)
        y = {"probabilities": (x @ weights).astype(np.float32)}
        out.append(DriftSample("s", {"input": x} if named else x, y, x.nbytes))
    return out


def test_drift_is_low_on_baseline_like_data_and_high_on_shifted_data(fleet_baselines):
    baseline = Baseline.load(fleet_baselines["m1"])
    same = compute_drift(baseline, _samples(baseline_samples(200, seed=77)))
    shifted = compute_drift(
        baseline,
        _samples(baseline_samples(200, seed=78, shift=2.0), named=False),
        input_names=["input"],
    )
    assert same is not None and shifted is not None
    assert same.input_psi["input"] < 0.1 < 1.0 < shifted.input_psi["input"]
    assert same.samples == 200 and same.extra["input_psi_max"] == same.input_psi["input"]
    assert set(same.baseline_distribution) == {"0", "1", "2", "3"}
    assert sum(same.output_distribution.values()) == pytest.approx(1.0, abs=1e-4)
    assert same.output_psi is not None and 0 <= same.extra["output_tv"] <= 1
    # It fits in a protocol message and survives the round trip.
    message = Telemetry(device="d", drift=same)
    assert Telemetry.from_json(message.to_json()).drift == Drift.from_dict(same.to_dict())


def test_no_scores_without_matching_inputs_or_samples(fleet_baselines):
    baseline = Baseline.load(fleet_baselines["m1"])
    assert compute_drift(baseline, []) is None
    other = [DriftSample("s", {"other": np.ones((1, 16))}, {}, 0)]
    assert compute_drift(baseline, other) is None
    strings = [DriftSample("s", {"input": np.array([["a"]])}, {}, 0)]
    assert compute_drift(baseline, strings) is None
