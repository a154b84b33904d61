"""Benchmarks: ``make bench`` / ``make bench-quick`` (``python -m bench.run``).

Not part of ``make test``. Everything runs against real servers started here on free
127.0.0.1 ports (SeaweedFS, sshd, fake-gcs-server, a threaded API server, a Celery
worker) and the local PostgreSQL and Redis. Results go to ``docs/benchmarks.md``.
"""
