"""Bundle signing and verification speed against ``sha256sum`` on the same model, same run.

Targets (issue: foundation):
* verifying a bundle with a 512 MiB model reaches >= 0.8x the throughput of ``sha256sum``;
* the verifying process peaks under 64 MiB RSS;
* signing takes <= 1.25x ``sha256sum``'s time.

Everything is measured warm (the files are in the page cache, as ``sha256sum`` sees them too):
this compares CPU work, not the disk. Library calls are timed in-process; the CLI's wall time,
which adds Python start-up, is printed for information. Medians of ``--runs`` runs.

    python benchmarks/bench_bundle.py --size-mib 512 --runs 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.bundle import build_bundle
from edgekit.keys import generate_key
from edgekit.trust import TrustEnvelope, TrustPolicy
from edgekit.verify import verify_bundle

# Peak RSS from VmHWM: ru_maxrss survives exec on Linux, so a child started from this (large)
# benchmark process would report the parent's high-water mark instead of its own.
VERIFY_CHILD = """
import sys, time
from edgekit.trust import load_trust
from edgekit.verify import verify_bundle
policy = load_trust(sys.argv[1]).policy
start = time.perf_counter()
verify_bundle(sys.argv[2], policy, install_to=sys.argv[3] if len(sys.argv) > 3 else None)
elapsed = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(elapsed, hwm)
"""


def make_model(path: Path, size_mib: int) -> None:
    """A valid ONNX model whose weight is ``size_mib`` MiB of random bytes."""
    count = size_mib * 1024 * 1024 // 4
    weight = np.random.default_rng(0).standard_normal(count, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "big",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def timed(func: object, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        model = work / "model.onnx"
        make_model(model, args.size_mib)
        key = generate_key()
        trust = work / "trust.json"
        policy = TrustPolicy.create([("bench", key.public)], threshold=1)
        trust.write_bytes(TrustEnvelope.unsigned(policy).to_bytes())
        bundle = work / "big-1.ekb"
        size = model.stat().st_size

        def sha256sum() -> None:
            subprocess.run(["sha256sum", str(model)], check=True, stdout=subprocess.DEVNULL)

        def sign() -> None:
            build_bundle(model, bundle, name="big", version=1, keys=[key])

        def verify() -> None:
            verify_bundle(bundle, policy)

        sha256sum()
        sign()  # warm the page cache for both files
        sha_times = timed(sha256sum, args.runs)
        sign_times = timed(sign, args.runs)
        verify_times = timed(verify, args.runs)
        openssl_times = (
            timed(
                lambda: subprocess.run(
                    ["openssl", "dgst", "-sha256", str(model)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                ),
                args.runs,
            )
            if shutil.which("openssl")
            else []
        )
        sha_bundle_times = timed(
            lambda: subprocess.run(
                ["sha256sum", str(bundle)], check=True, stdout=subprocess.DEVNULL
            ),
            args.runs,
        )

        child_rss = []
        install_times = []
        for run in range(args.runs):
            target = work / f"install-{run}"
            out = subprocess.run(
                [sys.executable, "-c", VERIFY_CHILD, str(trust), str(bundle), str(target)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            install_times.append(float(out[0]))
            child_rss.append(int(out[1]) / 1024)  # VmHWM is in KiB
            for file in target.iterdir():
                file.unlink()
            target.rmdir()
        cli_start = time.perf_counter()
        subprocess.run(
            [
                Path(sys.executable).with_name("edgekit"),
                "verify",
                str(bundle),
                "--trust",
                str(trust),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cli_verify = time.perf_counter() - cli_start

    sha = statistics.median(sha_times)
    figures = {
        "model_mib": size / 2**20,
        "sha256sum_s": sha,
        "sha256sum_bundle_s": statistics.median(sha_bundle_times),
        "sign_s": statistics.median(sign_times),
        "verify_s": statistics.median(verify_times),
        "verify_install_s": statistics.median(install_times),
        "verify_install_peak_rss_mib": max(child_rss),
        "cli_verify_wall_s": cli_verify,
        "sign_time_ratio_vs_sha256sum": statistics.median(sign_times) / sha,
        "verify_throughput_ratio_vs_sha256sum": sha / statistics.median(verify_times),
        "verify_install_throughput_ratio_vs_sha256sum": sha / statistics.median(install_times),
        "openssl_dgst_s": statistics.median(openssl_times) if openssl_times else None,
        "runs": args.runs,
    }
    print(f"model {figures['model_mib']:.0f} MiB, medians of {args.runs} runs (warm cache)")
    print(f"  sha256sum                 {sha:8.3f} s  ({size / sha / 2**20:7.0f} MiB/s)")
    for label, key_name in (
        ("sign (library)", "sign_s"),
        ("verify (library)", "verify_s"),
        ("verify+install (process)", "verify_install_s"),
    ):
        seconds = figures[key_name]
        print(f"  {label:25s} {seconds:8.3f} s  ({size / seconds / 2**20:7.0f} MiB/s)")
    if openssl_times:
        ossl = statistics.median(openssl_times)
        print(
            f"  openssl dgst -sha256      {ossl:8.3f} s  ({size / ossl / 2**20:7.0f} MiB/s)"
            "  (second reference: OpenSSL's sha256, as Python's hashlib uses)"
        )
    print(f"  edgekit verify CLI wall   {cli_verify:8.3f} s  (includes interpreter start-up)")
    print(
        f"sign time / sha256sum time          {figures['sign_time_ratio_vs_sha256sum']:.2f}x"
        "  (target <= 1.25)"
    )
    print(
        f"verify throughput / sha256sum       "
        f"{figures['verify_throughput_ratio_vs_sha256sum']:.2f}x  (target >= 0.8)"
    )
    print(
        f"verify+install throughput / sha256sum "
        f"{figures['verify_install_throughput_ratio_vs_sha256sum']:.2f}x"
    )
    print(
        f"verify+install peak RSS             {figures['verify_install_peak_rss_mib']:.1f} MiB"
        "  (target < 64)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
