"""Init container of every ocore-storage pod: wait until the database schema is at this
image's revision, i.e. until the migration Job (``ocore-storage db upgrade``) of this
release has run, then exit 0. A newer schema (a later release migrated it) is fine too:
:func:`db.migrate.schema_status` says ``ok``. The rollout of each Deployment waits here
instead of crash-looping on "the database has an older schema than this code"."""

import sys
import time

from sqlalchemy.pool import NullPool

from core.settings import get_settings
from db.migrate import schema_status
from db.session import make_engine

INTERVAL = 5.0

url = get_settings().effective_database_url
extra = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgresql") else {}
engine = make_engine(url, poolclass=NullPool, **extra)
while True:
    try:
        with engine.connect() as conn:
            status = schema_status(conn)
    except Exception as err:  # not up yet, or a wrong URL: say so and keep waiting
        status = f"unreachable ({type(err).__name__})"
    if status == "ok":
        print("the database schema is current", flush=True)
        sys.exit(0)
    print(f"waiting for the migration Job (ocore-storage db upgrade): schema {status}", flush=True)
    time.sleep(INTERVAL)
