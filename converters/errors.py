"""Errors raised by the conversion library.

Every failure the caller can act on is a :class:`ConvertError`: the CLI prints ``str(err)`` (one
line) and uses ``err.reason`` (a short, stable slug) in machine-readable output. Low-level
exceptions from onnx / onnxruntime / numpy are mapped to the most specific subclass at the
boundary where they happen, so callers never have to catch library-specific types.

This module imports only the standard library so that ``from converters.errors import ...`` works
even where the ``convert`` extra (numpy, onnx, onnxruntime) is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BadOption",
    "BudgetExceeded",
    "CalibrationDataError",
    "ConvertError",
    "RecipeFailed",
    "SlowerThanReference",
    "UnsupportedModel",
]


def _one_line(message: str) -> str:
    return " ".join(message.split())


class ConvertError(Exception):
    """Base of every error the conversion library raises on purpose."""

    reason: str = "convert-error"

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it as is and reports store it in JSON.
        super().__init__(_one_line(message))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class UnsupportedModel(ConvertError):
    """The model cannot be converted: unreadable, invalid, not ONNX, or unsupported features."""

    reason = "unsupported-model"


class CalibrationDataError(ConvertError):
    """Calibration / validation data is missing, unreadable, empty or does not match the model.

    Messages name the model input, the expected shape/dtype and what was found, so the user can
    fix the data without reading a traceback.
    """

    reason = "calibration-data"


class BadOption(ConvertError):
    """An option (quantize mode, recipe option, budget, measurement setting) is invalid."""

    reason = "bad-option"


class RecipeFailed(ConvertError):
    """A conversion recipe raised while producing its candidate model."""

    reason = "recipe-failed"

    def __init__(self, message: str, *, recipe: str) -> None:
        super().__init__(message)
        self.recipe = recipe


class BudgetExceeded(ConvertError):
    """No requested quantized candidate stays within the accuracy budget.

    Carries the full report (``report``, JSON-ready) so the CLI can still write ``report.json``,
    plus the numbers that matter: the smallest ``drop`` seen, the ``budget``, by how much it was
    exceeded (``excess``) and the layers that hurt most (``worst_layers``, best effort, may be
    empty).
    """

    reason = "budget-exceeded"

    def __init__(
        self,
        message: str,
        *,
        report: Mapping[str, Any],
        drop: float,
        budget: float,
        worst_layers: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.report = dict(report)
        self.drop = drop
        self.budget = budget
        self.excess = drop - budget
        self.worst_layers = [dict(layer) for layer in worst_layers]


class SlowerThanReference(ConvertError):
    """The requested reduced-precision candidate is slower than fp32 at batch 1 on this machine.

    Raised in explicit mode only (``auto`` silently skips such candidates). Carries the report.
    """

    reason = "slower-than-fp32"

    def __init__(self, message: str, *, report: Mapping[str, Any], slowdown: float) -> None:
        super().__init__(message)
        self.report = dict(report)
        self.slowdown = slowdown
