"""The contract on the reference implementation: a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.backends.contract import ROOT, BackendContract, big_key
from tests.servers.destinations import make_local_backend


def write(base: Path, key: str, data: bytes) -> None:
    target = base / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


class TestLocal(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path):
        return make_local_backend(tmp_path, ROOT)

    @pytest.fixture
    def seed(self, tmp_path: Path):
        return lambda key, data: write(tmp_path, key, data)

    @pytest.fixture(scope="class")
    def big_backend(self, tmp_path_factory: pytest.TempPathFactory):
        base = tmp_path_factory.mktemp("big")
        for i in range(self.BIG_N):
            write(base, ROOT + big_key(i), b"x")
        return make_local_backend(base, ROOT)
