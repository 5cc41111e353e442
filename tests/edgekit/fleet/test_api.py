"""The REST API's contract: tokens, errors, artifacts (with Range), rollout actions.

The app runs in-process (Starlette's test client) over a controller that was built but not
started: no broker is needed to check what the HTTP side answers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgekit.fleet.api import create_app
from edgekit.fleet.auth import COOKIE_NAME, TokenRing
from edgekit.fleet.errors import SpecError
from edgekit.fleet.server import Controller, ServeConfig

TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(tmp_path: Path):
    config = ServeConfig(
        broker="mqtt://127.0.0.1:1",
        db_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        artifacts=tmp_path / "artifacts",
        tokens=TokenRing({"admin": TOKEN, "ci-bot": "another-token-0123456789"}),
        public_url="http://ctl.example:8080",
        fleet="plant-1",
    )
    controller = Controller(config)
    with TestClient(create_app(controller.api_context())) as client:
        yield client, controller
    controller.db.dispose()


PROTECTED = [
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/summary"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/plant-1/cam-1"),
    ("PATCH", "/api/v1/devices/plant-1/cam-1"),
    ("GET", "/api/v1/artifacts"),
    ("PUT", "/api/v1/artifacts"),
    ("GET", "/api/v1/artifacts/abcdef12"),
    ("GET", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts/r-1"),
    ("GET", "/api/v1/rollouts/r-1/devices"),
    ("GET", "/api/v1/rollouts/r-1/audit"),
    ("POST", "/api/v1/rollouts/r-1/pause"),
    ("POST", "/api/v1/rollouts/r-1/rollback"),
    ("GET", "/api/v1/audit"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_api_endpoint_refuses_a_missing_or_wrong_token(api, method, path):
    client, _ = api
    missing = client.request(method, path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthorized"
    wrong = client.request(method, path, headers={"Authorization": "Bearer not-the-token-000000"})
    assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
    basic = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401


def test_open_endpoints_and_errors(api):
    client, _ = api
    assert client.get("/healthz").json() == {"ok": True}
    missing = client.get("/api/v1/rollouts/r-nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"] == "not-found"
    bad = client.post("/api/v1/rollouts", headers=AUTH, json={"artifact": "x"})
    assert bad.status_code == 422 and bad.json()["error"] == "bad-spec"
    assert client.get("/artifacts/" + "0" * 64 + "/x.ekb").status_code == 404


def test_upload_list_and_download_with_range(api, bundles):
    client, _ = api
    data = bundles[2].read_bytes()
    created = client.put("/api/v1/artifacts", content=data, headers=AUTH)
    assert created.status_code == 201
    artifact = created.json()
    sha = hashlib.sha256(data).hexdigest()
    assert (artifact["sha256"], artifact["name"], artifact["version"]) == (sha, "tiny", 2)
    assert artifact["url"] == f"http://ctl.example:8080/artifacts/{sha}/tiny-2.ekb"
    again = client.put("/api/v1/artifacts", content=data, headers=AUTH)
    assert again.json()["sha256"] == sha  # content-addressed: idempotent
    listed = client.get("/api/v1/artifacts", headers=AUTH).json()["artifacts"]
    assert [a["sha256"] for a in listed] == [sha]
    assert client.get(f"/api/v1/artifacts/{sha[:10]}", headers=AUTH).json()["version"] == 2
    assert client.get("/api/v1/artifacts/tiny-2", headers=AUTH).json()["sha256"] == sha

    path = f"/artifacts/{sha}/tiny-2.ekb"  # no token: devices download these
    full = client.get(path)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes"
    resumed = client.get(path, headers={"Range": "bytes=100-"})
    assert resumed.status_code == 206
    assert resumed.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert resumed.content == data[100:]
    head = client.get(path, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.content == data[:10]
    beyond = client.get(path, headers={"Range": f"bytes={len(data) + 10}-"})
    assert beyond.status_code == 416

    garbage = client.put("/api/v1/artifacts", content=b"not a bundle", headers=AUTH)
    assert garbage.status_code == 422 and garbage.json()["error"] == "artifact"


def test_labels_and_rollout_actions_record_the_actor(api, bundles):
    client, controller = api
    labelled = client.patch(
        "/api/v1/devices/plant-1/cam-1",
        headers={**AUTH, "X-Edgekit-User": "alice"},
        json={"groups": ["cameras"], "tags": {"site": "north"}},
    )
    assert labelled.status_code == 200 and labelled.json()["groups"] == ["cameras"]
    sha = client.put("/api/v1/artifacts", content=bundles[2].read_bytes(), headers=AUTH).json()[
        "sha256"
    ]
    created = client.post(
        "/api/v1/rollouts",
        headers={**AUTH, "X-Edgekit-User": "alice"},
        json={"artifact": sha, "target": "group=cameras", "gates": ["p95_latency_ms<=30"]},
    )
    assert created.status_code == 201
    rollout = created.json()
    assert rollout["fleet"] == "plant-1"  # the controller's own fleet by default
    rid = rollout["id"]
    bot = {"Authorization": "Bearer another-token-0123456789"}
    assert client.post(f"/api/v1/rollouts/{rid}/pause", headers=bot).json()["state"] == "paused"
    again = client.post(f"/api/v1/rollouts/{rid}/pause", headers=bot)
    assert again.status_code == 409 and again.json()["error"] == "invalid-transition"
    aborted = client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH, json={"rollback": True})
    assert aborted.json()["state"] == "rolled-back"
    assert client.post(f"/api/v1/rollouts/{rid}/explode", headers=AUTH).status_code == 404
    trail = client.get(f"/api/v1/rollouts/{rid}/audit", headers=AUTH).json()["audit"]
    assert [(e["actor"], e["action"]) for e in reversed(trail)] == [
        ("admin (alice)", "rollout.created"),
        ("ci-bot", "rollout.paused"),
        ("admin", "rollout.rolled-back"),
    ]
    everything = client.get("/api/v1/audit", headers=AUTH).json()["audit"]
    assert ("admin (alice)", "device.labels") in {(e["actor"], e["action"]) for e in everything}
    assert controller.engine.get(rid)["state"] == "rolled-back"


def test_dashboard_session(api):
    client, _ = api
    login = client.get("/dashboard")
    assert login.status_code == 401 and "API token" in login.text
    assert client.get("/dashboard?token=wrong-token-000000000").status_code == 403
    entered = client.get(f"/dashboard?token={TOKEN}", follow_redirects=False)
    assert entered.status_code == 303 and entered.headers["location"] == "/dashboard"
    cookie = entered.cookies[COOKIE_NAME]
    assert TOKEN not in cookie and cookie.startswith("admin:")
    client.cookies.set(COOKIE_NAME, cookie)
    page = client.get("/dashboard")
    assert page.status_code == 200 and "edgekit fleet" in page.text
    assert 'http-equiv="refresh"' in page.text
    client.cookies.set(COOKIE_NAME, "admin:forged")
    assert client.get("/dashboard").status_code == 401


def test_token_rules():
    with pytest.raises(SpecError):
        TokenRing({})
    with pytest.raises(SpecError):
        TokenRing({"short": "tooshort"})
    ring = TokenRing.load(token="x" * 20)
    assert ring.names == ["operator"] and ring.authenticate("x" * 20) == "operator"
    assert ring.authenticate("y" * 20) is None
