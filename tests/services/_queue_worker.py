"""Run as ``python -m tests.services._queue_worker URL OUT_DIR WORKER_ID``: a real :class:`Worker` with a cheap
test-only job handler, draining the queue of the database at URL. Every execution leaves a file in OUT_DIR."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from core.types import JobInfo
from services.worker import JobReporter, Worker
from storage.db import make_engine, make_session_factory


def main(url: str, out_dir: str, worker_id: str) -> int:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    out = Path(out_dir)

    def record(job: JobInfo, reporter: JobReporter) -> str:
        (out / f"{job.id}.{uuid.uuid4().hex}").write_text(worker_id)
        return worker_id

    worker = Worker(sessions, {"generate": record}, worker_id, lease_seconds=30.0, heartbeat_seconds=5.0)
    try:
        while worker.run_once():
            pass
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
