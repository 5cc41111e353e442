"""What the local HTTP API costs on top of calling the inference service in-process.

Targets (issue: device_agent HTTP API), on a small ONNX model at batch 1:
* ``POST /v1/predict`` over a keep-alive connection adds <= 0.5 ms at p50 over an in-process
  ``service.predict`` call, for JSON and for ``.npy`` bodies;
* the service's in-process throughput is >= 0.95x the raw runtime's (``Runtime.predict``).

Latency is one request at a time. The client is a separate process, as a real caller is (a
client thread in the server's process would trade the GIL with it on every request and
measure that instead); it sends a pre-encoded body over one keep-alive connection and reads
the whole response, so encoding the request and decoding the answer are not timed. Two
clients: ``http.client`` (what a Python caller pays, its own request building and header
parsing included) and a minimal raw-socket one (closer to what the server alone adds, as with
curl or a C client). Each figure is the median over ``--runs`` runs of that run's p50 (or
calls/s); methods alternate within a run so that drift hits all of them alike.

    python benchmarks/bench_agent_http.py --runs 5 --requests 2000

The service under test is built by :func:`make_service`, the one place to swap the test
wrapper for the real ``Agent`` once it exists.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.http_api import JSON_TYPE, NPY_TYPE, HttpApi
from device_agent.runtime import RuntimeOptions, load_runtime

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES = 16, 4
ADDED_P50_TARGET_MS = 0.5
THROUGHPUT_TARGET = 0.95


def make_service(model_path: Path) -> Any:
    """The InferenceService to measure: today the tests' RuntimeService (load_runtime inside).

    Swap in the real Agent here; everything else only uses the InferenceService protocol.
    """
    module = load_by_path(ROOT / "tests" / "device_agent" / "http" / "runtime_service.py")
    return module.RuntimeService(model_path, threads=1)


def load_by_path(path: Path) -> Any:
    """Test-tree modules are not importable by name (they would shadow the real packages)."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def p50_ms(func: Callable[[], object], requests: int) -> float:
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def calls_per_s(func: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            func()
        calls += 50
    return calls / (time.perf_counter() - start)


# ------------------------------------------------------------------------ client process


def client_main(argv: list[str]) -> None:
    """``--client HOST PORT BODY_FILE CONTENT_TYPE N WARMUP KIND``: print the p50 in ms."""
    host, port, body_file, content_type, n, warmup, kind = argv
    body = Path(body_file).read_bytes()
    call = (http_client_call if kind == "http.client" else raw_call)(
        host, int(port), body, content_type
    )
    for _ in range(int(warmup)):
        call()
    print(json.dumps({"p50_ms": p50_ms(call, int(n))}))


def http_client_call(host: str, port: int, body: bytes, content_type: str) -> Callable[[], bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": content_type}
    first: list[Any] = []

    def call() -> bytes:
        connection.request("POST", "/v1/predict", body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        if not first:
            first.append(connection.sock)
        elif connection.sock is not first[0]:
            raise RuntimeError("the keep-alive connection was not reused")
        return data

    return call


def raw_call(host: str, port: int, body: bytes, content_type: str) -> Callable[[], bytes]:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    length = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)

    def call() -> bytes:
        sock.sendall(request)
        data = b""
        while True:
            data += sock.recv(65536)
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                match = length.search(head)
                assert match is not None and head.startswith(b"HTTP/1.1 200"), head
                if len(rest) >= int(match.group(1)):
                    return rest

    return call


def remote_p50(
    address: tuple[str, int],
    body_file: Path,
    content_type: str,
    args: argparse.Namespace,
    kind: str,
) -> float:
    command = [
        sys.executable, __file__, "--client", address[0], str(address[1]), str(body_file),
        content_type, str(args.requests), "300", kind,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout)["p50_ms"])


# ---------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per method")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    parser.add_argument("--features", type=int, default=FEATURES, help="model input width")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    bundles = load_by_path(ROOT / "tests" / "support" / "bundles.py")
    with tempfile.TemporaryDirectory() as tmp:
        model = bundles.write_onnx_model(
            Path(tmp) / "tiny.onnx", features=args.features, classes=CLASSES
        )
        service = make_service(model)
        runtime = load_runtime("onnxruntime", model, options=RuntimeOptions(threads=1))
        x = np.random.default_rng(0).standard_normal((1, args.features)).astype(np.float32)
        bodies = {"json": Path(tmp) / "body.json", "npy": Path(tmp) / "body.npy"}
        bodies["json"].write_text(json.dumps({"inputs": x.tolist()}))
        np.save(bodies["npy"], x, allow_pickle=False)
        types = {"json": JSON_TYPE, "npy": NPY_TYPE}
        clients = {
            f"http-{fmt} ({kind})": (fmt, kind)
            for kind in ("http.client", "raw socket")
            for fmt in ("json", "npy")
        }
        throughput: dict[str, Callable[[], object]] = {
            "runtime": lambda: runtime.predict({"input": x}),
            "service": lambda: service.predict({"input": x}),
        }
        for func in throughput.values():
            for _ in range(300):  # warm-up: sessions, allocator
                func()
        latencies: dict[str, list[float]] = {"in-process": [], **{name: [] for name in clients}}
        rates: dict[str, list[float]] = {name: [] for name in throughput}
        with HttpApi(service, port=0) as api:
            address = api.address
            assert isinstance(address, tuple)
            for run in range(args.runs):
                names = list(latencies) if run % 2 == 0 else list(reversed(latencies))
                for name in names:
                    if name == "in-process":
                        latencies[name].append(p50_ms(throughput["service"], args.requests))
                    else:
                        fmt, kind = clients[name]
                        latencies[name].append(
                            remote_p50(address, bodies[fmt], types[fmt], args, kind)
                        )
                names = list(throughput) if run % 2 == 0 else list(reversed(throughput))
                for name in names:
                    rates[name].append(calls_per_s(throughput[name], args.seconds))

    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    rate = {name: statistics.median(values) for name, values in rates.items()}
    added = {name: p50[name] - p50["in-process"] for name in clients}
    ratio = rate["service"] / rate["runtime"]
    print(f"{platform.machine()}, {os_cpus()} CPUs, Python {platform.python_version()}")
    print(
        f"model: MatMul+Add+Softmax, input [1, {args.features}] float32, 1 thread; {args.runs} runs"
    )
    print()
    print(f"{'p50 latency':<36}{'ms':>8}{'added ms':>10}")
    for name in latencies:
        extra = f"{added[name]:10.3f}" if name in added else ""
        print(f"  {name:<34}{p50[name]:8.3f}{extra}")
    print()
    print(f"{'throughput, batch 1':<36}{'calls/s':>8}")
    for name in throughput:
        print(f"  {name:<34}{rate[name]:8.0f}")
    print(f"  {'service / runtime':<34}{ratio:8.3f}")
    print()
    worst = max(added.values())
    print(f"added p50 <= {ADDED_P50_TARGET_MS} ms (worst client): {worst:.3f} ms "
          f"{'PASS' if worst <= ADDED_P50_TARGET_MS else 'FAIL'}")  # fmt: skip
    print(f"service throughput >= {THROUGHPUT_TARGET}x runtime: {ratio:.3f} "
          f"{'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}")  # fmt: skip
    if args.json:
        figures = {
            "p50_ms": p50,
            "added_p50_ms": added,
            "calls_per_s": rate,
            "service_over_runtime": ratio,
            "runs": {"latency_p50_ms": latencies, "calls_per_s": rates},
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def os_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
