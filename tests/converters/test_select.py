"""Selection logic on hand-made measurement records (no model is run)."""

from __future__ import annotations

import pytest

from converters.diagnose import LayerError
from converters.errors import BadOption, BudgetExceeded, SlowerThanReference
from converters.measure import LatencyStats, Measurement, QualityStats
from converters.select import (
    Budget,
    evaluate_candidates,
    quality_drop,
    refused_before_batch_n,
    select_candidate,
)


def record(
    recipe: str,
    *,
    precision: str = "int8",
    accuracy: float | None = 0.95,
    agreement: float | None = 1.0,
    p50: float = 1.0,
    size: int = 1000,
    reference: bool = False,
    layers: tuple[LayerError, ...] = (),
    bn_per_sample: float | None = None,
) -> Measurement:
    quality = QualityStats(
        samples=300,
        primary_output="probs",
        top1_agreement=agreement,
        max_abs_error=0.0,
        mean_abs_error=0.0,
        cosine=1.0,
        cosine_min=1.0,
        accuracy=accuracy,
    )
    return Measurement(
        recipe=recipe,
        precision=precision,
        path=f"/tmp/{recipe}.onnx",
        file_size_bytes=size,
        latency_b1=LatencyStats(1, "batched", p50, p50 * 1.2, p50, 100),
        latency_bn=None
        if bn_per_sample is None
        else LatencyStats(32, "batched", bn_per_sample * 32, bn_per_sample * 40, 1.0, 20),
        quality=quality,
        reference=reference,
        layers=layers,
    )


FP32 = record("onnx-fp32", precision="fp32", accuracy=0.95, p50=1.0, size=4000, reference=True)
BUDGET = Budget(max_accuracy_drop=0.01)


def test_picks_the_fastest_within_budget():
    fp16 = record("onnx-fp16", precision="fp16", accuracy=0.95, p50=0.9, size=2000)
    qdq = record("onnx-int8-qdq", accuracy=0.945, p50=0.5, size=1000)
    dynamic = record("onnx-dynamic-int8", accuracy=0.95, p50=0.7, size=1000)
    selection = select_candidate([FP32, fp16, qdq, dynamic], budget=BUDGET)
    assert selection.chosen == "onnx-int8-qdq"
    assert not selection.fallback and selection.mode == "auto"
    assert all(v.eligible for v in selection.verdicts)


def test_near_ties_in_speed_go_to_the_smaller_file():
    a = record("a", precision="fp16", p50=0.80, size=2000)
    b = record("b", p50=0.82, size=1000)  # within 5% of the fastest, half the size
    assert select_candidate([FP32, a, b], budget=BUDGET).chosen == "b"
    assert select_candidate([FP32, a, b], budget=Budget(prefer="size")).chosen == "b"
    c = record("c", p50=0.9, size=500)
    assert select_candidate([FP32, a, c], budget=BUDGET).chosen == "a"
    assert select_candidate([FP32, a, c], budget=Budget(prefer="size")).chosen == "c"


def test_never_picks_int8_slower_than_fp32():
    # Smaller, exactly as accurate, but 4x slower at batch 1: refused, even if it is the only one.
    slow = record("onnx-dynamic-int8", accuracy=0.95, p50=4.0, size=1000)
    selection = select_candidate([FP32, slow], budget=BUDGET)
    assert selection.chosen == "onnx-fp32" and selection.fallback
    (verdict,) = selection.verdicts
    assert verdict.within_budget and not verdict.not_slower and not verdict.eligible
    assert verdict.speedup == pytest.approx(0.25)
    assert any("slower than fp32" in w for w in selection.warnings)
    # A faster but slightly less accurate one (within budget) wins over the slow one.
    ok = record("onnx-int8-qdq", accuracy=0.945, p50=0.99)
    assert select_candidate([FP32, slow, ok], budget=BUDGET).chosen == "onnx-int8-qdq"
    # Slower by more than the speed tolerance (5%) is slower...
    slower = record("slower", p50=1.06)
    assert select_candidate([FP32, slower], budget=BUDGET).fallback
    # ...unless the budget allows some slowdown on top of it.
    relaxed = Budget(max_accuracy_drop=0.01, max_slowdown=0.02)
    assert select_candidate([FP32, slower], budget=relaxed).chosen == "slower"


def test_same_speed_as_fp32_within_the_tolerance_is_not_slower():
    # Timing noise puts an equally fast candidate a little above or below fp32 from run to run;
    # within the tolerance it is the same speed, so the choice does not flip with the noise.
    for p50 in (0.97, 1.0, 1.03, 1.049):
        same = record("onnx-fp16", precision="fp16", p50=p50, size=2000)
        selection = select_candidate([FP32, same], budget=BUDGET)
        assert selection.chosen == "onnx-fp16" and not selection.fallback, p50
    # With no tolerance the comparison is strict: a hair slower is slower.
    strict = Budget(speed_tolerance=0.0)
    hair = record("hair", p50=1.001)
    assert select_candidate([FP32, hair], budget=strict).fallback
    assert not select_candidate([FP32, hair], budget=BUDGET).fallback


def test_equal_speed_candidates_resolve_to_the_smaller_file_every_time():
    # Two variants of equal speed (as fp16 and dynamic-range int8 of a small CNN are), measured
    # in different orders of noise: the smaller one is chosen in every run.
    runs = [(0.98, 1.02), (1.02, 0.98), (1.0, 1.0), (0.97, 1.01), (1.02, 1.01)]
    for fp16_p50, dynamic_p50 in runs:
        fp16 = record("tflite-fp16", precision="fp16", p50=fp16_p50, size=2000)
        dynamic = record("tflite-dynamic", p50=dynamic_p50, size=1000)
        assert select_candidate([FP32, fp16, dynamic], budget=BUDGET).chosen == "tflite-dynamic"
    # Without the tolerance, the same measurements flip the choice with the noise.
    strict = Budget(speed_tolerance=0.0)
    chosen = set()
    for fp16_p50, dynamic_p50 in runs:
        fp16 = record("tflite-fp16", precision="fp16", p50=fp16_p50, size=2000)
        dynamic = record("tflite-dynamic", p50=dynamic_p50, size=1000)
        chosen.add(select_candidate([FP32, fp16, dynamic], budget=strict).chosen)
    assert chosen == {"tflite-fp16", "tflite-dynamic", "onnx-fp32"}


def test_slower_at_batch_n_is_slower():
    fp32 = record(
        "onnx-fp32", precision="fp32", p50=1.0, size=4000, reference=True, bn_per_sample=0.5
    )
    # Faster at batch 1 but 1.4x slower per sample at batch 32: not shipped by auto.
    int8 = record("tflite-int8", p50=0.9, size=1000, bn_per_sample=0.7)
    selection = select_candidate([fp32, int8], budget=BUDGET)
    assert selection.fallback
    (verdict,) = selection.verdicts
    assert not verdict.not_slower and verdict.speedup_bn == pytest.approx(0.5 / 0.7)
    assert "slower than fp32 at batch 32" in verdict.reasons[0]
    with pytest.raises(SlowerThanReference, match="at batch 32"):
        select_candidate([fp32, int8], budget=BUDGET, mode="explicit")
    # Within the tolerance at batch N, and faster at batch 1: chosen.
    ok = record("tflite-int8", p50=0.9, size=1000, bn_per_sample=0.52)
    assert select_candidate([fp32, ok], budget=BUDGET).chosen == "tflite-int8"
    # Not timed at batch N (None): judged on batch 1 alone.
    untimed = record("tflite-int8", p50=0.9, size=1000)
    assert select_candidate([fp32, untimed], budget=BUDGET).chosen == "tflite-int8"


def test_refused_before_batch_n_names_what_cannot_win():
    slow = record("slow", p50=1.5)
    inaccurate = record("inaccurate", accuracy=0.80, p50=0.5)
    good = record("good", p50=0.5)
    refused = refused_before_batch_n([FP32, slow, inaccurate, good], budget=BUDGET)
    assert set(refused) == {"slow", "inaccurate"}
    assert "slower than fp32 at batch 1" in refused["slow"]
    assert "accuracy drop 0.1500" in refused["inaccurate"]


def test_auto_falls_back_to_fp32_with_reasons():
    bad = record("onnx-int8-qdq", accuracy=0.90, p50=0.5)
    selection = select_candidate([FP32, bad], budget=BUDGET)
    assert selection.chosen == "onnx-fp32" and selection.fallback
    assert any("accuracy drop 0.0500 exceeds budget 0.0100" in w for w in selection.warnings)
    assert selection.to_dict()["fallback"] is True


def test_explicit_budget_exceeded_says_by_how_much_and_where():
    layers = (
        LayerError("conv1+relu1", "Conv+Relu", "r1", 0.2, 14.0, 0.18),
        LayerError("fc", "Gemm", "logits", 0.25, 12.0, 0.05),
    )
    bad = record("onnx-int8-qdq", accuracy=0.90, p50=0.5, layers=layers)
    report = {"candidates": ["..."]}
    with pytest.raises(BudgetExceeded) as err:
        select_candidate([FP32, bad], budget=BUDGET, mode="explicit", report=report)
    message = str(err.value)
    assert "accuracy drop 0.0500 exceeds the budget 0.0100 by 0.0400" in message
    assert "accuracy 0.9000 vs fp32 0.9500" in message
    assert "conv1+relu1 (Conv+Relu" in message
    assert err.value.drop == pytest.approx(0.05)
    assert err.value.excess == pytest.approx(0.04)
    assert err.value.report == report
    assert err.value.worst_layers[0]["node"] == "conv1+relu1"
    assert err.value.reason == "budget-exceeded"


def test_explicit_within_budget_but_slower():
    slow = record("onnx-int8-qdq", accuracy=0.95, p50=2.0)
    with pytest.raises(SlowerThanReference, match=r"2\.00x slower than fp32") as err:
        select_candidate([FP32, slow], budget=BUDGET, mode="explicit")
    assert err.value.slowdown == pytest.approx(2.0)
    selection = select_candidate([FP32, slow], budget=BUDGET, mode="explicit", allow_slower=True)
    assert selection.chosen == "onnx-int8-qdq"
    assert "slower than fp32" in selection.warnings[0]


def test_explicit_success_and_none_mode():
    good = record("onnx-int8-qdq", accuracy=0.96, p50=0.5)  # better than fp32: negative drop
    selection = select_candidate([FP32, good], budget=BUDGET, mode="explicit")
    assert selection.chosen == "onnx-int8-qdq" and selection.verdicts[0].drop < 0
    only_reference = select_candidate([FP32], budget=BUDGET, mode="explicit")
    assert only_reference.chosen == "onnx-fp32" and not only_reference.fallback


def test_without_labels_top1_agreement_is_the_metric():
    ref = record("ref", precision="fp32", accuracy=None, reference=True)
    close = record("close", accuracy=None, agreement=0.995, p50=0.5)
    far = record("far", accuracy=None, agreement=0.97, p50=0.4)
    verdicts = evaluate_candidates([ref, close, far], budget=BUDGET)
    assert [(v.metric, v.within_budget) for v in verdicts] == [
        ("top1_agreement", True),
        ("top1_agreement", False),
    ]
    assert quality_drop(close, ref) == pytest.approx((0.005, "top1_agreement"))
    assert select_candidate([ref, close, far], budget=BUDGET).chosen == "close"


def test_unmeasured_quality_is_never_within_budget():
    ref = record("ref", precision="fp32", reference=True)
    blind = Measurement(
        recipe="blind",
        precision="int8",
        path="x",
        file_size_bytes=1,
        latency_b1=LatencyStats(1, "batched", 0.1, 0.1, 0.1, 10),
        latency_bn=None,
        quality=None,
    )
    (verdict,) = evaluate_candidates([ref, blind], budget=BUDGET)
    assert not verdict.within_budget and verdict.drop is None
    with pytest.raises(BudgetExceeded, match="could not be measured"):
        select_candidate([ref, blind], budget=BUDGET, mode="explicit")


def test_budget_and_reference_validation():
    with pytest.raises(BadOption):
        Budget(max_accuracy_drop=-0.1)
    with pytest.raises(BadOption):
        Budget(max_slowdown=-1)
    with pytest.raises(BadOption, match="speed_tolerance"):
        Budget(speed_tolerance=-0.01)
    with pytest.raises(BadOption, match="exactly one fp32 reference"):
        select_candidate([record("a"), record("b")], budget=BUDGET)
