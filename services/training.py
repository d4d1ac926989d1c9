"""Use case: submit a training job, and run it when the worker claims it."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

import training.methods  # noqa: F401  (registers every training method)
from core.animation import encode_apng
from core.builtin import BUILTIN_PREFIX, DEFAULT_VIDEO_BUILTIN
from core.io import atomic_write_bytes
from core.types import CONCEPT_KINDS, JobInfo
from services import orthogonal_slots
from services.adapter_records import NewAdapter, job_adapter_id, record_adapter
from services.runtime import ModelRuntime, is_video_base
from services.worker import JobReporter
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import writing
from training.artifact import adapter_file_metadata
from training.base import METHODS, JobCancelled, TrainResult
from training.data import ImageCaptionDataset
from training.motion_trainer import MotionTrainer
from training.presets import preset_config, preset_for
from training.trainer import Trainer, latest_checkpoint
from training.video import ClipDataset, load_clip_folder

_NAME = re.compile(r"^[\w][\w .\-]{0,63}$")
VIDEO_BASE = "video"
DEFAULT_VIDEO_BASE = BUILTIN_PREFIX + DEFAULT_VIDEO_BUILTIN  # a motion's base unless one is given
ClipRecords = Callable[[str], Sequence[tuple[np.ndarray, str]]]


def base_kind_of(method: str) -> str:
    """``"video"`` for methods that train on a video (AnimateDiff) base, else ``"image"``."""
    return getattr(METHODS.get(method), "base_kind", "image")


@dataclass(frozen=True)
class MethodDescription:
    name: str
    summary: str
    fields: list[dict[str, Any]]  # defaults are the preset's values for ``kind``
    kind: str = "subject"
    preset: str = ""  # what the preset for ``kind`` sets, in words
    uses_rank: bool = True


def list_methods() -> list[str]:
    return METHODS.names()


def describe_method(name: str, kind: str = "subject") -> MethodDescription:
    """A method's summary and its settings for ``kind``, defaults taken from the preset (for forms, ``--help``)."""
    cls = METHODS.get(name)
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else name
    preset = preset_for(name, kind)
    values = preset_config(name, kind)
    fields = [{**f, "default": values.get(f["name"], f["default"])} for f in cls.config_cls.describe()]
    return MethodDescription(name, summary, fields, kind, preset.summary, cls.uses_rank)


class _JobCallback:
    """Bridges trainer events to the job row and the artifact store."""

    def __init__(self, reporter: JobReporter, store: ArtifactStore, job_id: str, total: int) -> None:
        self._reporter = reporter
        self._store = store
        self._job_id = job_id
        self.previews: list[Path] = []
        self.total = total

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None:
        self.total = total
        self._reporter.progress(step, total, loss=loss, it_per_s=it_per_s, eta_s=eta_s)

    def on_preview(self, step: int, image) -> None:
        path = self._store.job_dir(self._job_id) / "previews" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        self.previews.append(path)
        self._reporter.progress(step, self.total, preview_path=str(path), message=f"preview at step {step}",
                                force=True)

    def on_preview_frames(self, step: int, frames) -> None:
        """A clip preview (video methods call this right after ``on_preview`` with the frames side by side): the
        step's preview file becomes an animated PNG of the frames, so the Jobs tab and the adapter's gallery card
        play it, while PNG readers still see its first frame."""
        path = self._store.job_dir(self._job_id) / "previews" / f"step-{step:06d}.png"
        atomic_write_bytes(path, encode_apng([np.asarray(f.convert("RGB")) for f in frames]))
        if path not in self.previews:
            self.previews.append(path)
        self._reporter.progress(step, self.total, preview_path=str(path), message=f"preview clip at step {step}",
                                force=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._store.publish_checkpoint(path)  # a shared store: other hosts can resume from it from now on
        self._reporter.progress(step, self.total, message=f"checkpoint saved at step {step}", force=True)

    def should_stop(self) -> bool:
        """Checked by the trainer before every step: cancel (True), lease lost (raises); refreshes requests."""
        return self._reporter.should_stop()

    def pending_requests(self) -> set[str]:
        """'Save now' and 'Sample now' from the Jobs tab, honoured by the trainer right after this step."""
        wanted = set()
        if self._reporter.save_requested:
            self._reporter.done_request("save_now", "save now: checkpoint written at the next step")
            wanted.add("checkpoint")
        if self._reporter.sample_requested:
            self._reporter.done_request("sample_now", "sample now: preview rendered at the next step")
            wanted.add("preview")
        return wanted


class TrainingService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, runtime: ModelRuntime,
                 dataset_records, default_base: str, clip_records: ClipRecords | None = None) -> None:
        """``dataset_records(id)`` gives an image dataset's (file, caption) pairs; ``clip_records(id)`` a clip
        dataset's ((F, H, W, 3) uint8 frames, caption) pairs, by default read from the store's dataset folder
        ``datasets/<id>/<clip>/frame-000.png...`` with ``<clip>.txt`` captions (``training.video``)."""
        self._sessions = sessions
        self._store = store
        self._runtime = runtime
        self._dataset_records = dataset_records
        self._default_base = default_base
        self._clip_records = clip_records or self._clip_folder_records

    def _clip_folder_records(self, dataset_id: str) -> list[tuple[np.ndarray, str]]:
        return [(frames, caption) for frames, caption, _ in load_clip_folder(self._store.dataset_dir(dataset_id))]

    # catalogue of methods -------------------------------------------------------------------------------
    def list_methods(self) -> list[str]:
        return list_methods()

    def describe_method(self, name: str, kind: str = "subject") -> MethodDescription:
        return describe_method(name, kind)

    # submit ---------------------------------------------------------------------------------------------
    def check(self, *, name: str, method: str = "lora", kind: str = "subject", trigger_word: str = "",
              config: dict[str, Any] | None = None, base_model: str | None = None) -> dict[str, Any]:
        """Validate a submission without queueing it; returns the normalised payload (minus the dataset)."""
        name = name.strip()
        if not _NAME.match(name):
            raise ValueError("adapter name must be 1-64 letters, digits, spaces, '.', '_' or '-', "
                             "starting with a letter or digit")
        if kind not in CONCEPT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONCEPT_KINDS)}, got {kind!r}")
        trigger_word = trigger_word.strip()
        if kind == "subject" and not trigger_word:
            raise ValueError("a subject needs a trigger word (a rare token such as 'sks') to call it up in prompts")
        method_cls = METHODS.get(method)
        video = base_kind_of(method) == VIDEO_BASE
        if (kind == "motion") != video:
            motion_methods = [n for n in METHODS.names() if base_kind_of(n) == VIDEO_BASE]
            raise ValueError(f"a motion is trained with a video method ({', '.join(motion_methods)}) and only a "
                             f"motion is; got kind {kind!r} with method {method!r}")
        cfg = method_cls.config_cls.from_dict(preset_config(method, kind, config))
        if kind == "style" and cfg.prior_preservation:
            raise ValueError("class-prior preservation is for subjects: a style has no class to preserve; "
                             "turn prior_preservation off")
        base = base_model or (DEFAULT_VIDEO_BASE if video else self._default_base)
        source = self._runtime.resolve(base)  # a bad base fails now, not in the worker
        if is_video_base(source) is (not video):
            raise ValueError(f"method {method!r} trains on {'a video' if video else 'an image'} base model; "
                             f"{base!r} is {'an image' if video else 'a video'} model")
        payload = {"name": name, "method": method, "kind": kind, "trigger_word": trigger_word,
                   "config": cfg.to_dict(), "base_model": base}
        with self._sessions.begin() as session:
            if catalog.find_adapter(session, name) is not None:
                raise ValueError(f"an adapter named {name!r} already exists; pick another name")
            if method == orthogonal_slots.METHOD:  # a free basis slice now; submit picks again under the write lock
                slots = orthogonal_slots.capacity(source, payload["config"])
                payload = orthogonal_slots.reserve(session, payload, slots, auto=cfg.basis_slot < 0)
        return payload

    def submit(self, *, dataset_id: str, priority: int = 0, **settings: Any) -> JobInfo:
        """Validate everything up front, then queue the job. Bad settings raise ``ValueError`` naming them."""
        payload = {"dataset_id": dataset_id, **self.check(**settings)}
        name, method = payload["name"], payload["method"]
        auto_slot = method == orthogonal_slots.METHOD and orthogonal_slots.asked_for_auto_slot(
            payload["kind"], settings.get("config"))
        slots = orthogonal_slots.capacity(self._runtime.resolve(payload["base_model"]), payload["config"]) \
            if auto_slot else None
        with writing(self._sessions) as session:
            catalog.get_dataset(session, dataset_id)
            if auto_slot:  # the slot check and the enqueue share one write transaction: no two jobs get one slot
                payload = orthogonal_slots.reserve(session, payload, slots, auto=True)
            row = jobs.enqueue(session, "train", payload, title=f"train {name} ({method})", priority=priority)
            session.flush()
            return jobs.job_info(row)

    # run (worker side) ----------------------------------------------------------------------------------
    def run_train_job(self, job: JobInfo, reporter: JobReporter) -> str:
        p = job.payload
        method_cls = METHODS.get(p["method"])
        cfg = method_cls.config_cls.from_dict(p["config"])
        reporter.progress(0, cfg.max_steps, message="loading base model", force=True)
        pipe = self._runtime.fresh_pipeline(p["base_model"])
        work_dir = self._store.job_dir(job.id)  # a shared store brings a newer checkpoint left by another host
        callback = _JobCallback(reporter, self._store, job.id, cfg.max_steps)
        trainer: Trainer | MotionTrainer
        if base_kind_of(p["method"]) == VIDEO_BASE:
            clips = ClipDataset.from_records(self._clip_records(p["dataset_id"]), cfg.num_frames, cfg.resolution)
            trainer = MotionTrainer(method_cls(cfg), pipe, clips, cfg, trigger_word=p["trigger_word"],
                                    callback=callback, work_dir=work_dir)
        else:
            records = self._dataset_records(p["dataset_id"])
            dataset = ImageCaptionDataset(records, cfg.resolution, flip=cfg.flip)
            trainer = Trainer(method_cls(cfg), pipe, dataset, cfg, trigger_word=p["trigger_word"],
                              callback=callback, work_dir=work_dir, kind=p["kind"])
        reporter.check_cancel()
        resume_from = latest_checkpoint(work_dir)
        if resume_from is not None:
            reporter.progress(0, cfg.max_steps, message=f"resuming from checkpoint {resume_from.name}", force=True)
        try:
            result = trainer.run(resume_from=resume_from)
        except JobCancelled:  # the trainer deleted its checkpoints; a shared store's copies go too
            try:
                self._store.remove(f"jobs/{job.id}/checkpoints")
            except OSError:  # the store is unreachable: the job is cancelled all the same
                pass
            raise
        del pipe, trainer
        return self._save_adapter(job, result, callback.previews, reporter.worker_id)

    def _save_adapter(self, job: JobInfo, result: TrainResult, previews: list[Path], worker_id: str) -> str:
        p = job.payload
        adapter_id = job_adapter_id(job.id)
        base_hash = self._runtime.base_hash(p["base_model"])
        trigger_words = [p["trigger_word"]] if p["trigger_word"] else []
        metadata = adapter_file_metadata(p["method"], result.config, p["base_model"], base_hash, trigger_words,
                                         p["kind"], result.steps_done, method_metadata=result.metadata)
        spec = NewAdapter(name=p["name"], method=p["method"], kind=p["kind"], base_model=p["base_model"],
                          base_model_hash=base_hash, trigger_words=trigger_words, rank=result.config.get("rank"),
                          training_config=result.config, steps=result.steps_done, dataset_id=p["dataset_id"],
                          job_id=job.id, previews=[path.read_bytes() for path in previews[-1:]])
        record_adapter(self._sessions, self._store, adapter_id, spec, result.tensors, metadata, worker_id=worker_id)
        return adapter_id

