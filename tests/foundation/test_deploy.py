"""No Docker engine runs here: check the compose file and Dockerfile as far as we can."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

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


def test_every_ocore_command_exists_in_the_cli():
    runner = CliRunner()
    for name, svc in _compose()["services"].items():
        if svc.get("image") != "ocore-storage-worker:latest":
            continue
        args = [a for a in svc["command"] if not a.startswith("-")]
        # walk the click groups down to the command and ask for its help
        result = runner.invoke(cli, [*svc["command"][:1], "--help"])
        assert result.exit_code == 0, (name, result.output)
        if args[0] == "db":
            assert runner.invoke(cli, ["db", args[1], "--help"]).exit_code == 0
        cmd = cli.get_command(None, args[0])
        assert cmd is not None, name
        options = {o for p in cmd.params for o in getattr(p, "opts", [])}
        for flag in (a for a in svc["command"] if a.startswith("--")):
            assert flag in options, (name, flag)


def test_every_file_the_compose_file_mounts_exists():
    for svc in _compose()["services"].values():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./") and src != "./secrets":
                assert (ROOT / src).exists(), src


def test_dockerfile_is_multistage_non_root_and_uses_the_lock_file():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)", text, re.M)
    assert "requirements.lock" in text
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
