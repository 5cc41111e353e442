"""A real mosquitto broker for tests, and ``mosquitto_sub`` as an independent observer.

The MQTT tests run against Debian's ``mosquitto`` rather than a fake, because what they check
(QoS 1 acknowledgements, retained messages, last wills, sessions that survive a broker restart)
is exactly what a fake would get subtly wrong. The broker itself is
:class:`edgekit.launcher.Mosquitto` (own config, persistence file and log in its own
directory, 127.0.0.1 only, start/stop/restart/kill, restartable on the same port): the fleet
demo and the end-to-end tests start it the same way. This module adds what only tests need:
skipping when a binary is missing, waits that fail the test, and :class:`Subscriber`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgekit.launcher import MOSQUITTO_CANDIDATES, Mosquitto, find_mosquitto, free_port, wait_until
from edgekit.protocol import Message, MessageKind, TopicParts, decode

__all__ = [
    "MOSQUITTO_CANDIDATES",
    "WAIT_S",
    "Broker",
    "Subscriber",
    "find_client",
    "find_mosquitto",
    "free_port",
    "require_client",
    "require_mosquitto",
    "running_broker",
    "wait_for",
]

#: Default limit of every wait in the MQTT tests.
WAIT_S = 15.0

#: The tests' name for the launcher's broker (``Broker(workdir, binary=..., **options)``).
Broker = Mosquitto


def find_client(name: str) -> str | None:
    """Path of a mosquitto-clients tool (``mosquitto_sub``, ``mosquitto_pub``) or None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = f"/usr/bin/{name}"
    return candidate if os.access(candidate, os.X_OK) else None


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    return wait_until(predicate, timeout=timeout, what=what, interval=0.02, error=AssertionError)


@contextlib.contextmanager
def running_broker(workdir: Path, *, binary: str, **options: Any) -> Iterator[Broker]:
    """A started :class:`Broker` that is killed on exit, whatever happened inside."""
    broker = Broker(workdir, binary=binary, **options)
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()


class Subscriber:
    """``mosquitto_sub -d -v -q 1 -t FILTER``, its output collected by a reader thread.

    ``-d`` prints protocol events ("received SUBACK"), which tells when the subscription is
    active; message lines are the ones that start with the topic root.
    """

    def __init__(
        self,
        binary: str,
        broker: Broker,
        *,
        topic: str = "edgekit/v1/#",
        client_id: str | None = None,
        version: str = "mqttv5",
    ) -> None:
        # mosquitto_sub flushes stdout after each message but not after its debug lines; with
        # coreutils' stdbuf the SUBACK line arrives at once, otherwise we can only wait.
        stdbuf = shutil.which("stdbuf")
        args = [stdbuf, "-oL"] if stdbuf else []
        args += [binary, "-d", "-v", "-q", "1", "-V", version]
        args += ["-h", broker.host, "-p", str(broker.port), "-t", topic]
        if client_id is not None:  # a persistent session: queued for us while we are away
            args += ["-c", "-i", client_id]
        self._lock = threading.Lock()
        self.lines: list[str] = []
        self.debug: list[str] = []
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if stdbuf:
            wait_for(lambda: self.subacks() >= 1, what="mosquitto_sub's SUBACK")
        else:
            time.sleep(1.0)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                (self.lines if line.startswith("edgekit/") else self.debug).append(line)

    def subacks(self) -> int:
        with self._lock:
            return sum("SUBACK" in line for line in self.debug)

    def raw(self) -> list[tuple[str, bytes]]:
        with self._lock:
            lines = list(self.lines)
        result = []
        for line in lines:
            topic, _, payload = line.partition(" ")
            result.append((topic, payload.encode("utf-8")))
        return result

    def messages(self, kind: MessageKind | None = None) -> list[tuple[TopicParts, Message]]:
        """Every message seen so far, parsed and validated by the protocol module."""
        parsed = []
        for topic, payload in self.raw():
            if not payload:
                continue
            parts, message = decode(topic, payload)
            if kind is None or parts.kind is kind:
                parsed.append((parts, message))
        return parsed

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def require_mosquitto() -> str:
    """The broker binary, or skip the test with the Debian package to install."""
    import pytest

    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto); CI installs it")
    return binary


def require_client(name: str) -> str:
    """A mosquitto-clients tool, or skip the test with the Debian package to install."""
    import pytest

    found = find_client(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package mosquitto-clients)")
    return found


class LineCounter:
    """``mosquitto_sub`` on a fleet's upstream topics, counting the messages it prints: the
    benchmarks' reference for what the broker delivered."""

    UPSTREAM = ("status", "telemetry", "events", "reported")

    def __init__(self, broker: Broker, fleet: str, *, mqtt5: bool = False) -> None:
        binary = find_client("mosquitto_sub")
        if binary is None:
            raise SystemExit("mosquitto_sub is missing (Debian package mosquitto-clients)")
        args = [binary, "-q", "1", "-h", broker.host, "-p", str(broker.port), "-v"]
        if mqtt5:
            args += ["-V", "mqttv5"]
        for kind in self.UPSTREAM:
            args += ["-t", f"edgekit/v1/{fleet}/+/{kind}"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.count = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for _line in self.process.stdout:
            with self._lock:
                self.count += 1

    def value(self) -> int:
        with self._lock:
            return self.count

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
