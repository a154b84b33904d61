"""Per-destination policy: ``GET/PATCH /api/storage/destinations/{destId}/policy``.

A destination's schedule (scan and orphan-cleanup intervals, 0 = off), its retention
window, its orphan-cleanup budget, its two-phase orphan confirmation (scans and hours,
:mod:`tasks.sightings`) and whether its scheduled cleanups wait for an
approval (:class:`db.models.DestinationPolicy`, :mod:`tasks.policy`). Only the platform
administrator reads or changes it (403 for anyone else who reaches the destination;
404, as everywhere, for anyone who does not).

The PATCH body follows JSON merge-patch: a field given is set, ``null`` resets it to
the service's setting, a field left out is left alone. Each field is declared once in
:data:`FIELDS`, which both checks a body and writes its OpenAPI schema
(:func:`policy_schemas`). Every field is checked before anything is written: one bad
field is a 400 naming it and what is allowed, and nothing changes. Changing an interval
reschedules that schedule (:func:`tasks.policy.rescheduled`); beat's next tick reads the
new policy from the database (no restart). Each change is one audit log line
(``ocore.api.audit``: who, which field, old and new value).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from api.auth import load_destination, require_platform_admin
from api.context import db, settings
from api.errors import ApiError
from api.params import json_body, parse_uuid
from core.settings import MAX_RETENTION_DAYS, Settings
from db.models import BackupDestination, DestinationPolicy
from db.types import utcnow
from tasks.floor import MAX_MIN_BACKUPS, destination_floor
from tasks.policy import (
    MAX_INTERVAL_SECONDS,
    MIN_INTERVAL_SECONDS,
    cleanup_interval,
    effective_budget,
    new_rng,
    rescheduled,
    scan_interval,
)
from tasks.scan import InvalidRetention, resolve_retention
from tasks.sightings import effective_confirmation
from tasks.trash import MAX_TRASH_DAYS, effective_trash_days

log = logging.getLogger(__name__)
audit_log = logging.getLogger("ocore.api.audit")
bp = Blueprint("policy", __name__)

J = dict[str, Any]
#: the largest count a budget may hold (the columns are 64-bit integers)
MAX_COUNT = 2**63 - 1
#: two-phase orphan confirmation (SAFETY rule 6a): the ranges of the settings
MAX_CONFIRM_SCANS = 100
MAX_CONFIRM_HOURS = 8760


def _integer(value: Any) -> int | None:
    """``value`` as a JSON integer (144.0 counts, as in JSON Schema), else None (a
    bool, a fraction, a string...)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value if type(value) is int else None


def _interval(value: Any) -> int | None:
    number = _integer(value)
    if number == 0 or (
        number is not None and MIN_INTERVAL_SECONDS <= number <= MAX_INTERVAL_SECONDS
    ):
        return number
    return None


def _days(value: Any) -> int | None:
    number = _integer(value)
    return number if number is not None and 1 <= number <= MAX_RETENTION_DAYS else None


def _count(value: Any) -> int | None:
    number = _integer(value)
    return number if number is not None and 1 <= number <= MAX_COUNT else None


def _share(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    share = float(value)
    return share if math.isfinite(share) and 0 < share <= 1 else None


def _scans(value: Any) -> int | None:
    number = _integer(value)
    return number if number is not None and 1 <= number <= MAX_CONFIRM_SCANS else None


def _hours(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    hours = float(value)
    return hours if math.isfinite(hours) and 0 <= hours <= MAX_CONFIRM_HOURS else None


def _min_backups(value: Any) -> int | None:
    number = _integer(value)
    return number if number is not None and 0 <= number <= MAX_MIN_BACKUPS else None


def _trash_days(value: Any) -> int | None:
    number = _integer(value)
    return number if number is not None and 0 <= number <= MAX_TRASH_DAYS else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class PolicyField:
    """One field of a policy: its JSON Schema when not null, what a 400 says is allowed,
    and its check (the value, or None when it is not allowed)."""

    name: str
    schema: J
    allowed: str
    check: Callable[[Any], Any]
    #: what ``null`` means (the field's default)
    default: str
    #: what ``null`` stores (None: the column is null, the setting applies)
    reset: Any = None

    def parse(self, value: Any) -> Any:
        """The value to store (``null``: :attr:`reset`), or a 400 naming the field."""
        if value is None:
            return self.reset
        checked = self.check(value)
        if checked is None:
            shown = json.dumps(value)[:100]
            raise ApiError(
                400,
                "bad_request",
                f"{self.name} must be {self.allowed}, or null for {self.default} (got {shown}); "
                "nothing was changed",
                extra={"field": self.name},
            )
        return checked

    def body_schema(self) -> J:
        return {
            "anyOf": [self.schema, {"type": "null"}],
            "description": f"{self.allowed}; null: {self.default}",
        }


def _interval_field(name: str, what: str, setting: str) -> PolicyField:
    return PolicyField(
        name,
        {
            "anyOf": [
                {"type": "integer", "const": 0},
                {
                    "type": "integer",
                    "minimum": MIN_INTERVAL_SECONDS,
                    "maximum": MAX_INTERVAL_SECONDS,
                },
            ]
        },
        f"0 (no scheduled {what}) or a whole number of seconds from {MIN_INTERVAL_SECONDS} "
        f"to {MAX_INTERVAL_SECONDS}",
        _interval,
        f"the setting {setting}",
    )


#: the PATCH body's fields, in the order of the API's answer
FIELDS: tuple[PolicyField, ...] = (
    _interval_field("scan_interval_seconds", "scans", "OCORE_SCAN_INTERVAL"),
    _interval_field("cleanup_interval_seconds", "orphan cleanups", "OCORE_CLEANUP_INTERVAL"),
    PolicyField(
        "retention_days",
        {"type": "integer", "minimum": 1, "maximum": MAX_RETENTION_DAYS},
        f"a whole number of days from 1 to {MAX_RETENTION_DAYS} (a window below one day is "
        "refused, never clamped)",
        _days,
        "the setting OCORE_RETENTION_DAYS",
    ),
    PolicyField(
        "cleanup_max_files",
        {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
        "a whole number of files, at least 1",
        _count,
        "the setting OCORE_CLEANUP_MAX_FILES",
    ),
    PolicyField(
        "cleanup_max_bytes",
        {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
        "a whole number of bytes, at least 1",
        _count,
        "the setting OCORE_CLEANUP_MAX_BYTES",
    ),
    PolicyField(
        "cleanup_max_share",
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "a fraction above 0 and at most 1 of the destination's files (0.5 = 50 %)",
        _share,
        "the setting OCORE_CLEANUP_MAX_SHARE",
    ),
    PolicyField(
        "confirm_scans",
        {"type": "integer", "minimum": 1, "maximum": MAX_CONFIRM_SCANS},
        f"a whole number of scans from 1 to {MAX_CONFIRM_SCANS} that must see an orphan "
        "past retention before orphan cleanup deletes it (1 with confirm_hours 0: one "
        "sighting suffices)",
        _scans,
        "the setting OCORE_CONFIRM_SCANS",
    ),
    PolicyField(
        "confirm_hours",
        {"type": "number", "minimum": 0, "maximum": MAX_CONFIRM_HOURS},
        f"hours from 0 to {MAX_CONFIRM_HOURS} that those sightings must span",
        _hours,
        "the setting OCORE_CONFIRM_HOURS",
    ),
    PolicyField(
        "approval_required",
        {"type": "boolean"},
        "true (scheduled orphan cleanups only plan, a dry run, and wait for an approval) or false",
        _flag,
        "false",
        reset=False,
    ),
    PolicyField(
        "min_backups",
        {"type": "integer", "minimum": 0, "maximum": MAX_MIN_BACKUPS},
        f"a whole number of completed backups from 0 to {MAX_MIN_BACKUPS} that each "
        "instance keeps on this destination (minimum redundancy; 0: no floor on it, the "
        "per-instance floor across destinations still holds)",
        _min_backups,
        "the setting OCORE_MIN_BACKUPS_PER_INSTANCE",
    ),
    PolicyField(
        "trash_days",
        {"type": "integer", "minimum": 0, "maximum": MAX_TRASH_DAYS},
        f"a whole number of days from 0 to {MAX_TRASH_DAYS}: the undo window, while files "
        "that orphan cleanup and purge removed wait in the destination's trash, "
        "restorable (0: delete at once)",
        _trash_days,
        "the setting OCORE_TRASH_DAYS",
    ),
)
BY_NAME = {f.name: f for f in FIELDS}
_INTERVALS = {
    "scan_interval_seconds": "next_scan_at",
    "cleanup_interval_seconds": "next_cleanup_at",
}


def parse_patch() -> dict[str, Any]:
    """The request's PATCH body, every field checked (a 400 names the first bad one)."""
    try:
        body = json_body(frozenset(BY_NAME))
    except ApiError as err:
        if err.status == 400 and err.message.startswith("unknown field"):
            raise ApiError(
                400,
                "bad_request",
                f"{err.message}; a policy has {', '.join(BY_NAME)}",
                extra={"field": err.message.split(": ", 1)[-1].split(", ")[0]},
            ) from None
        raise
    return {name: BY_NAME[name].parse(value) for name, value in body.items()}


def _stored(dest: BackupDestination, policy: DestinationPolicy | None) -> J:
    out: J = {"retention_days": dest.retention_days}
    for field in FIELDS:
        if field.name != "retention_days":
            out[field.name] = getattr(policy, field.name) if policy is not None else None
    out["approval_required"] = bool(out["approval_required"])
    return {f.name: out[f.name] for f in FIELDS}


def _seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _effective(
    session: Session, dest: BackupDestination, policy: DestinationPolicy | None, cfg: Settings
) -> J:
    try:
        retention: int | None = resolve_retention(dest, cfg)
    except InvalidRetention:
        retention = None  # a row below one day: its jobs fail naming it (SAFETY rule 6)
    budget = effective_budget(session, dest, cfg)
    confirmation = effective_confirmation(session, dest, cfg)
    return {
        "scan_interval_seconds": _seconds(scan_interval(policy, cfg)),
        "cleanup_interval_seconds": _seconds(cleanup_interval(policy, cfg)),
        "retention_days": retention,
        "cleanup_max_files": budget.max_files,
        "cleanup_max_bytes": budget.max_bytes,
        "cleanup_max_share": budget.max_share,
        "confirm_scans": confirmation.scans,
        "confirm_hours": confirmation.hours,
        "approval_required": bool(policy.approval_required) if policy is not None else False,
        "min_backups": destination_floor(session, dest.id, cfg).in_destination,
        "trash_days": effective_trash_days(session, dest, cfg),
    }


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def policy_view(session: Session, dest: BackupDestination, cfg: Settings) -> J:
    """The answer of GET and PATCH."""
    policy = session.get(DestinationPolicy, dest.id)
    return {
        "destination_id": str(dest.id),
        "policy": _stored(dest, policy),
        "effective": _effective(session, dest, policy, cfg),
        "next_scan_at": _ts(policy.next_scan_at) if policy is not None else None,
        "next_cleanup_at": _ts(policy.next_cleanup_at) if policy is not None else None,
        "updated_at": _ts(policy.updated_at) if policy is not None else None,
        "updated_by": policy.updated_by if policy is not None else None,
    }


def _locked_policy(session: Session, dest_id: Any) -> DestinationPolicy:
    """The destination's policy row, created when it has none, locked for this
    transaction (two changes at once apply one after the other)."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(DestinationPolicy)
        .values(
            destination_id=dest_id,
            approval_required=False,
            updated_at=utcnow(),
            updated_by="system",
        )
        .on_conflict_do_nothing(index_elements=[DestinationPolicy.destination_id])
    )
    policy = session.get(DestinationPolicy, dest_id, with_for_update=True, populate_existing=True)
    assert policy is not None
    return policy


@bp.get("/api/storage/destinations/<dest_id>/policy")
def get_policy(dest_id: str) -> Response:
    """A destination's policy: stored values (null: the default), effective values, due
    times."""
    dest = load_destination(parse_uuid(dest_id, "destId"))
    require_platform_admin()
    return jsonify(policy_view(db(), dest, settings()))


@bp.patch("/api/storage/destinations/<dest_id>/policy")
def patch_policy(dest_id: str) -> Response:
    """Change a destination's policy (JSON merge-patch: null resets a field)."""
    dest = load_destination(parse_uuid(dest_id, "destId"))
    actor = require_platform_admin().sub
    patch = parse_patch()  # everything checked before anything is written
    session, cfg = db(), settings()
    if patch:
        policy = _locked_policy(session, dest.id)
        before = _stored(dest, policy)
        changed = {k: v for k, v in patch.items() if before[k] != v}
        now = utcnow()
        for name, value in changed.items():
            if name == "retention_days":
                dest.retention_days = value
            else:
                setattr(policy, name, value)
        rng = new_rng()
        for name, due in _INTERVALS.items():
            if name in changed:
                every = (scan_interval if name.startswith("scan") else cleanup_interval)(
                    policy, cfg
                )
                old = getattr(policy, due)
                setattr(policy, due, rescheduled(old, now, every, cfg.schedule_jitter, rng))
        if changed:
            policy.updated_at, policy.updated_by = now, actor
        session.commit()
        for name, value in changed.items():
            audit_log.info(
                "policy of destination %s: %s %s -> %s by %s",
                dest.id,
                name,
                json.dumps(before[name]),
                json.dumps(value),
                actor,
                extra={
                    "policy_change": {
                        "destination_id": str(dest.id),
                        "field": name,
                        "old": before[name],
                        "new": value,
                        "actor": actor,
                    }
                },
            )
    return jsonify(policy_view(session, dest, cfg))


def policy_schemas() -> dict[str, J]:
    """The OpenAPI components of these routes: the PATCH body (from :data:`FIELDS`) and
    the answer."""
    stored: J = {
        f.name: {
            "anyOf": [
                {"type": "integer"} if f.name == "retention_days" else f.schema,
                {"type": "null"},
            ]
        }
        for f in FIELDS
    }
    stored["approval_required"] = {"type": "boolean"}
    number: J = {"type": "number"}
    return {
        "PolicyPatch": {
            "type": "object",
            "properties": {f.name: f.body_schema() for f in FIELDS},
            "additionalProperties": False,
            "description": "JSON merge-patch: a field given is set, null resets it to the "
            "service's setting, a field left out stays as it is",
            "example": {
                "scan_interval_seconds": 3600,
                "cleanup_interval_seconds": 0,
                "cleanup_max_share": 0.1,
                "approval_required": True,
            },
        },
        "DestinationPolicy": {
            "type": "object",
            "required": [
                "destination_id",
                "policy",
                "effective",
                "next_scan_at",
                "next_cleanup_at",
                "updated_at",
                "updated_by",
            ],
            "properties": {
                "destination_id": {"type": "string", "format": "uuid"},
                "policy": {
                    "type": "object",
                    "required": [f.name for f in FIELDS],
                    "properties": stored,
                    "description": "What the destination sets (null: the service's setting)",
                },
                "effective": {
                    "type": "object",
                    "required": [f.name for f in FIELDS],
                    "properties": {
                        "scan_interval_seconds": {**number, "description": "0: off"},
                        "cleanup_interval_seconds": {**number, "description": "0: off"},
                        "retention_days": {
                            "type": ["integer", "null"],
                            "description": "null: the destination's window is refused "
                            "(below one day): its cleanups fail naming it",
                        },
                        "cleanup_max_files": {"type": "integer"},
                        "cleanup_max_bytes": {"type": "integer"},
                        "cleanup_max_share": number,
                        "confirm_scans": {"type": "integer"},
                        "confirm_hours": number,
                        "approval_required": {"type": "boolean"},
                        "min_backups": {
                            "type": "integer",
                            "description": "completed backups each instance keeps on this "
                            "destination (minimum redundancy)",
                        },
                        "trash_days": {
                            "type": "integer",
                            "description": "the undo window in days (0: delete at once)",
                        },
                    },
                    "description": "What applies: the destination's values, defaults filled in",
                },
                "next_scan_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "When beat enqueues the next scan (null: not yet seen "
                    "by beat, or off)",
                },
                "next_cleanup_at": {"type": ["string", "null"], "format": "date-time"},
                "updated_at": {"type": ["string", "null"], "format": "date-time"},
                "updated_by": {"type": ["string", "null"]},
            },
        },
    }
