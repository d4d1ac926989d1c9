"""Runs in a spawned process: drain the queue of the database at ``url``, reporting what this worker claimed."""

from __future__ import annotations

from typing import Any

from storage import jobs
from storage.db import make_engine, make_session_factory


def drain(url: str, worker_id: str, start: Any, results: Any) -> None:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    claimed: list[str] = []
    error = None
    try:
        start.wait(timeout=30)
        while (info := jobs.claim_next(sessions, worker_id)) is not None:
            claimed.append(info.id)
            with sessions.begin() as session:
                jobs.finish(session, info.id, result_ref=worker_id)
    except Exception as exc:  # reported to the test process, which fails with it
        error = repr(exc)
    finally:
        results.put((worker_id, claimed, error))
        engine.dispose()
