"""Every manifest validates against the Kubernetes schemas (kubernetes-validate) and the
KEDA / Prometheus Operator CRDs (vendored in tests/deploy/schemas)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    CRD_FILES,
    EXAMPLE,
    KUBERNETES_VERSIONS,
    SCHEMAS,
    built,
    by_kind,
    crd_schemas,
    validate,
)


def test_every_resource_validates(target: tuple[str, Path]) -> None:
    name, folder = target
    resources = built(folder)
    assert len(resources) >= 15, name
    problems = [p for r in resources for p in validate(r)]
    assert problems == []


def test_scaled_objects_keep_the_crds_cel_rule(target: tuple[str, Path]) -> None:
    """x-kubernetes-validations of ScaledObject (jsonschema does not run CEL)."""
    for name, so in by_kind(built(target[1]), "ScaledObject").items():
        spec = so["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), name


def test_the_validation_catches_broken_manifests() -> None:
    """Each kind of mistake is reported: a misspelt field, a wrong type, a bad duration,
    a custom resource's unknown field, and a kind nothing has a schema for."""
    resources = built(EXAMPLE)

    api = by_kind(resources, "Deployment")["ocore-storage-api"]
    context = api["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = True
    assert any("readOnlyRootFileSystem" in p for p in validate(api))

    job = by_kind(resources, "Job")["ocore-storage-migrate"]
    job["spec"]["backoffLimit"] = "six"
    assert any("backoffLimit" in p for p in validate(job))

    scaled = by_kind(resources, "ScaledObject")["ocore-storage-worker-scan"]
    scaled["spec"]["minReplicas"] = 1  # HPA's spelling, not KEDA's
    assert any("minReplicas" in p for p in validate(scaled))

    rule = by_kind(resources, "PrometheusRule")["ocore-storage"]
    rule["spec"]["groups"][0]["rules"][0]["for"] = "30 minutes"
    assert any("for" in p for p in validate(rule))

    monitor = by_kind(resources, "PodMonitor")["ocore-storage-worker"]
    monitor["metadata"]["label"] = {"a": "b"}
    assert any("label" in p for p in validate(monitor))

    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert validate(unknown) != []


def test_the_kubernetes_versions_are_the_documented_ones() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs/kubernetes.md").read_text()
    assert f"Kubernetes {KUBERNETES_VERSIONS[0]}" in docs


@pytest.mark.parametrize("group", sorted(CRD_FILES))
def test_vendored_crds_carry_version_licence_and_checksum(group: str) -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for name in CRD_FILES[group]:
        path = SCHEMAS / name
        row = next((line for line in readme.splitlines() if f"`{name}`" in line), "")
        assert row, f"{name} is not listed in tests/deploy/schemas/README.md"
        assert re.search(r"\| v\d+\.\d+\.\d+ \|", row), row
        assert "Apache-2.0" in row and "https://github.com/" in row, row
        assert hashlib.sha256(path.read_bytes()).hexdigest() in row, (
            f"{name} changed: update its row (version, address, sha256) in the README"
        )
        licence = (path.parent / "LICENSE").read_text()
        assert "Apache License" in licence[:200] and "Version 2.0" in licence[:300], name
    assert {kind for _, kind in crd_schemas()} >= {
        "ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"
    }  # fmt: skip
