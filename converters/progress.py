"""Progress events, so that a CLI can drive progress bars without the library printing anything.

Stages: ``recipe`` (one event per recipe started/finished), ``calibrate`` (per calibration
sample read by a recipe), ``validate`` (per validation sample run through every session),
``latency`` (per timing round), ``memory`` / ``diagnose`` (per candidate), ``golden`` and
``baseline``. ``total`` is ``None`` when the count is not known in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Progress", "ProgressCallback", "report"]


@dataclass(frozen=True)
class Progress:
    stage: str
    label: str
    completed: int
    total: int | None


ProgressCallback = Callable[[Progress], None]


def report(callback: ProgressCallback | None, event: Progress) -> None:
    """Send ``event`` if a callback is installed (a no-op otherwise)."""
    if callback is not None:
        callback(event)
