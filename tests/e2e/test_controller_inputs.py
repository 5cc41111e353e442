"""What the controller does with input it must refuse: malformed MQTT messages on every
ingest topic, and REST calls without a token or with a wrong one.

The malformed messages are published by a plain paho client straight onto the broker the real
agents use, as a broken or hostile device would. The controller must drop and count each one
(per topic kind, visible in ``GET /api/v1/stats`` and ``edgekit fleet stats``), and go on
ingesting the real agents as if nothing happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgekit.protocol import Event, Telemetry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _publish(fleet, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="e2e-garbage",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect(fleet.broker.host, fleet.broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _valid_telemetry(device: str) -> dict:
    return Telemetry(device=device, seq=1, interval_s=1.0, uptime_s=1.0).to_dict()


def test_malformed_messages_on_every_ingest_topic_are_counted_and_dropped(make_fleet, e2e):
    fleet = make_fleet(install=None, traffic=False)  # agents without a model still report
    base = f"edgekit/v1/{e2e.FLEET}"
    real = fleet.agents[0].device
    before = fleet.client.stats()["ingest"]
    assert before["malformed_total"] == 0
    wrong_types = _valid_telemetry(real)
    wrong_types["inference"]["count"] = "many"
    other_device = Event(device="someone-else", seq=1, event="error", message="x").to_dict()
    huge = json.dumps({"schema": 1, "kind": "reported", "pad": "x" * 70_000}).encode()
    garbage = [
        (f"{base}/{real}/status", b"{not json"),
        (f"{base}/{real}/status", b'{"schema": 1, "kind": "status", "state": "sideways"}'),
        (f"{base}/{real}/telemetry", json.dumps(wrong_types).encode()),
        (f"{base}/{real}/telemetry", b"\xff\xfe binary"),
        (f"{base}/{real}/events", json.dumps(other_device).encode()),  # device != topic's
        (f"{base}/{real}/events", b"[1, 2, 3]"),
        (f"{base}/{real}/reported", huge),  # over the 64 KiB limit
        (f"{base}/{real}/reported", b'{"schema": 0, "kind": "reported"}'),
        (f"{base}/-bad id-/status", json.dumps(_valid_telemetry(real)).encode()),  # topic
    ]
    _publish(fleet, garbage)
    expected = {"status": 2, "telemetry": 2, "events": 2, "reported": 2, "topic": 1}
    e2e.wait_for(
        lambda: fleet.client.stats()["ingest"]["malformed"] == expected,
        what=f"the malformed counters to reach {expected}",
    )
    assert fleet.controller.alive
    # The real agents' reports are still ingested: telemetry keeps arriving, all online.
    processed = fleet.client.stats()["ingest"]["processed"].get("telemetry", 0)
    e2e.wait_for(
        lambda: fleet.client.stats()["ingest"]["processed"].get("telemetry", 0) > processed + 3,
        what="more telemetry from the real agents",
    )
    assert fleet.online() == len(fleet.agents)
    registry = {d["device"]: d for d in fleet.client.devices(fleet=e2e.FLEET)}
    assert sorted(registry) == sorted(a.device for a in fleet.agents)  # no phantom device
    assert registry[real]["online"] is True
    shown = fleet.edgekit("fleet", "stats")
    assert shown.returncode == 0, shown.stderr
    assert "malformed=9" in shown.stdout and "malformed topic: 1" in shown.stdout


def _call(url: str, *, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


ENDPOINTS = [
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/summary"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/artifacts"),
    ("PUT", "/api/v1/artifacts"),
    ("GET", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts/r-00000000/abort"),
    ("GET", "/api/v1/audit"),
]


def test_rest_calls_without_or_with_a_wrong_token_are_refused(make_fleet, release, e2e):
    fleet = make_fleet(start=False, install=None)
    fleet.broker.start()
    fleet.controller.start()  # the API needs no agents
    base = fleet.controller.url
    for method, path in ENDPOINTS:
        body = b"{}" if method in ("POST", "PUT") else None
        status, headers, raw = _call(base + path, method=method, body=body)
        assert status == 401, (method, path, status, raw)
        assert headers.get("WWW-Authenticate") == "Bearer"
        assert json.loads(raw)["error"] == "unauthorized"
        for header in ("Bearer wrong-token-0123456789", f"Bearer {fleet.token}x"):
            status, _, raw = _call(
                base + path, method=method, body=body, headers={"Authorization": header}
            )
            assert status == 403, (method, path, header, status, raw)
            assert json.loads(raw)["error"] == "forbidden"
        # Not a bearer token at all: as if there were none.
        status, _, _ = _call(
            base + path, method=method, body=body, headers={"Authorization": f"Basic {fleet.token}"}
        )
        assert status == 401
    # Nothing was created by the refused calls; the right token works.
    status, _, raw = _call(
        base + "/api/v1/artifacts", headers={"Authorization": f"Bearer {fleet.token}"}
    )
    assert status == 200 and json.loads(raw) == {"artifacts": []}
    assert fleet.client.rollouts() == []
    # The CLI says why, in one line, with a non-zero exit.
    env_token = fleet.cli_env()
    env_token["EDGEKIT_FLEET_TOKEN"] = "wrong-token-0123456789"
    denied = subprocess.run(
        [sys.executable, "-m", "edgekit", "rollout", "create", str(release.bundles[2])],
        capture_output=True,
        text=True,
        env=env_token,
        timeout=60,
    )
    assert denied.returncode == 1 and "403" in denied.stderr, denied.stderr
    assert fleet.client.artifacts() == []  # the upload was refused too
    # Unauthenticated by design: liveness, and the dashboard's login page (no data on it).
    assert _call(base + "/healthz")[0] == 200
    status, _, page = _call(base + "/dashboard")
    assert status == 401 and b"agent-1" not in page
    assert _call(base + "/dashboard?token=wrong-token-0123456789")[0] == 403
