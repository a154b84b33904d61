"""Issue 8, A3: every path parameter refuses traversal in all its disguises with a 400
before any storage request; a neighbouring root (``backups/10`` next to ``backups/1``)
is out of reach."""

from __future__ import annotations

from urllib.parse import unquote

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
#: Overlong UTF-8 encodings of '.' (invalid UTF-8 that lenient decoders read as '.').
OVERLONG = ["%c0%ae%c0%ae/x", "%c0%ae%c0%ae%2Fx", "%e0%80%ae%e0%80%ae/x"]

DEST = "/api/storage/destinations/{dest}"


def _requests(a: Attack, raw: str) -> list[tuple[str, str, dict]]:
    base = DEST.format(dest=a.dest.id)
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


def _attack_all(a: Attack, payloads: list[str]) -> list[tuple[str, str, int, str]]:
    wrong = []
    for raw in payloads:
        for method, url, kw in _requests(a, raw):
            r = a.request(method, url, headers=a.headers(), **kw)
            if r.status_code != 400 or r.json().get("error") not in ("invalid_path", "bad_request"):
                wrong.append((method, url, r.status_code, r.text[:160]))
    return wrong


def test_traversal_in_every_path_parameter_is_a_400_before_any_storage_request(
    attack: Attack,
) -> None:
    wrong = _attack_all(attack, PAYLOADS)
    assert wrong == [], "\n".join(map(str, wrong))
    assert attack.proxy.request_count == 0, attack.proxy.requests
    assert attack.sent == []


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
