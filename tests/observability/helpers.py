"""Shared bits of the observability tests: promtool, PromQL metric names, scrapes."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "atan2",
}  # fmt: skip
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run `bash scripts/install-system-deps.sh` (as root)")
    return path


def run_promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer, enough for our queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+(e\d+)?", name):
            continue
        names.add(name)
    return names


def exposed_names(collectors: list[object]) -> set[str]:
    """Sample names the collectors expose (``x_total``, ``x_bucket``...)."""
    names: set[str] = set()
    for c in collectors:
        fams = c.describe() if hasattr(c, "describe") else []
        for fam in fams:
            names.update(fam.name + s for s in _SUFFIXES[fam.type])
    return names


def worker_metric_names() -> set[str]:
    from worker import metrics

    return exposed_names([v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)])


BROKER_NAMES = {"ocore_broker_up", "ocore_broker_queue_length", "ocore_broker_unacked_messages"}


def database_metric_names() -> set[str]:
    from worker.metrics import DatabaseCollector

    return exposed_names([DatabaseCollector("sqlite://")])


def api_metric_names() -> set[str]:
    from api.metrics import ApiMetrics

    m = ApiMetrics()
    return exposed_names([m.requests, m.latency])


def known_names() -> set[str]:
    return (
        worker_metric_names() | BROKER_NAMES | database_metric_names() | api_metric_names() | {"up"}
    )


def scrape(url: str, timeout: float = 5) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted label pairs: value}}`` of a /metrics page."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        body = resp.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= set(k))
