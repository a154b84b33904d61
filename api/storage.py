"""The storage browser: project totals, scan analytics, browse, download, delete, upload.

Every view resolves the destination through :func:`api.auth.load_destination` (404 for
another organization) and validates paths before a backend is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api import cursors
from api.analytics import analytics_to_dict, project_storage
from api.auth import current_principal, load_destination, load_project
from api.backends import BackendCache
from api.context import db, release_db, settings, state
from api.errors import ApiError, bad_request, not_found
from api.files import (
    delete_with_audit,
    existing_file,
    link_to_dict,
    refuse_if_linked,
    refuse_if_purge_pending,
    refuse_overwrite,
    stream_file,
    upload_with_audit,
)
from api.intents import upload_intent
from api.params import json_body, parse_uuid, query_int, safe_path, safe_prefix
from api.transfers import TransferSlots
from api.upload import MultipartFileStream, too_large
from db.models import BackupDestination, StorageAnalytics
from storage_backends.base import BrowseEntry, StorageBackend
from storage_backends.registry import open_backend
from tasks.analytics import escaped_name
from tasks.linking import find_links

bp = Blueprint("storage", __name__, url_prefix="/api")

BROWSE_DEFAULT_LIMIT = 100
BROWSE_MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 4096
DOWNLOAD_MAX_EXPIRY = 900
#: RFC 2046 allows 70 characters.
MAX_BOUNDARY_CHARS = 200
#: Non-file form fields are option strings: this is plenty.
MAX_FORM_MEMORY = 64 * 1024


def _open(dest: BackupDestination) -> tuple[StorageBackend, Callable[[], None]]:
    """``(backend, release)`` from the app's cache (:mod:`api.backends`). The request's
    database connection goes back to the pool first: nothing waits on storage holding
    one (:mod:`api.transfers`)."""
    release_db()
    cache: BackendCache = state().extras["backends"]
    return cache.open(dest, settings(), lambda d, s: open_backend(d, s))


def _transfer(what: str) -> Callable[[], None]:
    """A transfer slot for an upload or a streamed download (503 ``busy`` when none):
    its release."""
    slots: TransferSlots = state().extras["transfers"]
    return slots.acquire(what)


@contextmanager
def backend_of(dest: BackupDestination) -> Iterator[StorageBackend]:
    """The destination's backend, released afterwards (closed unless it is shared)."""
    backend, release = _open(dest)
    try:
        yield backend
    finally:
        release()


def _destination(dest_id: str) -> BackupDestination:
    return load_destination(parse_uuid(dest_id, "destId"))


@bp.get("/projects/<project_id>/storage")
def get_project_storage(project_id: str) -> Response:
    """Aggregated analytics of the project's destinations, overlaps counted once."""
    project = load_project(parse_uuid(project_id, "id"))
    return jsonify(project_storage(db(), project.id))


@bp.get("/storage/destinations/<dest_id>/analytics")
def get_analytics(dest_id: str) -> Response:
    """The destination's most recent scan row."""
    dest = _destination(dest_id)
    row = (
        db()
        .scalars(
            select(StorageAnalytics)
            .where(StorageAnalytics.destination_id == dest.id)
            .order_by(StorageAnalytics.finished_at.desc(), StorageAnalytics.id.desc())
            .limit(1)
        )
        .first()
    )
    if row is None:
        raise not_found(f"destination {dest.id} has never been scanned: POST .../scan first")
    return jsonify({"analytics": analytics_to_dict(row)})


def _text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry(entry: BrowseEntry, links: dict[str, list[Any]]) -> dict[str, Any]:
    # a name that is not valid UTF-8 (local, SFTP) is shown with its bytes escaped
    # (``caf\xe9.tar``): no record can name it, and no path can address it
    return {
        "name": entry.name if _text(entry.name) else escaped_name(entry.name),
        "path": entry.path if _text(entry.path) else escaped_name(entry.path),
        "size": entry.size,
        "last_modified": entry.last_modified.isoformat() if entry.last_modified else None,
        "is_dir": entry.is_dir,
        "linked": None if entry.is_dir else [link_to_dict(r) for r in links.get(entry.path, [])],
    }


@bp.get("/storage/destinations/<dest_id>/browse")
def browse(dest_id: str) -> Response:
    """One level of the destination; each file lists the records that reference it."""
    prefix = safe_prefix(request.args.get("prefix"))
    limit = query_int("limit", BROWSE_DEFAULT_LIMIT, 1, BROWSE_MAX_LIMIT)
    cursor = request.args.get("cursor") or None
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise bad_request(cursors.INVALID, "invalid_cursor")
    dest = _destination(dest_id)
    cfg = settings()
    token = cursors.accept(cfg, str(dest.id), prefix, cursor)  # (no storage request yet)
    with backend_of(dest) as backend:
        page = backend.browse(prefix, limit, token)
    files = [e.path for e in page.entries if not e.is_dir and _text(e.path)]
    links = find_links(db(), dest, files)
    return jsonify(
        {
            "files": [_entry(e, links) for e in page.entries],
            "next_cursor": cursors.issue(cfg, str(dest.id), prefix, page.next_cursor),
        }
    )


@bp.get("/storage/destinations/<dest_id>/download")
def download(dest_id: str) -> Response:
    """A presigned URL where the backend can sign, else the file's bytes, streamed."""
    path = safe_path(request.args.get("path"))
    dest = _destination(dest_id)
    expiry = max(1, min(settings().download_url_expiry, DOWNLOAD_MAX_EXPIRY))
    backend, release = _open(dest)
    try:
        info = backend.stat(path)
        url = backend.download_url(path, expiry)
        if url is not None:
            release()
            return jsonify({"url": url, "expires_in": expiry})
        done = _transfer("download")
    except BaseException:
        release()
        raise

    def finished() -> None:
        done()
        release()

    try:
        return stream_file(backend, info, finished)  # released when the stream ends
    except BaseException:
        done()  # stream_file released the backend (finished) only if it started
        raise


def _delete_path() -> str:
    """The path from the query (preferred) or a JSON body ``{"path": ...}``; a body that
    is present is always checked, and must name the same path as the query if both do."""
    raw = request.args.get("path")
    body_path = json_body(frozenset({"path"})).get("path")
    if body_path is not None and not isinstance(body_path, str):
        raise bad_request("path must be a string", "invalid_path")
    if raw is not None and body_path is not None and body_path != raw:
        raise bad_request("the query and the body name different paths", "invalid_path")
    return safe_path(raw if raw is not None else body_path)


@bp.delete("/storage/destinations/<dest_id>/files")
def delete_file(dest_id: str) -> Response:
    """Delete one unreferenced file, with an audit row (409 when a record links it)."""
    path = _delete_path()
    dest = _destination(dest_id)
    actor = current_principal().sub
    with backend_of(dest) as backend:
        info = backend.stat(path)
        audit = delete_with_audit(db(), backend, dest, info, actor)
    return jsonify({"message": f"deleted {path}", "path": path, "audit_id": str(audit.id)})


@bp.post("/storage/destinations/<dest_id>/upload")
def upload(dest_id: str) -> Response:
    """Stream the multipart ``file`` part to ``path`` as it arrives (:mod:`api.upload`).
    A path any record links (409 `file_linked`: a backup or snapshot of any status,
    live or soft-deleted, whether its file exists or not, a folder record above it,
    loose spellings, records of every destination that may name the same storage) is
    refused before the body is read and before anything reaches storage."""
    path = safe_path(request.args.get("path"))
    dest = _destination(dest_id)
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "upload needs multipart/form-data")
    boundary = request.mimetype_params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS or not boundary.isascii():
        raise bad_request("the multipart/form-data Content-Type needs a valid boundary")
    cfg = settings()
    length = request.content_length
    if length is not None and length > cfg.upload_max_bytes:
        raise too_large(f"the body is limited to {cfg.upload_max_bytes} bytes")
    actor = current_principal().sub
    with backend_of(dest) as backend:
        # SAFETY rule 5b: whether or not a file is there (a planted file would count
        # as linked: never deletable by its uploader, never cleaned). The database
        # only (backend.resolve_dir: an SFTP server resolves base directories).
        refuse_if_linked(db(), dest, path, "upload to", backend.resolve_dir)
        refuse_if_purge_pending(db(), dest, path, backend.resolve_dir)
        release_db()  # the bytes move without a database connection (api.transfers)
        done = _transfer("upload")
        # SAFETY rule 12a: no job deletes what is at the path while the upload runs
        try:
            end_intent = upload_intent(dest, path, actor)
        except BaseException:
            done()
            raise
        try:
            old = existing_file(backend, path)
            refuse_overwrite(dest, path, old)  # before the body is read
            form = MultipartFileStream(
                request.stream,
                boundary.encode("ascii"),
                max_bytes=cfg.upload_max_bytes,
                max_parts=cfg.upload_max_parts,
                max_field_bytes=MAX_FORM_MEMORY,
            )
            form.start()  # up to the file's first bytes: 400 without a file part
            try:
                info = upload_with_audit(
                    db(), backend, dest, path, cast(BinaryIO, form), actor, old
                )
            except Exception:
                if form.error is not None:  # the request failed, not the storage
                    raise form.error from None
                raise
        finally:
            end_intent()  # released (upload_done), whether it succeeded or failed
            done()
    body: dict[str, Any] = {"message": f"uploaded {info.size} bytes", "path": info.path}
    if old is not None:
        body["replaced"] = {"size": old.size, "etag": old.etag}
    return jsonify(body)
