"""Putting a new adapter into the catalog: its files first, then its row, never one without the other.

Shared by every job that produces an adapter (training, import). A job's adapter id is derived from the job id,
so files left by an attempt that crashed before its catalog row was committed belong to that id and are replaced
by the rerun instead of lingering beside it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from core.types import AdapterInfo
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import writing

_JOB_ADAPTER_IDS = uuid.UUID("6f1d3c1e-6a53-4c55-9a0e-2f3b9c7d1a42")  # namespace of adapter ids derived from jobs


def job_adapter_id(job_id: str) -> str:
    """The id of the adapter job ``job_id`` produces, the same on every attempt."""
    return uuid.uuid5(_JOB_ADAPTER_IDS, job_id).hex


@dataclass(frozen=True)
class NewAdapter:
    """What the catalog records of an adapter besides its files."""

    name: str
    method: str
    kind: str
    base_model: str
    base_model_hash: str
    trigger_words: list[str]
    rank: int | None
    training_config: dict[str, Any]
    steps: int
    dataset_id: str | None = None
    job_id: str | None = None
    previews: Sequence[bytes] = field(default=(), repr=False)  # PNGs


def record_adapter(sessions: sessionmaker[Session], store: ArtifactStore, adapter_id: str, spec: NewAdapter,
                   tensors: Mapping[str, torch.Tensor], file_metadata: Mapping[str, str], *,
                   worker_id: str | None = None, rename_if_taken: bool = True) -> AdapterInfo:
    """Write the adapter's folder, then commit its catalog row (and, for a job, finish the job in that same
    transaction); on any failure the files go again.

    A name taken meanwhile gets a suffix when ``rename_if_taken`` (a job must not fail after its work is done),
    else raises ``ValueError``. For a job, stale files of a crashed earlier attempt are removed first.
    """
    if spec.job_id is not None:
        with sessions() as session:
            if catalog.find_adapter(session, adapter_id) is None:
                store.remove_adapter(adapter_id)
    manifest = {"id": adapter_id, "name": spec.name, "method": spec.method, "kind": spec.kind,
                "base_model": spec.base_model, "base_model_hash": spec.base_model_hash,
                "trigger_words": spec.trigger_words, "rank": spec.rank, "training_config": spec.training_config,
                "steps": spec.steps, "dataset_id": spec.dataset_id, "job_id": spec.job_id}
    written = store.write_adapter(adapter_id, tensors, file_metadata, spec.training_config, manifest)
    try:
        previews = [store.write_adapter_preview(adapter_id, i, png) for i, png in enumerate(spec.previews)]
        with writing(sessions) as session:
            name = spec.name
            if catalog.find_adapter(session, name) is not None:
                if not rename_if_taken:
                    raise ValueError(f"an adapter named {name!r} already exists; pick another name")
                name = f"{name}-{adapter_id[:6]}"
            row = catalog.add_adapter(session, id=adapter_id, name=name, method=spec.method, kind=spec.kind,
                                      base_model=spec.base_model, base_model_hash=spec.base_model_hash,
                                      trigger_words=spec.trigger_words, rank=spec.rank,
                                      training_config=spec.training_config, steps=spec.steps,
                                      sha256=written.sha256, file_size=written.size, file_path=written.path,
                                      dataset_id=spec.dataset_id, job_id=spec.job_id, previews=previews)
            if spec.job_id is not None:
                jobs.finish(session, spec.job_id, result_ref=adapter_id, worker_id=worker_id)
            return catalog.adapter_info(row)
    except BaseException:
        store.remove_adapter(adapter_id)  # never leave files the catalog does not know
        raise
