"""``edgekit-agent`` end to end, as an operator runs it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import AgentConfig, HealthConfig

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def device(kit):
    """A fresh state dir without trust: the CLI provisions it."""
    state = kit.root / "device-state"
    kit.state_dir = state
    return kit


def _commit_with_traffic(kit) -> None:
    """What the service does after a sideload: the health window on real requests."""
    config = AgentConfig(state_dir=kit.state_dir, health=HealthConfig(min_inferences=3))
    agent = kit.agent(config)
    for _ in range(3):
        agent.predict(kit.x)
    result = agent.evaluate_health()
    assert result is not None and result.outcome.value == "committed", result
    agent.close()


def test_sideload_install_status_predict_rollback(device):
    kit = device
    state = kit.state_dir
    done = cli("install", kit.bundle(1, "m1"), "--state-dir", state, "--trust", kit.trust_source)
    assert done.returncode == 0, done.stderr
    assert "installed tiny v1" in done.stdout and "health window" in done.stdout
    assert (state / "trust.json").read_bytes() == kit.trust_bytes

    status = json.loads(cli("status", "--state-dir", state, "--json").stdout)
    assert status["active"]["version"] == 1 and status["pending"]["phase"] == "health"
    assert status["pending"]["resume"] is True and status["service_pid"] is None

    # predict serves the installed model: .npy in, .npy out; .npz and folders too.
    np.save(kit.root / "x.npy", kit.x)
    done = cli("predict", "--state-dir", state, "-i", kit.root / "x.npy", "-o", kit.root / "y.npy")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(kit.root / "y.npy"), kit.expected("m1"), rtol=1e-6)
    batches = kit.root / "batches"
    batches.mkdir()
    np.save(batches / "a.npy", kit.x[:2])
    np.savez(batches / "b.npz", input=kit.x[2:])
    done = cli("predict", "--state-dir", state, "-i", batches, "-o", kit.root / "y.npz")
    assert done.returncode == 0, done.stderr
    with np.load(kit.root / "y.npz") as out:
        np.testing.assert_allclose(out["probabilities"], kit.expected("m1"), rtol=1e-6)

    _commit_with_traffic(kit)
    done = cli("install", kit.bundle(2, "m2"), "--state-dir", state)  # trust already there
    assert done.returncode == 0, done.stderr
    _commit_with_traffic(kit)

    done = cli("rollback", "--state-dir", state, "--reason", "field test", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 1
    text = cli("status", "--state-dir", state).stdout
    assert "active      tiny v1" in text and "floor       2" in text
    assert "rolled-back tiny v1 [field test]" in text

    # Anti-rollback: v2 was committed once, so it is refused now; exit code 1, one line.
    done = cli("install", kit.bundle(2, "m2"), "--state-dir", state)
    assert done.returncode == 1
    assert done.stderr.startswith("edgekit-agent: rollback: verify refused the update")
    assert len(done.stderr.strip().splitlines()) == 1


def test_refusals_exit_1_with_one_line(device):
    kit = device
    state = kit.state_dir
    done = cli("install", kit.bundle(1, "m1"), "--state-dir", state)
    assert done.returncode == 1 and "no-trust" in done.stderr
    other = kit.root / "other-trust.json"
    other.write_bytes(kit.trust_bytes.replace(b'"payload"', b'"payload" ', 1))
    cli("install", kit.bundle(1, "m1"), "--state-dir", state, "--trust", kit.trust_source)
    done = cli("install", kit.bundle(2, "m1"), "--state-dir", state, "--trust", other)
    assert done.returncode == 1 and "trust-differs" in done.stderr
    done = cli("install", kit.bundle(3, "m2"), "--state-dir", state)
    assert done.returncode == 1 and "update-in-progress" in done.stderr  # v1 on probation
    # v1 is still on probation: a rollback aborts it, leaving no model; a second has nothing.
    done = cli("rollback", "--state-dir", state)
    assert done.returncode == 0 and "rolled back" in done.stdout
    assert json.loads(cli("status", "--state-dir", state, "--json").stdout)["active"] is None
    done = cli("rollback", "--state-dir", state)
    assert done.returncode == 1 and "no-previous" in done.stderr
    done = cli("install", kit.bundle(3, "m2", keys="B"), "--state-dir", state)
    assert done.returncode == 1 and "untrusted-key" in done.stderr


def test_usage_errors_exit_2(device, tmp_path):
    assert cli().returncode == 2
    assert cli("predict", "--state-dir", tmp_path).returncode == 2
    assert cli("install", tmp_path / "missing.ekb", "--state-dir", tmp_path).returncode == 2
    bad = cli("predict", "--state-dir", tmp_path, "-i", tmp_path, "-o", tmp_path / "y.txt")
    assert bad.returncode == 2 and "usage" in bad.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgekit-agent ")


def test_config_errors_exit_1_naming_the_key(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("[health]\nmin_inference = 5\n")
    done = cli("status", "--config", config)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "edgekit-agent: config: agent.toml: health.min_inference is not a known key (known "
        "here: max_error_rate, max_p95_ms, max_seconds, min_inferences, on_timeout)"
    )


def test_install_refuses_while_the_service_owns_the_state_dir(kit):
    kit.agent()  # the running service
    done = cli("install", kit.bundle(1), "--state-dir", kit.state_dir)
    assert done.returncode == 1 and "state-locked" in done.stderr
    assert f"pid {os.getpid()}" in done.stderr
    status = json.loads(cli("status", "--state-dir", kit.state_dir, "--json").stdout)
    assert status["service_pid"] == os.getpid()


def test_run_resumes_the_sideloaded_update_and_stops_cleanly_on_sigterm(device):
    kit = device
    state = kit.state_dir
    done = cli("install", kit.bundle(1, "m1"), "--state-dir", state, "--trust", kit.trust_source)
    assert done.returncode == 0, done.stderr
    config = kit.root / "agent.toml"
    sock_path = kit.root / "api.sock"
    config.write_text(
        f'state_dir = "{state}"\n'
        "[health]\nmin_inferences = 1000\nmax_seconds = 0.3\n"
        f'[http]\nunix_socket = "{sock_path}"\n'
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = kit.root / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(30)
    service = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
        cwd=REPO,
        env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notify.recv(4096).decode().startswith("READY=1")
        try:
            import device_agent.http_api  # noqa: F401
        except ImportError:
            pass
        else:
            assert sock_path.exists()
        deadline = time.monotonic() + 30
        while "committed" not in [e["type"] for e in kit.events()]:
            assert time.monotonic() < deadline, "the service did not decide the health window"
            time.sleep(0.05)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        notify.close()
    types = kit.event_types()
    run = types[types.index("health-resumed") :]  # the events of the service run
    assert run.index("committed") < run.index("agent-stopped") == len(run) - 1
    assert json.loads((state / "state.json").read_bytes())["installed_version"] == 1
