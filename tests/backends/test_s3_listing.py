"""The hand-signed ListObjectsV2 request and its parser (storage_backends.s3_listing):
the parser's one-regex fast path gives exactly what the general per-block parser gives,
and steps aside for any layout it does not know; the request is signed as sent."""

from __future__ import annotations

import pytest

import storage_backends.s3_listing as s3_listing
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
        m.setattr(s3_listing, "_fast_items", lambda _data, _encoded: None)
        return s3_listing.parse_list_page(data)


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
    assert s3_listing.parse_list_page(data) == _general(data, monkeypatch)


def test_fast_path_taken_for_uniform_simple_blocks() -> None:
    data = DOCS["seaweedfs layout"]
    items = s3_listing._fast_items(data, True)
    assert items is not None
    assert [o.path for o in items] == ["a/b+c d.tar.gz", "x y/\u00e9"]
    assert [o.etag for o in items] == ["abc", "abc"]
    assert items[0].storage_class == "STANDARD" and items[0].size == 12


@pytest.mark.parametrize(
    "name",
    ["aws layout with owner (general parser)", "mixed layouts (general parser)"],
)
def test_fast_path_steps_aside(name: str) -> None:
    assert s3_listing._fast_items(DOCS[name], True) is None


def test_not_a_listing_is_rejected() -> None:
    with pytest.raises(StorageError):
        s3_listing.parse_list_page(b"<Error><Code>x</Code></Error>")


def _keys(data: bytes) -> list[str]:
    return [o.path for o in s3_listing.parse_list_page(data)[0]]


def _etree_keys(data: bytes) -> list[str]:
    """What an XML parser reads as the keys (the reference for the unescaping)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(data)  # noqa: S314 - a document built by this test
    return [el.text or "" for el in root.iter() if el.tag.rpartition("}")[2] == "Key"]


XML_KEYS = [
    b"&#x80;",  # U+0080: html.unescape makes it the euro sign
    b"&#128;x&#x9F;",
    b"&amp;#x80;",  # a literal '&#x80;': unescaped once, not twice
    b"a&amp;b&lt;c&gt;d&quot;e&apos;f",
    b"&#xe9;&#233;&#x1F600;",
    b"&#38;amp;",  # '&amp;' as a literal
]


@pytest.mark.parametrize("raw", XML_KEYS, ids=repr)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_keys_are_unescaped_as_xml(raw: bytes, fast: bool, monkeypatch) -> None:
    data = _doc([_seaweed(raw), _seaweed(b"plain")], encoded=False)
    if not fast:
        monkeypatch.setattr(s3_listing, "_fast_items", lambda _data, _encoded: None)
    assert _keys(data) == _etree_keys(data)


def test_numeric_reference_is_not_read_as_windows_1252() -> None:
    data = _doc([_seaweed(b"&#x80;&#x99;")], encoded=False)
    assert _keys(data) == ["\x80\x99"]


@pytest.mark.parametrize(
    "raw", [b"&eacute;", b"&nbsp;x", b"a&b", b"&#0;", b"&#xD800;", b"&#x110000;", b"&#12a;"]
)
def test_what_xml_does_not_define_is_refused(raw: bytes) -> None:
    """An HTML entity, a bare '&' or a reference to no character: the key would be
    misread, so the page is refused (the walk fails, never lists a wrong key)."""
    with pytest.raises(StorageError):
        s3_listing.parse_list_page(_doc([_seaweed(raw)], encoded=False))


def test_common_prefixes_are_decoded_as_keys() -> None:
    data = _doc([]).replace(
        b"</ListBucketResult>",
        b"<CommonPrefixes><Prefix>a%2Bb+c/</Prefix></CommonPrefixes>"
        b"<CommonPrefixes><Prefix>x&amp;y/</Prefix></CommonPrefixes></ListBucketResult>",
    )
    assert s3_listing.parse_list_folders(data, True) == ["a+b c/", "x&y/"]
    assert s3_listing.parse_list_folders(data, False) == ["a%2Bb+c/", "x&y/"]


def test_request_is_signed_with_the_query_as_sent() -> None:
    """The query is encoded once (RFC 3986 unreserved kept), sorted, and signed so."""
    from botocore.credentials import Credentials

    url, headers = s3_listing.list_request(
        "http://h:9000/b", Credentials("AK", "SK"), "us-east-1", "a b/+", 1000, "t/k=", "/"
    )
    assert url == (
        "http://h:9000/b?continuation-token=t%2Fk%3D&delimiter=%2F&encoding-type=url"
        "&list-type=2&max-keys=1000&prefix=a%20b%2F%2B"
    )
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AK/")
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date" in headers["Authorization"]
