"""The worker: the only owner of the device. Claims jobs from the database queue and runs them one at a time.

The same class runs inside ``lorastudio serve`` (as a thread) and as ``lorastudio worker`` (its own process):
the queue lives in the database, so several processes can share it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from core.types import JobInfo
from storage import jobs
from storage.db import writing
from training.base import JobCancelled

log = logging.getLogger(__name__)

JobHandler = Callable[[JobInfo, "JobReporter"], "str | None"]


def default_worker_id(suffix: str = "worker") -> str:
    return f"{socket.gethostname()}:{suffix}"


class JobReporter:
    """Narrow view of the queue handed to a running job: progress, cancellation and heartbeat."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker_id: str,
                 min_interval: float = 1.0, cancel_interval: float = 0.5) -> None:
        self._sessions = sessions
        self.job_id = job_id
        self.worker_id = worker_id
        self._min_interval = min_interval
        self._cancel_interval = cancel_interval
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._pending_losses: list[float] = []

    def progress(self, step: int, total: int, *, loss: float | None = None, it_per_s: float | None = None,
                 eta_s: float | None = None, preview_path: str | None = None, message: str | None = None,
                 force: bool = False) -> None:
        """Record progress; writes are throttled, but every loss value is kept for the curve."""
        if loss is not None:
            self._pending_losses.append(float(loss))
        now = time.monotonic()
        if not force and preview_path is None and now - self._last_write < self._min_interval and step < total:
            return
        self._last_write = now
        losses, self._pending_losses = self._pending_losses, []
        with writing(self._sessions) as session:
            for value in losses[:-1]:
                jobs.update_progress(session, self.job_id, step=step, total_steps=total, loss=value)
            jobs.update_progress(session, self.job_id, step=step, total_steps=total,
                                 loss=losses[-1] if losses else None, it_per_s=it_per_s, eta_s=eta_s,
                                 preview_path=preview_path, message=message)

    def should_stop(self) -> bool:
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self._cancel_interval:
            self._last_cancel_check = now
            with self._sessions.begin() as session:
                self._cancelled = jobs.is_cancel_requested(session, self.job_id)
        return self._cancelled

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"job {self.job_id} was cancelled")


class Worker:
    """Claim → run → record, in a loop, until stopped."""

    def __init__(self, sessions: sessionmaker[Session], handlers: dict[str, JobHandler], worker_id: str,
                 lease_seconds: float = 60.0, heartbeat_seconds: float = 5.0, poll_seconds: float = 0.5) -> None:
        self._sessions = sessions
        self._handlers = handlers
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None

    # lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def recover(self) -> list[str]:
        """Mark jobs this worker left running (a crash or kill) and jobs with expired leases as interrupted."""
        with writing(self._sessions) as session:
            mine = jobs.interrupt_worker_jobs(
                session, self.worker_id, "interrupted: the app stopped while this job was running; queue it again")
            stale = jobs.recover_stale(session, self.lease_seconds)
        return mine + stale

    # loop ------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        last_recover = time.monotonic()
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the loop must survive anything a job or the database throws
                log.exception("worker loop error")
                ran = False
            if time.monotonic() - last_recover > self.lease_seconds:
                last_recover = time.monotonic()
                try:
                    self.recover()
                except Exception:
                    log.exception("recovery failed")
            if not ran:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def run_once(self, job_id: str | None = None) -> bool:
        """Claim one job (the given one, or the next in line) and run it. Returns whether a job ran."""
        kinds = list(self._handlers)
        if job_id is None:
            job = jobs.claim_next(self._sessions, self.worker_id, kinds=kinds)
        else:
            job = jobs.claim_job(self._sessions, job_id, self.worker_id)
        if job is None:
            return False
        self.run_claimed(job)
        return True

    def run_claimed(self, job: JobInfo) -> None:
        self.current_job = job.id
        reporter = JobReporter(self._sessions, job.id, self.worker_id)
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, beat_stop), daemon=True)
        beat.start()
        try:
            result_ref = self._handlers[job.kind](job, reporter)
        except JobCancelled:
            with writing(self._sessions) as session:
                jobs.mark_cancelled(session, job.id)
        except Exception as exc:
            log.warning("job %s failed: %s", job.id, exc)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            with writing(self._sessions) as session:
                jobs.fail(session, job.id, detail)
        else:
            with writing(self._sessions) as session:
                if jobs.get_job(session, job.id).status == "running":  # handlers may finish it themselves
                    jobs.finish(session, job.id, result_ref=result_ref)
        finally:
            beat_stop.set()
            beat.join()
            self.current_job = None

    def _heartbeat(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                with writing(self._sessions) as session:
                    jobs.heartbeat(session, job_id, self.worker_id)
            except Exception:
                log.exception("heartbeat failed for job %s", job_id)
