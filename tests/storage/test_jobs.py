from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.types import JobInfo
from storage import jobs
from storage.db import make_session_factory, utcnow
from tests.storage import _claim_worker


def _enqueue(sessions: sessionmaker[Session], n: int = 1, kind: str = "train", priority: int = 0) -> list[str]:
    with sessions.begin() as session:
        return [jobs.enqueue(session, kind, {"i": i}, f"job {i}", priority=priority).id for i in range(n)]


def _get(sessions: sessionmaker[Session], job_id: str) -> JobInfo:
    with sessions() as session:
        return jobs.job_info(jobs.get_job(session, job_id))


def test_enqueue_claim_progress_finish(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    queued = _get(sessions, job_id)
    assert (queued.status, queued.payload, queued.title, queued.started_at) == ("queued", {"i": 0}, "job 0", None)

    claimed = jobs.claim_next(sessions, "w1")
    assert claimed is not None and claimed.id == job_id and claimed.status == "running"
    assert claimed.started_at is not None and claimed.started_at.tzinfo is not None
    assert jobs.claim_next(sessions, "w2") is None

    with sessions.begin() as session:
        for step, loss in enumerate([0.5, float("nan"), 0.25], start=1):
            jobs.update_progress(session, job_id, step=step, total_steps=10, loss=loss, it_per_s=2.0, eta_s=4.0)
        jobs.update_progress(
            session, job_id, step=4, total_steps=10, preview_path="jobs/x/previews/4.png", message="sampling"
        )
    running = _get(sessions, job_id)
    assert running.progress.step == 4 and running.progress.fraction == pytest.approx(0.4)
    assert running.progress.loss == 0.25 and running.losses == (0.5, 0.25)  # NaN is not stored
    assert (running.progress.it_per_s, running.progress.eta_s) == (2.0, 4.0)
    assert running.progress.preview_path == "jobs/x/previews/4.png" and running.progress.message == "sampling"

    with sessions.begin() as session:
        assert jobs.heartbeat(session, job_id, "w1") is True
        assert jobs.heartbeat(session, job_id, "someone-else") is False
        jobs.finish(session, job_id, result_ref="adapter-1")
    done = _get(sessions, job_id)
    assert (done.status, done.result_ref, done.finished) == ("succeeded", "adapter-1", True)
    assert done.finished_at >= done.started_at >= done.created_at
    with sessions.begin() as session:
        assert jobs.get_job(session, job_id).attempts == 1
        assert jobs.heartbeat(session, job_id, "w1") is False
        with pytest.raises(ValueError, match="already finished"):
            jobs.update_progress(session, job_id, step=5, total_steps=10)
        with pytest.raises(ValueError, match="already finished"):
            jobs.finish(session, job_id)


def test_fail(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "w")
    with sessions.begin() as session:
        jobs.fail(session, job_id, "CUDA out of memory")
    info = _get(sessions, job_id)
    assert (info.status, info.error) == ("failed", "CUDA out of memory")
    assert info.finished_at is not None


def test_cancel_queued_job_is_immediate(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    with sessions.begin() as session:
        assert jobs.request_cancel(session, job_id) == "cancelled"
    info = _get(sessions, job_id)
    assert info.status == "cancelled" and info.finished_at is not None
    assert jobs.claim_next(sessions, "w") is None


def test_cancel_running_job_is_a_request(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "w")
    with sessions.begin() as session:
        assert jobs.is_cancel_requested(session, job_id) is False
        assert jobs.request_cancel(session, job_id) == "cancel_requested"
    with sessions.begin() as session:
        assert jobs.is_cancel_requested(session, job_id) is True
        assert jobs.get_job(session, job_id).status == "running"
        jobs.mark_cancelled(session, job_id)
        jobs.mark_cancelled(session, job_id)  # idempotent
    assert _get(sessions, job_id).status == "cancelled"


@pytest.mark.parametrize("end", ["finish", "fail", "cancel"])
def test_cancel_finished_job_is_an_error(sessions, end: str) -> None:
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "w")
    with sessions.begin() as session:
        {"finish": jobs.finish, "fail": lambda s, j: jobs.fail(s, j, "boom"), "cancel": jobs.mark_cancelled}[end](
            session, job_id
        )
    with sessions.begin() as session, pytest.raises(ValueError, match=f"job {job_id} already finished"):
        jobs.request_cancel(session, job_id)


def test_unknown_job(sessions) -> None:
    with sessions.begin() as session:
        for call in (
            lambda: jobs.get_job(session, "nope"),
            lambda: jobs.request_cancel(session, "nope"),
            lambda: jobs.is_cancel_requested(session, "nope"),
        ):
            with pytest.raises(KeyError, match="no job with id 'nope'"):
                call()
    with pytest.raises(KeyError):
        jobs.claim_job(sessions, "nope", "w")


def test_bad_kind_and_status(sessions) -> None:
    with sessions.begin() as session:
        with pytest.raises(ValueError, match="unknown job kind 'bake'"):
            jobs.enqueue(session, "bake", {}, "x")
        with pytest.raises(ValueError, match="unknown job status"):
            jobs.list_jobs(session, statuses=["done"])


def test_priority_then_age_order_and_kinds(sessions) -> None:
    (low_old,) = _enqueue(sessions, priority=0)
    (high_old,) = _enqueue(sessions, priority=5)
    (low_new,) = _enqueue(sessions, priority=0)
    (gen,) = _enqueue(sessions, kind="generate", priority=1)
    (high_new,) = _enqueue(sessions, priority=5)
    assert jobs.claim_next(sessions, "w", kinds=["generate"]).id == gen
    assert jobs.claim_next(sessions, "w", kinds=["generate"]) is None
    order = [jobs.claim_next(sessions, "w").id for _ in range(4)]
    assert order == [high_old, high_new, low_old, low_new]


def test_list_jobs_newest_first(sessions) -> None:
    ids = _enqueue(sessions, 3)
    jobs.claim_next(sessions, "w")
    with sessions() as session:
        assert [r.id for r in jobs.list_jobs(session)] == ids[::-1]
        assert [r.id for r in jobs.list_jobs(session, limit=2)] == ids[:0:-1]
        assert [r.id for r in jobs.list_jobs(session, statuses=["running"])] == [ids[0]]


def test_claim_job(sessions) -> None:
    first, second = _enqueue(sessions, 2)
    info = jobs.claim_job(sessions, second, "w")
    assert info is not None and info.id == second and info.status == "running"
    assert jobs.claim_job(sessions, second, "w") is None  # no longer queued
    assert jobs.claim_next(sessions, "w").id == first


def test_recover_stale_requeues(sessions) -> None:
    stale, fresh, waiting = _enqueue(sessions, 3)
    jobs.claim_job(sessions, stale, "w1")
    jobs.claim_job(sessions, fresh, "w2")
    with sessions.begin() as session:
        beat = jobs.get_job(session, stale).heartbeat_at
        jobs.get_job(session, fresh).heartbeat_at = beat + timedelta(seconds=80)
    with sessions.begin() as session:
        assert jobs.recover_stale(session, lease_seconds=30, now=beat + timedelta(seconds=90)) == [stale]
    info = _get(sessions, stale)
    assert info.status == "queued" and info.worker_id is None and info.attempts == 1
    assert info.progress.message.startswith("requeued: worker lost") and "w1 (90 s ago)" in info.progress.message
    assert _get(sessions, fresh).status == "running"
    assert _get(sessions, waiting).status == "queued"
    with sessions.begin() as session:
        assert jobs.heartbeat(session, stale, "w1") is False  # the worker learns it lost the job
        with pytest.raises(ValueError, match="queued"):
            jobs.update_progress(session, stale, step=1, total_steps=2)
        assert jobs.recover_stale(session, lease_seconds=30, now=utcnow()) == []


def test_lease_expiry_fails_after_max_attempts(sessions) -> None:
    with sessions.begin() as session:
        job_id = jobs.enqueue(session, "train", {}, title="t", max_attempts=3).id
    for attempt in range(1, 4):
        claimed = jobs.claim_next(sessions, f"w{attempt}")
        assert claimed is not None and claimed.id == job_id and claimed.attempts == attempt
        with sessions.begin() as session:
            assert jobs.recover_stale(session, lease_seconds=5, now=utcnow() + timedelta(seconds=60)) == [job_id]
    info = _get(sessions, job_id)
    assert info.status == "failed" and info.finished_at is not None
    assert info.error.startswith("worker lost 3 times; last seen ") and "on w3" in info.error
    assert sum(text.startswith("requeued") for _, text in info.log) == 2
    assert jobs.claim_next(sessions, "w4") is None
    with sessions.begin() as session:
        jobs.retry(session, job_id)
    again = _get(sessions, job_id)
    assert again.status == "queued" and again.attempts == 0 and again.error is None
    assert jobs.claim_next(sessions, "w5").attempts == 1


def test_restarted_worker_requeues_its_jobs(sessions) -> None:
    mine, other = _enqueue(sessions, 2)
    jobs.claim_job(sessions, mine, "w1")
    jobs.claim_job(sessions, other, "w2")
    with sessions.begin() as session:
        assert jobs.interrupt_worker_jobs(session, "w1", "the worker restarted") == [mine]
    assert _get(sessions, mine).status == "queued" and _get(sessions, other).status == "running"
    assert "the worker restarted" in _get(sessions, mine).progress.message


def test_cancel_requested_then_worker_lost_is_cancelled(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "w1")
    with sessions.begin() as session:
        jobs.request_cancel(session, job_id)
        jobs.recover_stale(session, lease_seconds=1, now=utcnow() + timedelta(seconds=10))
    assert _get(sessions, job_id).status == "cancelled"


def test_stale_worker_cannot_touch_a_reclaimed_job(sessions) -> None:
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "old")
    with sessions.begin() as session:
        jobs.recover_stale(session, lease_seconds=1, now=utcnow() + timedelta(seconds=10))
    jobs.claim_next(sessions, "new")
    with sessions.begin() as session:
        assert not jobs.control_state(session, job_id, "old").owned
        assert jobs.control_state(session, job_id, "new").owned
        for call in (lambda: jobs.finish(session, job_id, worker_id="old"),
                     lambda: jobs.fail(session, job_id, "x", worker_id="old"),
                     lambda: jobs.mark_cancelled(session, job_id, worker_id="old"),
                     lambda: jobs.update_progress(session, job_id, step=1, total_steps=2, worker_id="old")):
            with pytest.raises(ValueError, match="no longer holds it"):
                call()
        jobs.finish(session, job_id, worker_id="new")
    assert _get(sessions, job_id).status == "succeeded"


def test_retry_reorder_and_flags(sessions) -> None:
    a, b, c = _enqueue(sessions, 3)
    with sessions.begin() as session:
        jobs.move_to_top(session, c)
        jobs.set_priority(session, a, -5)
    assert [jobs.claim_next(sessions, "w").id for _ in range(3)] == [c, b, a]
    with sessions.begin() as session:
        with pytest.raises(ValueError, match="not queued"):
            jobs.move_to_top(session, a)
        with pytest.raises(ValueError, match="cannot retry"):
            jobs.retry(session, a)  # running
        jobs.request_save(session, a)
        jobs.request_sample(session, a)
        state = jobs.control_state(session, a, "w")
        assert state.owned and state.save_now and state.sample_now and not state.cancel
        assert jobs.clear_request(session, a, "save_now", "checkpoint saved at step 3")
        assert not jobs.clear_request(session, a, "save_now")
        jobs.fail(session, a, "boom")
        with pytest.raises(ValueError, match="request"):
            jobs.request_save(session, a)
        jobs.mark_cancelled(session, b)
        jobs.retry(session, a)
        jobs.retry(session, b)
    info = _get(sessions, a)
    assert info.status == "queued" and not info.save_now and info.sample_now is False
    texts = [text for _, text in info.log]
    assert "save now requested" in texts and "checkpoint saved at step 3" in texts and "failed: boom" in texts
    assert texts[-1] == "queued again (retry)"
    assert _get(sessions, b).status == "queued"


def test_memory_routing(sessions) -> None:
    with sessions.begin() as session:
        big = jobs.enqueue(session, "train", {"min_gpu_memory_gb": 40}, title="big").id
        small = jobs.enqueue(session, "train", {"min_gpu_memory_gb": 8}, title="small").id
        with pytest.raises(ValueError, match="min_gpu_memory_gb"):
            jobs.enqueue(session, "train", {"min_gpu_memory_gb": "lots"}, title="bad")
    assert jobs.claim_next(sessions, "w", memory_gb=16).id == small
    assert jobs.claim_next(sessions, "w", memory_gb=16) is None
    assert jobs.claim_next(sessions, "w", memory_gb=80).id == big


def test_loss_curve_is_capped(sessions, monkeypatch) -> None:
    monkeypatch.setattr(jobs, "MAX_LOSS_POINTS", 10)
    (job_id,) = _enqueue(sessions)
    jobs.claim_next(sessions, "w")
    with sessions.begin() as session:
        for step in range(1, 101):
            jobs.update_progress(session, job_id, step=step, total_steps=100, loss=float(step))
    losses = _get(sessions, job_id).losses
    assert 5 <= len(losses) <= 10
    assert losses[-1] == 100.0 and list(losses) == sorted(losses)


def test_append_loss_thins_evenly() -> None:
    assert jobs._append_loss([1.0, 2.0, 3.0, 4.0], 5.0, cap=4) == [2.0, 4.0, 5.0]
    assert jobs._append_loss([1.0, 2.0, 3.0], 4.0, cap=3) == [1.0, 3.0, 4.0]
    assert jobs._append_loss([1.0], 2.0, cap=4) == [1.0, 2.0]


def _drain_in_threads(sessions: sessionmaker[Session], workers: int) -> list[str]:
    start = threading.Barrier(workers)
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run(worker_id: str) -> None:
        mine = claimed.setdefault(worker_id, [])
        try:
            start.wait()
            while (info := jobs.claim_next(sessions, worker_id)) is not None:
                mine.append(info.id)
                with sessions.begin() as session:
                    jobs.finish(session, info.id, result_ref=worker_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return [job_id for ids in claimed.values() for job_id in ids]


def _assert_each_claimed_once(sessions: sessionmaker[Session], ids: list[str], claimed: list[str]) -> None:
    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert not duplicates
    assert sorted(claimed) == sorted(ids)
    with sessions() as session:
        rows = jobs.list_jobs(session, limit=len(ids) + 1)
    assert {r.status for r in rows} == {"succeeded"}
    assert {r.attempts for r in rows} == {1}


def test_claim_is_exclusive_across_threads(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    ids = _enqueue(sessions, 200)
    claimed = _drain_in_threads(sessions, workers=4)
    _assert_each_claimed_once(sessions, ids, claimed)


def test_claim_is_exclusive_across_processes(sqlite_engine: Engine, sqlite_url: str) -> None:
    sessions = make_session_factory(sqlite_engine)
    ids = _enqueue(sessions, 200)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_worker.drain, args=(sqlite_url, f"p{i}", start, results)) for i in range(2)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [error for _, _, error in reports] == [None, None]
    claimed = [job_id for _, mine, _ in reports for job_id in mine]
    assert all(mine for _, mine, _ in reports), "both processes should have claimed jobs"
    _assert_each_claimed_once(sessions, ids, claimed)
