"""deploy/prometheus: promtool accepts the config and rules, the rule tests pass, and
every alert queries metrics the services really export."""

from __future__ import annotations

import yaml

from tests.observability.helpers import (
    PROM_DIR,
    known_names,
    promql_metric_names,
    run_promtool,
)


def test_promtool_check_config() -> None:
    # run from another directory: rule_files resolve relative to prometheus.yml
    res = run_promtool("check", "config", str(PROM_DIR / "prometheus.yml"), cwd=PROM_DIR.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout


def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    res = run_promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_rule_tests_fire_three_alerts_and_check_silence() -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in checks if c["exp_alerts"]}
    silent = {c["alertname"] for c in checks if not c["exp_alerts"]}
    assert len(fired) >= 3, fired
    assert silent, "at least one check must expect an alert not to fire"


def test_scrape_jobs() -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    # every worker replica (DNS discovery of the compose service), one exporter
    [sd] = jobs["ocore-worker"]["dns_sd_configs"]
    assert (sd["names"], sd["type"], sd["port"]) == (["worker"], "A", 9808)
    assert jobs["ocore-exporter"]["static_configs"][0]["targets"] == ["exporter:9810"]
    assert jobs["ocore-api"]["static_configs"][0]["targets"] == ["api:8080"]
    assert jobs["ocore-api"].get("metrics_path", "/metrics") == "/metrics"
    assert cfg["rule_files"] == ["alerts.yml"]


def test_alerts_use_known_metrics_and_have_runbooks() -> None:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    known = known_names()
    names = {r["alert"] for r in rules}
    assert {
        "OcoreDestinationNotScanned",
        "OcoreJobsFailing",
        "OcoreDeletionGuardTripped",
        "OcoreOrphanBytesGrowing",
        "OcoreQueueBacklog",
        "OcoreWorkerDown",
    } <= names
    for rule in rules:
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} queries unknown metrics {unknown}"
        for key in ("summary", "description", "runbook_url"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']} lacks {key}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        # issue 21: a link into the runbooks, not inline text that drifts
        assert "runbook" not in rule["annotations"], rule["alert"]
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/runbooks.md" and anchor == rule["alert"].lower()
    runbooks = (PROM_DIR.parents[1] / "docs" / "runbooks.md").read_text()
    sections = {line[3:].strip() for line in runbooks.splitlines() if line.startswith("## ")}
    assert sections == names, sections ^ names  # one section per alert, no stale one
