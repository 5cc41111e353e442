"""Inference counters and a latency histogram, cheap enough to update on every request.

Fixed bucket boundaries (like Prometheus histograms) instead of a reservoir of samples: memory
is constant, updates are O(log buckets) under one lock, and percentiles are estimated by linear
interpolation inside the bucket that holds them — accurate to the bucket width, which is what a
fleet operator needs (is p95 8 ms or 80 ms?). The same object feeds ``/metrics`` (Prometheus
text format), the health window and MQTT telemetry.

Requests only queue their latency; the queue is folded into the histogram in batches with
NumPy (see :meth:`Metrics.fold`): ~0.08 µs per observation where a fold one observation at a
time in Python cost ~0.29 µs (measured over 4096), 3% of a 10 µs model's inference.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_BUCKETS_MS", "LatencyHistogram", "Metrics", "MetricsSnapshot"]

#: Upper bounds in milliseconds; roughly x1.5 steps from 0.1 ms to 10 s, +Inf implied.
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 15.0, 25.0, 40.0, 60.0, 100.0,
    150.0, 250.0, 400.0, 600.0, 1000.0, 1500.0, 2500.0, 4000.0, 6000.0, 10000.0,
)  # fmt: skip


class LatencyHistogram:
    """Counts of observations per bucket; not thread-safe on its own (``Metrics`` locks)."""

    __slots__ = ("bounds", "counts", "sum_ms", "total")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS_MS) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("histogram bounds must be a non-empty increasing sequence")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last bucket: above the largest bound
        self.sum_ms = 0.0
        self.total = 0

    def observe(self, milliseconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, milliseconds)] += 1
        self.sum_ms += milliseconds
        self.total += 1

    def observe_many(self, milliseconds: npt.NDArray[np.float64]) -> None:
        """:meth:`observe` for every element of a 1-D array, bucketed in one NumPy pass."""
        if not milliseconds.size:
            return
        # side="left" is bisect_left: a value equal to a bound is counted in that bound's bucket.
        index = np.searchsorted(np.asarray(self.bounds), milliseconds, side="left")
        per_bucket = np.bincount(index, minlength=len(self.counts))
        for bucket in np.flatnonzero(per_bucket).tolist():
            self.counts[bucket] += int(per_bucket[bucket])
        self.sum_ms += float(milliseconds.sum())
        self.total += int(milliseconds.size)

    def quantile(self, q: float) -> float | None:
        """Estimated ``q``-quantile in ms (None before the first observation)."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            if count and seen + count >= rank:
                low = self.bounds[index - 1] if index > 0 else 0.0
                high = self.bounds[index] if index < len(self.bounds) else self.bounds[-1] * 2
                return low + (high - low) * max(rank - seen, 0.0) / count
            seen += count
        return self.bounds[-1]

    def copy(self) -> LatencyHistogram:
        clone = LatencyHistogram(self.bounds)
        clone.counts = list(self.counts)
        clone.sum_ms, clone.total = self.sum_ms, self.total
        return clone


@dataclass(frozen=True)
class MetricsSnapshot:
    """A consistent copy of the counters at one instant."""

    inferences: int
    errors: int
    rejected_inputs: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    uptime_s: float
    histogram: LatencyHistogram

    @property
    def error_rate(self) -> float:
        return self.errors / self.inferences if self.inferences else 0.0


class Metrics:
    """Thread-safe inference metrics of one agent process.

    ``observe`` is on the hot path of every request, so it only appends to :attr:`intake`, a
    deque (``append`` is atomic under the GIL: no lock); the counters and the histogram are
    brought up to date by :meth:`fold` when someone reads them, or every :attr:`FOLD_EVERY`
    observations so the queue stays small. Measured: a locked update cost ~3 µs right after an
    ONNX Runtime call, 15% of a small model's inference; this costs ~0.2.

    The agent's ``predict`` does what ``observe`` does inline (append the latency in seconds to
    ``intake``, then fold when ``len(intake) >= FOLD_EVERY``): right after an inference even
    a method call costs ~0.45 µs (measured on a 10 µs model), as much as everything else the
    agent does per request.
    """

    #: Queued observations that trigger a fold (bounds the queue's memory).
    FOLD_EVERY: ClassVar[int] = 4096
    _ERROR = -1.0  # queued instead of a latency: the runtime failed
    _REJECT = -2.0  # queued instead of a latency: the input was refused

    def __init__(self, *, buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> None:
        self._lock = threading.Lock()
        #: Observations not folded yet: latencies in seconds (>= 0), or the error and reject
        #: markers (negative). Append-only for everyone but :meth:`fold`.
        self.intake: deque[float] = deque()
        self._histogram = LatencyHistogram(buckets_ms)
        self._inferences = 0
        self._errors = 0
        self._rejected = 0
        self._started = time.monotonic()

    def observe(self, seconds: float, *, ok: bool = True) -> None:
        """Record one inference (``ok=False``: the runtime failed on valid input)."""
        intake = self.intake
        intake.append(max(seconds, 0.0) if ok else self._ERROR)
        if len(intake) >= self.FOLD_EVERY:
            self.fold()

    def reject(self) -> None:
        """Record a request refused before inference (bad input: the caller's error)."""
        intake = self.intake
        intake.append(self._REJECT)
        if len(intake) >= self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Move the queued observations into the counters and the histogram.

        Only this method removes items, under the lock, and requests only append at the other
        end, so the first ``len`` items can be taken one ``popleft`` at a time (each atomic)
        while requests go on appending. The arithmetic is then done on an array (see the
        module's docstring for why).
        """
        with self._lock:
            popleft = self.intake.popleft
            taken = [popleft() for _ in range(len(self.intake))]
            if not taken:
                return
            values: npt.NDArray[Any] = np.array(taken, dtype=np.float64)
            latencies_ms = values[values >= 0.0] * 1000.0
            errors = int(np.count_nonzero(values == self._ERROR))
            self._inferences += int(latencies_ms.size) + errors
            self._errors += errors
            self._rejected += int(values.size - latencies_ms.size - errors)
            self._histogram.observe_many(latencies_ms)

    def snapshot(self) -> MetricsSnapshot:
        self.fold()
        with self._lock:
            histogram = self._histogram.copy()
            inferences, errors, rejected = self._inferences, self._errors, self._rejected
        return MetricsSnapshot(
            inferences=inferences,
            errors=errors,
            rejected_inputs=rejected,
            p50_ms=histogram.quantile(0.50),
            p95_ms=histogram.quantile(0.95),
            p99_ms=histogram.quantile(0.99),
            uptime_s=time.monotonic() - self._started,
            histogram=histogram,
        )

    def render_prometheus(
        self, *, labels: Mapping[str, str] | None = None, gauges: Mapping[str, float] | None = None
    ) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        snap = self.snapshot()
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted((labels or {}).items()))

        def with_labels(extra: str = "") -> str:
            parts = [p for p in (label_text, extra) if p]
            return "{" + ",".join(parts) + "}" if parts else ""

        lines = [
            "# HELP edgekit_inferences_total Inference requests that reached the runtime.",
            "# TYPE edgekit_inferences_total counter",
            f"edgekit_inferences_total{with_labels()} {snap.inferences}",
            "# HELP edgekit_inference_errors_total Inferences the runtime failed.",
            "# TYPE edgekit_inference_errors_total counter",
            f"edgekit_inference_errors_total{with_labels()} {snap.errors}",
            "# HELP edgekit_rejected_inputs_total Requests refused for invalid input.",
            "# TYPE edgekit_rejected_inputs_total counter",
            f"edgekit_rejected_inputs_total{with_labels()} {snap.rejected_inputs}",
            "# HELP edgekit_inference_latency_seconds Latency of successful inferences.",
            "# TYPE edgekit_inference_latency_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(snap.histogram.bounds, snap.histogram.counts, strict=False):
            cumulative += count
            le = f'le="{bound / 1000.0:g}"'
            lines.append(f"edgekit_inference_latency_seconds_bucket{with_labels(le)} {cumulative}")
        cumulative += snap.histogram.counts[-1]
        inf_label = 'le="+Inf"'
        lines.append(
            f"edgekit_inference_latency_seconds_bucket{with_labels(inf_label)} {cumulative}"
        )
        total_s = snap.histogram.sum_ms / 1000.0
        lines.append(f"edgekit_inference_latency_seconds_sum{with_labels()} {total_s:.6f}")
        lines.append(f"edgekit_inference_latency_seconds_count{with_labels()} {cumulative}")
        lines += [
            "# HELP edgekit_uptime_seconds Seconds since the agent started.",
            "# TYPE edgekit_uptime_seconds gauge",
            f"edgekit_uptime_seconds{with_labels()} {snap.uptime_s:.3f}",
        ]
        for name, value in sorted((gauges or {}).items()):
            lines += [f"# TYPE {name} gauge", f"{name}{with_labels()} {value:g}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
