"""The end-to-end demo behind ``./demo.sh``: every step is a real command.

Two parts, run one after the other (``--part`` picks one):

* **foundation** (this module): a small real ONNX model (a digit classifier fitted in closed
  form with NumPy on synthetic 8x8 "digits"), run with ONNX Runtime to record a golden
  self-test set, then keys → trust → sign → co-sign → verify → inspect, and the verifier
  refusing a tampered bundle, a replayed old version and a bundle signed by an unknown key.
  Needs the ``convert`` extra (numpy, onnx, onnxruntime).
* **fleet** (:mod:`edgekit.fleet_demo`): mosquitto, the controller and three real agent
  processes; models converted with ``edgekit convert`` and rolled out in waves, then a broken
  release that the devices' self-test refuses and the rollout takes back by itself. Needs the
  ``agent``, ``convert`` and ``fleet`` extras, scikit-learn and mosquitto (``./demo.sh``
  installs them).

Each part's files stay in its own folder under ``--dir``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["edgekit_command", "main", "step", "write_linear_classifier"]

PARTS = ("foundation", "fleet")
PART_TITLES = {
    "foundation": "a signed bundle, the device's trust policy, and the attacks it refuses",
    "fleet": "a controller and three real agents: rollouts in waves, a broken release",
}


def step(title: str) -> None:
    """A numbered heading, so each step stands out in a terminal."""
    print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def edgekit_command(
    *args: object, expect_failure: bool = False, env: Mapping[str, str] | None = None
) -> str:
    """Run ``edgekit ARGS`` as the reader would type it, print the command and its output,
    and stop the demo when it does not succeed (or, with ``expect_failure``, when it does)."""
    command = [sys.executable, "-m", "edgekit", *map(str, args)]
    print("$ edgekit " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    # Rich sizes tables to the terminal; captured output has none, so give it a width.
    environment = {"COLUMNS": os.environ.get("COLUMNS", "150"), **(env or os.environ)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print(output, flush=True)
    if expect_failure != (result.returncode != 0):
        raise SystemExit(f"demo step did not behave as expected (exit {result.returncode})")
    return output


def write_linear_classifier(path: Path, weights: Any, bias: Any) -> Path:
    """``softmax(image @ weights + bias)`` as a checked ONNX model: input ``image`` [N,64],
    output ``probabilities`` [N,10]. Both parts of the demo build their digit classifiers
    with it (from least squares here, from scikit-learn in the fleet part)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["image", "W", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(np.asarray(weights, np.float32), "W"),
            numpy_helper.from_array(np.asarray(bias, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_model(directory: Path) -> tuple[Path, Path]:
    """A 64→10 linear classifier over synthetic digit images, and its golden set."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(42)
    prototypes = rng.uniform(0, 16, size=(10, 64)).astype(np.float32)
    labels = rng.integers(0, 10, size=2000)
    images = prototypes[labels] + rng.normal(0, 3, size=(2000, 64)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[labels]
    design = np.hstack([images, np.ones((len(images), 1), np.float32)])
    solution = np.linalg.lstsq(design, onehot, rcond=None)[0].astype(np.float32)
    model_path = write_linear_classifier(directory / "digits.onnx", solution[:64], solution[64])

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    sample = images[:16]
    (outputs,) = session.run(None, {"image": sample})
    accuracy = float((session.run(None, {"image": images})[0].argmax(1) == labels).mean())
    print(
        f"built {model_path.name}: ONNX Runtime {ort.__version__}, accuracy {accuracy:.1%} "
        f"on {len(labels)} synthetic digits"
    )
    golden_path = directory / "golden.npz"
    np.savez(
        golden_path,
        **{
            "input:image": sample,
            "output:probabilities": outputs,
            "atol:probabilities": np.float32(1e-4),
        },
    )
    return model_path, golden_path


def run_foundation(work: Path) -> None:
    """Keys, trust, signing, verification and the attacks the verifier refuses."""
    (work / "keys").mkdir(parents=True)

    step("1. Build a small model and its golden self-test set")
    model, golden = build_model(work)

    step("2. Create two release keys (keep the .key files offline)")
    edgekit_command("keys", "generate", "release-a", "--dir", work / "keys")
    edgekit_command("keys", "generate", "release-b", "--dir", work / "keys")

    step("3. The device trust policy: both keys listed, both must sign")
    trust = work / "trust.json"
    edgekit_command(
        "trust",
        "init",
        "--key",
        work / "keys/release-a.pub",
        "--key",
        work / "keys/release-b.pub",
        "--threshold",
        "2",
        "-o",
        trust,
    )

    step("4. Sign the model into a bundle, then co-sign it")
    bundle = work / "digits-2.ekb"
    edgekit_command(
        "sign",
        model,
        "--key",
        work / "keys/release-a.key",
        "--name",
        "digits",
        "--version",
        "2",
        "--display-version",
        "1.0.0",
        "--golden",
        golden,
        "--expires",
        "90d",
        "-o",
        bundle,
    )
    edgekit_command("verify", bundle, "--trust", trust, expect_failure=True)
    edgekit_command("sign", bundle, "--key", work / "keys/release-b.key", "--add")

    step("5. Verify as a device would (running v1 today)")
    edgekit_command("verify", bundle, "--trust", trust, "--installed-version", "1")

    step("6. Inspect the bundle")
    edgekit_command("inspect", bundle, "--trust", trust, "--check")

    step("7. Attacks the device refuses")
    tampered = work / "tampered.ekb"
    from edgekit.bundle import read_bundle

    model_entry = next(e for e in read_bundle(bundle).entries if e.name == model.name)
    data = bytearray(bundle.read_bytes())
    data[model_entry.offset + model_entry.size // 2] ^= 0x01  # one bit inside the model
    tampered.write_bytes(bytes(data))
    edgekit_command("verify", tampered, "--trust", trust, expect_failure=True)
    edgekit_command(
        "verify", bundle, "--trust", trust, "--installed-version", "2", expect_failure=True
    )
    edgekit_command("keys", "generate", "attacker", "--dir", work / "keys")
    forged = work / "forged.ekb"
    edgekit_command(
        "sign",
        model,
        "--key",
        work / "keys/attacker.key",
        "--name",
        "digits",
        "--version",
        "3",
        "-o",
        forged,
    )
    edgekit_command("verify", forged, "--trust", trust, expect_failure=True)

    print(f"\n\033[1;32mfoundation part complete\033[0m: files in {work}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./demo.sh", description="edgekit end-to-end demo")
    parser.add_argument("--dir", type=Path, default=Path("demo-out"), help="work directory")
    parser.add_argument(
        "--part",
        choices=("all", *PARTS),
        default="all",
        help="foundation: keys, trust, signing, attacks; fleet: controller, three agents, "
        "rollouts (default: both)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="fleet part: leave broker, controller and agents running until Ctrl-C",
    )
    args = parser.parse_args(argv)
    work: Path = args.dir.resolve()
    parts = PARTS if args.part == "all" else (args.part,)
    for number, part in enumerate(parts, 1):
        folder = work / part
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        print(f"\n\033[1;35m### Part {number}/{len(parts)}: {PART_TITLES[part]}\033[0m")
        if part == "foundation":
            run_foundation(folder)
        else:
            from edgekit.fleet_demo import run_fleet

            run_fleet(folder, keep_running=args.keep_running)
    print(f"\n\033[1;32mdemo complete\033[0m: files in {work}", flush=True)


if __name__ == "__main__":
    main()
