"""PROMETHEUS_MULTIPROC_DIR pointing at a folder that does not exist (the Docker image used
to set it for every container) must not crash the API, beat or the CLI on import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.observability.helpers import ROOT

# What `ocore-storage api` and beat import, then a request that records metrics.
PROGRAM = textwrap.dedent(
    """
    import os, sys
    import worker.metrics as m
    import api
    from worker.cli import cli  # the CLI (beat, jobs run...) imports the same modules
    from core.settings import Settings

    m.JOBS_FINISHED.labels("scan", "failed").inc()
    m.STALE_REMOVED.inc(2)
    app = api.create_app(Settings(database_url="sqlite:///" + sys.argv[1] + "/api.db"),
                         send=lambda *a: None)
    page = app.test_client().get("/metrics")
    assert page.status_code == 200, page.status_code
    assert b"ocore_api_requests_total" in page.data
    print("multiproc", m.MULTIPROC_DIR, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    print("finished", m.JOBS_FINISHED.labels("scan", "failed")._value.get())
    """
)


def _run(tmp_path: Path, multiproc: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": multiproc, "OCORE_DATA_DIR": str(tmp_path)}
    env.pop("prometheus_multiproc_dir", None)
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_multiproc_dir_is_created_on_import(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "lib" / "ocore" / "metrics"
    res = _run(tmp_path, str(folder))
    assert res.returncode == 0, res.stderr
    assert f"multiproc {folder} {folder}" in res.stdout
    assert "finished 1.0" in res.stdout
    # multiprocess mode really on: the counter lives in a file of that process
    assert any(f.name.startswith("counter_") for f in folder.iterdir()), list(folder.iterdir())


def test_a_multiproc_dir_that_cannot_exist_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _run(tmp_path, str(blocker / "metrics"))
    assert res.returncode == 0, res.stderr
    assert "multiproc None None" in res.stdout
    assert "finished 1.0" in res.stdout
    assert "PROMETHEUS_MULTIPROC_DIR" in res.stderr and "cannot be created" in res.stderr
