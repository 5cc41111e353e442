"""What the agent reports every telemetry period: drift, self-test, model, slots, host health.

Most of a :class:`~edgekit.protocol.Telemetry` message is read off parts the agent already has
(its metrics, its update state, :class:`~device_agent.sysinfo.SystemProbe`). The one new
measurement is **drift**: how far the requests the device serves have moved from the data the
model was validated on, which the bundle describes in ``baseline.json`` (written by
``converters/baseline.py``: per input, histogram bin edges and counts; per model, the
distribution of predicted classes).

* **Input drift** is the population stability index (PSI) of each input's values against its
  baseline histogram: live values are binned with the baseline's own edges (values outside
  them go to the outer bins, as the baseline's writer asks), both distributions are floored
  at :data:`PSI_EPSILON` so an empty bin cannot make the score infinite, and
  ``PSI = sum((live - base) * ln(live / base))``. The baseline has one histogram per input
  tensor, so "feature" here means input; the largest score is reported as well.
* **Output drift** is the same PSI over the argmax classes of the primary output, plus the
  total variation distance (half the L1 distance; 0..1, easier to read than PSI).

The request path stays cheap: the agent counts successful requests down on the monitor's
``countdown`` (see :meth:`device_agent.agent.Agent.set_observer`) and calls it only for a
request that is to be sampled. It keeps a uniform sample of the period's requests (reservoir
sampling; Li's Algorithm L draws how many requests to skip before the next one is kept, so
requests that are not kept cost no random draw) of bounded size in requests *and* bytes,
copying a request only when the reservoir keeps it; all binning happens on the telemetry
thread, over at most that sample. So the CPU cost of drift per period is bounded by the
reservoir, not by the request rate, and memory by ``max_bytes``. A period with too few
requests carries its sample over to the next one instead of reporting noise.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from device_agent.mqtt_link import build_telemetry
from device_agent.store import Phase
from device_agent.sysinfo import SystemProbe
from edgekit._jsonutil import loads_strict
from edgekit.errors import EdgekitError
from edgekit.protocol import Drift, ModelRef, ProtocolError, SelfTest, Telemetry, UpdateState

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from edgekit.manifest import Manifest

__all__ = [
    "BASELINE_NAME",
    "PSI_EPSILON",
    "Baseline",
    "BaselineError",
    "DriftMonitor",
    "DriftSample",
    "DriftWindow",
    "InputHistogram",
    "SelfTestTracker",
    "TelemetryBuilder",
    "compute_drift",
    "model_ref",
    "population_stability_index",
    "slot_states",
    "total_variation",
    "update_state",
]

logger = logging.getLogger(__name__)

#: The bundle file with the validation data's statistics (as ``edgekit.bundle`` names it;
#: repeated here so the request side does not import the bundle writer).
BASELINE_NAME = "baseline.json"

#: Floor for bin shares in PSI. An empty bin on either side would make ``ln`` infinite; 1e-4
#: is the usual choice and caps one empty bin's contribution at about 0.001-0.1 for typical
#: shares, so a single outlier bin cannot dominate the score.
PSI_EPSILON = 1e-4

#: baseline.json is written on a workstation for one model: a few inputs, 10 bins each. The
#: caps keep a hostile or broken file from costing the device more than that.
_MAX_BASELINE_BYTES = 16 * 1024 * 1024
_MAX_BINS = 4096
_MAX_CLASSES = 1024  # the protocol's map limit (output_distribution is a map)
_MAX_KEY = 128  # the protocol's key limit


class BaselineError(EdgekitError):
    """``baseline.json`` cannot be used for drift scores (the rest of telemetry goes on)."""

    reason = "baseline"


# --- scores ---------------------------------------------------------------------------------


def population_stability_index(
    actual: npt.ArrayLike, expected: npt.ArrayLike, *, epsilon: float = PSI_EPSILON
) -> float:
    """PSI of ``actual`` against ``expected`` (counts or shares per bin, same length).

    Both are normalized to shares and floored at ``epsilon``. Rule of thumb: < 0.1 stable,
    0.1-0.25 drifting, > 0.25 shifted.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape or a.ndim != 1:
        raise ValueError("PSI needs two 1-D distributions of the same length")
    a_total, e_total = float(a.sum()), float(e.sum())
    if a_total <= 0 or e_total <= 0:
        raise ValueError("PSI needs two non-empty distributions")
    a = np.maximum(a / a_total, epsilon)
    e = np.maximum(e / e_total, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def total_variation(actual: npt.ArrayLike, expected: npt.ArrayLike) -> float:
    """Half the L1 distance between two distributions (0: equal, 1: disjoint)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    a_total, e_total = float(a.sum()), float(e.sum())
    if a.shape != e.shape or a_total <= 0 or e_total <= 0:
        raise ValueError("total variation needs two non-empty distributions of one length")
    return float(0.5 * np.abs(a / a_total - e / e_total).sum())


# --- the baseline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputHistogram:
    """One input's baseline histogram, ready to bin live values with."""

    name: str
    edges: npt.NDArray[np.float64]
    expected: npt.NDArray[np.float64]
    """Baseline counts per bin (``len(edges) - 1`` of them)."""

    def bin_counts(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Counts of ``values`` per baseline bin; values beyond the edges go to the outer
        bins (bins are ``[e_i, e_i+1)``, the last one closed, like ``numpy.histogram``)."""
        bins = len(self.expected)
        index = np.searchsorted(self.edges[1:-1], values, side="right")
        return np.bincount(index, minlength=bins)[:bins].astype(np.int64)


@dataclass(frozen=True)
class Baseline:
    """The parts of ``baseline.json`` that drift scores need."""

    inputs: Mapping[str, InputHistogram]
    output: str | None = None
    """The output whose argmax is the predicted class (None: no class distribution)."""
    class_counts: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: object) -> Baseline:
        """Read the ``BaselineStats.to_dict()`` layout; inputs whose histogram is unusable
        (empty, inconsistent) are left out rather than failing the whole baseline."""
        if not isinstance(data, Mapping):
            raise BaselineError("baseline.json must hold a JSON object")
        raw_inputs = data.get("inputs")
        if not isinstance(raw_inputs, Mapping):
            raise BaselineError("baseline.json has no 'inputs' object")
        inputs: dict[str, InputHistogram] = {}
        for name, stats in raw_inputs.items():
            histogram = _histogram(name, stats)
            if histogram is not None:
                inputs[name] = histogram
        output: str | None = None
        counts: tuple[int, ...] = ()
        classes = data.get("output_classes")
        if isinstance(classes, Mapping):
            raw_counts = classes.get("counts")
            if (
                isinstance(classes.get("output"), str)
                and isinstance(raw_counts, list)
                and 0 < len(raw_counts) <= _MAX_CLASSES
                and all(_is_count(c) for c in raw_counts)
                and sum(raw_counts) > 0
            ):
                output, counts = classes["output"], tuple(int(c) for c in raw_counts)
        return cls(inputs=inputs, output=output, class_counts=counts)

    @classmethod
    def load(cls, path: str | Path) -> Baseline:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BaselineError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_dict(loads_strict(data, what="baseline.json", max_size=_MAX_BASELINE_BYTES))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _histogram(name: object, stats: object) -> InputHistogram | None:
    if not isinstance(name, str) or not name or len(name) > _MAX_KEY:
        return None
    if not isinstance(stats, Mapping):
        return None
    edges, counts = stats.get("bin_edges"), stats.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list):
        return None
    if not 1 <= len(counts) <= _MAX_BINS or len(edges) != len(counts) + 1:
        return None
    if not all(_is_count(c) for c in counts) or sum(counts) <= 0:
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges):
        return None
    edge_array = np.asarray(edges, dtype=np.float64)
    if not np.all(np.isfinite(edge_array)) or np.any(np.diff(edge_array) < 0):
        return None
    return InputHistogram(name, edge_array, np.asarray(counts, dtype=np.float64))


# --- sampling on the request path -----------------------------------------------------------


class DriftSample:
    """One request the reservoir kept: private copies, safe from a caller reusing buffers.

    A plain class with ``__slots__`` rather than a frozen dataclass: it is built on the
    request thread, where a frozen dataclass's ``__init__`` alone would double the cost."""

    __slots__ = ("inputs", "nbytes", "outputs", "slot")

    def __init__(
        self,
        slot: str,
        inputs: Mapping[str, npt.NDArray[Any]] | npt.NDArray[Any],
        outputs: Mapping[str, npt.NDArray[Any]],
        nbytes: int,
    ) -> None:
        self.slot = slot
        self.inputs = inputs
        self.outputs = outputs
        self.nbytes = nbytes


class DriftWindow:
    """The sample of one reporting window, and the reservoir's bookkeeping."""

    __slots__ = ("capacity", "full", "nbytes", "offered", "samples", "weight")

    def __init__(self, every: int = 1) -> None:
        self.samples: list[DriftSample] = []
        self.offered = every
        """Requests in this window (counted as the skips granted; exact once taken)."""
        self.nbytes = 0
        self.full = False
        self.capacity = 0
        self.weight = 0.0  # Algorithm L's W


def _copy(value: Any) -> npt.NDArray[Any]:
    return value.copy() if type(value) is np.ndarray else np.array(value)


def _copy_sample(slot: str, inputs: Any, outputs: Mapping[str, Any]) -> DriftSample:
    """Private copies of one request (it runs on the request thread, right after inference,
    when the CPU caches hold the model rather than this code: every step here is counted)."""
    copied_in: Mapping[str, npt.NDArray[Any]] | npt.NDArray[Any]
    # type() before isinstance(): an ABC isinstance check is slow.
    if type(inputs) is dict or isinstance(inputs, Mapping):
        copied_in = {k: _copy(v) for k, v in inputs.items()}
        size = 0
        for array in copied_in.values():
            size += array.nbytes
    else:
        copied_in = _copy(inputs)
        size = copied_in.nbytes
    copied_out = {}
    for name, value in outputs.items():
        array = copied_out[name] = _copy(value)
        size += array.nbytes
    return DriftSample(slot, copied_in, copied_out, size)


class DriftMonitor:
    """A bounded, uniform sample of the requests of each reporting window.

    Every ``every``-th request is a candidate for a reservoir of at most ``max_requests``
    requests and ``max_bytes`` of copied data. Until the reservoir is full every candidate is
    copied in; after that, Li's Algorithm L draws how many candidates to *skip* before the
    next one replaces a random kept sample, which keeps the sample uniform over the window.
    The skip is published as :attr:`countdown`: the agent (see
    :meth:`device_agent.agent.Agent.set_observer`) decrements it on every request and calls
    the monitor only when it reaches zero, so a request that is not sampled costs the agent
    a decrement and no function call, no random draw, no copy and no lock. :meth:`observe`
    does the same for callers that hand over every request.
    """

    __slots__ = ("_lock", "_rng", "_window", "countdown", "every", "max_bytes", "max_requests")

    def __init__(
        self,
        *,
        every: int = 1,
        max_requests: int = 128,
        max_bytes: int = 4 * 1024 * 1024,
        seed: int | None = None,
    ) -> None:
        if every < 1 or max_requests < 1 or max_bytes < 1:
            raise ValueError("every, max_requests and max_bytes must be at least 1")
        self.every = every
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self._rng = random.Random(seed)
        self._window = DriftWindow(every)
        self._lock = threading.Lock()
        self.countdown = every
        """Requests until the next one is sampled (see the class docstring)."""

    def observe(self, slot: str, inputs: Any, outputs: Mapping[str, Any]) -> None:
        """Count one request and sample it if it is due."""
        self.countdown -= 1
        if self.countdown <= 0:
            self(slot, inputs, outputs)

    def __call__(self, slot: str, inputs: Any, outputs: Mapping[str, Any]) -> None:
        """Sample this request (its countdown ran out) and set the next countdown."""
        sample = _copy_sample(slot, inputs, outputs)
        with self._lock:
            window = self._window
            if not window.full:
                window.samples.append(sample)
                window.nbytes += sample.nbytes
                if len(window.samples) >= self.max_requests or window.nbytes >= self.max_bytes:
                    window.full = True
                    window.capacity = len(window.samples)
                    window.weight = math.exp(math.log(self._uniform()) / window.capacity)
                    skip = self._skip(window)
                else:
                    skip = self.every
            else:
                index = self._rng.randrange(window.capacity)
                old = window.samples[index]
                window.samples[index] = sample
                window.nbytes += sample.nbytes - old.nbytes
                window.weight *= math.exp(math.log(self._uniform()) / window.capacity)
                skip = self._skip(window)
            window.offered += skip
            self.countdown = skip

    def _uniform(self) -> float:
        return max(self._rng.random(), 1e-300)  # log(0) is undefined; 1e-300 is "almost 0"

    def _skip(self, window: DriftWindow) -> int:
        """Requests until the next sampled one (Algorithm L, in units of ``every``)."""
        if window.weight >= 1.0:
            return self.every
        skipped = math.floor(math.log(self._uniform()) / math.log1p(-window.weight))
        return (min(skipped, 2**40) + 1) * self.every

    def take(self, min_requests: int = 1, *, slot: str | None = None) -> DriftWindow | None:
        """The current window if it holds at least ``min_requests`` samples (of ``slot``, when
        given), and a fresh window starts; else None and the window keeps growing into the
        next period. Samples of other slots (a model swapped out) leave with the window."""
        with self._lock:
            window = self._window
            samples = window.samples
            kept = len(samples) if slot is None else sum(s.slot == slot for s in samples)
            if kept < min_requests:
                return None
            window.offered -= max(self.countdown, 0)  # the skip granted but not yet used
            self._window = DriftWindow(self.every)
            self.countdown = self.every
            return window

    def reset(self) -> None:
        """Drop the current window."""
        with self._lock:
            self._window = DriftWindow(self.every)
            self.countdown = self.every

    @property
    def pending(self) -> int:
        """Samples in the current window."""
        return len(self._window.samples)


# --- computing drift on the telemetry thread ------------------------------------------------


def _predicted_classes(value: npt.NDArray[Any]) -> npt.NDArray[np.int64] | None:
    """Top-1 class per row (argmax over the last axis), or integer labels as they are; None
    for a single-value output (regression), where a class has no meaning."""
    array = np.asarray(value)
    if array.dtype.kind in "iub":
        return array.reshape(-1).astype(np.int64)
    if array.dtype.kind != "f" or array.ndim == 0 or array.shape[-1] <= 1:
        return None
    return np.asarray(array.reshape(-1, array.shape[-1]).argmax(axis=-1), dtype=np.int64)


def _input_values(sample: DriftSample, name: str, only_input: str | None) -> npt.NDArray[Any]:
    if isinstance(sample.inputs, Mapping):
        value = sample.inputs.get(name)
        return np.empty(0) if value is None else value
    return sample.inputs if name == only_input else np.empty(0)


def compute_drift(
    baseline: Baseline,
    samples: Sequence[DriftSample],
    *,
    input_names: Sequence[str] = (),
) -> Drift | None:
    """Drift of ``samples`` against ``baseline`` (None when no score could be computed).

    ``input_names`` are the serving model's inputs in order: a request given as one bare
    array (not a name -> array mapping) is that model's only input.
    """
    if not samples:
        return None
    only_input = input_names[0] if len(input_names) == 1 else None
    input_psi: dict[str, float] = {}
    for name, histogram in baseline.inputs.items():
        chunks = []
        for sample in samples:
            try:
                values = np.asarray(_input_values(sample, name, only_input), dtype=np.float64)
            except (TypeError, ValueError):
                continue  # an input NumPy cannot read as numbers: not scored
            chunks.append(values.reshape(-1))
        values = np.concatenate(chunks) if chunks else np.empty(0)
        values = values[np.isfinite(values)]
        if values.size:
            counts = histogram.bin_counts(values)
            input_psi[name] = round(population_stability_index(counts, histogram.expected), 6)
    output_psi: float | None = None
    output_tv: float | None = None
    live_dist: dict[str, float] = {}
    base_dist: dict[str, float] = {}
    if baseline.output is not None and baseline.class_counts:
        predicted = [
            classes
            for sample in samples
            if baseline.output in sample.outputs
            for classes in [_predicted_classes(sample.outputs[baseline.output])]
            if classes is not None
        ]
        labels = np.concatenate(predicted) if predicted else np.empty(0, dtype=np.int64)
        labels = labels[(labels >= 0) & (labels < _MAX_CLASSES)]
        expected = np.asarray(baseline.class_counts, dtype=np.float64)
        base_dist = {str(i): round(float(c / expected.sum()), 6) for i, c in enumerate(expected)}
        if labels.size:
            size = max(len(expected), int(labels.max()) + 1)
            live = np.bincount(labels, minlength=size).astype(np.float64)
            base = np.zeros(size)
            base[: len(expected)] = expected
            output_psi = round(population_stability_index(live, base), 6)
            output_tv = round(total_variation(live, base), 6)
            live_dist = {
                str(i): round(float(c / live.sum()), 6) for i, c in enumerate(live) if c > 0
            }
    if not input_psi and output_psi is None:
        return None
    return Drift(
        samples=len(samples),
        input_psi=input_psi,
        output_psi=output_psi,
        output_distribution=live_dist,
        baseline_distribution=base_dist,
        extra={
            "input_psi_max": max(input_psi.values()) if input_psi else None,
            "output_tv": output_tv,
        },
    )


# --- model, slots, self-test ----------------------------------------------------------------


def model_ref(manifest: Manifest) -> ModelRef:
    """How telemetry and ``reported`` name a model: bundle name, version, model-file sha256."""
    return ModelRef(
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.files[manifest.model].sha256,
        display_version=manifest.display_version,
    )


def _wire_slot(slot: str) -> str:
    """Slot ids (``20260501T101500-1a2b3c4d``) as protocol names, which are lower case."""
    return slot.lower()


def slot_states(agent: Agent) -> tuple[str | None, dict[str, str]]:
    """The serving slot and every slot's state: ``committed``, ``trial`` (serving in its health
    window), ``previous`` (what a rollback returns to), ``staging`` (being verified or
    self-tested), ``failed`` (the active slot could not be loaded at boot)."""
    state = agent.updates.state
    pending = state.pending
    slots: dict[str, str] = {}
    if state.previous is not None:
        slots[_wire_slot(state.previous)] = "previous"
    if state.active is not None:
        trial = pending is not None and pending.phase is Phase.HEALTH
        slots[_wire_slot(state.active)] = "trial" if trial else "committed"
    if pending is not None and pending.phase in (Phase.STAGING, Phase.SELFTEST):
        slots[_wire_slot(pending.slot)] = "staging"
    fallback = agent.updates.fallback
    if fallback is not None and isinstance(fallback.get("slot"), str):
        slots[_wire_slot(fallback["slot"])] = "failed"
    serving = agent.serving
    return (None if serving is None else _wire_slot(serving.slot)), slots


def update_state(agent: Agent) -> str:
    """``reported.update_state`` from the update in progress (``idle`` when none)."""
    pending = agent.updates.state.pending
    if pending is None:
        return UpdateState.IDLE.value
    return {
        Phase.DOWNLOAD: UpdateState.DOWNLOADING,
        Phase.STAGING: UpdateState.VERIFYING,
        Phase.SELFTEST: UpdateState.INSTALLING,
        Phase.HEALTH: UpdateState.TRIAL,
    }[pending.phase].value


def _event_ts(event: Mapping[str, Any]) -> float:
    text = event.get("time")
    if isinstance(text, str):
        try:
            return max(0.0, datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return 0.0


class SelfTestTracker:
    """The last golden self-test the agent ran, read from its event log.

    The agent runs the golden self-test on every candidate model before it may serve; the
    result is in the event log (``selftest-passed``, ``selftest-skipped``, or
    ``update-refused`` at stage ``selftest``), which outlives the process, so the fleet link
    feeds every event it forwards through :meth:`note` and seeds the tracker from the log at
    start.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: SelfTest | None = None

    def note(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind not in ("selftest-passed", "selftest-skipped", "update-refused"):
            return
        if kind == "update-refused" and event.get("stage") != "selftest":
            return
        subject = ""
        if event.get("bundle") is not None:
            subject = f"{event.get('bundle')} v{event.get('version')}: "
        message = str(event.get("message") or kind)
        detail = " ".join(f"{subject}{message}".split())[:1024]
        result = SelfTest(
            ok=kind != "update-refused",
            ts=min(_event_ts(event), 1e11),
            detail=detail,
            extra={
                "skipped": kind == "selftest-skipped",
                "bundle": event.get("bundle") if isinstance(event.get("bundle"), str) else None,
                "version": event.get("version") if _is_count(event.get("version")) else None,
            },
        )
        with self._lock:
            self._last = result

    def seed(self, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            self.note(event)

    @property
    def last(self) -> SelfTest | None:
        with self._lock:
            return self._last


class TelemetryBuilder:
    """Builds one :class:`Telemetry` from the agent's current state (the ``TelemetryLoop``'s
    callable, on the telemetry thread).

    Drift needs the serving model's baseline; it is loaded when the serving slot changes, and
    only the samples that slot served are scored against it.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        device: str,
        interval_s: float,
        probe: SystemProbe | None = None,
        monitor: DriftMonitor | None = None,
        selftest: SelfTestTracker | None = None,
        min_drift_requests: int = 20,
    ) -> None:
        self.agent = agent
        self.device = device
        self.interval_s = interval_s
        self.probe = probe or SystemProbe(agent.store.root)
        self.monitor = monitor
        self.selftest = selftest or SelfTestTracker()
        self.min_drift_requests = min_drift_requests
        self._slot: str | None = None
        self._baseline: Baseline | None = None
        self._input_names: tuple[str, ...] = ()
        self.last: Telemetry | None = None

    def _baseline_for(self, slot: str, manifest: Manifest) -> Baseline | None:
        if slot == self._slot:
            return self._baseline
        self._slot = slot
        self._baseline = None
        self._input_names = tuple(spec.name for spec in manifest.inputs)
        if BASELINE_NAME in manifest.files:
            try:
                self._baseline = Baseline.load(self.agent.store.slot_dir(slot) / BASELINE_NAME)
            except (BaselineError, EdgekitError) as exc:
                logger.warning("telemetry: no drift scores for slot %s: %s", slot, exc)
        return self._baseline

    def drift(self) -> Drift | None:
        serving = self.agent.serving
        if serving is None or self.monitor is None:
            return None
        baseline = self._baseline_for(serving.slot, serving.manifest)
        if baseline is None:
            return None
        window = self.monitor.take(self.min_drift_requests, slot=serving.slot)
        if window is None:
            return None
        samples = [s for s in window.samples if s.slot == serving.slot]
        try:
            return compute_drift(baseline, samples, input_names=self._input_names)
        except (ValueError, ProtocolError) as exc:  # e.g. a score beyond the protocol's range
            logger.warning("telemetry: drift not reported: %s", exc)
            return None

    def build(self) -> Telemetry:
        agent = self.agent
        serving = agent.serving
        active, slots = slot_states(agent)
        message = build_telemetry(
            self.device,
            metrics=agent.metrics.snapshot(),
            interval_s=self.interval_s,
            system=self.probe.sample(),
            model=None if serving is None else model_ref(serving.manifest),
            active_slot=active,
            slots=slots,
            drift=self.drift(),
            self_test=self.selftest.last,
        )
        self.last = message
        return message
