"""The systemd unit keeps its promises: restart on failure, unprivileged, hardened."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "device_agent" / "systemd" / "edgekit-agent.service"


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_restarts_runs_unprivileged_and_is_hardened():
    unit = _directives()
    expected = {
        "Type": "notify",
        "Restart": "on-failure",
        "User": "edgekit",
        "StateDirectory": "edgekit",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ReadWritePaths"] == ["-/var/lib/edgekit"]
    assert unit["SupplementaryGroups"] == ["dialout"]
    assert unit["ExecStart"][0].endswith("edgekit-agent run --config /etc/edgekit/agent.toml")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    unit = tmp_path / "edgekit-agent.service"
    text = UNIT.read_text().replace("/opt/edgekit/venv/bin/edgekit-agent", "/bin/true")
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "edgekit-agent.service" not in done.stderr, done.stderr
