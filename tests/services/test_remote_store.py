"""Two hosts, one database and one shared artifact URL: host A trains, host B generates with the adapter, and a
training job checkpointed on host A whose worker died resumes on host B (``storage.remote``, docs/deployment.md).

Each host is a full ``Services`` with its own data dir (its own local cache) and the same database URL and
``artifact_url`` (a ``file://`` folder standing in for S3 and the like)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.io import load_safetensors, sha256_file
from core.types import AdapterWeight, GenerationRequest
from services.container import build_services
from services.settings import Settings
from services.worker import Worker
from storage import jobs
from storage.db import utcnow, writing
from storage.remote import MirroredArtifactStore, make_artifact_store

TRAIN = {"max_steps": 4, "rank": 4, "preview_every": 4, "preview_steps": 2, "checkpoint_every": 2}  # one preview
ROOT = Path(__file__).resolve().parents[2]
RESUME = {"max_steps": 6, "rank": 4, "preview_every": 0, "checkpoint_every": 2}


class _WorkerDied(BaseException):
    """The worker's process is gone: nothing in it records an outcome, the job stays 'running' on a dead lease."""


class _Interrupting:
    """A job reporter that makes the worker die, or the user cancel, once training reaches ``step``."""

    def __init__(self, reporter, step: int, how: str, probe=None) -> None:
        self._reporter, self._step, self._how, self._seen = reporter, step, how, 0
        self._probe, self.probed = probe, []  # ``probe()`` is recorded at the moment of the interruption

    def progress(self, step: int, total: int, **kwargs) -> None:
        if kwargs.get("loss") is not None:
            self._seen = step
            if self._how == "die" and step >= self._step:
                self._interrupted()
                raise _WorkerDied(f"killed at step {step}")
        self._reporter.progress(step, total, **kwargs)

    def should_stop(self) -> bool:
        if self._how == "cancel" and self._seen >= self._step:
            self._interrupted()
            return True
        return self._reporter.should_stop()

    def _interrupted(self) -> None:
        if self._probe is not None and not self.probed:
            self.probed.append(self._probe())

    def __getattr__(self, name: str):
        return getattr(self._reporter, name)


@pytest.fixture()
def hosts(tmp_path: Path, models_dir: Path, db_url: str):
    url = f"file://{tmp_path / 'shared'}"
    built = []
    for name in ("a", "b"):
        settings = Settings(data_dir=tmp_path / f"host-{name}", models_path=models_dir, db_url=db_url,
                            artifact_url=url, worker_id=f"host-{name}", lease_seconds=30.0, heartbeat_seconds=1.0,
                            poll_seconds=0.05)
        built.append(build_services(settings))
    yield built
    for services in built:
        services.close()


def _store(services) -> MirroredArtifactStore:
    """The host's view of the shared store, as its app would read files through it."""
    store = make_artifact_store(services.settings.artifacts_dir, services.settings.artifact_url)
    assert isinstance(store, MirroredArtifactStore)
    return store


def _submit(services, image_dir: Path, name: str, config: dict):
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name=name, method="lora", kind="subject",
                                        trigger_word="sks", config=config)
    return job


def _run(services, job_id: str):
    assert services.worker.run_once(job_id)
    done = services.jobs.get(job_id)
    assert done.status == "succeeded", done.error
    return done


def _generate(services, adapters=()) -> np.ndarray:
    job = services.submit_generation(GenerationRequest(prompt="sks disc", seed=3, steps=2, adapters=adapters))
    done = _run(services, job.id)
    image = services.generation.get_image(done.result_ref)
    return np.asarray(Image.open(_store(services).resolve(image.path)))


def test_adapter_trained_on_one_host_is_used_on_another(hosts, image_dir: Path) -> None:
    host_a, host_b = hosts
    adapter_id = _run(host_a, _submit(host_a, image_dir, "disc", TRAIN).id).result_ref
    adapter = host_b.catalog.get_adapter(adapter_id)  # one database: host B sees the row at once
    cached = host_b.settings.artifacts_dir / adapter.file_path
    assert not cached.exists() and not (host_b.settings.artifacts_dir / adapter.preview_paths[0]).exists()

    on_b = _generate(host_b, (AdapterWeight("disc", 1.0),))
    assert sha256_file(cached) == adapter.sha256  # fetched from the shared store by the generation
    assert not np.array_equal(on_b, _generate(host_b))  # the adapter changed the image
    assert np.array_equal(on_b, _generate(host_a, (AdapterWeight("disc", 1.0),)))  # same weights on both hosts

    assert _store(host_b).resolve(adapter.preview_paths[0]).is_file()  # the gallery's preview, on B
    made_on_b = [i for i in host_a.generation.history() if i.adapters][-1]  # the older of the two
    assert host_a.jobs.get(made_on_b.job_id).worker_id == "host-b"
    assert not (host_a.settings.artifacts_dir / made_on_b.path).exists()
    on_a = _store(host_a).resolve(made_on_b.path)  # B's image, read on A
    assert sha256_file(on_a) == sha256_file(host_b.settings.artifacts_dir / made_on_b.path)


def test_job_whose_worker_died_resumes_on_another_host(hosts, image_dir: Path) -> None:
    host_a, host_b = hosts
    job = _submit(host_a, image_dir, "traveller", RESUME)
    doomed = Worker(host_a.sessions, {"train": lambda info, reporter: host_a.training.run_train_job(
        info, _Interrupting(reporter, 3, "die"))}, "host-a/doomed")
    with pytest.raises(_WorkerDied):
        doomed.run_once(job.id)
    assert host_a.jobs.get(job.id).status == "running"
    assert (host_a.settings.artifacts_dir / "jobs" / job.id / "checkpoints" / "step-000002").is_dir()
    assert not (host_b.settings.artifacts_dir / "jobs").exists()
    assert not (host_b.settings.artifacts_dir / "datasets").exists()

    with writing(host_b.sessions) as session:  # host A's lease runs out
        assert jobs.recover_stale(session, lease_seconds=1, now=utcnow() + timedelta(seconds=60)) == [job.id]
    done = _run(host_b, job.id)
    texts = [text for _, text in done.log]
    assert any(t == "resuming from checkpoint step-000002" for t in texts), texts
    assert done.progress.step == RESUME["max_steps"] and done.attempts == 2
    resumed = host_b.catalog.get_adapter(done.result_ref)
    assert resumed.steps == RESUME["max_steps"]

    # the same training without the interruption gives the same weights: the state really came across
    straight = host_a.catalog.get_adapter(_run(host_a, _submit(host_a, image_dir, "straight", RESUME).id).result_ref)
    got, _ = load_safetensors(host_b.catalog.adapter_file(resumed.id))
    want, _ = load_safetensors(host_a.catalog.adapter_file(straight.id))
    assert got.keys() == want.keys() and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)


def test_cancel_removes_the_shared_checkpoints_too(hosts, image_dir: Path, tmp_path: Path) -> None:
    host_a, host_b = hosts
    job = _submit(host_a, image_dir, "cancelled", RESUME)
    shared = tmp_path / "shared" / "jobs" / job.id / "checkpoints"
    interrupting: list[_Interrupting] = []

    def cancelling(info, reporter):
        interrupting.append(_Interrupting(reporter, 4, "cancel", probe=lambda: sorted(
            p.name for p in shared.iterdir())))
        return host_a.training.run_train_job(info, interrupting[0])

    Worker(host_a.sessions, {"train": cancelling}, "host-a/cancel").run_once(job.id)
    assert host_a.jobs.get(job.id).status == "cancelled"
    assert interrupting[0].probed == [["step-000002", "step-000004"]]  # shared while it ran
    assert not shared.exists() or not any(shared.iterdir())
    host_a.jobs.retry(job.id)
    done = _run(host_b, job.id)  # starts over rather than from a checkpoint of the cancelled run
    assert not any(t.startswith("resuming") for _, t in done.log) and done.progress.step == RESUME["max_steps"]


def test_settings_read_the_artifact_url_from_the_environment() -> None:
    assert Settings().artifact_url == ""
    assert Settings.from_env({"LORASTUDIO_ARTIFACT_URL": "s3://bucket/studio"}).artifact_url == "s3://bucket/studio"


def test_worker_process_on_another_host_uses_the_shared_store(hosts, image_dir: Path, models_dir: Path) -> None:
    """``lorastudio worker`` started with only environment variables (its own data dir, the shared database and
    artifact URL) runs a generation queued on host A with an adapter host A trained."""
    host_a, host_b = hosts
    adapter_id = _run(host_a, _submit(host_a, image_dir, "disc", TRAIN | {"preview_every": 0}).id).result_ref
    job = host_a.submit_generation(GenerationRequest(prompt="sks disc", seed=3, steps=2,
                                                     adapters=(AdapterWeight(adapter_id, 1.0),)))
    host_c = host_b.settings.data_dir.parent / "host-c"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTUDIO_")}
    env.update(LORASTUDIO_HOME=str(host_c), LORASTUDIO_MODELS=str(models_dir), HF_HUB_OFFLINE="1",
               LORASTUDIO_DB_URL=host_a.settings.database_url, LORASTUDIO_ARTIFACT_URL=host_a.settings.artifact_url,
               LORASTUDIO_WORKER_ID="host-c", PYTHONPATH=str(ROOT))
    worker = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--once", "--device", "cpu"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    done = host_a.jobs.get(job.id)
    assert done.status == "succeeded" and done.worker_id == "host-c", done.error
    image = host_a.generation.get_image(done.result_ref)
    adapter = host_a.catalog.get_adapter(adapter_id)
    assert sha256_file(host_c / "artifacts" / adapter.file_path) == adapter.sha256  # fetched by the worker
    assert sha256_file(_store(host_a).resolve(image.path)) == sha256_file(host_c / "artifacts" / image.path)
