"""The device registry's read side and operator labels: who is there, what they run, and
which devices a target selector picks.

Ingest (``edgekit.fleet.ingest``) writes what devices say about themselves; this module answers
questions about it and holds the one definition of a device's *labels* (operator groups and
tags merged with those the device declares in its ``status`` message), which both the REST API
and the rollout engine use, so a target means the same devices in a listing and in a rollout.
"""

from __future__ import annotations

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


def labels_of(device: Device) -> dict[str, Any]:
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


def device_summary(device: Device, *, now: float, stale_after_s: float) -> dict[str, Any]:
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
        now = time.time()
        with self.db.read() as session:
            query = sa.select(Device).order_by(Device.fleet, Device.device)
            if fleet is not None:
                query = query.where(Device.fleet == fleet)
            if online is not None:
                query = query.where(Device.online == online)
            devices: Iterable[Device] = session.scalars(query)
            if target is not None:
                devices = [d for d in devices if target.matches(labels_of(d))]
            else:
                devices = list(devices)
            chosen = list(devices)[offset : offset + limit]
            return [device_summary(d, now=now, stale_after_s=self.stale_after_s) for d in chosen]

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
