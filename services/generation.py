"""Use case: queue a generation request and run it on the worker with the chosen adapters and composer."""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from composition.base import COMPOSERS
from composition.sampler import SampleRequest, sample
from core.types import AdapterWeight, GenerationRequest, ImageInfo, JobInfo
from services.runtime import ModelRuntime
from services.worker import JobReporter
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import writing

MAX_PROMPT_CHARS = 2000


class GenerationService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, runtime: ModelRuntime,
                 default_base: str) -> None:
        self._sessions = sessions
        self._store = store
        self._runtime = runtime
        self._default_base = default_base

    def list_composers(self) -> list[str]:
        return COMPOSERS.names()

    def submit(self, request: GenerationRequest, priority: int = 1) -> JobInfo:
        """Validate and queue. Generation outranks training by default so the UI stays responsive."""
        if not request.prompt.strip():
            raise ValueError("the prompt is empty")
        if len(request.prompt) > MAX_PROMPT_CHARS or len(request.negative_prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts are limited to {MAX_PROMPT_CHARS} characters")
        if not 1 <= request.steps <= 200:
            raise ValueError(f"steps must be between 1 and 200, got {request.steps}")
        if not 0 <= request.guidance_scale <= 30:
            raise ValueError(f"guidance must be between 0 and 30, got {request.guidance_scale}")
        if not 0 <= request.seed < 2**63:
            raise ValueError("seed must be a non-negative integer")
        composer_cls = COMPOSERS.get(request.composer)
        composer_cls.config_cls.from_dict(request.composer_config)
        with writing(self._sessions) as session:
            rows = [catalog.get_adapter(session, pick.adapter) for pick in request.adapters]
            resolved = [{"adapter": row.id, "name": row.name, "weight": float(pick.weight)}
                        for row, pick in zip(rows, request.adapters)]
            bases = {row.base_model for row in rows}
            if len(bases) > 1:
                raise ValueError("the chosen adapters were trained on different base models; pick one base")
            base = bases.pop() if bases else self._default_base
            payload = {"request": asdict(request) | {"adapters": resolved}, "base_model": base}
            title = f"generate: {request.prompt[:40]}"
            row = jobs.enqueue(session, "generate", payload, title=title, priority=priority)
            session.flush()
            return jobs.job_info(row)

    def run_generate_job(self, job: JobInfo, reporter: JobReporter) -> str:
        req: dict[str, Any] = dict(job.payload["request"])
        adapters = req.pop("adapters")
        base = job.payload["base_model"]
        with self._sessions.begin() as session:
            files = []
            for a in adapters:
                row = catalog.get_adapter(session, a["adapter"])
                files.append((row.id, row.sha256, self._store.resolve(row.file_path)))
        reporter.progress(0, req["steps"], message="loading models", force=True)
        started = time.perf_counter()
        with self._runtime.lock:
            pipe = self._runtime.pipeline(base)
            adapter_set = self._runtime.adapter_set(base, files)
            composer_cls = COMPOSERS.get(req["composer"])
            composer = composer_cls(composer_cls.config_cls.from_dict(req["composer_config"]))
            weights = {a["adapter"]: a["weight"] for a in adapters}
            request = SampleRequest(prompt=req["prompt"], negative_prompt=req["negative_prompt"], seed=req["seed"],
                                    steps=req["steps"], guidance_scale=req["guidance_scale"],
                                    width=req["width"], height=req["height"])

            def on_step(i: int, total: int) -> None:
                elapsed = time.perf_counter() - started
                reporter.progress(i + 1, total, it_per_s=(i + 1) / elapsed if elapsed else None)
                reporter.check_cancel()

            image = sample(pipe, composer, adapter_set, weights, request, on_step=on_step)
        seconds = time.perf_counter() - started
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_id = uuid.uuid4().hex
        params = {"steps": req["steps"], "guidance_scale": req["guidance_scale"], "width": image.width,
                  "height": image.height, "base_model": base, "seconds": round(seconds, 3),
                  "composer_config": req["composer_config"]}
        record = {"id": image_id, "prompt": req["prompt"], "negative_prompt": req["negative_prompt"],
                  "seed": req["seed"], "adapters": adapters, "composer": req["composer"], "params": params,
                  "job_id": job.id}
        rel, sha = self._store.write_image(image_id, buffer.getvalue(), record)
        with writing(self._sessions) as session:
            catalog.add_image(session, id=image_id, path=rel, prompt=req["prompt"],
                              negative_prompt=req["negative_prompt"], seed=req["seed"], adapters=adapters,
                              composer=req["composer"], params=params, job_id=job.id, sha256=sha)
            jobs.finish(session, job.id, result_ref=image_id, worker_id=reporter.worker_id)
        return image_id

    def get_image(self, image_id: str) -> ImageInfo:
        with self._sessions.begin() as session:
            return catalog.image_info(catalog.get_image(session, image_id))

    def history(self, limit: int = 50) -> list[ImageInfo]:
        with self._sessions.begin() as session:
            return [catalog.image_info(r) for r in catalog.list_images(session, limit=limit)]


def parse_adapter_arg(value: str) -> AdapterWeight:
    """``NAME`` or ``NAME:WEIGHT`` (CLI syntax) → ``AdapterWeight``."""
    name, sep, weight = value.rpartition(":")
    if not sep:
        return AdapterWeight(value, 1.0)
    try:
        return AdapterWeight(name, float(weight))
    except ValueError:
        return AdapterWeight(value, 1.0)  # a name that itself contains ':'
