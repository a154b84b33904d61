"""Raw S3 over http.client: a small SigV4 signer for fast bulk PUTs, and the reference
"limit" walk (botocore-signed ListObjectsV2 GETs, a cheap regex parser, one connection).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import queue
import re
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from bench.servers import ACCESS_KEY, REGION, SECRET_KEY

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class Signer:
    """SigV4 for path-style requests to one host (cached signing key per day)."""

    def __init__(self, host: str, access: str = ACCESS_KEY, secret: str = SECRET_KEY) -> None:
        self.host = host
        self.access = access
        self.secret = secret
        self._day = ""
        self._key = b""

    def headers(
        self, method: str, path: str, query: str = "", payload_sha: str = EMPTY_SHA
    ) -> dict[str, str]:
        now = datetime.now(UTC)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz[:8]
        if day != self._day:
            k = _hmac(("AWS4" + self.secret).encode(), day)
            k = _hmac(_hmac(_hmac(k, REGION), "s3"), "aws4_request")
            self._day, self._key = day, k
        canonical = "\n".join(
            [
                method,
                path,
                query,
                f"host:{self.host}\nx-amz-content-sha256:{payload_sha}\nx-amz-date:{amz}\n",
                "host;x-amz-content-sha256;x-amz-date",
                payload_sha,
            ]
        )
        scope = f"{day}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        sig = hmac.new(self._key, to_sign.encode(), hashlib.sha256).hexdigest()
        return {
            "Host": self.host,
            "x-amz-date": amz,
            "x-amz-content-sha256": payload_sha,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={self.access}/{scope}, "
                f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"
            ),
        }


def _conn(endpoint: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(endpoint)
    host = parts.netloc
    assert parts.hostname, endpoint
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60), host


def request(
    endpoint: str, method: str, path: str, body: bytes = b"", query: str = ""
) -> tuple[int, bytes]:
    conn, host = _conn(endpoint)
    try:
        sha = hashlib.sha256(body).hexdigest()
        hdrs = Signer(host).headers(method, path, query, sha)
        conn.request(method, path + ("?" + query if query else ""), body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def create_bucket(endpoint: str, bucket: str) -> None:
    status, body = request(endpoint, "PUT", f"/{bucket}")
    if status not in (200, 409) and b"BucketAlreadyOwnedByYou" not in body:
        raise RuntimeError(f"create bucket {bucket}: {status} {body[:300]!r}")


def put_many(
    endpoint: str, bucket: str, items: Iterable[tuple[str, int]], threads: int = 24
) -> int:
    """PUT ``(key, size)`` items with ``threads`` keep-alive connections; returns count."""
    work: queue.Queue[tuple[str, int] | None] = queue.Queue(maxsize=threads * 64)
    done = [0] * threads
    errors: list[str] = []

    def worker(slot: int) -> None:
        conn, host = _conn(endpoint)
        signer = Signer(host)
        while (item := work.get()) is not None:
            key, size = item
            body = b"b" * size
            path = f"/{bucket}/" + quote(key, safe="/-_.~")
            for attempt in range(5):
                try:
                    hdrs = signer.headers("PUT", path, "", hashlib.sha256(body).hexdigest())
                    hdrs["Content-Length"] = str(size)
                    conn.request("PUT", path, body=body, headers=hdrs)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        done[slot] += 1
                        break
                    if attempt == 4:
                        errors.append(f"{key}: HTTP {resp.status}")
                except (OSError, http.client.HTTPException) as err:
                    conn.close()
                    conn, host = _conn(endpoint)
                    time.sleep(0.2 * (attempt + 1))
                    if attempt == 4:
                        errors.append(f"{key}: {err}")
        conn.close()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for item in items:
        work.put(item)
    for _ in pool:
        work.put(None)
    for t in pool:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} PUTs failed, e.g. {errors[:3]}")
    return sum(done)


_ENTRY = re.compile(rb"<Key>([^<]*)</Key>.*?<Size>(\d+)</Size>", re.S)
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")
_TRUNC = re.compile(rb"<IsTruncated>true</IsTruncated>")
_PARSE = re.compile(r"^([^/]+)/([^/]+)/([^/]+)/(\d{4})/(\d\d)/(\d\d)/(.+)$")


def raw_walk(endpoint: str, bucket: str, prefix: str = "") -> dict[str, int]:
    """The reference limit: botocore-signed ListObjectsV2 GETs on one connection, a
    regex for Key/Size and a cheap key parser (org/project/instance/date/name)."""
    from html import unescape

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    creds = Credentials(ACCESS_KEY, SECRET_KEY)
    auth = S3SigV4Auth(creds, "s3", REGION)
    parts = urlsplit(endpoint)
    assert parts.hostname, endpoint
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    token: str | None = None
    files = total = parsed = 0
    while True:
        params = "list-type=2&max-keys=1000"
        if prefix:
            params += "&prefix=" + quote(prefix, safe="")
        if token:
            params += "&continuation-token=" + quote(token, safe="")
        url = f"{endpoint}/{bucket}?{params}"
        req = AWSRequest(method="GET", url=url)
        auth.add_auth(req)
        hdrs = dict(req.headers.items())
        conn.request("GET", f"/{bucket}?{params}", headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"list: HTTP {resp.status} {body[:300]!r}")
        for key_raw, size in _ENTRY.findall(body):
            key = unescape(key_raw.decode())
            files += 1
            total += int(size)
            if _PARSE.match(key):
                parsed += 1
        if not _TRUNC.search(body):
            break
        m = _TOKEN.search(body)
        if not m:
            break
        token = unescape(m.group(1).decode())
    conn.close()
    return {"files": files, "bytes": total, "parsed": parsed}


_PREFIX = re.compile(rb"<CommonPrefixes><Prefix>([^<]*)</Prefix></CommonPrefixes>")


def top_prefixes(endpoint: str, bucket: str) -> tuple[list[str], int]:
    """The bucket's top-level folders (delimiter '/'), and how many keys sit at the top."""
    from html import unescape

    found: list[str] = []
    loose = 0
    token: str | None = None
    while True:
        query = "delimiter=%2F&list-type=2&max-keys=1000"
        if token:
            query += "&continuation-token=" + quote(token, safe="")
        status, body = request(endpoint, "GET", f"/{bucket}", query=query)
        if status != 200:
            raise RuntimeError(f"list prefixes: HTTP {status} {body[:300]!r}")
        found += [unescape(p.decode()) for p in _PREFIX.findall(body)]
        loose += len(_ENTRY.findall(body))
        m = _TOKEN.search(body)
        if not _TRUNC.search(body) or not m:
            return found, loose
        token = unescape(m.group(1).decode())


def _walk_one(args: tuple[str, str, str]) -> dict[str, int]:
    return raw_walk(*args)


def fanout_walk(endpoint: str, bucket: str, processes: int = 4) -> dict[str, int]:
    """The raw signed walk fanned out over the top-level folders in ``processes``
    worker processes (one connection each): what a parallel listing gets from the
    server when the key layout has a known first level."""
    import multiprocessing

    prefixes, loose = top_prefixes(endpoint, bucket)
    totals = {"files": 0, "bytes": 0, "parsed": 0, "prefixes": len(prefixes)}
    if loose:  # keys at the top level: one more walk would double count the folders
        raise RuntimeError("fanout_walk expects every key under a top-level folder")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        for part in pool.imap_unordered(_walk_one, [(endpoint, bucket, p) for p in prefixes]):
            for k in ("files", "bytes", "parsed"):
                totals[k] += part[k]
    return totals


def boto3_client(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def boto3_walk(endpoint: str, bucket: str) -> dict[str, int]:
    """A bare boto3 ListObjectsV2 paginator loop."""
    client = boto3_client(endpoint)
    files = total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            files += 1
            total += obj["Size"]
    return {"files": files, "bytes": total}


def delete_per_key(endpoint: str, bucket: str, keys: list[str]) -> dict[str, float]:
    """One DeleteObject per key, one boto3 client, serial."""
    client = boto3_client(endpoint)
    t0 = time.perf_counter()
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)
    wall = time.perf_counter() - t0
    return {"deleted": len(keys), "seconds": wall}
