"""Training benchmark: every registered method through the trainer against a plain diffusers + peft loop.

The baseline is what diffusers' ``train_text_to_image_lora`` example does, on accelerate: a DataLoader reading
and transforming the images, the VAE and the text encoder run on every step (no latent or text caching), peft's
LoRA forward, default ``torch.optim.AdamW``, gradient clipping and a constant LR schedule. Every loop runs at the
same fixed settings (``BENCH_SETTINGS``: rank 8 where the method has one, batch 2, 64 px, same LR and seed) on
the built-in model; the baseline's LoRA has the default targets (attention q/k/v/out).

Speed: steps/s from the median step time after a warm-up, excluding one-time setup (for the trainer: the caching
pass), best of a few rounds that alternate baseline and methods, so a shared machine hurts all alike. The
suite pins every loop to ``DEFAULT_THREADS`` (1) torch threads: on a shared CPU, spinning OpenMP workers make a
multi-threaded loop erratic (the tiny model gains little from more threads anyway); ``threads=0`` lets each loop
keep its own setting (torch's for the baseline, the trainer's CPU policy for the trainer).

Memory, measured the same way for every loop on one armed UNet call after a warm-up:

* ``saved_activation_bytes``: the unique storages autograd keeps for the backward pass during that forward
  (``torch.autograd.graph.saved_tensors_hooks``), less the model's and the adapter's own parameters. Allocator
  independent: it is the activation memory the method makes the backward keep.
* ``train_state_bytes``: trainable parameters + their gradients + the optimizer state.
* ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` over that step (forward, backward, optimizer),
  reset right before it; on CPU ``saved_activation_bytes + train_state_bytes``.
* ``rss_peak_delta_bytes`` (when isolated): each measurement in a fresh spawned process, the RSS high-water mark
  of the run (reset before it through ``/proc/self/clear_refs``) minus the RSS before it; everything the run
  allocates counts (caching pass, allocator and library workspaces), so it is coarse.

Extension point: a method class may declare ``base_kind`` (default ``"image"``); methods whose base kind has no
builder in ``BASE_BUILDERS`` are skipped with a note. Video methods (``base_kind = "video"``: MotionDirector) run on
the built-in tiny-video model (AnimateDiff over the image model, ``VIDEO_SETTINGS``: one 8-frame 64 px clip per
step) against their own baseline, ``VIDEO_BASELINE_NAME``: a plain temporal-LoRA loop (peft LoRA on the motion
modules' attention and feed-forward layers, the VAE and text encoder run on every step, MSE on the noise, default
AdamW), the loop one writes to fine-tune an AnimateDiff motion module with a LoRA. A MotionDirector step runs the
spatial path (one frame) and the temporal path (the clip); its memory is measured on a temporal-path UNet call,
the larger of the two, with the spatial path never skipped, and its train state counts both optimizers.

    .venv/bin/python -m training.bench [--methods lora,tlora] [--quick] [--threads N] [--json OUT]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import platform
import re
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import training.methods  # noqa: F401  (registers the methods)
from training.base import METHODS, Method, MethodConfig, remove_peft_adapter
from training.data import ImageCaptionDataset, build_prompt
from training.trainer import Trainer, make_accelerator
from training.video import ClipDataset

BASELINE_ADAPTER = "bench_baseline"
BASELINE_NAME = "diffusers+peft loop"
BENCH_SETTINGS: dict[str, Any] = {"rank": 8, "batch_size": 2, "resolution": 64, "learning_rate": 1e-4, "seed": 0}
SPEED_TARGET = 1.5  # method steps/s over baseline steps/s
IMAGE_BASE = "image"
VIDEO_BASE = "video"
VIDEO_BASELINE_NAME = "temporal LoRA loop"
VIDEO_SETTINGS: dict[str, Any] = {**BENCH_SETTINGS, "batch_size": 1, "num_frames": 8}
N_IMAGES = 4
N_CLIPS = 2
FULL = {"steps": 30, "warmup": 5, "rounds": 3}
QUICK = {"steps": 4, "warmup": 1, "rounds": 1}
DEFAULT_THREADS = 1
MEMORY_WARMUP = 2  # UNet calls before the measured one (optimizer state exists, allocator warmed)


def _builtin_pipeline() -> Any:
    from core.builtin import build_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' notes on the built-in scheduler config
        return build_pipeline()


def _builtin_video_pipeline() -> Any:
    from core.builtin import build_video_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return build_video_pipeline()


BASE_BUILDERS: dict[str, Callable[[], Any]] = {IMAGE_BASE: _builtin_pipeline, VIDEO_BASE: _builtin_video_pipeline}


@dataclasses.dataclass
class RunStats:
    """One loop's measurements; the memory fields stay 0 unless the run was armed for memory."""

    steps_per_s: float
    trainable_params: int = 0
    train_state_bytes: int = 0
    saved_activation_bytes: int = 0
    cuda_peak_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes
        return self.saved_activation_bytes + self.train_state_bytes


def _rate(stamps: list[float], warmup: int) -> float:
    """Steps/s from the per-step end times, skipping ``warmup`` steps; median step time resists stalls."""
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return 1.0 / statistics.median(gaps)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------- memory --

def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class StepMeter:
    """Armed on the ``at_call``-th forward of ``module`` (0-based): records what autograd saves during it and, on
    CUDA, the allocator peak from its start to the start of the next forward (or ``close``)."""

    def __init__(self, module: nn.Module, at_call: int) -> None:
        self.module, self.at_call = module, at_call
        self.calls = 0
        self.saved: dict[int, int] = {}
        self.model_storages: set[int] = set()
        self.cuda_peak_bytes: int | None = None
        self.fired = False
        self._hooks_ctx: Any = None
        self._cuda_open = False
        self._handles = [module.register_forward_pre_hook(self._pre),
                         module.register_forward_hook(self._post)]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptr, size = _storage(t)
            if ptr:
                self.saved[ptr] = size
        return t

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._read_cuda_peak()
        if self.calls == self.at_call:
            self.fired = True
            self.model_storages = {_storage(t)[0] for t in [*module.parameters(), *module.buffers()]}
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._cuda_open = True
            self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks_ctx.__enter__()
        self.calls += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._hooks_ctx is not None:
            self._hooks_ctx.__exit__(None, None, None)
            self._hooks_ctx = None

    def _read_cuda_peak(self) -> None:
        if self._cuda_open:
            torch.cuda.synchronize()
            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())
            self._cuda_open = False

    def close(self) -> None:
        self._read_cuda_peak()
        for handle in self._handles:
            handle.remove()

    def activation_bytes(self, exclude: set[int]) -> int:
        """Bytes of the saved storages that are neither model tensors nor ``exclude`` (trainable parameters)."""
        skip = self.model_storages | exclude
        return sum(size for ptr, size in self.saved.items() if ptr not in skip)


def train_state(optimizer: Any) -> tuple[int, int, set[int]]:
    """(trainable parameter count, bytes of parameters + gradients + optimizer state, parameter storages)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    count = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                      if torch.is_tensor(v))
    return count, 2 * param_bytes + state_bytes, {_storage(p)[0] for p in params}


@contextlib.contextmanager
def _metered(module: nn.Module, at_call: int | None) -> Iterator[StepMeter | None]:
    if at_call is None:
        yield None
        return
    meter = StepMeter(module, at_call)
    try:
        yield meter
    finally:
        meter.close()


def _stats(stamps: list[float], warmup: int, optimizer: Any, meter: StepMeter | None) -> RunStats:
    count, state_bytes, param_storages = train_state(optimizer)
    stats = RunStats(_rate(stamps, warmup), trainable_params=count, train_state_bytes=state_bytes)
    if meter is not None:
        if not meter.fired:
            raise RuntimeError(f"the memory meter never fired: fewer than {meter.at_call + 1} UNet calls")
        stats.saved_activation_bytes = meter.activation_bytes(param_storages)
        stats.cuda_peak_bytes = meter.cuda_peak_bytes
    return stats


# ----------------------------------------------------------------------------------------------- baseline --

def baseline_run(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str = "sks",
                 steps: int = 30, warmup: int = 5, threads: int | None = None,
                 measure_at: int | None = None) -> RunStats:
    """A plain uncached diffusers + peft LoRA loop (the pipeline is restored afterwards).

    ``threads``: torch intra-op threads for the run (default: leave torch's setting). ``measure_at``: arm the
    memory meter on that UNet call.
    """
    from peft import LoraConfig

    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    flags = {p: p.requires_grad for m in (unet, vae, text_encoder) for p in m.parameters()}
    devices = {m: next(m.parameters()).device for m in (unet, vae, text_encoder)}
    mode = unet.training
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.effective_alpha, init_lora_weights="gaussian",
                                target_modules=list(config.target_modules)), adapter_name=BASELINE_ADAPTER)
    try:
        with _torch_threads(threads), _metered(unet, measure_at) as meter:
            stamps, optimizer = _baseline_loop(pipe, dataset, config, trigger_word, steps + warmup + 1)
        return _stats(stamps, warmup, optimizer, meter)
    finally:
        remove_peft_adapter(unet, BASELINE_ADAPTER)  # unwraps the layers when it was the only adapter
        unet.train(mode)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, device in devices.items():
            m.to(device)


def baseline_steps_per_s(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str = "sks",
                         steps: int = 30, warmup: int = 5, threads: int | None = None) -> float:
    """Steps/s of the baseline loop."""
    return baseline_run(pipe, dataset, config, trigger_word, steps, warmup, threads).steps_per_s


def _baseline_loop(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str,
                   total: int) -> tuple[list[float], torch.optim.Optimizer]:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    accelerator = make_accelerator("no")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    unet.train()
    stamps: list[float] = []
    try:
        while len(stamps) < total:
            for batch in loader:
                prompts = [build_prompt(c, trigger_word) for c in batch["caption"]]
                with torch.no_grad():
                    latents = vae.encode(batch["pixels"]).latent_dist.sample() * vae.config.scaling_factor
                    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
                    embeds = text_encoder(ids, return_dict=False)[0]
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                pred = unet(noisy, timesteps, embeds, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                stamps.append(time.perf_counter())
                if len(stamps) >= total:
                    break
    finally:
        accelerator.free_memory()
        for key in ("forward", "_original_forward", "_is_accelerate_prepared"):
            pipe.unet.__dict__.pop(key, None)
    return stamps, optimizer


# ------------------------------------------------------------------------------------------------ trainer --

class _Stamps:
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None:
        self.stamps.append(time.perf_counter())

    def on_preview(self, step: int, image: Image.Image) -> None:
        pass

    def on_checkpoint(self, step: int, path: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def bench_config(method_cls: type[Method], settings: dict[str, Any] | None = None,
                 max_steps: int = 1) -> MethodConfig:
    """``method_cls``'s config at the shared settings: only fields its config declares (``rank`` only where the
    method uses one), no previews or checkpoints."""
    settings = BENCH_SETTINGS if settings is None else settings
    fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
    data = {k: v for k, v in settings.items() if k in fields}
    if not getattr(method_cls, "uses_rank", True):
        data.pop("rank", None)
    data.update(max_steps=max_steps, preview_every=0, checkpoint_every=0)
    return method_cls.config_cls.from_dict(data)


def trainer_run(pipe: Any, dataset: ImageCaptionDataset, method: str = "lora", settings: dict[str, Any] | None = None,
                trigger_word: str = "sks", steps: int = 30, warmup: int = 5, threads: int | None = None,
                measure_at: int | None = None) -> RunStats:
    """``Trainer`` running ``method`` at ``settings`` (no previews or checkpoints; setup and caching excluded).

    ``threads``: the trainer's ``cpu_threads`` (default: its own choice). ``measure_at``: arm the memory meter on
    that UNet call.
    """
    method_cls = METHODS.get(method)
    config = bench_config(method_cls, settings, steps + warmup + 1)
    callback = _Stamps()
    trainer = Trainer(method_cls(config), pipe, dataset, config, trigger_word, callback, cpu_threads=threads)
    with _metered(pipe.unet, measure_at) as meter:
        trainer.run()
    return _stats(callback.stamps, warmup, trainer.optimizer, meter)


def trainer_steps_per_s(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str = "sks",
                        steps: int = 30, warmup: int = 5, method: str = "lora", threads: int | None = None) -> float:
    """Steps/s of ``Trainer`` running ``method`` at ``config``'s settings."""
    return trainer_run(pipe, dataset, method, config.to_dict(), trigger_word, steps, warmup, threads).steps_per_s


def make_images(folder: Path, count: int = N_IMAGES, size: int = 64) -> list[tuple[Path, str]]:
    """A few deterministic coloured-shape PNGs with captions."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        array = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        array[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(array).save(path)
        records.append((path, f"a red square {i}"))
    return records


def compare(pipe: Any = None, rounds: int = 3, steps: int = 30, batch_size: int = 2, resolution: int = 64,
            method: str = "lora", threads: int | None = None) -> dict[str, float]:
    """Best-of-``rounds`` steps/s of the baseline and the trainer running ``method``, alternating, and their
    ratio."""
    pipe = pipe if pipe is not None else _builtin_pipeline()
    settings = {**BENCH_SETTINGS, "batch_size": batch_size, "resolution": resolution}
    config = MethodConfig.from_dict(settings)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = ImageCaptionDataset(make_images(Path(tmp), size=resolution), resolution)
        base, ours = [], []
        for _ in range(rounds):
            base.append(baseline_steps_per_s(pipe, dataset, config, steps=steps, threads=threads))
            ours.append(trainer_run(pipe, dataset, method, settings, steps=steps, threads=threads).steps_per_s)
    return {"baseline_steps_per_s": max(base), "trainer_steps_per_s": max(ours), "speedup": max(ours) / max(base)}


# -------------------------------------------------------------------------------------------------- video --

def make_clips(count: int = N_CLIPS, frames: int = 8, size: int = 64) -> list[tuple[np.ndarray, str]]:
    """A few deterministic clips of a coloured square sliding across a plain background, with captions."""
    rng = np.random.default_rng(0)
    out = []
    side = size // 4
    for i in range(count):
        clip = np.empty((frames, size, size, 3), dtype=np.uint8)
        clip[:] = rng.integers(0, 255, 3)
        colour = rng.integers(0, 255, 3)
        y = int(rng.integers(0, size - side))
        for f in range(frames):
            x = round(f * (size - side) / max(frames - 1, 1))
            clip[f, y:y + side, x:x + side] = colour
        out.append((clip, f"a red square moving right {i}"))
    return out


def make_clip_dataset(settings: dict[str, Any] | None = None) -> ClipDataset:
    settings = VIDEO_SETTINGS if settings is None else settings
    frames, size = settings["num_frames"], settings["resolution"]
    return ClipDataset.from_records(make_clips(frames=frames, size=size), frames, size)


def _plain_config(settings: dict[str, Any]) -> MethodConfig:
    """The shared ``MethodConfig`` fields of ``settings`` (what a baseline loop reads)."""
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    return MethodConfig.from_dict({k: v for k, v in settings.items() if k in fields})


def video_baseline_run(pipe: Any, clips: ClipDataset, config: MethodConfig, steps: int = 30, warmup: int = 5,
                       threads: int | None = None, measure_at: int | None = None) -> RunStats:
    """A plain uncached temporal-LoRA loop on the motion modules (the pipeline is restored afterwards)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from training.methods.motion_director import temporal_regex

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    flags = {p: p.requires_grad for m in (unet, vae, text_encoder) for p in m.parameters()}
    mode = unet.training
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.effective_alpha, init_lora_weights="gaussian",
                                target_modules=temporal_regex()), adapter_name=BASELINE_ADAPTER)
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet.train()
        generator = np.random.default_rng(config.seed)
        stamps: list[float] = []
        with _torch_threads(threads), _metered(unet, measure_at) as meter:
            while len(stamps) < steps + warmup + 1:
                index = int(generator.integers(len(clips)))
                pixels = clips.pixels(index)  # (F, 3, R, R)
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                    latents = latents.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, F, h, w)
                    ids = tokenizer([clips.captions[index]], padding="max_length",
                                    max_length=tokenizer.model_max_length, truncation=True,
                                    return_tensors="pt").input_ids
                    embeds = text_encoder(ids, return_dict=False)[0]
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,))
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                pred = unet(noisy, timesteps, embeds.repeat_interleave(latents.shape[2], dim=0),
                            return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                stamps.append(time.perf_counter())
        return _stats(stamps, warmup, optimizer, meter)
    finally:
        remove_peft_adapter(unet, BASELINE_ADAPTER)
        unet.train(mode)
        for p, flag in flags.items():
            p.requires_grad_(flag)


class _Optimizers:
    """Both MotionDirector optimizers as one, for ``train_state``."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.state = {k: v for o in optimizers for k, v in o.state.items()}


def motion_trainer_run(pipe: Any, clips: ClipDataset, method: str = "motion_director",
                       settings: dict[str, Any] | None = None, steps: int = 30, warmup: int = 5,
                       threads: int | None = None, measure_at: int | None = None) -> RunStats:
    """``MotionTrainer`` running ``method`` at ``settings`` (no previews or checkpoints; setup excluded). With
    ``measure_at`` the spatial path is never skipped, so UNet calls alternate spatial, temporal."""
    from training.motion_trainer import MotionTrainer

    method_cls = METHODS.get(method)
    config = bench_config(method_cls, VIDEO_SETTINGS if settings is None else settings, steps + warmup + 1)
    if measure_at is not None:
        config = method_cls.config_cls.from_dict({**config.to_dict(), "spatial_skip_prob": 0.0})
    callback = _Stamps()
    trainer = MotionTrainer(method_cls(config), pipe, clips, config, callback=callback, cpu_threads=threads)
    with _metered(pipe.unet, measure_at) as meter:
        trainer.run()
    return _stats(callback.stamps, warmup, _Optimizers(list(trainer.optimizers.values())), meter)


def measure_video_memory(pipe: Any, clips: ClipDataset, method: str | None,
                         settings: dict[str, Any] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Memory of one armed training step of video ``method`` (``None``: the temporal-LoRA baseline): the baseline's
    UNet call after ``MEMORY_WARMUP`` steps, or the temporal-path call of MotionDirector's step after as many."""
    settings = VIDEO_SETTINGS if settings is None else settings
    total = MEMORY_WARMUP + 2
    if method is None:
        stats = video_baseline_run(pipe, clips, _plain_config(settings), steps=total - 1, warmup=0,
                                   threads=threads, measure_at=MEMORY_WARMUP)
    else:
        stats = motion_trainer_run(pipe, clips, method, settings, steps=total - 1, warmup=0, threads=threads,
                                   measure_at=2 * MEMORY_WARMUP + 1)
    return {"trainable_params": stats.trainable_params, "saved_activation_bytes": stats.saved_activation_bytes,
            "train_state_bytes": stats.train_state_bytes, "peak_bytes": stats.peak_bytes,
            "peak_source": "cuda.max_memory_allocated" if stats.cuda_peak_bytes is not None
            else "saved_activation_bytes + train_state_bytes"}


def _video_suite(names: list[str], plan: dict[str, int], settings: dict[str, Any], threads: int | None,
                 isolate: bool) -> tuple[dict[str | None, list[float]], dict[str | None, Any], dict[str | None, str]]:
    """Speeds, memory and errors of the video methods ``names`` and (key ``None``) the temporal-LoRA baseline."""
    pipe = BASE_BUILDERS[VIDEO_BASE]()
    clips = make_clip_dataset(settings)
    speeds: dict[str | None, list[float]] = {None: [], **{n: [] for n in names}}
    errors: dict[str | None, str] = {}
    _time_rounds(speeds, errors, plan, threads,
                 lambda **kw: video_baseline_run(pipe, clips, _plain_config(settings), **kw),
                 lambda name, **kw: motion_trainer_run(pipe, clips, name, settings, **kw))
    memory: dict[str | None, Any] = {}
    for name in speeds:
        if name in errors:
            continue
        if isolate:
            result = measure_memory_isolated(name, settings, threads, base=VIDEO_BASE)
            memory[name], error = (None, result["error"]) if "error" in result else (result, None)
        else:
            memory[name], error = _guarded(functools.partial(measure_video_memory, pipe, clips, name, settings,
                                                             threads))
        if error:
            errors[name] = error
    return speeds, memory, errors


# ------------------------------------------------------------------------------------------------- memory --

def measure_memory(pipe: Any, dataset: ImageCaptionDataset, method: str | None,
                   settings: dict[str, Any] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Memory of one armed training step of ``method`` (``None``: the baseline) at ``settings``."""
    settings = BENCH_SETTINGS if settings is None else settings
    total = MEMORY_WARMUP + 2  # the armed call, then one more whose start closes the CUDA window
    if method is None:
        stats = baseline_run(pipe, dataset, MethodConfig.from_dict(settings), steps=total - 1, warmup=0,
                             threads=threads, measure_at=MEMORY_WARMUP)
    else:
        stats = trainer_run(pipe, dataset, method, settings, steps=total - 1, warmup=0, threads=threads,
                            measure_at=MEMORY_WARMUP)
    return {"trainable_params": stats.trainable_params, "saved_activation_bytes": stats.saved_activation_bytes,
            "train_state_bytes": stats.train_state_bytes, "peak_bytes": stats.peak_bytes,
            "peak_source": "cuda.max_memory_allocated" if stats.cuda_peak_bytes is not None
            else "saved_activation_bytes + train_state_bytes"}


def _proc_status_bytes(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> int:
    """Reset the process's RSS high-water mark where Linux allows it; return the level to measure growth from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        current = _proc_status_bytes("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return _peak_rss_bytes()  # no reset: growth beyond the peak so far (a lower bound)


def _peak_rss_bytes() -> int:
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _memory_child(method: str | None, settings: dict[str, Any], threads: int | None, queue: Any,
                  base: str = IMAGE_BASE) -> None:
    """Spawned: build the base, measure one method's memory, add the process's peak-RSS growth over the run."""
    import gc

    warnings.filterwarnings("ignore")
    try:
        if base == VIDEO_BASE:
            pipe = _builtin_video_pipeline()
            clips = make_clip_dataset(settings)
            gc.collect()
            before = _reset_peak_rss()
            result = measure_video_memory(pipe, clips, method, settings, threads)
            result["rss_peak_delta_bytes"] = _peak_rss_bytes() - before
            queue.put(result)
            return
        pipe = _builtin_pipeline()
        with tempfile.TemporaryDirectory() as tmp:
            dataset = ImageCaptionDataset(make_images(Path(tmp), size=settings["resolution"]),
                                          settings["resolution"])
            gc.collect()
            before = _reset_peak_rss()
            result = measure_memory(pipe, dataset, method, settings, threads)
            result["rss_peak_delta_bytes"] = _peak_rss_bytes() - before
        queue.put(result)
    except BaseException as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_memory_isolated(method: str | None, settings: dict[str, Any] | None = None,
                            threads: int | None = None, base: str = IMAGE_BASE) -> dict[str, Any]:
    """``measure_memory`` (``measure_video_memory`` for ``base="video"``) in a fresh spawned process, so that its
    peak RSS is this measurement's own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    default = VIDEO_SETTINGS if base == VIDEO_BASE else BENCH_SETTINGS
    proc = ctx.Process(target=_memory_child, args=(method, dict(settings or default), threads, queue, base))
    proc.start()
    try:
        result = queue.get(timeout=900)
    finally:
        proc.join(timeout=60)
    return result


# -------------------------------------------------------------------------------------------------- suite --

def _machine(pipe: Any) -> dict[str, Any]:
    import diffusers
    import peft

    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def _select(methods: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    names = list(methods) if methods else METHODS.names()
    run, skipped = [], {}
    for name in names:
        kind = getattr(METHODS.get(name), "base_kind", IMAGE_BASE)
        if kind in BASE_BUILDERS:
            run.append(name)
        else:
            skipped[name] = f"needs a {kind!r} base model; this benchmark has only {sorted(BASE_BUILDERS)}"
    return run, skipped


def _guarded(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # one broken method must not hide the others' figures
        return None, f"{type(exc).__name__}: {exc}"


def _time_rounds(speeds: dict[str | None, list[float]], errors: dict[str | None, str], plan: dict[str, int],
                 threads: int | None, baseline: Callable[..., Any], method: Callable[..., Any]) -> None:
    """``plan["rounds"]`` rounds of every entry of ``speeds`` in turn (key ``None``: ``baseline(**kw)``, a name:
    ``method(name, **kw)``), appending steps/s; an entry that fails is recorded in ``errors`` and not run again."""
    kwargs = {"steps": plan["steps"], "warmup": plan["warmup"], "threads": threads}
    for _ in range(plan["rounds"]):
        for name in speeds:
            if name in errors:
                continue
            run = functools.partial(baseline, **kwargs) if name is None else functools.partial(method, name, **kwargs)
            stats, error = _guarded(run)
            if error:
                errors[name] = error
            else:
                speeds[name].append(stats.steps_per_s)


def run_training_suite(methods: Sequence[str] | None = None, quick: bool = False, steps: int | None = None,
                       rounds: int | None = None, threads: int | None = DEFAULT_THREADS,
                       isolate: bool | None = None, pipe: Any = None,
                       settings: dict[str, Any] | None = None,
                       video_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steps/s, trainable parameters and memory of each method (default: every registered one) and the baseline
    (video methods: against the temporal-LoRA baseline, in ``results["video_baseline"]``, at ``video_settings``).

    ``quick``: few steps, one round, memory measured in this process (``isolate`` defaults to ``not quick``).
    ``threads``: torch threads of every loop; 0 or ``None``: each loop's own setting.
    """
    threads = threads or None
    plan = dict(QUICK if quick else FULL)
    plan["steps"] = steps or plan["steps"]
    plan["rounds"] = rounds or plan["rounds"]
    isolate = (not quick) if isolate is None else isolate
    settings = {**BENCH_SETTINGS, **(settings or {})}
    names, skipped = _select(methods)
    video_names = [n for n in names if getattr(METHODS.get(n), "base_kind", IMAGE_BASE) == VIDEO_BASE]
    pipe = pipe if pipe is not None else _builtin_pipeline()
    speeds: dict[str | None, list[float]] = {None: [], **{n: [] for n in names if n not in video_names}}
    errors: dict[str | None, str] = {}
    with tempfile.TemporaryDirectory(prefix="lorastudio-bench-") as tmp:
        dataset = ImageCaptionDataset(make_images(Path(tmp), size=settings["resolution"]), settings["resolution"])
        _time_rounds(speeds, errors, plan, threads,
                     lambda **kw: baseline_run(pipe, dataset, MethodConfig.from_dict(settings), **kw),
                     lambda name, **kw: trainer_run(pipe, dataset, name, settings, **kw))
        memory = {}
        for name in speeds:
            if name in errors:
                continue
            if isolate:
                result = measure_memory_isolated(name, settings, threads)
                memory[name], error = (None, result["error"]) if "error" in result else (result, None)
            else:
                memory[name], error = _guarded(functools.partial(measure_memory, pipe, dataset, name, settings,
                                                                 threads))
            if error:
                errors[name] = error
    video = None
    if video_names:
        video_settings = {**VIDEO_SETTINGS, **(video_settings or {})}
        video = (video_settings, *_video_suite(video_names, plan, video_settings, threads, isolate))
    return _report(plan, settings, threads, isolate, quick, pipe, names, skipped, speeds, memory, errors, video)


def _entry(speeds: list[float], memory: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    if error:
        return {"error": error}
    return {"steps_per_s": max(speeds), "steps_per_s_rounds": speeds, **(memory or {})}


def _report(plan: dict[str, int], settings: dict[str, Any], threads: int | None, isolate: bool, quick: bool,
            pipe: Any, names: list[str], skipped: dict[str, str], speeds: dict[str | None, list[float]],
            memory: dict[str | None, Any], errors: dict[str | None, str],
            video: tuple[dict[str, Any], dict[str | None, list[float]], dict[str | None, Any],
                         dict[str | None, str]] | None = None) -> dict[str, Any]:
    baseline = {"what": BASELINE_NAME, **_entry(speeds[None], memory.get(None), errors.get(None))}
    video_baseline = None
    if video is not None:
        _, v_speeds, v_memory, v_errors = video
        video_baseline = {"what": VIDEO_BASELINE_NAME, **_entry(v_speeds[None], v_memory.get(None),
                                                                v_errors.get(None))}
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        base = baseline
        if video is not None and name in video[1]:
            entry, base = _entry(video[1][name], video[2].get(name), video[3].get(name)), video_baseline
            entry["baseline"] = VIDEO_BASELINE_NAME
        else:
            entry = _entry(speeds[name], memory.get(name), errors.get(name))
        if "error" not in entry and "error" not in base:
            entry["ratio_vs_baseline"] = entry["steps_per_s"] / base["steps_per_s"]
            entry["peak_vs_baseline"] = entry["peak_bytes"] / base["peak_bytes"]
        methods[name] = entry
    lora = methods.get("lora", {})
    if "peak_bytes" in lora:
        for entry in methods.values():
            if "peak_bytes" in entry and "baseline" not in entry:  # same base model as lora
                entry["peak_vs_lora"] = entry["peak_bytes"] / lora["peak_bytes"]
    # the speed target compares image methods with the diffusers example loop; a motion method's baseline is a
    # temporal-LoRA loop with the same caching, so its ratio is reported but is not held to that target
    image_names = [n for n in names if "baseline" not in methods.get(n, {})]
    speed = {n: methods[n]["ratio_vs_baseline"] >= SPEED_TARGET for n in image_names
             if "ratio_vs_baseline" in methods.get(n, {})}
    targets: dict[str, Any] = {"speed_ratio_min": SPEED_TARGET, "speed_met": speed,
                               "all_speed_met": bool(speed) and all(speed.values()) and len(speed) == len(image_names)}
    scedit = methods.get("scedit", {})
    if "peak_vs_lora" in scedit:
        targets["scedit_peak_below_lora"] = scedit["peak_vs_lora"] < 1.0
    results = {
        "settings": {**settings, **plan, "threads": threads, "quick": quick, "memory_isolated": isolate,
                     "images": N_IMAGES, "memory_warmup_calls": MEMORY_WARMUP,
                     "baseline_targets": MethodConfig().target_modules},
        "machine": _machine(pipe),
        "baseline": baseline,
        "methods": methods,
        "skipped": skipped,
        "targets": targets,
    }
    if video is not None:
        results["video_settings"] = {**video[0], "clips": N_CLIPS, "baseline_targets": "motion modules: attn1, "
                                     "attn2 (to_q, to_k, to_v, to_out.0), ff.net.0.proj, ff.net.2"}
        results["video_baseline"] = video_baseline
    return results


def _mib(value: Any) -> str:
    return f"{value / 2**20:.2f}" if isinstance(value, (int, float)) else "-"


def format_table(results: dict[str, Any]) -> str:
    """The suite's results as a fixed-width text table (MiB for memory)."""
    head = (f"{'loop':22} {'steps/s':>8} {'ratio':>6} {'params':>9} {'act MiB':>8} {'state MiB':>9} "
            f"{'peak MiB':>8} {'vs lora':>7} {'RSS+ MiB':>8}")
    rows = [head, "-" * len(head)]
    entries = [(BASELINE_NAME, results["baseline"])]
    if "video_baseline" in results:
        entries.append((VIDEO_BASELINE_NAME, results["video_baseline"]))
    entries += list(results["methods"].items())
    for name, e in entries:
        if "error" in e:
            rows.append(f"{name:22} error: {e['error']}")
            continue
        ratio = f"{e['ratio_vs_baseline']:.2f}" if "ratio_vs_baseline" in e else "1.00"
        name = f"{name} (video)" if "baseline" in e else name
        vs_lora = f"{e['peak_vs_lora']:.2f}" if "peak_vs_lora" in e else "-"
        rows.append(f"{name:22} {e['steps_per_s']:8.2f} {ratio:>6} {e.get('trainable_params', 0):9d} "
                    f"{_mib(e.get('saved_activation_bytes')):>8} {_mib(e.get('train_state_bytes')):>9} "
                    f"{_mib(e.get('peak_bytes')):>8} {vs_lora:>7} {_mib(e.get('rss_peak_delta_bytes')):>8}")
    for name, why in results.get("skipped", {}).items():
        rows.append(f"{name:22} skipped: {why}")
    t = results["targets"]
    met = ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in t["speed_met"].items()) or "none measured"
    rows.append(f"speed target (>= {t['speed_ratio_min']}x baseline): {met}")
    if "scedit_peak_below_lora" in t:
        rows.append(f"scedit peak below lora: {'yes' if t['scedit_peak_below_lora'] else 'NO'}")
    m = results["machine"]
    rows.append(f"{m['device']} ({m['gpu'] or str(m['cpu_count']) + ' cpu'}), torch {m['torch']}; "
                f"peak = {'cuda.max_memory_allocated' if m['device'] == 'cuda' else 'activations + train state'}")
    return "\n".join(rows)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Every training method vs a plain diffusers+peft loop")
    parser.add_argument("--methods", help="comma-separated method names (default: all registered)")
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads of every loop (default 1; 0 = each loop's own setting)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    results = run_training_suite(methods, quick=args.quick, steps=args.steps, rounds=args.rounds,
                                 threads=args.threads)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
