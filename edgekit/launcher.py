"""Start a whole fleet on one machine: mosquitto, the controller and real agent processes.

The fleet demo (``./demo.sh``) and the end-to-end tests (``tests/e2e``) run the same stack the
same way, through this module, so that what the demo shows is what the tests check:

* :class:`Mosquitto`: Debian's broker with its own config, on a free loopback port;
* :class:`ControllerProcess`: ``python -m edgekit fleet serve`` with a SQLite or PostgreSQL URL;
* :class:`AgentProcess`: ``python -m device_agent run`` with its own state directory, trust
  file, ``agent.toml`` (``[mqtt]`` pointing at the broker, short telemetry interval and
  health window) and its HTTP API on a free port;
* :class:`Traffic`: a thread per agent posting predictions, so health windows and rollout
  gates see real inferences, and counting every prediction that was not answered;
* :class:`LocalFleet`: all of the above in one directory, stopped in order (agents, then the
  controller, then the broker) whatever happened: an exception, Ctrl-C, SIGTERM.

Every child runs in a session of its own, so a Ctrl-C in the terminal reaches only the parent,
which then stops the children in that order (a broker stopped before the agents would turn
their clean ``offline`` status into last wills). On Linux each child is also asked to receive
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``): a parent killed with SIGKILL leaves no
orphans behind. (The kernel ties that signal to the *thread* that started the child, so
children are started from the main thread.)

Only the standard library is imported here (plus ``edgekit.fleet.client``, which is also
standard library only): the processes bring their own dependencies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from edgekit.errors import EdgekitError
from edgekit.fleet.client import FleetClient
from edgekit.fleet.errors import RemoteError

__all__ = [
    "MOSQUITTO_CANDIDATES",
    "AgentProcess",
    "AgentSettings",
    "ChildProcess",
    "ControllerProcess",
    "LaunchError",
    "LocalFleet",
    "Mosquitto",
    "Traffic",
    "TrafficCounts",
    "child_env",
    "find_mosquitto",
    "free_port",
    "terminate_on_sigterm",
    "wait_until",
    "watch_rollout",
]

_T = TypeVar("_T")

#: Debian installs the broker in /usr/sbin, which is not on every user's PATH.
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
#: The source tree the children import (the one this module belongs to).
_SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: Rollout states after which nothing changes any more.
FINAL_STATES = frozenset({"completed", "aborted", "rolled-back"})


class LaunchError(EdgekitError):
    """A process of the local fleet did not start, did not become ready, or died."""

    reason = "launch"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, for a server to listen on.

    Chosen at random *below* the kernel's ephemeral range: ports in that range are also
    handed out as the local end of outgoing connections, so one picked there (as
    ``bind(("", 0))`` does) can be taken by any client's connection before the server gets
    to listen on it. Falls back to the kernel's choice when no such port is free.
    """
    low, _high = _ephemeral_range()
    candidates = range(10000, low) if low > 11000 else range(0)
    for port in random.sample(candidates, min(50, len(candidates))):
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str | None:
    """Path of the mosquitto broker binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def wait_until(
    predicate: Callable[[], _T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    error: Callable[[str], Exception] = LaunchError,
) -> _T:
    """Poll ``predicate`` until it returns something truthy, and return that; raise
    ``error("timed out after ...")`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this source tree first on ``PYTHONPATH``, unbuffered."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(_SOURCE_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# --- one child process ----------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send SIGTERM to the child when its parent dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``), or None where that is not available. The function
    is looked up here, in the parent, so the child only makes the system call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


_PREEXEC = _parent_death_signal()


class ChildProcess:
    """One child: started in a session of its own, output appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else child_env()
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.alive:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_PREEXEC,  # only a prctl call (see _parent_death_signal)
                )
            except OSError as exc:
                raise LaunchError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def check_alive(self) -> None:
        """Raise with the end of the log if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise LaunchError(
                f"{self.name} exited with status {self.popen.returncode}: "
                f"{self.log_tail(1500).strip()}"
            )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never started)."""
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a crash or a power cut."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - chars))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""


# --- mosquitto ------------------------------------------------------------------------------


class Mosquitto:
    """One mosquitto broker with its own config, persistence and log in ``workdir``.

    It listens on 127.0.0.1 only. ``persistence`` keeps sessions and queued QoS 1 messages
    across :meth:`stop`/:meth:`start` (saved on SIGTERM), as a production broker does.
    ``listener_options`` are lines placed right after the ``listener`` line (TLS settings);
    ``options`` are global lines (``max_queued_messages``...). A stopped broker can be
    started again on the *same* port: mosquitto sets ``SO_REUSEADDR``, so the port is free
    as soon as the process has exited.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str | None = None,
        port: int | None = None,
        persistence: bool = True,
        options: Sequence[str] = (),
        listener_options: Sequence[str] = (),
        allow_anonymous: bool = True,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise LaunchError(
                "mosquitto is not installed (Debian package mosquitto; .ci/setup.sh installs it)"
            )
        self.binary = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._process = ChildProcess(
            "mosquitto",
            [self.binary, "-c", str(self.config_path)],
            log_path=self.workdir / "mosquitto.stderr",
        )
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
            # write our directory; 'user root' keeps the current identity.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """The broker as the controller's ``--broker`` takes it."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process.alive

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def log(self) -> str:
        """The broker's log so far (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        self._process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.alive:
                raise LaunchError(
                    f"mosquitto exited with {self._process.returncode}: "
                    f"{self._process.log_tail(1000).strip()} {self.log()[-1500:]}"
                )
            if _port_accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise LaunchError(f"mosquitto did not listen on port {self.port} within {timeout:g}s")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: the broker saves its persistence file and exits)."""
        self._process.stop(timeout)

    def kill(self) -> None:
        """Stop at once (SIGKILL): nothing is saved, like a power cut of the broker host."""
        self._process.kill()

    def restart(self, *, timeout: float = 10.0) -> None:
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- the controller -------------------------------------------------------------------------


class ControllerProcess:
    """``python -m edgekit fleet serve``: restartable, killable, reached through its REST API.

    The HTTP port is chosen once, so a restarted controller answers at the same URL (and the
    download URLs already sent to devices stay valid).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        broker: str,
        db_url: str,
        token: str,
        port: int | None = None,
        tick: str = "0.2s",
        history_interval: str = "1s",
        log_level: str = "info",
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.db_url = db_url
        self.token = token
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.workdir / "artifacts"
        self.client = FleetClient(self.url, token=token, timeout=30.0, user="launcher")
        self.starts = 0
        argv = [
            sys.executable,
            "-m",
            "edgekit",
            "fleet",
            "serve",
            "--broker",
            broker,
            "--db",
            db_url,
            "--artifacts",
            str(self.artifacts),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--tick",
            tick,
            "--history-interval",
            history_interval,
            "--log-level",
            log_level,
            *extra,
        ]
        # The token travels in the environment, not on the command line (ps shows that).
        env = child_env({"EDGEKIT_FLEET_TOKEN": token})
        self.process = ChildProcess(
            "the controller", argv, log_path=self.workdir / "controller.log", env=env
        )

    @property
    def dashboard_url(self) -> str:
        """Open once in a browser: the controller swaps the token for a session cookie."""
        return f"{self.url}/dashboard?token={self.token}"

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start, and (``wait``) return once ``/api/v1/stats`` says ready (reconciled with
        the broker, caught up with the retained state)."""
        self.process.start()
        self.starts += 1
        if wait:
            self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self.process.check_alive()
            try:
                return bool(self.client.stats()["ready"])
            except RemoteError:
                return False

        wait_until(ready, timeout=timeout, what=f"the controller at {self.url} to be ready")

    def stop(self, timeout: float = 15.0) -> None:
        self.process.stop(timeout)

    def kill(self) -> None:
        self.process.kill()

    def log_tail(self, chars: int = 4000) -> str:
        return self.process.log_tail(chars)


# --- agents ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSettings:
    """What goes into each agent's ``agent.toml`` besides paths and ports: short intervals,
    so that updates and their health windows take seconds rather than minutes."""

    telemetry_interval_s: float = 0.5
    keepalive_s: int = 5
    health_min_inferences: int = 20
    health_max_seconds: float = 10.0
    drift_min_requests: int = 20
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 2.0
    http: bool = True
    extra_toml: str = ""
    """Appended to the file as is (for sections not listed here)."""

    def toml(
        self,
        *,
        state_dir: Path,
        fleet: str,
        device: str,
        broker_host: str,
        broker_port: int,
        http_port: int,
    ) -> str:
        http = (
            f'[http]\nenabled = true\nhost = "127.0.0.1"\nport = {http_port}\n'
            if self.http
            else "[http]\nenabled = false\n"
        )
        return (
            "# Written by edgekit.launcher for a local fleet (demo, end-to-end tests).\n"
            f"state_dir = {json.dumps(str(state_dir))}\n"
            "require_golden = true\n"
            "[health]\n"
            f"min_inferences = {self.health_min_inferences}\n"
            f"max_seconds = {self.health_max_seconds}\n"
            'on_timeout = "commit"\n'
            f"{http}"
            "[mqtt]\n"
            "enabled = true\n"
            f"host = {json.dumps(broker_host)}\n"
            f"port = {broker_port}\n"
            f"fleet = {json.dumps(fleet)}\n"
            f"device = {json.dumps(device)}\n"
            f"keepalive_s = {self.keepalive_s}\n"
            f"telemetry_interval_s = {self.telemetry_interval_s}\n"
            f"reconnect_initial_s = {self.reconnect_initial_s}\n"
            f"reconnect_max_s = {self.reconnect_max_s}\n"
            f"drift_min_requests = {self.drift_min_requests}\n"
            f"{self.extra_toml}"
        )


def _http_json(
    method: str, url: str, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; connection errors raise LaunchError."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LaunchError(f"{method} {url}: {getattr(exc, 'reason', exc)}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", errors="replace")


class AgentProcess:
    """``python -m device_agent run`` for one device, in ``workdir``.

    ``workdir`` holds ``agent.toml``, ``agent.log`` and ``state/`` (the agent's state
    directory, where ``trust.json`` is provisioned). The HTTP port is chosen once, so a
    restarted agent answers at the same address.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        device: str,
        fleet: str,
        broker_host: str,
        broker_port: int,
        trust_file: Path,
        settings: AgentSettings | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.device = device
        self.fleet = fleet
        self.settings = settings or AgentSettings()
        self.state_dir = self.workdir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.trust_file = Path(trust_file)
        trust = self.state_dir / "trust.json"
        if not trust.exists():
            shutil.copyfile(self.trust_file, trust)
        self.http_port = free_port() if self.settings.http else 0
        self.url = f"http://127.0.0.1:{self.http_port}" if self.settings.http else None
        self.config_path = self.workdir / "agent.toml"
        self.config_path.write_text(
            self.settings.toml(
                state_dir=self.state_dir,
                fleet=fleet,
                device=device,
                broker_host=broker_host,
                broker_port=broker_port,
                http_port=self.http_port,
            )
        )
        self.serving = threading.Event()
        """Set while the process runs and answers (cleared before it is stopped)."""
        self.process = ChildProcess(
            f"agent {device}",
            [sys.executable, "-m", "device_agent", "run", "-v", "--config", str(self.config_path)],
            log_path=self.workdir / "agent.log",
        )

    def _agent_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "device_agent", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=timeout,
            check=False,
        )

    def install(self, bundle: Path) -> None:
        """Sideload ``bundle`` (``edgekit-agent install``) while the service is stopped; its
        health window then runs when the service starts."""
        result = self._agent_cli("install", str(bundle), "--trust", str(self.trust_file))
        if result.returncode != 0:
            raise LaunchError(
                f"agent {self.device}: installing {bundle.name} failed: "
                f"{(result.stderr or result.stdout).strip()}"
            )

    def status(self) -> dict[str, Any]:
        """``edgekit-agent status --json``: pointers, floor, pending update, recent events."""
        result = self._agent_cli("status", "--json", "--events", "50")
        if result.returncode != 0:
            raise LaunchError(f"agent {self.device}: status failed: {result.stderr.strip()}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        self.process.start()
        if wait:
            self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        """Until the HTTP API answers (any status: ``no-model`` is an answer), or, without
        HTTP, until the agent holds its state directory's lock."""

        def ready() -> bool:
            self.process.check_alive()
            if self.url is None:
                lock = self.state_dir / "agent.lock"
                with contextlib.suppress(OSError, ValueError):
                    return int(lock.read_text().strip() or 0) == self.pid
                return False
            try:
                _http_json("GET", f"{self.url}/v1/health", timeout=2.0)
            except LaunchError:
                return False
            return True

        wait_until(ready, timeout=timeout, what=f"agent {self.device} to serve")
        self.serving.set()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM: the agent publishes ``offline`` (reason shutdown) and stops cleanly."""
        self.serving.clear()
        return self.process.stop(timeout)

    def kill(self) -> None:
        self.serving.clear()
        self.process.kill()

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: name, version... of the model this agent serves."""
        status, body = _http_json("GET", f"{self._require_http()}/v1/model")
        if status != 200 or not isinstance(body, dict):
            raise LaunchError(f"agent {self.device}: GET /v1/model answered {status}: {body}")
        return body

    def predict(self, inputs: Any, *, timeout: float = 10.0) -> dict[str, Any]:
        """``POST /v1/predict`` with ``{"inputs": inputs}``; raises unless answered 200."""
        status, body = _http_json(
            "POST", f"{self._require_http()}/v1/predict", {"inputs": inputs}, timeout=timeout
        )
        if status != 200 or not isinstance(body, dict):
            raise LaunchError(f"agent {self.device}: predict answered {status}: {body}")
        return body

    def _require_http(self) -> str:
        if self.url is None:
            raise LaunchError(f"agent {self.device} runs without its HTTP API")
        return self.url

    def log_tail(self, chars: int = 4000) -> str:
        return self.process.log_tail(chars)


# --- traffic --------------------------------------------------------------------------------


@dataclass
class TrafficCounts:
    """Predictions sent to one agent while it was serving."""

    answered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)
    """``name:version`` -> predictions it answered."""


class Traffic:
    """One thread per agent posting ``rows`` (one per request, in turn) at ``rate_hz``.

    Only agents that are :attr:`AgentProcess.serving` are sent requests; a request that
    fails while its agent was serving before *and* after it is a failure (one racing with a
    deliberate stop is not).
    """

    def __init__(
        self, agents: Sequence[AgentProcess], rows: Sequence[Any], *, rate_hz: float = 20.0
    ) -> None:
        if not rows:
            raise LaunchError("traffic needs at least one input row")
        self.agents = list(agents)
        self.rows = list(rows)
        self.rate_hz = rate_hz
        self.counts = {agent.device: TrafficCounts() for agent in self.agents}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Traffic:
        self._stop.clear()
        for agent in self.agents:
            thread = threading.Thread(
                target=self._run, args=(agent,), name=f"traffic-{agent.device}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        self._threads.clear()

    def _run(self, agent: AgentProcess) -> None:
        period = 1.0 / self.rate_hz
        index = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += period
            if agent.serving.is_set():
                row = self.rows[index % len(self.rows)]
                index += 1
                try:
                    answer = agent.predict([row], timeout=5.0)
                except LaunchError as exc:
                    if agent.serving.is_set():
                        self._note(agent.device, error=exc.message)
                else:
                    model = answer.get("model") or {}
                    self._note(agent.device, model=f"{model.get('name')}:{model.get('version')}")
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - period)

    def _note(self, device: str, *, model: str | None = None, error: str | None = None) -> None:
        with self._lock:
            counts = self.counts[device]
            if error is not None:
                counts.failed += 1
                if len(counts.errors) < 20:
                    counts.errors.append(error)
            else:
                counts.answered += 1
                key = str(model)
                counts.models[key] = counts.models.get(key, 0) + 1

    def reset(self) -> None:
        """Start counting afresh (e.g. once every agent has a model to answer with)."""
        with self._lock:
            self.counts = {agent.device: TrafficCounts() for agent in self.agents}

    def snapshot(self) -> dict[str, TrafficCounts]:
        """A copy of the counts per device."""
        with self._lock:
            return {
                device: TrafficCounts(c.answered, c.failed, list(c.errors), dict(c.models))
                for device, c in self.counts.items()
            }

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- rollouts -------------------------------------------------------------------------------


def watch_rollout(
    client: FleetClient,
    rollout_id: str,
    states: set[str] | frozenset[str] = FINAL_STATES,
    *,
    timeout: float = 120.0,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    interval: float = 0.2,
) -> dict[str, Any]:
    """Poll the REST API until the rollout reaches one of ``states``; ``on_change`` sees
    every new (state, wave, totals) along the way. Raises with the path it took."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        data = client.rollout(rollout_id)
        step = f"{data['state']}@{data['wave']} {data['totals']} {data['reason'] or ''}"
        if not seen or seen[-1] != step:
            seen.append(step)
            if on_change is not None:
                on_change(data)
        if data["state"] in states:
            return data
        if time.monotonic() > deadline:
            raise LaunchError(
                f"rollout {rollout_id} did not reach {sorted(states)} within {timeout:g}s: "
                + " -> ".join(seen)
            )
        time.sleep(interval)


# --- the whole stack ------------------------------------------------------------------------


class LocalFleet:
    """A broker, a controller and ``agents`` agent processes under ``root``.

    ``root/broker``, ``root/controller`` (its artifacts and log; the SQLite database too
    unless ``db_url`` names another), ``root/agents/<device>``. Nothing starts before
    :meth:`start`; :meth:`close` (or leaving the ``with`` block) stops everything that runs.
    """

    def __init__(
        self,
        root: Path,
        *,
        trust_file: Path,
        fleet: str = "demo",
        agents: int = 3,
        device_prefix: str = "agent",
        db_url: str | None = None,
        token: str | None = None,
        controller_port: int | None = None,
        agent_settings: AgentSettings | None = None,
        broker_options: Sequence[str] = (),
        controller_extra: Sequence[str] = (),
        mosquitto: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fleet = fleet
        self.token = token or os.urandom(18).hex()
        self.broker = Mosquitto(self.root / "broker", binary=mosquitto, options=broker_options)
        self.db_url = db_url or f"sqlite:///{self.root / 'controller' / 'fleet.db'}"
        self.controller = ControllerProcess(
            self.root / "controller",
            broker=self.broker.url,
            db_url=self.db_url,
            token=self.token,
            port=controller_port,
            extra=("--fleet", fleet, *controller_extra),
        )
        self.agents = [
            AgentProcess(
                self.root / "agents" / f"{device_prefix}-{n}",
                device=f"{device_prefix}-{n}",
                fleet=fleet,
                broker_host=self.broker.host,
                broker_port=self.broker.port,
                trust_file=trust_file,
                settings=agent_settings,
            )
            for n in range(1, agents + 1)
        ]
        self.traffic: Traffic | None = None

    @property
    def client(self) -> FleetClient:
        return self.controller.client

    def agent(self, device: str) -> AgentProcess:
        for agent in self.agents:
            if agent.device == device:
                return agent
        raise LaunchError(f"no agent {device!r} in this fleet")

    def install(self, bundle: Path) -> None:
        """Sideload ``bundle`` on every agent (stopped), the installs running side by side."""
        errors: list[BaseException] = []

        def one(agent: AgentProcess) -> None:
            try:
                agent.install(bundle)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(a,)) for a in self.agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def start(self, *, timeout: float = 90.0) -> None:
        """The broker, then the controller and the agents side by side; returns when the
        controller is ready and lists every agent online."""
        self.broker.start()
        self.controller.start(wait=False)
        for agent in self.agents:
            agent.start(wait=False)
        self.controller.wait_ready(timeout=timeout)
        for agent in self.agents:
            agent.wait_ready(timeout=timeout)
        self.wait_online(len(self.agents), timeout=timeout)

    def wait_online(self, count: int, *, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.online() >= count,
            timeout=timeout,
            what=f"{count} agents online in the controller's registry",
        )

    def online(self) -> int:
        return sum(bool(d["online"]) for d in self.client.devices(fleet=self.fleet))

    def start_traffic(self, rows: Sequence[Any], *, rate_hz: float = 20.0) -> Traffic:
        if self.traffic is not None:
            self.traffic.stop()
        self.traffic = Traffic(self.agents, rows, rate_hz=rate_hz).start()
        return self.traffic

    def cli_env(self) -> dict[str, str]:
        """The environment in which ``edgekit fleet|rollout ...`` reach this controller."""
        return child_env(
            {
                "EDGEKIT_CONTROLLER": self.controller.url,
                "EDGEKIT_FLEET_TOKEN": self.token,
                "COLUMNS": os.environ.get("COLUMNS", "120"),
            }
        )

    def edgekit(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m edgekit ARGS`` against this fleet's controller."""
        return subprocess.run(
            [sys.executable, "-m", "edgekit", *args],
            capture_output=True,
            text=True,
            env=self.cli_env(),
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        """Stop the traffic, the agents (clean ``offline`` status), the controller and the
        broker, in that order; keeps going past any failure."""
        if self.traffic is not None:
            self.traffic.stop()
        for agent in self.agents:
            agent.serving.clear()
        stoppers = [threading.Thread(target=agent.stop) for agent in self.agents]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(60)
        with contextlib.suppress(Exception):
            self.controller.stop()
        with contextlib.suppress(Exception):
            self.broker.stop()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so ``finally`` clauses (and
    :meth:`LocalFleet.close`) run when the parent is stopped like a service."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
