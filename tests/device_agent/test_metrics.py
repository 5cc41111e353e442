"""device_agent.metrics: quantile accuracy, thread safety, Prometheus text format."""

from __future__ import annotations

import bisect
import re
import threading

import numpy as np
import pytest

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
