"""The job queue with real worker processes: exactly-once under load, SIGKILL mid-training → resume elsewhere,
plus cancel within one step, save/sample-now requests and memory routing through the services."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from core.io import sha256_file
from services import training as training_service
from services.adapter_records import job_adapter_id
from services.container import build_device_workers, build_services
from services.settings import Settings
from storage import jobs
from storage.db import open_database

ROOT = Path(__file__).resolve().parents[2]


def _env(models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTUDIO_")}
    env.update(LORASTUDIO_MODELS=str(models_dir), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def test_each_job_runs_exactly_once_across_processes(db_url: str, tmp_path: Path, models_dir: Path) -> None:
    engine, sessions = open_database(db_url)
    n_jobs, n_workers = 300, 4
    with sessions.begin() as session:
        ids = {jobs.enqueue(session, "generate", {"i": i}, f"tiny {i}").id for i in range(n_jobs)}
    out = tmp_path / "executions"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.services._queue_worker", db_url, str(out), f"w{i}"],
                              cwd=ROOT, env=_env(models_dir)) for i in range(n_workers)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * n_workers
    executions = Counter(f.name.split(".")[0] for f in out.iterdir())
    assert set(executions) == ids
    assert max(executions.values()) == 1, [j for j, n in executions.items() if n > 1]
    with sessions.begin() as session:
        rows = jobs.list_jobs(session, limit=n_jobs + 10)
    assert Counter(r.status for r in rows) == {"succeeded": n_jobs}
    assert all(r.attempts == 1 for r in rows)
    assert len({r.result_ref for r in rows}) > 1  # the work was actually shared
    engine.dispose()


def _start_worker(data: Path, db_url: str, models_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.cli", "worker", "--data-dir", str(data), "--db-url", db_url, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(models_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_killed_worker_job_resumes_on_another_worker(db_url: str, tmp_path: Path, models_dir: Path,
                                                     image_dir: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, models_path=models_dir, db_url=db_url)
    services = build_services(settings)
    max_steps = 80
    try:
        _, job = services.train_from_upload(sorted(image_dir.iterdir()), name="survivor", trigger_word="sks",
                                            config={"max_steps": max_steps, "rank": 4, "checkpoint_every": 2,
                                                    "preview_every": 0})
        checkpoints = services.settings.artifacts_dir / "jobs" / job.id / "checkpoints"
        first = _start_worker(data, db_url, models_dir, "--lease-seconds", "30", "--heartbeat-seconds", "0.5")
        try:
            deadline = time.monotonic() + 180
            while not list(checkpoints.glob("step-*")):
                assert first.poll() is None, first.stdout.read()
                assert time.monotonic() < deadline, "no checkpoint written"
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        killed = services.jobs.get(job.id)
        assert killed.status == "running" and killed.attempts == 1
        saved_steps = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")]
        assert 0 < max(saved_steps) < max_steps

        time.sleep(2.2)  # the dead worker's lease (2 s for the second worker) runs out
        second = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker", "--once", "--data-dir", str(data), "--db-url", db_url,
             "--lease-seconds", "2", "--heartbeat-seconds", "0.5"],
            cwd=ROOT, env=_env(models_dir), capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        done = services.jobs.get(job.id)
        assert done.status == "succeeded", (done.error, second.stderr[-3000:])
        assert done.attempts == 2 and done.progress.step == max_steps
        adapter = services.catalog.get_adapter(done.result_ref)
        assert adapter.steps == max_steps
        texts = [text for _, text in done.log]
        assert any(t.startswith("requeued: worker lost") for t in texts), texts
        resumed = [int(m.group(1)) for t in texts if (m := re.match(r"resuming from checkpoint step-(\d+)", t))]
        assert resumed and resumed[0] > 0, texts
        assert resumed[0] == max(saved_steps)  # the newest checkpoint the killed worker left
    finally:
        services.close()


@pytest.fixture()
def services(settings):
    built = build_services(settings)
    yield built
    built.close()


def _submit(services, image_dir: Path, name: str, **config):
    cfg = {"max_steps": 500, "rank": 4, "preview_every": 0, "checkpoint_every": 0} | config
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name=name, trigger_word="sks", config=cfg)
    return job


def test_cancel_is_honoured_within_one_step(services, image_dir, monkeypatch) -> None:
    job = _submit(services, image_dir, "cancel-me")
    steps: list[int] = []
    original = training_service._JobCallback.on_step

    def on_step(self, step, total, loss, it_per_s, eta_s):
        steps.append(step)
        original(self, step, total, loss, it_per_s, eta_s)
        if step == 3:
            assert services.jobs.cancel(job.id) == "cancel_requested"

    monkeypatch.setattr(training_service._JobCallback, "on_step", on_step)
    assert services.worker.run_once(job.id)
    final = services.jobs.get(job.id)
    assert final.status == "cancelled"
    assert steps == [1, 2, 3]  # the trainer's next should_stop saw the request: no fourth step
    assert any(t.startswith("cancelled at step") for _, t in final.log)


def test_save_and_sample_requests_are_taken_and_logged(services, image_dir, monkeypatch) -> None:
    job = _submit(services, image_dir, "flags")
    original = training_service._JobCallback.on_step

    def on_step(self, step, total, loss, it_per_s, eta_s):
        original(self, step, total, loss, it_per_s, eta_s)
        if step == 2:
            services.jobs.save_now(job.id)
            services.jobs.sample_now(job.id)
        if step == 4:
            services.jobs.cancel(job.id)

    monkeypatch.setattr(training_service._JobCallback, "on_step", on_step)
    services.worker.run_once(job.id)
    final = services.jobs.get(job.id)
    assert not final.save_now and not final.sample_now  # taken by the training callback
    log = "\n".join(text for _, text in final.log)
    assert "save now requested" in log and "sample now requested" in log
    assert "save now: checkpoint written at the next step" in log
    assert "sample now: preview rendered at the next step" in log
    previews = list((services.settings.artifacts_dir / "jobs" / job.id / "previews").glob("step-*.png"))
    assert [p.name for p in previews] == ["step-000003.png"]  # preview_every is 0: only the requested one
    with pytest.raises(ValueError, match="cancelled"):
        services.jobs.save_now(job.id)


def test_device_workers_route_by_memory(services, image_dir) -> None:
    small = services.training.submit(dataset_id=_dataset(services, image_dir), name="needs-lots",
                                     trigger_word="sks", config={"max_steps": 2, "rank": 4, "preview_every": 0})
    with services.sessions.begin() as session:  # routing lives in the payload, set at submit by API callers
        row = jobs.get_job(session, small.id)
        row.payload = {**row.payload, "min_gpu_memory_gb": 64}
        row.min_memory_gb = 64.0
    pool = build_device_workers(services, ["cpu", "cpu"], memory_gb=16)
    assert [p.worker.worker_id.split("/")[-1] for p in pool] == ["0:cpu", "1:cpu"]
    assert len({id(p.runtime) for p in pool}) == 2
    assert not pool[0].worker.run_once()  # 16 GB device: the job is not claimed
    big = build_device_workers(services, ["cpu"], memory_gb=80)[0]
    assert big.worker.run_once()
    assert services.jobs.get(small.id).status == "succeeded"
    for p in [*pool, big]:
        p.runtime.release()


def _dataset(services, image_dir: Path) -> str:
    return services.datasets.create_dataset("routing", sorted(image_dir.iterdir())).id


def test_device_workers_drain_the_queue(services, image_dir) -> None:
    ids = [services.generation.submit(_request(seed)).id for seed in range(4)]
    pool = build_device_workers(services, ["cpu", "cpu"])
    for p in pool:
        p.worker.start()
    try:
        for job_id in ids:
            done = services.jobs.wait(job_id, timeout=120, poll=0.05)
            assert done.status == "succeeded", done.error
    finally:
        for p in pool:
            p.worker.stop()
            p.runtime.release()
    owners = {text.split()[2] for job_id in ids for _, text in services.jobs.get(job_id).log
              if text.startswith("claimed by")}
    assert owners <= {p.worker.worker_id for p in pool}


def _request(seed: int):
    from core.types import GenerationRequest

    return GenerationRequest(prompt="a disc", seed=seed, steps=2)


def test_queue_benchmark_smoke(db_url: str) -> None:
    from services.queue_bench import bench_backend

    result = bench_backend(db_url, threads=(1, 4), jobs_per_run=40, view_rows=300, lease_seconds=0.8,
                           render=lambda listed: [j.title for j in listed])
    assert [c["threads"] for c in result["claim"]] == [1, 4]
    assert all(c["jobs"] == 40 and c["jobs_per_s"] > 0 for c in result["claim"])
    assert result["view"]["rows"] == 300 and result["view"]["median_ms"] > 0
    requeue = result["requeue"]
    assert requeue["trials"] == 3 and requeue["max_s"] < 4 * 0.8


def test_worker_that_lost_its_lease_stops_and_leaves_the_job_alone(services, image_dir) -> None:
    from datetime import timedelta

    from services.worker import Worker
    from storage.db import utcnow, writing

    job = services.generation.submit(_request(1))
    seen: list[str] = []

    def stalled(info, reporter) -> str:
        with writing(services.sessions) as session:  # meanwhile the lease ran out and another worker took over
            jobs.recover_stale(session, lease_seconds=1, now=utcnow() + timedelta(seconds=30))
        assert jobs.claim_job(services.sessions, info.id, "rescuer") is not None
        try:
            reporter.should_stop()
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        return "never"

    slow = Worker(services.sessions, {"generate": stalled}, "stalled")
    assert slow.run_once(job.id)
    assert seen == ["LeaseLost"]
    after = services.jobs.get(job.id)
    assert after.status == "running" and after.worker_id == "rescuer" and after.result_ref is None


def test_crash_between_artifact_write_and_catalog_record_leaves_no_orphan(services, image_dir) -> None:
    """A worker that dies after writing an adapter's files but before committing its row: the files stay invisible
    (gallery, reindex) and the job's rerun replaces them, so the catalog ends with exactly one adapter."""
    import torch

    from storage.artifacts import ArtifactStore
    from storage.db import utcnow, writing

    job = _submit(services, image_dir, "crashy", max_steps=2)
    assert jobs.claim_job(services.sessions, job.id, "doomed") is not None
    store = ArtifactStore(services.settings.artifacts_dir)
    adapter_id = job_adapter_id(job.id)  # the id the job's save writes
    store.write_adapter(adapter_id, {"unet.x.lora_A.weight": torch.ones(1, 2)}, {"format": "pt"}, {},
                        {"name": "crashy", "method": "lora", "kind": "subject", "base_model": "builtin:tiny-sd",
                         "job_id": job.id})

    assert services.catalog.list_adapters() == []
    report = services.catalog.reindex()
    assert report["adapters"] == [] and any(job.id in line for line in report["skipped"])

    with writing(services.sessions) as session:  # the dead worker's lease runs out
        assert jobs.recover_stale(session, lease_seconds=1, now=utcnow() + timedelta(seconds=60)) == [job.id]
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded" and done.result_ref == adapter_id
    [adapter] = services.catalog.list_adapters()
    assert adapter.id == adapter_id and adapter.steps == 2
    assert sha256_file(services.settings.artifacts_dir / adapter.file_path) == adapter.sha256
    folders = [p.name for p in (services.settings.artifacts_dir / "adapters").iterdir()]
    assert folders == [adapter_id]
    assert services.catalog.reindex() == {"adapters": [], "images": [], "skipped": []}
