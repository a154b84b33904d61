"""The GCS ``objects.list`` request and its parser: the hot path of every GCS scan.

google-cloud-storage turns each listed item into a ``Blob`` (an ACL object, a property
dict, lazy properties) and parses its ``updated`` time with ``strptime``: 10,000 objects
cost ~0.5 s of CPU that way, ~0.2 s read here (docs/performance.md, "GCS listing").
:meth:`~storage_backends.gcs.GCSBackend.walk` sends ``objects.list`` itself and reads
the JSON body here, straight into :class:`~storage_backends.base.ObjectInfo` rows, the
next page requested while this one's rows are made and used (:func:`iter_pages`).

The request still goes through the client's own connection
(``client._connection.api_request``: the same URL building, headers, and the client's
HTTP session ``client._http``, so credentials, proxies and an emulator endpoint behave
exactly as for every other call), under the backend's retry policy; a refused request
raises the google-api-core exception the library would (``from_http_response``), which
the backend translates. Only the body is ours: ``fields=`` asks for just what an
:class:`ObjectInfo` holds (a server that ignores it, like fake-gcs-server, sends more:
the rest is skipped), and each field is converted exactly as the ``Blob`` properties
convert it (``tests/backends/test_gcs_listing.py`` compares both on a real server).
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from google.cloud.storage.blob import _rfc3339_nanos_to_datetime  # what Blob.updated calls

from storage_backends.base import ObjectInfo
from storage_backends.errors import StorageError

#: the listing's partial response: what :class:`ObjectInfo` holds, and the next token
LIST_FIELDS = "nextPageToken,items(name,size,updated,etag,generation,storageClass)"
#: google-cloud-storage's own default request timeout (seconds), as its listings use
LIST_TIMEOUT = 60

# RFC 3339 as GCS writes it: 'Z', at most nanoseconds. Such a time is read by
# datetime.fromisoformat (C, ~50x faster than the library's strptime), which truncates
# the fraction to microseconds as the library does; any other spelling goes to the
# library's own parser (same result, or the same ValueError).
_GCS_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?Z")


def parse_time(text: str | None) -> datetime | None:
    """``Blob.updated`` (timezone-aware UTC, microseconds) of a listed ``updated``."""
    if text is None:
        return None
    if _GCS_TIME.fullmatch(text):
        return datetime.fromisoformat(text)  # 'Z': tzinfo is datetime.UTC itself
    value: datetime = _rfc3339_nanos_to_datetime(text)
    return value.astimezone(UTC)


def list_query(
    prefix: str,
    max_results: int,
    token: str | None,
    user_project: str | None = None,
    key_range: tuple[str, str | None] | None = None,
) -> dict[str, Any]:
    """The query of one ``objects.list`` page (no delimiter: a flat listing);
    ``key_range`` (full names, end excluded) as ``startOffset`` / ``endOffset``."""
    params: dict[str, Any] = {
        "projection": "noAcl",
        "maxResults": max_results,
        "fields": LIST_FIELDS,
    }
    if prefix:
        params["prefix"] = prefix
    if key_range is not None:
        start, end = key_range
        if start:
            params["startOffset"] = start
        if end is not None:
            params["endOffset"] = end
    if token:
        params["pageToken"] = token
    if user_project is not None:
        params["userProject"] = user_project
    return params


def list_page(
    client: Any,
    bucket: Any,
    prefix: str,
    max_results: int,
    token: str | None,
    retry: Any,
    key_range: tuple[str, str | None] | None = None,
) -> bytes:
    """The raw JSON body of one ``objects.list`` page, through the client's connection
    (its session, headers and endpoint) with ``retry`` around the request; a refused
    request raises google-api-core's exception for its status."""
    body: bytes = client._connection.api_request(
        method="GET",
        path=f"{bucket.path}/o",
        query_params=list_query(prefix, max_results, token, bucket.user_project, key_range),
        expect_json=False,
        timeout=LIST_TIMEOUT,
        retry=retry,
    )
    return body


def read_list_page(data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """(the raw items, next page token or None) of one ``objects.list`` body."""
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise StorageError(f"the listing response is not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise StorageError("the listing response is not a JSON object")
    items = doc.get("items") or []
    if not isinstance(items, list):
        raise StorageError("the listing response's items are not a list")
    return items, doc.get("nextPageToken") or None


def list_rows(items: list[dict[str, Any]], root: str) -> list[ObjectInfo]:
    """The :class:`ObjectInfo` rows of a page's items.

    Paths are relative to ``root`` (the root's own marker object is skipped; a name
    outside the root fails the listing, as :meth:`StorageBackend._rel` does). Each field
    as the ``Blob`` property reads it: size ``int`` (0 when absent), ``updated`` as
    :func:`parse_time`, the etag stripped of quotes, the generation ``str(int(...))``.
    """
    cut = len(root)
    out: list[ObjectInfo] = []
    append = out.append
    for item in items:
        name: str = item["name"]
        if cut:
            if name == root:
                continue
            if not name.startswith(root):
                # Fail closed: a key outside the root must never reach a caller (SAFETY).
                raise StorageError(f"server listed {name!r} outside root {root!r}")
            name = name[cut:]
        size = item.get("size")
        etag = item.get("etag")
        generation = item.get("generation")
        append(
            ObjectInfo(
                name,
                int(size) if size is not None else 0,
                parse_time(item.get("updated")),
                etag.strip('"') if etag else None,
                item.get("storageClass"),
                str(int(generation)) if generation is not None else None,
            )
        )
    return out


def parse_list_page(data: bytes, root: str) -> tuple[list[ObjectInfo], str | None]:
    """(rows of one ``objects.list`` body, next page token or None); see
    :func:`list_rows`."""
    items, token = read_list_page(data)
    return list_rows(items, root), token


def iter_pages(
    client: Any,
    bucket: Any,
    prefix: str,
    root: str,
    max_results: int,
    retry: Any,
    key_range: tuple[str, str | None] | None = None,
) -> Iterator[list[ObjectInfo]]:
    """Every page of the flat listing under ``prefix`` (possibly empty pages), in order.

    The next page is requested (one background thread, in the caller's context) as soon
    as this page's token is read, before its rows are made and used, so that the
    server's time overlaps that work: in memory, this page and the next one's body.
    A caller that stops early waits for the request in flight (at most one)."""

    def fetch(token: str | None) -> bytes:
        return list_page(client, bucket, prefix, max_results, token, retry, key_range)

    with ThreadPoolExecutor(1, thread_name_prefix="gcs-list") as pool:
        pending = pool.submit(contextvars.copy_context().run, fetch, None)
        while True:
            items, token = read_list_page(pending.result())
            if token is not None:
                pending = pool.submit(contextvars.copy_context().run, fetch, token)
            rows = list_rows(items, root)
            del items
            yield rows
            if token is None:
                return
