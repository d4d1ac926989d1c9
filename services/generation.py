"""Use case: queue a generation request (or one per composer, to compare them) and run it on the worker.

Each request carries its own adapters, weights and composer settings into its job, so concurrent requests never
share state; the worker runs one job at a time on the device. Per adapter the job also carries its concept words
for composers that localise adapters (CLoRA, ``AdapterWeight.prompt``). The image record's ``params`` say how long
the image took (``seconds`` in all, ``sample_seconds`` for the denoise loop and decode), what the composer could
not do as asked (``notes``, e.g. a fallback from batched per-sample routing) and, for CLoRA, where its region
preview lies (``regions``).

Video: when the base model is a text-to-video pipeline (AnimateDiff: ``builtin:tiny-video``, ``builtin:world-video``;
ModelScope/ZeroScope ``TextToVideoSDPipeline``: ``builtin:tiny-video3d``), a request makes a clip instead
(:meth:`GenerationService.generate_video`, or :meth:`GenerationService.submit` through the queue). Adapters attach
through the same runtime with one weight each: a motion adapter trained on the video model and image adapters of the
image model it was built from together (spatial layer paths are the same in the motion UNet, so image LoRAs act on
the spatial layers). The clip's record is an animated PNG (what the history shows; its first frame is what PNG
readers see) with an MP4 beside it (a GIF where PyAV cannot encode MP4), named in ``params["video"]``.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

import composition.methods  # noqa: F401  (registers the built-in composers)
from composition.base import COMPOSERS, AdapterSet, Composer, ComposerConfig, RoutableAdapterSet
from composition.methods.clora import CLoRAComposer, parse_concepts, region_colour, region_overlay, split_words
from composition.methods.switch import SwitchComposer
from composition.routing import router_for
from composition.sampler import SampleRequest, sample
from core.animation import DEFAULT_FPS, MAX_FPS, encode_apng, encode_gif, encode_mp4
from core.builtin import BUILTIN_PREFIX, DEFAULT_VIDEO_BUILTIN, VIDEO_FRAMES
from core.types import AdapterWeight, GenerationRequest, ImageInfo, JobInfo
from services import orthogonal_slots
from services.runtime import VIDEO_PIPELINES, ModelRuntime
from services.worker import JobReporter
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import writing

MAX_PROMPT_CHARS = 2000
MAX_COMPARE = 8
DEFAULT_VIDEO_BASE = BUILTIN_PREFIX + DEFAULT_VIDEO_BUILTIN  # the shipped world video model, else tiny-video
MIN_VIDEO_FRAMES = 2
MAX_VIDEO_FRAMES = 64  # the model's own limit (its motion modules' sequence length) is checked when it runs


@dataclass(frozen=True)
class ComposerDescription:
    """A composer's one-line summary and its settings (``BaseConfig.describe()`` rows), for forms and ``--help``.

    ``adapter_prompts``: whether the composer uses each adapter's concept words (``AdapterWeight.prompt``)."""

    name: str
    summary: str
    fields: list[dict[str, Any]]
    adapter_prompts: bool


def describe_composer(name: str) -> ComposerDescription:
    """``KeyError`` naming the known composers for an unknown ``name``."""
    cls = COMPOSERS.get(name)
    doc = (cls.__doc__ or "").strip()
    summary = doc.splitlines()[0] if doc else name
    return ComposerDescription(name, summary, cls.config_cls.describe(), issubclass(cls, CLoRAComposer))


def _mentions(prompt: str, word: str) -> bool:
    """Whether ``word`` occurs in ``prompt`` as a whole word (case-insensitive), as CLIP's tokenizer would see it."""
    return re.search(rf"(?<![\w]){re.escape(word.strip())}(?![\w])", prompt, flags=re.IGNORECASE) is not None


def clora_concepts(prompt: str, config: ComposerConfig, picks: Sequence[AdapterWeight],
                   rows: Sequence[Any]) -> dict[str, str]:
    """Concept words per adapter id for CLoRA: the adapter's own box, else its entry in ``concepts`` (catalog names
    or ids, or by slot), else its trigger words, else its name. ``ValueError`` when a word is not in the prompt."""
    active = [(pick, row) for pick, row in zip(picks, rows, strict=True) if pick.weight != 0.0]
    if not active:
        return {}
    ids = list(dict.fromkeys(row.id for _, row in active))
    aliases = {row.name.lower(): row.id for _, row in active} | {row.id.lower(): row.id for _, row in active}
    entries = []
    for part in str(getattr(config, "concepts", "")).split(";"):
        name, sep, words = part.partition("=")
        if sep and name.strip():
            if name.strip().lower() not in aliases:
                chosen = ", ".join(row.name for _, row in active)
                raise ValueError(f"CLoRA concepts name {name.strip()!r}, which is not among the chosen adapters "
                                 f"({chosen})")
            part = f"{aliases[name.strip().lower()]}={words}"
        entries.append(part)
    parsed = parse_concepts(";".join(entries), ids)
    resolved: dict[str, str] = {}
    for pick, row in active:
        if row.id in resolved:
            continue
        words = (split_words(pick.prompt) or (parsed[row.id] if parsed[row.id] != [row.id] else [])
                 or [w for w in row.trigger_words if w.strip()] or [row.name])
        missing = [w for w in words if not _mentions(prompt, w)]
        if missing:
            raise ValueError(f"CLoRA: the concept word(s) {', '.join(map(repr, missing))} of adapter {row.name!r} "
                             "are not in the prompt; put them in the prompt or set the adapter's concept word")
        resolved[row.id] = ", ".join(words)
    return resolved


def _routing_reason(adapter_set: AdapterSet, pipe: Any, names: Sequence[str]) -> str | None:
    """Why ``names`` cannot be routed per sample in one batched UNet call, or ``None`` when they can."""
    if isinstance(adapter_set, RoutableAdapterSet) and adapter_set.can_route(names):
        return None
    peft = set(getattr(pipe.unet, "peft_config", None) or {})
    peft_names = [n for n in names if n in peft]
    reason = router_for(pipe.unet).unsupported_reason(peft_names) if peft_names else None
    if reason is None:
        hooks = [n for n in names if n not in peft]
        reason = f"adapter(s) {', '.join(hooks)} act through hooks that cannot be routed per sample with the others"
    return reason


def routing_note(composer: Composer, adapter_set: AdapterSet, pipe: Any, weights: Mapping[str, float],
                 names: Mapping[str, str]) -> str | None:
    """Why the composer's batched per-sample routing falls back for these adapters, or ``None`` when it does not.

    Composers with a ``batched`` setting then run one UNet call per adapter with adapter switching; those with
    ``routed`` (merge, switch) use peft's unfused LoRA forward, switch only on the steps of the adapters concerned.
    ``names`` maps adapter ids to the names shown to the user."""
    config = composer.config
    active = [n for n, w in weights.items() if w != 0.0]
    multi = bool(getattr(config, "batched", False))
    if not active or not (multi or getattr(config, "routed", False)):
        return None
    if isinstance(composer, SwitchComposer):
        failing = [(n, r) for n in active if (r := _routing_reason(adapter_set, pipe, [n])) is not None]
        reason = "; ".join(r for _, r in failing) if failing else None
        effect = (f"the steps of {', '.join(repr(names.get(n, n)) for n, _ in failing)} ran with peft's unfused "
                  "LoRA forward instead of a merged weight (slower, same result)")
    else:
        reason = _routing_reason(adapter_set, pipe, active)
        effect = ("the adapters ran one after another (one UNet call each, adapters switched in between)" if multi
                  else "it ran with peft's unfused LoRA forward instead of merged weights (slower, same result)")
    if reason is None:
        return None
    for adapter_id, name in names.items():
        reason = reason.replace(adapter_id, name)
    return f"{composer.registry_name}: batched per-sample routing is unavailable ({reason}); {effect}"


@dataclass(frozen=True)
class GeneratedVideo:
    """A generated clip: its catalog record and its frames, ``(F, H, W, 3)`` uint8."""

    image: ImageInfo
    frames: np.ndarray


def video_file(image: ImageInfo) -> str | None:
    """The relative path of a generated clip's MP4 (else its GIF), or ``None`` for a still image."""
    video = image.params.get("video") or {}
    return video.get("mp4") or video.get("gif")


def is_video_pipeline(pipe: Any) -> bool:
    """Whether a loaded pipeline makes clips (AnimateDiff, it carries a motion adapter; or text-to-video UNet3D)."""
    return type(pipe).__name__ in VIDEO_PIPELINES or getattr(pipe, "motion_adapter", None) is not None


def clip_frames(frames: Any) -> np.ndarray:
    """A pipeline's ``.frames`` for one prompt as ``(F, H, W, 3)`` uint8, whatever its layout: a batch
    ``(B, F, H, W, 3)`` (its first clip) or one clip ``(F, H, W, 3)``, a list of arrays or PIL frames, floats in
    [0, 1] or uint8 (what older ``TextToVideoSDPipeline`` versions returned)."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], (list, tuple)):
        frames = frames[0]  # nested lists: one list of frames per prompt
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    video = np.stack([np.asarray(f) for f in frames]) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if video.ndim == 5:
        video = video[0]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"the video pipeline returned frames of shape {video.shape}, expected (F, H, W, 3)")
    if video.dtype == np.uint8:
        return video
    return np.clip(np.rint(video.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def render_video(pipe: Any, adapter_set: AdapterSet, weights: Mapping[str, float], *, prompt: str,
                 negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.5, seed: int = 0,
                 frames: int = VIDEO_FRAMES, width: int | None = None, height: int | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Sample one clip with ``adapters`` applied at ``weights`` (0 = off); returns ``(frames, H, W, 3)`` uint8.

    The noise comes from a CPU generator seeded with ``seed``, so a seed gives the same clip on every device type
    that computes the same way."""
    import torch

    limit = getattr(pipe.unet.config, "motion_max_seq_length", None)
    if limit and frames > limit:
        raise ValueError(f"this video model makes at most {limit} frames per clip, got {frames}")
    adapter_set.apply(dict(weights))

    def callback(_pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(i, steps)
        return tensors

    def legacy_callback(i: int, _t: Any, _latents: Any) -> None:
        if on_step is not None:
            on_step(i, steps)

    # AnimateDiff takes callback_on_step_end; TextToVideoSDPipeline only the older callback(step, t, latents)
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        progress: dict[str, Any] = {"callback_on_step_end": callback}
    else:
        progress = {"callback": legacy_callback, "callback_steps": 1}
    generator = torch.Generator("cpu").manual_seed(int(seed))
    out = pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_frames=int(frames),
               num_inference_steps=int(steps), guidance_scale=float(guidance_scale), width=width, height=height,
               generator=generator, output_type="np", **progress)
    return clip_frames(out.frames)


def _json_safe(report: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-data part of a composer report (tensors such as masks are left out)."""
    out = {}
    for key, value in report.items():
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return out


class GenerationService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, runtime: ModelRuntime,
                 default_base: str) -> None:
        self._sessions = sessions
        self._store = store
        self._runtime = runtime
        self._default_base = default_base

    def list_composers(self) -> list[str]:
        return COMPOSERS.names()

    def describe_composer(self, name: str) -> ComposerDescription:
        return describe_composer(name)

    def composition_warnings(self, adapters: Sequence[AdapterWeight]) -> list[str]:
        """What may go wrong when these adapters are mixed (orthogonal adapters sharing a basis slot, or with
        different basis seeds/ranks); the mix is still allowed. ``KeyError`` for an unknown adapter."""
        with self._sessions.begin() as session:
            rows = [catalog.get_adapter(session, pick.adapter) for pick in adapters]
            return orthogonal_slots.composition_warnings(zip(rows, [pick.weight for pick in adapters]))

    # submit -----------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, priority: int = 1, *, base_model: str | None = None,
               frames: int = VIDEO_FRAMES, fps: float = DEFAULT_FPS) -> JobInfo:
        """Validate and queue. Generation outranks training by default so the UI stays responsive.

        ``base_model``: empty = the chosen adapters' base (a video base when one of them has one), else the default.
        A video base makes a clip of ``frames`` frames at ``fps`` (its job's ``payload["video"]``). The job's
        ``payload["warnings"]`` holds :meth:`composition_warnings` for the chosen adapters, or for a clip what the
        video path does differently (composer, adapters of another base)."""
        base = self.base_for(request.adapters, base_model)
        video = self.is_video_base(base)
        with writing(self._sessions) as session:
            if video:
                payload = self._video_payload(session, request, base, frames, fps)
            else:
                payload = self._payload(session, request, base_model)
            title = f"{'video' if video else 'generate'}: {request.prompt[:40]}"
            row = jobs.enqueue(session, "generate", payload, title=title, priority=priority)
            session.flush()
            return jobs.job_info(row)

    def is_video_base(self, ref: str) -> bool:
        """Whether base model ``ref`` makes clips; ``False`` for a reference that cannot be resolved."""
        try:
            return self._runtime.is_video_base(ref)
        except ValueError:  # BaseModelError: the image path reports it as before
            return False

    def base_for(self, adapters: Sequence[AdapterWeight], base_model: str | None = None) -> str:
        """The base a request runs on: ``base_model`` when given; else the first video base among the adapters'
        bases (a motion adapter picks its video model), else their (first) base, else the default base."""
        if base_model and base_model.strip():
            return base_model.strip()
        with self._sessions.begin() as session:
            bases = list(dict.fromkeys(catalog.get_adapter(session, pick.adapter).base_model for pick in adapters))
        return next((b for b in bases if self.is_video_base(b)), bases[0] if bases else self._default_base)

    def base_choices(self) -> list[str]:
        """Base models to offer: the default, the built-in models and the bases of catalogued adapters."""
        from core.builtin import builtin_names

        with self._sessions.begin() as session:
            used = [row.base_model for row in catalog.list_adapters(session)]
        return list(dict.fromkeys([self._default_base, *(BUILTIN_PREFIX + n for n in builtin_names()), *used]))

    def compare(self, request: GenerationRequest, composers: Sequence[str],
                configs: Mapping[str, Mapping[str, Any]] | None = None, priority: int = 1) -> list[JobInfo]:
        """Queue ``request`` once per composer (same prompt, seed and adapters): one generation job each, in order.

        Composer settings come from ``configs[name]``, else ``request.composer_config`` for ``request.composer``,
        else the defaults. Every request is validated before any is queued."""
        names = [c.strip() for c in composers if c and c.strip()]
        if not names:
            raise ValueError("pick at least one composer to compare")
        if len(set(names)) != len(names):
            raise ValueError(f"each composer can be compared once; got {', '.join(names)}")
        if len(names) > MAX_COMPARE:
            raise ValueError(f"compare at most {MAX_COMPARE} composers at once, got {len(names)}")
        if self.is_video_base(self.base_for(request.adapters)):
            raise ValueError("comparing composers is for image models; the chosen adapters belong to a video model")
        configs = dict(configs or {})
        requests = [replace(request, composer=name, composer_config=dict(
            configs.get(name, request.composer_config if name == request.composer else {}))) for name in names]
        group = uuid.uuid4().hex
        with writing(self._sessions) as session:
            payloads = [self._payload(session, r) for r in requests]
            rows = [jobs.enqueue(session, "generate", payload | {"compare": group},
                                 title=f"compare {r.composer}: {r.prompt[:40]}", priority=priority)
                    for r, payload in zip(requests, payloads, strict=True)]
            session.flush()
            return [jobs.job_info(row) for row in rows]

    @staticmethod
    def _check_sampling(request: GenerationRequest) -> None:
        """``ValueError`` naming what is out of range in ``request``'s prompt and sampling settings."""
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

    def _payload(self, session: Session, request: GenerationRequest,
                 base_model: str | None = None) -> dict[str, Any]:
        """Check ``request`` (``ValueError``/``KeyError`` naming the problem) and build its job payload."""
        self._check_sampling(request)
        composer_cls = COMPOSERS.get(request.composer)
        config = composer_cls.config_cls.from_dict(request.composer_config)
        rows = [catalog.get_adapter(session, pick.adapter) for pick in request.adapters]
        bases = {row.base_model for row in rows}
        if len(bases) > 1:
            raise ValueError("the chosen adapters were trained on different base models; pick one base")
        if base_model and base_model.strip() and bases and bases != {base_model.strip()}:
            raise ValueError(f"the chosen adapters were trained on {bases.pop()}, not on {base_model.strip()}; "
                             "pick their base model")
        prompts = {row.id: pick.prompt.strip() for row, pick in zip(rows, request.adapters, strict=True)}
        if issubclass(composer_cls, CLoRAComposer):
            prompts |= clora_concepts(request.prompt, config, request.adapters, rows)
        resolved = [{"adapter": row.id, "name": row.name, "weight": float(pick.weight), "prompt": prompts[row.id]}
                    for row, pick in zip(rows, request.adapters, strict=True)]
        base = bases.pop() if bases else ((base_model or "").strip() or self._default_base)
        warnings = orthogonal_slots.composition_warnings(zip(rows, [pick.weight for pick in request.adapters]))
        settings = {key: getattr(config, key) for key in request.composer_config}  # as typed values
        return {"request": asdict(request) | {"adapters": resolved, "composer_config": settings}, "base_model": base,
                "warnings": warnings}

    def _video_payload(self, session: Session, request: GenerationRequest, base: str, frames: int,
                       fps: float) -> dict[str, Any]:
        """Check a clip request on video base ``base`` and build its job payload."""
        self._check_sampling(request)
        if not MIN_VIDEO_FRAMES <= int(frames) <= MAX_VIDEO_FRAMES:
            raise ValueError(f"frames must be between {MIN_VIDEO_FRAMES} and {MAX_VIDEO_FRAMES}, got {frames}")
        if not 0 < float(fps) <= MAX_FPS:
            raise ValueError(f"fps must be between 1 and {MAX_FPS}, got {fps}")
        rows = [catalog.get_adapter(session, pick.adapter) for pick in request.adapters]
        warnings = []
        if request.composer != "merge":
            warnings.append(f"a clip mixes its adapters by their weights (as merge does); the {request.composer} "
                            "composer is for images and was not used")
        for row in dict((row.id, row) for row in rows).values():
            if row.base_model != base:
                warnings.append(f"{row.name} was trained on {row.base_model}; on {base} it acts on the layers the "
                                "two models share (the spatial layers)")
        resolved = [{"adapter": row.id, "name": row.name, "weight": float(pick.weight), "prompt": ""}
                    for row, pick in zip(rows, request.adapters, strict=True)]
        record = asdict(request) | {"adapters": resolved, "composer": "merge", "composer_config": {}}
        return {"request": record, "base_model": base, "warnings": warnings,
                "video": {"frames": int(frames), "fps": float(fps)}}

    def generate_video(self, prompt: str, *, steps: int = 20, guidance_scale: float = 7.5, seed: int = 0,
                       frames: int = VIDEO_FRAMES, adapters: Sequence[AdapterWeight] = (), negative_prompt: str = "",
                       base_model: str | None = None, fps: float = DEFAULT_FPS) -> GeneratedVideo:
        """Make one clip now, on this runtime (the queue's jobs run the same code): ``adapters`` with one weight
        each, on ``base_model`` (default: the adapters' video base, else the built-in video model). The clip is
        stored and recorded like a generated image; ``ValueError`` when the base is not a video model."""
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                    guidance_scale=guidance_scale, adapters=tuple(adapters))
        base = self.base_for(request.adapters, base_model)
        if not (base_model and base_model.strip()) and not self.is_video_base(base):
            base = DEFAULT_VIDEO_BASE
        if not self.is_video_base(base):
            raise ValueError(f"{base} is not a video model (an AnimateDiff or text-to-video pipeline); use "
                             f"{DEFAULT_VIDEO_BASE}")
        with self._sessions.begin() as session:
            payload = self._video_payload(session, request, base, frames, fps)
        return self._run_video(payload, None, None)

    # run --------------------------------------------------------------------------------------------------

    def run_generate_job(self, job: JobInfo, reporter: JobReporter) -> str:
        if job.payload.get("video"):
            return self._run_video(job.payload, job, reporter).image.id
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
        report: dict[str, Any] = {}
        with self._runtime.lock:
            pipe = self._runtime.pipeline(base)
            adapter_set = self._runtime.adapter_set(base, files)
            composer_cls = COMPOSERS.get(req["composer"])
            config = composer_cls.config_cls.from_dict(req["composer_config"])
            composer = composer_cls(config)
            if isinstance(composer, CLoRAComposer):
                composer.adapter_prompts = {a["adapter"]: a["prompt"] for a in adapters if a.get("prompt")}
            weights = {a["adapter"]: a["weight"] for a in adapters}
            names = {a["adapter"]: a.get("name") or a["adapter"] for a in adapters}
            note = routing_note(composer, adapter_set, pipe, weights, names)
            notes = [note] if note else []
            if note:
                reporter.progress(0, req["steps"], message=note, force=True)
            request = SampleRequest(prompt=req["prompt"], negative_prompt=req["negative_prompt"], seed=req["seed"],
                                    steps=req["steps"], guidance_scale=req["guidance_scale"],
                                    width=req["width"], height=req["height"])

            def on_step(i: int, total: int) -> None:
                elapsed = time.perf_counter() - started
                reporter.progress(i + 1, total, it_per_s=(i + 1) / elapsed if elapsed else None)
                reporter.check_cancel()

            sampling = time.perf_counter()
            image = sample(pipe, composer, adapter_set, weights, request, on_step=on_step, report=report)
            sample_seconds = time.perf_counter() - sampling
        seconds = time.perf_counter() - started
        image_id = uuid.uuid4().hex
        created = datetime.now(timezone.utc)
        params = {"steps": req["steps"], "guidance_scale": req["guidance_scale"], "width": image.width,
                  "height": image.height, "base_model": base, "seconds": round(seconds, 3),
                  "sample_seconds": round(sample_seconds, 3), "composer_config": req["composer_config"],
                  "notes": notes}
        details = _json_safe({k: v for k, v in report.items() if k != "masks"})
        if details:
            params["composer_report"] = details
        if report.get("masks") is not None:
            params["regions"] = self._write_regions(image, report, adapters, image_id, created)
        record = {"id": image_id, "prompt": req["prompt"], "negative_prompt": req["negative_prompt"],
                  "seed": req["seed"], "adapters": adapters, "composer": req["composer"], "params": params,
                  "job_id": job.id}
        rel, sha = self._store.write_image(image_id, _png(image), record, created_at=created)
        with writing(self._sessions) as session:
            catalog.add_image(session, id=image_id, path=rel, prompt=req["prompt"],
                              negative_prompt=req["negative_prompt"], seed=req["seed"], adapters=adapters,
                              composer=req["composer"], params=params, job_id=job.id, sha256=sha)
            jobs.finish(session, job.id, result_ref=image_id, worker_id=reporter.worker_id)
        return image_id

    def _run_video(self, payload: Mapping[str, Any], job: JobInfo | None,
                   reporter: JobReporter | None) -> GeneratedVideo:
        """Render the clip a video payload describes, store it, record it (and finish ``job``)."""
        req: dict[str, Any] = dict(payload["request"])
        adapters = req.pop("adapters")
        base, video = payload["base_model"], payload["video"]
        with self._sessions.begin() as session:
            files = []
            for a in adapters:
                row = catalog.get_adapter(session, a["adapter"])
                files.append((row.id, row.sha256, self._store.resolve(row.file_path)))
        if reporter is not None:
            reporter.progress(0, req["steps"], message="loading models", force=True)
        started = time.perf_counter()

        def on_step(i: int, total: int) -> None:
            if reporter is not None:
                elapsed = time.perf_counter() - started
                reporter.progress(i + 1, total, it_per_s=(i + 1) / elapsed if elapsed else None)
                reporter.check_cancel()

        with self._runtime.lock:
            pipe = self._runtime.pipeline(base)
            if not is_video_pipeline(pipe):
                raise ValueError(f"{base} is not a video model (an AnimateDiff or text-to-video pipeline)")
            adapter_set = self._runtime.adapter_set(base, files)
            weights: dict[str, float] = {}
            for a in adapters:  # one weight per adapter: an adapter picked twice adds up
                weights[a["adapter"]] = weights.get(a["adapter"], 0.0) + float(a["weight"])
            sampling = time.perf_counter()
            clip = render_video(pipe, adapter_set, weights, prompt=req["prompt"],
                                negative_prompt=req["negative_prompt"], steps=req["steps"],
                                guidance_scale=req["guidance_scale"], seed=req["seed"], frames=video["frames"],
                                width=req.get("width"), height=req.get("height"), on_step=on_step)
            sample_seconds = time.perf_counter() - sampling
        return self._record_video(payload, req, adapters, clip, job, reporter, time.perf_counter() - started,
                                  sample_seconds)

    def _record_video(self, payload: Mapping[str, Any], req: dict[str, Any], adapters: list[dict[str, Any]],
                      clip: np.ndarray, job: JobInfo | None, reporter: JobReporter | None, seconds: float,
                      sample_seconds: float) -> GeneratedVideo:
        fps = payload["video"]["fps"]
        image_id = uuid.uuid4().hex
        created = datetime.now(timezone.utc)
        frames, height, width = clip.shape[:3]
        media: dict[str, Any] = {"frames": int(frames), "fps": fps, "mp4": None, "gif": None}
        params = {"steps": req["steps"], "guidance_scale": req["guidance_scale"], "width": int(width),
                  "height": int(height), "base_model": payload["base_model"], "seconds": round(seconds, 3),
                  "sample_seconds": round(sample_seconds, 3), "composer_config": {},
                  "notes": list(payload.get("warnings") or ()), "video": media}
        record = {"id": image_id, "prompt": req["prompt"], "negative_prompt": req["negative_prompt"],
                  "seed": req["seed"], "adapters": adapters, "composer": "merge", "params": params,
                  "job_id": job.id if job else None}
        planned = f"images/{created.date().isoformat()}/{image_id}.png"  # the store's layout, as for regions
        mp4 = encode_mp4(clip, fps)
        if mp4 is not None:
            media["mp4"] = self._store.write_image_media(planned, ".mp4", mp4)
        else:
            media["gif"] = self._store.write_image_media(planned, ".gif", encode_gif(clip, fps))
        try:
            rel, sha = self._store.write_image(image_id, encode_apng(clip, fps), record, created_at=created)
        except BaseException:
            self._store.remove(media["mp4"] or media["gif"])
            raise
        with writing(self._sessions) as session:
            row = catalog.add_image(session, id=image_id, path=rel, prompt=req["prompt"],
                                    negative_prompt=req["negative_prompt"], seed=req["seed"], adapters=adapters,
                                    composer="merge", params=params, job_id=job.id if job else None, sha256=sha)
            if job is not None:
                jobs.finish(session, job.id, result_ref=image_id,
                            worker_id=reporter.worker_id if reporter is not None else None)
            info = catalog.image_info(row)
        return GeneratedVideo(info, clip)

    def _write_regions(self, image, report: Mapping[str, Any], adapters: list[dict[str, Any]], image_id: str,
                       created: datetime) -> dict[str, Any]:
        """Save the colour-coded region preview next to the image; returns its path and colour legend."""
        overlay = region_overlay(image, report["masks"])
        rel = self._store.write_image_regions(f"images/{created.date().isoformat()}/{image_id}.png", _png(overlay))
        by_id = {a["adapter"]: a for a in adapters}
        concepts = report.get("concepts") or {}
        legend = []
        for index, branch in enumerate(report.get("branches") or []):
            colour = region_colour(index)[0]
            if not branch:
                legend.append({"adapter": None, "name": "base model", "colour": colour, "concept": ""})
                continue
            entry = by_id.get(branch, {})
            legend.append({"adapter": branch, "name": entry.get("name") or branch, "colour": colour,
                           "concept": ", ".join(concepts.get(branch, []))})
        return {"path": rel, "legend": legend}

    # read -------------------------------------------------------------------------------------------------

    def get_image(self, image_id: str) -> ImageInfo:
        with self._sessions.begin() as session:
            return catalog.image_info(catalog.get_image(session, image_id))

    def history(self, limit: int = 50) -> list[ImageInfo]:
        with self._sessions.begin() as session:
            return [catalog.image_info(r) for r in catalog.list_images(session, limit=limit)]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_adapter_arg(value: str) -> AdapterWeight:
    """``NAME`` or ``NAME:WEIGHT`` (CLI syntax) → ``AdapterWeight``."""
    name, sep, weight = value.rpartition(":")
    if not sep:
        return AdapterWeight(value, 1.0)
    try:
        return AdapterWeight(name, float(weight))
    except ValueError:
        return AdapterWeight(value, 1.0)  # a name that itself contains ':'


def parse_concept_arg(value: str) -> tuple[str, str]:
    """``NAME=WORD[,WORD]`` (CLI syntax) → ``(NAME, 'WORD, WORD')``; ``ValueError`` otherwise."""
    name, sep, words = value.partition("=")
    if not sep or not name.strip() or not split_words(words):
        raise ValueError(f"expected NAME=WORD (e.g. mydog=dog), got {value!r}")
    return name.strip(), ", ".join(split_words(words))
