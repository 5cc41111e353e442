"""Choose a candidate from measurements: within the accuracy budget, never slower than fp32.

Rules (pure logic on :class:`~converters.measure.Measurement` records, no model is run here):

1. **Quality drop** vs the fp32 reference: the absolute drop in accuracy when labels were given,
   otherwise ``1 - top1_agreement`` with fp32. A candidate is *within budget* when the drop is
   at most ``max_accuracy_drop``.
2. **Speed**: a reduced-precision candidate slower than fp32 at batch 1 (p50), or at batch N
   (per-sample p50, when both were measured), is never chosen: on CPUs int8 can be several
   times slower than fp32 (dynamic quantization of small CNNs is), and shipping a model that is
   both less accurate and slower helps nobody. The same rule applies to fp16, whose speed
   depends on hardware support the measuring machine may lack. *Slower* means slower by more
   than ``speed_tolerance`` (5%) plus the allowed ``max_slowdown`` (0): interleaved p50s of
   two equally fast models on a shared machine differ by a few per cent from run to run, and
   a zero-tolerance threshold put exactly such candidates (fp16 or dynamic-range models of the
   same speed as fp32) in and out of the running at random.
3. **Preference** among eligible candidates: ``latency`` (default) takes the fastest batch-1
   p50, and among those within ``speed_tolerance`` of it the smallest file (then the
   fastest); ``size`` takes the smallest file, breaking ties by latency. Sizes do not vary
   from run to run, so ties in speed resolve the same way every time.

Modes:

* ``auto``: when no reduced-precision candidate is eligible, fp32 is chosen and a warning says
  why each candidate was refused (``fallback = True``). Conversion still succeeds: fp32 is a
  valid, measured model, and refusing to ship anything would be worse than shipping it.
* ``explicit`` (the user asked for one mode, e.g. ``int8``): no silent fallback.
  :class:`~converters.errors.BudgetExceeded` when no requested candidate is within budget (the
  message says by how much and names the worst layers), and
  :class:`~converters.errors.SlowerThanReference` when it is within budget but slower than fp32,
  unless ``allow_slower`` (e.g. when the target device is not like the measuring machine).

:func:`refused_before_batch_n` applies rules 1 and 2 to batch-1 figures alone, so that
measurement can skip the (long) batch-N timing of candidates that cannot be chosen anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .errors import BadOption, BudgetExceeded, SlowerThanReference
from .measure import Measurement

__all__ = [
    "Budget",
    "Selection",
    "Verdict",
    "evaluate_candidates",
    "quality_drop",
    "refused_before_batch_n",
    "select_candidate",
]

_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What a candidate may cost compared with fp32."""

    max_accuracy_drop: float = 0.01
    """Absolute drop in accuracy (labels) or in top-1 agreement with fp32 (no labels)."""
    max_slowdown: float = 0.0
    """Allowed batch-1 p50 slowdown vs fp32 as a fraction (0.0: must not be slower at all)."""
    prefer: Literal["latency", "size"] = "latency"
    speed_tolerance: float = 0.05
    """Latencies within this fraction count as the same speed: for "not slower than fp32" and
    for "near the fastest" (where the smaller file then wins). 0 makes both comparisons
    strict, and the choice between equally fast candidates a matter of timing noise."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise BadOption(f"max_accuracy_drop must be in [0, 1], got {self.max_accuracy_drop}")
        if self.max_slowdown < 0.0:
            raise BadOption(f"max_slowdown must be >= 0, got {self.max_slowdown}")
        if not 0.0 <= self.speed_tolerance < 1.0:
            raise BadOption(f"speed_tolerance must be in [0, 1), got {self.speed_tolerance}")
        if self.prefer not in ("latency", "size"):
            raise BadOption(f"prefer must be 'latency' or 'size', got {self.prefer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """How one candidate fared against the budget."""

    recipe: str
    precision: str
    drop: float | None
    metric: str | None
    """``accuracy`` or ``top1_agreement``; ``None`` when quality was not measured."""
    within_budget: bool
    speedup: float
    """fp32 batch-1 p50 / candidate batch-1 p50 (above 1: faster than fp32)."""
    not_slower: bool
    """Not slower than fp32 (beyond the tolerance) at batch 1, nor at batch N when measured."""
    eligible: bool
    reasons: tuple[str, ...] = ()
    speedup_bn: float | None = None
    """fp32 / candidate per-sample p50 at batch N; ``None`` when either was not timed."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        for key in ("drop", "speedup", "speedup_bn"):
            if isinstance(data[key], float):
                data[key] = round(data[key], 6)
        return data


@dataclass(frozen=True)
class Selection:
    """The chosen candidate and why."""

    chosen: str
    mode: Literal["auto", "explicit"]
    fallback: bool
    verdicts: tuple[Verdict, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "mode": self.mode,
            "fallback": self.fallback,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "warnings": list(self.warnings),
        }


def quality_drop(candidate: Measurement, reference: Measurement) -> tuple[float, str] | None:
    """``(drop, metric)``: accuracy drop when both have accuracy, else ``1 - top1_agreement``.

    ``None`` when quality was not measured or the model has no class output.
    """
    cq, rq = candidate.quality, reference.quality
    if cq is None or rq is None:
        return None
    if cq.accuracy is not None and rq.accuracy is not None:
        return rq.accuracy - cq.accuracy, "accuracy"
    if cq.top1_agreement is not None:
        return 1.0 - cq.top1_agreement, "top1_agreement"
    return None


def _reference(measurements: Sequence[Measurement]) -> Measurement:
    refs = [m for m in measurements if m.reference]
    if len(refs) != 1:
        raise BadOption(f"selection needs exactly one fp32 reference, got {len(refs)}")
    return refs[0]


def evaluate_candidates(measurements: Sequence[Measurement], *, budget: Budget) -> list[Verdict]:
    """One verdict per non-reference measurement, in input order."""
    ref = _reference(measurements)
    ref_p50 = ref.latency_b1.p50_ms
    limit = 1.0 + budget.max_slowdown + budget.speed_tolerance
    verdicts: list[Verdict] = []
    for m in measurements:
        if m.reference:
            continue
        reasons: list[str] = []
        measured = quality_drop(m, ref)
        if measured is None:
            drop: float | None = None
            metric: str | None = None
            within = False
            reasons.append("quality not measured (no validation data or no class output)")
        else:
            drop, metric = measured
            within = drop <= budget.max_accuracy_drop + _EPS
            if not within:
                reasons.append(
                    f"{metric} drop {drop:.4f} exceeds budget {budget.max_accuracy_drop:.4f}"
                )
        p50 = m.latency_b1.p50_ms
        speedup = ref_p50 / p50 if p50 > 0 else 1e9
        not_slower = p50 <= ref_p50 * limit + _EPS
        if not not_slower:
            reasons.append(
                f"slower than fp32 at batch 1 (p50 {p50:.4f} ms vs {ref_p50:.4f} ms,"
                f" {1 / speedup:.2f}x)"
            )
        speedup_bn: float | None = None
        bn, ref_bn = m.latency_bn, ref.latency_bn
        if bn is not None and ref_bn is not None and bn.batch_size == ref_bn.batch_size:
            per, ref_per = bn.per_sample_p50_ms, ref_bn.per_sample_p50_ms
            speedup_bn = ref_per / per if per > 0 else 1e9
            if per > ref_per * limit + _EPS:
                not_slower = False
                reasons.append(
                    f"slower than fp32 at batch {bn.batch_size} ({per:.4f} vs {ref_per:.4f}"
                    f" ms per sample, {1 / speedup_bn:.2f}x)"
                )
        verdicts.append(
            Verdict(
                recipe=m.recipe,
                precision=m.precision,
                drop=drop,
                metric=metric,
                within_budget=within,
                speedup=speedup,
                not_slower=not_slower,
                eligible=within and not_slower,
                reasons=tuple(reasons),
                speedup_bn=speedup_bn,
            )
        )
    return verdicts


def refused_before_batch_n(
    measurements: Sequence[Measurement], *, budget: Budget
) -> dict[str, str]:
    """``{recipe: why}`` for candidates that no batch-N latency could make eligible.

    Called by measurement between the batch-1 and the batch-N timing (``latency_bn`` still
    ``None``): a candidate outside the accuracy budget or slower than fp32 at batch 1 is
    refused whatever it does at batch N, so timing it there (minutes for a slow candidate on a
    ResNet-sized model) would only delay the conversion.
    """
    return {
        v.recipe: "; ".join(v.reasons)
        for v in evaluate_candidates(measurements, budget=budget)
        if not v.eligible
    }


def _prefer(pool: Sequence[Measurement], budget: Budget) -> Measurement:
    if budget.prefer == "size":
        return min(pool, key=lambda m: (m.file_size_bytes, m.latency_b1.p50_ms))
    fastest = min(m.latency_b1.p50_ms for m in pool)
    near = [m for m in pool if m.latency_b1.p50_ms <= fastest * (1.0 + budget.speed_tolerance)]
    return min(near, key=lambda m: (m.file_size_bytes, m.latency_b1.p50_ms))


def _layers_text(m: Measurement, count: int = 3) -> str:
    worst = [layer for layer in m.layers if layer.added_error > 0][:count]
    if not worst:
        return ""
    parts = [f"{w.node} ({w.op_type}, rel. error +{w.added_error:.3f})" for w in worst]
    # TFLite layers come from the QuantizationDebugger (they carry rmse/scale); TFLite recipes
    # have no exclude option, int16x8 activations are their remedy.
    tflite = any(w.rmse_over_scale is not None for w in worst)
    hint = "(int16x8 activations may recover them)" if tflite else "(try exclude=...)"
    return "; worst layers: " + ", ".join(parts) + " " + hint


def select_candidate(
    measurements: Sequence[Measurement],
    *,
    budget: Budget,
    mode: Literal["auto", "explicit"] = "auto",
    allow_slower: bool = False,
    report: Mapping[str, Any] | None = None,
) -> Selection:
    """Pick the candidate to ship (see module docs for the rules). ``report`` rides on errors."""
    ref = _reference(measurements)
    by_name = {m.recipe: m for m in measurements}
    verdicts = evaluate_candidates(measurements, budget=budget)
    if not verdicts:  # --quantize none: the reference is the answer
        return Selection(chosen=ref.recipe, mode=mode, fallback=False, verdicts=())
    if mode == "explicit":
        return _select_explicit(ref, by_name, verdicts, budget, allow_slower, report or {})
    eligible = [by_name[v.recipe] for v in verdicts if v.eligible]
    if eligible:
        chosen = _prefer(eligible, budget)
        return Selection(chosen=chosen.recipe, mode=mode, fallback=False, verdicts=tuple(verdicts))
    warnings = [f"no quantized candidate qualified; shipping fp32 ({ref.recipe})"]
    warnings += [f"{v.recipe}: {'; '.join(v.reasons)}" for v in verdicts]
    return Selection(
        chosen=ref.recipe,
        mode=mode,
        fallback=True,
        verdicts=tuple(verdicts),
        warnings=tuple(warnings),
    )


def _select_explicit(
    ref: Measurement,
    by_name: Mapping[str, Measurement],
    verdicts: Sequence[Verdict],
    budget: Budget,
    allow_slower: bool,
    report: Mapping[str, Any],
) -> Selection:
    within = [v for v in verdicts if v.within_budget]
    if not within:
        measured = [v for v in verdicts if v.drop is not None]
        if not measured:
            raise BudgetExceeded(
                f"{', '.join(v.recipe for v in verdicts)}: quality could not be measured"
                " (validation data with a class output is needed to check the budget)",
                report=report,
                drop=float("nan"),
                budget=budget.max_accuracy_drop,
            )
        best = min(measured, key=lambda v: v.drop if v.drop is not None else float("inf"))
        assert best.drop is not None
        m = by_name[best.recipe]
        detail = ""
        if best.metric == "accuracy" and m.quality and ref.quality:
            detail = f" (accuracy {m.quality.accuracy:.4f} vs fp32 {ref.quality.accuracy:.4f})"
        elif m.quality and m.quality.top1_agreement is not None:
            detail = f" (top-1 agreement with fp32 {m.quality.top1_agreement:.4f})"
        raise BudgetExceeded(
            f"{best.recipe}: {best.metric} drop {best.drop:.4f} exceeds the budget"
            f" {budget.max_accuracy_drop:.4f} by {best.drop - budget.max_accuracy_drop:.4f}"
            f"{detail}{_layers_text(m)}",
            report=report,
            drop=best.drop,
            budget=budget.max_accuracy_drop,
            worst_layers=[layer.to_dict() for layer in m.layers],
        )
    usable = within if allow_slower else [v for v in within if v.not_slower]
    if not usable:
        fastest = max(within, key=lambda v: v.speedup)
        slowdown = max(1 / fastest.speedup, 1 / (fastest.speedup_bn or fastest.speedup))
        why = "; ".join(r for r in fastest.reasons if r.startswith("slower than fp32"))
        raise SlowerThanReference(
            f"{fastest.recipe} is within the accuracy budget but {slowdown:.2f}x slower than"
            f" fp32 on this machine: {why}; allow_slower to ship it anyway",
            report=report,
            slowdown=slowdown,
        )
    chosen = _prefer([by_name[v.recipe] for v in usable], budget)
    warnings: tuple[str, ...] = ()
    verdict = next(v for v in usable if v.recipe == chosen.recipe)
    if not verdict.not_slower:
        why = "; ".join(r for r in verdict.reasons if r.startswith("slower than fp32"))
        warnings = (f"{chosen.recipe} is {why} on this machine (allowed by allow_slower)",)
    return Selection(
        chosen=chosen.recipe,
        mode="explicit",
        fallback=False,
        verdicts=tuple(verdicts),
        warnings=warnings,
    )
