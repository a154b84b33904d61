"""deploy/kubernetes builds, and tests/deploy/kustomize.py builds it as kustomize does."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import yaml

from tests.deploy.golden import golden_file
from tests.deploy.kustomize import (
    KustomizeError,
    build,
    config_map_hash,
    files_used,
    json_patch,
    key,
    parse_env_file,
)
from tests.deploy.manifests import BASE, EXAMPLE, KUBERNETES, built, by_kind


def _kubectl_kustomize(name: str) -> list[dict]:
    """What ``kubectl kustomize`` printed for this build (tests/deploy/golden.py)."""
    text = golden_file(name).read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_the_builds_match_kubectl_kustomize(target: tuple[str, Path]) -> None:
    """Our builder and kustomize v5 (``kubectl kustomize``, its output kept in
    tests/deploy/golden/: regenerate with ``python -m tests.deploy.golden`` after a
    manifest changes) print the same resources."""
    name, folder = target
    theirs = {key(r): r for r in _kubectl_kustomize(name)}
    ours = {key(r): r for r in build(folder)}
    hint = "; if a manifest changed, run `python -m tests.deploy.golden` (needs kubectl)"
    assert sorted(ours) == sorted(theirs), hint
    for k in ours:
        if ours[k] != theirs[k]:
            diff = difflib.unified_diff(
                yaml.safe_dump(theirs[k]).splitlines(),
                yaml.safe_dump(ours[k]).splitlines(),
                "kubectl kustomize",
                "tests/deploy/kustomize.py",
                lineterm="",
            )
            pytest.fail(f"{k} differs{hint}:\n" + "\n".join(diff))


def test_every_file_under_deploy_kubernetes_is_built(targets: dict[str, Path]) -> None:
    """A manifest no kustomization lists would escape every check (and every cluster)."""
    used: set[Path] = set()
    for folder in targets.values():
        used |= files_used(folder)
    present = {
        p.resolve()
        for p in KUBERNETES.rglob("*")
        if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts
    }
    assert sorted(present - used) == []
    assert {p.name for p in used} >= {"kustomization.yaml", "settings.env", "wait_for_schema.py"}


def test_the_config_map_name_hash_is_kustomizes() -> None:
    # values printed by kustomize v5.5 (kubectl kustomize) for the same data
    assert config_map_hash({"A": "b"}) == "b9t2424hkf"
    data = {"OCORE_LOG_FORMAT": "json", "OCORE_API_HOST": "0.0.0.0", "OCORE_X": '"a b"',
            "OCORE_Y": "<&>", "OCORE_Z": " sp ", "OCORE_U": "é"}  # fmt: skip
    assert config_map_hash(data) == "m26t65dh6b"


def test_a_changed_setting_renames_the_config_map_and_every_reference(tmp_path: Path) -> None:
    """The rollout trigger: new settings, a new ConfigMap name in every pod template."""
    base = built(BASE)
    settings = next(
        n for n in by_kind(base, "ConfigMap") if n.startswith("ocore-storage-settings-")
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "more.env").write_text("OCORE_LOG_LEVEL=DEBUG\n")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(BASE, overlay)],
                "configMapGenerator": [
                    {"name": "ocore-storage-settings", "behavior": "merge", "envs": ["more.env"]}
                ],
            }
        )
    )
    changed = build(overlay)
    (new,) = [n for n in by_kind(changed, "ConfigMap") if n.startswith("ocore-storage-settings-")]
    assert new != settings
    assert by_kind(changed, "ConfigMap")[new]["data"]["OCORE_LOG_LEVEL"] == "DEBUG"
    for name, deployment in by_kind(changed, "Deployment").items():
        text = yaml.safe_dump(deployment)
        assert new in text and settings not in text, name


def test_the_builder_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - target: {kind: Deployment}\n    patch: '[]'\n"
    )
    with pytest.raises(KustomizeError, match="matches nothing"):
        build(tmp_path)
    with pytest.raises(KustomizeError, match="no such field"):
        json_patch({"a": {}}, [{"op": "replace", "path": "/a/b", "value": 1}])
    with pytest.raises(KustomizeError, match="not a KEY=value"):
        parse_env_file("export A=b\n")


def test_the_example_overlay_sets_namespace_image_and_patches() -> None:
    resources = built(EXAMPLE)
    assert {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"} == {
        "ocore"
    }
    images = {
        c["image"]
        for d in by_kind(resources, "Deployment").values()
        for c in [
            *d["spec"]["template"]["spec"]["containers"],
            *d["spec"]["template"]["spec"].get("initContainers", []),
        ]
    }
    assert images == {"registry.example.com/ocore/ocore-storage-worker:0.1.0"}
    for so in by_kind(resources, "ScaledObject").values():
        trigger = so["spec"]["triggers"][0]
        assert trigger["metadata"]["address"] != "redis:6379"
        assert trigger["authenticationRef"]["name"] in by_kind(resources, "TriggerAuthentication")
    for kind in ("PodMonitor", "PrometheusRule"):
        for res in by_kind(resources, kind).values():
            assert res["metadata"]["labels"]["release"] == "kube-prometheus-stack"
