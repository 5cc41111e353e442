"""Pieces every conversion pipeline shares: the result type, data opening, reporting helpers.

``convert_onnx`` and ``convert_tflite`` differ in how candidates are made and run, not in how
data is split, how recipes report calibration progress or what a result looks like: those live
here so that the CLI can treat both runtimes alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .baseline import BaselineStats
from .calibration import (
    CsvOptions,
    DataSource,
    ImageOptions,
    Sample,
    SampleStream,
    open_samples,
    split_stream,
)
from .golden import GoldenSet
from .measure import Measurement
from .model_spec import ModelSpec
from .progress import Progress, ProgressCallback, report
from .recipes import CandidateModel, Recipe, config_from_options
from .select import Selection

__all__ = [
    "REPORT_SCHEMA",
    "ConversionResult",
    "ReportingFactory",
    "build_configured",
    "machine_info",
    "open_data",
    "sha256_file",
]

REPORT_SCHEMA = "edgekit.convert.report/1"


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_onnx`` or ``convert_tflite`` produced (``report`` is JSON-ready)."""

    model_path: Path
    """The chosen model, copied to ``out_dir/model.onnx`` (``out_dir/model.tflite``)."""
    recipe: str
    precision: str
    selection: Selection
    candidates: tuple[CandidateModel, ...]
    measurements: tuple[Measurement, ...]
    golden: GoldenSet
    baseline: BaselineStats | None
    report: dict[str, Any]
    warnings: tuple[str, ...]
    runtime_hints: dict[str, Any] = field(default_factory=dict)
    """The runtime settings every measurement was taken with, for the bundle manifest's
    top-level ``runtime_hints`` field (see :func:`converters.runtime.runtime_hints`): a device
    that runs the model otherwise may see other latencies than the report's."""

    def write_artifacts(self, directory: str | Path) -> dict[str, Path]:
        """Write report.json, golden.npz and baseline.json (when present) for ``edgekit bundle``."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        paths = {
            "report": target / "report.json",
            "golden": self.golden.save(target / "golden.npz"),
        }
        paths["report"].write_text(json.dumps(self.report, indent=2, allow_nan=False) + "\n")
        if self.baseline is not None:
            paths["baseline"] = target / "baseline.json"
            paths["baseline"].write_text(json.dumps(self.baseline.to_dict(), indent=2) + "\n")
        return paths


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def machine_info(**versions: str) -> dict[str, Any]:
    """The measuring machine (CPU model, cores, OS, Python) plus the given library versions.

    Latencies only mean something together with the machine that produced them.
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "system": platform.system(),
        "python": sys.version.split()[0],
        **versions,
        "numpy": np.__version__,
    }


class ReportingFactory:
    """A calibration factory that reports each sample a recipe reads (stage ``calibrate``)."""

    def __init__(self, stream: SampleStream, label: str, progress: ProgressCallback | None) -> None:
        self._stream = stream
        self._label = label
        self._progress = progress
        self.length_hint = stream.length_hint

    def __call__(self) -> Iterator[Sample]:
        for i, sample in enumerate(self._stream(), start=1):
            report(self._progress, Progress("calibrate", self._label, i, self.length_hint))
            yield sample


def open_data(
    spec: ModelSpec,
    calibration: DataSource | None,
    validation: DataSource | None,
    *,
    max_samples: int,
    max_validation_samples: int,
    validation_fraction: float,
    seed: int,
    image: ImageOptions | None,
    csv_options: CsvOptions | None,
    need_calibration: bool,
) -> tuple[SampleStream | None, SampleStream | None, dict[str, Any]]:
    """Open the data; ``info["labelled_source_length"]`` is the length labels must have.

    A single source is split only when some recipe calibrates on data; otherwise all of it
    validates (no recipe has seen it, so nothing leaks).
    """
    info: dict[str, Any] = {}

    def whole(source: DataSource) -> SampleStream:
        return open_samples(source, spec, max_samples=None, image=image, csv_options=csv_options)

    if calibration is not None and validation is not None:
        cal = whole(calibration).take(max_samples)
        full_val = whole(validation)
        val = full_val.take(max_validation_samples)
        info["split"] = None
        info["labelled_source_length"] = full_val.length_hint
    elif calibration is not None or validation is not None:
        source = calibration if calibration is not None else validation
        assert source is not None
        everything = whole(source)
        info["labelled_source_length"] = everything.length_hint
        if not need_calibration:
            val = everything.take(max_validation_samples)
            info["split"] = None
            info["calibration"] = None
            info["validation"] = {"source": val.description, "samples": val.length_hint}
            return None, val, info
        cal, val = split_stream(
            everything,
            validation_fraction=validation_fraction,
            seed=seed,
            max_calibration=max_samples,
            max_validation=max_validation_samples,
        )
        info["split"] = {"validation_fraction": validation_fraction, "seed": seed}
    else:
        return None, None, {"split": None, "calibration": None, "validation": None}
    info["calibration"] = {"source": cal.description, "samples": cal.length_hint}
    info["validation"] = {"source": val.description, "samples": val.length_hint}
    return cal, val, info


def build_configured(
    cls: type[Recipe[Any]], options: Mapping[str, Mapping[str, Any]]
) -> Recipe[Any]:
    """Instantiate ``cls`` with its entry of ``recipe_options`` (if any)."""
    return cls(config_from_options(cls.config_type, options.get(cls.name)))


def finish_conversion(
    *,
    final_path: Path,
    chosen: CandidateModel,
    selection: Selection,
    reference: CandidateModel,
    made: Sequence[CandidateModel],
    measurements: Sequence[Measurement],
    report_dict: dict[str, Any],
    warnings: list[str],
    spec: ModelSpec,
    cal: Callable[[], Iterator[Sample]] | None,
    val: Callable[[], Iterator[Sample]] | None,
    golden_samples: int,
    seed: int,
    threads: int | None,
    primary_output: str | None,
    build_golden: Callable[..., GoldenSet],
    runtime: str,
    progress: ProgressCallback | None,
) -> ConversionResult:
    """Steps shared by every runtime once a variant is chosen: golden set, baseline, report.

    ``build_golden`` is the runtime's own builder, so the golden outputs are what the device's
    runtime computes.
    """
    import itertools

    from .baseline import compute_baseline
    from .runtime import runtime_hints, synthetic_sample

    report(progress, Progress("golden", chosen.recipe, 0, 1))
    if val is not None:
        golden_inputs: list[Sample] = list(itertools.islice(val(), golden_samples))
    else:
        golden_inputs = [synthetic_sample(spec, seed=seed + i) for i in range(golden_samples)]
    chosen_measurement = next(m for m in measurements if m.recipe == chosen.recipe)
    quant_error = (
        {o.name: o.max_abs for o in chosen_measurement.quality.outputs}
        if chosen_measurement.quality is not None
        else None
    )
    golden = build_golden(
        final_path, golden_inputs, threads=threads, quantization_error=quant_error
    )
    report(progress, Progress("golden", chosen.recipe, 1, 1))
    baseline: BaselineStats | None = None
    if val is not None:
        streams = [s for s in (cal, val) if s is not None]

        def all_data() -> Iterator[Sample]:
            for stream in streams:
                yield from stream()

        baseline = compute_baseline(
            final_path,
            all_data,
            spec=spec,
            primary=primary_output,
            threads=threads,
            progress=progress,
            runtime=runtime,
        )

    report_dict["selection"] = {
        **selection.to_dict(),
        "recipe": chosen.recipe,
        "precision": chosen.precision,
        "path": str(final_path),
        "sha256": sha256_file(final_path),
    }
    hints = runtime_hints(runtime)
    report_dict["runtime_hints"] = hints
    report_dict["golden"] = golden.to_dict()
    report_dict["baseline"] = None if baseline is None else {"samples": baseline.samples}
    report_dict["warnings"] = list(warnings)
    return ConversionResult(
        model_path=final_path,
        recipe=chosen.recipe,
        precision=chosen.precision,
        selection=selection,
        candidates=(reference, *made),
        measurements=tuple(measurements),
        golden=golden,
        baseline=baseline,
        report=report_dict,
        warnings=tuple(warnings),
        runtime_hints=hints,
    )
