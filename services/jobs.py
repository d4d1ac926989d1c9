"""Use cases of the Jobs view: list, inspect, cancel, retry, reorder, save/sample now, wait."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session, sessionmaker

from core.types import JobInfo
from storage import jobs
from storage.db import writing


class JobService:
    def __init__(self, sessions: sessionmaker[Session], wake_worker=None) -> None:
        self._sessions = sessions
        self._wake = wake_worker or (lambda: None)

    def list_jobs(self, limit: int = 100, statuses: list[str] | None = None) -> list[JobInfo]:
        with self._sessions.begin() as session:
            return [jobs.job_info(r) for r in jobs.list_jobs(session, limit=limit, statuses=statuses)]

    def get(self, job_id: str) -> JobInfo:
        with self._sessions.begin() as session:
            return jobs.job_info(jobs.get_job(session, job_id))

    def cancel(self, job_id: str) -> str:
        with writing(self._sessions) as session:
            return jobs.request_cancel(session, job_id)

    def retry(self, job_id: str) -> JobInfo:
        """Queue a failed, cancelled or interrupted job again (attempts reset; training resumes from its
        last checkpoint if one is left)."""
        with writing(self._sessions) as session:
            info = jobs.job_info(jobs.retry(session, job_id))
        self._wake()
        return info

    def move_to_top(self, job_id: str) -> JobInfo:
        """Make a queued job the next one claimed."""
        with writing(self._sessions) as session:
            return jobs.job_info(jobs.move_to_top(session, job_id))

    def set_priority(self, job_id: str, priority: int) -> JobInfo:
        with writing(self._sessions) as session:
            return jobs.job_info(jobs.set_priority(session, job_id, priority))

    def save_now(self, job_id: str) -> None:
        """Ask a running job for a checkpoint at its next step."""
        with writing(self._sessions) as session:
            jobs.request_save(session, job_id)

    def sample_now(self, job_id: str) -> None:
        """Ask a running job for a preview image at its next step."""
        with writing(self._sessions) as session:
            jobs.request_sample(session, job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.25, on_update=None) -> JobInfo:
        """Block until the job finishes (or ``timeout``), calling ``on_update(job)`` on each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s (status {job.status})")
            time.sleep(poll)
