"""``convert_onnx``: ONNX model in, measured and selected ONNX Runtime model out.

Steps: validate the model -> open calibration/validation data (split one source if only one is
given) -> run the fp32 reference recipe and the requested recipes -> measure all of them on the
validation data with real sessions -> select under the budget -> golden set and baseline
statistics for the chosen model -> one JSON-ready report.

Nothing is printed; progress goes to the optional callback (see :mod:`converters.progress`),
warnings are returned in the result and the report.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .calibration import (
    DEFAULT_MAX_SAMPLES,
    CsvOptions,
    DataSource,
    ImageOptions,
    LabelSource,
    load_labels,
)
from .errors import BadOption, CalibrationDataError, ConvertError, RecipeFailed, UnsupportedModel
from .golden import build_golden
from .measure import MeasureConfig, measure_candidates
from .model_spec import read_model_spec
from .onnx_prep import check_onnx_model
from .pipeline import (
    REPORT_SCHEMA,
    ConversionResult,
    ReportingFactory,
    build_configured,
    finish_conversion,
    machine_info,
    open_data,
    sha256_file,
)
from .progress import Progress, ProgressCallback, report
from .recipes import (
    QUANTIZE_MODES,
    CandidateModel,
    OnnxFp32Recipe,
    recipes_for,
    registered_recipes,
)
from .runtime import make_session
from .select import Budget, evaluate_candidates, refused_before_batch_n, select_candidate

__all__ = [
    "REPORT_SCHEMA",
    "ConversionResult",
    "convert_onnx",
]

RUNTIME = "onnxruntime"
DEFAULT_MAX_VALIDATION_SAMPLES = 1000


def _machine() -> dict[str, Any]:
    import onnx
    import onnxruntime

    return machine_info(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__)


def convert_onnx(
    model_path: str | Path,
    *,
    out_dir: str | Path,
    quantize: str = "auto",
    calibration: DataSource | None = None,
    validation: DataSource | None = None,
    labels: LabelSource | None = None,
    max_accuracy_drop: float = 0.01,
    recipe_options: Mapping[str, Mapping[str, Any]] | None = None,
    measure: MeasureConfig | None = None,
    allow_slower: bool = False,
    prefer: Literal["latency", "size"] = "latency",
    speed_tolerance: float = 0.05,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_validation_samples: int = DEFAULT_MAX_VALIDATION_SAMPLES,
    validation_fraction: float = 0.25,
    image: ImageOptions | None = None,
    csv_options: CsvOptions | None = None,
    golden_samples: int = 8,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> ConversionResult:
    """Convert an ONNX model for ONNX Runtime, measure every candidate and pick one.

    ``quantize``: ``none`` (fp32 only), ``fp16``, ``dynamic``, ``int8`` (static QDQ), ``auto``
    (every registered ONNX recipe) or a recipe name. ``calibration`` / ``validation``: any
    :data:`~converters.calibration.DataSource` (``image`` / ``csv_options`` tune the image and
    CSV readers); at most ``max_samples`` calibrate and ``max_validation_samples`` validate. If
    only one source is given it is split deterministically (``validation_fraction``, ``seed``)
    when a selected recipe calibrates, and used whole for validation otherwise. ``labels``: one
    class index per sample of the validation source (or of the single source). ``recipe_options``
    maps a recipe name to its options, e.g. ``{"onnx-int8-qdq": {"exclude": ["conv1"]}}``.
    ``golden_samples`` validation samples form the golden set. ``prefer`` and
    ``speed_tolerance`` steer the choice (see :class:`~converters.select.Budget`); in ``auto``
    candidates already refused at batch 1 are not timed at batch N. Every session runs with
    :data:`~converters.runtime.ORT_DISABLED_OPTIMIZERS`, recorded as the result's
    ``runtime_hints`` for the bundle.

    Raises :class:`~converters.errors.BudgetExceeded` / ``SlowerThanReference`` in explicit
    modes (see :mod:`converters.select`), ``UnsupportedModel``, ``CalibrationDataError``,
    ``BadOption`` and ``RecipeFailed``; all are :class:`~converters.errors.ConvertError`.
    """
    src = Path(model_path)
    out = Path(out_dir)
    options = dict(recipe_options or {})
    cfg = measure or MeasureConfig()
    budget = Budget(
        max_accuracy_drop=max_accuracy_drop, prefer=prefer, speed_tolerance=speed_tolerance
    )
    if quantize not in QUANTIZE_MODES and quantize not in {c.name for c in registered_recipes()}:
        raise BadOption(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
    known = {c.name for c in registered_recipes(RUNTIME)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadOption(f"recipe_options for unknown recipe(s) {unknown} (known: {sorted(known)})")
    if golden_samples < 1:
        raise BadOption(f"golden_samples must be >= 1, got {golden_samples}")

    # 1. The model.
    check_onnx_model(src)
    spec = read_model_spec(src)
    try:
        make_session(src, threads=1)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UnsupportedModel(f"{src.name} does not load in onnxruntime: {first}") from exc

    # 2. Recipes.
    mode: Literal["auto", "explicit"] = "auto" if quantize == "auto" else "explicit"
    selected = [c for c in recipes_for(RUNTIME, quantize) if c is not OnnxFp32Recipe]
    reference_recipe = build_configured(OnnxFp32Recipe, options)
    candidate_recipes = [build_configured(c, options) for c in selected]

    # 3. Data.
    cal, val, data_info = open_data(
        spec,
        calibration,
        validation,
        max_samples=max_samples,
        max_validation_samples=max_validation_samples,
        validation_fraction=validation_fraction,
        seed=seed,
        image=image,
        csv_options=csv_options,
        need_calibration=any(r.needs_calibration for r in candidate_recipes),
    )
    expected_labels = data_info.pop("labelled_source_length", None)
    if val is None and candidate_recipes:
        raise CalibrationDataError(
            f"--quantize {quantize} needs calibration or validation data to measure what"
            " quantization costs (only --quantize none works without data)"
        )
    label_array: npt.NDArray[np.int64] | None = None
    if labels is not None:
        if val is None:
            raise CalibrationDataError("labels given without validation data")
        label_array = load_labels(labels)
        if expected_labels is not None and label_array.shape[0] != expected_labels:
            raise CalibrationDataError(
                f"labels: {label_array.shape[0]} labels for {expected_labels} samples in"
                f" {val.description.split(' (')[0]} (one label per sample, same order)"
            )
    data_info["labels"] = None if label_array is None else int(label_array.shape[0])
    warnings: list[str] = []

    # 4. Candidates.
    candidates_dir = out / "candidates"
    total = 1 + len(candidate_recipes)
    report(progress, Progress("recipe", reference_recipe.name, 0, total))
    reference = reference_recipe.run(src, candidates_dir / reference_recipe.name)
    made: list[CandidateModel] = []
    failures: list[dict[str, str]] = []
    for i, recipe in enumerate(candidate_recipes, start=1):
        report(progress, Progress("recipe", recipe.name, i, total))
        calib = ReportingFactory(cal, recipe.name, progress) if cal is not None else None
        try:
            made.append(recipe.run(src, candidates_dir / recipe.name, calib))
        except (BadOption, CalibrationDataError, UnsupportedModel):
            raise
        except Exception as exc:
            if mode == "explicit":
                if isinstance(exc, ConvertError):
                    raise
                raise RecipeFailed(
                    f"{recipe.name}: {type(exc).__name__}: {exc}", recipe=recipe.name
                ) from exc
            # auto: one broken recipe must not cost the user the others.
            error = f"{exc}" if isinstance(exc, ConvertError) else f"{type(exc).__name__}: {exc}"
            failures.append({"recipe": recipe.name, "error": error})
            warnings.append(f"{recipe.name} failed and was skipped: {error}")
    report(progress, Progress("recipe", "done", total, total))

    # 5. Measure.
    # auto never ships a candidate refused at batch 1: its batch-N timing is skipped.
    skip = functools.partial(refused_before_batch_n, budget=budget) if mode == "auto" else None
    measurements = measure_candidates(
        reference,
        made,
        val,
        labels=label_array,
        config=cfg,
        progress=progress,
        skip_batch_n=skip,
    )
    validated = measurements[0].quality.samples if measurements[0].quality else 0
    if validated and 1.0 / validated > budget.max_accuracy_drop and made:
        warnings.append(
            f"only {validated} validation samples: one changed prediction moves accuracy by"
            f" {1.0 / validated:.4f}, more than the budget {budget.max_accuracy_drop:.4f}"
        )

    # 6. Report (before selection, so that selection errors can carry it) and selection.
    verdicts = {v.recipe: v for v in evaluate_candidates(measurements, budget=budget)}
    by_recipe = {c.recipe: c for c in (reference, *made)}
    report_dict: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "runtime": RUNTIME,
        "quantize": quantize,
        "source": {
            "path": str(src),
            "sha256": sha256_file(src),
            "size_bytes": src.stat().st_size,
            **spec.to_dict(),
        },
        "data": data_info,
        "budget": budget.to_dict(),
        "measure": cfg.to_dict(),
        "machine": _machine(),
        "candidates": [
            {
                **by_recipe[m.recipe].to_dict(),
                "measurement": m.to_dict(),
                "verdict": verdicts[m.recipe].to_dict() if m.recipe in verdicts else None,
            }
            for m in measurements
        ],
        "failed": failures,
    }
    selection = select_candidate(
        measurements, budget=budget, mode=mode, allow_slower=allow_slower, report=report_dict
    )
    warnings.extend(selection.warnings)
    chosen = by_recipe[selection.chosen]
    out.mkdir(parents=True, exist_ok=True)
    final_path = out / "model.onnx"
    shutil.copyfile(chosen.path, final_path)

    # 7. Golden set and baseline statistics for the chosen model.
    return finish_conversion(
        final_path=final_path,
        chosen=chosen,
        selection=selection,
        reference=reference,
        made=made,
        measurements=measurements,
        report_dict=report_dict,
        warnings=warnings,
        spec=spec,
        cal=cal,
        val=val,
        golden_samples=golden_samples,
        seed=seed,
        threads=cfg.threads,
        primary_output=cfg.primary_output,
        build_golden=build_golden,
        runtime=RUNTIME,
        progress=progress,
    )
