"""The whole loop in process: upload → train → catalog → generate, plus cancel, crash recovery and validation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.io import sha256_file
from core.types import AdapterWeight, GenerationRequest
from services.container import build_services
from services.worker import Worker
from storage import jobs
from tests.conftest import write_images

TRAIN = {"max_steps": 4, "rank": 4, "preview_every": 2, "checkpoint_every": 2}


@pytest.fixture()
def services(settings):
    built = build_services(settings)
    yield built
    built.close()


def _train(services, image_dir: Path, name: str = "disc", **config) -> str:
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name=name, method="lora", kind="subject",
                                        trigger_word="sks", config={**TRAIN, **config})
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    return done.result_ref


def _generate(services, adapters=(), seed: int = 3) -> np.ndarray:
    job = services.submit_generation(GenerationRequest(prompt="sks disc", seed=seed, steps=4, adapters=adapters))
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    image = services.generation.get_image(done.result_ref)
    return np.asarray(Image.open(services.settings.artifacts_dir / image.path))


def test_upload_train_catalog_generate(services, image_dir):
    adapter_id = _train(services, image_dir)
    adapter = services.catalog.get_adapter(adapter_id)
    assert adapter.name == "disc" and adapter.method == "lora" and adapter.kind == "subject"
    assert adapter.trigger_words == ("sks",) and adapter.rank == 4 and adapter.steps == 4
    file = services.settings.artifacts_dir / adapter.file_path
    assert file.suffix == ".safetensors" and sha256_file(file) == adapter.sha256
    assert file.stat().st_size == adapter.file_size
    assert adapter.preview_paths and (services.settings.artifacts_dir / adapter.preview_paths[0]).is_file()
    job = services.jobs.get(services.jobs.list_jobs()[0].id)
    assert job.losses and len(job.losses) == 4 and job.progress.preview_path

    base = _generate(services)
    with_adapter = _generate(services, (AdapterWeight("disc", 1.0),))
    again = _generate(services, (AdapterWeight(adapter_id, 1.0),))
    assert base.shape == (64, 64, 3)
    assert np.abs(base.astype(int) - with_adapter.astype(int)).max() > 0
    assert np.array_equal(with_adapter, again)  # resident adapter, same seed → same image
    assert np.array_equal(base, _generate(services))  # adapters switched off again afterwards
    history = services.generation.history()
    assert [len(h.adapters) for h in history] == [0, 1, 1, 0]  # newest first
    assert history[1].adapters[0].weight == 1.0


def test_submit_validates_before_queueing(services, image_dir):
    files = sorted(image_dir.iterdir())
    bad = [
        ({"name": ""}, "name"),
        ({"method": "nope"}, "unknown method"),
        ({"config": {"rank": 0}}, "rank"),
        ({"config": {"colour": 1}}, "unknown setting"),
        ({"trigger_word": ""}, "trigger word"),
        ({"kind": "vibe"}, "kind"),
    ]
    for change, words in bad:
        settings = {"name": "x", "method": "lora", "kind": "subject", "trigger_word": "sks", "config": TRAIN} | change
        with pytest.raises((ValueError, KeyError), match=words):
            services.train_from_upload(files, **settings)
    assert services.jobs.list_jobs() == [] and services.datasets.list_datasets() == []


def test_upload_keeps_good_files_and_reports_bad(services, tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, 2, captions=False)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    dataset = services.datasets.create_dataset("mixed", sorted(folder.iterdir()))
    assert dataset.image_count == 2
    assert {r.filename for r in dataset.rejected} == {"broken.png", "empty.jpg"}
    assert all(r.filename in str(r) for r in dataset.rejected)
    with pytest.raises(ValueError, match="broken.png"):
        services.datasets.create_dataset("only-bad", [folder / "broken.png"])


def test_cancel_running_training(services, image_dir):
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name="long", trigger_word="sks",
                                        config={"max_steps": 5000, "rank": 4, "preview_every": 0})
    runner = threading.Thread(target=services.worker.run_once, args=(job.id,))
    runner.start()
    deadline = time.monotonic() + 60
    while services.jobs.get(job.id).progress.step < 2:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    assert services.jobs.cancel(job.id) == "cancel_requested"
    runner.join(60)
    final = services.jobs.get(job.id)
    assert final.status == "cancelled" and final.progress.step < 5000
    assert services.catalog.list_adapters() == []
    assert not list((services.settings.artifacts_dir / "adapters").glob("*"))


def test_crash_requeues_the_job_for_the_restarted_worker(services, image_dir):
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name="crashy", trigger_word="sks",
                                        config=TRAIN)
    claimed = jobs.claim_job(services.sessions, job.id, services.worker.worker_id)
    assert claimed and claimed.status == "running"
    # the app "restarts": a worker with the same id recovers and puts the job back in the queue
    restarted = Worker(services.sessions, {}, services.worker.worker_id)
    assert restarted.recover() == [job.id]
    after = services.jobs.get(job.id)
    assert after.status == "queued" and after.attempts == 1 and "restarted" in after.progress.message
    assert services.worker.run_once()
    assert services.jobs.get(job.id).status == "succeeded"


def test_failed_job_does_not_stop_the_worker(services, image_dir):
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), name="gone", trigger_word="sks", config=TRAIN)
    for image in (services.settings.artifacts_dir / "datasets").rglob("*.png"):
        image.unlink()  # the dataset vanished from disk before the worker got to it
    assert services.worker.run_once(job.id)
    failed = services.jobs.get(job.id)
    assert failed.status == "failed" and failed.error
    image = _generate(services)
    assert image.shape == (64, 64, 3)


def test_concurrent_requests_never_mix_adapters(services, image_dir, tmp_path):
    first = _train(services, image_dir, name="first")
    second_dir = tmp_path / "second"
    write_images(second_dir, 3, seed=7)
    second = _train(services, second_dir, name="second", seed=1)
    expected = {name: _generate(services, (AdapterWeight(name, 1.0),)) for name in (first, second)}
    services.worker.start()
    results: dict[str, np.ndarray] = {}

    def request(adapter: str) -> None:
        job = services.submit_generation(
            GenerationRequest(prompt="sks disc", seed=3, steps=4, adapters=(AdapterWeight(adapter, 1.0),)))
        done = services.jobs.wait(job.id, timeout=120, poll=0.05)
        image = services.generation.get_image(done.result_ref)
        results[adapter] = np.asarray(Image.open(services.settings.artifacts_dir / image.path))

    threads = [threading.Thread(target=request, args=(a,)) for a in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name in (first, second):
        assert np.array_equal(results[name], expected[name])
    assert not np.array_equal(expected[first], expected[second])


def test_catalog_rebuilds_from_files(services, image_dir):
    adapter_id = _train(services, image_dir)
    _generate(services, (AdapterWeight(adapter_id, 0.5),))
    from sqlalchemy import delete

    from storage.models import AdapterRow, GeneratedImageRow

    with services.sessions.begin() as session:
        session.execute(delete(GeneratedImageRow))
        session.execute(delete(AdapterRow))
    assert services.catalog.list_adapters() == []
    report = services.catalog.reindex()
    assert report["adapters"] == [adapter_id] and len(report["images"]) == 1
    assert services.catalog.get_adapter(adapter_id).name == "disc"


def test_gallery_operations(services, image_dir):
    adapter_id = _train(services, image_dir)
    services.catalog.rename(adapter_id, "round thing")
    services.catalog.set_tags(adapter_id, "Shapes, test , shapes")
    found = services.catalog.list_adapters(search="shapes")
    assert [a.name for a in found] == ["round thing"] and found[0].tags == ("shapes", "test")
    services.catalog.delete(adapter_id)
    assert services.catalog.list_adapters() == []
    assert (services.settings.artifacts_dir / found[0].file_path).is_file()  # undo-safe: files stay
    services.catalog.restore(adapter_id)
    assert [a.id for a in services.catalog.list_adapters()] == [adapter_id]
    with pytest.raises(ValueError, match="already exists"):
        _train(services, image_dir, name="round thing")
