"""The disk fills up while a bundle is being staged: the update fails cleanly.

Two ways to run out of space, so the test runs everywhere: a real tiny tmpfs (needs root and
permission to mount; skipped otherwise) and ``RLIMIT_FSIZE`` in a child process, which makes
any write past the limit fail with ``EFBIG`` exactly as a full disk fails with ``ENOSPC``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.bundles import write_onnx_model

from device_agent.updates import Outcome


def _golden(kit, model: Path) -> Path:
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"input": x})[0]
    path = kit.root / "big-golden.npz"
    np.savez(path, **{"input:input": x, "output:probabilities": y})
    return path


def _big_bundle(kit) -> Path:
    model = write_onnx_model(kit.root / "big.onnx", seed=7, features=16, classes=65536)
    kit.models.files["big"] = model
    kit.models.goldens["big"] = _golden(kit, model)
    return kit.bundle(2, "big")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny-fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_tmpfs_fails_cleanly(kit, tiny_tmpfs):
    big = _big_bundle(kit)
    state = tiny_tmpfs / "state"
    state.mkdir()
    (state / "trust.json").write_bytes(kit.trust_bytes)
    kit.state_dir = state
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    before = kit.snapshot()

    result = agent.install(big)

    assert result.outcome is Outcome.REFUSED
    assert (result.reason, result.stage) == ("disk-full", "staging"), result.message
    assert kit.snapshot() == before
    assert not [p for p in (state / "slots").iterdir() if p.name.startswith(".")]
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
    refused = kit.events()[-1]
    assert refused["type"] == "update-refused" and refused["reason"] == "disk-full"


INSTALL_WITH_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from device_agent.agent import Agent
from device_agent.config import AgentConfig
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
with Agent(config=AgentConfig(state_dir=sys.argv[1])) as agent:
    print(json.dumps(agent.install(sys.argv[2], wait_for_health=False).to_dict()))
"""


def test_disk_full_via_file_size_limit_fails_cleanly(kit):
    big = _big_bundle(kit)
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    before = kit.snapshot()

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            INSTALL_WITH_FILE_SIZE_LIMIT,
            str(kit.state_dir),
            str(big),
            str(512 * 1024),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["outcome"], result["reason"], result["stage"]) == (
        "refused",
        "disk-full",
        "staging",
    )
    assert kit.snapshot() == before
    agent = kit.agent()
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"))
