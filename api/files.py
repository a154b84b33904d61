"""File operations behind the storage endpoints: links, download, delete, upload."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO
from urllib.parse import quote

from flask import Response, has_app_context, stream_with_context
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import context
from api.errors import ApiError, uuids_in
from core.settings import Settings
from db.models import BackupDestination, DeletionAudit, PendingDeletion
from db.session import db_now
from storage_backends.base import ObjectInfo, StorageBackend
from storage_backends.errors import NotFoundError, StorageError
from storage_backends.identity import DirResolver, RelativeBaseDirectory, location_key
from storage_backends.paths import normalize_root
from tasks.floor import count_refusals, destination_floor, protected
from tasks.linking import LinkRef, OverlapOutsideFrame, find_links, overlapping_destinations

_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9 !#$&+,.=@^_`{}~()\[\]-]")
CHUNK_SIZE = 1024 * 1024

#: one line per file deleted (or not) through the API
audit_log = logging.getLogger("ocore.api.audit")


def link_to_dict(link: LinkRef) -> dict[str, Any]:
    """A record that references a file, as the API shows it."""
    return {
        "type": link.type,
        "id": str(link.id),
        "destination_id": str(link.destination_id),
        "path": link.path,
        "deleted": link.deleted,
        "ambiguous": link.ambiguous,
    }


def refuse_if_linked(
    session: Session,
    dest: BackupDestination,
    path: str,
    action: str,
    resolve_dir: DirResolver | None = None,
) -> None:
    """409 naming the records when any record of any destination that may name the same
    storage references ``path`` or would reference a file written there (SAFETY rules
    1-4, 5b): a backup or snapshot of any status, live or soft-deleted, whether
    its file exists or not, exactly, through a folder record, or only ambiguously.

    The one check of the API's writes and deletes (upload, file delete): it reads only
    the database (``resolve_dir``: the backend's, to resolve base directories), so an
    upload runs it before reading its body and before anything reaches storage. When
    the records that may name ``path`` cannot be placed (a destination covering this one
    from above its base directory, a relative base directory) it refuses too (409
    ``link_check_failed``): fail closed."""
    try:
        # (one path: the records spelled with '.'/'..' segments are read too)
        found = find_links(session, dest, [path], resolve_dir=resolve_dir, dot_records=True)
    except (OverlapOutsideFrame, RelativeBaseDirectory) as err:
        why = f"the records that may name it cannot be checked: {err}"
        ids = uuids_in(str(err))  # (the member is not shown the base directories)
        hidden = f"a destination's base directory{f' (destination {ids})' if ids else ''} "
        raise ApiError(
            409,
            "link_check_failed",
            f"refusing to {action} {path!r}: {why}",
            member_message=f"refusing to {action} {path!r}: the records that may name it "
            f"cannot be checked: {hidden}overlaps this one's in a way that cannot be placed",
        ) from None
    links = found.get(path, [])
    if not links:
        return
    names = "; ".join(
        f"{ref.type} {ref.id} of destination {ref.destination_id} points at this path"
        + (" (soft-deleted)" if ref.deleted else "")
        + (f" (ambiguous match: its path is {ref.path!r})" if ref.ambiguous else "")
        for ref in links
    )
    extra: dict[str, Any] = {"links": [link_to_dict(ref) for ref in links]}
    if action == "delete":
        floor = _floor_refusals(session, links)
        if floor:
            extra["floor"] = floor
            names += "; " + "; ".join(
                f"backup {f['backup_id']} is one of the last completed backups of instance "
                f"{f['instance_id']} (minimum redundancy: {f['min_backups_per_instance']} per "
                f"instance, {f['min_backups_in_destination']} on its destination)"
                for f in floor
            )
    raise ApiError(409, "file_linked", f"refusing to {action} {path!r}: {names}", extra=extra)


def _floor_refusals(
    session: Session, links: list[LinkRef], cfg: Settings | None = None
) -> list[dict[str, Any]]:
    """The live completed backups among ``links`` that the minimum redundancy keeps
    (SAFETY rule 21, :mod:`tasks.floor`): a file delete would remove one of its
    instance's last N completed backups. Counted (``api-delete``)."""
    if cfg is None:
        if not has_app_context():
            return []
        cfg = context.settings()
    out: list[dict[str, Any]] = []
    for ref in links:
        if ref.type != "backup" or ref.deleted:
            continue
        floor = destination_floor(session, ref.destination_id, cfg)
        for backup_id, instance_id in protected(session, floor, [[ref.id]]).items():
            out.append(
                {
                    "backup_id": str(backup_id),
                    "instance_id": str(instance_id),
                    "destination_id": str(ref.destination_id),
                    **floor.as_dict(),
                }
            )
    count_refusals("api-delete", 1 if out else 0)
    return out


#: Unicode categories never kept in a download name: controls (Cc), format characters
#: such as U+202E RIGHT-TO-LEFT OVERRIDE that disguise ``exe.pdf`` (Cf), line and
#: paragraph separators (Zl, Zp), and lone surrogates (Cs), which have no UTF-8 form.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _displayable(name: str) -> str:
    return "".join(c for c in name if unicodedata.category(c) not in _DROPPED_CATEGORIES)


def content_disposition(path: str) -> str:
    """``attachment`` with an ASCII-only ``filename`` and the RFC 5987 ``filename*``.

    Both are built from the file name without control, format, separator and surrogate
    characters (:data:`_DROPPED_CATEGORIES`); the ASCII form also replaces anything
    outside a small safe set (quotes, backslashes, ``;``, non-ASCII) with ``_``.
    """
    name = _displayable(path.rsplit("/", 1)[-1]).strip() or "download"
    ascii_name = _UNSAFE_ASCII.sub("_", name).strip() or "download"
    encoded = quote(name, safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"


def stream_file(
    backend: StorageBackend, info: ObjectInfo, release: Callable[[], None] | None = None
) -> Response:
    """Stream a file chunk by chunk (never read whole); ``release`` (default: closing
    the backend) runs when the stream ends.

    The first chunk is read before the response starts, so that a failure to open the
    file still becomes a proper JSON error.
    """
    done = release or backend.close
    chunks = backend.read_chunks(info.path, CHUNK_SIZE)
    try:
        first = next(chunks, b"")
    except BaseException:
        done()
        raise

    def generate() -> Iterator[bytes]:
        try:
            if first:
                yield first
            yield from chunks
        finally:
            done()

    response = Response(stream_with_context(generate()), mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = content_disposition(info.path)
    response.headers["Content-Length"] = str(info.size)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def delete_with_audit(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    info: ObjectInfo,
    actor: str,
) -> DeletionAudit:
    """Re-check links, record the audit row, delete, mark it deleted (SAFETY rules 7, 9).

    The audit row is committed as ``pending`` before the delete, so a crash in between
    still leaves a trace; a failed delete marks it ``failed`` and re-raises.
    """
    refuse_if_linked(session, dest, info.path, "delete", backend.resolve_dir)
    audit = DeletionAudit(
        destination_id=dest.id,
        location_key=location_key(dest),
        path=info.path,
        size_bytes=info.size,
        last_modified=info.last_modified,
        etag=info.etag,
        reason="manual",
        actor=actor,
        state="pending",
    )
    session.add(audit)
    session.commit()
    try:
        # only the object just read (SAFETY rule 5a): conditional where the server
        # honours it, re-read right before otherwise; a versioned S3 bucket by version id
        outcome = backend.delete_planned([info])
        if outcome.errors:
            raise StorageError("; ".join(outcome.errors.values()))
    except Exception as err:
        audit.state = "failed"
        audit.error = f"{type(err).__name__}: {err}"
        session.commit()
        _audit_line(audit, logging.WARNING)
        raise
    if outcome.changed:
        audit.state = "changed"
        audit.error = "written again since it was read: kept"
        session.commit()
        _audit_line(audit, logging.WARNING)
        raise ApiError(
            409,
            "changed",
            f"{info.path!r} was written again while it was being deleted; nothing was "
            "deleted: read it again and retry",
        )
    audit.state = "deleted"
    audit.deleted_at = db_now(session)
    session.commit()
    _audit_line(audit, logging.INFO)
    return audit


def refuse_if_purge_pending(
    session: Session,
    dest: BackupDestination,
    path: str,
    resolve_dir: DirResolver | None = None,
) -> None:
    """409 ``purge_pending`` when a purge still owes the delete of ``path`` (a pending
    deletion of any destination that may name the same storage, for this file or a
    folder above it; compared case-insensitively): the purge job would delete what an
    upload wrote there. Once the purge job has run, the path is free again."""
    try:
        dests = overlapping_destinations(session, dest, resolve_dir)
    except (OverlapOutsideFrame, RelativeBaseDirectory) as err:
        # (refuse_if_linked, which runs first, has refused this case already)
        raise ApiError(
            409,
            "link_check_failed",
            f"refusing to upload to {path!r}: the purges owed there cannot be checked: {err}",
            member_message=f"refusing to upload to {path!r}: the purges owed there cannot "
            "be checked",
        ) from None
    target = normalize_root(dest.root_prefix or "") + path
    for other in dests:
        root = normalize_root(other.root_prefix or "")
        if not target.casefold().startswith(root.casefold()):
            continue
        rel = target[len(root) :]
        parts = rel.split("/")
        forms = [rel.casefold()] + [
            "/".join(parts[:i]).casefold() + "/" for i in range(1, len(parts))
        ]
        row = session.execute(
            select(PendingDeletion.record_type, PendingDeletion.record_id)
            .where(
                PendingDeletion.destination_id == other.id,
                func.lower(PendingDeletion.path).in_(forms),
            )
            .limit(1)
        ).first()
        if row is not None:
            raise ApiError(
                409,
                "purge_pending",
                f"refusing to upload to {path!r}: the purge of {row[0]} {row[1]} still owes "
                "the delete of this path; upload again once its purge job has run",
            )


#: ``options.overwrite`` of a destination: ``allow`` (the default) or ``refuse``.
OVERWRITE_OPTION = "overwrite"


def existing_file(backend: StorageBackend, path: str) -> ObjectInfo | None:
    """The file at ``path`` an upload would replace, or None."""
    try:
        return backend.stat(path)
    except NotFoundError:
        return None


def refuse_overwrite(dest: BackupDestination, path: str, old: ObjectInfo | None) -> None:
    """409 ``file_exists`` when a file is at ``path`` and the destination's policy
    (``options.overwrite: refuse``) forbids replacing files through the API."""
    policy = str((dest.options or {}).get(OVERWRITE_OPTION, "allow")).lower()
    if old is not None and policy == "refuse":
        raise ApiError(
            409,
            "file_exists",
            f"refusing to upload to {path!r}: a file is there ({old.size} bytes) and this "
            "destination does not allow replacing files; delete it first or upload "
            "to another path",
        )


def upload_with_audit(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    path: str,
    stream: BinaryIO,
    actor: str,
    old: ObjectInfo | None,
) -> ObjectInfo:
    """Write ``stream`` to ``path``; when it replaces ``old``, audit that like a delete.

    The replacement is an audit row of reason ``overwrite`` (who, the replaced file's
    size, etag and last-modified), committed as ``pending`` before the upload starts,
    then ``replaced`` with the new size and etag, or ``failed`` when the upload failed
    (every backend leaves the old file in place then). Each is a short transaction:
    no database connection is held while the bytes move (:mod:`api.transfers`)."""
    audit: DeletionAudit | None = None
    if old is not None:
        audit = DeletionAudit(
            destination_id=dest.id,
            location_key=location_key(dest),
            path=path,
            size_bytes=old.size,
            last_modified=old.last_modified,
            etag=old.etag,
            generation=old.generation,
            reason="overwrite",
            actor=actor,
            state="pending",
        )
        session.add(audit)
        session.commit()
    try:
        info = backend.upload(path, stream, None)
    except Exception as err:
        if audit is not None:
            audit.state = "failed"
            audit.error = f"upload failed, the file was kept: {type(err).__name__}: {err}"
            session.commit()
            _audit_line(audit, logging.WARNING)
        raise
    if audit is not None:
        audit.state = "replaced"
        audit.new_size_bytes = info.size
        audit.new_etag = info.etag
        audit.deleted_at = db_now(session)
        session.commit()
        _audit_line(audit, logging.INFO)
    return info


def _audit_line(audit: DeletionAudit, level: int) -> None:
    """The audit log line of a delete through the API (``ocore.api.audit``): INFO when
    the file was deleted, WARNING when it was not (failed, changed); the same facts as
    the committed audit row, whose id it carries."""
    fields = {
        "audit_id": str(audit.id),
        "state": audit.state,
        "destination_id": str(audit.destination_id),
        "path": audit.path,
        "size_bytes": audit.size_bytes,
        "actor": audit.actor,
        "error": audit.error,
        "reason": audit.reason,
    }
    replaced = ""
    if audit.reason == "overwrite":
        fields |= {"new_size_bytes": audit.new_size_bytes, "new_etag": audit.new_etag}
        if audit.state == "replaced":
            replaced = f" with {audit.new_size_bytes} bytes"
    audit_log.log(
        level,
        "file %s: %s of destination %s (%s bytes)%s by %s, audit %s%s",
        audit.state,
        audit.path,
        audit.destination_id,
        audit.size_bytes,
        replaced,
        audit.actor,
        audit.id,
        f": {audit.error}" if audit.error else "",
        extra={"audit": fields},
    )
