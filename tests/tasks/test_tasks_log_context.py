"""Every log line a job writes carries its id, type, destination and phase: lines of
the runner before and after the job's own code, and lines of the scan's listing thread."""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from tests.factories import World
from tests.tasks.kit import ProbeBackend, Store, local_dest, record, request, run
from tests.tasks.test_celery_config import CapturedJson

FIELDS = ("job_id", "job_type", "destination_id", "phase")


def test_every_line_of_a_job_and_of_its_listing_thread_carries_the_context(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/{i}.tar" for i in range(12))
    record(db, world, dest, "0.tar")
    record(db, world, dest, "gone.tar")
    job = request(db, dest, "scan_cleanup")
    listing = logging.getLogger("test.listing")

    def on_page(listed: int) -> None:  # runs in the scan's listing thread
        listing.warning("listed %d", listed)

    lines = CapturedJson()
    with lines:
        run(engine, cfg, job, ProbeBackend(dest, page_size=5, on_page=on_page))
        run(engine, cfg, job)  # already finished: "nothing to do", still tagged

    assert len(lines.records) >= 4, lines.records
    for line in lines.records:
        assert line.get("job_id") == str(job.id), line
    threaded = [line for line in lines.records if line["logger"] == "test.listing"]
    assert len(threaded) == 3
    for line in threaded:
        assert {k: line.get(k) for k in FIELDS} == {
            "job_id": str(job.id),
            "job_type": "scan_cleanup",
            "destination_id": str(dest.id),
            "phase": "listing",
        }
    finished = [line for line in lines.records if "(scan_cleanup) finished" in line["message"]]
    assert len(finished) == 1 and all(finished[0].get(k) for k in FIELDS)
    skipped = [line for line in lines.records if "nothing to do" in line["message"]]
    assert len(skipped) == 1
