"""The agent's configuration: one TOML file, every key known, every value checked once.

A device is configured by hand over SSH or baked into an image, and a typo there must not turn
into a silently ignored setting (``max_p59_ms``) or a crash an hour later. So the whole file is
read at start-up, every key is looked up in the schema below, and the first unknown key or wrong
type stops the agent with one line naming the key, its section and the file::

    agent.toml: health.max_p59_ms is not a known key (known here: max_error_rate, ...)

TOML has no ``null``: an optional setting is simply left out (the example file shows it
commented out). Relative paths are resolved against the directory of the configuration file.
``device_agent/agent.example.toml`` documents every key with its default; a test keeps the two
in step.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from device_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices (Raspberry Pi OS bullseye)
    import tomli as tomllib

if TYPE_CHECKING:
    from device_agent.runtime import RuntimeOptions

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "AgentConfig",
    "EventsConfig",
    "HealthConfig",
    "HttpConfig",
    "MqttConfig",
    "MqttTlsConfig",
    "RuntimeConfig",
    "SerialConfig",
    "load_config",
]

DEFAULT_STATE_DIR = Path("/var/lib/edgekit")
#: Where ``edgekit-agent`` looks when no ``--config`` is given (the systemd unit passes it).
DEFAULT_CONFIG_PATH = Path("/etc/edgekit/agent.toml")

OnTimeout = Literal["commit", "rollback"]
MqttVersionName = Literal["5", "3.1.1"]


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Device-side runtime tuning, passed to :func:`device_agent.runtime.load_runtime`."""

    #: ONNX Runtime execution providers in order of preference; missing ones are skipped and
    #: the CPU provider always closes the list (so one config serves CPU and GPU devices).
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: Intra-op threads (ONNX Runtime) / interpreter threads (TFLite); None = library default.
    threads: int | None = None
    #: ONNX Runtime inter-op threads; None = library default.
    inter_op_threads: int | None = None
    #: ONNX Runtime graph optimizers to switch off, replacing what the bundle's manifest asks
    #: for (``[]``: none, whatever the bundle says); None = follow the bundle.
    disabled_optimizers: tuple[str, ...] | None = None

    def options(self) -> RuntimeOptions:
        """The runtime layer's options object (imported here so config stays light)."""
        from device_agent.runtime import RuntimeOptions

        return RuntimeOptions(
            providers=self.providers,
            threads=self.threads,
            inter_op_threads=self.inter_op_threads,
            disabled_optimizers=self.disabled_optimizers,
        )


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """The probation of a new model on real traffic, after its self-test and activation.

    The window closes after ``min_inferences`` inferences on the new model or ``max_seconds``,
    whichever comes first. It passes when the error rate is at most ``max_error_rate`` and
    the p95 latency at most ``max_p95_ms`` (``None``: latency is not judged). A window that
    times out with fewer than ``min_inferences`` inferences is judged on what it saw; with no
    traffic at all ``on_timeout`` decides (an idle device must still be able to update, and the
    golden self-test already proved the model runs, hence ``"commit"`` by default).
    """

    min_inferences: int = 50
    max_seconds: float = 300.0
    max_error_rate: float = 0.01
    max_p95_ms: float | None = None
    on_timeout: OnTimeout = "commit"


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """Where the local HTTP API listens (served by ``device_agent.http_api``)."""

    enabled: bool = True
    #: Loopback by default: the API is for the device and its local network gateway.
    host: str = "127.0.0.1"
    port: int = 8470
    #: When set, listen on this Unix socket instead of host:port.
    unix_socket: Path | None = None
    #: Permit a non-loopback ``host``; the API has no authentication.
    allow_remote: bool = False
    #: Limits and the socket's file mode; None = the HTTP API's own defaults.
    max_body_bytes: int | None = None
    max_connections: int | None = None
    request_timeout: float | None = None
    socket_mode: int | None = None


@dataclass(frozen=True, kw_only=True)
class SerialConfig:
    """Sensor input from a microcontroller over a serial port (``device_agent.serial``)."""

    enabled: bool = False
    #: Prefer a stable ``/dev/serial/by-id/...`` link: it survives USB re-enumeration.
    port: str = "/dev/ttyACM0"
    baud: int = 115_200
    #: Records per model input window.
    window: int = 1
    #: Records between windows; None = ``window`` (no overlap).
    hop: int | None = None


@dataclass(frozen=True, kw_only=True)
class EventsConfig:
    """The local event log (``STATE/events.jsonl``), bounded by rotation."""

    max_bytes: int = 1024 * 1024
    #: Rotated files kept (``events.jsonl.1`` ... ``.N``).
    keep: int = 3


@dataclass(frozen=True, kw_only=True)
class MqttTlsConfig:
    """TLS to the broker (``[mqtt.tls]``): server verified against ``ca_file`` (the system CAs
    when left out), optionally a client certificate. TLS 1.2 is the minimum."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Off only for a broker addressed by an IP address its certificate does not name.
    check_hostname: bool = True


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """The link to the fleet controller (``[mqtt]``, served by ``device_agent.fleet_link``).

    Off by default: a device must serve its model with no network at all. Files are only
    checked when the link starts (a password file readable only by the service user must not
    make ``edgekit-agent status`` fail for an operator).
    """

    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    #: The fleet id (a topic level); required when ``enabled``.
    fleet: str | None = None
    #: The device id (a topic level); None = the host name.
    device: str | None = None
    version: MqttVersionName = "5"
    keepalive_s: int = 30
    username: str | None = None
    #: Prefer ``password_file`` (mode 0600): the config file is often world-readable.
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    tls: MqttTlsConfig = field(default_factory=MqttTlsConfig)
    #: Seconds between two telemetry messages.
    telemetry_interval_s: float = 10.0
    #: Store-and-forward bounds of ``STATE/outbox.sqlite`` (see device_agent.outbox).
    outbox_max_bytes: int = 16 * 1024 * 1024
    outbox_max_age_s: float = 7 * 24 * 3600.0
    #: Reconnect backoff: doubles from the first to the last value (with jitter).
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 60.0
    #: Drift sampling: every Nth request is offered to a reservoir of at most
    #: ``drift_max_requests`` requests (and ``drift_max_bytes`` of copied input) per report.
    #: A window of n requests copies about ``k * (1 + ln(n / k))`` of them (k: the reservoir
    #: size), so k trades the precision of the scores for request-path cost; 128 requests
    #: keep the PSI noise of a 10-bin histogram or a 10-class distribution well below 0.1.
    drift_every: int = 1
    drift_max_requests: int = 128
    drift_max_bytes: int = 4 * 1024 * 1024
    #: Requests a window needs before drift is reported; fewer carry over to the next period.
    drift_min_requests: int = 20

    @property
    def device_id(self) -> str:
        """``device``, or this host's name."""
        return self.device if self.device is not None else socket.gethostname()


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything the agent reads from ``agent.toml``; the defaults are a working device."""

    state_dir: Path = DEFAULT_STATE_DIR
    #: The device's trust anchor; None = ``STATE/trust.json``.
    trust_file: Path | None = None
    #: Overrides ``platform.machine()`` in bundle compatibility checks (None: detect).
    architecture: str | None = None
    #: Refuse bundles without ``golden.npz`` (no on-device self-test possible).
    require_golden: bool = True
    #: Re-hash the active model's files at start-up (catches SD-card corruption).
    verify_on_boot: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    serial: SerialConfig = field(default_factory=SerialConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    #: The file this configuration was read from (None: built in code).
    source: Path | None = None

    def __post_init__(self) -> None:
        # Accept str paths from code (``AgentConfig(state_dir="/data/edgekit")``).
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.trust_file is not None:
            object.__setattr__(self, "trust_file", Path(self.trust_file))

    @property
    def trust_path(self) -> Path:
        """The trust file actually used."""
        return self.trust_file if self.trust_file is not None else self.state_dir / "trust.json"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentConfig:
        """Read and validate ``path``; raise :class:`ConfigError` with one line on any problem."""
        file = Path(path)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{file.name}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file.name}: invalid TOML: {exc}") from None
        return cls.from_dict(doc, source=file)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: Path | None = None) -> AgentConfig:
        """Validate an already parsed document (``source`` names it and anchors paths)."""
        name = source.name if source is not None else "config"
        base = source.parent if source is not None else Path.cwd()
        top = _Table(doc, name=name, prefix="")
        state_dir = top.path("state_dir", base) or DEFAULT_STATE_DIR
        trust_file = top.path("trust_file", base)
        architecture = top.text("architecture", None)
        require_golden = top.flag("require_golden", True)
        verify_on_boot = top.flag("verify_on_boot", True)

        rt = top.section("runtime")
        providers = rt.names("providers", RuntimeConfig.providers)
        # Left out: follow the bundle; a list (even []): replace what the bundle asks for.
        disabled = rt.data.get("disabled_optimizers")
        if disabled is not None and not (
            isinstance(disabled, list) and all(isinstance(v, str) and v.strip() for v in disabled)
        ):
            raise ConfigError(
                f"{name}: runtime.disabled_optimizers must be a list of optimizer names, like "
                '["QDQPropagationTransformer"]'
            )
        runtime = RuntimeConfig(
            providers=providers,
            threads=rt.integer("threads", None, minimum=1),
            inter_op_threads=rt.integer("inter_op_threads", None, minimum=1),
            disabled_optimizers=None if disabled is None else rt.names("disabled_optimizers", ()),
        )
        rt.finish()

        hl = top.section("health")
        on_timeout = hl.text("on_timeout", HealthConfig.on_timeout)
        if on_timeout not in ("commit", "rollback"):
            raise ConfigError(
                f'{name}: health.on_timeout must be "commit" or "rollback", not {on_timeout!r}'
            )
        health = HealthConfig(
            min_inferences=_need(hl.integer("min_inferences", HealthConfig.min_inferences)),
            max_seconds=_need(hl.number("max_seconds", HealthConfig.max_seconds, positive=True)),
            max_error_rate=_need(
                hl.number("max_error_rate", HealthConfig.max_error_rate, maximum=1.0)
            ),
            max_p95_ms=hl.number("max_p95_ms", None, positive=True),
            on_timeout="commit" if on_timeout == "commit" else "rollback",
        )
        hl.finish()

        ht = top.section("http")
        http = HttpConfig(
            enabled=ht.flag("enabled", HttpConfig.enabled),
            host=_need(ht.text("host", HttpConfig.host)),
            port=_need(ht.integer("port", HttpConfig.port, maximum=65535)),
            unix_socket=ht.path("unix_socket", base),
            allow_remote=ht.flag("allow_remote", HttpConfig.allow_remote),
            max_body_bytes=ht.integer("max_body_bytes", None, minimum=1),
            max_connections=ht.integer("max_connections", None, minimum=1),
            request_timeout=ht.number("request_timeout", None, positive=True),
            socket_mode=ht.integer("socket_mode", None, maximum=0o777),
        )
        ht.finish()

        se = top.section("serial")
        serial = SerialConfig(
            enabled=se.flag("enabled", SerialConfig.enabled),
            port=_need(se.text("port", SerialConfig.port)),
            baud=_need(se.integer("baud", SerialConfig.baud, minimum=1)),
            window=_need(se.integer("window", SerialConfig.window, minimum=1)),
            hop=se.integer("hop", None, minimum=1),
        )
        se.finish()

        ev = top.section("events")
        events = EventsConfig(
            max_bytes=_need(ev.integer("max_bytes", EventsConfig.max_bytes, minimum=4096)),
            keep=_need(ev.integer("keep", EventsConfig.keep, minimum=1)),
        )
        ev.finish()

        mqtt = _mqtt_section(top.section("mqtt"), base)
        top.finish()
        return cls(
            state_dir=state_dir,
            trust_file=trust_file,
            architecture=architecture,
            require_golden=require_golden,
            verify_on_boot=verify_on_boot,
            runtime=runtime,
            health=health,
            http=http,
            serial=serial,
            events=events,
            mqtt=mqtt,
            source=source,
        )


def load_config(path: str | os.PathLike[str] | None) -> AgentConfig:
    """``AgentConfig.load(path)``, or the defaults when ``path`` is None."""
    return AgentConfig() if path is None else AgentConfig.load(path)


def _mqtt_section(mq: _Table, base: Path) -> MqttConfig:
    """``[mqtt]`` and ``[mqtt.tls]``; ids are checked here so a bad one names its key."""
    from edgekit.protocol import ProtocolError, validate_id  # standard library only

    version = mq.choice("version", ("5", "3.1.1"), MqttConfig.version)
    tl = mq.section("tls")
    tls = MqttTlsConfig(
        enabled=tl.flag("enabled", MqttTlsConfig.enabled),
        ca_file=tl.path("ca_file", base),
        cert_file=tl.path("cert_file", base),
        key_file=tl.path("key_file", base),
        check_hostname=tl.flag("check_hostname", MqttTlsConfig.check_hostname),
    )
    tl.finish()
    config = MqttConfig(
        enabled=mq.flag("enabled", MqttConfig.enabled),
        host=_need(mq.text("host", MqttConfig.host)),
        port=_need(mq.integer("port", MqttConfig.port, minimum=1, maximum=65535)),
        fleet=mq.text("fleet", None),
        device=mq.text("device", None),
        version="5" if version == "5" else "3.1.1",
        keepalive_s=_need(
            mq.integer("keepalive_s", MqttConfig.keepalive_s, minimum=5, maximum=65535)
        ),
        username=mq.text("username", None),
        password=mq.text("password", None),
        password_file=mq.path("password_file", base),
        tls=tls,
        telemetry_interval_s=_need(
            mq.number("telemetry_interval_s", MqttConfig.telemetry_interval_s, positive=True)
        ),
        outbox_max_bytes=_need(
            mq.integer("outbox_max_bytes", MqttConfig.outbox_max_bytes, minimum=64 * 1024)
        ),
        outbox_max_age_s=_need(
            mq.number("outbox_max_age_s", MqttConfig.outbox_max_age_s, positive=True)
        ),
        reconnect_initial_s=_need(
            mq.number("reconnect_initial_s", MqttConfig.reconnect_initial_s, positive=True)
        ),
        reconnect_max_s=_need(
            mq.number("reconnect_max_s", MqttConfig.reconnect_max_s, positive=True)
        ),
        drift_every=_need(mq.integer("drift_every", MqttConfig.drift_every, minimum=1)),
        drift_max_requests=_need(
            mq.integer("drift_max_requests", MqttConfig.drift_max_requests, minimum=1)
        ),
        drift_max_bytes=_need(
            mq.integer("drift_max_bytes", MqttConfig.drift_max_bytes, minimum=1024)
        ),
        drift_min_requests=_need(
            mq.integer("drift_min_requests", MqttConfig.drift_min_requests, minimum=1)
        ),
    )
    mq.finish()
    where = f"{mq.name}: {mq.prefix}"
    if config.password is not None and config.password_file is not None:
        raise ConfigError(f"{where}password and {mq.prefix}password_file: give one, not both")
    if config.reconnect_max_s < config.reconnect_initial_s:
        raise ConfigError(f"{where}reconnect_max_s must be at least reconnect_initial_s")
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError(f"{where}tls.key_file needs {mq.prefix}tls.cert_file")
    for key, value in (("fleet", config.fleet), ("device", config.device)):
        if value is not None:
            try:
                validate_id(value, what=key)
            except ProtocolError as exc:
                raise ConfigError(f"{where}{exc.message}") from None
    if config.enabled and config.fleet is None:
        raise ConfigError(f"{where}fleet must be set when {mq.prefix}enabled = true")
    return config


def _need(value: Any) -> Any:
    """Narrow an optional read whose default is not None (for the type checker)."""
    assert value is not None
    return value


class _Table:
    """Typed reads from one TOML table that remember which keys were asked for.

    :meth:`finish` then reports the first key nobody asked for: the schema is the sequence of
    reads in :meth:`AgentConfig.from_dict`, so it cannot drift from what the agent uses.
    """

    __slots__ = ("data", "name", "prefix", "seen")

    def __init__(self, data: Mapping[str, Any], *, name: str, prefix: str) -> None:
        self.data = data
        self.name = name
        self.prefix = prefix
        self.seen: set[str] = set()

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.name}: {self.prefix}{key} {problem}")

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def section(self, key: str) -> _Table:
        value = self._get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self._fail(key, f"must be a table ([{self.prefix}{key}])")
        return _Table(value, name=self.name, prefix=f"{self.prefix}{key}.")

    def text(self, key: str, default: str | None) -> str | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, not {_kind(value)}")
        if not value.strip():
            raise self._fail(key, "must not be empty (leave the key out for the default)")
        return value

    def path(self, key: str, base: Path) -> Path | None:
        value = self.text(key, None)
        return None if value is None else base / Path(value).expanduser()

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def integer(
        self, key: str, default: int | None, *, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, not {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self._fail(key, f"must be at least {minimum}{upper}, not {value}")
        return value

    def number(
        self,
        key: str,
        default: float | None,
        *,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, not {_kind(value)}")
        number = float(value)
        if number != number or number < 0 or (positive and number == 0):
            raise self._fail(key, f"must be {'> 0' if positive else '>= 0'}, not {value}")
        if maximum is not None and number > maximum:
            raise self._fail(key, f"must be at most {maximum:g}, not {value}")
        return number

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        """A string from ``allowed``; an integer is read as its decimal text (``version = 5``)."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or value not in allowed:
            options = " or ".join(f'"{a}"' for a in allowed)
            raise self._fail(key, f"must be {options}, not {value!r}")
        return value

    def names(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, 'must be a list of names, like ["CPUExecutionProvider"]')
        return tuple(value)

    def finish(self) -> None:
        unknown = [key for key in self.data if key not in self.seen]
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self._fail(unknown[0], f"is not a known key (known here: {known})")


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
