"""The Kubernetes manifests of deploy/kubernetes, built, and the schemas they must meet.

- Kubernetes' own kinds: the OpenAPI schemas kubernetes-validate bundles (strict: an
  unknown field is an error, as ``kubectl apply`` with server-side field validation
  says), for the oldest Kubernetes we support and the newest the package knows.
- KEDA's and the Prometheus Operator's kinds: their CustomResourceDefinitions, vendored
  in tests/deploy/schemas (versions and licences in its README), made strict the way the
  API server treats a structural schema: a field a schema does not declare is refused
  (unless the schema says ``x-kubernetes-preserve-unknown-fields``).
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

from tests.deploy.kustomize import Resource, build, key

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy/kubernetes"
BASE = KUBERNETES / "base"
EXAMPLE = KUBERNETES / "overlays/example"
COMPONENTS = KUBERNETES / "components"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

#: the oldest Kubernetes minor version the manifests are for (docs/kubernetes.md)
OLDEST_KUBERNETES = "1.27"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, latest_version().rsplit(".", 1)[0])

#: apiVersion group -> vendored CustomResourceDefinition files
CRD_FILES = {
    "keda.sh": ("keda/keda.sh_scaledobjects.yaml", "keda/keda.sh_triggerauthentications.yaml"),
    "monitoring.coreos.com": (
        "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
        "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
    ),
}


def hpa_variant(folder: Path) -> Path:
    """A kustomization in ``folder`` like overlays/example but with components/hpa
    instead of components/keda (the alternative docs/kubernetes.md describes)."""
    up = Path(os.path.relpath(KUBERNETES, folder))
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "ocore",
                "resources": [str(up / "base")],
                "components": [str(up / "components/hpa"), str(up / "components/monitoring")],
            }
        )
    )
    return folder


@cache
def _built(folder: Path) -> tuple[Resource, ...]:
    return tuple(build(folder))


def built(folder: Path) -> list[Resource]:
    """The resources of a kustomization (a fresh copy: tests may change them)."""
    return copy.deepcopy(list(_built(folder.resolve())))


def by_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


# -- custom resources -----------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], tuple[dict[str, Any], str]]:
    """(apiVersion, kind) -> (strict openAPIV3Schema, where it comes from)."""
    out = {}
    for files in CRD_FILES.values():
        for name in files:
            crd = yaml.safe_load((SCHEMAS / name).read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{version['name']}", kind)] = (schema, name)
    return out


def validate(resource: Resource) -> list[str]:
    """Every way ``resource`` breaks its schema (empty: valid), one line each."""
    what = "{}/{}".format(*key(resource)[1::2]) if "metadata" in resource else "?"
    group = resource.get("apiVersion", "").rpartition("/")[0]
    if group in CRD_FILES:
        found = crd_schemas().get((resource["apiVersion"], resource.get("kind", "")))
        if found is None:
            return [f"{what}: no vendored CRD for {resource['apiVersion']} {resource['kind']}"]
        schema, _ = found
        validator = jsonschema.Draft4Validator(schema)
        problems = [
            f"{what}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(resource)
        ]
        # the metadata of a custom resource is an ObjectMeta like any other's
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource.get("metadata")}
        return problems + [f"{what} metadata: {p}" for p in _validate_builtin(meta, what)]
    return _validate_builtin(resource, what)


def _validate_builtin(resource: Resource, what: str) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.path)) or "(top)"
            problems.append(f"{what} (Kubernetes {version}): {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{what}: {err.message}")
    return problems
