"""A small client for the controller's REST API (standard library only).

The CLI's ``edgekit fleet devices`` and ``edgekit rollout ...`` commands talk to a running
controller through this class, so they work from any workstation with the base install; they
never open the controller's database themselves. Every failure is a
:class:`~edgekit.fleet.errors.RemoteError` carrying the server's ``reason`` and HTTP status.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgekit.fleet.errors import RemoteError

__all__ = ["CONTROLLER_ENV", "DEFAULT_CONTROLLER", "FleetClient"]

CONTROLLER_ENV = "EDGEKIT_CONTROLLER"
DEFAULT_CONTROLLER = "http://127.0.0.1:8080"


class FleetClient:
    def __init__(
        self, base_url: str, *, token: str | None, timeout: float = 30.0, user: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.user = user if user is not None else os.environ.get("USER")

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        url = self.base_url + path
        if params:
            query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if self.user:
            all_headers["X-Edgekit-User"] = self.user
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                problem = json.loads(raw)
            except ValueError:
                problem = {}
            if not isinstance(problem, dict):
                problem = {}
            detail = problem.get("detail")
            if not isinstance(detail, str):
                detail = json.dumps(detail) if detail is not None else exc.reason
            raise RemoteError(
                f"{method} {path}: HTTP {exc.code}: {detail}",
                status=exc.code,
                reason=str(problem.get("error") or "controller"),
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach the controller at {self.base_url}: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise RemoteError(f"{method} {path}: the controller sent no JSON") from None

    # --- devices ---

    def devices(
        self, *, fleet: str | None = None, target: str | None = None, online: bool | None = None
    ) -> list[dict[str, Any]]:
        result = self._request(
            "GET", "/api/v1/devices", params={"fleet": fleet, "target": target, "online": online}
        )
        return list(result["devices"])

    def device(self, fleet: str, device: str) -> dict[str, Any]:
        path = f"/api/v1/devices/{urllib.parse.quote(fleet)}/{urllib.parse.quote(device)}"
        return dict(self._request("GET", path))

    def label(
        self,
        fleet: str,
        device: str,
        *,
        groups: list[str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if groups is not None:
            body["groups"] = groups
        if tags is not None:
            body["tags"] = tags
        path = f"/api/v1/devices/{urllib.parse.quote(fleet)}/{urllib.parse.quote(device)}"
        return dict(self._request("PATCH", path, body=body))

    def summary(self, *, fleet: str | None = None) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/summary", params={"fleet": fleet}))

    def stats(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v1/stats"))

    # --- artifacts ---

    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        file = Path(path)
        size = file.stat().st_size
        with file.open("rb") as handle:
            try:
                return dict(
                    self._request(
                        "PUT",
                        "/api/v1/artifacts",
                        data=handle,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(size),
                        },
                    )
                )
            except RemoteError as exc:
                if exc.status is not None:
                    raise
                # The controller refuses a bad token before it reads the body and closes the
                # connection, so the refusal can arrive as a broken pipe while the bundle is
                # still being sent. A small request with the same token says what it was
                # (and raises that); if it succeeds, the upload itself failed.
                self.stats()
                raise

    def artifacts(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/artifacts")["artifacts"])

    def artifact(self, ref: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/artifacts/{urllib.parse.quote(ref)}"))

    # --- rollouts ---

    def create_rollout(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._request("POST", "/api/v1/rollouts", body=dict(spec)))

    def rollouts(self, *, fleet: str | None = None) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/rollouts", params={"fleet": fleet})["rollouts"])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v1/rollouts/{urllib.parse.quote(rollout_id)}"))

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        path = f"/api/v1/rollouts/{urllib.parse.quote(rollout_id)}/devices"
        return list(self._request("GET", path)["devices"])

    def rollout_audit(self, rollout_id: str) -> list[dict[str, Any]]:
        path = f"/api/v1/rollouts/{urllib.parse.quote(rollout_id)}/audit"
        return list(self._request("GET", path)["audit"])

    def act(self, rollout_id: str, action: str, **body: Any) -> dict[str, Any]:
        path = f"/api/v1/rollouts/{urllib.parse.quote(rollout_id)}/{action}"
        return dict(self._request("POST", path, body=body or {}))
