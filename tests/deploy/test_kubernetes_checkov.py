"""checkov's Kubernetes checks pass on what a cluster gets, each accepted exception is
written beside the resource it excuses (a ``checkov.io/skipN`` annotation with its
reason) and listed in docs/kubernetes.md; and the key checks again as our own test, which
needs no checkov (non-root, read-only root filesystem, resources, probes, no privilege
escalation, no capabilities, a pinned image)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import pod_specs
from tests.deploy.manifests import ROOT, built
from worker.executables import checkov_binary

SKIP = re.compile(r"checkov\.io/skip\d+")
#: containers that answer no probe, and why (also a checkov exception on their resource)
NO_PROBES = {"beat": "no HTTP port: OcoreBeatDown watches it"}


def _require_checkov() -> None:
    if checkov_binary() is None:
        pytest.fail("checkov is missing: `make tools` installs it (make test does)")


def test_checkov_passes(targets: dict[str, Path], tmp_path: Path) -> None:
    _require_checkov()
    files = []
    for name in ("example", "hpa"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(built(targets[name]), sort_keys=False))
        files.append(path)
    args = [str(checkov_binary()), "--framework", "kubernetes", "--skip-download",
            "--output", "json", "--quiet", "--compact"]  # fmt: skip
    for path in files:
        args += ["--file", str(path)]
    res = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""},
    )
    assert res.stdout.strip(), res.stderr
    reports = json.loads(res.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for report in reports
        for c in report["results"]["failed_checks"]
    ]
    assert failed == [], "\n".join(failed)
    summary = [r["summary"] for r in reports]
    assert sum(s["parsing_errors"] for s in summary) == 0, summary
    assert sum(s["passed"] for s in summary) > 500, summary  # checkov did look at them
    assert sum(s["resource_count"] for s in summary) >= 40, summary  # both files
    assert res.returncode == 0, res.stderr


def _skips(resource: dict[str, Any]) -> dict[str, str]:
    notes = resource["metadata"].get("annotations", {})
    return {k: v for k, v in notes.items() if SKIP.fullmatch(k)}


def test_each_checkov_exception_says_why_and_is_documented(targets: dict[str, Path]) -> None:
    docs = (ROOT / "docs/kubernetes.md").read_text()
    seen = set()
    for folder in targets.values():
        for resource in built(folder):
            for note, value in _skips(resource).items():
                found = re.fullmatch(r"(CKV2?_K8S_\d+)=(.{30,})", value)
                assert found, f"{resource['metadata']['name']} {note}: `CKV_K8S_n=<why>`"
                seen.add(found.group(1))
    assert seen, "no exception at all: then drop this test's docs table"
    for check in seen:
        assert f"`{check}`" in docs, f"docs/kubernetes.md does not list the exception {check}"


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("init", c) for c in spec.get("initContainers", [])] + [
        ("main", c) for c in spec["containers"]
    ]


def security_problems(resources: list[dict[str, Any]]) -> list[str]:
    """What our own checks find wrong with the pods of ``resources``."""
    problems = []
    for resource in resources:
        for spec in pod_specs(resource):
            where = f"{resource['kind']}/{resource['metadata']['name']}"
            pod = spec.get("securityContext", {})
            if pod.get("runAsNonRoot") is not True or pod.get("runAsUser", 0) < 10000:
                problems.append(f"{where}: not runAsNonRoot with a high runAsUser")
            if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: mounts a service account token")
            if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
                problems.append(f"{where}: shares a host namespace")
            for role, c in _containers(spec):
                at = f"{where} container {c['name']}"
                sc = c.get("securityContext", {})
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{at}: root filesystem is writable")
                if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                    problems.append(f"{at}: may escalate privileges")
                if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get(
                    "capabilities", {}
                ).get("add"):
                    problems.append(f"{at}: keeps capabilities (drop: [ALL], add none)")
                for part in ("requests", "limits"):
                    if set(c.get("resources", {}).get(part, {})) < {"cpu", "memory"}:
                        problems.append(f"{at}: no cpu and memory {part}")
                image = c.get("image", "")
                tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
                if (not tag or tag == "latest") and "@sha256:" not in image:
                    problems.append(f"{at}: image {image!r} is not pinned (a tag, not latest)")
                if c.get("imagePullPolicy") != "Always":
                    problems.append(f"{at}: imagePullPolicy is not Always")
                probed = {"livenessProbe", "readinessProbe"} <= set(c)
                exempt = resource["kind"] == "Job" or c["name"] in NO_PROBES
                if role == "main" and not probed and not exempt:
                    problems.append(f"{at}: no liveness and readiness probes")
    return problems


def test_our_own_security_checks_pass(target: tuple[str, Path]) -> None:
    resources = built(target[1])
    assert sum(1 for r in resources for _ in pod_specs(r)) == 7  # 6 Deployments + the Job
    assert security_problems(resources) == []


def test_our_own_security_checks_catch_each_mistake() -> None:
    base = built(ROOT / "deploy/kubernetes/base")
    deployment = next(r for r in base if r["kind"] == "Deployment")
    spec = next(pod_specs(deployment))
    container = spec["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["NET_RAW"]}
    container["image"] = "ocore-storage-worker:latest"
    del container["resources"]["limits"]
    del container["livenessProbe"]
    spec["securityContext"]["runAsUser"] = 0
    spec["automountServiceAccountToken"] = True
    found = "\n".join(security_problems([deployment]))
    for expected in ("writable", "escalate", "capabilities", "not pinned", "limits", "probes",
                     "runAsNonRoot", "token"):  # fmt: skip
        assert expected in found, expected
