"""The customization and composition benchmark on the shapes world (``lorastudio eval``).

Everything runs in one process on one loaded base pipeline, with fixed seeds, so a profile and a seed give the
same numbers on every run (timings aside). Two parts:

(a) **methods**: for every training method x held-out subject x number of training images, an adapter is trained
    in-process with the method's subject preset (the profile sets the steps) on ``concept_dataset(subject, n,
    seed)``, attached the way the app attaches adapters, and asked for its subject on evaluation prompts whose
    background colour never occurs in the training images (positions spread over all five, unseen ones first),
    several seeds each. The detectors then give subject fidelity, prompt alignment and diversity across seeds
    (``training.world.metrics``); the base model alone on the same prompts is the reference row.
(b) **composers**: LoRA subject adapters (from (a), each subject with its own trigger word) and LoRA style adapters
    (``pixelated``, ``outline``) are combined by every composer into sets of two (subject+subject, subject+style)
    and three (subject+subject+style); prompts ask every subject by trigger word, position and background (styles
    need no word), and the detectors give the all-concepts rate. Seconds per image are timed in the same run,
    with the base model alone on the same prompts as the 1.00 reference. CLoRA needs a prompt word per adapter:
    a subject adapter stands for its trigger word and subject name, a style adapter for ``background``.

Results go to ``results.json`` (settings, profile, base model and hash, hardware, timings, every row) and
``results.md`` (a table for methods, one for composers, the command line), each written atomically.
"""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import composition.methods  # noqa: F401  (registers the composers)
import training.methods  # noqa: F401  (registers the training methods)
from composition.base import COMPOSERS
from composition.methods.clora import CLoRAComposer
from composition.sampler import SampleRequest, sample
from core.builtin import BUILTIN_PREFIX, DEFAULT_BUILTIN
from core.devices import choose_placement
from core.io import atomic_write_bytes, atomic_write_json
from services.runtime import ModelRuntime, ResidentAdapterSet
from training.artifact import adapter_file_metadata, load_adapter
from training.base import METHODS
from training.data import ImageCaptionDataset
from training.presets import preset_config
from training.trainer import Trainer
from training.world import metrics
from training.world.captions import article, caption, object_phrase, parse_caption
from training.world.concepts import (
    COLOUR_NAMES,
    PAIRS,
    POSITION_NAMES,
    POSITION_PHRASES,
    POSITIONS,
    SIZE_NAMES,
    TEXTURES,
    Labels,
    ObjectLabel,
    concept,
)
from training.world.dataset import concept_dataset, contrasts, stream_id
from training.world.train_base import generate, hardware

DEFAULT_BASE = f"{BUILTIN_PREFIX}{DEFAULT_BUILTIN}"
METHOD_NAMES = ("lora", "tlora", "orthogonal", "scedit")
COMPOSER_NAMES = ("merge", "switch", "composite", "clora", "cmlora")
# Single tokens of the world tokenizer; subjects that share a word are never composed together.
TRIGGERS = {"robot": "sks", "tree": "ohwx", "house": "zxq", "fish": "sks"}
STYLE_CONCEPT_WORD = "background"  # what a style adapter stands for in CLoRA (it has no word in the prompt)
COMPOSE_ADAPTER_METHOD = "lora"
BASE_ROW = "base model"


@dataclass(frozen=True)
class Profile:
    """How much of the benchmark runs. ``subject_steps``/``style_steps`` of ``None`` keep the preset's steps."""

    name: str
    methods: tuple[str, ...]
    subjects: tuple[str, ...]
    train_images: tuple[int, ...]
    subject_steps: int | None
    prompts: int  # evaluation prompts per subject
    seeds: int  # images per prompt
    compose_sets: tuple[tuple[str, ...], ...]
    composers: tuple[str, ...]
    compose_prompts: int
    compose_seeds: int
    style_steps: int | None
    style_images: int
    sample_steps: int = 20
    guidance: float = 4.0

    def __post_init__(self) -> None:
        for name in self.methods:
            METHODS.get(name)
        for name in self.composers:
            COMPOSERS.get(name)
        for subject in self.subjects:
            if concept(subject).kind != "subject":
                raise ValueError(f"profile {self.name}: {subject!r} is not a held-out subject")
        for concepts in self.compose_sets:
            kinds = [concept(c).kind for c in concepts]
            if any(k not in ("subject", "style") for k in kinds) or "subject" not in kinds:
                raise ValueError(f"profile {self.name}: a composition set holds subjects and styles, at least one "
                                 f"subject; got {concepts}")
            words = [TRIGGERS[c] for c in concepts if concept(c).kind == "subject"]
            if len(set(words)) != len(words) or kinds.count("subject") > 2 or kinds.count("style") > 1:
                raise ValueError(f"profile {self.name}: {concepts} needs at most two subjects with distinct "
                                 "trigger words and at most one style")
        counts = (*self.train_images, self.prompts, self.seeds, self.compose_prompts, self.compose_seeds,
                  self.style_images, self.sample_steps)
        if not self.train_images or min(counts) < 1:
            raise ValueError(f"profile {self.name}: training images and every count must be >= 1")


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", methods=("lora",), subjects=("robot",), train_images=(1,), subject_steps=4, prompts=1,
                  seeds=2, compose_sets=(("robot", "pixelated"),), composers=COMPOSER_NAMES, compose_prompts=1,
                  compose_seeds=1, style_steps=4, style_images=2, sample_steps=4),
    "quick": Profile("quick", methods=METHOD_NAMES, subjects=("robot",), train_images=(1, 4), subject_steps=200,
                     prompts=4, seeds=4,
                     compose_sets=(("robot", "tree"), ("robot", "pixelated"), ("robot", "tree", "outline")),
                     composers=COMPOSER_NAMES, compose_prompts=3, compose_seeds=2, style_steps=200,
                     style_images=4),
    "full": Profile("full", methods=METHOD_NAMES, subjects=("robot", "tree", "house", "fish"), train_images=(1, 4),
                    subject_steps=None, prompts=8, seeds=4,
                    compose_sets=(("robot", "tree"), ("house", "fish"), ("robot", "pixelated"), ("tree", "outline"),
                                  ("robot", "tree", "pixelated"), ("house", "fish", "outline")),
                    composers=COMPOSER_NAMES, compose_prompts=4, compose_seeds=2, style_steps=None, style_images=8),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; use one of {', '.join(PROFILES)}") from None


# ---------------------------------------------------------------------------------------------------- prompts --

def subject_prompts(subject: str, trained: Sequence[Labels], count: int, seed: int) -> list[str]:
    """``count`` fixed prompts asking ``subject`` (with its trigger word) on backgrounds of a colour that no
    training image has, at positions spread over all five, those of no training image first."""
    probe = ObjectLabel(subject, None, "big", "center", POSITIONS["center"])
    seen_colours = {labels.background for labels in trained}
    fits = [c for c in COLOUR_NAMES if contrasts(probe, c, "none")]
    colours = [c for c in fits if c not in seen_colours]
    if not colours:
        raise ValueError(f"every background colour that suits {subject!r} occurs in its training images")
    seen_positions = {o.position for labels in trained for o in labels.objects}
    positions = sorted(POSITION_NAMES, key=lambda p: (p in seen_positions, POSITION_NAMES.index(p)))
    rng = np.random.default_rng([seed, stream_id(f"eval:{subject}")])
    order = [int(i) for i in rng.permutation(len(colours))]
    prompts = []
    for i in range(count):  # every position once per round, each round with the colours shifted by one
        position = positions[i % len(positions)]
        colour = colours[order[(i % len(positions) + i // len(positions)) % len(colours)]]
        obj = ObjectLabel(subject, None, SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))], position,
                          POSITIONS[position])
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        prompts.append(caption(Labels(objects=(obj,), background=colour, texture=texture), trigger=TRIGGERS[subject]))
    return prompts


def composition_prompts(concepts: Sequence[str], count: int, seed: int) -> list[tuple[str, Labels]]:
    """``count`` fixed prompts for a set of concepts, each with the scene it asks (the style included): every
    subject big, by its trigger word, at its own position, on a plain background that suits all of them."""
    subjects = [c for c in concepts if concept(c).kind == "subject"]
    styles = [c for c in concepts if concept(c).kind == "style"]
    style = styles[0] if styles else "none"
    rng = np.random.default_rng([seed, stream_id("eval-compose:" + "+".join(concepts))])
    out = []
    for _ in range(count):
        if len(subjects) == 2:
            pair = PAIRS[int(rng.integers(len(PAIRS)))]
            places = pair if rng.integers(2) == 0 else pair[::-1]
        else:
            places = (POSITION_NAMES[int(rng.integers(len(POSITION_NAMES)))],)
        objects = [ObjectLabel(s, None, "big", p, POSITIONS[p]) for s, p in zip(subjects, places)]
        colours = [c for c in COLOUR_NAMES if all(contrasts(o, c, style) for o in objects)]
        if not colours:
            raise ValueError(f"no background colour suits all of {', '.join(concepts)}")
        colour = colours[int(rng.integers(len(colours)))]
        text = " and ".join(f"{object_phrase(o, TRIGGERS[o.name])} {POSITION_PHRASES[o.position]}" for o in objects)
        text += f" on {article(colour)} {colour} plain background"
        out.append((text, replace(parse_caption(text)[0], style=style)))
    return out


# ------------------------------------------------------------------------------------------------- adapters --

@dataclass
class TrainedAdapter:
    """An adapter trained in this run, kept in memory (tensors and the header an adapter file would carry)."""

    name: str
    method: str
    concept: str
    kind: str
    trigger: str
    images: int
    tensors: dict[str, Any]
    metadata: dict[str, str]
    steps: int
    seconds: float
    final_loss: float


def train_adapter(pipe: Any, method: str, concept_name: str, images: int, steps: int | None, seed: int,
                  folder: Path, base_ref: str, base_hash: str, threads: int | None = 1) -> TrainedAdapter:
    """Train ``method`` with its preset for the concept's kind on ``concept_dataset(concept_name, images, seed)``
    (rendered into ``folder``); ``steps`` of ``None`` keeps the preset's."""
    kind = concept(concept_name).kind
    trigger = TRIGGERS[concept_name] if kind == "subject" else ""
    data = concept_dataset(concept_name, images, seed=seed, trigger=trigger or None)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for item in data:
        path = folder / f"{item.index:05d}.png"
        item.image.save(path)
        records.append((path, item.caption))
    overrides: dict[str, Any] = {"seed": seed, "preview_every": 0, "checkpoint_every": 0}
    if steps is not None:
        overrides["max_steps"] = steps
    method_cls = METHODS.get(method)
    config = method_cls.config_cls.from_dict(preset_config(method, kind, overrides))
    dataset = ImageCaptionDataset(records, config.resolution, flip=config.flip)
    result = Trainer(method_cls(config), pipe, dataset, trigger_word=trigger, kind=kind, cpu_threads=threads).run()
    metadata = adapter_file_metadata(method, result.config, base_ref, base_hash, [trigger] if trigger else [], kind,
                                     result.steps_done, method_metadata=result.metadata)
    return TrainedAdapter(name=f"{method}-{concept_name}-{images}", method=method, concept=concept_name, kind=kind,
                          trigger=trigger, images=images, tensors=result.tensors, metadata=metadata,
                          steps=result.steps_done, seconds=result.seconds, final_loss=result.final_loss)


@contextlib.contextmanager
def attached(pipe: Any, adapters: Sequence[TrainedAdapter]) -> Iterator[ResidentAdapterSet]:
    """The adapters attached to ``pipe`` as the app attaches them (by the method in their header), as one set;
    removed again on exit."""
    handles: dict[str, Any] = {}
    try:
        for adapter in adapters:
            handles[adapter.name] = load_adapter(pipe, adapter.tensors, adapter.metadata, adapter.name)
        yield ResidentAdapterSet(pipe, list(handles), handles)
    finally:
        for handle in reversed(list(handles.values())):
            handle.remove()


# ------------------------------------------------------------------------------------------------- the runs --

Progress = Callable[[str], None]


class _Run:
    """One benchmark run: the pipeline, the detectors, the adapters trained so far, the rows."""

    def __init__(self, profile: Profile, pipe: Any, base_ref: str, base_hash: str, seed: int, threads: int | None,
                 folder: Path, progress: Progress) -> None:
        from training.world.detectors import load_detectors

        self.profile, self.pipe, self.seed, self.threads = profile, pipe, seed, threads
        self.base_ref, self.base_hash = base_ref, base_hash
        self.folder, self.progress = folder, progress
        self.detectors = load_detectors(clip=False)
        self.adapters: dict[tuple[str, str, int], TrainedAdapter] = {}

    def train(self, method: str, concept_name: str, images: int) -> TrainedAdapter:
        key = (method, concept_name, images)
        if key not in self.adapters:
            kind = concept(concept_name).kind
            steps = self.profile.subject_steps if kind == "subject" else self.profile.style_steps
            self.progress(f"train {method} on {concept_name} ({images} image{'s' * (images > 1)}, "
                          f"{steps or 'preset'} steps)")
            self.adapters[key] = train_adapter(self.pipe, method, concept_name, images, steps, self.seed,
                                               self.folder / f"{method}-{concept_name}-{images}", self.base_ref,
                                               self.base_hash, self.threads)
        return self.adapters[key]

    def _generate(self, prompts: Sequence[str]) -> np.ndarray:
        """``seeds`` images per prompt, prompt by prompt; image ``k`` of the flat list uses seed ``seed + k``."""
        p = self.profile
        flat = [prompt for prompt in prompts for _ in range(p.seeds)]
        return generate(self.pipe, flat, steps=p.sample_steps, guidance=p.guidance, seed=self.seed, batch=32)

    def _score_subject(self, prompts: Sequence[str], images: np.ndarray) -> dict[str, float]:
        seeds = self.profile.seeds
        seen = self.detectors.detect(images)
        groups = [images[i * seeds:(i + 1) * seeds] for i in range(len(prompts))]
        labels = [seen[i * seeds:(i + 1) * seeds] for i in range(len(prompts))]
        return metrics.subject_scores([parse_caption(q)[0] for q in prompts], groups, labels)

    def methods(self) -> list[dict[str, Any]]:
        p = self.profile
        rows = []
        for subject in p.subjects:
            largest = concept_dataset(subject, max(p.train_images), seed=self.seed)
            prompts = subject_prompts(subject, [largest.labels(i) for i in range(len(largest))], p.prompts,
                                      self.seed)
            self.progress(f"base model on {len(prompts)} {subject} prompts x {p.seeds} seeds")
            started = time.perf_counter()
            images = self._generate(prompts)
            rows.append({"method": BASE_ROW, "subject": subject, "trigger": TRIGGERS[subject], "train_images": 0,
                         "steps": 0, "train_seconds": 0.0, "final_loss": None,
                         "generate_seconds": time.perf_counter() - started, "images": len(images),
                         "prompts": list(prompts), **self._score_subject(prompts, images)})
            for method in p.methods:
                for count in p.train_images:
                    adapter = self.train(method, subject, count)
                    started = time.perf_counter()
                    with attached(self.pipe, [adapter]) as adapters:
                        adapters.apply({adapter.name: 1.0})
                        images = self._generate(prompts)
                    row = {"method": method, "subject": subject, "trigger": adapter.trigger, "train_images": count,
                           "steps": adapter.steps, "train_seconds": adapter.seconds,
                           "final_loss": adapter.final_loss, "generate_seconds": time.perf_counter() - started,
                           "images": len(images), "prompts": list(prompts),
                           **self._score_subject(prompts, images)}
                    self.progress(f"{method} {subject} x{count}: fidelity {row['fidelity']:.2f}, alignment "
                                  f"{row['alignment']:.2f}, pixel diversity {row['pixel_diversity']:.3f}")
                    rows.append(row)
        return rows

    def _compose_adapter(self, concept_name: str) -> TrainedAdapter:
        """The LoRA of a subject (with the most training images of the profile) or of a style."""
        if concept(concept_name).kind == "subject":
            return self.train(COMPOSE_ADAPTER_METHOD, concept_name, max(self.profile.train_images))
        return self.train(COMPOSE_ADAPTER_METHOD, concept_name, self.profile.style_images)

    def _compose_row(self, composer: str, concepts: Sequence[str], asked: Sequence[tuple[str, Labels]],
                     images: list[np.ndarray], seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
        scenes = [scene for _, scene in asked for _ in range(self.profile.compose_seeds)]
        kinds = "+".join(concept(c).kind for c in concepts)
        return {"composer": composer, "set": kinds, "concepts": list(concepts), "adapters": len(concepts),
                "settings": settings, "images": len(images), "seconds_per_image": seconds / len(images),
                "prompts": [prompt for prompt, _ in asked],
                **metrics.composition_scores(scenes, self.detectors.detect(images))}

    def composers(self) -> list[dict[str, Any]]:
        """Every composer on every set; image by image, the base model and the composers take turns, so that
        load from elsewhere on the machine hits all of them alike."""
        p = self.profile
        rows = []
        for concepts in p.compose_sets:
            adapters = [self._compose_adapter(c) for c in concepts]
            asked = composition_prompts(concepts, p.compose_prompts, self.seed)
            label = "+".join(concepts)
            weights = {a.name: 1.0 for a in adapters}
            runs: dict[str, tuple[Any, dict[str, float], dict[str, Any]]] = {
                BASE_ROW: (COMPOSERS.get("merge")(), {}, {})}
            for name in p.composers:
                composer = COMPOSERS.get(name)()
                settings: dict[str, Any] = composer.config.to_dict()
                if isinstance(composer, CLoRAComposer):
                    composer.adapter_prompts = {a.name: f"{a.trigger}, {a.concept}" if a.kind == "subject"
                                                else STYLE_CONCEPT_WORD for a in adapters}
                    settings["concept_words"] = {a.concept: composer.adapter_prompts[a.name] for a in adapters}
                runs[name] = (composer, weights, settings)
            images: dict[str, list[np.ndarray]] = {name: [] for name in runs}
            seconds = dict.fromkeys(runs, 0.0)
            self.progress(f"compose {label}: the base model and {len(p.composers)} composer(s) on {len(asked)} "
                          f"prompt(s) x {p.compose_seeds} seed(s)")
            with attached(self.pipe, adapters) as adapter_set:
                for index, (prompt, _) in enumerate(asked):
                    for k in range(p.compose_seeds):
                        request = SampleRequest(prompt=prompt, seed=self.seed + index * p.compose_seeds + k,
                                                steps=p.sample_steps, guidance_scale=p.guidance)
                        for name, (composer, mix, _) in runs.items():
                            started = time.perf_counter()
                            image = sample(self.pipe, composer, adapter_set, mix, request)
                            seconds[name] += time.perf_counter() - started
                            images[name].append(np.asarray(image.convert("RGB")))
            for name, (_, _, settings) in runs.items():
                row = self._compose_row(name, concepts, asked, images[name], seconds[name], settings)
                row["vs_base"] = seconds[name] / seconds[BASE_ROW]
                self.progress(f"{name} {label}: all concepts {row['all_concepts']:.2f}, "
                              f"{row['seconds_per_image']:.2f} s/image ({row['vs_base']:.2f}x base)")
                rows.append(row)
        return rows


@dataclass
class EvaluationResult:
    results: dict[str, Any]
    json_path: Path
    markdown_path: Path


def default_out(profile: str) -> Path:
    return Path("benchmarks") / "results" / profile


def run_evaluation(profile: str | Profile = "full", base: str | None = None, out: str | Path | None = None,
                   seed: int = 0, threads: int | None = 1, models_dir: str | Path | None = None,
                   device: str | None = None, command: str = "", progress: Progress | None = None
                   ) -> EvaluationResult:
    """Run the benchmark ``profile`` (a name or a ``Profile``) on base model ``base`` (default: the default
    built-in) and write ``results.json`` and ``results.md`` into ``out`` (default ``benchmarks/results/<profile>``).

    ``threads``: torch CPU threads for the whole run (default 1; ``None`` keeps torch's setting). ``models_dir``:
    where built-in models live (default: the settings' models folder). ``command`` is recorded as the command
    line that made the results; ``progress`` receives one line per stage.
    """
    import torch

    from services.settings import Settings

    chosen = profile if isinstance(profile, Profile) else get_profile(profile)
    base = base or DEFAULT_BASE
    out = Path(out) if out is not None else default_out(chosen.name)
    say = progress or (lambda line: None)
    started = time.perf_counter()
    runtime = ModelRuntime(Path(models_dir) if models_dir else Settings.from_env().models_dir,
                           choose_placement(device))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="lorastudio-eval-") as tmp:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: wanted
            say(f"profile {chosen.name}: loading {base}")
            pipe = runtime.fresh_pipeline(base)
            pipe.set_progress_bar_config(disable=True)
            base_hash = runtime.base_hash(base)
            load_seconds = time.perf_counter() - started
            run = _Run(chosen, pipe, base, base_hash, seed, threads, Path(tmp), say)
            t0 = time.perf_counter()
            method_rows = run.methods()
            methods_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            composer_rows = run.composers()
            composers_seconds = time.perf_counter() - t0
            machine = hardware()
    finally:
        torch.set_num_threads(before)
    total = time.perf_counter() - started
    results = {
        "profile": chosen.name,
        "settings": {**asdict(chosen), "seed": seed, "threads": threads, "device": str(runtime.placement),
                     "triggers": TRIGGERS, "style_concept_word": STYLE_CONCEPT_WORD},
        "base_model": {"ref": base, "hash": base_hash},
        "hardware": {**machine, "python": platform.python_version()},
        "timings": {"total_s": total, "load_s": load_seconds, "methods_s": methods_seconds,
                    "composers_s": composers_seconds,
                    "training_s": sum(a.seconds for a in run.adapters.values())},
        "command": command,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "methods": method_rows,
        "composers": composer_rows,
    }
    json_path, md_path = write_results(results, out)
    say(f"done in {total:.0f} s: wrote {json_path} and {md_path}")
    return EvaluationResult(results, json_path, md_path)


# ------------------------------------------------------------------------------------------------- reports --

def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: what ran where, a table for methods, one for composers, the command line."""
    s, t, hw = results["settings"], results["timings"], results["hardware"]
    base = results["base_model"]
    lines = [
        f"# Customization and composition benchmark: profile `{results['profile']}`",
        "",
        f"Base model `{base['ref']}` (hash `{base['hash']}`), seed {s['seed']}, {s['sample_steps']} sampling steps "
        f"at guidance {s['guidance']}; {hw['cpu_count']} CPU(s), {s['threads'] or 'default'} torch thread(s), "
        f"device {s['device']}{', ' + hw['cuda'] if hw.get('cuda') else ''}, torch {hw['torch']}. Total "
        f"{t['total_s']:.0f} s (training {t['training_s']:.0f} s, methods {t['methods_s']:.0f} s, composers "
        f"{t['composers_s']:.0f} s).",
        "",
        "## Methods",
        "",
        f"Per subject: {s['prompts']} prompts on unseen backgrounds x {s['seeds']} seeds. Fidelity: the subject is "
        "detected; alignment: background colour and position obeyed; diversity: across the seeds of a prompt.",
        "",
        "| method | subject | train images | steps | fidelity | alignment | background | position "
        "| pixel diversity | layout diversity | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["methods"]:
        lines.append(f"| {r['method']} | {r['subject']} | {r['train_images']} | {r['steps']} | "
                     f"{_number(r['fidelity'])} | {_number(r['alignment'])} | {_number(r['background'])} | "
                     f"{_number(r['position'])} | {_number(r['pixel_diversity'], 3)} | "
                     f"{_number(r['layout_diversity'])} | {_number(r['train_seconds'], 1)} |")
    lines += [
        "",
        "## Composers",
        "",
        f"Per set: {s['compose_prompts']} prompts x {s['compose_seeds']} seeds. All concepts: every subject and the "
        "style detected, the background colour obeyed. Seconds per image measured in this run; the base model "
        "alone is 1.00.",
        "",
        "| set | concepts | composer | all concepts | subjects | style | background | s/image | vs base |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["composers"]:
        lines.append(f"| {r['set']} | {' + '.join(r['concepts'])} | {r['composer']} | "
                     f"{_number(r['all_concepts'])} | {_number(r['subjects'])} | {_number(r['style'])} | "
                     f"{_number(r['background'])} | {_number(r['seconds_per_image'], 3)} | "
                     f"{_number(r['vs_base'])} |")
    lines += ["", "Made with:", "", "```", results["command"] or "lorastudio eval", "```", ""]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out`` (each atomically); returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "results.json", folder / "results.md"
    atomic_write_json(json_path, results)
    atomic_write_bytes(md_path, results_markdown(results).encode("utf-8"))
    return json_path, md_path
