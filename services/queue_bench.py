"""``lorastudio bench queue``: claim throughput, queue-view latency and requeue time, on SQLite and PostgreSQL.

Jobs here are no-ops (claim, then finish), so the numbers measure the queue itself, not any model.
"""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from core.types import JobInfo
from services.jobs import JobService
from services.worker import JobReporter, Worker
from storage import jobs
from storage.db import open_database, utcnow, writing
from storage.models import JobRow

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
THREADS = (1, 4, 8)
VIEW_TARGET_MS = 200.0


@contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="lorastudio-queue-bench-") as folder:
        yield f"sqlite:///{Path(folder) / 'queue.db'}"


@contextmanager
def _postgres_url(admin_url: str) -> Iterator[str]:
    """A throwaway database on the server of ``admin_url``, dropped afterwards."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"lorastudio_bench_{secrets.token_hex(5)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _enqueue_many(sessions: sessionmaker[Session], count: int, kind: str = "generate") -> None:
    with writing(sessions) as session:
        for i in range(count):
            jobs.enqueue(session, kind, {"i": i}, f"bench {i}")


def claim_throughput(sessions: sessionmaker[Session], threads: int, count: int) -> dict[str, float]:
    """``count`` no-op jobs drained by ``threads`` claimers (claim, then finish); jobs per second."""
    _enqueue_many(sessions, count)
    done: list[int] = []
    errors: list[str] = []
    start = threading.Barrier(threads + 1)

    def drain(worker_id: str) -> None:
        n = 0
        start.wait()
        try:
            while (job := jobs.claim_next(sessions, worker_id)) is not None:
                with writing(sessions) as session:
                    jobs.finish(session, job.id, worker_id=worker_id)
                n += 1
        except Exception as exc:
            errors.append(repr(exc))
        done.append(n)

    pool = [threading.Thread(target=drain, args=(f"bench-{i}",)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"claimers failed: {errors[0]}")
    if sum(done) != count:
        raise RuntimeError(f"{sum(done)} jobs claimed, expected {count}")
    return {"threads": threads, "jobs": count, "seconds": round(seconds, 3), "jobs_per_s": round(count / seconds, 1)}


def requeue_time(sessions: sessionmaker[Session], lease_seconds: float, trials: int = 3) -> dict[str, Any]:
    """Seconds from a worker's last heartbeat (its death) to its job running again on another worker."""
    heartbeat = lease_seconds / 4
    samples = [_requeue_trial(sessions, lease_seconds, heartbeat, trial) for trial in range(trials)]
    worst = max(samples)
    return {"lease_seconds": lease_seconds, "heartbeat_seconds": heartbeat, "trials": trials,
            "seconds": [round(s, 3) for s in samples], "median_s": round(statistics.median(samples), 3),
            "max_s": round(worst, 3), "max_in_leases": round(worst / lease_seconds, 2),
            "target_in_leases": 2.0, "meets_target": worst < 2 * lease_seconds}


def _requeue_trial(sessions: sessionmaker[Session], lease_seconds: float, heartbeat: float, trial: int) -> float:
    started = threading.Event()
    restarted_at: list[float] = []

    def handler(job: JobInfo, reporter: JobReporter) -> None:
        restarted_at.append(time.perf_counter())
        started.set()

    rescuer = Worker(sessions, {"train": handler}, f"bench-rescuer-{trial}", lease_seconds=lease_seconds,
                     heartbeat_seconds=heartbeat, poll_seconds=0.05)
    doomed = f"bench-doomed-{trial}"
    with writing(sessions) as session:
        job_id = jobs.enqueue(session, "train", {}, f"requeue trial {trial}").id
    if jobs.claim_job(sessions, job_id, doomed) is None:
        raise RuntimeError(f"could not claim job {job_id}")
    rescuer.start()
    try:
        time.sleep(heartbeat)
        with writing(sessions) as session:  # the doomed worker's last heartbeat, then it dies
            jobs.heartbeat(session, job_id, doomed)
        died = time.perf_counter()
        if not started.wait(10 * lease_seconds):
            raise RuntimeError(f"job {job_id} was not run again within {10 * lease_seconds} s")
        return restarted_at[0] - died
    finally:
        rescuer.stop()


def _fill(sessions: sessionmaker[Session], total: int, loss_points: int = 200) -> None:
    """Bring the jobs table to ``total`` rows, mostly finished ones with a loss curve, like a busy queue."""
    with sessions.begin() as session:
        have = session.query(JobRow).count()
    now = utcnow()
    statuses = ("succeeded",) * 7 + ("failed", "cancelled", "queued")
    curve = [round(1.0 / (1 + i), 4) for i in range(loss_points)]
    rows = []
    for i in range(have, total):
        status = statuses[i % len(statuses)]
        rows.append({"id": secrets.token_hex(16), "kind": "train" if i % 3 else "generate", "status": status,
                     "priority": 0, "title": f"view job {i}", "payload": {"i": i}, "step": loss_points,
                     "total_steps": loss_points, "message": "", "losses": curve if status != "queued" else [],
                     "cancel_requested": status == "cancelled", "attempts": 1, "max_attempts": 3,
                     "save_now": False, "sample_now": False, "log": [[now.isoformat(), "claimed"]],
                     "created_at": now - timedelta(seconds=total - i),
                     "error": "boom" if status == "failed" else None})
    with sessions.begin() as session:
        for chunk in range(0, len(rows), 1000):
            session.execute(insert(JobRow), rows[chunk:chunk + 1000])


def view_latency(sessions: sessionmaker[Session], rows: int, render: Callable[[list[JobInfo]], Any] | None,
                 repeats: int = 20) -> dict[str, Any]:
    """Latency of the Jobs view's query (the newest 100 jobs, as DTOs) plus ``render`` with ``rows`` jobs stored."""
    _fill(sessions, rows)
    service = JobService(sessions)
    timings = []
    for _ in range(repeats + 2):
        began = time.perf_counter()
        listed = service.list_jobs(limit=100)
        if render is not None:
            render(listed)
        timings.append((time.perf_counter() - began) * 1000)
    timings = sorted(timings[2:])  # the first two warm caches up
    p95 = timings[min(len(timings) - 1, int(round(0.95 * (len(timings) - 1))))]
    return {"rows": rows, "limit": 100, "rendered": render is not None,
            "median_ms": round(statistics.median(timings), 2),
            "p95_ms": round(p95, 2), "target_ms": VIEW_TARGET_MS, "meets_target": p95 < VIEW_TARGET_MS}


def bench_backend(url: str, *, threads: Sequence[int], jobs_per_run: int, view_rows: int, lease_seconds: float,
                  render: Callable[[list[JobInfo]], Any] | None) -> dict[str, Any]:
    engine, sessions = open_database(url)
    try:
        claims = [claim_throughput(sessions, n, jobs_per_run) for n in threads]
        requeue = requeue_time(sessions, lease_seconds)
        view = view_latency(sessions, view_rows, render)
    finally:
        engine.dispose()
    return {"claim": claims, "requeue": requeue, "view": view}


def run_queue_benchmark(pg_admin_url: str | None = DEFAULT_PG_ADMIN_URL, *, threads: Sequence[int] = THREADS,
                        jobs_per_run: int = 400, view_rows: int = 10_000, lease_seconds: float = 2.0,
                        render: Callable[[list[JobInfo]], Any] | None = None) -> dict[str, Any]:
    """Every measurement on SQLite (a temp file) and PostgreSQL (a throwaway database on ``pg_admin_url``;
    None skips it). A backend that fails is reported under ``errors``."""
    options = {"threads": threads, "jobs_per_run": jobs_per_run, "view_rows": view_rows,
               "lease_seconds": lease_seconds, "render": render}
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                               "settings": {k: v for k, v in options.items() if k != "render"} | {
                                   "threads": list(threads), "rendered": render is not None},
                               "backends": {}, "errors": {}}
    backends: list[tuple[str, Callable[[], Any]]] = [("sqlite", _sqlite_url)]
    if pg_admin_url:
        backends.append(("postgresql", lambda: _postgres_url(pg_admin_url)))
    for name, make_url_cm in backends:
        try:
            with make_url_cm() as url:
                results["backends"][name] = bench_backend(url, **options)
        except Exception as exc:
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
    return results
