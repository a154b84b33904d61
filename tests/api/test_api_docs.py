"""docs/api.md is generated from the OpenAPI document the API serves (``api.docs``):
regenerated here, it must equal the file in the repository, and its curl examples must
work against a real app on the test database."""

from __future__ import annotations

import copy
import io
import re
import shlex
import uuid
from datetime import timedelta
from pathlib import Path

from api.docs import COMMAND, EXAMPLE_FILE, EXAMPLE_QUERY, generate, render, served
from api.tokens import mint_token
from db.models import StorageAnalytics
from db.types import utcnow
from storage_backends.paths import trash_key
from tests.factories import make_backup
from worker.jobs import request_job

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"


def test_docs_api_md_is_the_generated_reference() -> None:
    expected = generate()
    current = DOC.read_text() if DOC.exists() else ""
    assert current == expected, (
        f"docs/api.md differs from the served OpenAPI document: regenerate it with "
        f"`.venv/bin/{COMMAND}` and commit the result"
    )


def test_every_served_operation_has_a_complete_section() -> None:
    document, purposes = served()
    text = DOC.read_text()
    sections = re.split(r"^### ", text, flags=re.M)
    for path, item in document["paths"].items():
        for method, op in item.items():
            heading = f"`{method.upper()} {path}`"
            found = [s for s in sections if s.startswith(heading + "\n")]
            assert len(found) == 1, heading
            section = found[0]
            for status in op["responses"]:
                assert f"\n| {status} | " in section, (heading, status)
            for param in op.get("parameters", []):
                assert f"| `{param['name']}` | {param['in']} |" in section, (heading, param)
            assert "```sh\ncurl -sS " in section, heading
    assert len(purposes) > 0


def test_a_change_of_the_document_changes_the_reference() -> None:
    """The drift check can fail: a new operation, parameter or status shows up."""
    document, purposes = served()
    before = render(document, purposes)
    changed = copy.deepcopy(document)
    op = changed["paths"]["/api/jobs/{id}"]["get"]
    op["parameters"].append(
        {"name": "verbose", "in": "query", "required": False, "description": "More detail",
         "schema": {"type": "boolean"}}
    )  # fmt: skip
    op["responses"]["410"] = {"description": "Gone"}
    changed["paths"]["/api/new-thing"] = {"get": {"summary": "A new thing", "responses": {}}}
    after = render(changed, purposes)
    assert after != before
    assert "| `verbose` | query | boolean | no | More detail |" in after
    assert "| 410 | none | Gone |" in after
    assert "### `GET /api/new-thing`" in after


def _analytics(db, dest) -> None:
    finished = utcnow()
    row = StorageAnalytics(destination_id=dest.id, started_at=finished - timedelta(seconds=5),
                           finished_at=finished, details={})  # fmt: skip
    db.add(row)
    db.commit()


def _dry_run(db, dest) -> uuid.UUID:
    """A succeeded dry-run orphan cleanup with a (empty) plan: readable and approvable."""
    job, _ = request_job(db, "orphan_cleanup", dest, {"dry_run": True}, requested_by="docs")
    planned = {"plan_complete": True, "plan_files": 0, "plan_bytes": 0, "total_files": 0}
    job.progress = {**planned, "planned_at": utcnow().isoformat()}
    job.status = "succeeded"
    db.commit()
    return job.id


def test_the_curl_examples_work(client, settings, env, ids, db) -> None:
    """Each example, its shell variables filled in, sent to the app as curl would send
    it: every one gets a 2xx answer."""
    _analytics(db, env.dest)
    settings.broker_dir.mkdir(parents=True)  # the filesystem broker exists: /readyz is 200
    target = env.root / EXAMPLE_QUERY["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"backup bytes")  # download, then delete, then upload again
    second = make_backup(db, env.world, env.dest, "backups/older.dump", deleted=True)
    db.commit()
    token = mint_token(settings, "docs", str(env.world.org.id), "platform_admin")
    variables = {
        "BASE": "",
        "TOKEN": token,
        "DEST_ID": str(ids["dest"]),
        "PROJECT_ID": str(ids["project"]),
        "JOB_ID": str(ids["job"]),
        "ENTITY_ID": str(ids["entity"]),
        "INTENT_ID": str(ids["intent"]),  # renewed, then released
        "PLAN_JOB_ID": str(_dry_run(db, env.other_dest)),  # read, then approved
        "AUDIT_ID": str(ids["audit"]),  # a file in the trash, restored
    }
    in_trash = env.root / trash_key(ids["audit"])
    in_trash.parent.mkdir(parents=True, exist_ok=True)
    in_trash.write_bytes(b"y" * 10)
    examples = re.findall(r"^```sh\n(curl .*)\n```$", DOC.read_text(), flags=re.M)
    assert len(examples) >= 18
    for line in examples:
        if "/purge" in line:  # the restore example took the first archived backup back
            variables["ENTITY_ID"] = str(second.id)
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
        method, headers, data, files = "GET", {}, None, {}
        url = argv.pop()
        args = iter(argv[1:])
        for arg in args:
            if arg == "-X":
                method = next(args)
            elif arg == "-H":
                name, value = next(args).split(": ", 1)
                headers[name] = value
            elif arg == "-d":
                data = next(args)
            elif arg == "-F":
                name, at = next(args).split("=@", 1)
                assert at == EXAMPLE_FILE
                files[name] = (io.BytesIO(b"uploaded"), at)
            else:
                assert arg == "-sS", arg
        response = client.open(url, method=method, headers=headers, data=files or data)
        assert 200 <= response.status_code < 300, (line, response.status_code, response.data)
    assert target.read_bytes() == b"uploaded"  # downloaded, deleted, uploaded in this order
