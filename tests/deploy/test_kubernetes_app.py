"""The manifests say what the application does: its commands, settings, queues, ports,
probes, shutdown time, and the monitoring files they are generated from."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import yaml

from core.settings import Settings, env_name
from tests.deploy.kustomize import parse_env_file, pod_specs
from tests.deploy.manifests import BASE, EXAMPLE, ROOT, built, by_kind
from worker.celery_app import QUEUES
from worker.cli import cli

SETTINGS_FILES = (BASE / "settings.env", EXAMPLE / "settings.env")
WORKERS = ("ocore-storage-worker-scan", "ocore-storage-worker-cleanup",
           "ocore-storage-worker-maintenance")  # fmt: skip
EXPORTER = "ocore-storage-exporter"
#: Deployments that read no storage, hence mount no destination credentials
NO_STORAGE = ("ocore-storage-beat", EXPORTER)


def _parse(args: list[str]) -> click.Context:
    """Parse a command line the way ``ocore-storage`` does, down to the leaf command,
    without running it (as tests/foundation/test_deploy.py does for the compose file)."""
    ctx = cli.make_context("ocore-storage", list(args))
    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None, args
        command = sub
        ctx = command.make_context(name, list(rest), parent=ctx)
    return ctx


def _main(resource: dict[str, Any]) -> dict[str, Any]:
    return next(pod_specs(resource))["containers"][0]


def _settings(resources: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [
        r for n, r in by_kind(resources, "ConfigMap").items()
        if n.startswith("ocore-storage-settings-")
    ]  # fmt: skip
    return dict(cm["data"])


# -- settings -------------------------------------------------------------------------


def test_every_setting_in_the_config_maps_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each OCORE_* name of the settings files and of the containers' `env` is a field of
    core/settings.py, and the values are ones the settings accept."""
    known = {env_name(field) for field in Settings.model_fields}
    names: dict[str, str] = {}
    for path in SETTINGS_FILES:
        names.update(parse_env_file(path.read_text(), str(path)))
    for resource in built(EXAMPLE):
        for spec in pod_specs(resource):
            for c in [*spec["containers"], *spec.get("initContainers", [])]:
                for env in c.get("env", []):
                    if env["name"].startswith("OCORE_"):
                        names[env["name"]] = env["value"]
    assert len(names) >= 8
    assert sorted(set(names) - known) == []
    for name in list(os.environ):
        if name.startswith("OCORE_"):
            monkeypatch.delenv(name)
    for name, value in _settings(built(EXAMPLE)).items():
        monkeypatch.setenv(name, value)
    Settings()  # raises naming the variable when a value is out of range


def test_credentials_come_from_secrets_and_settings_from_the_config_map() -> None:
    resources = built(EXAMPLE)
    secrets_dir = _settings(resources)["OCORE_SECRETS_DIR"]
    for name, deployment in by_kind(resources, "Deployment").items():
        spec = next(pod_specs(deployment))
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            refs = {next(iter(e)): next(iter(e.values()))["name"] for e in c["envFrom"]}
            assert refs["secretRef"] == "ocore-storage-env", (name, c["name"])
            assert refs["configMapRef"].startswith("ocore-storage-settings-"), (name, c["name"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        if name in NO_STORAGE:  # touches no storage: no credentials either
            secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
            assert "ocore-storage-credentials" not in secrets, name
            continue
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        mount = mounts[secrets_dir]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "ocore-storage-credentials"


# -- commands, queues, ports, probes ---------------------------------------------------


def test_every_container_command_parses_in_the_cli() -> None:
    resources = built(EXAMPLE)
    commands = {}
    for name, resource in [*by_kind(resources, "Deployment").items(),
                           *by_kind(resources, "Job").items()]:  # fmt: skip
        commands[name] = _parse(_main(resource)["args"])
    assert commands["ocore-storage-migrate"].command_path == "ocore-storage db upgrade"
    assert commands["ocore-storage-beat"].command_path == "ocore-storage beat"
    api = commands["ocore-storage-api"]
    assert api.command_path == "ocore-storage api" and api.params["host"] == "0.0.0.0"
    for name in WORKERS:
        assert commands[name].command_path == "ocore-storage worker", name
        assert commands[name].params["beat"] is False, "beat runs in its own Deployment"
    exporter = commands[EXPORTER]
    assert exporter.command_path == "ocore-storage exporter"
    assert exporter.params["host"] == "0.0.0.0"
    assert exporter.params["port"] == Settings.model_fields["exporter_port"].default
    assert sorted(commands) == sorted(
        [*WORKERS, EXPORTER, "ocore-storage-beat", "ocore-storage-api", "ocore-storage-migrate"]
    )


def _queues(resources: list[dict[str, Any]]) -> dict[str, tuple[list[str], int]]:
    """worker Deployment -> (its queues, its concurrency)."""
    out = {}
    for name in WORKERS:
        ctx = _parse(_main(by_kind(resources, "Deployment")[name])["args"])
        out[name] = (ctx.params["queues"].split(","), ctx.params["concurrency"])
    return out


def test_each_queue_has_exactly_one_worker_pool(targets: dict[str, Path]) -> None:
    queues = _queues(built(targets["example"]))
    consumed = [q for qs, _ in queues.values() for q in qs]
    assert sorted(consumed) == sorted(QUEUES)
    for name, (qs, _) in queues.items():
        deployment = by_kind(built(targets["example"]), "Deployment")[name]
        assert deployment["metadata"]["labels"]["ocore-storage/pool"] == qs[0], name


def test_autoscalers_scale_each_pool_on_its_own_queue(targets: dict[str, Path]) -> None:
    """KEDA (example) and the HPA alternative: scan and cleanup separately, each on the
    queue its Deployment consumes, one worker per `--concurrency` waiting messages, never
    below one worker (running jobs are not in the queue's length)."""
    for target, kind in (("example", "ScaledObject"), ("hpa", "HorizontalPodAutoscaler")):
        resources = built(targets[target])
        queues = _queues(resources)
        scalers = by_kind(resources, kind)
        scaled = {}
        for name, scaler in scalers.items():
            spec = scaler["spec"]
            deployment = spec["scaleTargetRef"]["name"]
            if kind == "ScaledObject":
                (trigger,) = spec["triggers"]
                assert trigger["type"] == "redis"
                queue, per_pod = trigger["metadata"]["listName"], trigger["metadata"]["listLength"]
                floor = spec["minReplicaCount"]
            else:
                (metric,) = spec["metrics"]
                external = metric["external"]
                assert external["metric"]["name"] == "ocore_broker_queue_length"
                queue = external["metric"]["selector"]["matchLabels"]["queue"]
                per_pod, floor = external["target"]["averageValue"], spec["minReplicas"]
            assert queues[deployment][0] == [queue], name
            assert int(per_pod) == queues[deployment][1], name
            assert floor >= 1, name
            scaled[queue] = deployment
        assert sorted(scaled) == ["cleanup", "scan"], target


def test_the_workers_grace_period_outlasts_a_delete_batch() -> None:
    """terminationGracePeriodSeconds above the lease a delete batch runs under (renewed
    before each batch): SIGTERM's warm shutdown ends the batch before the SIGKILL."""
    resources = built(EXAMPLE)
    default = Settings.model_fields["lock_lease_seconds"].default
    lease = int(_settings(resources).get("OCORE_LOCK_LEASE_SECONDS", default))
    for name in WORKERS:
        grace = next(pod_specs(by_kind(resources, "Deployment")[name]))[
            "terminationGracePeriodSeconds"
        ]
        assert grace >= lease + 120, (name, grace, lease)


def test_beat_runs_once_even_during_a_rollout() -> None:
    resources = built(EXAMPLE)
    beat = by_kind(resources, "Deployment")["ocore-storage-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for scaler in by_kind(resources, kind).values():
            assert scaler["spec"]["scaleTargetRef"]["name"] != "ocore-storage-beat"
    spec = next(pod_specs(beat))
    volumes = {v["name"]: v for v in spec["volumes"]}
    (data,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] ==
               _settings(resources)["OCORE_DATA_DIR"]]  # fmt: skip
    claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(resources, "PersistentVolumeClaim"), "the schedule must persist"


def test_the_exporter_runs_once_and_the_workers_leave_the_shared_figures_to_it() -> None:
    """One exporter, never two at a time (they would double every sum over its series):
    one replica, `Recreate`, no autoscaler; and no worker serves its figures too."""
    resources = built(EXAMPLE)
    exporter = by_kind(resources, "Deployment")[EXPORTER]
    assert exporter["spec"]["replicas"] == 1
    assert exporter["spec"]["strategy"] == {"type": "Recreate"}
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for scaler in by_kind(resources, kind).values():
            assert scaler["spec"]["scaleTargetRef"]["name"] != EXPORTER
    default = Settings.model_fields["metrics_shared"].default
    assert _settings(resources).get("OCORE_METRICS_SHARED", str(default)).lower() == "false"
    for name in WORKERS:
        env = {
            e["name"]: e.get("value") for e in _main(by_kind(resources, "Deployment")[name])["env"]
        }
        assert "OCORE_METRICS_SHARED" not in env, name
    c = _main(exporter)
    # one process, no prefork children: no multiprocess folder, nothing to keep
    assert "PROMETHEUS_MULTIPROC_DIR" not in {e["name"] for e in c.get("env", [])}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp"}, mounts


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_probes_ask_what_the_processes_serve() -> None:
    resources = built(EXAMPLE)
    settings = _settings(resources)
    for name in WORKERS:
        c = _main(by_kind(resources, "Deployment")[name])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert _probe_port(c, c[probe]) == int(settings["OCORE_METRICS_PORT"]), name
        # liveness must not fail while Redis or PostgreSQL are away: /metrics, not /healthz
        assert c["livenessProbe"]["httpGet"]["path"] == "/metrics", name
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz", name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(settings["OCORE_DATA_DIR"] + "/")
    exporter = _main(by_kind(resources, "Deployment")[EXPORTER])
    port = _parse(exporter["args"]).params["port"]
    assert [p["containerPort"] for p in exporter["ports"]] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _probe_port(exporter, exporter[probe]) == port
    # the same server as the workers': /metrics answers while the process lives
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/healthz"
    from prometheus_client import CollectorRegistry

    from worker.metrics_server import Health, metrics_app

    # ... and /healthz says 503 when the database is away (the server's WSGI app, called)
    down = metrics_app(CollectorRegistry(), Health({"database": lambda: (False, "unreachable")}))
    statuses: dict[str, str] = {}
    for path in ("/metrics", "/healthz"):
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
        down(environ, lambda status, headers, path=path: statuses.__setitem__(path, status))
    assert statuses["/metrics"].startswith("200 ") and statuses["/healthz"].startswith("503 ")
    api = _main(by_kind(resources, "Deployment")["ocore-storage-api"])
    port = _parse(api["args"]).params["port"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _probe_port(api, api[probe]) == port
    from api import create_app  # the paths exist in the app

    rules = {
        r.rule for r in create_app(Settings(), allow_insecure_secret=True).url_map.iter_rules()
    }
    assert {"/healthz", "/readyz", "/metrics"} <= rules


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    return all(labels.get(k) == v for k, v in match.items())


def test_selectors_find_their_pods_and_ports(target: tuple[str, Path]) -> None:
    resources = built(target[1])
    pods = {
        name: (d["spec"]["template"]["metadata"]["labels"], next(pod_specs(d)))
        for name, d in by_kind(resources, "Deployment").items()
    }
    for name, d in by_kind(resources, "Deployment").items():
        assert _selects(d["spec"]["selector"], pods[name][0]), name

    def ports_of(selector: dict[str, Any]) -> set[str]:
        found = [spec for labels, spec in pods.values() if _selects(selector, labels)]
        assert found, selector
        return {p["name"] for spec in found for c in spec["containers"] for p in c.get("ports", [])}

    for svc in by_kind(resources, "Service").values():
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports_of(svc["spec"]["selector"])
    for pdb in by_kind(resources, "PodDisruptionBudget").values():
        ports_of(pdb["spec"]["selector"])
    for policy in by_kind(resources, "NetworkPolicy").values():
        available = ports_of(policy["spec"]["podSelector"])
        for rule in policy["spec"].get("ingress", []):
            assert {p["port"] for p in rule["ports"]} <= available
    for monitor in by_kind(resources, "PodMonitor").values():
        available = ports_of(monitor["spec"]["selector"])
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= available


# -- migration ------------------------------------------------------------------------


def test_every_deployment_waits_for_the_migration_job() -> None:
    resources = built(EXAMPLE)
    job = by_kind(resources, "Job")["ocore-storage-migrate"]
    assert _parse(_main(job)["args"]).command_path == "ocore-storage db upgrade"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    # a Job's template is immutable: it must not change with every setting (apply fails)
    assert "ocore-storage-settings" not in json.dumps(job)
    (script,) = [r for n, r in by_kind(resources, "ConfigMap").items()
                 if n.startswith("ocore-storage-wait-for-schema-")]  # fmt: skip
    assert script["data"]["wait_for_schema.py"] == (BASE / "wait_for_schema.py").read_text()
    for name, deployment in by_kind(resources, "Deployment").items():
        spec = next(pod_specs(deployment))
        (init,) = spec["initContainers"]
        assert init["image"] == spec["containers"][0]["image"], name
        mount = next(m for m in init["volumeMounts"] if init["command"][-1].startswith(
            m["mountPath"] + "/"))  # fmt: skip
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == script["metadata"]["name"], name
        assert init["command"] == ["python", mount["mountPath"] + "/wait_for_schema.py"]


def test_the_init_containers_script_waits_for_the_schema_then_lets_the_pod_start(
    tmp_path: Path,
) -> None:
    """The script the init containers run, run here against a database without the
    schema: it waits and says why; `db upgrade` (the Job's command) lets it exit 0."""
    database = f"sqlite:///{tmp_path / 'ocore.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCORE_")}
    env.update(OCORE_DATABASE_URL=database, OCORE_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(BASE / "wait_for_schema.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "waiting for the migration Job" in first and "schema missing" in first, first
        assert proc.poll() is None
        upgrade = subprocess.run(
            [sys.executable, "-m", "worker.cli", "db", "upgrade"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert upgrade.returncode == 0, upgrade.stderr
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
        assert "the database schema is current" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


# -- images ---------------------------------------------------------------------------


def test_the_image_is_the_projects_release() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {
        c["image"]
        for r in built(BASE)
        for spec in pod_specs(r)
        for c in [*spec["containers"], *spec.get("initContainers", [])]
    }
    assert images == {f"ocore-storage-worker:{version}"}, "set the release's tag in base/"
    overlay = yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())
    assert overlay["images"][0]["newTag"] == version


def test_the_worker_deployments_differ_only_where_documented() -> None:
    """pool label, queue arguments, replicas, resources: everything else is the same."""
    resources = by_kind(built(BASE), "Deployment")

    def normalised(name: str) -> str:
        d = json.loads(json.dumps(resources[name]))
        d["metadata"]["name"] = "X"
        c = _main(d)
        c["args"], c["resources"] = [], {}
        d["spec"]["replicas"] = 0
        text = json.dumps(d, sort_keys=True)
        return re.sub(r'"ocore-storage/pool": "\w+"', '"ocore-storage/pool": "P"', text)

    first = normalised(WORKERS[0])
    for name in WORKERS[1:]:
        assert normalised(name) == first, name


# -- monitoring -----------------------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_generate", ROOT / "scripts/k8s_generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_monitoring_files_are_up_to_date() -> None:
    gen = _generator()
    for path, text in gen.outputs().items():
        assert path.read_text() == text, f"{path.name} is stale: python scripts/k8s_generate.py"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts/k8s_generate.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_the_rule_file_equals_the_alert_file() -> None:
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    rule = by_kind(built(EXAMPLE), "PrometheusRule")["ocore-storage"]
    assert rule["spec"] == alerts
    board = json.loads((ROOT / "deploy/grafana/dashboards/ocore-storage.json").read_text())
    maps = by_kind(built(EXAMPLE), "ConfigMap")
    assert (
        json.loads(maps["grafana-dashboard-ocore-storage"]["data"]["ocore-storage.json"]) == board
    )


def test_a_changed_alert_file_makes_the_check_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = _generator()
    alerts = tmp_path / "alerts.yml"
    alerts.write_text(gen.ALERTS.read_text().replace("> 100", "> 200"))
    rule = tmp_path / "prometheusrule.yaml"
    rule.write_text(gen.RULE_FILE.read_text())
    monkeypatch.setattr(gen, "ALERTS", alerts)
    monkeypatch.setattr(gen, "RULE_FILE", rule)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "prometheusrule.yaml is out of date" in capsys.readouterr().err
    assert gen.main([]) == 0
    assert yaml.safe_load(rule.read_text())["spec"] == yaml.safe_load(alerts.read_text())


def test_the_pod_monitors_keep_the_scrape_jobs_the_alerts_ask_for() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())

    def service(job: dict[str, Any]) -> str:
        """The `service` label a scrape job gives: its static targets' or a relabeling's."""
        found = {c["labels"]["service"] for c in job.get("static_configs", [])}
        found |= {
            r["replacement"]
            for r in job.get("relabel_configs", [])
            if r.get("target_label") == "service"
        }
        (label,) = found
        return label

    jobs = {j["job_name"]: service(j) for j in prometheus["scrape_configs"]}
    assert {"ocore-worker", "ocore-exporter", "ocore-api"} <= set(jobs)
    found = {}
    for monitor in by_kind(built(EXAMPLE), "PodMonitor").values():
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        labels = {r["targetLabel"]: r.get("replacement") for r in endpoint["relabelings"]}
        found[labels["job"]] = labels["service"]
        assert endpoint["interval"] == prometheus["global"]["scrape_interval"]
    assert found == jobs
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', alerts)) <= set(found)


# -- documentation --------------------------------------------------------------------


def test_the_readme_and_the_docs_name_what_the_manifests_have() -> None:
    """README's Kubernetes section covers apply, scale, upgrade and roll back, and every
    Deployment, Job and Secret the commands there and in docs/kubernetes.md name exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    for needed in ("kubectl apply -k", "kubectl -n ocore scale", "delete job",
                   "rollout undo", "docs/kubernetes.md"):  # fmt: skip
        assert needed in section, needed
    resources = built(EXAMPLE)
    secrets = {
        ref
        for r in resources
        for spec in pod_specs(r)
        for ref in [
            *(e["secretRef"]["name"] for c in spec["containers"] for e in c.get("envFrom", [])
              if "secretRef" in e),
            *(v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v),
        ]
    } | {
        t["name"]
        for a in by_kind(resources, "TriggerAuthentication").values()
        for t in a["spec"]["secretTargetRef"]
    }  # fmt: skip
    docs = (ROOT / "docs/kubernetes.md").read_text()
    for text in (section, docs):
        named = set(re.findall(r"create secret generic ([a-z0-9-]+)", text))
        assert named == secrets, (named, secrets)
        for kind, name in re.findall(r"\b(deployment|job)/([a-z0-9-]+)", text):
            assert name in by_kind(resources, kind.capitalize()), (kind, name)
