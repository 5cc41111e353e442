"""``edgekit convert``: convert, quantize, measure, gate on accuracy, and sign one bundle.

Everything is produced in a private work directory; the only output that appears is the signed
bundle (atomically) and, when asked, the HTML report. A refused conversion leaves nothing.

Exit codes: 0 signed; 1 the accuracy/speed gate refused every allowed variant; 2 bad input
(model, data, options, keys).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgekit.cli._common import PASSPHRASE_ENV, NonNegativeInt, passphrase_provider
from edgekit.errors import EdgekitError
from edgekit.keys import load_signing_key

__all__ = ["convert"]

_FILE = click.Path(exists=True, path_type=Path)
_QUANTIZE = click.Choice(["none", "fp16", "dynamic", "int8", "auto"], case_sensitive=False)


class _BadInput(click.ClickException):
    """Bad model, data, options or keys: one line, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Refused(_BadInput):
    """The accuracy/speed gate refused every allowed variant: exit status 1."""

    exit_code = 1


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Any]:
    """Map converters' progress events onto rich progress bars, one per stage and label."""
    if not enabled:
        yield None
        return
    bars = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[tuple[str, str], Any] = {}

    def on_event(event: Any) -> None:
        key = (event.stage, event.label)
        if key not in tasks:
            tasks[key] = bars.add_task(f"{event.stage} {event.label}"[:34], total=event.total)
        bars.update(tasks[key], completed=event.completed, total=event.total)

    with bars:
        yield on_event


def _table(report: dict[str, Any]) -> Table:
    chosen = (report.get("selection") or {}).get("chosen")
    table = Table(title="variants (measured on this machine)", title_justify="left")
    for header in (
        "variant",
        "size",
        "accuracy",
        "agree",
        "drop",
        "max|err|",
        "cosine",
        "b1 p50 ms",
        "b1 p95 ms",
        "bN ms/sample",
        "mem MiB",
        "verdict",
    ):
        table.add_column(header, justify="left" if header in ("variant", "verdict") else "right")
    for candidate in report.get("candidates") or []:
        m = candidate.get("measurement") or {}
        verdict = candidate.get("verdict") or {}
        quality = m.get("quality") or {}
        b1 = (m.get("latency") or {}).get("batch_1") or {}
        bn = (m.get("latency") or {}).get("batch_n") or {}
        memory = (m.get("memory") or {}).get("peak_rss_delta_bytes")

        def num(value: Any, fmt: str = "{:.4g}") -> str:
            return "-" if not isinstance(value, (int, float)) else fmt.format(value)

        status = (
            "reference"
            if m.get("reference")
            else ("ok" if verdict.get("eligible") else "; ".join(verdict.get("reasons") or ["-"]))
        )
        recipe = str(m.get("recipe", "?"))
        name = f"[bold green]{escape(recipe)} *[/]" if recipe == chosen else escape(recipe)
        table.add_row(
            name,
            f"{(m.get('file_size_bytes') or 0) / 1024:.1f} KiB",
            num(quality.get("accuracy")),
            num(quality.get("top1_agreement")),
            num(verdict.get("drop")),
            num(quality.get("max_abs_error")),
            num(quality.get("cosine")),
            num(b1.get("p50_ms"), "{:.3f}"),
            num(b1.get("p95_ms"), "{:.3f}"),
            num(bn.get("per_sample_p50_ms"), "{:.4f}"),
            num(memory / 2**20 if isinstance(memory, int) else None, "{:.1f}"),
            escape(status),
        )
    return table


@click.command()
@click.argument("model", type=_FILE)
@click.option(
    "--runtime",
    type=click.Choice(["onnx", "tflite"], case_sensitive=False),
    default="onnx",
    show_default=True,
    help="Target runtime on the device.",
)
@click.option(
    "--quantize",
    type=_QUANTIZE,
    default="auto",
    show_default=True,
    help="none: fp32 only; fp16; dynamic: int8 weights; int8: static int8 with "
    "calibration; auto: try every recipe, keep the best within the budget.",
)
@click.option(
    "--calibration",
    type=_FILE,
    help="Calibration data: .npy, .npz (one array per input), a folder of images or "
    ".csv. At most --max-samples samples are used.",
)
@click.option(
    "--validation",
    type=_FILE,
    help="Validation inputs (same formats). Default: a held-out part of --calibration.",
)
@click.option("--labels", type=_FILE, help="Class labels for --validation (.npy, .csv, .txt).")
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0.0),
    default=0.01,
    show_default=True,
    help="Absolute accuracy drop allowed (on labels; else on top-1 agreement with fp32).",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="Static int8 range estimation (ONNX).",
)
@click.option(
    "--exclude", multiple=True, help="Node name or op type to keep in float (ONNX); repeat."
)
@click.option(
    "--float-stem/--no-float-stem",
    default=True,
    show_default=True,
    help="Static int8 (ONNX): keep float the first convolution when its input has at most 3 "
    "channels and channels x kernel area <= 75 (grayscale/RGB stems up to 5x5, not ResNet's "
    "7x7 RGB stem): ONNX Runtime runs it faster "
    "in float (the digits CNN: int8 1.13x of fp32 at batch 32 with it quantized, 0.71x "
    "without). The bundle then asks devices to run with QDQPropagationTransformer disabled "
    "(manifest runtime_hints), as it was measured.",
)
@click.option(
    "--io-dtype",
    type=click.Choice(["int8", "float"]),
    default="int8",
    show_default=True,
    help="Full-int8 TFLite models: input/output tensor type. int8 keeps conversion ops out "
    "of the graph (the agent quantizes float requests either way); float suits other "
    "consumers of the .tflite file.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Calibration samples used at most.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Batch size of the batch-N latency measurement.",
)
@click.option(
    "--allow-slower",
    is_flag=True,
    help="Allow an explicitly requested quantized variant slower than fp32.",
)
@click.option(
    "--key",
    "key_files",
    multiple=True,
    required=True,
    type=_FILE,
    help="Private key to sign with; repeat for several signatures.",
)
@click.option("--name", required=True, help="Bundle name, e.g. digits.")
@click.option(
    "--version", "version", type=NonNegativeInt(), required=True, help="Monotonic integer version."
)
@click.option("--display-version", help="Human version string, e.g. 1.4.0.")
@click.option(
    "--passphrase-env", metavar="VAR", help=f"Passphrase variable (default {PASSPHRASE_ENV})."
)
@click.option(
    "--report",
    "html_report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write an HTML report (table and latency/accuracy chart).",
)
@click.option(
    "--json-report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write report.json here (it is always inside the bundle).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The signed bundle to write, e.g. digits-3.ekb.",
)
def convert(
    model: Path,
    runtime: str,
    quantize: str,
    calibration: Path | None,
    validation: Path | None,
    labels: Path | None,
    max_accuracy_drop: float,
    calibration_method: str,
    exclude: tuple[str, ...],
    float_stem: bool,
    io_dtype: str,
    max_samples: int,
    batch_size: int,
    allow_slower: bool,
    key_files: tuple[Path, ...],
    name: str,
    version: int,
    display_version: str | None,
    passphrase_env: str | None,
    html_report: Path | None,
    json_report: Path | None,
    no_progress: bool,
    output: Path,
) -> None:
    """Convert MODEL, measure every variant against fp32, and sign the best into a bundle.

    \b
    Example (static int8 for ONNX Runtime, at most 1 point of accuracy lost):
      edgekit convert model.onnx --runtime onnx --quantize int8 \\
          --calibration calib.npy --validation X.npy --labels y.npy \\
          --max-accuracy-drop 0.01 --key keys/release.key --name digits --version 3 \\
          -o digits-3.ekb --report digits-3.html

    The bundle holds the chosen model, golden.npz (inputs, outputs and tolerances for the
    device's self-test), baseline.json (statistics for drift detection) and report.json.
    Nothing is written when the gate refuses (exit 1) or the input is bad (exit 2).
    """
    console = Console(stderr=True)
    if not output.parent.is_dir():
        raise _BadInput(f"output directory {output.parent} does not exist")
    try:
        # Keys first: a missing or locked key should fail before minutes of measuring.
        provider = passphrase_provider(passphrase_env)
        signers = [load_signing_key(path, passphrase=provider) for path in key_files]
    except EdgekitError as exc:
        raise _BadInput(exc.message) from None

    try:
        import converters
        from converters.errors import BudgetExceeded, ConvertError, SlowerThanReference
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise _BadInput(
            f"edgekit convert needs the convert extra: pip install 'edgekit[convert]' ({exc})"
        ) from None

    work = Path(tempfile.mkdtemp(prefix=".edgekit-convert-", dir=output.parent))
    try:
        from converters.measure import MeasureConfig

        common: dict[str, Any] = dict(
            out_dir=work / "convert",
            quantize=quantize.lower(),
            calibration=calibration,
            validation=validation,
            labels=labels,
            max_accuracy_drop=max_accuracy_drop,
            measure=MeasureConfig(batch_size=batch_size),
            allow_slower=allow_slower,
            max_samples=max_samples,
        )
        try:
            with _progress(console, not no_progress) as on_event:
                result = _run_conversion(
                    converters,
                    model,
                    runtime,
                    {**common, "progress": on_event},
                    exclude=exclude,
                    float_stem=float_stem,
                    calibration_method=calibration_method,
                    io_dtype=io_dtype,
                )
        except (BudgetExceeded, SlowerThanReference) as exc:
            report = getattr(exc, "report", None)
            if isinstance(report, dict):
                console.print(_table(report))
                _write_side_reports(report, html_report, json_report, title=f"{name} v{version}")
            raise _Refused(f"{exc} — nothing was signed") from None
        except ConvertError as exc:
            raise _BadInput(str(exc)) from None

        console.print(_table(result.report))
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {escape(str(warning))}")
        artifacts = result.write_artifacts(work / "artifacts")
        from edgekit.bundle import build_bundle

        model_file = work / f"model{result.model_path.suffix}"
        shutil.copyfile(result.model_path, model_file)
        try:
            manifest = build_bundle(
                model_file,
                output,
                name=name,
                version=version,
                keys=signers,
                display_version=display_version,
                golden=artifacts.get("golden"),
                baseline=artifacts.get("baseline"),
                report=artifacts.get("report"),
                tools={"converter": f"edgekit-convert {result.recipe}"},
                # How the device should open the model: the settings it was measured with.
                extra={"runtime_hints": result.runtime_hints} if result.runtime_hints else None,
            )
        except EdgekitError as exc:
            raise _BadInput(exc.message) from None
        _write_side_reports(result.report, html_report, json_report, title=f"{name} v{version}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(
        f"wrote {output}: {manifest.name} v{manifest.version}, variant {result.recipe} "
        f"({result.precision}), {len(manifest.files)} files, {len(signers)} signature(s)"
    )


def _run_conversion(
    converters_module: Any,
    model: Path,
    runtime: str,
    common: dict[str, Any],
    *,
    exclude: tuple[str, ...],
    float_stem: bool,
    calibration_method: str,
    io_dtype: str,
) -> Any:
    """Call the runtime's pipeline with the options only that runtime understands."""
    from converters.errors import BadOption

    if runtime == "onnx":
        if model.is_dir() or model.suffix.lower() != ".onnx":
            raise BadOption(f"{model.name}: --runtime onnx takes an .onnx file")
        options: dict[str, dict[str, Any]] = {
            "onnx-int8-qdq": {"calibration_method": calibration_method, "float_stem": float_stem}
        }
        if exclude:
            options["onnx-int8-qdq"]["exclude"] = exclude
            options["onnx-dynamic-int8"] = {"exclude": exclude}
        return converters_module.convert_onnx(model, recipe_options=options, **common)
    if exclude:
        raise BadOption("--exclude applies to --runtime onnx; TFLite quantizes every layer")
    if not float_stem:
        raise BadOption("--no-float-stem applies to --runtime onnx; TFLite quantizes every layer")
    convert_tflite = getattr(converters_module, "convert_tflite", None)
    if convert_tflite is None:
        raise BadOption("--runtime tflite needs the tflite extra: pip install 'edgekit[tflite]'")
    return convert_tflite(model, io_dtype=io_dtype, **common)


def _write_side_reports(
    report: dict[str, Any], html_path: Path | None, json_path: Path | None, *, title: str
) -> None:
    from edgekit.fsutil import atomic_write_bytes

    if json_path is not None:
        atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
    if html_path is not None:
        from converters.report_html import render_report_html

        atomic_write_bytes(html_path, render_report_html(report, title=title).encode())
