"""Schemathesis fuzzes every documented operation: never a server error, and (for data
that fits the schema) responses that match the document."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.tokens import mint_token

MAX_EXAMPLES = 40
POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _fill_ids(case, ids) -> None:
    """Aim most cases at real objects, so that they get past the 404."""
    params = case.path_parameters or {}
    if "destId" in params:
        params["destId"] = str(ids["dest"])
    if "id" in params:
        path = case.path
        if path.startswith("/api/projects/"):
            params["id"] = str(ids["project"])
        elif path.startswith("/api/jobs/"):
            params["id"] = str(ids["job"])
        elif "entity_type" in params and params["entity_type"] == "backups":
            params["id"] = str(ids["entity"])


def _fuzz(operation, mode, checks, ids, headers) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE:
            _fill_ids(case, ids)
        response = case.call(headers=headers)
        case.validate_response(response, checks=checks)

    try:
        run()
    except Unsatisfiable:
        # nothing to make invalid (an operation without parameters or body)
        assert mode is GenerationMode.NEGATIVE, operation.label


def test_schemathesis_finds_no_server_error(app, ids, env):
    cfg = app.extensions["ocore"].settings
    cfg.broker_dir.mkdir(parents=True)  # /readyz is a 503 by design when the broker is gone
    token = mint_token(cfg, "fuzzer", str(env.world.org.id), "admin")
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation schemathesis cannot read
        operations.append(result.ok())
    assert len(operations) >= 17
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE, POSITIVE_CHECKS, ids, headers)
        _fuzz(operation, GenerationMode.NEGATIVE, [not_a_server_error], ids, headers)
