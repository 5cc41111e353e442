"""The end-to-end demo behind ``./demo.sh``: every step is a real ``edgekit`` command.

It builds a small real ONNX model (a digit classifier fitted in closed form with NumPy on
synthetic 8x8 "digits"), runs it with ONNX Runtime to record a golden self-test set, then walks
through keys → trust → sign → co-sign → verify → inspect, and shows the verifier refusing a
tampered bundle, a replayed old version and a bundle signed by an unknown key.
Needs the ``convert`` extra (numpy, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]


def _step(title: str) -> None:
    print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def _edgekit(*args: object, expect_failure: bool = False) -> str:
    command = [sys.executable, "-m", "edgekit", *map(str, args)]
    print("$ edgekit " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print(output, flush=True)
    if expect_failure != (result.returncode != 0):
        raise SystemExit(f"demo step did not behave as expected (exit {result.returncode})")
    return output


def build_model(directory: Path) -> tuple[Path, Path]:
    """A 64→10 linear classifier over synthetic digit images, and its golden set."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(42)
    prototypes = rng.uniform(0, 16, size=(10, 64)).astype(np.float32)
    labels = rng.integers(0, 10, size=2000)
    images = prototypes[labels] + rng.normal(0, 3, size=(2000, 64)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[labels]
    design = np.hstack([images, np.ones((len(images), 1), np.float32)])
    solution = np.linalg.lstsq(design, onehot, rcond=None)[0].astype(np.float32)
    weights, bias = solution[:64], solution[64]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["image", "W", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_path = directory / "digits.onnx"
    onnx.save(model, model_path)

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="edgekit end-to-end demo")
    parser.add_argument("--dir", type=Path, default=Path("demo-out"), help="work directory")
    args = parser.parse_args(argv)
    work: Path = args.dir.resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "keys").mkdir(parents=True)

    _step("1. Build a small model and its golden self-test set")
    model, golden = build_model(work)

    _step("2. Create two release keys (keep the .key files offline)")
    _edgekit("keys", "generate", "release-a", "--dir", work / "keys")
    _edgekit("keys", "generate", "release-b", "--dir", work / "keys")

    _step("3. The device trust policy: both keys listed, both must sign")
    trust = work / "trust.json"
    _edgekit(
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

    _step("4. Sign the model into a bundle, then co-sign it")
    bundle = work / "digits-2.ekb"
    _edgekit(
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
    _edgekit("verify", bundle, "--trust", trust, expect_failure=True)
    _edgekit("sign", bundle, "--key", work / "keys/release-b.key", "--add")

    _step("5. Verify as a device would (running v1 today)")
    _edgekit("verify", bundle, "--trust", trust, "--installed-version", "1")

    _step("6. Inspect the bundle")
    _edgekit("inspect", bundle, "--trust", trust, "--check")

    _step("7. Attacks the device refuses")
    tampered = work / "tampered.ekb"
    from edgekit.bundle import read_bundle

    model_entry = next(e for e in read_bundle(bundle).entries if e.name == model.name)
    data = bytearray(bundle.read_bytes())
    data[model_entry.offset + model_entry.size // 2] ^= 0x01  # one bit inside the model
    tampered.write_bytes(bytes(data))
    _edgekit("verify", tampered, "--trust", trust, expect_failure=True)
    _edgekit("verify", bundle, "--trust", trust, "--installed-version", "2", expect_failure=True)
    _edgekit("keys", "generate", "attacker", "--dir", work / "keys")
    forged = work / "forged.ekb"
    _edgekit(
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
    _edgekit("verify", forged, "--trust", trust, expect_failure=True)

    print(f"\n\033[1;32mdemo complete\033[0m: files in {work}")


if __name__ == "__main__":
    main()
