"""deploy/grafana: provisioning files and the dashboard's queries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.observability.helpers import (
    GRAFANA_DIR,
    known_names,
    promql_metric_names,
    run_promtool,
)

DASHBOARD = GRAFANA_DIR / "dashboards" / "ocore-storage.json"


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def _load() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def test_dashboard_queries_use_only_exported_metrics() -> None:
    dash = _load()
    known = known_names()
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"].replace("label_values(", "").split(",")[0])
    assert len(exprs) >= 10
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"unknown metric(s) {names - known} in {expr!r}"


def test_dashboard_has_the_panels_operators_need() -> None:
    panels = _panels(_load())
    titles = " | ".join(p["title"].lower() for p in panels)
    for words in (
        "storage per destination",
        "storage per project",
        "orphan bytes over time",
        "job outcomes",
        "job duration p50 / p95",
        "time since last successful scan",
        "queue length",
        "backend request rate",
        "backend request latency",
        "files deleted",
        "bytes freed",
    ):
        assert words in titles, words
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_provisioning_points_at_the_dashboard_and_datasource() -> None:
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    # importable into any Grafana: every panel asks the `datasource` variable (a
    # Prometheus data source chosen at import or on the dashboard), none pins a uid
    uids = {
        p["datasource"]["uid"]
        for p in _panels(_load())
        if p["type"] != "row" and isinstance(p.get("datasource"), dict)
    }
    assert uids == {"${datasource}"}
    variables = {v["name"]: v for v in _load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert source["uid"] not in DASHBOARD.read_text()
    prov = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    # docker-compose.yml mounts deploy/grafana/dashboards there
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert _load()["uid"] == "ocore-storage"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool parses it as a recording rule."""
    exprs = [t["expr"] for p in _panels(_load()) for t in p.get("targets", [])]
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": e.replace("$__rate_interval", "5m")
            .replace("$destination", ".*")
            .replace("$top", "20"),
        }
        for i, e in enumerate(exprs)
    ]
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    res = run_promtool("check", "rules", "dash.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_storage_per_project_uses_names_from_the_info_metric() -> None:
    panels = {p["title"].lower().removesuffix(" (top $top)"): p for p in _panels(_load())}
    per_project = panels["storage per project (linked bytes, last scan)"]
    (target,) = per_project["targets"]
    assert "ocore_project_bytes" in target["expr"] and "ocore_project_info" in target["expr"]
    assert target["legendFormat"] == "{{name}}"
    per_dest = panels["storage per destination (bytes by state)"]["targets"][0]
    assert "ocore_destination_info" in per_dest["expr"]
    freshness = panels["time since last successful scan"]["targets"][0]["expr"]
    assert "ocore_destination_created_timestamp_seconds" in freshness  # never scanned too


def test_per_destination_panels_show_the_top_n_only() -> None:
    """Readable at 10,000 destinations: every panel with a series per destination or
    project draws at most `$top` (a variable, 20 by default) of them."""
    dash = _load()
    top = {v["name"]: v for v in dash["templating"]["list"]}["top"]
    assert top["current"]["value"] == "20"
    for p in _panels(dash):
        for t in p.get("targets", []):
            if "by (destination" in t["expr"] or "by (project" in t["expr"]:
                assert t["expr"].startswith("topk("), (p["title"], t["expr"])


def test_safety_layers_row_shows_the_safety_gauges() -> None:
    """The "Safety layers" row: orphan sightings, upload intents, plans awaiting approval
    and minimum-redundancy refusals, each panel inside the row (below it, above the next)."""
    dash = _load()
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"] == "Safety layers"]
    below = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]]
    end = min(below, default=10**6)
    inside = [
        p
        for p in dash["panels"]
        if p["type"] != "row" and row["gridPos"]["y"] < p["gridPos"]["y"] < end
    ]
    exprs = " ".join(t["expr"] for p in inside for t in p["targets"])
    for name in (
        "ocore_orphan_sightings",
        "ocore_orphan_sightings_bytes",
        "ocore_intents_live",
        "ocore_intents_expired",
        "ocore_trash_files",
        "ocore_trash_bytes",
        "ocore_plans_awaiting_approval",
        "ocore_plans_awaiting_approval_oldest_age_seconds",
    ):
        assert name in promql_metric_names(exprs), name
    assert "sum by (path) (rate(ocore_floor_refusals_total[5m]))" in exprs
