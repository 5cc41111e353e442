"""How the fleet controller holds up against 1,000 simulated devices.

Targets (issue: fleet controller), all on loopback with one mosquitto broker:

* **ingest**: 1,000 devices (``edgekit simulate``, real protocol, one MQTT connection each)
  send telemetry once per second; the controller stores messages at >= 0.5x the rate a bare
  ``mosquitto_sub`` on the same topics receives in the same window, with no growing backlog
  (its ingest queue does not trend upward; its receive-to-commit lag stays bounded);
* **rollout**: a 5 MB bundle to the 1,000 devices in 4 waves, every device downloading it
  over HTTP from the controller's artifact server and checking its sha256, completes within
  60 s (``min_wave_time`` 0 and no gates: gate waits are excluded, as the target says);
* **memory**: the controller's peak RSS (VmHWM) <= 400 MB over the whole run.

The controller, the simulator and ``mosquitto_sub`` are separate processes, as in
production; the figures are the controller's own counters (``/api/v1/stats``) and the
subscriber's line count over the same wall-clock window.

    python benchmarks/bench_fleet.py                  # 1000 devices, 30 s ingest window
    python benchmarks/bench_fleet.py --devices 200 --window 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The source tree first (tests/edgekit must not shadow the package), tests/support after it.
sys.path[:0] = [str(ROOT)]
sys.path.append(str(ROOT / "tests"))

from support.bundles import write_onnx_model  # noqa: E402
from support.mosquitto import Broker, LineCounter, find_mosquitto  # noqa: E402

from edgekit.bundle import build_bundle  # noqa: E402
from edgekit.fleet.client import FleetClient  # noqa: E402
from edgekit.keys import generate_key  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
FLEET = "bench"
INGEST_RATIO_TARGET = 0.5
ROLLOUT_TARGET_S = 60.0
RSS_TARGET_MB = 400.0
BUNDLE_MB = 5.0


def raise_fd_limit() -> None:
    """1,000 MQTT connections need more descriptors than a default soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_bundle(workdir: Path, *, megabytes: float) -> Path:
    """A signed bundle of about ``megabytes`` MB: a real ONNX model with wide weights."""
    features = int(megabytes * 1024 * 1024 / (4 * 4))  # float32 weights, 4 classes
    model = write_onnx_model(workdir / "wide.onnx", features=features, classes=4)
    out = workdir / "tiny-2.ekb"
    build_bundle(
        model,
        out,
        name="tiny",
        version=2,
        keys=[generate_key()],
        created=datetime.now(timezone.utc) - timedelta(minutes=1),
    )
    return out


def wait(predicate: Any, *, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except Exception:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    raise_fd_limit()
    mosquitto = find_mosquitto()
    if mosquitto is None:
        raise SystemExit("mosquitto is missing (Debian package mosquitto)")
    broker = Broker(
        workdir / "broker",
        binary=mosquitto,
        persistence=False,
        options=["max_queued_messages 100000", "max_connections -1"],
    )
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    counter: LineCounter | None = None
    results: dict[str, Any] = {
        "devices": args.devices,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    try:
        port = int(args.port)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        controller = subprocess.Popen(
            [
                sys.executable, "-m", "edgekit", "fleet", "serve",
                "--broker", f"mqtt://{broker.host}:{broker.port}",
                "--db", args.db or f"sqlite:///{workdir / 'fleet.db'}",
                "--artifacts", str(workdir / "artifacts"),
                "--listen", f"127.0.0.1:{port}",
                "--token", TOKEN,
                "--fleet", FLEET,
                "--tick", "0.5s",
                "--log-level", "warning",
            ],
            env=env,
            stdout=(workdir / "controller.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(controller)
        client = FleetClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout=60)
        wait(lambda: client.stats()["ready"], timeout=60, what="the controller")
        counter = LineCounter(broker, FLEET)
        time.sleep(0.5)
        simulator = subprocess.Popen(
            [
                sys.executable, "-m", "edgekit", "simulate",
                "--devices", str(args.devices),
                "--broker", f"mqtt://{broker.host}:{broker.port}",
                "--fleet", FLEET,
                "--interval", "1s",
                "--rate", "20",
                "--group", "cameras",
                "--install-time", "0.05s",
                "--download-workers", str(args.download_workers),
                "--stats-file", str(workdir / "sim-stats.json"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "simulator.log").open("wb"),
        )  # fmt: skip
        procs.append(simulator)
        started = time.monotonic()
        wait(
            lambda: client.summary(fleet=FLEET)["online"] >= args.devices,
            timeout=300,
            what=f"{args.devices} devices online",
        )
        results["connect_s"] = round(time.monotonic() - started, 1)
        time.sleep(3.0)  # let the connection burst settle

        # --- ingest ---
        rss_samples: list[int] = []
        queue_samples: list[int] = []
        lag_samples: list[float] = []
        stats0 = client.stats()["ingest"]
        sub0, t0 = counter.value(), time.monotonic()
        while time.monotonic() - t0 < args.window:
            time.sleep(1.0)
            stats = client.stats()["ingest"]
            queue_samples.append(stats["queue_depth"])
            lag_samples.append(stats["lag_s"])
            rss_samples.append(memory_kb(controller.pid, "VmRSS"))
        stats1 = client.stats()["ingest"]
        sub1, t1 = counter.value(), time.monotonic()
        elapsed = t1 - t0
        controller_rate = (stats1["processed_total"] - stats0["processed_total"]) / elapsed
        sub_rate = (sub1 - sub0) / elapsed
        half = len(queue_samples) // 2
        results["ingest"] = {
            "window_s": round(elapsed, 1),
            "mosquitto_sub_msgs_per_s": round(sub_rate, 1),
            "controller_msgs_per_s": round(controller_rate, 1),
            "ratio": round(controller_rate / sub_rate, 3) if sub_rate else None,
            "target_ratio": INGEST_RATIO_TARGET,
            "queue_depth_first_half_mean": round(statistics.fmean(queue_samples[:half]), 1),
            "queue_depth_second_half_mean": round(statistics.fmean(queue_samples[half:]), 1),
            "queue_depth_max": max(queue_samples),
            "lag_s_median": round(statistics.median(lag_samples), 3),
            "lag_s_max": round(max(lag_samples), 3),
            "dropped": stats1["dropped"] - stats0["dropped"],
            "malformed": stats1["malformed_total"],
        }

        # --- rollout ---
        bundle = make_bundle(workdir, megabytes=BUNDLE_MB)
        artifact = client.upload(bundle)
        t_start = time.monotonic()
        rollout = client.create_rollout(
            {
                "fleet": FLEET,
                "artifact": artifact["sha256"],
                "target": "group=cameras",
                "waves": "5%,25%,50%,100%",
                "min_wave_time": 0,
                "gates": [],
                "success_threshold": "100%",
                "max_failures": "1%",
                "device_timeout": "5m",
                "retries": 1,
            }
        )
        wave_times: dict[int, float] = {}

        def finished() -> dict[str, Any] | None:
            data = client.rollout(rollout["id"])
            if data["wave"] >= 1:
                wave_times.setdefault(data["wave"], round(time.monotonic() - t_start, 1))
            rss_samples.append(memory_kb(controller.pid, "VmRSS"))
            return data if data["state"] in ("completed", "paused", "rolled-back") else None

        final = wait(finished, timeout=args.rollout_timeout, what="the rollout", every=0.5)
        took = time.monotonic() - t_start
        sim_stats = json.loads((workdir / "sim-stats.json").read_text())
        results["rollout"] = {
            "state": final["state"],
            "seconds": round(took, 1),
            "target_s": ROLLOUT_TARGET_S,
            "bundle_mb": round(artifact["size"] / 1024 / 1024, 2),
            "waves": [w["devices"] for w in final["wave_stats"]],
            "wave_first_seen_at_s": {f"wave {k}": v for k, v in sorted(wave_times.items())},
            "succeeded": final["totals"]["succeeded"],
            "downloads": sim_stats["downloads"],
            "downloaded_gb": round(sim_stats["download_bytes"] / 1024**3, 2),
        }
        results["memory"] = {
            "rss_mb_now": round(memory_kb(controller.pid, "VmRSS") / 1024, 1),
            "rss_mb_peak": round(memory_kb(controller.pid, "VmHWM") / 1024, 1),
            "target_mb": RSS_TARGET_MB,
        }
        results["pass"] = {
            "ingest": bool(results["ingest"]["ratio"])
            and results["ingest"]["ratio"] >= INGEST_RATIO_TARGET,
            "rollout": final["state"] == "completed" and took <= ROLLOUT_TARGET_S,
            "memory": results["memory"]["rss_mb_peak"] <= RSS_TARGET_MB,
        }
        return results
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if counter is not None:
            counter.close()
        broker.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="ingest window, seconds")
    parser.add_argument("--port", default="18931", help="controller HTTP port")
    parser.add_argument("--db", help="database URL (default: SQLite in the work dir)")
    parser.add_argument("--download-workers", type=int, default=32)
    parser.add_argument("--rollout-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        results = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work dir: {workdir}", file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
