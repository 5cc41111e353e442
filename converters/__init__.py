"""edgekit's conversion library: a trained model in, a measured and selected edge model out.

The entry points are :func:`convert_onnx` (ONNX -> ONNX Runtime) and :func:`convert_tflite`
(Keras / SavedModel -> TFLite); both return a :class:`ConversionResult`. Names are imported
lazily so that ``import converters`` (and ``converters.errors``) work without the ``convert``
extra (numpy, onnx, onnxruntime) or the ``tflite`` extra (TensorFlow, LiteRT) installed; the
heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BadOption",
    "Budget",
    "BudgetExceeded",
    "CalibrationDataError",
    "CandidateModel",
    "ConversionResult",
    "ConvertError",
    "ImageOptions",
    "MeasureConfig",
    "Measurement",
    "Progress",
    "RecipeFailed",
    "SampleStream",
    "SlowerThanReference",
    "UnsupportedModel",
    "check_golden",
    "convert_onnx",
    "convert_tflite",
    "load_labels",
    "open_samples",
    "split_stream",
]

_LAZY = {
    "BadOption": "errors",
    "BudgetExceeded": "errors",
    "CalibrationDataError": "errors",
    "ConvertError": "errors",
    "RecipeFailed": "errors",
    "SlowerThanReference": "errors",
    "UnsupportedModel": "errors",
    "Budget": "select",
    "CandidateModel": "recipes",
    "ConversionResult": "pipeline",
    "convert_onnx": "onnx_pipeline",
    "convert_tflite": "tflite_pipeline",
    "ImageOptions": "calibration",
    "SampleStream": "calibration",
    "load_labels": "calibration",
    "open_samples": "calibration",
    "split_stream": "calibration",
    "MeasureConfig": "measure",
    "Measurement": "measure",
    "Progress": "progress",
    "check_golden": "golden",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'converters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
