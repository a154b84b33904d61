"""Issue 8, A6: schemathesis with every check it has, over real HTTP against the live
server, on every documented operation: no server error, no check failure.

The one fuzz test of every operation (tests/api/test_api_schemathesis.py ran a subset of
these checks, not_a_server_error and the status code, content type and response schema
conformance, in process: merged here). The policy routes' own fuzzing as the platform
administrator is tests/api/test_api_policy.py."""

from __future__ import annotations

import time

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.result import Ok

from tests.security.conftest import Attack

MAX_EXAMPLES = 12
TIME_BUDGET = 90


def _all_checks() -> list:
    load_all_checks()
    return list(CHECKS.get_all())


#: Checked on its own in test_schemathesis_positive_data_is_accepted below.
LOOSE_SCHEMA_CHECKS = {"positive_data_acceptance"}


def _fill_ids(case, a: Attack) -> None:
    """Aim positive cases at real objects of the caller, so that they get past the 404."""
    params = case.path_parameters or {}
    if case.query and "cursor" in case.query:
        # An opaque cursor is only valid when a previous page gave it: a random string is
        # rightly a 400 (negative mode still sends them).
        del case.query["cursor"]
    if case.method.upper() == "DELETE" and case.path.endswith("/files"):
        _one_path(case)
    if "destId" in params:
        params["destId"] = str(a.local.id)
    if "id" in params:
        if case.path.startswith("/api/projects/"):
            params["id"] = str(a.world.project.id)
        elif case.path.startswith("/api/jobs/"):
            params["id"] = str(a.ids["job"])
        elif params.get("entity_type") == "backups":
            params["id"] = str(a.ids["entity"])


def _one_path(case) -> None:
    """DELETE .../files takes the path in the query or in the body, and both must agree
    when both are given (documented in the descriptions; OpenAPI cannot express a rule
    across two locations): make a positive case follow that rule."""
    body_path = case.body.get("path") if isinstance(case.body, dict) else None
    query = dict(case.query or {})
    if "path" in query and body_path is not None:
        case.body = {**case.body, "path": query["path"]}
    elif "path" not in query and body_path is None:
        query["path"] = "backups/fuzzed.dump"
    case.query = query


def _fuzz(operation, mode, checks, a: Attack, headers) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE:
            _fill_ids(case, a)
        response = case.call(base_url=a.url, headers=headers, timeout=30)
        case.validate_response(response, checks=checks, headers=headers)

    run()


def _run(a: Attack, checks: list, operations_filter=lambda op: True) -> list[str]:
    a.settings.broker_dir.mkdir(parents=True, exist_ok=True)  # /readyz: 503 without it
    headers = {"Authorization": f"Bearer {a.token(role='platform_admin')}"}
    schema = schemathesis.openapi.from_url(f"{a.url}/api/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation schemathesis cannot read
        operations.append(result.ok())
    assert len(operations) >= 17
    failures: list[str] = []
    for operation in filter(operations_filter, operations):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, checks, a, headers)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as err:  # collect all, then report
                failures.append(f"{operation.label} [{mode.value}]: {err}"[:1500])
    return failures


def test_schemathesis_all_checks_over_http(attack: Attack) -> None:
    """Every check but positive_data_acceptance (below), positive and negative data."""
    checks = [c for c in _all_checks() if c.__name__ not in LOOSE_SCHEMA_CHECKS]
    assert len(checks) >= 12
    started = time.monotonic()
    failures = _run(attack, checks)
    assert failures == [], "\n\n".join(failures)
    assert time.monotonic() - started < TIME_BUDGET


def test_schemathesis_positive_data_is_accepted(attack: Attack) -> None:
    checks = [c for c in _all_checks() if c.__name__ in LOOSE_SCHEMA_CHECKS]
    failures = _run(attack, checks, lambda op: op.method.upper() != "GET" or "/admin" in op.path
                    or "/storage/" in op.path)  # fmt: skip
    assert failures == [], "\n\n".join(failures)
