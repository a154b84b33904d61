"""``docs/api.md`` from the OpenAPI document the API serves.

``python -m api.docs > docs/api.md`` regenerates it: the document is fetched from a real
app (``GET /api/openapi.json`` through Flask's test client, no server or database
needed), each operation's purpose is its summary plus the docstring of the Flask view
that serves it. ``tests/api/test_api_docs.py`` fails when the file differs from what
this prints, so the reference and the API cannot drift apart.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from api.auth import MAX_SUB_LENGTH, SUBJECT_CACHE_TTL_SECONDS

J = dict[str, Any]

COMMAND = "python -m api.docs > docs/api.md"
METHODS = ("get", "post", "put", "patch", "delete")
#: example values of required query parameters, by name (others become $NAME)
EXAMPLE_QUERY = {"path": "acme/shop-db/2026/11/01/backup-1101.tar.gz"}
EXAMPLE_FILE = "backup-1101.tar.gz"


def served() -> tuple[J, dict[tuple[str, str], str]]:
    """(the served OpenAPI document, {(METHOD, openapi path): view docstring})."""
    from sqlalchemy import create_engine

    from api import create_app
    from core.settings import Settings

    app = create_app(
        Settings(jwt_secret="docs-only-" + "0" * 32),
        engine=create_engine("sqlite://"),
        send=lambda *_args: None,
        allow_insecure_secret=True,
    )
    response = app.test_client().get("/api/openapi.json")
    assert response.status_code == 200, response.status_code
    document: J = json.loads(response.get_data(as_text=True))
    docs: dict[tuple[str, str], str] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", "{}", rule.rule)
        text = app.view_functions[rule.endpoint].__doc__ or ""
        for method in rule.methods or ():
            docs[(method, path)] = _clean_docstring(text)
    return document, docs


def _clean_docstring(text: str) -> str:
    """The first paragraph of a docstring, reST roles made Markdown."""
    first = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    first = " ".join(first.split())
    first = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", first)
    return first.replace("``", "`")


def _key(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def _anchor(text: str) -> str:
    """GitHub's heading anchor."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ref_name(schema: J) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def type_of(schema: J) -> str:
    """A schema as a short Markdown phrase."""
    name = _ref_name(schema)
    if name:
        return f"[{name}](#{_anchor(name)})"
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    parts = []
    for k in kinds:
        if k == "array":
            parts.append(f"array of {type_of(schema.get('items', {}))}")
        elif k == "string" and schema.get("format"):
            parts.append(f"string ({schema['format']})")
        elif k == "object" and isinstance(schema.get("additionalProperties"), dict):
            parts.append(f"object of {type_of(schema['additionalProperties'])}")
        else:
            parts.append(str(k))
    text = " or ".join(parts)
    if "enum" in schema:
        text += ", one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    return text


def constraints(schema: J) -> str:
    out = []
    if "minimum" in schema or "maximum" in schema:
        out.append(f"{schema.get('minimum', '…')} to {schema.get('maximum', '…')}")
    if "minLength" in schema or "maxLength" in schema:
        out.append(f"length {schema.get('minLength', 0)} to {schema.get('maxLength', '…')}")
    if "pattern" in schema:
        out.append(f"pattern `{schema['pattern']}`")
    return "; ".join(out)


def fields(schema: J, prefix: str = "") -> list[tuple[str, str, bool, str]]:
    """(name, type, required, description) of an object schema's properties; inline
    objects (and arrays of them) are expanded with dotted names."""
    rows: list[tuple[str, str, bool, str]] = []
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        full = f"{prefix}{name}"
        description = "; ".join(x for x in (sub.get("description", ""), constraints(sub)) if x)
        rows.append((full, type_of(sub), name in required, description))
        if sub.get("type") == "object" and "properties" in sub:
            rows += fields(sub, f"{full}.")
        items = sub.get("items", {})
        if sub.get("type") == "array" and isinstance(items, dict) and "properties" in items:
            rows += fields(items, f"{full}[].")
    if schema.get("additionalProperties") is False:
        rows.append(("(other fields)", "", False, "rejected (400)"))
    return rows


def field_table(schema: J) -> list[str]:
    rows = fields(schema)
    if not rows:
        return ["An object with no fields (`{}`)." if schema.get("type") == "object" else ""]
    out = ["| Field | Type | Required | Description |", "|---|---|---|---|"]
    for name, kind, required, description in rows:
        out.append(f"| `{name}` | {_cell(kind)} | {'yes' if required else 'no'} | "
                   f"{_cell(description)} |")  # fmt: skip
    return out


def example_value(schema: J) -> Any:
    if "example" in schema:
        return schema["example"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "boolean":
        return True
    if kind == "integer":
        return max(schema.get("minimum", 30), min(30, schema.get("maximum", 30)))
    if kind == "object":
        return {k: example_value(v) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [example_value(schema.get("items", {}))]
    return "text"


def _var(param: J) -> str:
    """The shell variable of a path parameter: destId -> DEST_ID, id "Job id" -> JOB_ID."""
    base = param["description"] if param["name"] == "id" else param["name"]
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", base)
    return re.sub(r"[^A-Za-z0-9]+", "_", words).strip("_").upper()


def curl(method: str, path: str, op: J, params: list[J]) -> str:
    url = path
    for p in params:
        if p["in"] == "path":
            enum = p.get("schema", {}).get("enum")
            url = url.replace("{" + p["name"] + "}", enum[0] if enum else "$" + _var(p))
    body = op.get("requestBody", {}).get("content", {})
    json_props = body.get("application/json", {}).get("schema", {}).get("properties", {})
    query = []
    for p in params:  # required ones, and those a JSON body could carry instead
        if p["in"] == "query" and (p.get("required") or p["name"] in json_props):
            value = EXAMPLE_QUERY.get(p["name"], "$" + _var(p))
            query.append(f"{p['name']}={value}")
    if query:
        url += "?" + "&".join(query)
    parts = ["curl -sS"]
    if method != "get":
        parts.append(f"-X {method.upper()}")
    if op.get("security", None) != []:
        parts.append('-H "Authorization: Bearer $TOKEN"')
    if "multipart/form-data" in body:
        props = body["multipart/form-data"]["schema"].get("properties", {})
        for name, sub in props.items():
            if sub.get("format") == "binary":
                parts.append(f'-F "{name}=@{EXAMPLE_FILE}"')
    elif "application/json" in body:
        schema = body["application/json"]["schema"]
        in_query = {p["name"] for p in params if p["in"] == "query"}
        props = schema.get("properties", {})
        if props and not set(props) & in_query:  # a body that only repeats the query: left out
            payload = json.dumps(example_value(schema))
            parts.append(f"-H 'Content-Type: application/json' -d '{payload}'")
    parts.append(f'"$BASE{url}"')
    return " ".join(parts)


#: The "Tokens and roles" section.
TOKENS_AND_ROLES = [
    "## Tokens and roles",
    "",
    "The claims are read under configurable names, for an identity provider that uses "
    "others: `OCORE_JWT_CLAIM_SUB` (default `sub`: the user id), `OCORE_JWT_CLAIM_ORG` "
    "(default `org`: the organization uuid) and `OCORE_JWT_CLAIM_ROLE` (default `role`). "
    "`ocore-storage token` writes the same names, and a 401 names the claim as configured "
    "(`claim 'tenant' must be an organization uuid`). The role is one string (a list or "
    "any other value is a 401), one of four:",
    "",
    "| Role value | Who | Reaches |",
    "|---|---|---|",
    "| `OCORE_PLATFORM_ADMIN_ROLE` (default `platform_admin`) | the platform administrator "
    "(the operator's staff) | every organization's destinations, projects and jobs; "
    "`/api/admin/*` (the archive); destination policies; approvals in any organization; "
    "the full text of storage errors. The organization claim may be left out (the nil "
    "uuid) |",
    "| `admin` | an organization's admin | its own organization only, like a member, plus "
    "what needs that organization's admin (approving a deletion plan of its "
    "destinations); 403 on the platform administrator's routes, 404 on other "
    "organizations' objects |",
    "| `member` | a user of an organization | its organization's destinations, projects "
    "and jobs: reads and writes (upload, delete, jobs); anything else is 404, saying "
    "nothing about whether it exists |",
    "| `viewer` | a read-only user | what a member of its organization reads; any "
    "upload, file delete, job request or change is 403 `forbidden` |",
    "",
    "`admin`, `member` and `viewer` need an organization claim (a real uuid, not the "
    "nil one): without it the token is a 401. `OCORE_PLATFORM_ADMIN_ROLE` may not be one "
    "of those three. An endpoint's `403` response (listed with it below) says which "
    "callers it refuses.",
    "",
    "How the API tier maps its users onto these tokens: a user whose organization role "
    "is `admin` (the `users.role` column) gets role `admin` and their organization; a "
    "user whose organization role is `member` gets `member` (or `viewer` for read-only "
    "access) and their organization; platform staff get the `OCORE_PLATFORM_ADMIN_ROLE` "
    "value. Never mint the platform administrator's value from a user's organization "
    "role: an organization's admin must not reach every other organization. "
    "`ocore-storage token --role platform_admin|admin|member|viewer [--org <uuid>]` mints "
    "development tokens (`--org` is required except for `platform_admin`).",
    "",
]


def operation(method: str, path: str, op: J, purpose: str) -> list[str]:
    params: list[J] = op.get("parameters", [])
    public = op.get("security", None) == []
    out = [f"### `{method.upper()} {path}`", ""]
    text = f"**{op['summary']}.**"
    if purpose and purpose.rstrip(".").lower() != op["summary"].lower():
        text += f" {purpose}"
    out += [text, ""]
    auth = "none (public)" if public else "bearer token"
    forbidden = op.get("responses", {}).get("403")
    if forbidden:  # who is refused: see "Tokens and roles"
        description = forbidden.get("description") or "forbidden"
        auth += f"; 403: {description[:1].lower()}{description[1:]}"
    out += [f"Authentication: {auth}. Tag: `{', '.join(op.get('tags', []))}`.", ""]
    out += ["**Parameters**", ""]
    if params:
        out += ["| Name | In | Type | Required | Description |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            desc = "; ".join(x for x in (p.get("description", ""), constraints(schema)) if x)
            out.append(f"| `{p['name']}` | {p['in']} | {_cell(type_of(schema))} | "
                       f"{'yes' if p.get('required') else 'no'} | {_cell(desc)} |")  # fmt: skip
    else:
        out.append("None.")
    out += ["", "**Request body**", ""]
    body = op.get("requestBody")
    if body:
        required = "required" if body.get("required") else "optional"
        if body.get("description"):
            out += [f"{body['description']}", ""]
        for ctype, content in body.get("content", {}).items():
            out += [f"`{ctype}` ({required}):", ""]
            out += field_table(content.get("schema", {}))
            out.append("")
    else:
        out += ["None.", ""]
    out += ["**Responses**", "", "| Status | Body | Description |", "|---|---|---|"]
    for status, resp in op.get("responses", {}).items():
        bodies = [f"`{ctype}`: {type_of(c.get('schema', {}))}"
                  for ctype, c in resp.get("content", {}).items()]  # fmt: skip
        desc = resp.get("description", "")
        headers = resp.get("headers", {})
        if headers:
            desc += "; headers: " + ", ".join(
                f"`{h}` ({v.get('description', '')})" for h, v in headers.items()
            )
        out.append(f"| {status} | {_cell('<br>'.join(bodies) or 'none')} | {_cell(desc)} |")
    out += ["", "**Example**", "", "```sh", curl(method, path, op, params), "```", ""]
    return out


def render(document: J, purposes: dict[tuple[str, str], str] | None = None) -> str:
    """The Markdown reference of an OpenAPI document."""
    purposes = purposes or {}
    info = document.get("info", {})
    ops = [(m, p, o) for p, item in document.get("paths", {}).items()
           for m, o in item.items() if m in METHODS]  # fmt: skip
    out = [
        "# HTTP API reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the OpenAPI document the API serves at "
        "/api/openapi.json. Do not edit by hand: tests/api/test_api_docs.py fails when this "
        "file differs from the generated one. -->",
        "",
        f"{info.get('title', 'API')}, version {info.get('version', '?')} (OpenAPI "
        f"{document.get('openapi', '?')}). {info.get('description', '')}",
        "",
        "The API is served by `ocore-storage api` (or `ocore-storage serve`), on "
        "`OCORE_API_HOST:OCORE_API_PORT` (default 127.0.0.1:8080). The machine-readable "
        "document is `GET /api/openapi.json`.",
        "",
        "## Authentication and errors",
        "",
        "Every endpoint not marked public needs `Authorization: Bearer <JWT>`, a token "
        "with a subject (user id), an organization (uuid), a role and `exp` (the claims and "
        "roles: [Tokens and roles](#tokens-and-roles)). HS* tokens are verified with "
        "`OCORE_JWT_SECRET`, RS*/ES*/PS* ones with `OCORE_JWT_PUBLIC_KEY`, among the "
        "algorithms of `OCORE_JWT_ALGORITHMS`. "
        "A token outlives no subject: when the subject names a user that is archived "
        "(soft-deleted) or whose organization is archived, or the organization claim names "
        'an archived organization, the token is refused with 401 `unauthorized` ("the '
        "token's subject is no longer active: ...\"). Each user's and organization's "
        f"standing is remembered for {SUBJECT_CACHE_TTL_SECONDS:g} seconds per API process, "
        "so an archive takes effect within a minute at most, a restore likewise. A subject "
        "that names no user (a service identity, e.g. `ocore-storage token`'s default "
        "`dev-user`) and the nil organization of a platform administrator's token are not "
        "checked. "
        "Every error body is an [Error](#error) object, "
        '`{"error": code, "message": text}`.',
        "",
        *TOKENS_AND_ROLES,
        f"The subject claim is 1 to {MAX_SUB_LENGTH} printable characters (it is recorded as "
        "who requested a job or deleted a file): a longer one, an empty one, or one with a "
        "control character (NUL, newline, escape...), a lone surrogate or a line separator "
        "is refused with 401 `unauthorized` before anything is written. The organization "
        "claim must be a uuid and the role one string of the four roles, likewise (the "
        "message names the claim).",
        "",
        "Error messages hold no server internals for anyone but the platform administrator "
        "(members, viewers and organizations' admins alike): when the storage fails (502 "
        "`storage_error`, `storage_permission_denied`; 503 `storage_unavailable`, "
        "`backend_unavailable`; 404 `not_found` from the storage) or a file operation meets "
        "a configuration problem (409 `link_check_failed`), they get a fixed message that "
        "names the destination and what happened in kind and, where an administrator has "
        "to look, a reference: the request's `X-Request-ID`, or an id of the server's. "
        "The platform administrator gets the full text (endpoint address, bucket, base "
        "directory, secrets directory, `OCORE_CREDENTIALS_*` variable...), and the service "
        "log (`api.errors`) always has it under that reference. The status and the code "
        "are the same for every role. A 400 `invalid_path` and a 409 `path_conflict` name "
        "the caller's path relative to the destination, never an absolute one. A job's "
        "`error` (and its result's `error`), as `GET /api/jobs/{id}` shows it to anyone "
        "but the platform administrator, has URLs, absolute paths, IP addresses and "
        "`OCORE_*` names replaced by `<address>`, `<path>` and `<setting>`; the platform "
        "administrator reads it whole.",
        "",
        "Every answer carries `Cache-Control: no-store`. A browse `next_cursor` is valid "
        "only for the destination and prefix that returned it, passed back unchanged: it "
        "is signed with a key derived from the token-verification settings (the same on "
        "every API replica), and any other cursor is refused with 400 `invalid_cursor` "
        "before the storage is asked anything.",
        "",
        "Optional rate limiting (off by default): with `OCORE_API_RATE_LIMIT` set (e.g. "
        "`100/minute;2000/hour`), a client address over it gets 429 `rate_limited` with "
        "`Retry-After`; `/healthz`, `/readyz` and `/metrics` are never limited. The counts "
        "live in each API process, or in Redis (`OCORE_API_RATE_LIMIT_STORAGE`) to be shared "
        "by every replica.",
        "",
        "Uploads and downloads. Names starting with `.ocore-upload-` (any case, in any "
        "segment, also once %-decoded or NFKC-folded) are reserved for the server's uploads "
        "in progress: a path or prefix holding one is refused with 400 `invalid_path` by "
        "upload, download, delete and browse. An upload over an existing file replaces it "
        "and is audited like a delete (an audit row and a log line of reason `overwrite`, "
        "with who, the replaced file's size and etag and the new ones); the answer names "
        "what it replaced (`replaced`). A destination whose `options.overwrite` is "
        "`refuse` keeps the file instead: 409 `file_exists`. Each API process moves at "
        "most `OCORE_API_MAX_TRANSFERS` files at once (uploads and streamed downloads; half "
        "its request threads by default); one more is refused with 503 `busy` and "
        "`Retry-After`: retry it. A local or SFTP destination whose base directory is "
        "missing answers 503 `backend_unavailable` (never an empty listing, and an upload "
        "never creates it).",
        "",
        "The examples use two shell variables:",
        "",
        "```sh",
        "export BASE=http://127.0.0.1:8080",
        'export TOKEN=$(ocore-storage token --org "$ORG_ID" --role platform_admin)  # signed '
        "with the configured key",
        "```",
        "",
        "and one per path parameter (`$DEST_ID`, `$JOB_ID`...): ids of your data.",
        "",
        "## Endpoints",
        "",
        "| Method | Path | Summary |",
        "|---|---|---|",
    ]
    for method, path, op in ops:
        heading = f"{method.upper()} {path}"
        out.append(f"| {method.upper()} | [`{path}`](#{_anchor(heading)}) | {op['summary']} |")
    out.append("")
    for method, path, op in ops:
        purpose = purposes.get((method.upper(), _key(path)), "")
        out += operation(method, path, op, purpose)
    out += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [schema["description"], ""]
        out += field_table(schema)
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def generate() -> str:
    """docs/api.md as it should be."""
    document, purposes = served()
    return render(document, purposes)


def main() -> None:
    sys.stdout.write(generate())


if __name__ == "__main__":
    main()
