"""A small kustomize for the tests: builds deploy/kubernetes/ without a kustomize binary.

It implements what our kustomizations use, and refuses anything else (an unknown field
is an error, not silently ignored): ``resources`` (files and folders), ``components``,
``namespace``, ``images``, ``configMapGenerator`` (``envs``, ``files``, ``literals``;
behaviours ``create`` and ``merge``; the content hash suffix and the references to it
in pod specs) and ``patches`` holding RFC 6902 JSON patches, selected by ``target``
(group, version, kind and name as kustomize reads them: kind and name are regular
expressions). ``test_kubernetes_render.py`` compares its output with ``kubectl
kustomize`` (kustomize v5) where kubectl is installed, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "resources", "components", "namespace", "images",
    "configMapGenerator", "patches",
}  # fmt: skip
GENERATOR_FIELDS = {"name", "behavior", "envs", "files", "literals"}
#: kinds without a namespace (the namespace transformer leaves them alone)
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "ClusterTriggerAuthentication",
}  # fmt: skip
#: where a kind keeps its pod spec
POD_SPEC_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}


class KustomizeError(Exception):
    """A kustomization this module does not support, or one kustomize would refuse."""


@dataclass
class _Generated:
    """A ConfigMap made by a generator: its name gets the content hash at the end."""

    name: str
    resource: Resource


@dataclass
class _Build:
    resources: list[Resource] = field(default_factory=list)
    generated: list[_Generated] = field(default_factory=list)


def load_documents(path: Path) -> list[Resource]:
    """The non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(folder: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            data = yaml.safe_load((folder / name).read_text()) or {}
            unknown = set(data) - KUSTOMIZATION_FIELDS
            if unknown:
                raise KustomizeError(f"{folder}: unsupported fields {sorted(unknown)}")
            return data
    raise KustomizeError(f"{folder}: no kustomization.yaml")


def build(folder: Path) -> list[Resource]:
    """What ``kubectl kustomize FOLDER`` prints, as a list of resources (in our order,
    not kustomize's: compare them as sets)."""
    state = _Build()
    _accumulate(folder.resolve(), state, expect_kind="Kustomization")
    _apply_name_hashes(state)
    return state.resources


def files_used(folder: Path) -> set[Path]:
    """Every file the build of ``folder`` reads (kustomizations, resources, generator
    sources), resolved."""
    used: set[Path] = set()
    folder = folder.resolve()
    data = _kustomization(folder)
    used.add(next(folder / n for n in ("kustomization.yaml", "kustomization.yml",
                                        "Kustomization") if (folder / n).is_file()))  # fmt: skip
    for entry in [*data.get("resources", []), *data.get("components", [])]:
        target = (folder / entry).resolve()
        used |= files_used(target) if target.is_dir() else {target}
    for gen in data.get("configMapGenerator", []):
        for source in [*gen.get("envs", []), *gen.get("files", [])]:
            used.add((folder / source.split("=", 1)[-1]).resolve())
    return used


def _accumulate(folder: Path, state: _Build, expect_kind: str) -> None:
    data = _kustomization(folder)
    kind = data.get("kind", "Kustomization")
    if kind != expect_kind:
        raise KustomizeError(f"{folder}: a {kind} where a {expect_kind} is expected")
    for entry in data.get("resources", []):
        target = (folder / entry).resolve()
        if target.is_dir():
            _accumulate(target, state, expect_kind="Kustomization")
        elif target.is_file():
            state.resources.extend(load_documents(target))
        else:
            raise KustomizeError(f"{folder}: resource {entry} does not exist")
    for entry in data.get("components", []):
        _accumulate((folder / entry).resolve(), state, expect_kind="Component")
    for gen in data.get("configMapGenerator", []):
        _generate(folder, gen, state)
    for patch in data.get("patches", []):
        _patch(folder, patch, state.resources)
    if "namespace" in data:
        for res in state.resources:
            if res.get("kind") not in CLUSTER_SCOPED:
                res.setdefault("metadata", {})["namespace"] = data["namespace"]
    for image in data.get("images", []):
        _set_image(state.resources, image)


# -- configMapGenerator -----------------------------------------------------------------


def parse_env_file(text: str, where: str = "") -> dict[str, str]:
    """``KEY=value`` lines as kustomize reads an ``envs`` file: blank lines and lines
    starting with ``#`` skipped, the value kept as written (no quote removal)."""
    data: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise KustomizeError(f"{where}:{n}: not a KEY=value line: {line!r}")
        data[key] = value
    return data


def _generate(folder: Path, gen: dict[str, Any], state: _Build) -> None:
    unknown = set(gen) - GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{folder}: unsupported generator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(parse_env_file((folder / env).read_text(), str(folder / env)))
    for entry in gen.get("files", []):
        key, _, source = entry.rpartition("=")
        data[key or Path(source).name] = (folder / source).read_text()
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    behavior = gen.get("behavior", "create")
    existing = next((g for g in state.generated if g.name == gen["name"]), None)
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{folder}: ConfigMap {gen['name']} is generated twice")
        resource = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"]}, "data": data}  # fmt: skip
        state.resources.append(resource)
        state.generated.append(_Generated(gen["name"], resource))
    elif behavior in ("merge", "replace"):
        if existing is None:
            raise KustomizeError(f"{folder}: no ConfigMap {gen['name']} to {behavior}")
        if behavior == "replace":
            existing.resource["data"] = {}
        existing.resource.setdefault("data", {}).update(data)
    else:
        raise KustomizeError(f"{folder}: unknown behavior {behavior!r}")


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher): the sha256 of the
    JSON of kind, data and name (kustomize v5 reads the name as empty), 10 hex digits
    with 0 1 3 a e mapped to g h k m t."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's json.Marshal escapes these three
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def pod_specs(resource: Resource) -> Iterator[dict[str, Any]]:
    """The pod spec of a workload (none for other kinds)."""
    path = POD_SPEC_PATHS.get(resource.get("kind", ""))
    node: Any = resource
    for key in path or ():
        node = node.get(key) if isinstance(node, dict) else None
    if path and isinstance(node, dict):
        yield node


def _apply_name_hashes(state: _Build) -> None:
    renamed = {}
    for gen in state.generated:
        new = f"{gen.name}-{config_map_hash(gen.resource.get('data', {}))}"
        gen.resource["metadata"]["name"] = new
        renamed[gen.name] = new
    for res in state.resources:
        for spec in pod_specs(res):
            for volume in spec.get("volumes", []):
                ref = volume.get("configMap")
                if ref and ref.get("name") in renamed:
                    ref["name"] = renamed[ref["name"]]
                for source in volume.get("projected", {}).get("sources", []):
                    ref = source.get("configMap")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                for env_from in container.get("envFrom", []):
                    ref = env_from.get("configMapRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]


# -- patches ----------------------------------------------------------------------------


def _matches(resource: Resource, target: dict[str, Any]) -> bool:
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    meta = resource.get("metadata", {})
    checks = {
        "group": lambda v: group == v,
        "version": lambda v: version == v,
        "kind": lambda v: re.fullmatch(v, resource.get("kind", "")) is not None,
        "name": lambda v: re.fullmatch(v, meta.get("name", "")) is not None,
        "namespace": lambda v: re.fullmatch(v, meta.get("namespace", "")) is not None,
        "labelSelector": lambda v: all(
            meta.get("labels", {}).get(k) == val
            for k, _, val in (term.partition("=") for term in v.split(","))
        ),
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {sorted(unknown)}")
    return all(checks[key](value) for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"not a JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 ``add``, ``replace``, ``remove`` and ``test`` (what kustomize's JSON
    patches use); a path that does not exist is an error, as in kustomize."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            elif kind == "test":
                if node[index] != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove", "test") and last not in node:
                raise KustomizeError(f"{kind} of {op['path']}: no such field")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            elif kind == "test":
                if node[last] != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind!r}")
    return document


def _patch(folder: Path, patch: dict[str, Any], resources: list[Resource]) -> None:
    unknown = set(patch) - {"target", "patch", "path"}
    if unknown:
        raise KustomizeError(f"{folder}: unsupported patch fields {sorted(unknown)}")
    text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError(f"{folder}: only JSON (RFC 6902) patches are supported here")
    if "target" not in patch:
        raise KustomizeError(f"{folder}: a JSON patch needs a target")
    hits = [r for r in resources if _matches(r, patch["target"])]
    if not hits:
        raise KustomizeError(f"{folder}: patch target {patch['target']} matches nothing")
    for resource in hits:
        json_patch(resource, operations)


# -- images -----------------------------------------------------------------------------


def _image_name(image: str) -> str:
    without_digest = image.split("@", 1)[0]
    head, _, tail = without_digest.rpartition(":")
    return head if head and "/" not in tail else without_digest


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if (
                            isinstance(container, dict)
                            and _image_name(container.get("image", "")) == image["name"]
                        ):
                            container["image"] = _new_image(container["image"], image)
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(resources)


def _new_image(current: str, image: dict[str, Any]) -> str:
    name = image.get("newName", image["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    suffix = current[len(_image_name(current)) :]
    return name + suffix


def key(resource: Resource) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what identifies a resource in a build."""
    meta = resource.get("metadata", {})
    return (
        resource.get("apiVersion", ""),
        resource.get("kind", ""),
        meta.get("namespace", ""),
        meta.get("name", ""),
    )
