"""The contract on S3: moto (behind the fault proxy, so requests are counted) and SeaweedFS."""

from __future__ import annotations

from typing import Any

import pytest

from tests.backends.contract import MIB, ROOT, BackendContract, SlashKeysContract, big_key
from tests.servers.destinations import make_s3_backend
from tests.servers.fault_proxy import FaultProxy
from tests.servers.s3 import seed_objects

S3_OPTIONS: dict[str, Any] = {"multipart_threshold": MIB, "multipart_chunksize": 5 * MIB}


class S3Contract(BackendContract):
    HAS_URL = True
    HAS_ETAG = True

    @pytest.fixture
    def seed(self, server, bucket):
        client = server.client()
        return lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data)

    @pytest.fixture(scope="class")
    def big_backend(self, server):
        bucket = server.create_bucket()
        seed_objects(server, bucket, [ROOT + big_key(i) for i in range(self.BIG_N)])
        seed_objects(server, bucket, ["backups/10/outside", "backups/1x"])
        with make_s3_backend(server, bucket, ROOT, **S3_OPTIONS) as backend:
            yield backend


class TestS3Moto(SlashKeysContract, S3Contract):
    proxy: FaultProxy  # set by the backend fixture

    @pytest.fixture(scope="class")
    def server(self, s3_server):
        return s3_server

    @pytest.fixture
    def bucket(self, s3_bucket):
        return s3_bucket

    @pytest.fixture
    def backend(self, request, s3_server, s3_bucket, fault_proxy):
        request.instance.proxy = fault_proxy
        endpoint = fault_proxy.endpoint
        with make_s3_backend(s3_server, s3_bucket, ROOT, endpoint, **S3_OPTIONS) as backend:
            yield backend

    def request_count(self) -> int | None:
        return self.proxy.request_count


class TestS3SeaweedFS(S3Contract):
    """SeaweedFS collapses ``a//b`` to ``a/b`` on write, so no slash-key contract here."""

    @pytest.fixture(scope="class")
    def server(self, seaweedfs_server):
        return seaweedfs_server

    @pytest.fixture
    def bucket(self, seaweedfs_bucket):
        return seaweedfs_bucket

    @pytest.fixture
    def backend(self, seaweedfs_server, seaweedfs_bucket):
        with make_s3_backend(seaweedfs_server, seaweedfs_bucket, ROOT, **S3_OPTIONS) as backend:
            yield backend
