"""``convert_tflite``: Keras / SavedModel in, measured and selected TFLite model out.

The same steps as :func:`converters.convert_onnx`, with TFLite's tools: prepare the source (a
SavedModel and its signature) -> build the fp32 TFLite reference -> open calibration/validation
data against the reference's float inputs -> run the requested recipes -> measure every
candidate with the real interpreter -> select under the budget -> golden set (computed by the
device agent's runtime) and baseline statistics for the chosen model -> one JSON-ready report,
returned as the same :class:`~converters.pipeline.ConversionResult`.

Two things are particular to TFLite:

* **Fallback recipes.** int16x8 activations rescue models whose activation ranges int8 cannot
  resolve, but its kernels are slow on most CPUs. It is built only when every full-int8
  candidate failed or missed the budget; then all candidates are measured again together, so
  that the latencies compared come from the same interleaved rounds.
* **All or nothing in ``out_dir``.** A failed conversion removes every file it wrote there
  (``model.tflite`` is written last, atomically). Only the policy refusals
  (:class:`~converters.errors.BudgetExceeded`, ``SlowerThanReference``) keep the measured
  candidates under ``out_dir/candidates/``: they are complete models the user may inspect.

Nothing is printed: TensorFlow's output is captured (see :mod:`converters.tflite_source`);
progress goes to the optional callback, warnings into the result and the report.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
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
    SampleStream,
    load_labels,
)
from .errors import (
    BadOption,
    BudgetExceeded,
    CalibrationDataError,
    ConvertError,
    RecipeFailed,
    SlowerThanReference,
    UnsupportedModel,
)
from .golden import build_golden_tflite
from .measure import MeasureConfig, measure_candidates
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
    Recipe,
    TfliteFp32Recipe,
    TfliteInt8Recipe,
    recipes_for,
    registered_recipes,
)
from .runtime import RUNTIME_TFLITE, TfliteRunner
from .select import Budget, evaluate_candidates, refused_before_batch_n, select_candidate
from .tflite_source import PreparedSource, prepare_source

__all__ = ["MODEL_FILENAME", "convert_tflite"]

RUNTIME = RUNTIME_TFLITE
MODEL_FILENAME = "model.tflite"
DEFAULT_MAX_VALIDATION_SAMPLES = 1000


def _source_digest(source: PreparedSource) -> tuple[str, int]:
    """sha256 and size of the source: the file, or every file of a SavedModel directory."""
    if source.path.is_file():
        return sha256_file(source.path), source.path.stat().st_size
    digest = hashlib.sha256()
    size = 0
    for file in sorted(p for p in source.path.rglob("*") if p.is_file()):
        rel = file.relative_to(source.path).as_posix()
        digest.update(rel.encode() + b"\0" + sha256_file(file).encode() + b"\n")
        size += file.stat().st_size
    return digest.hexdigest(), size


def _machine(runner: TfliteRunner) -> dict[str, Any]:
    from .tflite_source import import_tensorflow

    return machine_info(
        tensorflow=str(import_tensorflow().__version__),
        tflite_interpreter=f"{runner.library} {runner.library_version}",
    )


def _recipe_options(
    options: Mapping[str, Mapping[str, Any]] | None, io_dtype: str | None
) -> dict[str, dict[str, Any]]:
    """``recipe_options`` with ``io_dtype`` (the CLI's ``--io-dtype``) folded into tflite-int8."""
    merged = {name: dict(values) for name, values in (options or {}).items()}
    if io_dtype is not None:
        if io_dtype not in ("int8", "float"):
            raise BadOption(f"io_dtype must be 'int8' or 'float', got {io_dtype!r}")
        int8 = merged.setdefault(TfliteInt8Recipe.name, {})
        if int8.get("io_dtype", io_dtype) != io_dtype:
            raise BadOption(
                f"io_dtype {io_dtype!r} contradicts recipe_options"
                f" {TfliteInt8Recipe.name}.io_dtype {int8['io_dtype']!r}"
            )
        int8["io_dtype"] = io_dtype
    return merged


def _split_fallbacks(
    selected: Sequence[type[Recipe[Any]]],
) -> tuple[list[type[Recipe[Any]]], list[type[Recipe[Any]]]]:
    """(recipes built up front, fallbacks deferred until their mode's recipes miss the budget)."""
    primary_modes = {c.mode for c in selected if not c.fallback}
    deferred = [c for c in selected if c.fallback and c.mode in primary_modes]
    return [c for c in selected if c not in deferred], deferred


class _Outputs:
    """What this call wrote under ``out_dir``, so that a failure can remove exactly that."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.created: list[Path] = []  # directories this call created, outermost first
        self.written: list[Path] = []  # candidate directories this call filled
        self.files: list[Path] = []  # files this call wrote directly under out_dir

    def mkdir(self, path: Path) -> Path:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))
        return path

    def candidate_dir(self, recipe: str) -> Path:
        path = self.out / "candidates" / recipe
        if path.exists():  # a previous conversion's candidate: replaced, never mixed
            shutil.rmtree(path)
        self.mkdir(path)
        self.written.append(path)
        return path

    def remove(self) -> None:
        for file in self.files:
            file.unlink(missing_ok=True)
        for path in self.written:
            shutil.rmtree(path, ignore_errors=True)
        for path in reversed(self.created):
            with contextlib.suppress(OSError):  # only when empty: never what others wrote
                path.rmdir()


def _write_atomically(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _labels(
    labels: LabelSource | None, val: SampleStream | None, expected: int | None
) -> npt.NDArray[np.int64] | None:
    if labels is None:
        return None
    if val is None:
        raise CalibrationDataError("labels given without validation data")
    array = load_labels(labels)
    if expected is not None and array.shape[0] != expected:
        raise CalibrationDataError(
            f"labels: {array.shape[0]} labels for {expected} samples in"
            f" {val.description.split(' (')[0]} (one label per sample, same order)"
        )
    return array


def convert_tflite(
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
    io_dtype: Literal["int8", "float"] | None = None,
) -> ConversionResult:
    """Convert a Keras (``.keras``, ``.h5``) or SavedModel model to TFLite, measure, pick one.

    Options mean what they mean for :func:`~converters.convert_onnx`. ``quantize``: ``none``
    (fp32), ``fp16``, ``dynamic`` (dynamic range), ``int8`` (full int8, with int16x8 as the
    fallback when int8 misses the budget), ``auto`` (all of them, the fallback likewise) or a
    recipe name (``tflite-int16x8`` builds int16x8 unconditionally). Data is fed as the model's
    float inputs, named by the model's signature keys, at most ``max_samples`` (300) of it
    calibrating. ``io_dtype`` sets the input/output type of the full-int8 model (``int8``, the
    default, or ``float``); it is the same as ``recipe_options={"tflite-int8": {"io_dtype":
    ...}}``.

    Writes ``out_dir/model.tflite`` and ``out_dir/candidates/<recipe>/model.tflite``. Raises
    the :class:`~converters.errors.ConvertError` subclasses of ``convert_onnx``; on any of them
    the files written under ``out_dir`` are removed again, except that ``BudgetExceeded`` and
    ``SlowerThanReference`` keep the measured candidates.
    """
    src = Path(model_path)
    out = Path(out_dir)
    options = _recipe_options(recipe_options, io_dtype)
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
    mode: Literal["auto", "explicit"] = "auto" if quantize == "auto" else "explicit"
    selected = [c for c in recipes_for(RUNTIME, quantize) if c is not TfliteFp32Recipe]
    upfront_classes, deferred_classes = _split_fallbacks(selected)
    reference_recipe = build_configured(TfliteFp32Recipe, options)
    upfront = [build_configured(c, options) for c in upfront_classes]
    deferred = [build_configured(c, options) for c in deferred_classes]

    # 1. The model (nothing is written before it is known to be a model).
    source = prepare_source(src)

    outputs = _Outputs(out)
    try:
        return _convert(
            source,
            outputs,
            reference_recipe=reference_recipe,
            upfront=upfront,
            deferred=deferred,
            quantize=quantize,
            mode=mode,
            calibration=calibration,
            validation=validation,
            labels=labels,
            budget=budget,
            cfg=cfg,
            allow_slower=allow_slower,
            max_samples=max_samples,
            max_validation_samples=max_validation_samples,
            validation_fraction=validation_fraction,
            image=image,
            csv_options=csv_options,
            golden_samples=golden_samples,
            seed=seed,
            progress=progress,
        )
    except (BudgetExceeded, SlowerThanReference):
        raise  # complete, measured candidates: kept for inspection
    except BaseException:
        outputs.remove()
        raise


def _run_recipes(
    recipes: Sequence[Recipe[Any]],
    src: Path,
    outputs: _Outputs,
    cal: SampleStream | None,
    *,
    mode: Literal["auto", "explicit"],
    progress: ProgressCallback | None,
    done: int,
    total: int,
    failures: list[dict[str, str]],
    warnings: list[str],
) -> list[CandidateModel]:
    """Run ``recipes``; in ``auto`` a failing recipe is recorded and skipped."""
    made: list[CandidateModel] = []
    for i, recipe in enumerate(recipes, start=done):
        report(progress, Progress("recipe", recipe.name, i, total))
        calib = ReportingFactory(cal, recipe.name, progress) if cal is not None else None
        try:
            made.append(recipe.run(src, outputs.candidate_dir(recipe.name), calib))
        except (BadOption, CalibrationDataError, UnsupportedModel):
            raise
        except Exception as exc:
            if mode == "explicit":
                if isinstance(exc, ConvertError):
                    raise
                raise RecipeFailed(
                    f"{recipe.name}: {type(exc).__name__}: {exc}", recipe=recipe.name
                ) from exc
            error = f"{exc}" if isinstance(exc, ConvertError) else f"{type(exc).__name__}: {exc}"
            failures.append({"recipe": recipe.name, "error": error})
            warnings.append(f"{recipe.name} failed and was skipped: {error}")
    return made


def _convert(
    source: PreparedSource,
    outputs: _Outputs,
    *,
    reference_recipe: Recipe[Any],
    upfront: Sequence[Recipe[Any]],
    deferred: Sequence[Recipe[Any]],
    quantize: str,
    mode: Literal["auto", "explicit"],
    calibration: DataSource | None,
    validation: DataSource | None,
    labels: LabelSource | None,
    budget: Budget,
    cfg: MeasureConfig,
    allow_slower: bool,
    max_samples: int,
    max_validation_samples: int,
    validation_fraction: float,
    image: ImageOptions | None,
    csv_options: CsvOptions | None,
    golden_samples: int,
    seed: int,
    progress: ProgressCallback | None,
) -> ConversionResult:
    src, out = source.path, outputs.out
    total = 1 + len(upfront)

    # 2. The fp32 reference: it defines the float inputs the data must match.
    report(progress, Progress("recipe", reference_recipe.name, 0, total))
    reference = reference_recipe.run(src, outputs.candidate_dir(reference_recipe.name), None)
    runner = TfliteRunner(reference.path, threads=cfg.threads)
    spec = runner.spec

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
        need_calibration=any(r.needs_calibration for r in (*upfront, *deferred)),
    )
    expected_labels = data_info.pop("labelled_source_length", None)
    if val is None and upfront:
        raise CalibrationDataError(
            f"--quantize {quantize} needs calibration or validation data to measure what"
            " quantization costs (only --quantize none works without data)"
        )
    label_array = _labels(labels, val, expected_labels)
    data_info["labels"] = None if label_array is None else int(label_array.shape[0])
    warnings: list[str] = []
    failures: list[dict[str, str]] = []

    # 4. Candidates, 5. measurement.
    made = _run_recipes(
        upfront,
        src,
        outputs,
        cal,
        mode=mode,
        progress=progress,
        done=1,
        total=total,
        failures=failures,
        warnings=warnings,
    )
    report(progress, Progress("recipe", "done", total, total))
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

    # 5b. Fallbacks, for modes whose recipes all failed or missed the budget.
    fallback_info: list[dict[str, Any]] = []
    if deferred:
        modes = {c.recipe: c.mode for c in made}
        good = {
            modes[v.recipe]
            for v in evaluate_candidates(measurements, budget=budget)
            if v.within_budget
        }
        needed = [r for r in deferred if r.mode not in good]
        for r in deferred:
            fallback_info.append(
                {
                    "recipe": r.name,
                    "built": r in needed,
                    "reason": f"no {r.mode} candidate within the budget"
                    if r in needed
                    else f"a {r.mode} candidate is within the budget",
                }
            )
        if needed:
            more = _run_recipes(
                needed,
                src,
                outputs,
                cal,
                mode=mode,
                progress=progress,
                done=total,
                total=total + len(needed),
                failures=failures,
                warnings=warnings,
            )
            if more:
                made += more
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

    # 6. Report (before selection, so that selection errors carry it) and selection.
    verdicts = {v.recipe: v for v in evaluate_candidates(measurements, budget=budget)}
    by_recipe = {c.recipe: c for c in (reference, *made)}
    sha, size = _source_digest(source)
    report_dict: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "runtime": RUNTIME,
        "quantize": quantize,
        "source": {
            "path": str(src),
            "kind": source.kind,
            "signature": source.signature_key,
            "sha256": sha,
            "size_bytes": size,
            **spec.to_dict(),
        },
        "data": data_info,
        "budget": budget.to_dict(),
        "measure": cfg.to_dict(),
        "machine": _machine(runner),
        "candidates": [
            {
                **by_recipe[m.recipe].to_dict(),
                "io_dtypes": TfliteRunner(m.path).io_dtypes,
                "measurement": m.to_dict(),
                "verdict": verdicts[m.recipe].to_dict() if m.recipe in verdicts else None,
            }
            for m in measurements
        ],
        "fallbacks": fallback_info,
        "failed": failures,
    }
    selection = select_candidate(
        measurements, budget=budget, mode=mode, allow_slower=allow_slower, report=report_dict
    )
    warnings.extend(selection.warnings)
    chosen = by_recipe[selection.chosen]
    final_path = out / MODEL_FILENAME
    _write_atomically(chosen.path, final_path)
    outputs.files.append(final_path)

    # 7. Golden set (by the device agent's runtime) and baseline statistics.
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
        build_golden=build_golden_tflite,
        runtime=RUNTIME,
        progress=progress,
    )
