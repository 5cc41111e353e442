"""GET /v1/health, /v1/model and /metrics."""

from __future__ import annotations

import re
from typing import Any

from http_helpers import FEATURES, Client, connect
from http_runtime_service import RuntimeService

from device_agent.http_api import PROMETHEUS_TYPE
from device_agent.service import InferenceService

GOOD = {"inputs": [[0.5] * FEATURES]}

# One sample line of the text exposition format 0.0.4: name, optional labels, a value.
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? '
    r"(-?[0-9.]+(e[+-]?[0-9]+)?|[+-]Inf|NaN)$"
)
COMMENT = re.compile(r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                     r"(counter|gauge|histogram|summary|untyped))$")  # fmt: skip


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` after checking every line's syntax."""
    assert text.endswith("\n")
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert COMMENT.match(line), line
            continue
        assert SAMPLE.match(line), line
        key, value = line.rsplit(" ", 1)
        assert key not in values, f"duplicate series {key}"
        values[key] = float(value)
    return values


def test_health_ok_is_200(client: Client) -> None:
    reply = client.get("/v1/health")
    assert reply.status == 200
    assert reply.json()["status"] == "ok"


def test_health_degraded_is_503(client: Client, service: Any) -> None:
    service.status_override = "degraded"
    reply = client.get("/v1/health")
    assert reply.status == 503
    assert reply.json()["status"] == "degraded"


def test_health_without_a_model_is_503(start_api: Any) -> None:
    reply = connect(start_api(RuntimeService(None))).get("/v1/health")
    assert reply.status == 503
    assert reply.json()["status"] == "no-model"


def test_head_health_has_headers_and_no_body(client: Client) -> None:
    reply = client.request("HEAD", "/v1/health")
    assert reply.status == 200
    assert int(reply.headers["Content-Length"]) > 0
    assert reply.body == b""
    assert client.get("/v1/health").status == 200  # the connection is still in step


def test_model_info(client: Client) -> None:
    reply = client.get("/v1/model")
    assert reply.status == 200
    info = reply.json()
    assert (info["name"], info["version"], info["runtime"]) == ("tiny", "1.0.0", "onnxruntime")
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", FEATURES]}]
    assert [o["name"] for o in info["outputs"]] == ["probabilities"]


def test_metrics_parse_and_count_predictions(client: Client) -> None:
    reply = client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == PROMETHEUS_TYPE
    before = samples(reply.body.decode())
    assert before["edgekit_inferences_total"] == 0
    for _ in range(5):
        assert client.predict_json(GOOD).status == 200
    client.predict_json({"inputs": [[1.0]]})  # rejected by the runtime: wrong shape
    client.post(b"{", "application/json")  # rejected by the HTTP layer: invalid JSON
    after = samples(client.get("/metrics").body.decode())
    assert after["edgekit_inferences_total"] == 5
    assert after["edgekit_rejected_inputs_total"] == 2
    assert after["edgekit_inference_errors_total"] == 0
    assert after["edgekit_inference_latency_seconds_count"] == 5
    assert after['edgekit_inference_latency_seconds_bucket{le="+Inf"}'] == 5
    assert after["edgekit_inference_latency_seconds_sum"] > 0
    assert after["edgekit_http_open_connections"] >= 1
    buckets = [v for k, v in after.items() if k.startswith("edgekit_inference_latency_seconds_b")]
    assert buckets == sorted(buckets)  # cumulative


def test_metrics_labels_are_on_every_series(service: Any, start_api: Any) -> None:
    api = start_api(service, metrics_labels={"device": 'cam-"7"'})
    text = connect(api).get("/metrics").body.decode()
    values = samples(text)
    assert values
    assert all('device="cam-\\"7\\""' in key for key in values)


def test_the_test_service_implements_the_protocol(service: Any) -> None:
    assert isinstance(service, InferenceService)
