"""The ListObjectsV2 parser's one-regex fast path gives exactly what the general
per-block parser gives, and steps aside for any layout it does not know."""

from __future__ import annotations

import pytest

import storage_backends.s3 as s3
from storage_backends.errors import StorageError


def _doc(blocks: list[bytes], *, encoded: bool = True, token: bytes | None = None) -> bytes:
    head = b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="x"><Name>b</Name>'
    if encoded:
        head += b"<EncodingType>url</EncodingType>"
    head += b"<IsTruncated>%s</IsTruncated>" % (b"true" if token else b"false")
    tail = b"<NextContinuationToken>%s</NextContinuationToken>" % token if token else b""
    return head + b"".join(blocks) + tail + b"</ListBucketResult>"


def _seaweed(key: bytes, etag: bytes = b"&#34;abc&#34;", cls: bytes = b"STANDARD") -> bytes:
    return (
        b"<Contents><Key>%s</Key><ETag>%s</ETag><Size>12</Size>"
        b"<StorageClass>%s</StorageClass><LastModified>2025-01-02T03:04:05Z</LastModified>"
        b"</Contents>" % (key, etag, cls)
    )


def _aws(key: bytes) -> bytes:
    return (
        b"<Contents><Key>%s</Key><LastModified>2025-01-02T03:04:05.000Z</LastModified>"
        b"<ETag>&quot;d41d&quot;</ETag><Size>7</Size><Owner><ID>o</ID></Owner>"
        b"<StorageClass>GLACIER</StorageClass></Contents>" % key
    )


def _general(data: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        m.setattr(s3, "_fast_items", lambda _data, _encoded: None)
        return s3.parse_list_page(data)


DOCS = {
    "seaweedfs layout": _doc([_seaweed(b"a/b%2Bc+d.tar.gz"), _seaweed(b"x%20y/%C3%A9")]),
    "escaped keys and etags": _doc(
        [_seaweed(b"a&amp;b/&lt;c&gt;", b"&quot;q&quot;"), _seaweed(b"k", b'"&#34;x"')]
    ),
    "not url-encoded": _doc([_seaweed(b"a+b%20c")], encoded=False),
    "empty fields": _doc([_seaweed(b"k", b"", b"")]),
    "truncated with token": _doc([_seaweed(b"k")], token=b"tok&amp;1"),
    "aws layout with owner (general parser)": _doc([_aws(b"a/b"), _aws(b"c")]),
    "mixed layouts (general parser)": _doc(
        [
            _seaweed(b"a"),
            b"<Contents><Key>b</Key><Size>3</Size></Contents>",
            _seaweed(b"c"),
        ]
    ),
    "whitespace between elements (general parser)": _doc(
        [b"<Contents>\n  <Key>a</Key>\n  <Size>3</Size>\n</Contents>"]
    ),
    "no objects": _doc([]),
}


@pytest.mark.parametrize("name", list(DOCS))
def test_fast_parser_matches_general_parser(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DOCS[name]
    assert s3.parse_list_page(data) == _general(data, monkeypatch)


def test_fast_path_taken_for_uniform_simple_blocks() -> None:
    data = DOCS["seaweedfs layout"]
    items = s3._fast_items(data, True)
    assert items is not None
    assert [o.path for o in items] == ["a/b+c d.tar.gz", "x y/\u00e9"]
    assert [o.etag for o in items] == ["abc", "abc"]
    assert items[0].storage_class == "STANDARD" and items[0].size == 12


@pytest.mark.parametrize(
    "name",
    ["aws layout with owner (general parser)", "mixed layouts (general parser)"],
)
def test_fast_path_steps_aside(name: str) -> None:
    assert s3._fast_items(DOCS[name], True) is None


def test_not_a_listing_is_rejected() -> None:
    with pytest.raises(StorageError):
        s3.parse_list_page(b"<Error><Code>x</Code></Error>")
