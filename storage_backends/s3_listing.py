"""The hand-signed ListObjectsV2 request and its parser: the hot path of every job.

boto3 spends ~80 µs parsing each listed key, so :class:`~storage_backends.s3.S3Backend`
sends ListObjectsV2 itself: :func:`list_request` signs it with botocore's SigV4 signer
(sent on a pooled urllib3 connection), and the body is parsed here, by a regex pass
over each ``<Contents>`` block (:func:`parse_list_page`; a one-regex fast path for the
usual layouts, checked against the general parser in ``tests/backends/test_s3_listing.py``).
Errors, retries and the connection pool stay in :mod:`storage_backends.s3`.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote_plus

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from storage_backends.base import ObjectInfo
from storage_backends.errors import StorageError


def list_request(
    bucket_url: str,
    credentials: Any,
    region: str,
    prefix: str,
    max_keys: int,
    token: str | None,
    delimiter: str = "",
    start_after: str = "",
) -> tuple[str, dict[str, str]]:
    """The URL and headers of one ListObjectsV2 GET (keys URL-encoded), signed with
    SigV4 for ``credentials`` (botocore credentials: their frozen copy signs)."""
    params = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys)}
    if delimiter:
        params["delimiter"] = delimiter
    if start_after:
        params["start-after"] = start_after
    if prefix:
        params["prefix"] = prefix
    if token:
        params["continuation-token"] = token
    # SigV4 signs the query as sent: encode it once, sorted, RFC 3986 unreserved only.
    query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    request = AWSRequest(method="GET", url=f"{bucket_url}?{query}")
    S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(request)
    prepared = request.prepare()
    return prepared.url, dict(prepared.headers.items())


_COMMON_PREFIX = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")


def parse_list_folders(data: bytes, encoded: bool) -> list[str]:
    """The ``<CommonPrefixes>`` of a delimiter listing (full prefixes), decoded as the
    keys are (:func:`parse_list_page`)."""
    folders = [_text(p) for p in _COMMON_PREFIX.findall(data)]
    if encoded:
        folders = [unquote_plus(f) for f in folders]
    return folders


@functools.lru_cache(maxsize=4096)
def _parse_time(text: str | None) -> datetime | None:
    # cached: objects written by one backup run share their timestamps
    if not text:
        return None
    return datetime.fromisoformat(text).astimezone(UTC)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


# ListObjectsV2 is the hot path of every job. Its body is flat, machine-written XML
# (no CDATA, no attributes on these elements): a regex pass over each <Contents> block
# costs a fraction of ElementTree's tree building. Text is XML-unescaped below.
_CONTENTS = re.compile(rb"<Contents>(.*?)</Contents>", re.S)
_FIELDS = re.compile(rb"<(Key|LastModified|ETag|Size|StorageClass)>([^<]*)</\1>")
_TOP = {
    name: re.compile(rb"<%s>([^<]*)</%s>" % (name, name))
    for name in (b"EncodingType", b"IsTruncated", b"NextContinuationToken")
}


#: The five entities XML predefines; any other named entity is not XML.
_XML_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}
_REFERENCE = re.compile(r"&(#[0-9]+|#x[0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);|&")


def _xml_char(ref: re.Match[str]) -> str:
    name = ref.group(1)
    if name is None:
        raise StorageError("the listing holds a bare '&': not well-formed XML")
    if name[0] != "#":
        char = _XML_ENTITIES.get(name)
        if char is None:
            raise StorageError(f"the listing holds &{name};, an entity XML does not define")
        return char
    code = int(name[2:], 16) if name[1] == "x" else int(name[1:])
    if code == 0 or 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise StorageError(f"the listing holds &{name};, not a character")
    return chr(code)


def xml_unescape(text: str) -> str:
    """Resolve XML's references: the five predefined entities and numeric character
    references (``&#x80;`` is U+0080, not the '€' HTML's rules make of it). Anything
    else (an HTML entity, a bare ``&``) is not XML: the listing is refused rather than
    a key misread."""
    return _REFERENCE.sub(_xml_char, text) if "&" in text else text


def _text(raw: bytes) -> str:
    return xml_unescape(raw.decode("utf-8"))


#: one simple element ``<Tag>text</Tag>`` (no attributes, no children)
_SIMPLE = re.compile(rb"<([A-Za-z]+)>[^<]*</\1>")
_FIELD_NAMES = (b"Key", b"LastModified", b"ETag", b"Size", b"StorageClass")
#: per field order of a server's <Contents> blocks: a regex matching a whole block
_BLOCK_RX: dict[tuple[bytes, ...], tuple[re.Pattern[bytes], tuple[int, ...]]] = {}
_QUOT = b"&#34;"


def _block_pattern(data: bytes) -> tuple[re.Pattern[bytes], tuple[int, ...]] | None:
    """A regex for the layout of the first <Contents> block, when it is made only of
    simple elements (what S3, SeaweedFS and moto send): each element in that order,
    the wanted fields captured; and where each of the five fields sits in a match
    (-1: absent). None for any other layout (the general parser handles it)."""
    first = _CONTENTS.search(data)
    if first is None:
        return None
    inner = first.group(1)
    elements = list(_SIMPLE.finditer(inner))
    if b"".join(m.group(0) for m in elements) != inner:
        return None  # whitespace, attributes or nested elements: not this fast path
    tags = tuple(m.group(1) for m in elements)
    if len(set(tags)) != len(tags) or b"Key" not in tags:
        return None
    cached = _BLOCK_RX.get(tags)
    if cached is None:
        parts = []
        where = [-1] * len(_FIELD_NAMES)
        group = 0
        for tag in tags:
            if tag in _FIELD_NAMES:
                parts.append(b"<%s>([^<]*)</%s>" % (tag, tag))
                where[_FIELD_NAMES.index(tag)] = group
                group += 1
            else:
                parts.append(b"<%s>[^<]*</%s>" % (tag, tag))
        rx = re.compile(b"<Contents>" + b"".join(parts) + b"</Contents>")
        cached = _BLOCK_RX[tags] = (rx, tuple(where))
        if len(_BLOCK_RX) > 64:
            _BLOCK_RX.clear()
    return cached


_CLASSES: dict[bytes, str] = {}


def _etag_text(raw: bytes) -> str:
    """``_text(raw).strip('"')``, without the general unescape pass for the usual
    ``&#34;hex&#34;`` form (``&#34;`` is the one entity there)."""
    plain = raw.replace(_QUOT, b'"')
    if b"&" in plain:
        return _text(raw).strip('"')
    return plain.decode("utf-8").strip('"')


def _fast_items(data: bytes, encoded: bool) -> list[ObjectInfo] | None:
    """Every <Contents> block in one regex pass, when all blocks share the first
    one's layout of simple elements; None otherwise (the general parser runs)."""
    pattern = _block_pattern(data)
    if pattern is None:
        return None
    rx, (k, t, e, z, c) = pattern
    rows = rx.findall(data)
    if len(rows) != data.count(b"<Contents>"):
        return None  # some block differs: the general parser decides
    if rows and not isinstance(rows[0], tuple):
        rows = [(r,) for r in rows]
    # column by column: C-level passes where the text needs no unescaping
    raw_keys = [r[k] for r in rows]
    if any(b"&" in x for x in raw_keys):
        keys = [_text(x) for x in raw_keys]
    else:
        keys = [x.decode("utf-8") for x in raw_keys]
    if encoded:
        keys = [unquote_plus(x) if "%" in x or "+" in x else x for x in keys]
    n = len(rows)
    sizes = [int(r[z] or 0) for r in rows] if z >= 0 else [0] * n
    times: list[datetime | None] = [_time_of(r[t]) for r in rows] if t >= 0 else [None] * n
    etags: list[str | None] = (
        [_etag_text(r[e]) if r[e] else None for r in rows] if e >= 0 else [None] * n
    )
    classes: list[str | None] = [_class_of(r[c]) for r in rows] if c >= 0 else [None] * n
    return list(map(ObjectInfo, keys, sizes, times, etags, classes))


def _time_of(raw: bytes) -> datetime | None:
    return _parse_time(_text(raw)) if raw else None


def _class_of(raw: bytes) -> str | None:
    if not raw:
        return None
    text = _CLASSES.get(raw)
    if text is None:
        if len(_CLASSES) > 256:
            _CLASSES.clear()
        text = _CLASSES[raw] = _text(raw)
    return text


def parse_list_page(data: bytes) -> tuple[list[ObjectInfo], str | None]:
    """Parse one ListObjectsV2 response body: (objects with full keys, next token).

    Keys are URL-decoded exactly once, and only when the server says it encoded them
    (``<EncodingType>url``). S3, moto and SeaweedFS all send a literal ``+`` as ``%2B``
    and may send a space as ``+`` (SeaweedFS does, moto sends ``%20``), so
    ``unquote_plus`` is the one correct decoding, as in botocore.
    """
    encoded, token = parse_list_head(data)
    return parse_list_items(data, encoded), token


def parse_list_head(data: bytes) -> tuple[bool, str | None]:
    """(keys URL-encoded?, next continuation token or None) of a ListObjectsV2 body:
    cheap, so that the next page can be requested before this one is parsed."""
    if b"<ListBucketResult" not in data[:1024]:
        raise StorageError("the listing response is not a ListBucketResult document")
    # top-level elements sit before the first <Contents> or after the last one:
    # searching there spares two scans of the whole body
    first, last = data.find(b"<Contents>"), data.rfind(b"</Contents>")
    outside = data[:first] + data[last:] if 0 <= first < last else data
    top = {name: m.group(1) if (m := rx.search(outside)) else None for name, rx in _TOP.items()}
    encoded = (top[b"EncodingType"] or b"").lower() == b"url"
    truncated = (top[b"IsTruncated"] or b"").lower() == b"true"
    token = _text(top[b"NextContinuationToken"]) if top[b"NextContinuationToken"] else None
    return encoded, token if truncated else None


def parse_list_items(data: bytes, encoded: bool) -> list[ObjectInfo]:
    """The objects (full keys) of a ListObjectsV2 body; see :func:`parse_list_page`."""
    fast = _fast_items(data, encoded)
    if fast is not None:
        return fast
    items: list[ObjectInfo] = []
    for block in _CONTENTS.finditer(data):
        fields = dict(_FIELDS.findall(block.group(1)))
        key = _text(fields.get(b"Key", b""))
        etag = fields.get(b"ETag")
        storage_class = fields.get(b"StorageClass")
        items.append(
            ObjectInfo(
                unquote_plus(key) if encoded else key,
                int(fields.get(b"Size") or 0),
                _parse_time(_text(fields[b"LastModified"]) if b"LastModified" in fields else None),
                _text(etag).strip('"') if etag else None,
                _text(storage_class) if storage_class else None,
            )
        )
    return items


def parse_error(data: bytes) -> tuple[str, str]:
    """(code, message) of the error document a refused listing request answers."""
    try:
        root = ET.fromstring(data)  # noqa: S314 - server error document
    except ET.ParseError:
        return "", data[:200].decode("utf-8", "replace")
    fields = {_local(f.tag): f.text or "" for f in root}
    return fields.get("Code", ""), fields.get("Message", "")
