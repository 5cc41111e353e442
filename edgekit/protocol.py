"""The MQTT contract between a device and the fleet controller: topics, messages, validation.

Both sides import this one module (the device agent without pulling in the controller), so a
topic or a field cannot mean one thing on the device and another on the controller. It is
standard library only because it runs on devices; the transport (paho-mqtt) lives elsewhere.
The prose version, with a JSON example of every message, is ``docs/mqtt-protocol.md``.

Topic tree (``v1`` versions the *tree*; a breaking change would move to ``edgekit/v2/``)::

    edgekit/v1/{fleet}/{device}/status     device -> controller  retained, QoS 1, the last will
    edgekit/v1/{fleet}/{device}/telemetry  device -> controller  QoS 1
    edgekit/v1/{fleet}/{device}/events     device -> controller  QoS 1
    edgekit/v1/{fleet}/{device}/reported   device -> controller  retained, QoS 1
    edgekit/v1/{fleet}/{device}/desired    controller -> device  retained, QoS 1
    edgekit/v1/{fleet}/{device}/cmd        controller -> device  QoS 1 (never retained)

Every payload is one JSON object carrying ``schema`` (payload version), ``kind``, ``device``,
``seq`` (per sender and device, increasing), ``msg_id`` (unique; the deduplication key) and
``ts`` (Unix seconds), then the fields of its kind. Parsing is strict where a lax parser would
let two readers disagree (duplicate keys, NaN, wrong types, out-of-range numbers, ids that are
not ids) and lenient where the format must grow: unknown fields are kept in ``extra`` and
written back, so a relay built on an older version does not strip what a newer one added.

Every problem is a :class:`ProtocolError` with a one-line message naming the field.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum, IntEnum
from typing import Any, ClassVar, NamedTuple, TypeVar

from edgekit._jsonutil import loads_strict
from edgekit.errors import EdgekitError, Malformed, TooLarge

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEQ",
    "MIN_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "TOPIC_VERSION",
    "Command",
    "CommandName",
    "Deduplicator",
    "Desired",
    "Direction",
    "Drift",
    "Event",
    "EventType",
    "InferenceStats",
    "Message",
    "MessageKind",
    "ModelRef",
    "ProtocolError",
    "QoS",
    "Reported",
    "SelfTest",
    "Severity",
    "Status",
    "StatusState",
    "SystemStats",
    "Telemetry",
    "TopicParts",
    "Topics",
    "UpdateOutcome",
    "UpdateResult",
    "UpdateState",
    "decode",
    "message_class",
    "new_msg_id",
    "parse_message",
    "parse_topic",
    "validate_id",
]

TOPIC_ROOT = "edgekit"
TOPIC_VERSION = "v1"

#: The payload schema this module writes. A newer schema may only *add* optional fields
#: (readers keep unknown fields), so readers accept any schema >= MIN_SCHEMA_VERSION; a change
#: that old readers would misread goes to a new topic tree (``edgekit/v2``) instead.
SCHEMA_VERSION = 1
MIN_SCHEMA_VERSION = 1
_MAX_SCHEMA_VERSION = 2**31 - 1

#: Small enough for an ESP32 to buffer a message in RAM (umqtt reads a payload whole), large
#: enough for telemetry with drift scores for a few hundred input features.
MAX_PAYLOAD_BYTES = 64 * 1024

#: Fleet and device ids are topic levels: 64 characters keep a topic far below MQTT's limits
#: and readable in a dashboard.
MAX_ID_LENGTH = 64

#: Sequence numbers and versions stay within a signed 64-bit integer so that controllers in
#: languages without big integers read them exactly.
MAX_SEQ = 2**63 - 1

# Ids are topic levels, so MQTT's wildcards '+' and '#', the level separator '/' and the '$'
# prefix (reserved for broker topics like $SYS) must never appear. A whitelist says it
# shorter than a blacklist and also keeps out spaces, NUL and look-alike Unicode.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # MAX_ID_LENGTH
_MSG_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # event types, commands, reasons, states
_BUNDLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as edgekit.manifest names bundles
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 1024
_MAX_KEY = 128
_MAX_ITEMS = 1024
_MAX_URL = 2048
_MAX_SIZE = 2**53  # bytes; exact in every JSON reader, far above any bundle


class ProtocolError(EdgekitError):
    """A topic, an id or a payload does not follow the MQTT protocol (one-line message)."""

    reason = "protocol"


# --- codes ----------------------------------------------------------------------------------


class Direction(str, Enum):
    """Who publishes on a topic; a receiver refuses messages that travel the wrong way."""

    UP = "device-to-controller"
    DOWN = "controller-to-device"


class QoS(IntEnum):
    """MQTT quality of service levels (the protocol uses 1 for everything that must arrive)."""

    AT_MOST_ONCE = 0
    AT_LEAST_ONCE = 1
    EXACTLY_ONCE = 2


class MessageKind(str, Enum):
    """The last topic level, and the ``kind`` field of the payload published there."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    REPORTED = "reported"
    DESIRED = "desired"
    CMD = "cmd"

    @property
    def direction(self) -> Direction:
        return _RULES[self][0]

    @property
    def retained(self) -> bool:
        """Retained topics hold *state* (the latest value is what matters), not history."""
        return _RULES[self][1]

    @property
    def qos(self) -> QoS:
        return QoS.AT_LEAST_ONCE


# kind -> (direction, retained). cmd is never retained: a retained "restart" would run again
# on every reconnect.
_RULES: dict[MessageKind, tuple[Direction, bool]] = {
    MessageKind.STATUS: (Direction.UP, True),
    MessageKind.TELEMETRY: (Direction.UP, False),
    MessageKind.EVENTS: (Direction.UP, False),
    MessageKind.REPORTED: (Direction.UP, True),
    MessageKind.DESIRED: (Direction.DOWN, True),
    MessageKind.CMD: (Direction.DOWN, False),
}


class StatusState(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventType(str, Enum):
    """Event names this version defines. The ``event`` field accepts any well-formed name, so
    an older controller still reads (and shows) events that a newer agent added."""

    AGENT_STARTED = "agent.started"
    AGENT_STOPPING = "agent.stopping"
    UPDATE_RECEIVED = "update.received"
    UPDATE_DOWNLOADING = "update.downloading"
    UPDATE_DOWNLOADED = "update.downloaded"
    UPDATE_VERIFIED = "update.verified"
    UPDATE_INSTALLING = "update.installing"
    UPDATE_TRIAL = "update.trial"
    UPDATE_COMMITTED = "update.committed"
    UPDATE_ROLLED_BACK = "update.rolled-back"
    UPDATE_FAILED = "update.failed"
    UPDATE_REJECTED = "update.rejected"
    COMMAND_ACCEPTED = "command.accepted"
    COMMAND_COMPLETED = "command.completed"
    COMMAND_REJECTED = "command.rejected"
    COMMAND_FAILED = "command.failed"
    ERROR = "error"
    INVALID_MESSAGE = "protocol.invalid-message"
    OUTBOX_OVERFLOW = "outbox.overflow"


class CommandName(str, Enum):
    """Commands this version defines; a device answers others with ``command.rejected``."""

    ROLLBACK = "rollback"
    RESTART = "restart"
    COLLECT_DIAGNOSTICS = "collect-diagnostics"


class UpdateState(str, Enum):
    """Where the agent's update state machine is (``reported.update_state``); open like
    :class:`EventType`: the field accepts any well-formed name."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TRIAL = "trial"
    ROLLING_BACK = "rolling-back"


class UpdateOutcome(str, Enum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    REJECTED = "rejected"


# --- ids and topics -------------------------------------------------------------------------


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_id(value: object, *, what: str = "id") -> str:
    """Return ``value`` if it may be a fleet or device id (a topic level), else raise."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(
            f"{what} {_short(value)} is not 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._-] "
            "starting with a letter or digit"
        )
    return value


def new_msg_id() -> str:
    """A fresh message id: 128 random bits, 32 hex characters."""
    return uuid.uuid4().hex


class TopicParts(NamedTuple):
    fleet: str
    device: str
    kind: MessageKind


class Topics:
    """The six topics of one device: ``Topics("plant-1", "cam-7").telemetry``."""

    __slots__ = ("device", "fleet", "prefix")

    def __init__(self, fleet: str, device: str) -> None:
        self.fleet = validate_id(fleet, what="fleet id")
        self.device = validate_id(device, what="device id")
        self.prefix = f"{TOPIC_ROOT}/{TOPIC_VERSION}/{fleet}/{device}"

    def for_kind(self, kind: MessageKind | str) -> str:
        return f"{self.prefix}/{MessageKind(kind).value}"

    @property
    def status(self) -> str:
        return self.for_kind(MessageKind.STATUS)

    @property
    def telemetry(self) -> str:
        return self.for_kind(MessageKind.TELEMETRY)

    @property
    def events(self) -> str:
        return self.for_kind(MessageKind.EVENTS)

    @property
    def reported(self) -> str:
        return self.for_kind(MessageKind.REPORTED)

    @property
    def desired(self) -> str:
        return self.for_kind(MessageKind.DESIRED)

    @property
    def cmd(self) -> str:
        return self.for_kind(MessageKind.CMD)

    @staticmethod
    def subscription(
        fleet: str | None = None, device: str | None = None, kind: MessageKind | str | None = None
    ) -> str:
        """A subscription filter; ``None`` levels become wildcards (``edgekit/v1/f/+/status``)."""
        levels = [
            TOPIC_ROOT,
            TOPIC_VERSION,
            "+" if fleet is None else validate_id(fleet, what="fleet id"),
            "+" if device is None else validate_id(device, what="device id"),
        ]
        if kind is None:
            return "/".join([*levels, "#"]) if device is None else "/".join([*levels, "+"])
        return "/".join([*levels, MessageKind(kind).value])

    def __repr__(self) -> str:
        return f"Topics({self.fleet!r}, {self.device!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topics) and other.prefix == self.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)


def parse_topic(topic: str) -> TopicParts:
    """Split ``edgekit/v1/{fleet}/{device}/{kind}``; anything else is a :class:`ProtocolError`."""
    if not isinstance(topic, str):
        raise ProtocolError(f"topic must be a string, not {type(topic).__name__}")
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != TOPIC_ROOT:
        raise ProtocolError(f"topic {_short(topic)} is not {TOPIC_ROOT}/<version>/<fleet>/...")
    if levels[1] != TOPIC_VERSION:
        raise ProtocolError(f"topic version {_short(levels[1])} is not {TOPIC_VERSION}")
    fleet = validate_id(levels[2], what="fleet id")
    device = validate_id(levels[3], what="device id")
    try:
        kind = MessageKind(levels[4])
    except ValueError:
        raise ProtocolError(f"topic kind {_short(levels[4])} is unknown") from None
    return TopicParts(fleet, device, kind)


# --- field codecs ---------------------------------------------------------------------------
#
# Each field of a record has a codec that turns its JSON value into the Python value (decode,
# which also validates and accepts values that are already in Python form) and back (encode).
# Records run every field through decode when constructed, so an invalid message cannot exist,
# whether it came off the wire or was built by code.


class _Codec:
    __slots__ = ()

    def decode(self, value: object, where: str) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value


class _Int(_Codec):
    __slots__ = ("high", "low")

    def __init__(self, low: int = 0, high: int = MAX_SEQ) -> None:
        self.low, self.high = low, high

    def decode(self, value: object, where: str) -> int:
        # bool is an int in Python, but a JSON true is never a count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where} must be an integer, got {_short(value)}")
        if not self.low <= value <= self.high:
            raise ProtocolError(f"{where} must be in [{self.low}, {self.high}], got {value}")
        return value


class _Float(_Codec):
    __slots__ = ("high", "low")

    def __init__(self, low: float = 0.0, high: float = 1e15) -> None:
        self.low, self.high = low, high

    def decode(self, value: object, where: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError(f"{where} must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond 1e308
            number = math.inf
        if not math.isfinite(number) or not self.low <= number <= self.high:
            raise ProtocolError(f"{where} must be in [{self.low:g}, {self.high:g}], got {value}")
        return number


class _Bool(_Codec):
    __slots__ = ()

    def decode(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false, got {_short(value)}")
        return value


class _Str(_Codec):
    """A string matching ``pattern``, or free one-line text of at most ``max_len`` characters."""

    __slots__ = ("max_len", "pattern", "what")

    def __init__(
        self, pattern: re.Pattern[str] | None = None, *, max_len: int = _MAX_TEXT, what: str = ""
    ) -> None:
        self.pattern, self.max_len, self.what = pattern, max_len, what

    def decode(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where} must be a string, got {_short(value)}")
        if isinstance(value, Enum):  # EventType.ERROR -> "error": plain strings in messages
            value = str(value.value)
        if self.pattern is not None:
            if not self.pattern.fullmatch(value):
                raise ProtocolError(f"{where} {_short(value)} is not {self.what}")
        elif len(value) > self.max_len or _CONTROL.search(value):
            raise ProtocolError(
                f"{where} must be one line of at most {self.max_len} characters "
                "without control characters"
            )
        return value


class _Url(_Codec):
    __slots__ = ()

    def decode(self, value: object, where: str) -> str:
        if not isinstance(value, str) or len(value) > _MAX_URL:
            raise ProtocolError(f"{where} must be a URL of at most {_MAX_URL} characters")
        scheme, sep, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        if (
            not sep
            or scheme.lower() not in ("https", "http")
            or not host
            or any(ch.isspace() for ch in value)
            or _CONTROL.search(value)
        ):
            raise ProtocolError(f"{where} {_short(value)} is not an http(s) URL")
        return value


class _EnumCodec(_Codec):
    __slots__ = ("enum",)

    def __init__(self, enum: type[Enum]) -> None:
        self.enum = enum

    def decode(self, value: object, where: str) -> Enum:
        try:
            return self.enum(value)
        except (ValueError, TypeError):
            allowed = ", ".join(str(member.value) for member in self.enum)
            raise ProtocolError(f"{where} {_short(value)} is not one of: {allowed}") from None

    def encode(self, value: Any) -> Any:
        return value.value


class _Optional(_Codec):
    __slots__ = ("inner",)

    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def decode(self, value: object, where: str) -> Any:
        return None if value is None else self.inner.decode(value, where)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


class _Map(_Codec):
    """A JSON object with free-text keys and values of one codec (feature -> PSI, ...)."""

    __slots__ = ("values",)

    def __init__(self, values: _Codec) -> None:
        self.values = values

    def decode(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ProtocolError(f"{where} must be an object, got {_short(value)}")
        if len(value) > _MAX_ITEMS:
            raise ProtocolError(f"{where} has {len(value)} entries, the limit is {_MAX_ITEMS}")
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key or len(key) > _MAX_KEY or _CONTROL.search(key):
                raise ProtocolError(f"{where} has an invalid key {_short(key)}")
            result[key] = self.values.decode(item, f"{where}[{key!r}]")
        return result

    def encode(self, value: Any) -> Any:
        return {key: self.values.encode(item) for key, item in value.items()}


class _Scalar(_Codec):
    """A JSON scalar (string, number, boolean, null): the values of free-form ``data``."""

    __slots__ = ()

    def decode(self, value: object, where: str) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return _Int(-MAX_SEQ - 1, MAX_SEQ).decode(value, where)
        if isinstance(value, float):
            return _Float(-1e300, 1e300).decode(value, where)
        if isinstance(value, str):
            return _Str(max_len=_MAX_TEXT).decode(value, where)
        raise ProtocolError(f"{where} must be a string, number, boolean or null")


_R = TypeVar("_R", bound="_Record")


class _Object(_Codec):
    __slots__ = ("cls",)

    def __init__(self, cls: type[_Record]) -> None:
        self.cls = cls

    def decode(self, value: object, where: str) -> Any:
        if isinstance(value, self.cls):
            return value  # validated when it was constructed
        return self.cls.from_dict(value, where=where)

    def encode(self, value: Any) -> Any:
        return value.to_dict()


_COUNT = _Int()
_NUMBER = _Float()
_MS = _Optional(_Float(0.0, 1e9))
_BYTES = _Optional(_Int(0, _MAX_SIZE))
_NAME_CODEC = _Str(_NAME, what="a name of [a-z0-9._-] (max 64)")
_OPT_NAME = _Optional(_NAME_CODEC)
_ID_CODEC = _Str(_ID, what="an id of [A-Za-z0-9._-] (max 64)")
_OPT_ID = _Optional(_ID_CODEC)
_MSG_ID_CODEC = _Str(_MSG_ID, what="a message id of 8-64 characters [A-Za-z0-9_-]")
_SHA256_CODEC = _Str(_SHA256, what="64 lowercase hex characters")
_TS = _Float(0.0, 1e11)  # Unix seconds; 0 = the device has no wall clock yet
_TEXT = _Str(max_len=_MAX_TEXT)
_OPT_TEXT = _Optional(_TEXT)
_SHORT_TEXT = _Optional(_Str(max_len=_MAX_KEY))
_SLOTS = _Map(_NAME_CODEC)
_SCALARS = _Map(_Scalar())


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Record:
    """A JSON object with typed fields (``_CODECS``) plus unknown fields kept in ``extra``."""

    _CODECS: ClassVar[Mapping[str, _Codec]] = {}
    _RESERVED: ClassVar[frozenset[str]] = frozenset()
    _WHERE: ClassVar[str] = "object"

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Fields this version does not know, kept so that they are written back unchanged."""

    def __post_init__(self) -> None:
        for name, codec in self._CODECS.items():
            value = codec.decode(getattr(self, name), f"{self._WHERE}.{name}")
            object.__setattr__(self, name, value)  # normalized: "online" -> StatusState.ONLINE
        extra = self.extra
        if not isinstance(extra, Mapping):
            raise ProtocolError(f"{self._WHERE}.extra must be a mapping")
        for key in extra:
            if not isinstance(key, str) or key in self._CODECS or key in self._RESERVED:
                raise ProtocolError(f"{self._WHERE}.extra has a reserved key {_short(key)}")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ProtocolError(f"{self._WHERE}.extra must hold JSON values only") from None
        object.__setattr__(self, "extra", dict(extra))

    @classmethod
    def _required(cls) -> tuple[str, ...]:
        """Fields without a default, in declaration order (so errors are deterministic)."""
        cached: tuple[str, ...] | None = cls.__dict__.get("_required_cache")
        if cached is None:
            cached = tuple(
                f.name
                for f in fields(cls)
                if f.name in cls._CODECS and f.default is MISSING and f.default_factory is MISSING
            )
            cls._required_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def from_dict(cls: type[_R], data: object, *, where: str | None = None) -> _R:
        """Validate a decoded JSON object; unknown keys go to ``extra``."""
        where = where or cls._WHERE
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{where} must be a JSON object, got {_short(data)}")
        for name in cls._required():
            if name not in data:
                raise ProtocolError(f"{where} is missing {name!r}")
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            codec = cls._CODECS.get(key)
            if codec is not None:
                # Decoded here with the full path, so errors name e.g. telemetry.inference.count.
                values[key] = codec.decode(value, f"{where}.{key}")
            elif key not in cls._RESERVED:
                extra[key] = value
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: known fields in declaration order, then the unknown ones."""
        out = {name: codec.encode(getattr(self, name)) for name, codec in self._CODECS.items()}
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


@dataclass(frozen=True, kw_only=True)
class ModelRef(_Record):
    """Which bundle a model came from: what the controller compares with ``desired``."""

    _WHERE: ClassVar[str] = "model"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "name": _Str(_BUNDLE, what="a bundle name of [A-Za-z0-9._-] (max 64)"),
        "version": _Int(0, MAX_SEQ),
        "sha256": _SHA256_CODEC,
        "display_version": _SHORT_TEXT,
    }

    name: str
    version: int
    sha256: str
    """The sha256 of the model file (as listed in the bundle manifest)."""
    display_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class InferenceStats(_Record):
    """Counters since the agent started and latency percentiles from its histogram."""

    _WHERE: ClassVar[str] = "inference"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "count": _COUNT,
        "errors": _COUNT,
        "rejected": _COUNT,
        "p50_ms": _MS,
        "p95_ms": _MS,
        "p99_ms": _MS,
    }

    count: int = 0
    errors: int = 0
    rejected: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class SystemStats(_Record):
    """Host health; ``None`` where the board does not expose a value."""

    _WHERE: ClassVar[str] = "system"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "cpu_percent": _Optional(_Float(0.0, 100.0)),
        "mem_total_bytes": _BYTES,
        "mem_available_bytes": _BYTES,
        "rss_bytes": _BYTES,
        "disk_free_bytes": _BYTES,
        "temperature_c": _Optional(_Float(-273.15, 1000.0)),
        "uptime_s": _Optional(_NUMBER),
    }

    cpu_percent: float | None = None
    """Busy share of all CPUs since the previous sample, 0-100."""
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    rss_bytes: int | None = None
    """Resident memory of the agent process."""
    disk_free_bytes: int | None = None
    """Free space on the file system holding the agent's state directory."""
    temperature_c: float | None = None
    """The hottest thermal zone."""
    uptime_s: float | None = None
    """Seconds since the *host* booted (the agent's own uptime is ``telemetry.uptime_s``)."""


@dataclass(frozen=True, kw_only=True)
class Drift(_Record):
    """Input and output distributions of recent requests compared with the bundle baseline."""

    _WHERE: ClassVar[str] = "drift"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "samples": _COUNT,
        "input_psi": _Map(_NUMBER),
        "output_psi": _Optional(_NUMBER),
        "output_distribution": _Map(_Float(0.0, 1.0)),
        "baseline_distribution": _Map(_Float(0.0, 1.0)),
    }

    samples: int = 0
    """Requests in the window the scores were computed over."""
    input_psi: Mapping[str, float] = field(default_factory=dict)
    """Population stability index per input feature against ``baseline.json``."""
    output_psi: float | None = None
    output_distribution: Mapping[str, float] = field(default_factory=dict)
    """Share of each predicted class in the window."""
    baseline_distribution: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SelfTest(_Record):
    """The last golden self-test: the bundle's golden inputs run and compared with outputs."""

    _WHERE: ClassVar[str] = "self_test"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "ok": _Bool(),
        "ts": _TS,
        "detail": _OPT_TEXT,
    }

    ok: bool
    ts: float
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class UpdateResult(_Record):
    """How the last rollout the device handled ended."""

    _WHERE: ClassVar[str] = "last_update"
    _CODECS: ClassVar[Mapping[str, _Codec]] = {
        "rollout_id": _ID_CODEC,
        "outcome": _EnumCodec(UpdateOutcome),
        "bundle": _Optional(_Str(_BUNDLE, what="a bundle name")),
        "version": _Optional(_Int(0, MAX_SEQ)),
        "reason": _OPT_NAME,
        "ts": _TS,
    }

    rollout_id: str
    outcome: UpdateOutcome
    bundle: str | None = None
    version: int | None = None
    reason: str | None = None
    """Machine-readable cause of a failure (an error ``reason`` such as ``hash-mismatch``)."""
    ts: float = 0.0


# --- messages -------------------------------------------------------------------------------

_ENVELOPE: dict[str, _Codec] = {
    "schema": _Int(MIN_SCHEMA_VERSION, _MAX_SCHEMA_VERSION),
    "device": _ID_CODEC,
    "seq": _Int(0, MAX_SEQ),
    "msg_id": _MSG_ID_CODEC,
    "ts": _TS,
}

_M = TypeVar("_M", bound="Message")


@dataclass(frozen=True, kw_only=True)
class Message(_Record):
    """Fields every payload carries. ``seq`` is stamped by the sender's queue (see
    ``device_agent.mqtt_link.Publisher``) and ``msg_id``/``ts`` default to fresh values."""

    KIND: ClassVar[MessageKind]
    _RESERVED: ClassVar[frozenset[str]] = frozenset({"kind"})

    device: str
    seq: int = 0
    msg_id: str = field(default_factory=new_msg_id)
    ts: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls: type[_M], data: object, *, where: str | None = None) -> _M:
        where = where or cls._WHERE
        if isinstance(data, Mapping):
            kind = data.get("kind")
            if kind != cls.KIND.value:
                raise ProtocolError(f"{where}.kind must be {cls.KIND.value!r}, got {_short(kind)}")
        return super().from_dict(data, where=where)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.schema, "kind": self.KIND.value}
        out.update(super().to_dict())
        return out

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON on one line (``mosquitto_sub -v`` prints one message a line)."""
        data = json.dumps(
            self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                f"{self._WHERE} payload is {len(data)} bytes, the limit is {MAX_PAYLOAD_BYTES}"
            )
        return data

    @classmethod
    def from_json(cls: type[_M], data: bytes | bytearray | str) -> _M:
        return cls.from_dict(_load(data, cls._WHERE))

    def with_seq(self: _M, seq: int) -> _M:
        """A copy stamped with ``seq`` (same msg_id: a resend must stay a duplicate)."""
        return replace(self, seq=seq)


def _envelope(**specific: _Codec) -> dict[str, _Codec]:
    return {**_ENVELOPE, **specific}


def _load(data: bytes | bytearray | str, what: str) -> dict[str, Any]:
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"{what} payload must be bytes, not {type(data).__name__}")
    try:
        return loads_strict(bytes(data), what=f"{what} payload", max_size=MAX_PAYLOAD_BYTES)
    except (Malformed, TooLarge) as exc:
        raise ProtocolError(exc.message) from None


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Retained presence. The agent publishes ``online`` after connecting and registers an
    ``offline`` message (reason ``connection-lost``) as its last will."""

    KIND: ClassVar[MessageKind] = MessageKind.STATUS
    _WHERE: ClassVar[str] = "status"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        state=_EnumCodec(StatusState),
        reason=_OPT_NAME,
        agent_version=_SHORT_TEXT,
    )

    state: StatusState
    reason: str | None = None
    agent_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class Telemetry(Message):
    """The periodic health report (every 10 s by default)."""

    KIND: ClassVar[MessageKind] = MessageKind.TELEMETRY
    _WHERE: ClassVar[str] = "telemetry"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        interval_s=_Float(0.0, 1e7),
        uptime_s=_NUMBER,
        inference=_Object(InferenceStats),
        model=_Optional(_Object(ModelRef)),
        active_slot=_OPT_NAME,
        slots=_SLOTS,
        system=_Object(SystemStats),
        drift=_Optional(_Object(Drift)),
        self_test=_Optional(_Object(SelfTest)),
    )

    interval_s: float = 10.0
    uptime_s: float = 0.0
    """Seconds since the agent process started."""
    inference: InferenceStats = field(default_factory=InferenceStats)
    model: ModelRef | None = None
    active_slot: str | None = None
    slots: Mapping[str, str] = field(default_factory=dict)
    """Slot name -> state (``{"a": "committed", "b": "empty"}``)."""
    system: SystemStats = field(default_factory=SystemStats)
    drift: Drift | None = None
    self_test: SelfTest | None = None


@dataclass(frozen=True, kw_only=True)
class Event(Message):
    """Something happened once: update progress, a command acknowledgement, an error."""

    KIND: ClassVar[MessageKind] = MessageKind.EVENTS
    _WHERE: ClassVar[str] = "event"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        event=_NAME_CODEC,
        severity=_EnumCodec(Severity),
        message=_TEXT,
        reason=_OPT_NAME,
        ref=_Optional(_MSG_ID_CODEC),
        rollout_id=_OPT_ID,
        data=_SCALARS,
    )

    event: str
    """An :class:`EventType` value, or a newer name."""
    severity: Severity = Severity.INFO
    message: str = ""
    reason: str | None = None
    """Machine-readable cause (the ``reason`` of an agent or edgekit error)."""
    ref: str | None = None
    """``msg_id`` of the desired state or command this event answers."""
    rollout_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    """Free-form details: strings, numbers, booleans, null."""


@dataclass(frozen=True, kw_only=True)
class Reported(Message):
    """Retained: what the device runs now and how the last rollout ended."""

    KIND: ClassVar[MessageKind] = MessageKind.REPORTED
    _WHERE: ClassVar[str] = "reported"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        current=_Optional(_Object(ModelRef)),
        previous=_Optional(_Object(ModelRef)),
        active_slot=_OPT_NAME,
        slots=_SLOTS,
        update_state=_NAME_CODEC,
        last_update=_Optional(_Object(UpdateResult)),
        agent_version=_SHORT_TEXT,
    )

    current: ModelRef | None = None
    previous: ModelRef | None = None
    active_slot: str | None = None
    slots: Mapping[str, str] = field(default_factory=dict)
    update_state: str = UpdateState.IDLE.value
    last_update: UpdateResult | None = None
    agent_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class Desired(Message):
    """Retained, from the controller: the bundle this device should run."""

    KIND: ClassVar[MessageKind] = MessageKind.DESIRED
    _WHERE: ClassVar[str] = "desired"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        bundle=_Str(_BUNDLE, what="a bundle name of [A-Za-z0-9._-] (max 64)"),
        version=_Int(1, MAX_SEQ),
        url=_Url(),
        sha256=_SHA256_CODEC,
        size=_Int(1, _MAX_SIZE),
        rollout_id=_ID_CODEC,
    )

    bundle: str
    version: int
    url: str
    sha256: str
    """sha256 of the bundle archive: checked before the archive is even opened."""
    size: int
    rollout_id: str


@dataclass(frozen=True, kw_only=True)
class Command(Message):
    """From the controller: run once, answer with ``command.*`` events whose ``ref`` is this
    message's ``msg_id``."""

    KIND: ClassVar[MessageKind] = MessageKind.CMD
    _WHERE: ClassVar[str] = "cmd"
    _CODECS: ClassVar[Mapping[str, _Codec]] = _envelope(
        command=_NAME_CODEC,
        args=_SCALARS,
        expires=_Optional(_TS),
    )

    command: str
    """A :class:`CommandName` value, or a newer name (answered with ``command.rejected``)."""
    args: Mapping[str, Any] = field(default_factory=dict)
    expires: float | None = None
    """Unix seconds after which the device must not run the command (it may wait in the
    broker's session while the device is offline)."""

    @property
    def known(self) -> CommandName | None:
        try:
            return CommandName(self.command)
        except ValueError:
            return None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) > self.expires


_CLASSES: dict[MessageKind, type[Message]] = {
    MessageKind.STATUS: Status,
    MessageKind.TELEMETRY: Telemetry,
    MessageKind.EVENTS: Event,
    MessageKind.REPORTED: Reported,
    MessageKind.DESIRED: Desired,
    MessageKind.CMD: Command,
}


def message_class(kind: MessageKind | str) -> type[Message]:
    try:
        return _CLASSES[MessageKind(kind)]
    except ValueError:
        raise ProtocolError(f"message kind {_short(kind)} is unknown") from None


def parse_message(payload: bytes | bytearray | str) -> Message:
    """Parse any message, choosing its class by the ``kind`` field."""
    data = _load(payload, "message")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ProtocolError(f"message.kind must be a string, got {_short(kind)}")
    return message_class(kind).from_dict(data)


def decode(topic: str, payload: bytes | bytearray | str) -> tuple[TopicParts, Message]:
    """Parse a message received on ``topic``; the payload must match the topic's kind and
    device (a device can only speak for itself, given broker ACLs on its own topics)."""
    parts = parse_topic(topic)
    message = message_class(parts.kind).from_json(payload)
    if message.device != parts.device:
        raise ProtocolError(
            f"{parts.kind.value} payload is from device {message.device!r}, "
            f"the topic is {parts.device!r}"
        )
    return parts, message


# --- deduplication --------------------------------------------------------------------------


class Deduplicator:
    """Drops messages already seen, keyed by (device, ``msg_id``).

    QoS 1 means "at least once": a message whose PUBACK was lost, or that was in flight when
    the connection or the agent died, is sent again with the same ``msg_id``. Duplicates are
    therefore recent: they are resends of the sender's in-flight window, which arrive before
    anything newer. A bounded window of the last ``per_device`` ids per device (default
    1024, well above the default 20 in flight) catches them in constant memory.

    ``seq`` is deliberately *not* the key: the last will is composed when the device connects
    and published by the broker later, so it carries an older ``seq`` than messages sent during
    that connection, and a "seq must grow" rule would drop it. Not thread-safe.
    """

    __slots__ = ("_devices", "_max_devices", "_per_device", "duplicates")

    def __init__(self, *, per_device: int = 1024, max_devices: int = 100_000) -> None:
        if per_device < 1 or max_devices < 1:
            raise ValueError("per_device and max_devices must be at least 1")
        self._per_device = per_device
        self._max_devices = max_devices
        self._devices: OrderedDict[Hashable, OrderedDict[str, None]] = OrderedDict()
        self.duplicates = 0

    def seen(self, device: Hashable, msg_id: str) -> bool:
        """True if ``msg_id`` from ``device`` was seen before; otherwise remember it."""
        ids = self._devices.get(device)
        if ids is None:
            ids = self._devices[device] = OrderedDict()
            if len(self._devices) > self._max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device)
        if msg_id in ids:
            ids.move_to_end(msg_id)
            self.duplicates += 1
            return True
        ids[msg_id] = None
        if len(ids) > self._per_device:
            ids.popitem(last=False)
        return False

    def accept(self, message: Message, *, fleet: str | None = None) -> bool:
        """True for the first copy of ``message``; pass ``fleet`` when device ids repeat
        across fleets."""
        key: Hashable = message.device if fleet is None else (fleet, message.device)
        return not self.seen(key, message.msg_id)

    def forget(self, device: Hashable) -> None:
        self._devices.pop(device, None)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._devices.values())
