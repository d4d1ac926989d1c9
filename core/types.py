"""Frozen DTOs passed between layers. ORM rows never leave ``storage``/``services``; the UI sees these."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

JobKind = Literal["train", "generate", "import"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
ConceptKind = Literal["subject", "style", "motion"]

JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled", "interrupted")
CONCEPT_KINDS: tuple[str, ...] = ("subject", "style", "motion")


@dataclass(frozen=True)
class Rejection:
    """One uploaded file that was refused, and why (the message names the file)."""

    filename: str
    reason: str

    def __str__(self) -> str:
        return f"{self.filename}: {self.reason}"


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    name: str
    image_count: int
    created_at: datetime
    rejected: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    name: str
    method: str
    kind: str
    base_model: str
    base_model_hash: str
    trigger_words: tuple[str, ...]
    rank: int | None
    steps: int
    sha256: str
    file_size: int
    file_path: str
    preview_paths: tuple[str, ...]
    tags: tuple[str, ...]
    training_config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True)
class JobProgress:
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    preview_path: str | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


@dataclass(frozen=True)
class JobInfo:
    id: str
    kind: str
    status: str
    title: str
    payload: dict[str, Any]
    progress: JobProgress
    losses: tuple[float, ...]
    error: str | None
    result_ref: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    worker_id: str | None = None
    save_now: bool = False
    sample_now: bool = False
    log: tuple[tuple[str, str], ...] = ()  # (ISO time, text), oldest first

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class AdapterWeight:
    """An adapter picked for generation, by catalog id or name, with its slider weight.

    ``prompt``: the word(s) of the prompt this adapter stands for (comma-separated), used by composers that
    localise adapters (CLoRA); empty = the composer's own setting, else the adapter's trigger words or name.
    """

    adapter: str
    weight: float = 1.0
    prompt: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    adapters: tuple[AdapterWeight, ...] = ()
    composer: str = "merge"
    composer_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageInfo:
    id: str
    path: str
    prompt: str
    negative_prompt: str
    seed: int
    adapters: tuple[AdapterWeight, ...]
    composer: str
    params: dict[str, Any]
    job_id: str | None
    created_at: datetime

    @property
    def notes(self) -> tuple[str, ...]:
        """What the composer could not do as asked (e.g. a fallback from batched routing), for the user."""
        return tuple(self.params.get("notes") or ())

    @property
    def regions_path(self) -> str | None:
        """Relative path of the region preview (CLoRA's masks drawn over the image), if one was saved."""
        regions = self.params.get("regions") or {}
        return regions.get("path")
