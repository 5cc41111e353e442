"""What an operator writes to describe a rollout, parsed once into typed values.

``--waves 5%,25%,100%``, ``--min-wave-time 10m``, ``--gate 'p95_latency_ms<=30'`` and
``--target 'group=cameras'`` arrive as strings from the CLI and as strings or numbers from
the REST API; both go through the parsers here, so an option means the same thing whichever
way it came, and a bad one is refused with the same one-line :class:`SpecError` before any
rollout exists. Standard library only: the CLI validates options without the server's
dependencies installed.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from edgekit.fleet.errors import SpecError

__all__ = [
    "METRICS",
    "Aggregate",
    "BreachPolicy",
    "Gate",
    "GateResult",
    "GateVerdict",
    "Metric",
    "RolloutSpec",
    "Selector",
    "TimeoutPolicy",
    "format_duration",
    "parse_duration",
    "parse_fraction",
    "parse_waves",
]


# --- scalars -----------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Seconds from ``"10m"``, ``"30s"``, ``"1.5h"``, ``"500ms"`` or a plain number of
    seconds. Several terms add up (``"1h30m"``)."""
    if isinstance(value, bool):
        raise SpecError(f"{what} must be a duration such as 30s or 10m, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        seconds, pos, text = 0.0, 0, value.strip()
        while pos < len(text):
            match = _DURATION.match(text, pos)
            if not match or match.end() == pos:
                raise SpecError(f"{what} {value!r} is not a duration such as 30s, 10m or 1h")
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
    else:
        raise SpecError(f"{what} must be a duration such as 30s or 10m, not {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise SpecError(f"{what} must be a finite, non-negative duration, not {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The short form people read: ``90`` -> ``1m30s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds else "0s"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def parse_fraction(value: object, *, what: str = "fraction") -> float:
    """A share in [0, 1] from ``"95%"``, ``"0.95"`` or ``0.95``. A bare number above 1 is
    read as a percentage (``95`` = 95 %), the way people type it into a flag."""
    if isinstance(value, bool):
        raise SpecError(f"{what} must be a percentage such as 95%, not {value!r}")
    number: float
    if isinstance(value, (int, float)):
        number = float(value)
        if number > 1:
            number /= 100.0
    elif isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                number = float(text[:-1]) / 100.0
            else:
                number = float(text)
                if number > 1:
                    number /= 100.0
        except ValueError:
            raise SpecError(f"{what} {value!r} is not a percentage such as 95%") from None
    else:
        raise SpecError(f"{what} must be a percentage such as 95%, not {value!r}")
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise SpecError(f"{what} {value!r} is not between 0% and 100%")
    return number


def parse_waves(value: object) -> tuple[float, ...]:
    """Cumulative shares of the target set, ``"5%,25%,100%"`` -> ``(0.05, 0.25, 1.0)``.

    Strictly increasing and ending at 100 %: a rollout that is meant to stop at a canary is
    paused by the operator, not left looking "completed" with most devices untouched.
    """
    items: Sequence[object]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise SpecError(f"waves must be a list such as 5%,25%,100%, not {value!r}")
    if not items:
        raise SpecError("waves must name at least one wave, such as 100%")
    if len(items) > 100:
        raise SpecError(f"{len(items)} waves are too many (at most 100)")
    waves = tuple(parse_fraction(item, what="wave") for item in items)
    for before, after in itertools.pairwise(waves):
        if after <= before:
            raise SpecError("waves must grow strictly, such as 5%,25%,100%")
    if waves[0] <= 0:
        raise SpecError("the first wave must be above 0%")
    if not math.isclose(waves[-1], 1.0):
        raise SpecError("the last wave must be 100%")
    return (*waves[:-1], 1.0)


# --- gates -------------------------------------------------------------------------------


class Aggregate(str, Enum):
    """How per-device values become one number for the wave.

    ``pooled`` weights each device by the inferences it served (the fleet-wide error rate,
    not the mean of small devices' noisy rates); ``pNN`` is a percentile across devices.
    """

    MEAN = "mean"
    MEDIAN = "median"
    MIN = "min"
    MAX = "max"
    POOLED = "pooled"
    P90 = "p90"
    P95 = "p95"
    P99 = "p99"

    def apply(self, values: Sequence[tuple[float, float]]) -> float:
        """``values`` are (value, weight) pairs; the weight is the device's inferences."""
        numbers = [value for value, _ in values]
        if self is Aggregate.MEAN:
            return statistics.fmean(numbers)
        if self is Aggregate.MEDIAN:
            return float(statistics.median(numbers))
        if self is Aggregate.MIN:
            return min(numbers)
        if self is Aggregate.MAX:
            return max(numbers)
        if self is Aggregate.POOLED:
            total = sum(weight for _, weight in values)
            if total <= 0:
                return statistics.fmean(numbers)
            return sum(value * weight for value, weight in values) / total
        share = int(self.value[1:]) / 100.0
        ordered = sorted(numbers)
        # Nearest rank: the value at or below which `share` of the devices lie.
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass(frozen=True)
class Metric:
    """A per-device health or quality figure that a gate may name."""

    name: str
    default: Aggregate
    description: str


#: The metrics a gate may name, computed per device from the telemetry it sent while running
#: the rollout's bundle (``edgekit.fleet.rollouts`` computes them).
METRICS: Mapping[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("p50_latency_ms", Aggregate.MEDIAN, "inference latency, 50th percentile"),
        Metric("p95_latency_ms", Aggregate.MEDIAN, "inference latency, 95th percentile"),
        Metric("p99_latency_ms", Aggregate.MEDIAN, "inference latency, 99th percentile"),
        Metric("error_rate", Aggregate.POOLED, "failed inferences / inferences on the bundle"),
        Metric("rejected_rate", Aggregate.POOLED, "refused requests / inferences on the bundle"),
        Metric("drift_psi", Aggregate.MEDIAN, "largest input or output PSI vs the baseline"),
        Metric("golden_pass", Aggregate.MIN, "1 if the last golden self-test passed, else 0"),
        Metric("cpu_percent", Aggregate.MEDIAN, "host CPU busy share, 0-100"),
        Metric("temperature_c", Aggregate.MEDIAN, "hottest thermal zone"),
    )
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b or math.isclose(a, b),
    ">=": lambda a, b: a >= b or math.isclose(a, b),
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
    "!=": lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}
_GATE = re.compile(
    r"\s*(?:(?P<agg>[a-z0-9]+)\(\s*(?P<m1>[a-z0-9_]+)\s*\)|(?P<m2>[a-z0-9_]+))"
    r"\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
    r"\s*(?P<pct>%)?\s*"
)


class GateVerdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no-data"


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    verdict: GateVerdict
    value: float | None
    devices: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": str(self.gate),
            "verdict": self.verdict.value,
            "value": self.value,
            "devices": self.devices,
        }


@dataclass(frozen=True)
class Gate:
    """``p95_latency_ms<=30``, ``max(drift_psi)<0.25``, ``error_rate<=1%``: a metric,
    aggregated over the wave's devices, compared with a threshold."""

    metric: str
    op: str
    threshold: float
    aggregate: Aggregate

    @classmethod
    def parse(cls, text: object) -> Gate:
        if isinstance(text, Gate):
            return text
        if not isinstance(text, str):
            raise SpecError(f"a gate must be a string such as p95_latency_ms<=30, not {text!r}")
        match = _GATE.fullmatch(text)
        if not match:
            raise SpecError(
                f"gate {text!r} is not METRIC OP NUMBER (OP one of <= < >= > == !=), "
                "optionally AGG(METRIC), e.g. p95_latency_ms<=30"
            )
        name = match.group("m1") or match.group("m2")
        metric = METRICS.get(name)
        if metric is None:
            raise SpecError(f"gate {text!r}: unknown metric {name!r} (known: {', '.join(METRICS)})")
        aggregate = metric.default
        if match.group("agg"):
            try:
                aggregate = Aggregate(match.group("agg"))
            except ValueError:
                known = ", ".join(a.value for a in Aggregate)
                raise SpecError(f"gate {text!r}: unknown aggregate (known: {known})") from None
        threshold = float(match.group("value"))
        if match.group("pct"):
            threshold /= 100.0
        return cls(name, match.group("op"), threshold, aggregate)

    def holds(self, value: float) -> bool:
        return bool(_OPS[self.op](value, self.threshold))

    def evaluate(self, values: Sequence[tuple[float, float]]) -> GateResult:
        """Judge the (value, weight) pairs of the devices that have the metric."""
        if not values:
            return GateResult(self, GateVerdict.NO_DATA, None, 0)
        value = self.aggregate.apply(values)
        verdict = GateVerdict.PASS if self.holds(value) else GateVerdict.FAIL
        return GateResult(self, verdict, value, len(values))

    def __str__(self) -> str:
        threshold = f"{self.threshold:g}"
        if self.aggregate is METRICS[self.metric].default:
            return f"{self.metric}{self.op}{threshold}"
        return f"{self.aggregate.value}({self.metric}){self.op}{threshold}"


# --- target selectors --------------------------------------------------------------------

_TERM = re.compile(r"\s*(?P<key>[A-Za-z0-9_.:-]+)\s*(?P<op>!=|=)\s*(?P<values>[^,]+?)\s*")
_KEYS = ("group", "device", "model", "version")


@dataclass(frozen=True)
class _Term:
    key: str  # group | device | model | version | tag.NAME
    negate: bool
    values: tuple[str, ...]

    def matches(self, labels: Mapping[str, Any]) -> bool:
        if self.key == "group":
            groups: Iterable[str] = labels.get("groups") or ()
            hit = any(fnmatch.fnmatchcase(g, v) for g in groups for v in self.values)
        else:
            actual = labels.get(self.key)
            hit = actual is not None and any(
                fnmatch.fnmatchcase(str(actual), v) for v in self.values
            )
        return hit != self.negate

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negate else '='}{'|'.join(self.values)}"


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: ``group=cameras``, ``group=cameras,tag.site=plant-1``,
    ``device=cam-*``, ``model!=tiny-cnn``, or ``all``.

    Terms separated by commas must all hold; ``a|b`` accepts either value; values may use
    shell wildcards (``*``, ``?``). Keys: ``group`` (any of the device's groups), ``device``,
    ``model`` and ``version`` (of the model it runs), ``tag.NAME``.
    """

    terms: tuple[_Term, ...] = field(default=())

    @classmethod
    def parse(cls, text: object) -> Selector:
        if isinstance(text, Selector):
            return text
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"target must be a selector such as group=cameras, not {text!r}")
        if text.strip().lower() in ("all", "*"):
            return cls(())
        terms = []
        for raw in text.split(","):
            match = _TERM.fullmatch(raw)
            if not match:
                raise SpecError(f"target term {raw.strip()!r} is not KEY=VALUE or KEY!=VALUE")
            key = match.group("key")
            if key.startswith("tag:"):
                key = "tag." + key[4:]
            if key not in _KEYS and not (key.startswith("tag.") and len(key) > 4):
                raise SpecError(
                    f"target key {key!r} is unknown (group, device, model, version, tag.NAME)"
                )
            values = tuple(v.strip() for v in match.group("values").split("|") if v.strip())
            if not values:
                raise SpecError(f"target term {raw.strip()!r} has no value")
            terms.append(_Term(key, match.group("op") == "!=", values))
        return cls(tuple(terms))

    def matches(self, labels: Mapping[str, Any]) -> bool:
        """``labels``: ``groups`` (a list), ``device``, ``model``, ``version``, ``tag.NAME``."""
        return all(term.matches(labels) for term in self.terms)

    def __str__(self) -> str:
        return ",".join(str(term) for term in self.terms) or "all"


# --- the rollout spec ----------------------------------------------------------------------


class BreachPolicy(str, Enum):
    """What a breached failure threshold or gate does."""

    PAUSE = "pause"
    ABORT = "abort"
    ROLLBACK = "rollback"  # abort, then restore every touched device's previous desired state


class TimeoutPolicy(str, Enum):
    """What a device that never finished (after its retries) counts as."""

    FAIL = "fail"  # a failure: counts against --max-failures
    EXCLUDE = "exclude"  # left out of the wave's figures


def _enum(cls: type[Enum], value: object, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(str(member.value) for member in cls)
        raise SpecError(f"{what} {value!r} is not one of: {known}") from None


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{what} must be a whole number, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise SpecError(f"{what} {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise SpecError(f"{what} must be between {low} and {high}, not {number}")
    return number


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """Everything that decides how a rollout proceeds; stored with the rollout, never
    changed after creation (a different policy is a different rollout)."""

    fleet: str
    artifact: str
    """sha256 of the bundle archive in the controller's artifact store."""
    target: Selector = field(default_factory=Selector)
    waves: tuple[float, ...] = (0.05, 0.25, 1.0)
    min_wave_time_s: float = 600.0
    success_threshold: float = 0.95
    max_failures: float = 0.05
    gates: tuple[Gate, ...] = ()
    min_inferences: int = 100
    device_timeout_s: float = 1800.0
    retries: int = 1
    on_breach: BreachPolicy = BreachPolicy.ROLLBACK
    on_timeout: TimeoutPolicy = TimeoutPolicy.FAIL
    max_wave_time_s: float | None = None
    start_paused: bool = False
    name: str | None = None

    _FIELDS = (
        "fleet",
        "artifact",
        "target",
        "waves",
        "min_wave_time",
        "success_threshold",
        "max_failures",
        "gates",
        "min_inferences",
        "device_timeout",
        "retries",
        "on_breach",
        "on_timeout",
        "max_wave_time",
        "start_paused",
        "name",
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, default_fleet: str | None = None) -> RolloutSpec:
        """Parse the REST API's JSON body (strings or numbers, as a person would write them)."""
        if not isinstance(data, Mapping):
            raise SpecError("a rollout must be a JSON object")
        unknown = sorted(set(data) - set(cls._FIELDS))
        if unknown:
            raise SpecError(f"unknown rollout option(s): {', '.join(unknown)}")
        fleet = data.get("fleet") or default_fleet
        if not isinstance(fleet, str) or not fleet:
            raise SpecError("fleet is required (the controller serves several fleets)")
        artifact = data.get("artifact")
        if not isinstance(artifact, str) or not re.fullmatch(r"[0-9a-f]{64}", artifact):
            raise SpecError("artifact must be the sha256 (64 lowercase hex) of an uploaded bundle")
        gates = data.get("gates") or ()
        if isinstance(gates, str):
            gates = [gates]
        if not isinstance(gates, Sequence):
            raise SpecError("gates must be a list of strings such as p95_latency_ms<=30")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise SpecError("name must be a string of at most 200 characters")
        max_wave = data.get("max_wave_time")
        start_paused = data.get("start_paused", False)
        if not isinstance(start_paused, bool):
            raise SpecError("start_paused must be true or false")
        defaults = cls(fleet=fleet, artifact=artifact)
        spec = cls(
            fleet=fleet,
            artifact=artifact,
            target=Selector.parse(data.get("target", "all")),
            waves=parse_waves(data["waves"]) if "waves" in data else defaults.waves,
            min_wave_time_s=parse_duration(
                data.get("min_wave_time", defaults.min_wave_time_s), what="min_wave_time"
            ),
            success_threshold=parse_fraction(
                data.get("success_threshold", defaults.success_threshold),
                what="success_threshold",
            ),
            max_failures=parse_fraction(
                data.get("max_failures", defaults.max_failures), what="max_failures"
            ),
            gates=tuple(Gate.parse(g) for g in gates),
            min_inferences=_int(
                data.get("min_inferences", defaults.min_inferences), "min_inferences", 0, 10**12
            ),
            device_timeout_s=parse_duration(
                data.get("device_timeout", defaults.device_timeout_s), what="device_timeout"
            ),
            retries=_int(data.get("retries", defaults.retries), "retries", 0, 20),
            on_breach=_enum(BreachPolicy, data.get("on_breach", "rollback"), "on_breach"),
            on_timeout=_enum(TimeoutPolicy, data.get("on_timeout", "fail"), "on_timeout"),
            max_wave_time_s=None
            if max_wave in (None, "", 0)
            else parse_duration(max_wave, what="max_wave_time"),
            start_paused=start_paused,
            name=name,
        )
        if spec.device_timeout_s <= 0:
            raise SpecError("device_timeout must be above 0")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; :meth:`from_dict` reads it back to an equal spec."""
        return {
            "fleet": self.fleet,
            "artifact": self.artifact,
            "target": str(self.target),
            "waves": list(self.waves),
            "min_wave_time": self.min_wave_time_s,
            "success_threshold": self.success_threshold,
            "max_failures": self.max_failures,
            "gates": [str(g) for g in self.gates],
            "min_inferences": self.min_inferences,
            "device_timeout": self.device_timeout_s,
            "retries": self.retries,
            "on_breach": self.on_breach.value,
            "on_timeout": self.on_timeout.value,
            "max_wave_time": self.max_wave_time_s,
            "start_paused": self.start_paused,
            "name": self.name,
        }
