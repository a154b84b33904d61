"""Issue 8, A3: every path parameter refuses traversal in all its disguises with a 400
before any storage request; a neighbouring root (``backups/10`` next to ``backups/1``)
is out of reach.

The one traversal matrix of the suite (the local destination's was also in
tests/api/test_api_isolation.py)."""

from __future__ import annotations

import uuid
from urllib.parse import unquote

from tests.api.helpers import tree_snapshot
from tests.security.conftest import Attack

#: As they appear in the query string (requests quotes what is not URL-safe).
PAYLOADS = [
    "../x",
    "..%2Fx",
    "%2e%2e%2fx",
    "%2e%2e/x",
    "%252e%252e%252fx",
    "..\\x",
    "..%5Cx",
    "/abs",
    "%2Fabs",
    "//x",
    "x//y",
    "%2F%2Fx",
    "x/../../y",
    "x%2F..%2F..%2Fy",
    "x%252F..%252F..%252Fy",
    "..",
    "x/..",
    "./x",
    "x/./y",
    "%00",
    "x%00.dump",
    "x%0a.dump",
    "x%0d%0a.dump",
    "\uff0e\uff0e/x",  # full-width dots
    "%EF%BC%8E%EF%BC%8E/x",
    "x\uff0f..\uff0fy",  # full-width slashes
    "../10/secret.dump",
    "..%2F10%2Fsecret.dump",
]
#: From the API module's tests (tests/api/test_api_isolation.py, merged here): these are
#: refused as ``invalid_path`` exactly, on the local destination as on S3.
STRICT = [
    "../x",
    "../../etc/passwd",
    "%2e%2e%2f",
    "%2e%2e%2fx",
    "%252e%252e%252f",
    "%252e%252e%252fx",
    "..\\x",
    "a\\..\\..\\x",
    "/abs",
    "//x",
    "x/../../y",
    "x/./y",
    "a//b",
    "%00",
    "a%00b",
    "\uff0e\uff0e/x",  # full-width dots
    "x/\uff0e\uff0e/\uff0e\uff0e/y",
    "\uff0e\uff0e\uff0fx",  # and a full-width slash
    "%EF%BC%8E%EF%BC%8E/x",
    "..",
    "%2e%2e",
    "a/%2e%2e/%2e%2e/b",
]
PAYLOADS += [p for p in STRICT if p not in PAYLOADS]
#: Overlong UTF-8 encodings of '.' (invalid UTF-8 that lenient decoders read as '.').
OVERLONG = ["%c0%ae%c0%ae/x", "%c0%ae%c0%ae%2Fx", "%e0%80%ae%e0%80%ae/x"]

DEST = "/api/storage/destinations/{dest}"


def _requests(a: Attack, raw: str, dest_id: uuid.UUID) -> list[tuple[str, str, dict]]:
    base = DEST.format(dest=dest_id)
    files = {"file": ("x.dump", b"payload")}
    prefix = raw if raw.endswith("/") else raw + "/"
    return [
        ("GET", f"{base}/browse?prefix={raw}", {}),
        ("GET", f"{base}/browse?prefix={prefix}", {}),
        ("GET", f"{base}/download?path={raw}", {}),
        ("DELETE", f"{base}/files?path={raw}", {}),
        ("DELETE", f"{base}/files", {"json": {"path": unquote(raw)}}),
        ("POST", f"{base}/upload?path={raw}", {"files": files}),
    ]


def _attack_all(
    a: Attack, payloads: list[str], dest_id: uuid.UUID | None = None
) -> list[tuple[str, str, int, str]]:
    wrong = []
    for raw in payloads:
        codes = ("invalid_path",) if raw in STRICT else ("invalid_path", "bad_request")
        for method, url, kw in _requests(a, raw, dest_id or a.dest.id):
            r = a.request(method, url, headers=a.headers(), **kw)
            if r.status_code != 400 or r.json().get("error") not in codes:
                wrong.append((method, url, r.status_code, r.text[:160]))
    return wrong


def test_traversal_in_every_path_parameter_is_a_400_before_any_storage_request(
    attack: Attack,
) -> None:
    wrong = _attack_all(attack, PAYLOADS)
    assert wrong == [], "\n".join(map(str, wrong))
    assert attack.proxy.request_count == 0, attack.proxy.requests
    assert attack.sent == []


def test_traversal_on_a_local_destination_touches_nothing_in_or_out_of_its_root(
    attack: Attack,
) -> None:
    """The same payloads on a filesystem destination: a file next to its root (what
    ``../x`` would reach) and every file in it stay as they were."""
    a = attack
    (a.local_root / "inside").mkdir()
    (a.local_root / "inside" / "y").write_bytes(b"inside")
    planted = a.local_root.parent / "x"
    planted.write_bytes(b"outside")
    before = tree_snapshot(a.local_root)
    wrong = _attack_all(a, PAYLOADS, a.local.id)
    assert wrong == [], "\n".join(map(str, wrong))
    assert tree_snapshot(a.local_root) == before
    assert planted.read_bytes() == b"outside"
    assert a.sent == []


def test_overlong_utf8_is_a_400_before_any_storage_request(attack: Attack) -> None:
    wrong = _attack_all(attack, OVERLONG)
    assert wrong == [], "\n".join(map(str, wrong))
    assert attack.proxy.request_count == 0, attack.proxy.requests


def test_a_neighbouring_root_is_out_of_reach(attack: Attack) -> None:
    """Root ``backups/1``: ``0/secret.dump`` must not become ``backups/10/secret.dump``."""
    a = attack
    base = DEST.format(dest=a.dest.id)
    h = a.headers()
    r = a.request("GET", f"{base}/download?path=0/secret.dump", headers=h)
    assert r.status_code == 404, r.text
    r = a.request("DELETE", f"{base}/files?path=0/secret.dump", headers=h)
    assert r.status_code == 404, r.text
    listing = a.request("GET", f"{base}/browse", headers=h).json()
    assert [e["path"] for e in listing["files"]] == ["x.dump"]
    listing = a.request("GET", f"{base}/browse?prefix=0", headers=h).json()
    assert listing["files"] == []
    keys = {o["Key"] for o in a.s3.client().list_objects_v2(Bucket=a.bucket)["Contents"]}
    assert "backups/10/secret.dump" in keys
    # Every request that reached the server stayed under the root.
    for _method, target in a.proxy.requests:
        path = unquote(target.split("?")[0])
        query = unquote(target.partition("?")[2])
        assert "backups/10" not in path and "backups/10" not in query, target
