"""The device agent against the issue's performance targets, measured on the real ``Agent``.

Targets (issue: on-device agent), on a small ONNX model at batch 1:

1. in-process ``Agent.predict`` >= 0.95x the throughput of ``onnxruntime.InferenceSession.run``
   called directly on the same model file with the same thread count (printed for three model
   sizes, ~10 us, ~100 us and ~1 ms per inference, with the agent's own cost in us: see
   "Throughput" below);
2. the local HTTP API (``POST /v1/predict``, keep-alive) adds <= 0.5 ms at p50 over in-process;
3. idle RSS of ``edgekit-agent run`` with ONNX Runtime and the model loaded <= 120 MB;
4. start to first prediction (spawn ``edgekit-agent run`` -> first HTTP 200) <= 2 s;
5. a hot swap (install of a new bundle into the running agent) under 200 requests/s fails
   zero requests.

This is a script that prints ratios, not a timed test: a shared CI machine cannot hold
sub-millisecond targets reliably, and a flaky test teaches people to ignore it. Every figure
is the median of several runs whose contenders are interleaved (so background load hits all of
them alike), and the output says how busy the machine was and how far the runs spread.

Why the pieces are built the way they are:

* Throughput: the agent calls the C++ session behind ``InferenceSession`` (``_sess.run``), as
  the Python wrapper re-checks what the agent has already checked and costs ~2.8 us per call.
  So ``Agent.predict`` can beat the public ``InferenceSession.run``, the issue's reference; the
  honest measure of what the agent itself costs is its time over that C++ entry point, which
  is printed as "the agent adds ... us" next to what the public wrapper adds over the same
  entry. Both are per call and do not depend on the model, so the ratio is printed for three
  model sizes.

* The model is a 64 -> 32 -> 10 MLP (MatMul/Add/Relu/MatMul/Add/Softmax) made with
  ``onnx.helper``: small enough that per-call overhead is what gets measured (that is what the
  0.95x target is about), real enough to go through the whole bundle path: a signed bundle with
  a golden set, verified, self-tested and committed by the agent before anything is timed.
* HTTP clients run in a separate process, as real callers do: a client thread in the agent's
  process would trade the GIL with the server on every request and measure that instead.
* Start-up and RSS use the real ``edgekit-agent run`` console script on a state directory that
  already holds a committed model, so they include the interpreter, imports, the boot-time
  re-hash of the model and ONNX Runtime's session creation.
* The hot swap hosts ``Agent`` + ``HttpApi`` in this process (what ``edgekit-agent run`` does)
  and calls ``agent.install`` on it. In production an update reaches a running service through
  the fleet link (MQTT ``desired`` -> ``FleetLink``'s installer thread -> ``Agent.install``,
  the same call); ``edgekit-agent install`` refuses while the service holds the state lock.
  Calling it directly measures the swap without needing an MQTT broker.

    python benchmarks/bench_agent.py                 # full run, about 2-3 minutes
    python benchmarks/bench_agent.py --quick         # smoke run, about 40 s
    python benchmarks/bench_agent.py --profile       # also cProfile Agent.predict
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import http.client
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

TARGET_RATIO = 0.95
TARGET_HTTP_ADDED_MS = 0.5
TARGET_RSS_MB = 120.0
TARGET_START_S = 2.0
TARGET_SWAP_FAILURES = 0
SWAP_RATE = 200.0

FEATURES, HIDDEN, CLASSES = 64, 32, 10
#: Model sizes the throughput ratio is printed for, as (label, features, hidden): the agent's
#: cost per call is fixed, so the ratio depends on how long the model itself runs. The labels
#: are the intended inference times on a desktop-class core; the measured ones are printed.
MODEL_SIZES: tuple[tuple[str, int, int], ...] = (
    ("~10 us", FEATURES, HIDDEN),
    ("~100 us", 1024, 1024),
    ("~1 ms", 2048, 3072),
)
#: The C++ entry point the agent calls (see "Throughput" above); the agent's floor.
CXX_RUN = "InferenceSession._sess.run"
NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
PREDICT = "/v1/predict"

FloatArray = npt.NDArray[np.float32]


# ============================================================================ machine and noise


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is empty on most Linux builds)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, to see what *others* are running."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy while this process sleeps: the load other users put on us."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1.0)


def spread(values: Sequence[float]) -> str:
    """``min, max, +-x%`` (half the range over the median): how far a median can be trusted."""
    med = statistics.median(values)
    half = (max(values) - min(values)) / 2 / med * 100 if med else 0.0
    return f"min {min(values):.4g}, max {max(values):.4g}, +-{half:.0f}%"


# ============================================================================ models and bundles


def write_mlp(path: Path, seed: int, features: int = FEATURES, hidden: int = HIDDEN) -> Path:
    """A features -> hidden -> 10 MLP with a symbolic batch dimension; ``seed`` picks weights.

    Each version of the bundle gets different weights, so a response tells which model
    answered it (the hot-swap client checks every answer against the known models).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = (rng.standard_normal((hidden, CLASSES)) / np.sqrt(hidden)).astype(np.float32)
    b2 = rng.standard_normal(CLASSES).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["l0"]),
            helper.make_node("Add", ["l0", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes a newer IR by default than onnxruntime may accept
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def ort_session(model: Path, threads: int) -> Any:
    """A plain CPU session, configured like the agent's adapter with ``threads``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


def write_golden(model: Path, path: Path, seed: int, features: int) -> Path:
    """The golden set the agent self-tests on install, computed from the model itself."""
    x = np.random.default_rng(1000 + seed).standard_normal((8, features)).astype(np.float32)
    y = ort_session(model, 1).run(None, {"input": x})[0]
    np.savez(
        path,
        **{"input:input": x, "output:probabilities": y, "atol:probabilities": np.float32(1e-5)},
    )
    return path


@dataclass
class Fixture:
    """Everything the sections share: bundles, a committed state directory, the request."""

    root: Path
    threads: int
    models: dict[int, Path] = field(default_factory=dict)  # version -> model file
    bundles: dict[int, Path] = field(default_factory=dict)  # version -> signed bundle
    template: Path = Path()  # a state dir with v1 committed; copied, never used directly
    x: FloatArray = field(default_factory=lambda: np.zeros((1, FEATURES), np.float32))
    expected: dict[int, FloatArray] = field(default_factory=dict)  # version -> output for x
    _copies: int = 0

    def state_copy(self) -> Path:
        """A fresh copy of the committed device state (each section starts from the same)."""
        self._copies += 1
        target = self.root / f"state-{self._copies}"
        shutil.copytree(self.template, target, symlinks=True)
        return target

    def config(self, state_dir: Path) -> Any:
        """The agent's configuration: defaults, except the state dir and the thread count."""
        from device_agent.config import AgentConfig, RuntimeConfig

        return AgentConfig(state_dir=state_dir, runtime=RuntimeConfig(threads=self.threads))


def build_fixture(
    root: Path, threads: int, versions: int, features: int = FEATURES, hidden: int = HIDDEN
) -> Fixture:
    """Sign bundles v1..vN, then install and commit v1 through a real Agent (golden self-test,
    health window) so that every section starts from a device that has been updated once."""
    from device_agent.agent import Agent
    from edgekit.bundle import build_bundle
    from edgekit.keys import generate_key
    from edgekit.trust import TrustEnvelope, TrustPolicy

    fx = Fixture(root=root, threads=threads)
    fx.x = np.random.default_rng(7).standard_normal((1, features)).astype(np.float32)
    key = generate_key()
    created = datetime.now(timezone.utc) - timedelta(minutes=1)
    for version in range(1, versions + 1):
        model = write_mlp(root / f"mlp-v{version}.onnx", version, features, hidden)
        golden = write_golden(model, root / f"golden-v{version}.npz", version, features)
        bundle = root / f"mlp-v{version}.ekb"
        build_bundle(
            model, bundle, name="mlp", version=version, keys=[key], golden=golden, created=created
        )
        fx.models[version] = model
        fx.bundles[version] = bundle
        fx.expected[version] = ort_session(model, 1).run(None, {"input": fx.x})[0]

    fx.template = root / "template"
    fx.template.mkdir()
    policy = TrustPolicy.create([("bench", key.public)], threshold=1)
    (fx.template / "trust.json").write_bytes(TrustEnvelope.unsigned(policy).to_bytes())
    with Agent(config=fx.config(fx.template)) as agent:
        result = agent.install(fx.bundles[1], wait_for_health=False)
        if not result.ok:
            raise SystemExit(f"installing v1 failed: {result.reason}: {result.message}")
        for _ in range(agent.config.health.min_inferences):
            agent.predict({"input": fx.x})
        final = agent.evaluate_health()
        if final is None or final.outcome.value != "committed":
            raise SystemExit(f"v1 did not commit: {final}")
    return fx


# ============================================================================ 1. throughput


def calibrate(func: Callable[[], object], seconds: float) -> int:
    """Calls per timed block so that one block lasts about ``seconds``."""
    for _ in range(200):
        func()
    start = time.perf_counter()
    for _ in range(200):
        func()
    per_call = (time.perf_counter() - start) / 200
    return max(50, int(seconds / per_call))


def timeit_once(func: Callable[[], object], calls: int = 20) -> float:
    """Seconds per call over a few calls (after one warm-up): to size the timed blocks."""
    func()
    start = time.perf_counter()
    for _ in range(calls):
        func()
    return (time.perf_counter() - start) / calls


def interleaved_rates(
    funcs: dict[str, Callable[[], object]],
    *,
    runs: int,
    blocks: int,
    block_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Calls/s of each function per run; within a run, blocks alternate ABC/CBA.

    Short alternating blocks put every contender under the same background load: a burst from
    another process costs all of them, instead of whichever happened to be running. Each block
    starts with one untimed call, so that no contender pays for the others having pushed its
    weights out of the cache (25 MB on the ~1 ms model). ``clock`` is wall time by default;
    see ``--clock cpu``.
    """
    calls = calibrate(next(iter(funcs.values())), block_s)
    names = list(funcs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs):
        spent = dict.fromkeys(names, 0.0)
        for block in range(blocks):
            order = names if (run + block) % 2 == 0 else names[::-1]
            for name in order:
                func = funcs[name]
                func()  # untimed: its model's weights back in cache, as for the others
                start = clock()
                for _ in range(calls):
                    func()
                spent[name] += clock() - start
        for name in names:
            rates[name].append(calls * blocks / spent[name])
    return rates


def measure_throughput(fx: Fixture, args: argparse.Namespace, *, ladder: bool) -> dict[str, Any]:
    """Agent.predict vs InferenceSession.run on the agent's own model file, interleaved.

    Always timed with them: ``InferenceSession._sess.run``, the C++ entry point that both the
    public ``run`` and the agent's adapter end in, on the same session; its time is what no
    Python caller can go below, so "agent - C++" is the agent's own cost per call. With
    ``ladder``, ``Runtime.predict`` (the ONNX adapter alone: validation and the call, no
    reference counting or metrics) is timed too, so that the agent's cost can be split.
    """
    from device_agent.agent import Agent
    from device_agent.runtime import RuntimeOptions, load_runtime

    with Agent(config=fx.config(fx.state_copy())) as agent:
        info = agent.model_info()
        model_file = agent.store.slot_dir(info["slot"]) / info["model_file"]
        session = ort_session(model_file, fx.threads)
        runtime: Any = load_runtime(
            "onnxruntime", model_file, options=RuntimeOptions(threads=fx.threads)
        )
        feeds = {"input": fx.x}
        got = agent.predict(feeds)["probabilities"]
        if not np.allclose(got, session.run(None, feeds)[0], atol=1e-6):
            raise SystemExit("the agent and the raw session disagree on the same model")
        # Its own session, like every contender (see interleaved_rates on caches).
        cxx_session = ort_session(model_file, fx.threads)
        cxx_run = cxx_session._sess.run
        fetch = [output.name for output in cxx_session.get_outputs()]
        funcs: dict[str, Callable[[], object]] = {
            "InferenceSession.run": lambda: session.run(None, feeds),
            CXX_RUN: lambda: cxx_run(fetch, feeds, None),
        }
        if ladder:
            funcs["Runtime.predict"] = lambda: runtime.predict(feeds)
        funcs["Agent.predict"] = lambda: agent.predict(feeds)
        blocks = args.blocks if ladder else max(2, args.blocks // 2)
        # Blocks of at least ~200 calls: the first call of a block, with cold caches, must not
        # weigh on a slow model's figure.
        per_call = min(timeit_once(func) for func in funcs.values())
        block_s = max(0.05, 200 * per_call)
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        rates = interleaved_rates(
            funcs, runs=args.runs, blocks=blocks, block_s=block_s, clock=clock
        )
        profile = profile_predict(agent, feeds) if args.profile and ladder else None
        runtime.close()
    raw = rates["InferenceSession.run"]
    ratios = {
        name: [a / r for a, r in zip(values, raw, strict=True)] for name, values in rates.items()
    }
    median = {name: statistics.median(values) for name, values in rates.items()}
    us = {name: 1e6 / rate for name, rate in median.items()}
    # Per run, so that the spread of the differences shows too.
    added = [1e6 / a - 1e6 / c for a, c in zip(rates["Agent.predict"], rates[CXX_RUN], strict=True)]
    wrapper = [
        1e6 / p - 1e6 / c
        for p, c in zip(rates["InferenceSession.run"], rates[CXX_RUN], strict=True)
    ]
    return {
        "calls_per_s": median,
        "us_per_call": us,
        "ratio": statistics.median(ratios["Agent.predict"]),
        "ratio_runs": ratios["Agent.predict"],
        "ratio_vs_cxx": statistics.median(
            [a / c for a, c in zip(rates["Agent.predict"], rates[CXX_RUN], strict=True)]
        ),
        "layer_ratios": {name: statistics.median(values) for name, values in ratios.items()},
        "overhead_us": statistics.median(added),
        "overhead_us_runs": added,
        "wrapper_us": statistics.median(wrapper),
        "runs": rates,
        "profile": profile,
    }


def bench_throughput(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """The target on the small model (with the ladder), then the other MODEL_SIZES."""
    figures = measure_throughput(fx, args, ladder=True)
    sizes = [{"label": MODEL_SIZES[0][0], "features": FEATURES, "hidden": HIDDEN, **figures}]
    if args.sizes:
        for label, features, hidden in MODEL_SIZES[1:]:
            root = fx.root / f"size-{features}x{hidden}"
            root.mkdir()
            other = build_fixture(root, fx.threads, 1, features, hidden)
            sizes.append(
                {
                    "label": label,
                    "features": features,
                    "hidden": hidden,
                    **measure_throughput(other, args, ladder=False),
                }
            )
    figures["sizes"] = [
        {k: v for k, v in size.items() if k not in ("profile", "sizes")} for size in sizes
    ]
    return figures


def profile_predict(agent: Any, feeds: dict[str, FloatArray], calls: int = 20000) -> str:
    """cProfile of ``calls`` predictions: where the agent's per-call time goes, by tottime."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        agent.predict(feeds)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(18)
    return out.getvalue()


# ============================================================================ 2. HTTP latency


def http_call(host: str, port: int, body: bytes, content_type: str) -> Callable[[], bytes]:
    """One keep-alive ``http.client`` connection: what a Python caller pays."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": content_type}

    def call() -> bytes:
        connection.request("POST", PREDICT, body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        return data

    return call


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def raw_call(host: str, port: int, body: bytes, content_type: str) -> Callable[[], bytes]:
    """A minimal client on a raw socket: closer to what the server alone adds (as curl or C)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def call() -> bytes:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                match = _LENGTH.search(head)
                if match is None or not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.decode(errors="replace"))
                if len(rest) >= int(match.group(1)):
                    return rest

    return call


def p50_ms(func: Callable[[], object], requests: int) -> float:
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def latency_client(spec: dict[str, Any]) -> None:
    """Client process: warm up, then print the p50 of ``requests`` sequential calls."""
    maker = http_call if spec["kind"] == "http.client" else raw_call
    call = maker(spec["host"], spec["port"], Path(spec["body"]).read_bytes(), spec["type"])
    for _ in range(spec["warmup"]):
        call()
    print(json.dumps({"p50_ms": p50_ms(call, spec["requests"])}))


def run_client(mode: str, spec: dict[str, Any], **kwargs: Any) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, mode, json.dumps(spec)]
    return subprocess.Popen(command, text=True, **kwargs)


def bench_http(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """p50 of POST /v1/predict from another process vs in-process predict, interleaved."""
    from device_agent.agent import Agent
    from device_agent.http_api import HttpApi

    bodies = {"json": fx.root / "x.json", "npy": fx.root / "x.npy"}
    bodies["json"].write_text(json.dumps({"inputs": fx.x.tolist()}))
    np.save(bodies["npy"], fx.x, allow_pickle=False)
    types = {"json": JSON_TYPE, "npy": NPY_TYPE}
    clients = {
        f"{fmt}, {kind}": (fmt, kind) for kind in ("http.client", "raw socket") for fmt in types
    }
    with Agent(config=fx.config(fx.state_copy())) as agent, HttpApi(agent, port=0) as api:
        host, port = api.address  # type: ignore[misc]  # TCP here, never a Unix socket
        feeds = {"input": fx.x}
        for _ in range(500):
            agent.predict(feeds)
        p50s: dict[str, list[float]] = {"in-process": [], **{name: [] for name in clients}}
        for run in range(args.runs):
            names = list(p50s) if run % 2 == 0 else list(p50s)[::-1]
            for name in names:
                if name == "in-process":
                    p50s[name].append(p50_ms(lambda: agent.predict(feeds), args.requests))
                    continue
                fmt, kind = clients[name]
                spec = {
                    "host": host,
                    "port": port,
                    "body": str(bodies[fmt]),
                    "type": types[fmt],
                    "kind": kind,
                    "requests": args.requests,
                    "warmup": 200,
                }
                proc = run_client("_latency-client", spec, stdout=subprocess.PIPE)
                out, _ = proc.communicate(timeout=300)
                if proc.returncode != 0:
                    raise SystemExit(f"latency client {name} failed (exit {proc.returncode})")
                p50s[name].append(float(json.loads(out)["p50_ms"]))
    median = {name: statistics.median(values) for name, values in p50s.items()}
    added = {name: median[name] - median["in-process"] for name in clients}
    return {"p50_ms": median, "added_ms": added, "runs": p50s}


# ============================================================================ 3 + 4. CLI start, RSS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_command() -> list[str]:
    """The installed console script next to this interpreter (what systemd runs)."""
    script = Path(sys.executable).with_name("edgekit-agent")
    if script.is_file():
        return [str(script)]
    found = shutil.which("edgekit-agent")
    return [found] if found else [sys.executable, "-m", "device_agent"]


def write_toml(fx: Fixture, state_dir: Path, port: int) -> Path:
    path = state_dir.parent / f"{state_dir.name}.toml"
    path.write_text(
        f'state_dir = "{state_dir}"\n\n[runtime]\nthreads = {fx.threads}\n\n'
        f'[http]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return path


def first_prediction(port: int, body: bytes, deadline: float) -> float:
    """Poll until POST /v1/predict answers 200; return the monotonic time it did."""
    headers = {"Content-Type": NPY_TYPE}
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("POST", PREDICT, body, headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic()
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            pass
        finally:
            connection.close()
        time.sleep(0.005)
    raise TimeoutError("the agent did not answer a prediction in time")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of ``pid`` in kB, from /proc/PID/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        kilobytes = name.startswith(("Vm", "Rss")) and parts[1:] == ["kB"]
        if kilobytes or name == "Threads":
            values[name] = int(parts[0])
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (the idle agent should not be burning CPU)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_cli(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``edgekit-agent run`` ``args.starts`` times: start-up time, then idle RSS."""
    body = io.BytesIO()
    np.save(body, fx.x, allow_pickle=False)
    starts: list[float] = []
    rss: list[dict[str, int]] = []
    idle_cpu: list[float] = []
    for attempt in range(args.starts):
        state_dir = fx.state_copy()
        port = free_port()
        config = write_toml(fx, state_dir, port)
        log = (fx.root / f"agent-{attempt}.log").open("w")
        began = time.monotonic()
        proc = subprocess.Popen(
            [*agent_command(), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            starts.append(first_prediction(port, body.getvalue(), began + 60) - began)
            cpu0 = cpu_seconds(proc.pid)
            time.sleep(args.idle)
            idle_cpu.append((cpu_seconds(proc.pid) - cpu0) / args.idle)
            rss.append(proc_status(proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        if proc.returncode != 0:
            text = (fx.root / f"agent-{attempt}.log").read_text()
            raise SystemExit(f"edgekit-agent run exited {proc.returncode}:\n{text[-2000:]}")
    rss_mb = [r["VmRSS"] / 1024 for r in rss]
    return {
        "start_s": statistics.median(starts),
        "start_runs_s": starts,
        "rss_mb": statistics.median(rss_mb),
        "rss_runs_mb": rss_mb,
        "rss_anon_mb": statistics.median(r.get("RssAnon", 0) / 1024 for r in rss),
        "rss_file_mb": statistics.median(r.get("RssFile", 0) / 1024 for r in rss),
        "hwm_mb": statistics.median(r.get("VmHWM", 0) / 1024 for r in rss),
        "threads": statistics.median(r.get("Threads", 0) for r in rss),
        "idle_cpu_pct": statistics.median(idle_cpu) * 100,
        "command": agent_command(),
    }


def import_breakdown(repeats: int) -> dict[str, float]:
    """Seconds a fresh interpreter needs for what ``run`` loads, step by step (medians).

    Answers "where do the start-up seconds go" without touching the agent: the interpreter
    itself, NumPy, ONNX Runtime, then the agent's modules.
    """
    steps = {
        "python": "pass",
        "+ numpy": "import numpy",
        "+ onnxruntime": "import numpy, onnxruntime",
        "+ device_agent": "import numpy, onnxruntime, device_agent.agent, device_agent.http_api",
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, code in steps.items():
            start = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.monotonic() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ============================================================================ 5. hot swap


def load_client(spec: dict[str, Any]) -> None:
    """Client process: ``rate`` requests/s over ``connections`` keep-alive connections until
    stdin says stop; every request's outcome goes to ``spec["out"]`` as JSON.

    Request k is due at ``t0 + k / rate`` on connection ``k % connections`` (open loop): a slow
    answer delays only its own connection, and a late send is recorded as lag so that a
    stalled schedule cannot hide as good latency. Each answer is compared with the outputs of
    every known model version, so a request served wrongly counts even with HTTP 200.
    """
    body = Path(spec["body"]).read_bytes()
    expected = np.load(spec["expected"])
    known = {int(name.removeprefix("v")): expected[name] for name in expected.files}
    rate, connections = float(spec["rate"]), int(spec["connections"])
    stop = threading.Event()
    results: list[list[tuple[float, float, float, str, int]]] = [[] for _ in range(connections)]

    def worker(index: int, t0: float) -> None:
        connection: http.client.HTTPConnection | None = None
        k = index
        while not stop.is_set():
            due = t0 + k / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            sent = time.monotonic()
            outcome, version = "ok", 0
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(spec["host"], spec["port"], timeout=5)
                connection.request("POST", PREDICT, body, {"Content-Type": NPY_TYPE})
                response = connection.getresponse()
                data = response.read()
                if response.status != 200:
                    outcome = f"http-{response.status}"
                else:
                    answer = np.load(io.BytesIO(data), allow_pickle=False)
                    matches = [v for v, y in known.items() if np.allclose(answer, y, atol=1e-5)]
                    version = matches[0] if matches else -1
                    outcome = "ok" if matches else "wrong"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = type(exc).__name__
                if connection is not None:
                    connection.close()
                connection = None
            done = time.monotonic()
            results[index].append((due, sent, done, outcome, version))
            k += connections

    for _ in range(20):  # warm-up on one connection: imports, first-call costs
        call = http_call(spec["host"], spec["port"], body, NPY_TYPE)
        call()
    t0 = time.monotonic() + 0.05
    threads = [
        threading.Thread(target=worker, args=(i, t0), daemon=True) for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    records = sorted(record for per in results for record in per)
    Path(spec["out"]).write_text(json.dumps(records))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_hotswap(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """Install v2, v3, ... into a serving agent under paced load; count failed requests."""
    from device_agent.agent import Agent
    from device_agent.http_api import HttpApi

    body_path = fx.root / "swap-x.npy"
    np.save(body_path, fx.x, allow_pickle=False)
    expected_path = fx.root / "expected.npz"
    np.savez(expected_path, **{f"v{v}": y for v, y in fx.expected.items()})
    out = fx.root / "swap-results.json"
    swaps: list[dict[str, Any]] = []
    with Agent(config=fx.config(fx.state_copy())) as agent, HttpApi(agent, port=0) as api:
        host, port = api.address  # type: ignore[misc]
        spec = {
            "host": host,
            "port": port,
            "rate": SWAP_RATE,
            "connections": args.connections,
            "body": str(body_path),
            "expected": str(expected_path),
            "out": str(out),
        }
        client = run_client("_load-client", spec, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise SystemExit("the load client did not start")
        load_started = time.monotonic()
        time.sleep(args.settle)
        for version in range(2, args.swaps + 2):
            began = time.monotonic()
            result = agent.install(fx.bundles[version], wait_for_health=True, timeout=120)
            ended = time.monotonic()
            swaps.append(
                {
                    "version": version,
                    "start": began,
                    "end": ended,
                    "seconds": ended - began,
                    "outcome": result.outcome.value,
                    "message": result.message,
                }
            )
            time.sleep(args.settle)
        client.stdin.write("stop\n")
        client.stdin.flush()
        client.wait(timeout=60)
        load_ended = time.monotonic()
        serving = agent.model_info()["version"]
    records = [tuple(r) for r in json.loads(out.read_text())]
    windows = [(s["start"], s["end"]) for s in swaps]

    def phase(sent: float) -> str:
        if any(a <= sent <= b for a, b in windows):
            return "during"
        return "before" if sent < windows[0][0] else "after"

    phases: dict[str, list[tuple[Any, ...]]] = {"before": [], "during": [], "after": []}
    for record in records:
        phases[phase(record[1])].append(record)
    failures = [r for r in records if r[3] not in ("ok",)]
    summary: dict[str, Any] = {}
    for name, rows in phases.items():
        latency = [(done - sent) * 1000 for _, sent, done, outcome, _ in rows if outcome == "ok"]
        from_due = [(done - due) * 1000 for due, _, done, outcome, _ in rows if outcome == "ok"]
        summary[name] = {
            "requests": len(rows),
            "failed": sum(1 for r in rows if r[3] != "ok"),
            "p50_ms": percentile(latency, 50),
            "p99_ms": percentile(latency, 99),
            "max_ms": max(latency, default=float("nan")),
            "p99_from_schedule_ms": percentile(from_due, 99),
        }
    versions: dict[int, int] = {}
    for record in records:
        versions[record[4]] = versions.get(record[4], 0) + 1
    duration = load_ended - load_started
    return {
        "requests": len(records),
        "achieved_rps": len(records) / duration if duration > 0 else 0.0,
        "failed": len(failures),
        "failure_kinds": sorted({r[3] for r in failures}),
        "phases": summary,
        "swaps": [{k: v for k, v in s.items() if k not in ("start", "end")} for s in swaps],
        "answered_by_version": {str(k): v for k, v in sorted(versions.items())},
        "serving_at_end": serving,
        "max_send_lag_ms": max(((sent - due) * 1000 for due, sent, *_ in records), default=0.0),
    }


# ============================================================================ report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    thr, web, cli, swap = (figures.get(k) for k in ("throughput", "http", "cli", "hotswap"))
    print()
    print(f"{'figure':<46}{'value':>14}  {'target':<12}result")
    rows: list[tuple[str, str, str, bool]] = []
    if thr:
        rows.append(
            (
                "1. Agent.predict / InferenceSession.run",
                f"{thr['ratio']:.3f}x",
                ">= 0.95x",
                thr["ratio"] >= TARGET_RATIO,
            )
        )
    if web:
        for name, added in web["added_ms"].items():
            rows.append(
                (
                    f"2. HTTP added p50 ({name})",
                    f"{added:.3f} ms",
                    "<= 0.5 ms",
                    added <= TARGET_HTTP_ADDED_MS,
                )
            )
    if cli:
        rows.append(
            (
                "3. idle RSS, edgekit-agent run",
                f"{cli['rss_mb']:.1f} MB",
                "<= 120 MB",
                cli["rss_mb"] <= TARGET_RSS_MB,
            )
        )
        rows.append(
            (
                "4. start to first prediction",
                f"{cli['start_s']:.2f} s",
                "<= 2 s",
                cli["start_s"] <= TARGET_START_S,
            )
        )
    if swap:
        rows.append(
            (
                f"5. failed requests, {len(swap['swaps'])} hot swaps @200/s",
                str(swap["failed"]),
                "0",
                swap["failed"] <= TARGET_SWAP_FAILURES,
            )
        )
    for name, value, target, ok in rows:
        print(f"{name:<46}{value:>14}  {target:<12}{verdict(ok)}")
    figures["verdicts"] = {name: verdict(ok) for name, _, _, ok in rows}

    if thr:
        print("\n1. throughput, batch 1 (median of runs):")
        print(f"   {'':<28}{'calls/s':>10}{'us/call':>9}{'x raw':>8}   run-to-run")
        for name, rate in thr["calls_per_s"].items():
            print(
                f"   {name:<28}{rate:>10.0f}{thr['us_per_call'][name]:>9.2f}"
                f"{thr['layer_ratios'][name]:>8.3f}   {spread(thr['runs'][name])}"
            )
        print(f"   Agent/raw per run: {', '.join(f'{r:.3f}' for r in thr['ratio_runs'])}")
        print(
            f"   over the C++ entry point ({CXX_RUN}): the agent adds "
            f"{thr['overhead_us']:.2f} us per call (runs "
            f"{', '.join(f'{v:.2f}' for v in thr['overhead_us_runs'])}), the public "
            f"InferenceSession.run adds {thr['wrapper_us']:.2f} us"
        )
        print("\n   by model size (MLP features->hidden->10, batch 1, medians):")
        print(
            f"   {'model':<22}{'raw us':>9}{'C++ us':>9}{'agent us':>10}{'agent/raw':>11}"
            f"{'agent/C++':>11}{'agent adds':>12}   agent/raw runs"
        )
        for size in thr["sizes"]:
            us = size["us_per_call"]
            name = f"{size['label']} ({size['features']}->{size['hidden']})"
            print(
                f"   {name:<22}{us['InferenceSession.run']:>9.1f}{us[CXX_RUN]:>9.1f}"
                f"{us['Agent.predict']:>10.1f}{size['ratio']:>10.3f}x"
                f"{size['ratio_vs_cxx']:>10.3f}x{size['overhead_us']:>9.2f} us   "
                f"{spread(size['ratio_runs'])}"
            )
        print(
            "   (the agent's cost is per call: on the larger models it is below the run-to-run "
            "noise, which the last column shows)"
        )
    if web:
        print("\n2. p50 latency, ms (median of runs):")
        for name, value in web["p50_ms"].items():
            extra = f"  added {web['added_ms'][name]:.3f}" if name in web["added_ms"] else ""
            print(f"   {name:<24}{value:8.3f}{extra}   runs: {spread(web['runs'][name])}")
    if cli:
        print(f"\n3/4. {' '.join(Path(c).name for c in cli['command'])} run, {args.starts} starts:")
        print(
            f"   start to first prediction s: {', '.join(f'{s:.2f}' for s in cli['start_runs_s'])}"
        )
        print(
            f"   RSS after {args.idle:g} s idle: VmRSS {cli['rss_mb']:.1f} MB (anon "
            f"{cli['rss_anon_mb']:.1f}, file {cli['rss_file_mb']:.1f}), peak VmHWM "
            f"{cli['hwm_mb']:.1f} MB, {cli['threads']:.0f} threads, idle CPU "
            f"{cli['idle_cpu_pct']:.2f}%"
        )
        if "imports_s" in cli:
            steps = ", ".join(f"{k} {v:.2f}" for k, v in cli["imports_s"].items())
            print(f"   fresh interpreter, cumulative s: {steps}")
    if swap:
        print(
            f"\n5. hot swap: {swap['requests']} requests at {swap['achieved_rps']:.0f}/s over "
            f"{args.connections} connections; failed {swap['failed']} "
            f"{swap['failure_kinds'] or ''}"
        )
        for s in swap["swaps"]:
            print(
                f"   v{s['version']}: {s['outcome']} in {s['seconds']:.2f} s "
                "(install: verify, stage, self-test, activate, health window)"
            )
        print(
            f"   {'phase':<8}{'requests':>9}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'max ms':>9}{'p99 from schedule':>19}"
        )
        for name, p in swap["phases"].items():
            print(
                f"   {name:<8}{p['requests']:>9}{p['failed']:>8}{p['p50_ms']:>9.2f}"
                f"{p['p99_ms']:>9.2f}{p['max_ms']:>9.2f}{p['p99_from_schedule_ms']:>19.2f}"
            )
        print(
            f"   answers by model version (by output): {swap['answered_by_version']}; "
            f"serving at the end: v{swap['serving_at_end']}; max send lag "
            f"{swap['max_send_lag_ms']:.1f} ms"
        )
    if thr and thr.get("profile"):
        print("\ncProfile of Agent.predict (20000 calls, by tottime):")
        print(thr["profile"])


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

    from edgekit._version import __version__

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "edgekit": __version__,
        "command": " ".join(["python", "benchmarks/bench_agent.py", *sys.argv[1:]]),
        "threads": args.threads,
        "clock": args.clock,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs: a smoke test")
    parser.add_argument("--runs", type=int, default=7, help="interleaved runs per figure")
    parser.add_argument("--blocks", type=int, default=10, help="throughput blocks per run")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per p50")
    parser.add_argument("--starts", type=int, default=5, help="edgekit-agent run starts")
    parser.add_argument("--idle", type=float, default=5.0, help="idle seconds before RSS")
    parser.add_argument("--swaps", type=int, default=5, help="hot swaps under load")
    parser.add_argument("--settle", type=float, default=2.0, help="load seconds around swaps")
    parser.add_argument("--connections", type=int, default=4, help="load client connections")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="throughput by wall time (default), or by the CPU time of the calling thread: "
        "immune to other processes on a busy machine, valid with --threads 1 only (ONNX "
        "Runtime then computes on the calling thread)",
    )
    parser.add_argument(
        "--only", nargs="+", choices=("throughput", "http", "cli", "hotswap"), help="sections"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile Agent.predict")
    parser.add_argument(
        "--no-sizes",
        "--no-wide",
        dest="sizes",
        action="store_false",
        help="measure throughput on the ~10 us model only (not on the ~100 us and ~1 ms ones)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1: other threads' CPU time would be missed")
    if args.quick:
        args.runs, args.blocks, args.requests = 3, 4, 500
        args.starts, args.idle, args.swaps, args.settle = 2, 2.0, 1, 1.0
    return args


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        yield Path(tmp)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("_latency-client", "_load-client"):
        spec = json.loads(sys.argv[2])
        (latency_client if sys.argv[1] == "_latency-client" else load_client)(spec)
        return
    args = parse_args()
    sections = args.only or ["throughput", "http", "cli", "hotswap"]
    env = environment(args)
    print(
        f"{env['date']}  {env['cpu']}, {env['cpus']} CPUs, {env['machine']}, Linux {env['kernel']}"
    )
    print(
        f"Python {env['python']}, NumPy {env['numpy']}, onnxruntime {env['onnxruntime']}, "
        f"edgekit {env['edgekit']}; model: MLP {FEATURES}->{HIDDEN}->{CLASSES} float32, "
        f"batch 1, intra-op threads {args.threads}, throughput clock: {args.clock}"
    )
    load_before, busy_before = os.getloadavg()[0], background_busy()
    print(
        f"machine before: load average {load_before:.2f}, other processes keep "
        f"{busy_before * 100:.0f}% of all CPUs busy"
    )
    figures: dict[str, Any] = {"environment": env}
    with workdir() as root:
        fx = build_fixture(root, args.threads, versions=args.swaps + 1)
        steps: dict[str, Callable[[Fixture, argparse.Namespace], dict[str, Any]]] = {
            "throughput": bench_throughput,
            "http": bench_http,
            "cli": bench_cli,
            "hotswap": bench_hotswap,
        }
        for name in sections:
            started = time.monotonic()
            print(f"... {name}", file=sys.stderr, flush=True)
            figures[name] = steps[name](fx, args)
            if name == "cli":
                figures[name]["imports_s"] = import_breakdown(3 if not args.quick else 1)
            print(f"    {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    load_after, busy_after = os.getloadavg()[0], background_busy()
    figures["noise"] = {
        "load_before": load_before,
        "load_after": load_after,
        "busy_before": busy_before,
        "busy_after": busy_after,
    }
    report(figures, args)
    print(
        f"\nmachine after: load average {load_after:.2f}, other processes keep "
        f"{busy_after * 100:.0f}% of all CPUs busy (before: {busy_before * 100:.0f}%)"
    )
    if args.json:
        figures.get("throughput", {}).pop("profile", None)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
