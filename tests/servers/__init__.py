"""Real storage servers on 127.0.0.1 for tests: moto, SeaweedFS, fake-gcs-server, sshd.

Launchers live in one module per server; :mod:`tests.servers.fixtures` wraps them as
pytest fixtures. Other test packages use them with
``from tests.servers.fixtures import *`` in their ``conftest.py``.
"""
