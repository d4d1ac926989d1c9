"""The job queue, stored in the ``jobs`` table.

Lifecycle: ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled`` | ``interrupted``.
A queued job can also go straight to ``cancelled``. Every function takes a Session whose transaction the caller
owns, except the claim functions: they take the session factory and run one short transaction of their own.
State changes are conditional ``UPDATE``s (``... WHERE status = 'running'``): a concurrent change cannot be
overwritten, and on SQLite the first statement takes the write lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, get_args

from sqlalchemy import Select, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.types import FINISHED_STATUSES, JOB_STATUSES, JobInfo, JobKind, JobProgress
from storage.db import begin_immediate, utcnow
from storage.models import JobRow

JOB_KINDS: tuple[str, ...] = get_args(JobKind)
MAX_LOSS_POINTS = 2000  # longer loss curves are thinned 2:1 (see _append_loss)


def enqueue(session: Session, kind: str, payload: dict[str, Any], title: str, priority: int = 0) -> JobRow:
    """Queue a job; higher ``priority`` runs first, then oldest first."""
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    row = JobRow(kind=kind, payload=dict(payload), title=title, priority=int(priority), status="queued")
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
    session_factory: sessionmaker[Session], worker_id: str, kinds: Sequence[str] | None = None
) -> JobInfo | None:
    """Atomically move the highest-priority, oldest queued job to ``running``; None when nothing is queued.

    SQLite: the transaction starts with ``BEGIN IMMEDIATE``, so claimers queue on the write lock.
    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent claimers pick different rows.
    """
    stmt = select(JobRow).where(JobRow.status == "queued")
    if kinds is not None:
        stmt = stmt.where(JobRow.kind.in_(list(kinds)))
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
) -> JobRow:
    """Record progress of a running job (also a heartbeat). Optional fields left as None keep their stored value.

    ``loss`` is appended to the loss curve; a non-finite loss is not stored (JSON has no NaN).
    Raises ValueError if the job is not running (it finished, or was marked interrupted meanwhile).
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
    row = _transition(session, job_id, ("running",), values, action="record progress for")
    if finite_loss:
        row.losses = _append_loss(row.losses, float(loss), MAX_LOSS_POINTS)
        session.flush()
    return row


def _append_loss(losses: Sequence[float], value: float, cap: int) -> list[float]:
    """Append ``value``; at ``cap`` points every other stored point is dropped first (the latest ones stay)."""
    out = list(losses)
    if len(out) >= cap:
        out = out[(len(out) - 1) % 2 :: 2]
    out.append(value)
    return out


def finish(session: Session, job_id: str, result_ref: str | None = None) -> JobRow:
    """``running`` → ``succeeded``; ``result_ref`` names what the job produced (adapter or image id)."""
    return _transition(
        session,
        job_id,
        ("running",),
        {"status": "succeeded", "result_ref": result_ref, "finished_at": utcnow(), "eta_s": 0.0},
        action="finish",
    )


def fail(session: Session, job_id: str, error: str) -> JobRow:
    """``queued``/``running`` → ``failed`` with a message for the user."""
    values = {"status": "failed", "error": error, "finished_at": utcnow()}
    return _transition(session, job_id, ("queued", "running"), values, action="fail")


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
        return "cancelled"
    running = session.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(cancel_requested=True)
    )
    if running.rowcount:
        return "cancel_requested"
    row = get_job(session, job_id)
    raise ValueError(f"job {job_id} already finished ({row.status}); there is nothing to cancel")


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """Read straight from the database (never a cached row)."""
    flag = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
    if flag is None:
        raise KeyError(f"no job with id {job_id!r}")
    return bool(flag)


def mark_cancelled(session: Session, job_id: str) -> JobRow:
    """The worker stopped the job after a cancel request (or it never started)."""
    row = session.get(JobRow, job_id)
    if row is not None and row.status == "cancelled":
        return row
    values = {"status": "cancelled", "finished_at": utcnow(), "message": "cancelled"}
    return _transition(session, job_id, ("queued", "running"), values, action="cancel")


def recover_stale(session: Session, lease_seconds: float, now: datetime | None = None) -> list[str]:
    """Mark ``running`` jobs whose heartbeat is older than the lease as ``interrupted``; returns their ids."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    stale = or_(JobRow.heartbeat_at < cutoff, and_(JobRow.heartbeat_at.is_(None), JobRow.started_at < cutoff))
    # The UPDATE comes first so that it takes the write lock; the messages are filled in afterwards.
    rows = session.execute(
        update(JobRow)
        .where(JobRow.status == "running", stale)
        .values(status="interrupted", finished_at=now)
        .returning(JobRow.id, JobRow.heartbeat_at, JobRow.started_at)
    ).all()
    for job_id, beat, started in rows:
        last = beat or started or now
        silent = max(0, round((now - last).total_seconds()))
        error = f"interrupted: the worker stopped while this job was running (no heartbeat for {silent} s)"
        session.execute(update(JobRow).where(JobRow.id == job_id).values(error=error))
    return [job_id for job_id, _, _ in rows]


def interrupt_worker_jobs(session: Session, worker_id: str, reason: str, now: datetime | None = None) -> list[str]:
    """Mark every ``running`` job of ``worker_id`` as ``interrupted`` (that worker restarted, so they died)."""
    now = now or utcnow()
    rows = session.execute(
        update(JobRow)
        .where(JobRow.status == "running", JobRow.worker_id == worker_id)
        .values(status="interrupted", finished_at=now, error=reason)
        .returning(JobRow.id)
    ).all()
    return [job_id for (job_id,) in rows]


def _transition(
    session: Session, job_id: str, allowed: tuple[str, ...], values: dict[str, Any], *, action: str
) -> JobRow:
    result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(allowed)).values(**values))
    if not result.rowcount:
        row = get_job(session, job_id)
        state = "already finished" if row.status in FINISHED_STATUSES else "not running"
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
    )
