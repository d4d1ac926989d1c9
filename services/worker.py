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


class LeaseLost(Exception):
    """The worker no longer holds its job (its lease expired and the job was requeued, maybe taken by another).

    Not a ``JobCancelled``: the trainer keeps its checkpoints, which the job's next run resumes from.
    """

JobHandler = Callable[[JobInfo, "JobReporter"], "str | None"]


def default_worker_id(suffix: str = "worker") -> str:
    return f"{socket.gethostname()}:{suffix}"


class JobReporter:
    """Narrow view of the queue handed to a running job: progress, control flags and lease.

    ``should_stop`` reads the job's flags from the database on every call (at most every ``control_interval``
    seconds), so a cancel is seen at the next step; save-now / sample-now requests are left in ``save_requested``
    / ``sample_requested`` for the job to act on (then :meth:`done_request`). Losing the lease raises
    :class:`LeaseLost` from ``should_stop``/``progress``.
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker_id: str,
                 min_interval: float = 1.0, control_interval: float = 0.0) -> None:
        self._sessions = sessions
        self.job_id = job_id
        self.worker_id = worker_id
        self._min_interval = min_interval
        self._control_interval = control_interval
        self._last_write = 0.0
        self._last_control = -float("inf")
        self._cancelled = False
        self.lost = threading.Event()  # set by the heartbeat thread when the lease is gone
        self.save_requested = False
        self.sample_requested = False
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
        try:
            with writing(self._sessions) as session:
                for value in losses[:-1]:
                    jobs.update_progress(session, self.job_id, step=step, total_steps=total, loss=value,
                                         worker_id=self.worker_id)
                jobs.update_progress(session, self.job_id, step=step, total_steps=total,
                                     loss=losses[-1] if losses else None, it_per_s=it_per_s, eta_s=eta_s,
                                     preview_path=preview_path, message=message, worker_id=self.worker_id)
        except ValueError as exc:
            self.lost.set()
            raise LeaseLost(str(exc)) from None

    def should_stop(self) -> bool:
        """True once a cancel was requested; raises :class:`LeaseLost` if the job was taken away."""
        if self.lost.is_set():
            raise LeaseLost(f"worker {self.worker_id} lost the lease of job {self.job_id}")
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_control >= self._control_interval:
            self._last_control = now
            with self._sessions.begin() as session:
                state = jobs.control_state(session, self.job_id, self.worker_id)
            if not state.owned:
                self.lost.set()
                raise LeaseLost(f"worker {self.worker_id} no longer holds job {self.job_id}")
            self._cancelled = state.cancel
            self.save_requested = state.save_now
            self.sample_requested = state.sample_now
        return self._cancelled

    def done_request(self, flag: str, note: str) -> None:
        """Clear request ``save_now``/``sample_now`` and log ``note`` (what was done about it)."""
        with writing(self._sessions) as session:
            jobs.clear_request(session, self.job_id, flag, note)
        if flag == "save_now":
            self.save_requested = False
        else:
            self.sample_requested = False

    def check_cancel(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"job {self.job_id} was cancelled")


class Worker:
    """Claim → run → record, in a loop, until stopped."""

    def __init__(self, sessions: sessionmaker[Session], handlers: dict[str, JobHandler], worker_id: str,
                 lease_seconds: float = 60.0, heartbeat_seconds: float = 5.0, poll_seconds: float = 0.5,
                 memory_gb: float | None = None) -> None:
        """``memory_gb``: the device's memory; jobs asking for more (``min_gpu_memory_gb``) are not claimed."""
        if heartbeat_seconds >= lease_seconds:
            raise ValueError(f"heartbeat every {heartbeat_seconds} s must be shorter than the lease "
                             f"({lease_seconds} s)")
        self._sessions = sessions
        self._handlers = handlers
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.memory_gb = memory_gb
        self.recover_seconds = lease_seconds / 4  # how often expired leases of other workers are looked for
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
        """Release jobs this worker left running (a crash or kill) and jobs with expired leases: each is
        requeued (and resumes from its checkpoint) until it used up its attempts, then failed."""
        with writing(self._sessions) as session:
            mine = jobs.interrupt_worker_jobs(session, self.worker_id, f"worker {self.worker_id} restarted")
            stale = jobs.recover_stale(session, self.lease_seconds)
        return mine + stale

    def recover_expired(self) -> list[str]:
        """Release only jobs whose lease expired (safe to call while this worker runs a job)."""
        with writing(self._sessions) as session:
            return jobs.recover_stale(session, self.lease_seconds)

    # loop ------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        last_recover = time.monotonic()
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the loop must survive anything a job or the database throws
                log.exception("worker loop error")
                ran = False
            if time.monotonic() - last_recover > self.recover_seconds:
                last_recover = time.monotonic()
                try:
                    self.recover_expired()
                except Exception:
                    log.exception("recovery failed")
            if not ran:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def run_once(self, job_id: str | None = None) -> bool:
        """Claim one job (the given one, or the next in line) and run it. Returns whether a job ran."""
        kinds = list(self._handlers)
        if job_id is None:
            job = jobs.claim_next(self._sessions, self.worker_id, kinds=kinds, memory_gb=self.memory_gb)
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
        beat = threading.Thread(target=self._heartbeat, args=(reporter, beat_stop), daemon=True)
        beat.start()
        try:
            result_ref = self._handlers[job.kind](job, reporter)
        except LeaseLost as exc:
            log.warning("job %s: %s; leaving it to its new worker", job.id, exc)
        except JobCancelled:
            self._record(job.id, lambda s: jobs.mark_cancelled(s, job.id, worker_id=self.worker_id))
        except Exception as exc:
            log.warning("job %s failed: %s", job.id, exc)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._record(job.id, lambda s: jobs.fail(s, job.id, detail, worker_id=self.worker_id))
        else:
            def finish(session: Session) -> None:
                row = jobs.get_job(session, job.id)
                if row.status == "running" and row.worker_id == self.worker_id:  # handlers may finish it
                    jobs.finish(session, job.id, result_ref=result_ref, worker_id=self.worker_id)
            self._record(job.id, finish)
        finally:
            beat_stop.set()
            beat.join()
            self.current_job = None

    def _record(self, job_id: str, change: Callable[[Session], object]) -> None:
        """Write the job's outcome; a job that was taken away meanwhile is left alone."""
        try:
            with writing(self._sessions) as session:
                change(session)
        except ValueError as exc:
            log.warning("job %s: outcome not recorded: %s", job_id, exc)

    def _heartbeat(self, reporter: JobReporter, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                with writing(self._sessions) as session:
                    held = jobs.heartbeat(session, reporter.job_id, self.worker_id)
            except Exception:
                log.exception("heartbeat failed for job %s", reporter.job_id)
                continue
            if not held:
                reporter.lost.set()
                return
