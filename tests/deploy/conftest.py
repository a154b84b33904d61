from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import BASE, EXAMPLE, hpa_variant


@pytest.fixture(scope="session")
def hpa_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hpa_variant(tmp_path_factory.mktemp("hpa-variant"))


@pytest.fixture(scope="session")
def targets(hpa_folder: Path) -> dict[str, Path]:
    """What a cluster gets: the example overlay (KEDA), its HPA variant, and the base."""
    return {"example": EXAMPLE, "hpa": hpa_folder, "base": BASE}


@pytest.fixture(params=["example", "hpa", "base"])
def target(request: pytest.FixtureRequest, targets: dict[str, Path]) -> tuple[str, Path]:
    return request.param, targets[request.param]
