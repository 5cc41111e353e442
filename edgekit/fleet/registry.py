"""The device registry's read side and operator labels: who is there, what they run, and
which devices a target selector picks.

Ingest (``edgekit.fleet.ingest``) writes what devices say about themselves; this module answers
questions about it and holds the one definition of a device's *labels* (operator groups and
tags merged with those the device declares in its ``status`` message), which both the REST API
and the rollout engine use, so a target means the same devices in a listing and in a rollout.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgekit.fleet.db import AuditEntry, Database, Device, DeviceEvent, TelemetrySample
from edgekit.fleet.errors import NotFound, SpecError
from edgekit.fleet.spec import Selector
from edgekit.protocol import ProtocolError, validate_id

__all__ = [
    "Registry",
    "clean_groups",
    "clean_tags",
    "declared_labels",
    "device_summary",
    "labels_of",
    "matching_devices",
]

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_MAX_LABELS = 64

#: A device as the listing reads it: an ORM object, or a row of :data:`_LISTED` columns
#: (reading plain rows instead of ORM objects is most of what makes a 10,000-device listing
#: fast enough; both answer the same attribute names).
DeviceLike = Device | sa.Row[Any]
_D = Device.__table__.c
_LABEL_JSON = frozenset({"groups", "tags", "declared_groups", "declared_tags"})


@functools.lru_cache(maxsize=4096)
def _parse_labels(text: str | None) -> Any:
    """Label JSON, parsed once per distinct text: across a fleet the same few label sets
    repeat, and decoding 40,000 JSON values was most of a 10,000-device listing. Callers
    copy what they return (``device_summary`` does), so the shared value is never changed."""
    return None if text is None else json.loads(text)


class _CachedLabels(sa.types.TypeDecorator[Any]):
    """A label column read as text and parsed through :func:`_parse_labels`."""

    impl = sa.Text
    cache_ok = True

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return _parse_labels(value)


def _column(name: str) -> sa.ColumnElement[Any]:
    if name in _LABEL_JSON:
        return sa.type_coerce(sa.cast(_D[name], sa.Text), _CachedLabels()).label(name)
    return _D[name]


#: The columns a listing shows (``device_summary``), and those a target selector matches.
_LISTED = [
    _column(name)
    for name in (
        "id", "fleet", "device", "online", "status_reason", "first_seen", "last_seen",
        "agent_version", "groups", "tags", "declared_groups", "declared_tags",
        "current_name", "current_version", "current_display", "previous_name",
        "previous_version", "update_state", "last_update_rollout", "last_update_outcome",
        "last_update_reason", "last_update_version", "desired_rollout", "desired_published",
        "telemetry_at", "tel_model_name", "tel_model_version", "inf_count", "inf_errors",
        "inf_rejected", "p50_ms", "p95_ms", "p99_ms", "drift_psi", "self_test_ok",
        "cpu_percent", "temperature_c", "rss_bytes",
    )
]  # fmt: skip
_LABEL_COLUMNS = [
    _column(name)
    for name in (
        "id", "device", "groups", "tags", "declared_groups", "declared_tags",
        "current_name", "current_version",
    )
]  # fmt: skip


def clean_groups(value: object, *, what: str = "groups") -> list[str]:
    """A sorted, de-duplicated list of group names (the JSON column stores exactly this)."""
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{what} must be a list of names")
    groups = set()
    for item in value:
        if not isinstance(item, str) or not _LABEL.fullmatch(item):
            raise SpecError(f"{what}: {item!r} is not a name of [A-Za-z0-9._:/-] (max 64)")
        groups.add(item)
    if len(groups) > _MAX_LABELS:
        raise SpecError(f"{what}: at most {_MAX_LABELS} groups")
    return sorted(groups)


def clean_tags(value: object, *, what: str = "tags") -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be an object of name -> value")
    if len(value) > _MAX_LABELS:
        raise SpecError(f"{what}: at most {_MAX_LABELS} tags")
    tags = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL.fullmatch(key):
            raise SpecError(f"{what}: {key!r} is not a name of [A-Za-z0-9._:/-] (max 64)")
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise SpecError(f"{what}.{key} must be a string or a number")
        text = str(item)
        if len(text) > 128 or any(ord(c) < 32 for c in text):
            raise SpecError(f"{what}.{key} must be one line of at most 128 characters")
        tags[key] = text
    return dict(sorted(tags.items()))


def declared_labels(extra: Mapping[str, Any]) -> tuple[dict[str, str], list[str]] | None:
    """Tags and groups a device declares in its ``status`` message (``extra.tags``,
    ``extra.groups``); ``None`` when it declares none or declares them malformed (a bad
    label must not take the whole status message down with it)."""
    if "tags" not in extra and "groups" not in extra:
        return None
    try:
        return clean_tags(extra.get("tags", {})), clean_groups(extra.get("groups", []))
    except SpecError:
        return None


def labels_of(device: DeviceLike) -> dict[str, Any]:
    """What a :class:`~edgekit.fleet.spec.Selector` matches against. Operator labels win
    over declared ones with the same tag name; groups are the union of both."""
    labels: dict[str, Any] = {
        "device": device.device,
        "groups": sorted({*(device.declared_groups or ()), *(device.groups or ())}),
        "model": device.current_name,
        "version": device.current_version,
    }
    for key, value in {**(device.declared_tags or {}), **(device.tags or {})}.items():
        labels[f"tag.{key}"] = value
    return labels


def matching_devices(session: Session, fleet: str, selector: Selector) -> list[Device]:
    """The devices of ``fleet`` that ``selector`` picks, in id order."""
    rows = session.scalars(sa.select(Device).where(Device.fleet == fleet).order_by(Device.id))
    return [device for device in rows if selector.matches(labels_of(device))]


def _model(name: str | None, version: int | None, display: str | None = None) -> Any:
    if name is None:
        return None
    return {"name": name, "version": version, "display_version": display}


def device_summary(device: DeviceLike, *, now: float, stale_after_s: float) -> dict[str, Any]:
    """The JSON form of a device in listings (``stale``: says online but silent too long)."""
    labels = labels_of(device)
    return {
        "fleet": device.fleet,
        "device": device.device,
        "online": device.online,
        "stale": device.online and now - device.last_seen > stale_after_s,
        "status_reason": device.status_reason,
        "first_seen": device.first_seen,
        "last_seen": device.last_seen,
        "agent_version": device.agent_version,
        "groups": labels["groups"],
        "tags": {k[4:]: v for k, v in labels.items() if k.startswith("tag.")},
        "operator_groups": list(device.groups or ()),
        "operator_tags": dict(device.tags or {}),
        "current": _model(device.current_name, device.current_version, device.current_display),
        "previous": _model(device.previous_name, device.previous_version),
        "update_state": device.update_state,
        "last_update": None
        if device.last_update_rollout is None
        else {
            "rollout_id": device.last_update_rollout,
            "outcome": device.last_update_outcome,
            "reason": device.last_update_reason,
            "version": device.last_update_version,
        },
        "desired_rollout": device.desired_rollout,
        "desired_published": device.desired_published,
        "telemetry": None
        if device.telemetry_at is None
        else {
            "at": device.telemetry_at,
            "model": _model(device.tel_model_name, device.tel_model_version),
            "inferences": device.inf_count,
            "errors": device.inf_errors,
            "rejected": device.inf_rejected,
            "p50_ms": device.p50_ms,
            "p95_ms": device.p95_ms,
            "p99_ms": device.p99_ms,
            "drift_psi": device.drift_psi,
            "self_test_ok": device.self_test_ok,
            "cpu_percent": device.cpu_percent,
            "temperature_c": device.temperature_c,
            "rss_bytes": device.rss_bytes,
        },
    }


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    online: int
    offline: int
    models: list[tuple[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "online": self.online,
            "offline": self.offline,
            "models": [{"model": model, "devices": count} for model, count in self.models],
        }


class Registry:
    """Queries and label changes over the device registry."""

    def __init__(self, db: Database, *, stale_after_s: float = 120.0) -> None:
        self.db = db
        self.stale_after_s = stale_after_s

    def list_devices(
        self,
        *,
        fleet: str | None = None,
        target: Selector | None = None,
        online: bool | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Devices in ``(fleet, device)`` order, a page at a time (``limit``, ``offset``).

        Fleet and presence are filtered, ordered and paged by the database (the unique index on
        ``(fleet, device)`` serves the order); a target selector, which matches labels held as
        JSON, is applied to the label columns alone, and only the page it selects is read in
        full.
        """
        now = time.time()
        with self.db.read() as session:
            conditions = []
            if fleet is not None:
                conditions.append(_D.fleet == fleet)
            if online is not None:
                conditions.append(_D.online == online)
            order = (_D.fleet, _D.device)
            if target is None:
                query = sa.select(*_LISTED).where(*conditions).order_by(*order)
                rows: Iterable[sa.Row[Any]] = session.execute(query.limit(limit).offset(offset))
            else:
                labelled = session.execute(
                    sa.select(*_LABEL_COLUMNS).where(*conditions).order_by(*order)
                )
                chosen = [r.id for r in labelled if target.matches(labels_of(r))]
                page = chosen[offset : offset + limit]
                rows = (
                    session.execute(sa.select(*_LISTED).where(_D.id.in_(page)).order_by(*order))
                    if page
                    else []
                )
            return [device_summary(r, now=now, stale_after_s=self.stale_after_s) for r in rows]

    def _find(self, session: Session, fleet: str, device: str) -> Device:
        found = session.scalar(
            sa.select(Device).where(Device.fleet == fleet, Device.device == device)
        )
        if found is None:
            raise NotFound(f"no device {device!r} in fleet {fleet!r}")
        return found

    def get_device(
        self, fleet: str, device: str, *, events: int = 20, samples: int = 30
    ) -> dict[str, Any]:
        """A device with its recent events and telemetry history."""
        with self.db.read() as session:
            found = self._find(session, fleet, device)
            result = device_summary(found, now=time.time(), stale_after_s=self.stale_after_s)
            recent = session.scalars(
                sa.select(DeviceEvent)
                .where(DeviceEvent.device_id == found.id)
                .order_by(DeviceEvent.id.desc())
                .limit(events)
            )
            result["events"] = [
                {
                    "received_at": e.received_at,
                    "ts": e.ts,
                    "event": e.event,
                    "severity": e.severity,
                    "message": e.message,
                    "reason": e.reason,
                    "rollout_id": e.rollout_id,
                    "data": e.data,
                }
                for e in recent
            ]
            history = session.scalars(
                sa.select(TelemetrySample)
                .where(TelemetrySample.device_id == found.id)
                .order_by(TelemetrySample.received_at.desc())
                .limit(samples)
            )
            result["history"] = [
                {
                    "at": s.received_at,
                    "model": s.model,
                    "inferences": s.inferences,
                    "errors": s.errors,
                    "p95_ms": s.p95_ms,
                    "drift_psi": s.drift_psi,
                    "cpu_percent": s.cpu_percent,
                    "temperature_c": s.temperature_c,
                }
                for s in history
            ]
            return result

    def set_labels(
        self,
        fleet: str,
        device: str,
        *,
        actor: str,
        groups: Sequence[str] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Replace the operator's groups and/or tags of a device (recorded in the audit log).

        A device the controller has not heard from yet is registered here, so that it can be
        labelled (and targeted) before it first connects.
        """
        try:
            validate_id(fleet, what="fleet id")
            validate_id(device, what="device id")
        except ProtocolError as exc:
            raise SpecError(exc.message) from None
        new_groups = None if groups is None else clean_groups(groups)
        new_tags = None if tags is None else clean_tags(tags)
        now = time.time()
        with self.db.write() as session:
            found = session.scalar(
                sa.select(Device).where(Device.fleet == fleet, Device.device == device)
            )
            if found is None:
                found = Device(fleet=fleet, device=device, first_seen=now, last_seen=0.0)
                session.add(found)
            if new_groups is not None:
                found.groups = new_groups
            if new_tags is not None:
                found.tags = new_tags
            session.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="device.labels",
                    device=f"{fleet}/{device}",
                    detail={"groups": new_groups, "tags": new_tags},
                )
            )
            session.flush()
            return device_summary(found, now=now, stale_after_s=self.stale_after_s)

    def summary(self, *, fleet: str | None = None) -> FleetSummary:
        with self.db.read() as session:
            query = sa.select(
                Device.online, Device.current_name, Device.current_version, sa.func.count()
            ).group_by(Device.online, Device.current_name, Device.current_version)
            if fleet is not None:
                query = query.where(Device.fleet == fleet)
            online = offline = 0
            models: Counter[str] = Counter()
            for is_online, name, version, count in session.execute(query):
                if is_online:
                    online += count
                else:
                    offline += count
                models["(none)" if name is None else f"{name}:{version}"] += count
            return FleetSummary(online + offline, online, offline, sorted(models.items()))
