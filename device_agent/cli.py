"""``edgekit-agent``: run the on-device service and operate it from a shell.

Commands::

    edgekit-agent run --config /etc/edgekit/agent.toml      the service (systemd runs this;
                                                            with [mqtt] it joins the fleet)
    edgekit-agent install BUNDLE.ekb [--trust trust.json]   offline / USB sideload
    edgekit-agent predict --input X.npy|X.npz|DIR -o OUT.npy|OUT.npz
    edgekit-agent status [--json]
    edgekit-agent rollback [--reason TEXT]

Every command takes ``--config`` (default ``$EDGEKIT_AGENT_CONFIG``, else
``/etc/edgekit/agent.toml`` when it exists, else built-in defaults) and ``--state-dir``.
Errors are one line on stderr, ``edgekit-agent: REASON: message``. Exit codes: 0 done, 1
refused or failed, 2 usage. ``install`` and ``rollback`` change the state directory and refuse
while the service runs (it owns the directory); ``status`` and ``predict`` only read it.

Imports are kept light on purpose (argparse, no click/rich): the CLI runs on small devices,
often over a slow SSH session, and ``status`` must answer without loading a model runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from device_agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from device_agent.errors import AgentError
from edgekit._version import __version__
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from device_agent.agent import Agent

__all__ = ["main"]

logger = logging.getLogger("edgekit-agent")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Seconds between two housekeeping passes of ``run`` (health-window decisions).
POLL_INTERVAL_S = 0.5


class _Usage(Exception):
    """A problem with the command line itself (exit code 2)."""


class _Failed(Exception):
    """A refusal or failure with its reason code (exit code 1)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: usage: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="agent.toml (default: $EDGEKIT_AGENT_CONFIG or /etc/edgekit/agent.toml if present)",
    )
    common.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="state directory (overrides the config)"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    parser = _Parser(prog="edgekit-agent", description="edgekit on-device inference agent")
    parser.add_argument(
        "--version", action="version", version=f"edgekit-agent {__version__} ({platform.machine()})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    commands.add_parser(
        "run",
        parents=[common],
        help="run the service: serve the model, the HTTP API and serial input",
        description="Run the agent until SIGTERM/SIGINT.",
    )

    install = commands.add_parser(
        "install",
        parents=[common],
        help="install a bundle file (offline sideload); the service must be stopped",
        description="Verify, stage, self-test and activate a bundle. The health window then "
        "runs on real traffic when the service starts, and the update commits or rolls back.",
    )
    install.add_argument("bundle", type=Path, metavar="BUNDLE", help="the .ekb bundle file")
    install.add_argument(
        "--trust",
        type=Path,
        metavar="FILE",
        help="trust anchor to provision into the state directory on first use",
    )
    install.add_argument("--json", action="store_true", help="print the result as JSON")

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="run the installed model on .npy/.npz files",
        description="Run the model the service would serve on INPUT (.npy: the model's only "
        "input; .npz: one array per input name; a folder: every .npy/.npz in it, in name "
        "order, outputs concatenated along axis 0).",
    )
    predict.add_argument("--input", "-i", type=Path, required=True, metavar="INPUT")
    predict.add_argument(
        "--output", "-o", type=Path, required=True, metavar="OUT", help="OUT.npy or OUT.npz"
    )

    status = commands.add_parser(
        "status", parents=[common], help="what is installed and what happened lately"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--events", type=int, default=10, metavar="N", help="recent events to show (default 10)"
    )

    rollback = commands.add_parser(
        "rollback",
        parents=[common],
        help="go back to the previous model; the service must be stopped",
    )
    rollback.add_argument("--reason", default="manual", help="recorded in the event log")
    rollback.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point; returns the exit code."""
    args = _build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # for a restart (re-exec)
    level = logging.INFO if args.verbose or args.command == "run" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handlers: dict[str, Callable[[argparse.Namespace, AgentConfig], int]] = {
        "run": _cmd_run,
        "install": _cmd_install,
        "predict": _cmd_predict,
        "status": _cmd_status,
        "rollback": _cmd_rollback,
    }
    try:
        config = _load_config(args)
        return handlers[args.command](args, config)
    except _Usage as exc:
        _say(f"usage: {exc}")
        return EXIT_USAGE
    except _Failed as exc:
        _say(f"{exc.reason}: {exc}")
        return EXIT_FAILED
    except (AgentError, EdgekitError) as exc:
        _say(f"{exc.reason}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_FAILED


def _say(text: str) -> None:
    print(f"edgekit-agent: {text}", file=sys.stderr)


def _load_config(args: argparse.Namespace) -> AgentConfig:
    path: Path | None = args.config
    if path is None and os.environ.get("EDGEKIT_AGENT_CONFIG"):
        path = Path(os.environ["EDGEKIT_AGENT_CONFIG"])
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    config = AgentConfig() if path is None else AgentConfig.load(path)
    if args.state_dir is not None:
        config = replace(config, state_dir=args.state_dir)
    return config


def _open_agent(config: AgentConfig, *, readonly: bool = False) -> Agent:
    from device_agent.agent import Agent  # loads NumPy and the runtime layer

    return Agent(config=config, readonly=readonly)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------- install


def _cmd_install(args: argparse.Namespace, config: AgentConfig) -> int:
    bundle: Path = args.bundle
    if not bundle.is_file():
        raise _Usage(f"bundle {bundle} is not a file")
    if args.trust is not None and not args.trust.is_file():
        raise _Usage(f"trust file {args.trust} is not a file")
    with contextlib.closing(_open_agent(config)) as agent:
        _provision_trust(config, args.trust)
        result = agent.install(bundle, wait_for_health=False)
        if args.json:
            _print_json(result.to_dict())
        elif result.ok:
            tested = result.selftest.summary() if result.selftest else "no self-test"
            print(
                f"installed {result.name} v{result.version} (slot {result.slot}): {tested}; "
                "the health window runs on real traffic when the agent service starts"
            )
        else:
            _say(f"{result.reason}: {result.stage} refused the update: {result.message}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _provision_trust(config: AgentConfig, given: Path | None) -> None:
    """Copy ``given`` to the device's trust path on first use; never overwrite a different one.

    After provisioning, trust changes only through signed rotations: silently replacing the
    anchor from a command-line argument would let anyone with a shell swap the keys.
    """
    from edgekit.fsutil import atomic_write_bytes
    from edgekit.trust import TrustEnvelope

    target = config.trust_path
    if given is None:
        if not target.is_file():
            raise _Failed(
                "no-trust",
                f"no trust file at {target}; pass --trust trust.json the first time",
            )
        return
    data = given.read_bytes()
    TrustEnvelope.from_bytes(data)  # refuse to provision something that is not a trust file
    if target.is_file():
        if target.read_bytes() == data:
            return
        raise _Failed(
            "trust-differs",
            f"{target} already holds a different trust policy; the device's trust changes only "
            "by a signed rotation",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    logger.info("provisioned the trust anchor %s", target)


# ---------------------------------------------------------------------------- predict


def _cmd_predict(args: argparse.Namespace, config: AgentConfig) -> int:
    import numpy as np

    source: Path = args.input
    out: Path = args.output
    if out.suffix not in (".npy", ".npz"):
        raise _Usage("--output must end in .npy or .npz")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise _Usage(f"{source} holds no .npy or .npz files")
    elif source.is_file() and source.suffix in (".npy", ".npz"):
        files = [source]
    else:
        raise _Usage(f"--input {source} must be a .npy or .npz file or a folder of them")
    requests = [_read_request(path) for path in files]
    with contextlib.closing(_open_agent(config, readonly=True)) as agent:
        results = [agent.predict(request) for request in requests]
    names = list(results[0])
    if out.suffix == ".npy" and len(names) != 1:
        raise _Usage(f"the model has {len(names)} outputs ({', '.join(names)}); use -o OUT.npz")
    merged = {
        name: results[0][name]
        if len(results) == 1
        else np.concatenate([r[name] for r in results], axis=0)
        for name in names
    }
    _write_arrays(out, merged)
    shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in merged.items())
    print(f"{len(files)} input file(s) -> {out}: {shapes}", file=sys.stderr)
    return EXIT_OK


def _read_request(path: Path) -> npt.NDArray[Any] | dict[str, npt.NDArray[Any]]:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _Failed("bad-input", f"cannot read {path}: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    # A golden.npz works as is: its input:NAME arrays are the request.
    if any(name.startswith("input:") for name in arrays):
        return {k.removeprefix("input:"): v for k, v in arrays.items() if k.startswith("input:")}
    return arrays


def _write_arrays(out: Path, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    import numpy as np

    from edgekit.fsutil import atomic_write

    with atomic_write(out) as handle:
        if out.suffix == ".npy":
            np.save(handle, next(iter(arrays.values())), allow_pickle=False)
        else:
            savez: Any = np.savez  # NumPy's stub types **arrays as its keyword options
            savez(handle, **arrays)


# ---------------------------------------------------------------------------- status


def _cmd_status(args: argparse.Namespace, config: AgentConfig) -> int:
    from device_agent.events import read_events
    from device_agent.store import Store
    from device_agent.updates import recovered_state

    store = Store(config.state_dir)
    if not store.root.is_dir():
        raise _Failed("no-state", f"{store.root} does not exist; nothing was installed here")
    state = store.load()
    pid = _service_pid(store.lock_path)
    events = read_events(store.events_path, keep=config.events.keep, limit=max(args.events, 0))
    recovered, action = recovered_state(state) if pid is None else (state, None)
    document = {
        "state_dir": str(store.root),
        "agent_version": __version__,
        "service_pid": pid,
        "active": store.describe(state.active),
        "previous": store.describe(state.previous),
        "staging": store.describe(state.staging),
        "installed_version": state.installed_version,
        "pending": None if state.pending is None else state.pending.to_dict(),
        "on_next_start": action,
        "serves_next": store.describe(recovered.active),
        "events": events if args.events > 0 else [],
    }
    if args.json:
        _print_json(document)
        return EXIT_OK
    print(_format_status(document))
    return EXIT_OK


def _format_status(doc: dict[str, Any]) -> str:
    def slot(info: dict[str, Any] | None) -> str:
        if info is None:
            return "-"
        if "error" in info:
            return f"slot {info['slot']} (unreadable: {info['error']})"
        return (
            f"{info['name']} v{info['version']}  slot {info['slot']}  sha256 {info['sha256'][:12]}"
        )

    pid = doc["service_pid"]
    lines = [
        f"state dir   {doc['state_dir']}",
        f"service     {'running (pid ' + str(pid) + ')' if pid else 'not running'}",
        f"active      {slot(doc['active'])}",
        f"previous    {slot(doc['previous'])}",
    ]
    floor = doc["installed_version"]
    lines.append(
        f"floor       {'-' if floor is None else f'{floor} (versions <= {floor} are refused)'}"
    )
    pending = doc["pending"]
    if pending is None:
        lines.append("update      none")
    else:
        what = f"{pending['name']} v{pending['version']}" if pending["name"] else pending["source"]
        lines.append(f"update      {what}: {pending['phase']} since {pending['started']}")
        if doc["on_next_start"]:
            verb = "roll it back" if doc["on_next_start"] == "rolled-back" else "abandon it"
            lines.append(f"            interrupted: the next start will {verb}")
        elif pending["resume"]:
            lines.append("            the health window resumes when the service starts")
    if doc["events"]:
        lines.append("events")
        for event in doc["events"]:
            subject = f" {event['bundle']} v{event['version']}" if event.get("bundle") else ""
            reason = f" [{event['reason']}]" if event.get("reason") else ""
            message = f": {event['message']}" if event.get("message") else ""
            lines.append(
                f"  #{event['seq']} {event['time']} {event['type']}{subject}{reason}{message}"
            )
    return "\n".join(lines)


def _service_pid(lock_path: Path) -> int | None:
    """The pid recorded by a running agent, if that process is alive.

    Read without taking the lock, so ``status`` can never make a starting service fail.
    """
    try:
        pid = int(lock_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by the edgekit user
    return pid


# ---------------------------------------------------------------------------- rollback


def _cmd_rollback(args: argparse.Namespace, config: AgentConfig) -> int:
    with contextlib.closing(_open_agent(config)) as agent:
        result = agent.rollback(args.reason)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.message)
    return EXIT_OK


# ---------------------------------------------------------------------------- run


def _cmd_run(args: argparse.Namespace, config: AgentConfig) -> int:
    stop = threading.Event()
    restart = threading.Event()

    def request_restart() -> None:
        restart.set()
        stop.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    agent = _open_agent(config)
    stoppers: list[Callable[[], None]] = []
    try:
        stoppers.append(_start_http(agent, config))
        stoppers.append(_start_serial(agent, config))
        stoppers.append(_start_fleet(agent, config, request_restart))
        serving = agent.health()["model"]
        what = f"{serving['name']} v{serving['version']}" if serving else "no model"
        _sd_notify(f"READY=1\nSTATUS=serving {what}")
        logger.info("edgekit-agent %s running in %s: %s", __version__, config.state_dir, what)
        while not stop.wait(POLL_INTERVAL_S):
            try:
                result = agent.poll()
            except AgentError as exc:  # e.g. state.json not writable: retried next pass
                logger.error("deciding the health window failed: %s", exc)
                continue
            if result is not None:
                logger.info("update %s: %s", result.outcome.value, result.message)
        _sd_notify("STOPPING=1")
    finally:
        for stopper in reversed(stoppers):
            try:
                stopper()
            except Exception as exc:  # keep stopping the rest
                logger.warning("stopping a front end failed: %s", exc)
        agent.close()
    if restart.is_set():
        _reexec(args.raw_argv)
    return EXIT_OK


def _reexec(argv: Sequence[str]) -> NoReturn:
    """Replace this process with a fresh ``edgekit-agent`` (the fleet's ``restart`` command).

    Exec rather than exit-and-be-restarted: it works with or without systemd (the unit
    restarts only on failure), and the PID stays the one systemd watches.
    """
    logger.info("restarting: %s -m device_agent %s", sys.executable, " ".join(argv))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "device_agent", *argv])


def _noop() -> None:
    return None


def _start_http(agent: Agent, config: AgentConfig) -> Callable[[], None]:
    """Start ``device_agent.http_api.serve`` when enabled and installed."""
    if not config.http.enabled:
        return _noop
    try:
        module = importlib.import_module("device_agent.http_api")
    except ModuleNotFoundError as exc:
        if exc.name != "device_agent.http_api":
            raise
        logger.warning("HTTP API enabled but device_agent.http_api is not installed")
        return _noop
    serve = getattr(module, "serve", None)
    if serve is None:
        logger.warning("device_agent.http_api has no serve(); the HTTP API is not started")
        return _noop
    try:
        api = serve(agent, config.http)
    except (OSError, ValueError) as exc:
        raise _Failed("http", f"cannot start the HTTP API: {exc}") from None
    stop = getattr(api, "stop", None) or getattr(api, "close", None)
    return stop if callable(stop) else _noop


def _start_serial(agent: Agent, config: AgentConfig) -> Callable[[], None]:
    serial = config.serial
    if not serial.enabled:
        return _noop
    from device_agent.serial import SerialBridge  # imports pyserial

    bridge = SerialBridge(
        serial.port,
        predict=agent.predict,
        window=serial.window,
        hop=serial.hop,
        baudrate=serial.baud,
    )
    bridge.start()
    logger.info("serial input on %s at %d baud", serial.port, serial.baud)
    return bridge.stop


def _start_fleet(
    agent: Agent, config: AgentConfig, on_restart: Callable[[], None]
) -> Callable[[], None]:
    """Start ``device_agent.fleet_link`` when ``[mqtt] enabled``; the run loop decides health
    windows, so the link does not. It is stopped first; what the agent logs after that
    (``agent-stopped``) is forwarded by the next start."""
    if not config.mqtt.enabled:
        return _noop
    from device_agent.fleet_link import FleetLink  # imports paho-mqtt
    from device_agent.outbox import OutboxError

    try:
        fleet = FleetLink(agent, config.mqtt, on_restart=on_restart, drive_health=False)
    except OutboxError as exc:
        # Storage trouble (disk full, permissions) must not stop the model from serving; a
        # configuration error (ConfigError, bad TLS files) does stop the agent, like any other.
        logger.error("the fleet link is not started: %s", exc)
        return _noop
    fleet.start()
    return fleet.stop


def _sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        logger.warning("cannot notify systemd: %s", exc)
