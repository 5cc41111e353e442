"""``edgekit-agent run`` with ``[mqtt]`` as a real process: killed with records still in its
outbox, restarted, and restarted by the fleet's ``restart`` command."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_support import DEVICE, FLEET, events, wait_event
from support.mosquitto import Broker, wait_for

from device_agent.fleet_link import FLEET_STATE_NAME, OUTBOX_NAME
from edgekit.protocol import Command, MessageKind, Status, Topics

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[3]


def write_config(kit: Any, broker: Broker) -> Path:
    config = kit.root / "agent.toml"
    config.write_text(
        f'state_dir = "{kit.state_dir}"\n'
        "[health]\nmin_inferences = 5\nmax_seconds = 30.0\n"
        "[http]\nenabled = false\n"
        "[mqtt]\nenabled = true\n"
        f'host = "{broker.host}"\nport = {broker.port}\n'
        f'fleet = "{FLEET}"\ndevice = "{DEVICE}"\n'
        "keepalive_s = 5\ntelemetry_interval_s = 0.1\n"
        "reconnect_initial_s = 0.1\nreconnect_max_s = 0.5\n"
    )
    return config


class Service:
    """``python -m device_agent run`` in the background; killed at teardown."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "service.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def service(fleet_kit: Any, fleet_broker: Broker) -> Iterator[Service]:
    agent = fleet_kit.agent()
    fleet_kit.commit(agent, fleet_kit.bundle(1, "m1"))
    agent.close()
    running = Service(write_config(fleet_kit, fleet_broker))
    yield running
    running.kill()


def queued(state_dir: Path) -> list[tuple[str, int, str]]:
    """(kind, seq, msg_id) of the records waiting in the outbox, read from outside."""
    path = state_dir / OUTBOX_NAME
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT kind, seq, payload FROM records ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the agent is still creating the file
        return []
    return [(kind, seq, json.loads(payload)["msg_id"]) for kind, seq, payload in rows]


def test_records_queued_by_a_killed_agent_are_delivered_after_restart(
    service: Service, fleet_broker: Broker, fleet_subscriber, fleet_kit: Any
) -> None:
    fleet_broker.stop()  # the uplink is down: everything waits in the outbox
    service.start()
    state_dir = fleet_kit.state_dir
    wait_for(
        lambda: sum(kind == "telemetry" for kind, _, _ in queued(state_dir)) >= 10,
        timeout=30,
        what=f"telemetry queued offline; log: {service.output()[-2000:]}",
    )
    service.kill()  # SIGKILL: no clean shutdown, no offline status
    unsent = queued(state_dir)
    assert {kind for kind, _, _ in unsent} >= {"telemetry", "events", "reported"}

    fleet_broker.start()
    subscriber = fleet_subscriber()
    service.start()
    # Retained ``reported`` is state, not history: the new process's replaces the queued one.
    wanted = {(kind, seq): msg_id for kind, seq, msg_id in unsent if kind != "reported"}

    def delivered() -> dict[tuple[str, int], str]:
        return {(m.KIND.value, m.seq): m.msg_id for _, m in subscriber.messages()}

    wait_for(lambda: wanted.items() <= delivered().items(), timeout=30, what="queued records")
    pid = service.process.pid  # type: ignore[union-attr]
    wait_for(
        lambda: any(e.data.get("pid") == pid for e in events(subscriber, "agent.started")),
        what="the new process's agent.started",
    )
    assert service.terminate() == 0
    # Every agent event of both runs forwarded, each under one msg_id.
    by_seq: dict[int, set[str]] = {}
    for event in events(subscriber):
        if "event_seq" in event.data:
            by_seq.setdefault(event.data["event_seq"], set()).add(event.msg_id)
    log = [e["seq"] for e in fleet_kit.events() if e["type"] != "agent-stopped"]
    assert set(log) <= set(by_seq) and all(len(ids) == 1 for ids in by_seq.values())
    states = [m for _, m in subscriber.messages(MessageKind.STATUS) if isinstance(m, Status)]
    assert states[-1].state.value == "offline" and states[-1].reason == "shutdown"
    assert queued(state_dir) == []


def test_restart_command_restarts_the_process_and_is_completed_by_the_new_one(
    service: Service, fleet_subscriber, fleet_pub, fleet_kit: Any
) -> None:
    topics = Topics(FLEET, DEVICE)
    subscriber = fleet_subscriber()
    service.start()
    wait_event(subscriber, "agent.started", count=2, timeout=30)  # the setup's, then ours
    wait_for(lambda: subscriber.messages(MessageKind.TELEMETRY), what="telemetry")
    restart = Command(device=DEVICE, seq=1, command="restart")
    fleet_pub(topics.cmd, restart.to_json())
    wait_event(subscriber, "command.accepted")
    done = wait_event(subscriber, "command.completed", timeout=30)
    assert done.ref == restart.msg_id
    assert done.data["pid"] == service.process.pid  # type: ignore[union-attr]  # exec: same pid
    wait_event(subscriber, "agent.started", count=3, timeout=30)
    assert [e.ref for e in events(subscriber, "command.completed")] == [restart.msg_id]
    state = json.loads((fleet_kit.state_dir / FLEET_STATE_NAME).read_text())
    assert state["restart_ref"] is None
    assert service.terminate() == 0
