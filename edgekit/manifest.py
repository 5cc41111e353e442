"""The bundle manifest (``manifest.json``, format 1): the contract between workstation and device.

``from_bytes`` validates everything a device relies on and keeps unknown fields, so a newer
writer's additions survive a round trip through an older reader (forward compatibility).
Signatures cover the exact bytes the writer produced; a reader never re-serializes to verify.
See docs/bundle-format.md for the field reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from edgekit._jsonutil import dumps, loads_strict
from edgekit.errors import Malformed

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RESERVED_NAMES",
    "RUNTIMES",
    "SIGNATURES_NAME",
    "FileEntry",
    "Manifest",
    "Targets",
    "TensorSpec",
    "format_time",
    "normalize_arch",
    "parse_time",
    "validate_file_name",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURES_NAME})
RUNTIMES = ("onnxruntime", "tflite")

#: Flat, portable file names: no directories, no leading dot, at most 100 bytes (one ustar field).
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION_TEXT = re.compile(r"\d+(\.\d+){0,3}")
#: Versions are compared as integers on devices that may run 32-bit Python builds of JSON
#: parsers in other languages; keep them within a signed 64-bit range.
MAX_VERSION = 2**63 - 1

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "armhf": "armv7l",
    "armv7": "armv7l",
    "armv6": "armv6l",
}


def normalize_arch(name: str) -> str:
    """Map an architecture's spellings (``arm64``, ``aarch64``…) to ``platform.machine()``'s."""
    lowered = name.strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered)


def validate_file_name(name: str) -> str:
    """Return ``name`` if it is a safe flat file name, else raise :class:`Malformed`."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise Malformed(f"file name {name!r} is not a flat name of [A-Za-z0-9._+-] (max 100)")
    return name


def parse_time(value: object, *, what: str) -> datetime:
    """Parse an RFC 3339 UTC timestamp ``YYYY-MM-DDTHH:MM:SSZ``."""
    if not isinstance(value, str) or not value.endswith("Z"):
        raise Malformed(f"{what} must be a UTC timestamp like 2027-01-01T00:00:00Z")
    try:
        parsed = datetime.fromisoformat(value[:-1])
    except ValueError:
        raise Malformed(f"{what} {value!r} is not a valid timestamp") from None
    if parsed.tzinfo is not None:
        raise Malformed(f"{what} {value!r} must end in Z with no offset")
    return parsed.replace(tzinfo=timezone.utc)


def format_time(value: datetime) -> str:
    """Format as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds)."""
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(timezone.utc).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _req(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise Malformed(f"{where} is missing {key!r}")
    value = data[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise Malformed(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _opt(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if data.get(key) is None:
        return None
    return _req(data, key, kind, where)


def _extra(data: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in known}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, dtype, shape and, when quantized, scale/zero-point."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    quantization: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"name", "dtype", "shape", "quantization"})

    @classmethod
    def from_dict(cls, data: object, *, where: str) -> TensorSpec:
        if not isinstance(data, dict):
            raise Malformed(f"{where} must be an object")
        name = _req(data, "name", str, where)
        dtype = _req(data, "dtype", str, where)
        shape = _req(data, "shape", list, where)
        for dim in shape:
            if (dim is not None and not isinstance(dim, (int, str))) or isinstance(dim, bool):
                raise Malformed(f"{where}.shape entries must be integers, names or null")
            if isinstance(dim, int) and dim < 0:
                raise Malformed(f"{where}.shape has a negative dimension")
        quant = _opt(data, "quantization", dict, where)
        if quant is not None:
            for key in ("scale", "zero_point"):
                values = quant.get(key)
                if not isinstance(values, list) or not values:
                    raise Malformed(f"{where}.quantization.{key} must be a non-empty list")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise Malformed(f"{where}.quantization.{key} must hold numbers")
        return cls(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            quantization=quant,
            extra=_extra(data, cls._KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(name=self.name, dtype=self.dtype, shape=list(self.shape))
        if self.quantization is not None:
            out["quantization"] = dict(self.quantization)
        return out


@dataclass(frozen=True)
class FileEntry:
    """A file in the bundle other than the manifest and the signatures."""

    sha256: str
    size: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"sha256", "size"})

    @classmethod
    def from_dict(cls, data: object, *, where: str) -> FileEntry:
        if not isinstance(data, dict):
            raise Malformed(f"{where} must be an object")
        digest = _req(data, "sha256", str, where)
        if not _SHA256.fullmatch(digest):
            raise Malformed(f"{where}.sha256 must be 64 lowercase hex characters")
        size = _req(data, "size", int, where)
        if size < 0:
            raise Malformed(f"{where}.size is negative")
        return cls(sha256=digest, size=size, extra=_extra(data, cls._KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(sha256=self.sha256, size=self.size)
        return out


@dataclass(frozen=True)
class Targets:
    """Where the bundle may be installed. Empty/None fields mean "no constraint"."""

    architectures: tuple[str, ...] = ()
    min_agent_version: str | None = None
    runtime_version: str | None = None  # the minimum version of the runtime library
    opsets: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"architectures", "min_agent_version", "runtime_version", "opsets"})

    @classmethod
    def from_dict(cls, data: object, *, where: str = "targets") -> Targets:
        if not isinstance(data, dict):
            raise Malformed(f"{where} must be an object")
        arches = _opt(data, "architectures", list, where) or []
        if not all(isinstance(a, str) and a for a in arches):
            raise Malformed(f"{where}.architectures must be a list of names")
        versions = {}
        for key in ("min_agent_version", "runtime_version"):
            value = _opt(data, key, str, where)
            if value is not None and not _VERSION_TEXT.fullmatch(value):
                raise Malformed(f"{where}.{key} {value!r} must look like 1.2.3")
            versions[key] = value
        opsets = _opt(data, "opsets", dict, where) or {}
        for domain, version in opsets.items():
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise Malformed(f"{where}.opsets[{domain!r}] must be a positive integer")
        return cls(
            architectures=tuple(normalize_arch(a) for a in arches),
            min_agent_version=versions["min_agent_version"],
            runtime_version=versions["runtime_version"],
            opsets=dict(opsets),
            extra=_extra(data, cls._KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["architectures"] = list(self.architectures)
        if self.min_agent_version is not None:
            out["min_agent_version"] = self.min_agent_version
        if self.runtime_version is not None:
            out["runtime_version"] = self.runtime_version
        if self.opsets:
            out["opsets"] = dict(self.opsets)
        return out


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    name: str
    version: int
    created: datetime
    expires: datetime
    runtime: str
    model: str
    files: Mapping[str, FileEntry]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    display_version: str | None = None
    targets: Targets = field(default_factory=Targets)
    tools: Mapping[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset(
        {
            "format",
            "name",
            "version",
            "display_version",
            "created",
            "expires",
            "runtime",
            "model",
            "inputs",
            "outputs",
            "targets",
            "files",
            "tools",
        }
    )

    @property
    def bundle_file_name(self) -> str:
        """The conventional file name ``NAME-VERSION.ekb``."""
        return f"{self.name}-{self.version}.ekb"

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = 1024 * 1024) -> Manifest:
        return cls.from_dict(loads_strict(data, what=MANIFEST_NAME, max_size=max_size))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        where = "manifest"
        fmt = _req(data, "format", int, where)
        if fmt != FORMAT_VERSION:
            # A format this reader does not know may change the meaning of any field.
            raise Malformed(
                f"manifest format {fmt} is not supported (this reader: {FORMAT_VERSION})"
            )
        name = _req(data, "name", str, where)
        if not _BUNDLE_NAME.fullmatch(name):
            raise Malformed(f"bundle name {name!r} must be [A-Za-z0-9._-], at most 64 characters")
        version = _req(data, "version", int, where)
        if not 0 <= version <= MAX_VERSION:
            raise Malformed(f"version {version} is out of range")
        runtime = _req(data, "runtime", str, where)
        if runtime not in RUNTIMES:
            raise Malformed(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        created = parse_time(_req(data, "created", str, where), what="created")
        expires = parse_time(_req(data, "expires", str, where), what="expires")
        if expires <= created:
            raise Malformed("expires must be later than created")
        raw_files = _req(data, "files", dict, where)
        files: dict[str, FileEntry] = {}
        for file_name, entry in raw_files.items():
            validate_file_name(file_name)
            if file_name in RESERVED_NAMES:
                raise Malformed(f"files must not list {file_name}")
            files[file_name] = FileEntry.from_dict(entry, where=f"files[{file_name!r}]")
        model = validate_file_name(_req(data, "model", str, where))
        if model not in files:
            raise Malformed(f"model file {model!r} is not listed in files")
        display = _opt(data, "display_version", str, where)
        tools = _opt(data, "tools", dict, where) or {}
        if not all(isinstance(v, str) for v in tools.values()):
            raise Malformed("tools must map names to version strings")
        return cls(
            format=fmt,
            name=name,
            version=version,
            display_version=display,
            created=created,
            expires=expires,
            runtime=runtime,
            model=model,
            inputs=tuple(
                TensorSpec.from_dict(t, where=f"inputs[{i}]")
                for i, t in enumerate(_opt(data, "inputs", list, where) or [])
            ),
            outputs=tuple(
                TensorSpec.from_dict(t, where=f"outputs[{i}]")
                for i, t in enumerate(_opt(data, "outputs", list, where) or [])
            ),
            targets=Targets.from_dict(data.get("targets") or {}),
            files=files,
            tools=dict(tools),
            extra=_extra(data, cls._KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            format=self.format,
            name=self.name,
            version=self.version,
            created=format_time(self.created),
            expires=format_time(self.expires),
            runtime=self.runtime,
            model=self.model,
            inputs=[t.to_dict() for t in self.inputs],
            outputs=[t.to_dict() for t in self.outputs],
            targets=self.targets.to_dict(),
            files={name: entry.to_dict() for name, entry in sorted(self.files.items())},
            tools=dict(self.tools),
        )
        if self.display_version is not None:
            out["display_version"] = self.display_version
        return out

    def to_bytes(self) -> bytes:
        return dumps(self.to_dict())
