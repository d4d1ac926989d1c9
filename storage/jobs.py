"""The job queue, stored in the ``jobs`` table.

Lifecycle: ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``. A running job whose worker
died (its lease expired, or the worker restarted) goes back to ``queued`` until it has been claimed
``max_attempts`` times, then ``failed``. ``failed``/``cancelled``/``interrupted`` (rows written before leases
requeued) can be retried. A queued job can also go straight to ``cancelled``.
Every function takes a Session whose transaction the caller owns, except the claim functions: they take the
session factory and run one short transaction of their own.
State changes are conditional ``UPDATE``s (``... WHERE status = 'running'``): a concurrent change cannot be
overwritten, and on SQLite the first statement takes the write lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, get_args

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.types import FINISHED_STATUSES, JOB_STATUSES, JobInfo, JobKind, JobProgress
from storage.db import begin_immediate, utcnow
from storage.models import JobRow

JOB_KINDS: tuple[str, ...] = get_args(JobKind)
MAX_LOSS_POINTS = 2000  # longer loss curves are thinned 2:1 (see _append_loss)
MAX_LOG_LINES = 500  # the oldest lines of a job's log are dropped beyond this
RETRYABLE_STATUSES: tuple[str, ...] = ("failed", "cancelled", "interrupted")


def enqueue(session: Session, kind: str, payload: dict[str, Any], title: str, priority: int = 0,
            max_attempts: int = 3, job_id: str | None = None) -> JobRow:
    """Queue a job; higher ``priority`` runs first, then oldest first.

    ``job_id`` (default: a fresh one) lets a caller store the job's input files under ``jobs/<id>/`` first.

    ``payload["min_gpu_memory_gb"]`` (optional) routes the job to devices with at least that much memory.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    if int(max_attempts) < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    min_memory = payload.get("min_gpu_memory_gb")
    if min_memory is not None:
        try:
            min_memory = float(min_memory)
        except (TypeError, ValueError):
            raise ValueError(f"min_gpu_memory_gb must be a number, got {min_memory!r}") from None
        if not math.isfinite(min_memory) or min_memory < 0:
            raise ValueError(f"min_gpu_memory_gb must be a non-negative number, got {min_memory!r}")
    row = JobRow(kind=kind, payload=dict(payload), title=title, priority=int(priority), status="queued",
                 max_attempts=int(max_attempts), min_memory_gb=min_memory, log=[])
    if job_id is not None:
        row.id = job_id
    session.add(row)
    session.flush()
    return row


def get_job(session: Session, job_id: str) -> JobRow:
    row = session.get(JobRow, job_id)
    if row is None:
        raise KeyError(f"no job with id {job_id!r}")
    return row


def list_jobs(session: Session, limit: int = 200, statuses: Iterable[str] | None = None) -> list[JobRow]:
    """Newest first."""
    stmt = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id).limit(limit)
    if statuses is not None:
        statuses = list(statuses)
        unknown = sorted(set(statuses) - set(JOB_STATUSES))
        if unknown:
            raise ValueError(f"unknown job status {unknown}; expected some of {', '.join(JOB_STATUSES)}")
        stmt = stmt.where(JobRow.status.in_(statuses))
    return list(session.scalars(stmt))


def claim_next(
    session_factory: sessionmaker[Session],
    worker_id: str,
    kinds: Sequence[str] | None = None,
    memory_gb: float | None = None,
) -> JobInfo | None:
    """Atomically move the highest-priority, oldest queued job to ``running``; None when nothing is queued.

    ``memory_gb`` is the claiming device's memory: jobs needing more (``min_memory_gb``) are left for others.
    SQLite: the transaction starts with ``BEGIN IMMEDIATE``, so claimers queue on the write lock.
    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers pick different rows.
    """
    stmt = select(JobRow).where(JobRow.status == "queued")
    if kinds is not None:
        stmt = stmt.where(JobRow.kind.in_(list(kinds)))
    if memory_gb is not None:
        stmt = stmt.where(or_(JobRow.min_memory_gb.is_(None), JobRow.min_memory_gb <= float(memory_gb)))
    stmt = stmt.order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.id).limit(1)
    return _claim(session_factory, stmt, worker_id)


def claim_job(session_factory: sessionmaker[Session], job_id: str, worker_id: str) -> JobInfo | None:
    """Claim one specific job; None if it is no longer queued. KeyError if there is no such job."""
    stmt = select(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
    info = _claim(session_factory, stmt, worker_id)
    if info is None:
        with session_factory() as session:
            get_job(session, job_id)
    return info


def _claim(session_factory: sessionmaker[Session], stmt: Select[tuple[JobRow]], worker_id: str) -> JobInfo | None:
    with session_factory() as session, session.begin():
        begin_immediate(session)
        row = session.scalars(stmt.with_for_update(skip_locked=True)).first()
        if row is None:
            return None
        now = utcnow()
        row.status = "running"
        row.worker_id = worker_id
        row.started_at = now
        row.heartbeat_at = now
        row.attempts += 1
        row.save_now = False
        row.sample_now = False
        row.log = _append_log(row.log, now, f"claimed by {worker_id} (attempt {row.attempts} of {row.max_attempts})")
        session.flush()
        info = job_info(row)
    return info


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Extend the lease of a running job; False if the job is no longer running under ``worker_id``."""
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status == "running", JobRow.worker_id == worker_id)
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount > 0


def update_progress(
    session: Session,
    job_id: str,
    *,
    step: int,
    total_steps: int,
    loss: float | None = None,
    it_per_s: float | None = None,
    eta_s: float | None = None,
    preview_path: str | None = None,
    message: str | None = None,
    worker_id: str | None = None,
) -> JobRow:
    """Record progress of a running job (also a heartbeat). Optional fields left as None keep their stored value.

    ``loss`` is appended to the loss curve; a non-finite loss is not stored (JSON has no NaN). A new ``message``
    is also added to the job's log. Raises ValueError if the job is not running (under ``worker_id`` when given).
    """
    values: dict[str, Any] = {"step": int(step), "total_steps": int(total_steps), "heartbeat_at": utcnow()}
    finite_loss = loss is not None and math.isfinite(loss)
    if finite_loss:
        values["loss"] = float(loss)
    for key, value in (("it_per_s", it_per_s), ("eta_s", eta_s)):
        if value is not None:
            values[key] = float(value) if math.isfinite(value) else None
    if preview_path is not None:
        values["preview_path"] = preview_path
    if message is not None:
        values["message"] = message
    row = _transition(session, job_id, ("running",), values, action="record progress for", worker_id=worker_id)
    if finite_loss:
        row.losses = _append_loss(row.losses, float(loss), MAX_LOSS_POINTS)
    if message and (not row.log or row.log[-1][1] != message):
        row.log = _append_log(row.log, values["heartbeat_at"], message)
    session.flush()
    return row


def _append_loss(losses: Sequence[float], value: float, cap: int) -> list[float]:
    """Append ``value``; at ``cap`` points every other stored point is dropped first (the latest ones stay)."""
    out = list(losses)
    if len(out) >= cap:
        out = out[(len(out) - 1) % 2 :: 2]
    out.append(value)
    return out


def _append_log(log: Sequence[Any] | None, when: datetime, text: str) -> list[list[str]]:
    out = [list(x) for x in log or ()]
    out.append([when.isoformat(timespec="seconds"), text])
    return out[-MAX_LOG_LINES:]


def finish(session: Session, job_id: str, result_ref: str | None = None, worker_id: str | None = None) -> JobRow:
    """``running`` → ``succeeded``; ``result_ref`` names what the job produced (adapter or image id).

    With ``worker_id``, only while that worker still holds the job (else ValueError).
    """
    values = {"status": "succeeded", "result_ref": result_ref, "finished_at": utcnow(), "eta_s": 0.0}
    row = _transition(session, job_id, ("running",), values, action="finish", worker_id=worker_id)
    row.log = _append_log(row.log, values["finished_at"], "succeeded")
    session.flush()
    return row


def fail(session: Session, job_id: str, error: str, worker_id: str | None = None) -> JobRow:
    """``queued``/``running`` → ``failed`` with a message for the user."""
    values = {"status": "failed", "error": error, "finished_at": utcnow()}
    row = _transition(session, job_id, ("queued", "running"), values, action="fail", worker_id=worker_id)
    row.log = _append_log(row.log, values["finished_at"], f"failed: {error}")
    session.flush()
    return row


def request_cancel(session: Session, job_id: str) -> str:
    """Cancel a job. Returns ``"cancelled"`` (it was queued: done at once) or ``"cancel_requested"`` (it is
    running: the worker stops at its next check). ValueError if the job already finished."""
    now = utcnow()
    queued = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, message="cancelled before it started")
    )
    if queued.rowcount:
        _log(session, job_id, now, "cancelled before it started")
        return "cancelled"
    running = session.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(cancel_requested=True)
    )
    if running.rowcount:
        _log(session, job_id, now, "cancel requested")
        return "cancel_requested"
    row = get_job(session, job_id)
    raise ValueError(f"job {job_id} already finished ({row.status}); there is nothing to cancel")


def _log(session: Session, job_id: str, when: datetime, text: str) -> None:
    row = session.get(JobRow, job_id, populate_existing=True)
    if row is not None:
        row.log = _append_log(row.log, when, text)
        session.flush()


def request_save(session: Session, job_id: str) -> None:
    """Ask the running job to write a checkpoint at its next step. ValueError unless it is running."""
    _request_flag(session, job_id, "save_now", "save now")


def request_sample(session: Session, job_id: str) -> None:
    """Ask the running job to render a preview at its next step. ValueError unless it is running."""
    _request_flag(session, job_id, "sample_now", "sample now")


def _request_flag(session: Session, job_id: str, column: str, label: str) -> None:
    now = utcnow()
    _transition(session, job_id, ("running",), {column: True}, action=f"request {label!r} for")
    _log(session, job_id, now, f"{label} requested")


@dataclass(frozen=True)
class JobControl:
    """What a running job's worker must act on, read in one query."""

    owned: bool  # still running under this worker (False: the lease was lost, someone else may run it)
    cancel: bool
    save_now: bool
    sample_now: bool


def control_state(session: Session, job_id: str, worker_id: str) -> JobControl:
    """The cancel / save-now / sample-now flags of a job, and whether ``worker_id`` still holds it."""
    row = session.execute(
        select(JobRow.status, JobRow.worker_id, JobRow.cancel_requested, JobRow.save_now, JobRow.sample_now)
        .where(JobRow.id == job_id)
    ).first()
    if row is None:
        raise KeyError(f"no job with id {job_id!r}")
    status, owner, cancel, save, sample = row
    return JobControl(status == "running" and owner == worker_id, bool(cancel), bool(save), bool(sample))


def clear_request(session: Session, job_id: str, column: str, note: str | None = None) -> bool:
    """Reset flag ``save_now`` or ``sample_now`` once acted on (``note`` goes to the log); False if not set."""
    if column not in ("save_now", "sample_now"):
        raise ValueError(f"not a request flag: {column!r}")
    result = session.execute(
        update(JobRow).where(JobRow.id == job_id, getattr(JobRow, column).is_(True)).values({column: False})
    )
    if result.rowcount and note:
        _log(session, job_id, utcnow(), note)
    return bool(result.rowcount)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """Read straight from the database (never a cached row)."""
    flag = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
    if flag is None:
        raise KeyError(f"no job with id {job_id!r}")
    return bool(flag)


def mark_cancelled(session: Session, job_id: str, worker_id: str | None = None) -> JobRow:
    """The worker stopped the job after a cancel request (or it never started)."""
    row = session.get(JobRow, job_id)
    if row is not None and row.status == "cancelled":
        return row
    values = {"status": "cancelled", "finished_at": utcnow(), "message": "cancelled"}
    row = _transition(session, job_id, ("queued", "running"), values, action="cancel", worker_id=worker_id)
    row.log = _append_log(row.log, values["finished_at"], f"cancelled at step {row.step}")
    session.flush()
    return row


def retry(session: Session, job_id: str) -> JobRow:
    """``failed``/``cancelled``/``interrupted`` → ``queued`` with the attempts count reset.

    Checkpoints left in the job's folder are kept, so a training job continues from its last one.
    """
    now = utcnow()
    values = {"status": "queued", "attempts": 0, "error": None, "cancel_requested": False, "save_now": False,
              "sample_now": False, "worker_id": None, "heartbeat_at": None, "started_at": None,
              "finished_at": None, "result_ref": None, "eta_s": None, "message": "queued again"}
    row = _transition(session, job_id, RETRYABLE_STATUSES, values, action="retry")
    row.log = _append_log(row.log, now, "queued again (retry)")
    session.flush()
    return row


def set_priority(session: Session, job_id: str, priority: int) -> JobRow:
    """Change the priority of a queued job (higher runs first). ValueError unless it is queued."""
    return _transition(session, job_id, ("queued",), {"priority": int(priority)}, action="reorder")


def move_to_top(session: Session, job_id: str) -> JobRow:
    """Give a queued job a priority above every other queued job, so it is claimed next."""
    top = session.scalar(
        select(func.max(JobRow.priority)).where(JobRow.status == "queued", JobRow.id != job_id)
    )
    row = get_job(session, job_id)
    target = row.priority if top is None or row.priority > top else top + 1
    return set_priority(session, job_id, target)


def recover_stale(session: Session, lease_seconds: float, now: datetime | None = None) -> list[str]:
    """Release ``running`` jobs whose heartbeat is older than the lease (their worker died); returns their ids.

    Each goes back to ``queued`` (its checkpoints stay, so training resumes) while ``attempts < max_attempts``,
    else to ``failed`` with the reason. Rows another transaction holds are skipped (PostgreSQL ``SKIP LOCKED``).
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    stale = or_(JobRow.heartbeat_at < cutoff, and_(JobRow.heartbeat_at.is_(None), JobRow.started_at < cutoff))
    stmt = select(JobRow).where(JobRow.status == "running", stale).with_for_update(skip_locked=True)
    return _release(session, list(session.scalars(stmt)), now, "its lease expired")


def interrupt_worker_jobs(session: Session, worker_id: str, reason: str, now: datetime | None = None) -> list[str]:
    """Release every ``running`` job of ``worker_id`` (that worker restarted, so they died): requeued while
    attempts remain, else failed. ``reason`` goes to the job's log."""
    now = now or utcnow()
    stmt = select(JobRow).where(JobRow.status == "running", JobRow.worker_id == worker_id).with_for_update()
    return _release(session, list(session.scalars(stmt)), now, reason)


def _release(session: Session, rows: list[JobRow], now: datetime, reason: str) -> list[str]:
    for row in rows:
        last = row.heartbeat_at or row.started_at or now
        silent = max(0, round((now - last).total_seconds()))
        seen = f"last seen {last.strftime('%Y-%m-%d %H:%M:%S')} UTC on {row.worker_id} ({silent} s ago)"
        if row.cancel_requested:
            row.status = "cancelled"
            row.message = f"cancelled (its worker was lost: {reason}; {seen})"
            row.finished_at = now
        elif row.attempts < row.max_attempts:
            row.status = "queued"
            row.message = f"requeued: worker lost ({reason}); {seen}"
            row.started_at = None
        else:
            row.status = "failed"
            row.error = f"worker lost {row.attempts} times; {seen}"
            row.message = row.error
            row.finished_at = now
        row.log = _append_log(row.log, now, row.message)
        row.worker_id = None
        row.heartbeat_at = None
    session.flush()
    return [row.id for row in rows]


def _transition(
    session: Session, job_id: str, allowed: tuple[str, ...], values: dict[str, Any], *, action: str,
    worker_id: str | None = None,
) -> JobRow:
    stmt = update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(allowed))
    if worker_id is not None:
        stmt = stmt.where(JobRow.worker_id == worker_id)
    result = session.execute(stmt.values(**values))
    if not result.rowcount:
        row = get_job(session, job_id)
        if worker_id is not None and row.status in allowed:
            raise ValueError(f"cannot {action} job {job_id}: worker {worker_id} no longer holds it")
        state = "already finished" if row.status in FINISHED_STATUSES else f"not {' or '.join(allowed)}"
        raise ValueError(f"cannot {action} job {job_id}: it is {state} ({row.status})")
    return session.get(JobRow, job_id, populate_existing=True)


def job_info(row: JobRow) -> JobInfo:
    progress = JobProgress(
        step=row.step,
        total_steps=row.total_steps,
        loss=row.loss,
        it_per_s=row.it_per_s,
        eta_s=row.eta_s,
        preview_path=row.preview_path,
        message=row.message or "",
    )
    return JobInfo(
        id=row.id,
        kind=row.kind,
        status=row.status,
        title=row.title,
        payload=dict(row.payload or {}),
        progress=progress,
        losses=tuple(float(x) for x in row.losses or ()),
        error=row.error,
        result_ref=row.result_ref,
        cancel_requested=bool(row.cancel_requested),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        priority=row.priority,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        worker_id=row.worker_id,
        save_now=bool(row.save_now),
        sample_now=bool(row.sample_now),
        log=tuple((str(when), str(text)) for when, text in row.log or ()),
    )
