"""A real mosquitto broker for tests: own config, free loopback port, start/stop/restart/kill.

The MQTT tests run against Debian's ``mosquitto`` rather than a fake, because what they check
(QoS 1 acknowledgements, retained messages, last wills, sessions that survive a broker restart)
is exactly what a fake would get subtly wrong. Each :class:`Broker` writes its config, its
persistence file and its log into its own directory, listens on ``127.0.0.1`` only, and is
killed on teardown whatever happened in the test.

A stopped broker can be started again on the *same* port (clients configured with that port
reconnect to it); mosquitto sets ``SO_REUSEADDR`` on its listeners, so the port is free again as
soon as the process has exited.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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

#: Debian installs the broker in /usr/sbin, which is not on every user's PATH.
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto broker binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_client(name: str) -> str | None:
    """Path of a mosquitto-clients tool (``mosquitto_sub``, ``mosquitto_pub``) or None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = f"/usr/bin/{name}"
    return candidate if os.access(candidate, os.X_OK) else None


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One mosquitto process with its own config in ``workdir``.

    ``persistence`` keeps sessions and queued QoS 1 messages across :meth:`stop`/:meth:`start`
    (saved on SIGTERM), which is what a production broker does and what the outage test needs
    for its persistent subscriber. ``listener_options`` are lines placed right after the
    ``listener`` line (TLS settings); ``options`` are global lines (``password_file``...). With
    any ``options`` or ``listener_options`` given, ``allow_anonymous`` is left to them.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        port: int | None = None,
        persistence: bool = True,
        options: Sequence[str] = (),
        listener_options: Sequence[str] = (),
        allow_anonymous: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} {self.host}",
            *listener_options,
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 0",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            *options,
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops privileges to the 'mosquitto' user, which could not
            # write our temporary directory; 'user root' keeps the current identity.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log(self) -> str:
        """The broker's log so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read() if self._process.stderr else b""
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}: "
                    f"{stderr.decode(errors='replace').strip()} {self.log()[-2000:]}"
                )
            if _port_accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: the broker saves its persistence file and exits)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
        self._close_pipes()

    def kill(self) -> None:
        """Stop at once (SIGKILL): nothing is saved, like a power cut of the broker host."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._close_pipes()

    def restart(self, *, timeout: float = 10.0) -> None:
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def _close_pipes(self) -> None:
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def running_broker(workdir: Path, *, binary: str, **options: object) -> Iterator[Broker]:
    """A started :class:`Broker` that is killed on exit, whatever happened inside."""
    broker = Broker(workdir, binary=binary, **options)  # type: ignore[arg-type]
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
