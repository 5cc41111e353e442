"""The dashboard, rendered by a real browser: Debian's chromium, headless, no downloads."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (Debian package chromium)")


def dump_dom(url: str, profile: Path) -> str:
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_dashboard_shows_devices_and_rollout_progress(
    sqlite_url, start_controller, simulate, bundles, kit, tmp_path
):
    sim = simulate(devices=6)
    controller = start_controller(sqlite_url)
    kit.wait_devices(controller.client, 6)
    artifact = controller.client.upload(bundles[2])
    rid = controller.client.create_rollout(
        kit.rollout_options(artifact["sha256"], waves="50%,100%", min_wave_time="1h")
    )["id"]
    kit.wait_state(controller.client, rid, {"waiting"}, timeout=30)  # wave 1 done, gates held
    sim.go_offline("sim-0005")
    kit.wait_for(lambda: controller.client.summary()["offline"] == 1, what="the offline device")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{controller.url}/dashboard", timeout=10)
    assert refused.value.code == 401

    dom = dump_dom(f"{controller.url}/dashboard?token={kit.TOKEN}", tmp_path / "profile")
    for device in sim.device_ids():
        assert device in dom
    assert dom.count('class="device"') == 6
    assert '<span class="on">online</span>' in dom and '<span class="off">offline</span>' in dom
    assert f"rollout-{rid}" in dom and ">waiting<" in dom
    assert "wave 1 ◀" in dom and 'role="progressbar"' in dom
    assert "tiny:2" in dom and "tiny:1" in dom  # model versions: 3 moved, 3 not yet
    assert "rollout.created" in dom  # the audit log
