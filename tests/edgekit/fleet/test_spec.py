"""What operators write (gates, waves, durations, targets) parses into typed values or is
refused with one line naming the problem."""

from __future__ import annotations

import pytest

from edgekit.fleet.errors import SpecError
from edgekit.fleet.spec import (
    Aggregate,
    BreachPolicy,
    Gate,
    GateVerdict,
    RolloutSpec,
    Selector,
    TimeoutPolicy,
    format_duration,
    parse_duration,
    parse_fraction,
    parse_waves,
)

SHA = "a" * 64


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600),
        ("30s", 30),
        ("1.5h", 5400),
        ("500ms", 0.5),
        ("1h30m", 5400),
        (45, 45),
        ("2", 2),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "ten minutes", "-5s", "5x", True, None, [1]])
def test_bad_durations_are_refused(bad):
    with pytest.raises(SpecError):
        parse_duration(bad)


def test_format_duration_reads_back():
    assert format_duration(5400) == "1h30m"
    assert parse_duration(format_duration(3723)) == 3723


@pytest.mark.parametrize(
    ("text", "share"), [("95%", 0.95), ("0.95", 0.95), (0.95, 0.95), ("95", 0.95), ("0%", 0.0)]
)
def test_fractions(text, share):
    assert parse_fraction(text) == pytest.approx(share)


@pytest.mark.parametrize("bad", ["150%", "-1%", "nan", "abc", True])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(SpecError):
        parse_fraction(bad)


def test_waves_are_cumulative_and_end_at_100_percent():
    assert parse_waves("5%,25%,100%") == (0.05, 0.25, 1.0)
    assert parse_waves([0.1, 1.0]) == (0.1, 1.0)
    for bad in ("25%,5%,100%", "5%,50%", "", "0%,100%", "5%,5%,100%"):
        with pytest.raises(SpecError):
            parse_waves(bad)


def test_gate_parses_into_a_typed_object():
    gate = Gate.parse("p95_latency_ms<=30")
    assert (gate.metric, gate.op, gate.threshold, gate.aggregate) == (
        "p95_latency_ms",
        "<=",
        30.0,
        Aggregate.MEDIAN,
    )
    assert str(gate) == "p95_latency_ms<=30"
    assert Gate.parse("error_rate<=1%").threshold == pytest.approx(0.01)
    assert Gate.parse("golden_pass==1").aggregate is Aggregate.MIN
    strict = Gate.parse("max(drift_psi) < 0.25")
    assert strict.aggregate is Aggregate.MAX and str(strict) == "max(drift_psi)<0.25"
    assert Gate.parse(str(strict)) == strict


@pytest.mark.parametrize(
    "bad", ["latency<=30", "p95_latency_ms=<30", "p95_latency_ms<=", "avg(error_rate)<1", 5]
)
def test_bad_gates_name_the_problem(bad):
    with pytest.raises(SpecError) as info:
        Gate.parse(bad)
    assert "\n" not in str(info.value)


def test_gate_verdicts_on_device_values():
    gate = Gate.parse("p95_latency_ms<=30")
    assert gate.evaluate([]).verdict is GateVerdict.NO_DATA
    assert gate.evaluate([(10.0, 1), (20.0, 1), (90.0, 1)]).verdict is GateVerdict.PASS  # median
    assert Gate.parse("max(p95_latency_ms)<=30").evaluate([(10.0, 1), (90.0, 1)]).verdict is (
        GateVerdict.FAIL
    )
    # pooled error rate: weighted by inferences, not the mean of the rates
    pooled = Gate.parse("error_rate<=0.01").evaluate([(0.5, 10), (0.0, 990)])
    assert pooled.value == pytest.approx(0.005) and pooled.verdict is GateVerdict.PASS
    assert Gate.parse("golden_pass==1").evaluate([(1.0, 5), (0.0, 5)]).verdict is GateVerdict.FAIL


def test_selectors():
    device = {"device": "cam-7", "groups": ["cameras", "line-2"], "model": "tiny", "version": 3}
    device["tag.site"] = "plant-1"
    assert Selector.parse("group=cameras").matches(device)
    assert Selector.parse("group=cameras,tag.site=plant-1").matches(device)
    assert not Selector.parse("group=cameras,tag.site=plant-2").matches(device)
    assert Selector.parse("device=cam-*").matches(device)
    assert Selector.parse("group=sensors|line-2").matches(device)
    assert Selector.parse("model!=other").matches(device)
    assert Selector.parse("all").matches(device)
    assert str(Selector.parse("group = cameras , tag:site=plant-1")) == (
        "group=cameras,tag.site=plant-1"
    )
    for bad in ("", "cameras", "color=red", "group="):
        with pytest.raises(SpecError):
            Selector.parse(bad)


def test_rollout_spec_round_trips_and_defaults():
    spec = RolloutSpec.from_dict(
        {
            "artifact": SHA,
            "target": "group=cameras",
            "waves": "5%,25%,100%",
            "min_wave_time": "10m",
            "success_threshold": "95%",
            "max_failures": "5%",
            "gates": ["p95_latency_ms<=30", "error_rate<=0.01"],
            "on_breach": "pause",
            "on_timeout": "exclude",
        },
        default_fleet="plant-1",
    )
    assert spec.fleet == "plant-1"
    assert spec.min_wave_time_s == 600
    assert spec.on_breach is BreachPolicy.PAUSE and spec.on_timeout is TimeoutPolicy.EXCLUDE
    assert RolloutSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifact", "nothex"),
        ("waves", "50%"),
        ("on_breach", "explode"),
        ("retries", -1),
        ("gates", ["nonsense"]),
        ("device_timeout", 0),
        ("surprise", 1),
    ],
)
def test_rollout_spec_refuses_bad_options(field, value):
    data = {"fleet": "f", "artifact": SHA, field: value}
    with pytest.raises(SpecError):
        RolloutSpec.from_dict(data)
