"""Use case: queue a generation request (or one per composer, to compare them) and run it on the worker.

Each request carries its own adapters, weights and composer settings into its job, so concurrent requests never
share state; the worker runs one job at a time on the device. Per adapter the job also carries its concept words
for composers that localise adapters (CLoRA, ``AdapterWeight.prompt``). The image record's ``params`` say how long
the image took (``seconds`` in all, ``sample_seconds`` for the denoise loop and decode), what the composer could
not do as asked (``notes``, e.g. a fallback from batched per-sample routing) and, for CLoRA, where its region
preview lies (``regions``).
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

import composition.methods  # noqa: F401  (registers the built-in composers)
from composition.base import COMPOSERS, AdapterSet, Composer, ComposerConfig, RoutableAdapterSet
from composition.methods.clora import CLoRAComposer, parse_concepts, region_colour, region_overlay, split_words
from composition.methods.switch import SwitchComposer
from composition.routing import router_for
from composition.sampler import SampleRequest, sample
from core.types import AdapterWeight, GenerationRequest, ImageInfo, JobInfo
from services import orthogonal_slots
from services.runtime import ModelRuntime
from services.worker import JobReporter
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import writing

MAX_PROMPT_CHARS = 2000
MAX_COMPARE = 8


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

    def submit(self, request: GenerationRequest, priority: int = 1) -> JobInfo:
        """Validate and queue. Generation outranks training by default so the UI stays responsive.

        The job's ``payload["warnings"]`` holds :meth:`composition_warnings` for the chosen adapters."""
        with writing(self._sessions) as session:
            payload = self._payload(session, request)
            row = jobs.enqueue(session, "generate", payload, title=f"generate: {request.prompt[:40]}",
                               priority=priority)
            session.flush()
            return jobs.job_info(row)

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

    def _payload(self, session: Session, request: GenerationRequest) -> dict[str, Any]:
        """Check ``request`` (``ValueError``/``KeyError`` naming the problem) and build its job payload."""
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
        config = composer_cls.config_cls.from_dict(request.composer_config)
        rows = [catalog.get_adapter(session, pick.adapter) for pick in request.adapters]
        bases = {row.base_model for row in rows}
        if len(bases) > 1:
            raise ValueError("the chosen adapters were trained on different base models; pick one base")
        prompts = {row.id: pick.prompt.strip() for row, pick in zip(rows, request.adapters, strict=True)}
        if issubclass(composer_cls, CLoRAComposer):
            prompts |= clora_concepts(request.prompt, config, request.adapters, rows)
        resolved = [{"adapter": row.id, "name": row.name, "weight": float(pick.weight), "prompt": prompts[row.id]}
                    for row, pick in zip(rows, request.adapters, strict=True)]
        base = bases.pop() if bases else self._default_base
        warnings = orthogonal_slots.composition_warnings(zip(rows, [pick.weight for pick in request.adapters]))
        settings = {key: getattr(config, key) for key in request.composer_config}  # as typed values
        return {"request": asdict(request) | {"adapters": resolved, "composer_config": settings}, "base_model": base,
                "warnings": warnings}

    # run --------------------------------------------------------------------------------------------------

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
