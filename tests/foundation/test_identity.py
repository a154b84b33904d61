"""storage_backends.identity: canonical spellings and the one comparison of locations.

The properties that make every deleting path safe: spellings of one endpoint or one
directory are one location; any two destinations that may name the same storage share
a lock key; and the comparison is symmetric."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_backends import identity
from storage_backends.identity import (
    RelativeBaseDirectory,
    canonical_dir,
    canonical_endpoint,
    location_key,
    lock_key,
    locks_conflict,
    may_name_same_storage,
    overlaps,
    spelled,
)


@pytest.mark.parametrize(
    "spelling",
    [
        "http://h:9000",
        "http://h:9000/",
        "HTTP://H:9000",
        "http://h:9000/.",
        "http://h:9000//",
        "http://h:9000/a/..",
        "Http://H:9000/./",
    ],
)
def test_spellings_of_one_endpoint_are_one(spelling: str) -> None:
    assert canonical_endpoint("s3", spelling) == "http://h:9000"


def test_default_ports_ipv6_and_idna() -> None:
    assert canonical_endpoint("s3", "https://h:443/") == canonical_endpoint("s3", "https://h")
    assert canonical_endpoint("s3", "http://h:80") == "http://h"
    assert canonical_endpoint("s3", "h:9000") == "https://h:9000"  # the clients' default
    assert canonical_endpoint("gcs", "http://[0:0::1]:80/") == "http://[::1]"
    assert canonical_endpoint("s3", "http://Bücher.example") == "http://xn--bcher-kva.example"
    assert canonical_endpoint("sftp", "Host") == canonical_endpoint("sftp", "host:22")
    assert canonical_endpoint("sftp", "[127.0.0.1]:2222") == "127.0.0.1:2222"
    assert canonical_endpoint("sftp", "sftp://[::1]:22") == "[::1]:22"
    assert canonical_endpoint("local", "anything") == ""


def test_base_directories_are_absolute_and_lexically_normal() -> None:
    assert canonical_dir("/data//x/./y/../") == "/data/x"
    assert canonical_dir("/") == canonical_dir("//") == "/"
    with pytest.raises(RelativeBaseDirectory, match="not absolute"):
        canonical_dir("data/x")


def test_hosts_never_separate_directories_and_neither_do_file_system_kinds() -> None:
    a = spelled("sftp", "localhost:22", "/srv/b", "")
    b = spelled("sftp", "127.0.0.1:22", "/srv", "b/")
    c = spelled("sftp", "another.example:2222", "/srv/b/c/", "")
    d = spelled("local", "", "/srv/b", "")  # an SFTP server may serve this machine
    assert overlaps(a, b) and overlaps(a, c) and overlaps(b, c)
    assert may_name_same_storage(a, d) and overlaps(b, d)
    assert not may_name_same_storage(a, spelled("s3", "", "srv", "b/"))
    assert not overlaps(spelled("sftp", "h", "/srv/b", ""), spelled("sftp", "h", "/srv/bc", ""))


def test_a_relative_base_directory_may_be_any_directory() -> None:
    rel = spelled("local", "", "store", "")
    assert may_name_same_storage(rel, spelled("local", "", "/elsewhere", ""))


def test_object_stores_match_on_the_bucket_whatever_the_endpoint() -> None:
    a = spelled("s3", "http://h:9000", "bucket", "b/")
    assert may_name_same_storage(a, spelled("s3", "https://other.example", "Bucket", "x/"))
    assert not overlaps(a, spelled("s3", "http://h:9000", "bucket", "x/"))
    assert overlaps(a, spelled("s3", "", "bucket", "B/1/"))  # roots compared loosely
    assert not may_name_same_storage(a, spelled("s3", "http://h:9000", "other", "b/"))
    # S3 may be GCS's XML API: an object store of the same bucket name, whatever kind
    assert may_name_same_storage(a, spelled("gcs", "https://storage.googleapis.com", "bucket", ""))
    assert not may_name_same_storage(a, spelled("gcs", "http://h:9000", "other", "b/"))
    assert not may_name_same_storage(a, spelled("local", "", "/bucket", "b/"))


def test_one_location_spelled_two_ways_has_one_key() -> None:
    a = spelled("s3", "http://h:9000", "bucket", "b")
    b = spelled("s3", "HTTP://H:9000/", "bucket", "/b/")
    assert location_key(a) == location_key(b)
    assert location_key(a) != location_key(spelled("s3", "http://h:9001", "bucket", "b"))
    outer = spelled("local", "", "/data", "x/")
    inner = spelled("local", "", "/data/x/.", "")
    assert location_key(outer) == location_key(inner)


# -- properties -----------------------------------------------------------------------
HOSTS = ["h", "H", "127.0.0.1", "localhost", "[::1]", "other.example"]
DIRS = ["/", "/srv", "/srv/", "/srv/b", "/srv//b/.", "/srv/b/../c", "/srv/bc", "rel", "rel/x"]
ROOTS = ["", "b/", "B/", "b/1/", "b/10/", "x/"]


@st.composite
def destinations(draw: st.DrawFn) -> identity.DestinationLike:
    kind = draw(st.sampled_from(["s3", "gcs", "sftp", "local"]))
    host = draw(st.sampled_from(HOSTS))
    if kind in identity.PATH_KINDS:
        port = draw(st.sampled_from(["", ":22", ":2222"]))
        return spelled(kind, host + port, draw(st.sampled_from(DIRS)), draw(st.sampled_from(ROOTS)))
    endpoint = draw(st.sampled_from(["", f"http://{host}:9000", f"HTTP://{host}:9000/."]))
    bucket = draw(st.sampled_from(["bkt", "BKT", "other"]))
    return spelled(kind, endpoint, bucket, draw(st.sampled_from(ROOTS)))


@settings(max_examples=400, deadline=None)
@given(destinations(), destinations())
def test_maybe_the_same_storage_is_symmetric_and_shares_a_lock(
    a: identity.DestinationLike, b: identity.DestinationLike
) -> None:
    assert may_name_same_storage(a, b) == may_name_same_storage(b, a)
    assert overlaps(a, b) == overlaps(b, a)
    if overlaps(a, b):
        # rule 19: they never run destructive jobs at once
        assert locks_conflict(lock_key(a), lock_key(b))
    assert locks_conflict(lock_key(a), lock_key(b)) == locks_conflict(lock_key(b), lock_key(a))
    if location_key(a) == location_key(b):
        assert overlaps(a, b)  # one location is always "maybe the same storage"
