"""Orthogonal basis slots in the catalog: assignment at submit (also under concurrent submits), slots kept by
adapters in the trash until it is emptied, running out of slots, and the overlap warning when generating."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from core.io import load_safetensors
from core.types import AdapterWeight, GenerationRequest
from services.container import build_services
from services.settings import Settings

FAST = {"max_steps": 2, "batch_size": 1, "preview_every": 0, "checkpoint_every": 0}


@pytest.fixture()
def services(settings):
    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture()
def any_db_services(db_url: str, tmp_path: Path, models_dir: Path):
    built = build_services(Settings(data_dir=tmp_path / "data", models_path=models_dir, db_url=db_url))
    yield built
    built.close()


def _settings(name: str, **config) -> dict:
    return {"name": name, "method": "orthogonal", "kind": "subject", "trigger_word": "sks",
            "config": {**FAST, **config}}


def _submit(services, image_dir: Path, name: str, **config):
    _, job = services.train_from_upload(sorted(image_dir.iterdir()), **_settings(name, **config))
    return job


def _slot(job) -> int:
    return job.payload["config"]["basis_slot"]


def _next_slot(services, **config) -> int:
    return services.training.check(**_settings("probe", **config))["config"]["basis_slot"]


def _train(services, image_dir: Path, name: str, **config) -> str:
    job = _submit(services, image_dir, name, **config)
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    return done.result_ref


def _min_attention_input() -> int:
    from core.builtin import build_pipeline

    unet = build_pipeline().unet
    return min(m.in_features for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))


def test_submissions_get_the_lowest_free_slot(any_db_services, image_dir: Path) -> None:
    services = any_db_services
    first, second = _submit(services, image_dir, "one"), _submit(services, image_dir, "two")
    assert (_slot(first), _slot(second)) == (0, 1)
    assert _next_slot(services) == 2  # check() previews the slot without taking it
    assert _slot(_submit(services, image_dir, "pinned", basis_slot=3)) == 3  # an explicit slot is honoured
    assert [_slot(_submit(services, image_dir, n)) for n in ("three", "four")] == [2, 4]
    assert _next_slot(services, basis_seed=1) == 0  # another basis seed: its own set of slots
    assert _next_slot(services, rank=2) == 0  # another rank: likewise
    services.jobs.cancel(second.id)  # a cancelled job gives its slot back
    assert _next_slot(services) == 1
    assert services.jobs.get(first.id).payload["config"]["basis_slot"] == 0


def test_concurrent_submissions_never_share_a_slot(any_db_services, image_dir: Path) -> None:
    services = any_db_services
    dataset = services.datasets.create_dataset("shared", sorted(image_dir.iterdir()))
    barrier = threading.Barrier(6)
    slots: list[int] = []
    errors: list[BaseException] = []

    def submit(i: int) -> None:
        try:
            barrier.wait()
            slots.append(_slot(services.training.submit(dataset_id=dataset.id, **_settings(f"c{i}"))))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(slots) == list(range(6))


def test_trained_adapter_keeps_its_slot_in_the_trash_until_purged(services, image_dir: Path) -> None:
    adapter_id = _train(services, image_dir, "kept")
    adapter = services.catalog.get_adapter(adapter_id)
    assert adapter.method == "orthogonal" and adapter.training_config["basis_slot"] == 0
    _, header = load_safetensors(services.catalog.adapter_file(adapter_id))
    assert header["lorastudio.ortho.slot"] == "0" and header["lorastudio.ortho.rank"] == "4"
    assert _next_slot(services) == 1
    services.catalog.delete(adapter_id)
    assert _next_slot(services) == 1  # restoring it must not create a clash, so the slot stays taken
    services.catalog.restore(adapter_id)
    assert _next_slot(services) == 1
    services.catalog.delete(adapter_id)
    assert services.catalog.empty_trash(older_than=timedelta(0)) >= 1
    assert _next_slot(services) == 0  # gone for good: the slot is free again


def test_running_out_of_slots_says_how_many_there_are(services, image_dir: Path) -> None:
    smallest = _min_attention_input()
    rank = smallest // 2  # two slots per basis
    assert [_slot(_submit(services, image_dir, n, rank=rank)) for n in ("a", "b")] == [0, 1]
    with pytest.raises(ValueError, match=rf"no free orthogonal basis slot: rank {rank} allows 2 slots.*smaller rank"):
        _submit(services, image_dir, "c", rank=rank)
    with pytest.raises(ValueError, match=rf"basis_slot 2 is out of range: rank {rank} .* allows slots 0 to 1"):
        _submit(services, image_dir, "d", rank=rank, basis_slot=2)
    with pytest.raises(ValueError, match=f"rank {smallest + 1} is larger than the smallest adapted layer"):
        _submit(services, image_dir, "e", rank=smallest + 1)
    assert len(services.jobs.list_jobs()) == 2  # nothing else was queued


def test_generation_warns_when_orthogonal_adapters_share_a_slot(services, image_dir: Path) -> None:
    a = _train(services, image_dir, "alpha")
    b = _train(services, image_dir, "beta")
    clash = _train(services, image_dir, "gamma", basis_slot=0)
    other_seed = _train(services, image_dir, "delta", basis_seed=7)
    assert services.generation.composition_warnings([AdapterWeight(a), AdapterWeight(b)]) == []
    shared = services.generation.composition_warnings([AdapterWeight(a), AdapterWeight(clash)])
    assert len(shared) == 1 and "alpha and gamma share orthogonal basis slot 0" in shared[0]
    assert services.generation.composition_warnings([AdapterWeight(a), AdapterWeight(clash, 0.0)]) == []
    mixed = services.generation.composition_warnings([AdapterWeight(a), AdapterWeight(other_seed)])
    assert len(mixed) == 1 and "different basis seeds or ranks" in mixed[0] and "delta" in mixed[0]

    job = services.submit_generation(GenerationRequest(prompt="sks", steps=2, adapters=(AdapterWeight(a),
                                                                                       AdapterWeight(clash))))
    assert job.status == "queued" and job.payload["warnings"] == shared  # warned, not refused
    fine = services.submit_generation(GenerationRequest(prompt="sks", steps=2, adapters=(AdapterWeight(a),
                                                                                        AdapterWeight(b))))
    assert fine.payload["warnings"] == []
    assert services.worker.run_once(fine.id)
    assert services.jobs.get(fine.id).status == "succeeded", services.jobs.get(fine.id).error
