"""Power loss: SIGKILL an update at random instants; every restart serves one committed model.

A helper process imports the agent once and forks a child per trial (forking is ~1 ms where a
fresh interpreter costs ~0.3 s, which is what makes over a hundred trials affordable). The child
opens the agent, installs the next bundle, drives its health window with requests, commits and
closes; the helper SIGKILLs it after a random delay, counted from the start of the update and
drawn over the length of an uninterrupted one. After each
kill the test restarts the agent on the same state directory and checks the invariant:

* no update is left in flight, and the model served is the active slot, which is either the
  model from before the trial or the new one, with exactly that model's outputs;
* the anti-rollback floor equals the served version (nothing committed was lost, nothing
  uncommitted was kept); only referenced slots exist, no temp files or partial directories;
* ``state.json`` parses, and the event log parses with consecutive sequence numbers.

The state directory carries over from trial to trial, so later trials also start from states
that earlier kills produced.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import AgentConfig, EventsConfig, HealthConfig
from device_agent.events import read_events
from device_agent.store import Store

TRIALS = 120
WARMUP = 3

FORK_SERVER = r"""
import json, os, signal, sys, time
import numpy as np
import onnxruntime  # imported before forking: children start warm (no session exists yet)
from device_agent.agent import Agent
from device_agent.config import AgentConfig, EventsConfig, HealthConfig

state_dir, x_path, inferences = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = AgentConfig(
    state_dir=state_dir,
    health=HealthConfig(min_inferences=inferences, max_seconds=60.0),
    events=EventsConfig(max_bytes=16384, keep=3),
)
x = np.load(x_path)
print("ready", flush=True)

def update(bundle, ready_fd):
    agent = Agent(config=config)
    os.write(ready_fd, b"s")  # the update starts now: the kill clock starts here
    result = agent.install(bundle, wait_for_health=False)
    if result.ok:
        for _ in range(inferences):
            agent.predict(x)
        agent.evaluate_health()
    agent.close()

for line in sys.stdin:
    bundle, delay = line.split()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        code = 0
        try:
            update(bundle, ready_w)
        except BaseException as exc:
            os.write(2, f"child failed: {exc!r}\n".encode())
            code = 3
        os._exit(code)
    os.close(ready_w)
    os.read(ready_r, 1)  # returns b"" if the child died before starting the update
    os.close(ready_r)
    started = time.monotonic()
    deadline = started + float(delay)
    status = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    killed = os.WIFSIGNALED(status)
    code = None if killed else os.WEXITSTATUS(status)
    print(json.dumps({"killed": killed, "code": code, "elapsed": time.monotonic() - started}),
          flush=True)
"""


class ForkServer:
    def __init__(self, state_dir: Path, x_path: Path, inferences: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        repo = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER, str(state_dir), str(x_path), str(inferences)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=repo,
            env=env,
        )
        assert self._readline() == "ready"

    def _readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError("the fork server died")
        return line.strip()

    def trial(self, bundle: Path, delay: float) -> dict[str, object]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{bundle} {delay:.6f}\n")
        self.process.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def _check_after_restart(kit, config, versions: dict[int, str]) -> tuple[int, str | None]:
    """Restart on the state dir, check the invariant, return (served version, phase seen)."""
    store = Store(kit.state_dir)
    raw = json.loads((kit.state_dir / "state.json").read_bytes())  # parses after any kill
    phase = raw["pending"]["phase"] if raw["pending"] else None

    agent = kit.agent(config)
    try:
        state = agent.updates.state
        assert state.pending is None
        info = agent.model_info()
        version = info["version"]
        assert info["slot"] == state.active, "serving something other than the active slot"
        assert state.installed_version == version
        out = agent.predict(kit.x)["probabilities"]
        np.testing.assert_allclose(out, kit.expected(versions[version]), rtol=1e-6)
        assert set(store.slots()) == state.referenced()
        leftovers = [
            p.name
            for folder in (kit.state_dir, kit.state_dir / "slots")
            for p in folder.iterdir()
            if p.name.startswith(".")
        ]
        assert leftovers == []
    finally:
        agent.close()
        kit._agents.remove(agent)
    events = read_events(kit.state_dir / "events.jsonl", keep=3)
    for path in (kit.state_dir).glob("events.jsonl*"):
        for line in path.read_bytes().splitlines():
            json.loads(line)  # every line parses: torn tails were cut at restart
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "event seq has a gap"
    return version, phase


@pytest.mark.slow
def test_sigkill_at_random_points_of_updates_always_leaves_one_committed_model(kit):
    inferences = 3
    config = AgentConfig(
        state_dir=kit.state_dir,
        health=HealthConfig(min_inferences=inferences, max_seconds=60.0),
        events=EventsConfig(max_bytes=16384, keep=3),
    )
    agent = kit.agent(config)
    kit.commit(agent, kit.bundle(1, "m1"))
    agent.close()
    kit._agents.remove(agent)
    models = ["m2", "m1"]
    versions = {1: "m1"}
    bundles = []
    for index in range(WARMUP + TRIALS):
        version = index + 2
        versions[version] = models[index % 2]
        bundles.append(kit.bundle(version, versions[version]))
    x_path = kit.root / "x.npy"
    np.save(x_path, kit.x)

    server = ForkServer(kit.state_dir, x_path, inferences)
    try:
        # Uninterrupted updates measure how long one takes here (the first one is cold).
        timings = []
        for bundle_index in range(WARMUP):
            report = server.trial(bundles[bundle_index], 30.0)
            assert (report["killed"], report["code"]) == (False, 0), report
            timings.append(float(report["elapsed"]))  # type: ignore[arg-type]
            served, _ = _check_after_restart(kit, config, versions)
            assert served == bundle_index + 2
        finished = timings[1:]

        rng = random.Random(20240501)
        outcomes: Counter[str] = Counter()
        phases: Counter[str | None] = Counter()
        current = WARMUP + 1
        for bundle_index in range(WARMUP, WARMUP + TRIALS):
            new = bundle_index + 2
            # The length of an update varies with fsync latency: estimate it from the recent
            # runs that finished. Half the kills land anywhere in the update, half around its
            # end (activation, health window, commit), where a lost write would hurt most.
            duration = statistics.median(finished[-7:])
            low, high = (0.0, duration) if bundle_index % 2 else (0.5 * duration, 1.5 * duration)
            report = server.trial(bundles[bundle_index], rng.uniform(low, high))
            assert report["code"] in (None, 0), report
            if not report["killed"]:
                finished.append(float(report["elapsed"]))  # type: ignore[arg-type]
            served, phase = _check_after_restart(kit, config, versions)
            assert served in (current, new), (served, current, new)
            outcomes["new" if served == new else "old"] += 1
            outcomes["killed" if report["killed"] else "finished"] += 1
            phases[phase] += 1
            current = served
    finally:
        server.close()

    # The kills really landed inside updates, in several phases, with both outcomes.
    assert outcomes["killed"] >= TRIALS // 3, outcomes
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    assert len([p for p in phases if p is not None]) >= 2, phases
