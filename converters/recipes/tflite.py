"""TFLite recipes: fp32, fp16, dynamic range, full int8 and int16x8 with TensorFlow's converter.

Every recipe starts from the same prepared source (a SavedModel and its signature, see
:mod:`converters.tflite_source`) and differs only in how it configures ``TFLiteConverter``:

* ``tflite-fp32`` -- no optimisation: the reference every candidate is measured against.
* ``tflite-fp16`` -- float16 weights; the interpreter computes in float32 on CPUs without fp16
  arithmetic (it dequantizes the weights at load time), so it saves size, not time, there.
* ``tflite-dynamic`` -- "dynamic range": int8 weights, activations quantized on the fly by
  hybrid kernels; needs no data.
* ``tflite-int8`` -- full integer: int8 weights and activations, activation ranges calibrated on
  the representative dataset (the calibration stream); int8 or float32 model I/O (``io_dtype``).
* ``tflite-int16x8`` -- int16 activations with int8 weights: far finer activation steps for
  models whose activation ranges int8 cannot resolve. A *fallback*: only built when full int8
  misses the budget, because its kernels are the slow reference ones on most CPUs.

TensorFlow is imported when a recipe runs, never when this module is imported, so registering
the recipes costs nothing for ONNX-only users.
"""

from __future__ import annotations

import csv
import io
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import CalibrationDataError, ConvertError, RecipeFailed
from ..tflite_source import (
    PreparedSource,
    align_io_names,
    captured_output,
    first_error_line,
    import_tensorflow,
    prepare_source,
)
from .base import CalibrationFactory, CandidateModel, LayerDiagnoser, Recipe, register_recipe

__all__ = [
    "TfliteDynamicConfig",
    "TfliteDynamicRecipe",
    "TfliteFp16Config",
    "TfliteFp16Recipe",
    "TfliteFp32Config",
    "TfliteFp32Recipe",
    "TfliteInt8Config",
    "TfliteInt8Recipe",
    "TfliteInt16x8Config",
    "TfliteInt16x8Recipe",
]

RUNTIME = "tflite"
MODEL_FILENAME = "model.tflite"

ConfigT = TypeVar("ConfigT")


class _Representative:
    """The converter's representative dataset over a calibration stream.

    TensorFlow calls it from inside ``convert()`` and may wrap what it raises; the first error and
    the number of samples fed are kept here so the recipe can report the real cause
    (:class:`CalibrationDataError` for bad or missing data, not a converter failure).
    """

    def __init__(self, factory: CalibrationFactory) -> None:
        self._factory = factory
        self.count = 0
        self.error: BaseException | None = None

    def __call__(self) -> Iterator[dict[str, npt.NDArray[Any]]]:
        self.count = 0
        try:
            for sample in self._factory():
                self.count += 1
                yield dict(sample)
        except Exception as exc:
            self.error = exc
            raise


class _TfliteRecipe(Recipe[ConfigT]):
    """Shared ``run``: prepare the source, configure the converter, convert, check, write."""

    runtime: ClassVar[str] = RUNTIME

    @abstractmethod
    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        """Set this recipe's converter options; returns notes for the report."""

    def diagnoser(
        self, source: PreparedSource, calibration: CalibrationFactory | None
    ) -> LayerDiagnoser | None:
        """Per-layer diagnostics for the candidate, when the recipe has a method for them."""
        return None

    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        start = time.perf_counter()
        source = prepare_source(Path(src_model_path))
        representative: _Representative | None = None
        if self.needs_calibration:
            if calibration is None:
                raise CalibrationDataError(f"{self.name} needs calibration data")
            representative = _Representative(calibration)
        captured: list[str] = []
        try:
            tf = import_tensorflow()
            with captured_output() as captured:
                converter = source.converter()
                notes = self.configure(converter, tf, representative)
                content = bytes(converter.convert())
        except ConvertError:
            raise
        except Exception as exc:
            if representative is not None:
                if isinstance(representative.error, ConvertError):
                    raise representative.error from exc
                if representative.count == 0 and representative.error is None:
                    raise CalibrationDataError(f"{self.name}: calibration data is empty") from exc
            raise RecipeFailed(
                f"{self.name}: TFLite conversion failed: {first_error_line(exc, captured)}",
                recipe=self.name,
            ) from exc
        if representative is not None:
            if representative.count == 0:
                raise CalibrationDataError(f"{self.name}: calibration data is empty")
            notes = (*notes, f"calibrated on {representative.count} samples")
        content, renamed = align_io_names(content)
        if renamed:
            notes = (
                *notes,
                "I/O tensors named by their signature keys: "
                + ", ".join(f"{old} -> {new}" for old, new in renamed.items()),
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / MODEL_FILENAME
        path.write_bytes(content)
        _check_loads(path, self.name)
        return self.candidate(
            path,
            notes=(*source.notes, *notes),
            seconds=time.perf_counter() - start,
            diagnose=self.diagnoser(source, calibration),
        )


def _check_loads(path: Path, recipe: str) -> None:
    """A converted model must load in the interpreter the device uses; refuse it otherwise."""
    from ..runtime import TfliteRunner

    try:
        TfliteRunner(path)
    except Exception as exc:
        raise RecipeFailed(
            f"{recipe}: the converted model does not load in the TFLite interpreter:"
            f" {first_error_line(exc)}",
            recipe=recipe,
        ) from exc


# --------------------------------------------------------------------------- float


@dataclass(frozen=True, kw_only=True)
class TfliteFp32Config:
    """No options: the reference is the model as TensorFlow converts it."""


@register_recipe
class TfliteFp32Recipe(_TfliteRecipe[TfliteFp32Config]):
    """Float32 TFLite model: the reference every TFLite candidate is measured against.

    Measuring against the converted fp32 model (not the Keras model) isolates what quantization
    costs from what conversion changes, with the same interpreter on both sides.
    """

    name = "tflite-fp32"
    precision = "fp32"
    mode = "none"
    config_type = TfliteFp32Config
    summary = "float32 reference"

    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True, kw_only=True)
class TfliteFp16Config:
    """No options."""


@register_recipe
class TfliteFp16Recipe(_TfliteRecipe[TfliteFp16Config]):
    """Float16 weights (half the size); float32 I/O and, on most CPUs, float32 compute."""

    name = "tflite-fp16"
    precision = "fp16"
    mode = "fp16"
    config_type = TfliteFp16Config
    summary = "float16 weights, float32 inputs and outputs"

    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        return ()


@dataclass(frozen=True, kw_only=True)
class TfliteDynamicConfig:
    """No options."""


@register_recipe
class TfliteDynamicRecipe(_TfliteRecipe[TfliteDynamicConfig]):
    """Dynamic range quantization: int8 weights, activations quantized at run time."""

    name = "tflite-dynamic"
    precision = "int8"
    mode = "dynamic"
    config_type = TfliteDynamicConfig
    summary = "int8 weights, activations quantized at run time (no data needed)"

    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return ()


# --------------------------------------------------------------------------- integer


IoDtype = Literal["int8", "float"]


@dataclass(frozen=True, kw_only=True)
class TfliteInt8Config:
    io_dtype: IoDtype = "int8"
    """``int8``: a fully integer model (what integer-only accelerators and microcontrollers
    need; the device agent quantizes inputs and dequantizes outputs with the tensors' scale and
    zero point). ``float``: float32 I/O with quantize/dequantize ops inside the model."""
    allow_float_ops: bool = False
    """Let ops without an int8 kernel stay float32 instead of failing the conversion."""


def _supported_ops(tf: Any, primary: Any, allow_float_ops: bool) -> list[Any]:
    ops = [primary]
    if allow_float_ops:
        ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
    return ops


def _typical_channel_power(
    reference_path: Path, samples: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Per float tensor of the fp32 model: the median over channels of the mean square.

    Channels are the last axis (TFLite is NHWC / [N, features]). The median, not the whole
    tensor's mean square, is the signal a layer's error is compared with: one large channel (an
    outlier unit, a big bias) would otherwise hide that quantization steps sized for it drown
    every other channel, which is exactly how int8 breaks such models. Dead (all-zero) channels
    are left out.
    """
    from ..runtime import TfliteRunner

    runner = TfliteRunner(reference_path, preserve_all_tensors=True)
    interpreter = runner.interpreter
    sums: dict[str, npt.NDArray[np.float64]] = {}
    counts: dict[str, int] = {}
    for sample in samples:
        runner.run(dict(sample))
        for detail in interpreter.get_tensor_details():
            if np.dtype(detail["dtype"]) != np.float32:
                continue
            try:
                value = np.asarray(interpreter.get_tensor(detail["index"]), dtype=np.float64)
            except ValueError:  # a tensor without data (e.g. an unused optional input)
                continue
            if value.ndim == 0 or value.size == 0:
                continue
            name = str(detail["name"])
            channels = value.reshape(-1, value.shape[-1])
            power = np.sum(channels * channels, axis=0)
            if name in sums and sums[name].shape == power.shape:
                sums[name] += power
                counts[name] += channels.shape[0]
            elif name not in sums:
                sums[name], counts[name] = power, channels.shape[0]
    result: dict[str, float] = {}
    for name, total in sums.items():
        per_channel = total / counts[name]
        alive = per_channel[per_channel > 0]
        if alive.size:
            result[name] = float(np.median(alive))
    return result


def _layer_rows(text: str, signal: Mapping[str, float], top: int) -> list[dict[str, Any]]:
    """LayerError-shaped dicts from the debugger's CSV dump, worst relative error first.

    The relative error is the layer's RMS error over the typical channel's RMS of the same
    tensor in the fp32 model (matched by tensor name, see :func:`_typical_channel_power`);
    where no fp32 tensor matches, over the layer's int8 full scale (127 steps), which
    understates it for layers that use little of their range.
    """
    rows: list[dict[str, Any]] = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            rmse = math.sqrt(max(0.0, float(row["mean_squared_error"])))
            scale = float(row["scale"])
        except (KeyError, ValueError):
            continue
        tensor = row.get("tensor_name", "")
        power = signal.get(tensor)
        if power is not None and power > 0:
            rel = rmse / math.sqrt(power)
        elif scale > 0:
            rel = rmse / (127.0 * scale)
        else:
            continue
        if not math.isfinite(rel):
            continue
        rows.append(
            {
                "node": tensor.split(";")[0],
                "op_type": row.get("op_name", "?"),
                "tensor": tensor,
                "relative_error": rel,
                "sqnr_db": min(200.0, -20.0 * math.log10(rel)) if rel > 0 else 200.0,
                # Each NumericVerify compares a layer with its float op fed the *quantized*
                # model's input: the error is the layer's own, nothing is inherited.
                "added_error": rel,
                "rmse_over_scale": rmse / scale if scale > 0 else None,
            }
        )
    rows.sort(key=lambda r: -r["relative_error"])
    return rows[:top]


def _debugger_diagnoser(
    source: PreparedSource,
    calibration: CalibrationFactory,
    configure: Callable[[Any, Any, _Representative], object],
) -> LayerDiagnoser:
    """Layer statistics from ``tf.lite.experimental.QuantizationDebugger``.

    The debugger re-quantizes the model with NumericVerify ops after every quantized op and
    runs it on the given samples: per layer, the error of the quantized op against its float
    op fed the same (dequantized) input, so the ranking shows which layers *add* error.
    ``rmse_over_scale`` is the debugger's own figure (about 0.29 for plain rounding; much
    larger values mean a badly suited range).
    """

    def diagnose(
        reference_path: Path, samples: Sequence[Mapping[str, Any]], top: int
    ) -> list[dict[str, Any]]:
        if not samples:
            return []
        tf = import_tensorflow()
        order = list(samples[0])
        with captured_output():
            converter = source.converter()
            configure(converter, tf, _Representative(calibration))
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter,
                debug_dataset=lambda: ([np.asarray(s[n]) for n in order] for s in samples),
            )
            debugger.run()
            dump = io.StringIO()
            debugger.layer_statistics_dump(dump)
            signal = _typical_channel_power(reference_path, samples)
        return _layer_rows(dump.getvalue(), signal, top)

    return diagnose


@register_recipe
class TfliteInt8Recipe(_TfliteRecipe[TfliteInt8Config]):
    """Full integer quantization calibrated on the representative dataset."""

    name = "tflite-int8"
    precision = "int8"
    mode = "int8"
    config_type = TfliteInt8Config
    needs_calibration = True
    summary = "full int8 (weights and activations), calibrated; int8 or float I/O"

    def _apply(
        self, converter: Any, tf: Any, representative: _Representative, *, io_dtype: IoDtype
    ) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = _supported_ops(
            tf, tf.lite.OpsSet.TFLITE_BUILTINS_INT8, self.config.allow_float_ops
        )
        if io_dtype == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8

    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        assert representative is not None
        self._apply(converter, tf, representative, io_dtype=self.config.io_dtype)
        return (f"I/O {self.config.io_dtype}",)

    def diagnoser(
        self, source: PreparedSource, calibration: CalibrationFactory | None
    ) -> LayerDiagnoser | None:
        if calibration is None:
            return None

        # Float I/O for the debugger: the layers are quantized identically, and the debugger
        # compares float tensors.
        def configure(converter: Any, tf: Any, representative: _Representative) -> None:
            self._apply(converter, tf, representative, io_dtype="float")

        return _debugger_diagnoser(source, calibration, configure)


@dataclass(frozen=True, kw_only=True)
class TfliteInt16x8Config:
    allow_float_ops: bool = False
    """Let ops without an int16x8 kernel stay float32 instead of failing the conversion."""


@register_recipe
class TfliteInt16x8Recipe(_TfliteRecipe[TfliteInt16x8Config]):
    """int16 activations, int8 weights: a fallback for models that full int8 breaks.

    256 times finer activation steps than int8 recover models with wide activation ranges (an
    outlier channel, a large bias) at about the size of int8. Its CPU kernels are mostly the
    reference ones, so it is usually slower than fp32 on a workstation; it is meant for targets
    whose accelerators support it, and is built only when int8 misses the budget.
    """

    name = "tflite-int16x8"
    precision = "int16x8"
    mode = "int8"
    config_type = TfliteInt16x8Config
    needs_calibration = True
    fallback = True
    summary = "int16 activations, int8 weights (fallback when int8 misses the budget)"

    def configure(
        self, converter: Any, tf: Any, representative: _Representative | None
    ) -> tuple[str, ...]:
        assert representative is not None
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = _supported_ops(
            tf,
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            self.config.allow_float_ops,
        )
        return ("I/O float",)
