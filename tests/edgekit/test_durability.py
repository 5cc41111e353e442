"""Kill -9 at random instants: what is on disk afterwards is always the old state or the new one.

Each test starts a real writer process, kills it at a random moment while it works, and checks
the invariant; ``remove_leftovers`` then clears the temp files a killed writer leaves behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.bundles import write_onnx_model

from edgekit.bundle import build_bundle
from edgekit.fsutil import remove_leftovers
from edgekit.keys import SigningKey
from edgekit.trust import TrustEnvelope, TrustPolicy, load_trust
from edgekit.verify import verify_bundle

KILLS = 12


def big_model(path: Path) -> Path:
    # ~24 MiB: writing it takes long enough that most kills land mid-write.
    return write_onnx_model(path, features=1024, classes=6000)


def run_and_kill(code: str, *args: str, delay: float) -> bool:
    """Start ``code`` in a child; SIGKILL it ``delay`` s after it says it is ready.

    Returns True if the child was killed before it finished on its own.
    """
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=delay)
    finished = child.poll() is not None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return not finished


INSTALL = """
import sys
from edgekit.trust import load_trust
from edgekit.verify import verify_bundle
policy = load_trust(sys.argv[1]).policy
print("ready", flush=True)
verify_bundle(sys.argv[2], policy, install_to=sys.argv[3])
"""


def test_install_killed_at_any_instant_leaves_nothing_or_everything(
    tmp_path: Path, signers: dict[str, SigningKey], trust_file: Path
):
    model = big_model(tmp_path / "model.onnx")
    bundle = tmp_path / "big.ekb"
    manifest = build_bundle(model, bundle, name="big", version=1, keys=[signers["A"]])
    slots = tmp_path / "slots"
    slots.mkdir()
    # How long one install takes here, so the kills land inside it.
    start = time.perf_counter()
    run_and_kill(INSTALL, str(trust_file), str(bundle), str(slots / "timing"), delay=30)
    duration = time.perf_counter() - start
    rng = random.Random(1)
    outcomes = set()
    for attempt in range(KILLS):
        destination = slots / f"staging-{attempt}"
        killed = run_and_kill(
            INSTALL,
            str(trust_file),
            str(bundle),
            str(destination),
            delay=rng.uniform(0.0, duration),
        )
        if destination.exists():
            # Complete: every file present with the signed hash.
            for name, entry in manifest.files.items():
                digest = hashlib.sha256((destination / name).read_bytes()).hexdigest()
                assert digest == entry.sha256
            outcomes.add("installed")
        else:
            outcomes.add("absent")
        outcomes.add("killed" if killed else "finished")
        if remove_leftovers(slots):
            outcomes.add("interrupted mid-write")
        assert all(not p.name.startswith(".") for p in slots.iterdir())
    assert "interrupted mid-write" in outcomes  # the kills really landed inside installs


SIGN = """
import sys
from edgekit.bundle import build_bundle
from edgekit.keys import load_signing_key
key = load_signing_key(sys.argv[3])
print("ready", flush=True)
for version in range(2, 1000):
    build_bundle(sys.argv[1], sys.argv[2], name="big", version=version, keys=[key])
"""


def test_sign_killed_at_any_instant_leaves_a_valid_bundle(
    tmp_path: Path, signers: dict[str, SigningKey], trust_file: Path
):
    model = big_model(tmp_path / "model.onnx")
    key_file = tmp_path / "a.key"
    key_file.write_bytes(signers["A"].to_pem(None))
    bundle = tmp_path / "big.ekb"
    build_bundle(model, bundle, name="big", version=1, keys=[signers["A"]])
    policy = load_trust(trust_file).policy
    rng = random.Random(2)
    versions = set()
    for _ in range(KILLS // 2):
        run_and_kill(SIGN, str(model), str(bundle), str(key_file), delay=rng.uniform(0.1, 1.0))
        versions.add(verify_bundle(bundle, policy).manifest.version)
        remove_leftovers(tmp_path)
    assert len(versions) > 1  # the writer did replace the bundle between kills


TRUST = """
import sys
from pathlib import Path
from edgekit.trust import TrustEnvelope, apply_rotations
chain = [TrustEnvelope.from_bytes(Path(p).read_bytes()) for p in sys.argv[2:]]
print("ready", flush=True)
apply_rotations(sys.argv[1], chain)
"""


def test_trust_update_killed_at_any_instant_is_old_or_new(
    tmp_path: Path, signers: dict[str, SigningKey]
):
    v1 = TrustEnvelope.unsigned(TrustPolicy.create([("A", signers["A"].public)], threshold=1))
    v2 = TrustEnvelope.unsigned(
        TrustPolicy.create([("B", signers["B"].public)], threshold=1, version=2)
    ).signed_by(signers["A"], signers["B"])
    (tmp_path / "v2.json").write_bytes(v2.to_bytes())
    rng = random.Random(3)
    seen = set()
    for _ in range(KILLS):
        device = tmp_path / "device"
        device.mkdir(exist_ok=True)
        trust = device / "trust.json"
        trust.write_bytes(v1.to_bytes())
        run_and_kill(TRUST, str(trust), str(tmp_path / "v2.json"), delay=rng.uniform(0, 0.05))
        data = trust.read_bytes()
        assert data in (v1.to_bytes(), v2.to_bytes())
        seen.add(json.loads(data)["payload"] == json.loads(v2.to_bytes())["payload"])
        remove_leftovers(device)
        assert [p.name for p in device.iterdir()] == ["trust.json"]


@pytest.mark.parametrize("name", [".model.onnx.abc.tmp", ".staging.x1.partial"])
def test_remove_leftovers_only_touches_temp_names(tmp_path: Path, name: str):
    keep = tmp_path / "trust.json"
    keep.write_text("{}")
    (tmp_path / "active").mkdir()
    leftover = tmp_path / name
    if name.endswith(".partial"):
        leftover.mkdir()
        (leftover / "model.onnx").write_bytes(b"half")
    else:
        leftover.write_bytes(b"half")
    assert remove_leftovers(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["active", "trust.json"]
