"""The fleet part of ``./demo.sh``: a real controller and three real agents on this machine.

What it shows, each step a real command or a real process (:mod:`edgekit.launcher` starts
them, the same way ``tests/e2e`` does):

1. three digit classifiers trained on scikit-learn's digits (v1 on a few samples, v2 on many,
   v3 as a third release), v1 and v2 converted and signed by ``edgekit convert``;
2. a broken v3: its model shipped with v2's golden set, as a release pipeline that mixed up
   two builds would ship it. The signature is valid; only the device can notice;
3. mosquitto on a free loopback port, ``edgekit fleet serve``, three ``edgekit-agent run``
   processes with no model yet, labelled into a group with ``edgekit fleet label``;
4. v1, then v2 rolled out in waves with ``edgekit rollout create``, gated on the golden
   self-test, error rate, latency and drift the agents report while a traffic thread keeps
   them answering predictions;
5. v3 rolled out the same way: the first device's self-test refuses it, the rollout breaches
   and rolls itself back, and no other device is ever sent v3;
6. a prediction from each agent, all still on v2, and the dashboard's address.

Everything is stopped at the end (agents, controller, broker, in that order), also on Ctrl-C
or a failure; ``--keep-running`` leaves the stack up until Ctrl-C.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekit.demo import edgekit_command, step, write_linear_classifier
from edgekit.launcher import (
    AgentProcess,
    AgentSettings,
    LaunchError,
    LocalFleet,
    terminate_on_sigterm,
    watch_rollout,
)

__all__ = ["FLEET", "run_fleet"]

FLEET = "demo"
GROUP = "cameras"
#: Agents for a demo: telemetry every second, a health window of 20 inferences (one second
#: of the demo's traffic), drift scored over 40 requests.
AGENT_SETTINGS = AgentSettings(
    telemetry_interval_s=1.0,
    keepalive_s=5,
    health_min_inferences=20,
    health_max_seconds=10.0,
    drift_min_requests=40,
    reconnect_initial_s=0.2,
    reconnect_max_s=2.0,
)
#: Requests per second each agent gets from the traffic thread.
TRAFFIC_HZ = 20.0
#: The gates every rollout of the demo is held to. Drift (PSI against the bundle's baseline)
#: is reported and shown, but not gated on here: over the few dozen requests a demo's
#: window holds, one digit class that happens not to be predicted scores a PSI near 0.7 on
#: its own (docs/fleet.md, "The demo"); a fleet with real traffic gates on it.
GATES = ("golden_pass==1", "error_rate<=0.01", "p95_latency_ms<=50")


class DemoFailed(SystemExit):
    """A step did not behave as the demo says it does: stop with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(f"demo step did not behave as expected: {message}")


# --- the models -----------------------------------------------------------------------------


def _train(directory: Path) -> dict[str, Any]:
    """Three logistic-regression digit classifiers and the data the demo uses."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise DemoFailed(
            "the fleet demo trains on scikit-learn's digits: pip install scikit-learn "
            "(./demo.sh installs it)"
        ) from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    train_x, train_y, val_x, val_y = x[:1200], y[:1200], x[1200:], y[1200:]
    recipes = {
        1: ("trained on 60 images", train_x[:60], train_y[:60], 1.0),
        2: ("trained on 1200 images", train_x, train_y, 1.0),
        3: ("trained on 1200 images, weaker regularization", train_x, train_y, 10.0),
    }
    models = {}
    for version, (what, xs, ys, c) in recipes.items():
        clf = LogisticRegression(C=c, max_iter=500, random_state=0).fit(xs, ys)
        path = write_linear_classifier(
            directory / f"digits-v{version}.onnx", clf.coef_.T, clf.intercept_
        )
        accuracy = float((clf.predict(val_x) == val_y).mean())
        print(f"digits v{version}: {what}; accuracy {accuracy:.1%} on {len(val_y)} held-out images")
        models[version] = path
    np.save(directory / "calibration.npy", train_x[:300])
    np.save(directory / "validation.npy", val_x)
    np.save(directory / "labels.npy", val_y)
    return {"models": models, "val_x": val_x, "val_y": val_y}


def _extract(bundle: Path, name: str, target: Path) -> Path:
    """Copy one file out of a bundle (the broken release reuses v2's golden set)."""
    from edgekit.bundle import read_bundle

    entry = next((e for e in read_bundle(bundle).entries if e.name == name), None)
    if entry is None:
        raise DemoFailed(f"{bundle.name} holds no {name}")
    with bundle.open("rb") as handle:
        handle.seek(entry.offset)
        target.write_bytes(handle.read(entry.size))
    return target


def _release(work: Path) -> dict[str, Any]:
    """Train, convert, sign: the three bundles and the devices' trust file."""
    models_dir, keys_dir, bundles_dir = work / "models", work / "keys", work / "bundles"
    for folder in (models_dir, keys_dir, bundles_dir):
        folder.mkdir(parents=True, exist_ok=True)

    step("1. Train three digit classifiers on scikit-learn's digits (8x8 images)")
    data = _train(models_dir)

    step("2. A release key, and the trust file every device gets")
    edgekit_command("keys", "generate", "release", "--dir", keys_dir)
    trust = work / "trust.json"
    edgekit_command(
        "trust", "init", "--key", keys_dir / "release.pub", "--threshold", "1", "-o", trust
    )

    step("3. Convert and sign v1 and v2: every variant measured, the best within budget kept")
    bundles = {}
    for version in (1, 2):
        bundles[version] = bundles_dir / f"digits-{version}.ekb"
        edgekit_command(
            "convert", data["models"][version],
            "--quantize", "auto",
            "--calibration", models_dir / "calibration.npy",
            "--validation", models_dir / "validation.npy",
            "--labels", models_dir / "labels.npy",
            "--max-accuracy-drop", "0.01",
            "--key", keys_dir / "release.key",
            "--name", "digits", "--version", str(version),
            "--display-version", f"{version}.0.0",
            "--no-progress",
            "-o", bundles[version],
        )  # fmt: skip

    step("4. A broken v3: a new model shipped with v2's golden set (a mixed-up build)")
    print(
        "The signature is valid and the verifier accepts the bundle; what the model computes "
        "no longer matches its golden outputs, which only the device's self-test can notice."
    )
    golden = _extract(bundles[2], "golden.npz", bundles_dir / "golden-from-v2.npz")
    baseline = _extract(bundles[2], "baseline.json", bundles_dir / "baseline-from-v2.json")
    bundles[3] = bundles_dir / "digits-3.ekb"
    edgekit_command(
        "sign", data["models"][3],
        "--key", keys_dir / "release.key",
        "--name", "digits", "--version", "3", "--display-version", "3.0.0",
        "--golden", golden, "--baseline", baseline,
        "-o", bundles[3],
    )  # fmt: skip
    edgekit_command("verify", bundles[3], "--trust", trust, "--installed-version", "2")
    return {"trust": trust, "bundles": bundles, **data}


# --- the fleet ------------------------------------------------------------------------------


def _rollout_line(started: float, data: dict[str, Any]) -> str:
    totals = data["totals"]
    gates = " ".join(
        f"{g['gate']}:{g['verdict']}" for g in data.get("gate_results") or [] if g.get("gate")
    )
    line = (
        f"  +{time.monotonic() - started:5.1f}s  {data['state']:<11} wave {data['wave']}/"
        f"{data['waves']}  devices {totals['devices']}  ok {totals['succeeded']}  "
        f"failed {totals['failed']}  pending {totals['pending']}"
    )
    if gates:
        line += f"  gates {gates}"
    if data.get("reason"):
        line += f"\n           reason: {data['reason']}"
    return line


def _roll_out(fleet: LocalFleet, bundle: Path, waves: str, *, timeout: float = 180) -> str:
    """``edgekit rollout create`` with the demo's gates; prints progress until it ends."""
    output = edgekit_command(
        "rollout", "create", bundle,
        "--fleet", FLEET,
        "--target", f"group={GROUP}",
        "--waves", waves,
        "--min-wave-time", "2s",
        "--success-threshold", "100%",
        "--max-failures", "0%",
        "--min-inferences", "20",
        *(arg for gate in GATES for arg in ("--gate", gate)),
        "--device-timeout", "60s",
        "--on-breach", "rollback",
        env=fleet.cli_env(),
    )  # fmt: skip
    rollout_id = output.split()[1].rstrip(":")
    started = time.monotonic()
    watch_rollout(
        fleet.client,
        rollout_id,
        timeout=timeout,
        on_change=lambda data: print(_rollout_line(started, data), flush=True),
    )
    edgekit_command("rollout", "status", rollout_id, env=fleet.cli_env())
    return rollout_id


def _expect_serving(fleet: LocalFleet, version: int) -> None:
    for agent in fleet.agents:
        model = agent.model()
        if (model["name"], model["version"]) != ("digits", version):
            raise DemoFailed(f"{agent.device} serves {model['name']} v{model['version']}")


def _show_predictions(fleet: LocalFleet, images: Any, labels: Any) -> None:
    """One held-out image of a different digit to each agent, as ``curl`` would send it."""
    picks = [next(i for i, label in enumerate(labels) if label == digit) for digit in (0, 4, 8)]
    for index, agent in zip(picks, fleet.agents, strict=True):
        row = [round(float(v), 4) for v in images[index]]
        shown = ", ".join(str(v) for v in row[:4])
        print(
            f"$ curl -s {agent.url}/v1/predict -d '{{\"inputs\": [[{shown}, ... 64 values]]}}'",
            flush=True,
        )
        answer = agent.predict([row])
        probabilities = answer["outputs"]["probabilities"][0]
        predicted = max(range(len(probabilities)), key=probabilities.__getitem__)
        model = answer["model"]
        print(
            f"  {agent.device}: {model['name']} v{model['version']} says {predicted} "
            f"(p={probabilities[predicted]:.2f}); true label {int(labels[index])}; "
            f"{answer['latency_ms']:.2f} ms",
            flush=True,
        )


def _agent_status(agent: AgentProcess) -> None:
    """``edgekit-agent status`` as an operator on the device would run it."""
    args = ["status", "--config", str(agent.config_path), "--events", "6"]
    print("$ edgekit-agent " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", *args], capture_output=True, text=True, check=False
    )
    print((result.stdout + result.stderr).rstrip(), flush=True)


def _wait_for_ctrl_c(fleet: LocalFleet) -> None:
    print(
        f"\nThe stack keeps running (traffic included). Dashboard: {fleet.controller.dashboard_url}"
        "\nPress Ctrl-C to stop it.",
        flush=True,
    )
    try:
        while fleet.controller.alive and fleet.broker.running:
            time.sleep(1.0)
        print("a process of the stack exited; stopping the rest", flush=True)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)


def run_fleet(work: Path, *, keep_running: bool = False) -> None:
    """The whole fleet part in ``work`` (which must exist and be empty)."""
    release = _release(work)
    bundles: dict[int, Path] = release["bundles"]
    images, labels = release["val_x"], release["val_y"]
    rows: Sequence[list[float]] = [[float(v) for v in image] for image in images]
    interrupted = False
    with (
        terminate_on_sigterm(),
        LocalFleet(
            work / "stack",
            trust_file=release["trust"],
            fleet=FLEET,
            agents=3,
            agent_settings=AGENT_SETTINGS,
        ) as fleet,
    ):
        try:
            _run_stack(fleet, bundles, rows, images, labels)
            if keep_running:
                _wait_for_ctrl_c(fleet)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted; stopping agents, controller and broker...", flush=True)
        except LaunchError as exc:
            raise DemoFailed(exc.message) from None
        finally:
            print("stopping the agents, the controller and the broker", flush=True)
    if interrupted:
        raise SystemExit(130)
    print(f"stopped; logs and state in {work / 'stack'}", flush=True)


def _run_stack(
    fleet: LocalFleet,
    bundles: dict[int, Path],
    rows: Sequence[list[float]],
    images: Any,
    labels: Any,
) -> None:
    step("5. Start mosquitto, the controller and three agents (no model on them yet)")
    fleet.broker.start()
    print(f"mosquitto listening on {fleet.broker.host}:{fleet.broker.port}", flush=True)
    print(
        f"$ EDGEKIT_FLEET_TOKEN=... edgekit fleet serve --broker {fleet.broker.url} "
        f"--db {fleet.db_url} --artifacts {fleet.controller.artifacts} "
        f"--listen 127.0.0.1:{fleet.controller.port} --fleet {FLEET}",
        flush=True,
    )
    for agent in fleet.agents:
        print(f"$ edgekit-agent run --config {agent.config_path}   # HTTP API {agent.url}")
    fleet.start()
    print(
        f"controller ready at {fleet.controller.url}; the three agents are online.\n"
        f"Dashboard: {fleet.controller.dashboard_url}\n"
        f"To use the CLI yourself: export EDGEKIT_CONTROLLER={fleet.controller.url} "
        f"EDGEKIT_FLEET_TOKEN={fleet.token}",
        flush=True,
    )
    env = fleet.cli_env()
    devices = [agent.device for agent in fleet.agents]
    edgekit_command("fleet", "label", *devices, "--fleet", FLEET, "--group", GROUP, env=env)
    edgekit_command("fleet", "devices", "--fleet", FLEET, env=env)
    traffic = fleet.start_traffic(rows, rate_hz=TRAFFIC_HZ)
    print(
        f"traffic: every agent gets {TRAFFIC_HZ:.0f} predictions per second from here on",
        flush=True,
    )

    step("6. Roll out v1: one device first, then the rest, gated on what the devices report")
    _roll_out(fleet, bundles[1], "30%,100%")
    _expect_serving(fleet, 1)
    traffic.reset()  # predictions refused before v1 arrived ("no model") are not failures

    step("7. Roll out v2 in three waves: one device, then two, then all three")
    _roll_out(fleet, bundles[2], "30%,60%,100%")
    _expect_serving(fleet, 2)

    step("8. Roll out the broken v3: the first device's self-test refuses it")
    v3 = _roll_out(fleet, bundles[3], "30%,60%,100%")
    final = fleet.client.rollout(v3)
    if final["state"] != "rolled-back":
        raise DemoFailed(f"rollout {v3} ended {final['state']}, not rolled-back")
    touched = [d["device"] for d in fleet.client.rollout_devices(v3)]
    print(
        f"rollout {v3} rolled itself back: {final['reason']}. Sent to {len(touched)} of "
        f"{len(fleet.agents)} devices ({', '.join(touched)}); nobody else ever saw v3.",
        flush=True,
    )
    edgekit_command("rollout", "status", v3, "--devices", "--audit", env=env)
    _agent_status(fleet.agent(touched[0]))

    step("9. Every agent still serves v2: one prediction from each")
    _expect_serving(fleet, 2)
    _show_predictions(fleet, images, labels)
    counts = traffic.snapshot()
    answered = sum(c.answered for c in counts.values())
    failed = sum(c.failed for c in counts.values())
    print(
        f"traffic since v1: {answered} predictions answered, {failed} failed, across every "
        "rollout above",
        flush=True,
    )
    if failed:
        raise DemoFailed(f"{failed} predictions failed: {counts}")
    print(f"\nDashboard: {fleet.controller.dashboard_url}", flush=True)
    print("(up while the stack runs: ./demo.sh --keep-running leaves it up)", flush=True)
    print(f"State, logs and the database: {fleet.root}", flush=True)
