"""device_agent.metrics: quantile accuracy, thread safety, Prometheus text format."""

from __future__ import annotations

import bisect
import re
import threading

import numpy as np
import pytest

from device_agent.errors import InputError
from device_agent.metrics import DEFAULT_BUCKETS_MS, LatencyHistogram, Metrics

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? (?P<value>-?[0-9.]+(e[+-]?[0-9]+)?)$'
)


def bucket_width(value_ms: float) -> float:
    """Width of the bucket that holds ``value_ms`` (the bound the estimate is promised)."""
    bounds = (0.0, *DEFAULT_BUCKETS_MS, DEFAULT_BUCKETS_MS[-1] * 2)
    index = max(bisect.bisect_left(bounds, value_ms), 1)
    return bounds[index] - bounds[index - 1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_quantiles_within_one_bucket_of_numpy(seed: int, q: float) -> None:
    rng = np.random.default_rng(seed)
    latencies_ms = rng.lognormal(mean=1.0, sigma=1.0, size=5000)  # median ~2.7 ms, long tail
    metrics = Metrics()
    for ms in latencies_ms:
        metrics.observe(ms / 1000.0)
    snap = metrics.snapshot()
    estimate = snap.histogram.quantile(q)
    assert estimate is not None
    truth = float(np.percentile(latencies_ms, q * 100))
    assert abs(estimate - truth) <= bucket_width(truth), (q, estimate, truth)
    if q in (0.5, 0.95, 0.99):
        reported = {0.5: snap.p50_ms, 0.95: snap.p95_ms, 0.99: snap.p99_ms}[q]
        assert reported == pytest.approx(estimate)


def test_quantile_of_identical_values_stays_in_their_bucket() -> None:
    histogram = LatencyHistogram()
    for _ in range(100):
        histogram.observe(3.0)  # bucket (2.5, 4.0]
    for q in (0.01, 0.5, 1.0):
        estimate = histogram.quantile(q)
        assert estimate is not None and 2.5 <= estimate <= 4.0


def test_quantile_before_any_observation_is_none() -> None:
    assert Metrics().snapshot().p50_ms is None


def test_failed_inferences_count_but_do_not_skew_latency() -> None:
    metrics = Metrics()
    metrics.observe(0.002)
    metrics.observe(5.0, ok=False)
    metrics.reject()
    snap = metrics.snapshot()
    assert (snap.inferences, snap.errors, snap.rejected_inputs) == (2, 1, 1)
    assert snap.histogram.total == 1
    assert snap.error_rate == 0.5


def test_concurrent_observe_loses_nothing() -> None:
    metrics = Metrics()
    threads, per_thread = 8, 5000
    values = [((i % 97) + 1) / 10_000 for i in range(per_thread)]  # 0.1 .. 9.7 ms
    start = threading.Barrier(threads + 1)
    inconsistent: list[str] = []

    def observe() -> None:
        start.wait()
        for index, seconds in enumerate(values):
            metrics.observe(seconds, ok=index % 100 != 0)

    def read() -> None:
        start.wait()
        for _ in range(200):
            snap = metrics.snapshot()
            if sum(snap.histogram.counts) != snap.histogram.total:
                inconsistent.append("histogram counts disagree with its total")
            metrics.render_prometheus()

    workers = [threading.Thread(target=observe) for _ in range(threads)]
    reader = threading.Thread(target=read)
    for thread in [*workers, reader]:
        thread.start()
    for thread in [*workers, reader]:
        thread.join(60)
    snap = metrics.snapshot()
    failed = threads * sum(1 for i in range(per_thread) if i % 100 == 0)
    assert snap.inferences == threads * per_thread
    assert snap.errors == failed
    assert snap.histogram.total == threads * per_thread - failed
    assert sum(snap.histogram.counts) == snap.histogram.total
    expected_sum = threads * sum(v * 1000 for i, v in enumerate(values) if i % 100 != 0)
    assert snap.histogram.sum_ms == pytest.approx(expected_sum)
    assert not inconsistent


def parse(text: str) -> list[tuple[str, str, float]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        rows.append((match["name"], match["labels"] or "", float(match["value"])))
    return rows


def test_prometheus_histogram_is_cumulative_and_ends_at_the_count() -> None:
    metrics = Metrics()
    rng = np.random.default_rng(0)
    latencies_ms = np.concatenate([rng.lognormal(1.0, 1.5, 1000), [0.05, 20_000.0]])
    for ms in latencies_ms:
        metrics.observe(ms / 1000.0)
    text = metrics.render_prometheus()
    assert text.endswith("\n")
    rows = parse(text)
    buckets = [(labels, v) for name, labels, v in rows if name.endswith("_bucket")]
    values = [v for _, v in buckets]
    assert values == sorted(values)
    assert buckets[-1][0] == '{le="+Inf"}'
    count = next(v for n, _, v in rows if n == "edgekit_inference_latency_seconds_count")
    total = next(v for n, _, v in rows if n == "edgekit_inference_latency_seconds_sum")
    assert buckets[-1][1] == count == len(latencies_ms)
    assert total == pytest.approx(latencies_ms.sum() / 1000.0, abs=1e-5)
    # each finite bucket counts exactly the observations at or below its bound
    for labels, value in buckets[:-1]:
        bound_s = float(labels.split('"')[1])
        assert value == np.count_nonzero(latencies_ms / 1000.0 <= bound_s * (1 + 1e-9))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types["edgekit_inferences_total"] == "counter"
    assert types["edgekit_inference_latency_seconds"] == "histogram"


def test_prometheus_labels_are_escaped_and_gauges_added() -> None:
    metrics = Metrics()
    metrics.observe(0.001)
    text = metrics.render_prometheus(
        labels={"device": 'cam "7"\\x\nnext'}, gauges={"edgekit_temperature_celsius": 61.5}
    )
    rows = parse(text)
    assert all(labels.startswith('{device="cam \\"7\\"\\\\x\\nnext"') for _, labels, _ in rows)
    assert ("edgekit_temperature_celsius", '{device="cam \\"7\\"\\\\x\\nnext"}', 61.5) in rows


def test_batched_fold_equals_one_observation_at_a_time() -> None:
    """The NumPy fold must bucket exactly like bisect: values on a bound, between bounds, below
    the first and above the last."""
    rng = np.random.default_rng(5)
    values_ms = np.concatenate(
        [
            np.array(DEFAULT_BUCKETS_MS),  # exactly on every bound: counted in that bucket
            np.nextafter(np.array(DEFAULT_BUCKETS_MS), np.inf),  # just above: the next one
            [0.0, 0.01, 20_000.0, 1e9],
            rng.lognormal(1.0, 2.0, 3000),
        ]
    )
    one_by_one = LatencyHistogram()
    for value in values_ms:
        one_by_one.observe(float(value))
    batched = LatencyHistogram()
    batched.observe_many(values_ms[:1000])
    batched.observe_many(values_ms[1000:])
    batched.observe_many(np.array([], np.float64))
    assert batched.counts == one_by_one.counts
    assert batched.total == one_by_one.total == len(values_ms)
    assert batched.sum_ms == pytest.approx(one_by_one.sum_ms)


def test_intake_is_folded_when_full_so_memory_stays_bounded() -> None:
    metrics = Metrics()
    for i in range(3 * Metrics.FOLD_EVERY + 10):
        if i % 3 == 0:
            metrics.reject()  # a flood of bad requests is bounded too
        else:
            metrics.observe(0.001, ok=i % 3 == 1)
        assert len(metrics.intake) < Metrics.FOLD_EVERY
    snap = metrics.snapshot()
    assert len(metrics.intake) == 0
    total = 3 * Metrics.FOLD_EVERY + 10
    rejected = len(range(0, total, 3))
    assert snap.rejected_inputs == rejected
    assert snap.inferences == total - rejected
    assert snap.errors == len(range(2, total, 3))
    assert snap.histogram.total == len(range(1, total, 3))


def test_agent_counts_every_request_across_folds(kit) -> None:
    """Agent.predict records latencies inline (not through Metrics.observe): every request is
    counted, successful ones in the histogram, across several folds."""
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    base = agent.metrics.snapshot()
    calls = 2 * Metrics.FOLD_EVERY + 7
    x = kit.x[:1]
    for _ in range(calls):
        agent.predict(x)
    with pytest.raises(InputError, match="expected shape"):
        agent.predict(np.ones((1, 3), np.float32))
    snap = agent.metrics.snapshot()
    assert snap.inferences - base.inferences == calls
    assert snap.histogram.total - base.histogram.total == calls
    assert snap.rejected_inputs - base.rejected_inputs == 1
    assert snap.errors == 0
    assert snap.p50_ms is not None and 0 < snap.p50_ms < 1000
