"""The agent's event log: what happened to the device's model, in order, on disk.

``STATE/events.jsonl`` holds one JSON object per line::

    {"schema": 1, "seq": 42, "time": "2026-05-01T10:00:00.123Z", "type": "rolled-back",
     "bundle": "digits", "version": 7, "reason": "health-latency", "message": "p95 ..."}

Events are the device's audit trail and the feed that telemetry later publishes over MQTT, so:

* ``seq`` increases by one per event and continues across restarts (a subscriber detects gaps
  and duplicates with it);
* each line is written with one ``write`` on an ``O_APPEND`` descriptor and fsynced before
  :meth:`EventLog.append` returns, so an event the agent acted on is not lost with the power;
* a line torn by a crash is cut off when the log is reopened, so the file always parses;
* the file is bounded: past ``max_bytes`` it is rotated to ``events.jsonl.1`` (…``.N``).

Writing an event never fails the operation it describes: a full disk or an I/O error is logged
and counted in :attr:`EventLog.dropped`, because refusing an update or a rollback for want of a
log line would be the wrong trade.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from edgekit.fsutil import fsync_dir

__all__ = ["EVENT_SCHEMA", "EventLog", "EventType"]

logger = logging.getLogger(__name__)

#: Version of the event object's layout (consumers check it, see docs/agent.md).
EVENT_SCHEMA = 1

#: A line longer than this is a bug (events are small); it is refused rather than written.
_MAX_LINE = 16 * 1024


class EventType(str, Enum):
    """Every event the agent writes; the values are the stable wire names."""

    AGENT_STARTED = "agent-started"
    AGENT_STOPPED = "agent-stopped"
    RECOVERED = "recovered"  # a crash left an update unfinished; what restart did about it
    BOOT_FALLBACK = "boot-fallback"  # the active model failed to load; serving the previous
    BOOT_FAILED = "boot-failed"  # no model could be loaded
    UPDATE_STARTED = "update-started"
    UPDATE_REFUSED = "update-refused"  # download, verification, self-test or load failed
    STAGED = "staged"  # verified and installed into its slot
    SELFTEST_PASSED = "selftest-passed"
    SELFTEST_SKIPPED = "selftest-skipped"  # no golden set and require_golden = false
    ACTIVATED = "activated"  # serving; the health window is open
    HEALTH_RESUMED = "health-resumed"  # a clean restart continues an open health window
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    SLOT_REMOVED = "slot-removed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    """Append-only, fsynced, rotated JSON-lines log with a persistent sequence number."""

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 1024 * 1024, keep: int = 3
    ) -> None:
        if max_bytes < 1024 or keep < 1:
            raise ValueError("need max_bytes >= 1024 and keep >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.dropped = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._open()
        self._seq = self._last_seq()

    # ------------------------------------------------------------------ writing

    @property
    def last_seq(self) -> int:
        """Sequence number of the last event written (0 before the first)."""
        return self._seq

    def append(
        self,
        kind: EventType,
        *,
        bundle: str | None = None,
        version: int | None = None,
        reason: str | None = None,
        message: str | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """Write one event durably and return it (as written, or as it would have been)."""
        with self._lock:
            event: dict[str, Any] = {
                "schema": EVENT_SCHEMA,
                "seq": self._seq + 1,
                "time": _now(),
                "type": kind.value,
                "bundle": bundle,
                "version": version,
                "reason": reason,
                "message": message,
            }
            event.update({k: v for k, v in details.items() if v is not None})
            line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode("utf-8")
            if len(line) > _MAX_LINE:
                raise ValueError(f"event {kind.value} is {len(line)} bytes (limit {_MAX_LINE})")
            try:
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._write(line)
            except OSError as exc:
                self.dropped += 1
                logger.warning(
                    "cannot write event %s to %s: %s", kind.value, self.path, exc.strerror
                )
                return event
            self._seq += 1
            logger.info("event %s", line.decode("utf-8").rstrip())
            return event

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        before = self._size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write (disk full?)")
            os.fsync(self._fd)
        except OSError:
            # Cut a partial line off now, or the next event would be glued to it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            raise
        self._size = before + len(line)

    def _rotate(self) -> None:
        self._close_fd()
        for index in range(self.keep - 1, 0, -1):
            older = self._rotated(index)
            if older.exists():
                os.replace(older, self._rotated(index + 1))
        os.replace(self.path, self._rotated(1))
        fsync_dir(self.path.parent)
        self._open()

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            self._size = _cut_torn_tail(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        rotated = [self._rotated(i) for i in range(self.keep, 0, -1)]
        return [p for p in (*rotated, self.path) if p.exists()]

    def read(self, *, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Events with ``seq > since``, oldest first; at most the last ``limit`` of them."""
        return read_events(self.path, keep=self.keep, since=since, limit=limit)

    def _last_seq(self) -> int:
        for path in reversed(self.files()):
            for event in reversed(_parse_file(path)):
                seq = event.get("seq")
                if isinstance(seq, int):
                    return seq
        return 0


def read_events(
    path: str | os.PathLike[str], *, keep: int = 3, since: int = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    """Read the event log at ``path`` (and its rotated files) without opening it for writing.

    Lines that do not parse (a torn tail not yet repaired by a writer) are skipped.
    """
    base = Path(path)
    files = [base.with_name(f"{base.name}.{i}") for i in range(keep, 0, -1)] + [base]
    events: list[dict[str, Any]] = []
    for file in files:
        if file.exists():
            events.extend(
                e for e in _parse_file(file) if isinstance(e.get("seq"), int) and e["seq"] > since
            )
    return events[-limit:] if limit is not None and limit > 0 else events


def _parse_file(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError:
        return []
    events: list[dict[str, Any]] = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events


def _cut_torn_tail(fd: int) -> int:
    """Truncate after the last newline if a crash left half a line; return the size."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    tail_start = max(0, size - _MAX_LINE - 1)
    tail = os.pread(fd, size - tail_start, tail_start)
    if tail.endswith(b"\n"):
        return size
    cut = tail.rfind(b"\n")
    new_size = tail_start + cut + 1 if cut >= 0 else tail_start
    os.ftruncate(fd, new_size)
    os.fsync(fd)
    logger.warning("cut a torn line (%d bytes) off the end of the event log", size - new_size)
    return new_size
