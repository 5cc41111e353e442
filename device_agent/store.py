"""The agent's state directory: model slots, the ``state.json`` pointer file and its lock.

Layout (``STATE`` is ``/var/lib/edgekit`` on a device)::

    STATE/state.json        which slot is active, previous, staging; the anti-rollback floor;
                            the update in progress (see :class:`State`)
    STATE/slots/<id>/       one installed bundle each: manifest.json, signatures.json, files
    STATE/events.jsonl      the event log (device_agent.events)
    STATE/trust.json        the trust anchor (unless the config points elsewhere)
    STATE/agent.lock        held by the one agent process that may change the directory
    STATE/downloads/        bundles being fetched from a URL

Slots are written once, by :func:`edgekit.verify.verify_bundle` with ``install_to`` (a private
``.partial`` directory renamed into place), and never modified. ``state.json`` is the only
mutable file that matters and is only ever replaced atomically, so at every instant the
directory describes exactly one consistent state; anything else found at start-up (a
``.partial`` directory, a ``.tmp`` file, a slot no state refers to) is a leftover of a killed
writer and is removed. The decisions about *which* state to move to live in
:mod:`device_agent.updates`; this module only stores them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from device_agent.errors import StateError, StateLocked
from edgekit.errors import EdgekitError, HashMismatch, MissingFile
from edgekit.fsutil import atomic_write_bytes, remove_leftovers
from edgekit.manifest import MANIFEST_NAME, Manifest

__all__ = [
    "STATE_SCHEMA",
    "Pending",
    "Phase",
    "State",
    "StateLock",
    "Store",
]

#: Layout version of ``state.json``. A newer file is refused rather than misread: an agent
#: downgrade must not reinterpret (and then overwrite) what a newer agent wrote.
STATE_SCHEMA = 1

_SLOT_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
_HASH_CHUNK = 1024 * 1024


class Phase(str, Enum):
    """Where an unfinished update stands; persisted so a restart knows what to undo."""

    DOWNLOAD = "download"  # fetching the bundle from a URL
    STAGING = "staging"  # verifying and extracting into a new slot
    SELFTEST = "selftest"  # staged; running the golden self-test on this device
    HEALTH = "health"  # serving; on probation until the health window passes


@dataclass(frozen=True, kw_only=True)
class Pending:
    """The update in progress, if any.

    ``restore_active``/``restore_previous`` are the committed pointers to go back to if the
    update does not commit; ``from_slot`` is the slot that was *serving* when the candidate was
    activated (the model proven on this device: it becomes ``previous`` on commit). They differ
    only when the device booted on its previous model because the active one failed to load.
    ``resume`` is set by a clean shutdown during the health window: the next start continues
    the window instead of treating the stop as a crash.
    """

    phase: Phase
    slot: str
    source: str
    started: str
    name: str | None = None
    version: int | None = None
    restore_active: str | None = None
    restore_previous: str | None = None
    from_slot: str | None = None
    resume: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset(
        {
            "phase",
            "slot",
            "source",
            "started",
            "name",
            "version",
            "restore_active",
            "restore_previous",
            "from_slot",
            "resume",
        }
    )

    def slots(self) -> set[str]:
        """Every slot this update may still need."""
        named = (self.slot, self.restore_active, self.restore_previous, self.from_slot)
        return {s for s in named if s is not None}

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            phase=self.phase.value,
            slot=self.slot,
            source=self.source,
            started=self.started,
            name=self.name,
            version=self.version,
            restore_active=self.restore_active,
            restore_previous=self.restore_previous,
            from_slot=self.from_slot,
            resume=self.resume,
        )
        return out

    @classmethod
    def from_dict(cls, data: object) -> Pending:
        if not isinstance(data, dict):
            raise StateError("state.json: pending must be an object")
        try:
            phase = Phase(data.get("phase"))
        except ValueError:
            raise StateError(f"state.json: unknown update phase {data.get('phase')!r}") from None
        return cls(
            phase=phase,
            slot=_slot(data.get("slot"), "pending.slot", required=True) or "",
            source=_text(data.get("source"), "pending.source"),
            started=_text(data.get("started"), "pending.started"),
            name=_opt_text(data.get("name"), "pending.name"),
            version=_opt_int(data.get("version"), "pending.version"),
            restore_active=_slot(data.get("restore_active"), "pending.restore_active"),
            restore_previous=_slot(data.get("restore_previous"), "pending.restore_previous"),
            from_slot=_slot(data.get("from_slot"), "pending.from_slot"),
            resume=data.get("resume") is True,
            extra={k: v for k, v in data.items() if k not in cls._KNOWN},
        )


@dataclass(frozen=True, kw_only=True)
class State:
    """The content of ``state.json``.

    ``installed_version`` is the anti-rollback floor: the highest bundle version ever
    committed on this device. It only grows (a manual rollback to the previous slot does not
    lower it), and :func:`~edgekit.verify.verify_bundle` refuses any bundle at or below it.
    """

    active: str | None = None
    previous: str | None = None
    installed_version: int | None = None
    pending: Pending | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KNOWN = frozenset({"schema", "active", "previous", "staging", "installed_version", "pending"})

    @property
    def staging(self) -> str | None:
        """The slot being verified or self-tested, if an update is at that stage."""
        pending = self.pending
        if pending is not None and pending.phase in (Phase.STAGING, Phase.SELFTEST):
            return pending.slot
        return None

    def referenced(self) -> set[str]:
        """Slots this state needs; every other slot is garbage."""
        refs = {s for s in (self.active, self.previous) if s is not None}
        if self.pending is not None:
            refs |= self.pending.slots()
        return refs

    def with_floor(self, version: int) -> State:
        """This state with the anti-rollback floor raised to ``version`` (never lowered)."""
        floor = self.installed_version
        return replace(self, installed_version=version if floor is None else max(floor, version))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            schema=STATE_SCHEMA,
            active=self.active,
            previous=self.previous,
            staging=self.staging,
            installed_version=self.installed_version,
            pending=None if self.pending is None else self.pending.to_dict(),
        )
        return out

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> State:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateError(f"state.json is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise StateError("state.json must hold a JSON object")
        schema = doc.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise StateError("state.json has no integer schema")
        if schema > STATE_SCHEMA:
            raise StateError(
                f"state.json has schema {schema}, newer than this agent's {STATE_SCHEMA}; "
                "it was written by a newer edgekit-agent"
            )
        pending = doc.get("pending")
        return cls(
            active=_slot(doc.get("active"), "active"),
            previous=_slot(doc.get("previous"), "previous"),
            installed_version=_opt_int(doc.get("installed_version"), "installed_version"),
            pending=None if pending is None else Pending.from_dict(pending),
            extra={k: v for k, v in doc.items() if k not in cls._KNOWN},
        )


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise StateError(f"state.json: {where} must be a string")
    return value


def _opt_text(value: object, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _opt_int(value: object, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StateError(f"state.json: {where} must be a non-negative integer")
    return value


def _slot(value: object, where: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _SLOT_ID.fullmatch(value):
        raise StateError(f"state.json: {where} is not a slot id: {value!r}")
    return value


class StateLock:
    """An exclusive ``flock`` on ``STATE/agent.lock`` for the life of one agent process.

    Two processes changing slots and ``state.json`` at once would each be atomic and still
    lose the other's update, so the running service owns the directory and the CLI's
    ``install``/``rollback`` refuse while it runs. The kernel drops the lock when the process
    dies, so a crash never leaves the directory locked.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd: int | None = os.open(path, flags, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StateLocked(
                    f"{path.parent} is in use by another edgekit-agent{holder}; stop the "
                    "service first (systemctl stop edgekit-agent) or use its HTTP API"
                ) from None
            raise StateError(f"cannot lock {path}: {exc.strerror}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _holder(self) -> str:
        assert self._fd is not None
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(self._fd, 32, 0).decode().strip())
            return f" (pid {pid})"
        return ""

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # a clean stop leaves no pid for `status` to report
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class Store:
    """Paths and durable reads/writes under one state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.state_path = self.root / "state.json"
        self.slots_dir = self.root / "slots"
        self.downloads_dir = self.root / "downloads"
        self.events_path = self.root / "events.jsonl"
        self.lock_path = self.root / "agent.lock"

    def prepare(self) -> None:
        """Create the directories (the first start of a fresh device)."""
        try:
            for folder in (self.root, self.slots_dir, self.downloads_dir):
                folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.root}: {exc}") from None

    def lock(self) -> StateLock:
        return StateLock(self.lock_path)

    # ------------------------------------------------------------------ state.json

    def load(self) -> State:
        """The persisted state; a device without ``state.json`` has no model yet."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc.strerror}") from None
        return State.from_bytes(data)

    def save(self, state: State) -> None:
        """Replace ``state.json`` atomically and durably (old or new after a power cut)."""
        try:
            atomic_write_bytes(self.state_path, state.to_bytes())
        except OSError as exc:
            raise StateError(f"cannot write {self.state_path}: {exc.strerror}") from None

    # ------------------------------------------------------------------ slots

    def new_slot_id(self) -> str:
        """A fresh slot name: sortable by install time, unique by its random suffix."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"{stamp}-{secrets.token_hex(4)}"

    def slot_dir(self, slot: str) -> Path:
        if not _SLOT_ID.fullmatch(slot):
            raise ValueError(f"not a slot id: {slot!r}")
        return self.slots_dir / slot

    def read_manifest(self, slot: str) -> Manifest:
        """The manifest stored in ``slot`` (verified when the slot was installed)."""
        path = self.slot_dir(slot) / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MissingFile(f"slot {slot}: cannot read {MANIFEST_NAME}: {exc.strerror}") from None
        return Manifest.from_bytes(data)

    def check_files(self, slot: str, manifest: Manifest) -> None:
        """Re-hash every file of ``slot`` against its manifest.

        Slots are never written after install, so a difference is storage corruption (worn SD
        cards are the usual cause) or tampering; either way the model must not be served.
        """
        folder = self.slot_dir(slot)
        for name, entry in sorted(manifest.files.items()):
            digest = hashlib.sha256()
            size = 0
            try:
                with open(folder / name, "rb") as handle:
                    while chunk := handle.read(_HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except OSError as exc:
                raise MissingFile(f"slot {slot}: cannot read {name}: {exc.strerror}") from None
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise HashMismatch(
                    f"slot {slot}: {name} no longer matches its manifest (storage corruption?)"
                )

    def describe(self, slot: str | None) -> dict[str, Any] | None:
        """``{"slot", "name", "version", ...}`` for status output; never raises."""
        if slot is None:
            return None
        info: dict[str, Any] = {"slot": slot}
        try:
            manifest = self.read_manifest(slot)
        except (EdgekitError, ValueError) as exc:
            info["error"] = str(exc)
            return info
        info.update(
            name=manifest.name,
            version=manifest.version,
            display_version=manifest.display_version,
            runtime=manifest.runtime,
            model=manifest.model,
            sha256=manifest.files[manifest.model].sha256,
        )
        return info

    def slots(self) -> list[str]:
        """Installed slot ids, oldest first."""
        if not self.slots_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.slots_dir.iterdir() if _SLOT_ID.fullmatch(p.name) and p.is_dir()
        )

    def remove_slot(self, slot: str) -> None:
        shutil.rmtree(self.slot_dir(slot), ignore_errors=True)

    def collect_garbage(self, state: State) -> list[str]:
        """Remove every slot ``state`` does not refer to; return their ids."""
        keep = state.referenced()
        removed = [slot for slot in self.slots() if slot not in keep]
        for slot in removed:
            self.remove_slot(slot)
        return removed

    def remove_leftovers(self) -> list[Path]:
        """Temp files and ``.partial`` directories of writers killed mid-write."""
        return [*remove_leftovers(self.slots_dir), *remove_leftovers(self.root)]

    def clear_downloads(self) -> None:
        if self.downloads_dir.is_dir():
            for path in self.downloads_dir.iterdir():
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateLock]:
        lock = self.lock()
        try:
            yield lock
        finally:
            lock.release()
