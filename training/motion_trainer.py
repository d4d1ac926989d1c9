"""The training loop of MotionDirector (``training.methods.motion_director``) on an AnimateDiff video pipeline.

Every clip is encoded once before the loop (VAE latents of every frame, and of every mirrored frame when the
spatial path may mirror; text embeddings of every distinct prompt), then the VAE and text encoder leave the
device. Each step draws, from one seeded generator and in a fixed order, the clips, one timestep and one noise per
clip, whether the spatial path is skipped, the spatial path's frame, mirror flag and fresh noise, and the anchor
frame of the debiased loss; then runs the spatial path (one frame, motion modules bypassed, spatial optimizer)
and the temporal path (whole clip, spatial LoRAs frozen, temporal optimizer), as the method's docstring describes.

Resumable checkpoints hold everything needed to continue bit for bit: both LoRA sets, both optimizers and LR
schedules, the generator and torch's RNG (LoRA dropout), the data position and the losses so far. They are
written to a temporary folder and renamed into place; the latest two are kept.

Previews are short fixed-seed clips sampled with the spatial LoRAs at the config's ``spatial_scale`` (what
``attach`` gives); ``on_preview`` receives the frames side by side as one image, and a callback that also has
``on_preview_frames(step, frames)`` receives the frames as a list.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.base import JobCancelled, NullCallback, TrainerCallback, TrainResult
from training.checkpoints import (
    CHECKPOINT_DIR,
    check_method,
    check_settings,
    json_safe,
    load_optimizer_state,
    optimizer_state,
    param_tensors,
    read_checkpoint,
    restore_params,
    restore_rng,
    rng_state,
    write_checkpoint,
)
from training.data import build_prompt
from training.methods.motion_director import (
    MotionDirector,
    MotionDirectorConfig,
    debiased_loss,
    is_unet3d,
    require_motion_unet,
    temporal_bypassed,
)
from training.trainer import SeededLoop, make_optimizer
from training.video import ClipDataset

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "motion"
_RESUME_FREE = {"max_steps", "checkpoint_every", "preview_every", "preview_prompt", "preview_steps", "spatial_scale"}
_ENCODE_FRAMES = 16
_OPTIMIZERS = ("spatial", "temporal")
log = logging.getLogger(__name__)


def frames_strip(frames: list[Image.Image]) -> Image.Image:
    """The frames of a clip side by side, left to right, as one RGB image."""
    if not frames:
        raise ValueError("no frames")
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(frames), h))
    for i, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), (i * w, 0))
    return strip


class MotionTrainer(SeededLoop):
    """Trains ``method`` (a ``MotionDirector``) on ``dataset`` with ``pipe``'s frozen AnimateDiff model.

    ``run()`` returns a ``TrainResult`` whose ``losses`` are the temporal-path losses (``spatial_losses`` holds
    the spatial path's, NaN where it was skipped). The pipeline is left as found (adapter removed, devices, modes
    and ``requires_grad`` flags restored) unless ``keep_adapter`` is set.
    """

    def __init__(self, method: MotionDirector, pipe: Any, dataset: ClipDataset,
                 config: MotionDirectorConfig | None = None, trigger_word: str = "",
                 callback: TrainerCallback | None = None, work_dir: str | os.PathLike[str] | None = None, *,
                 keep_adapter: bool = False, cpu_threads: int | None = None) -> None:
        if not isinstance(method, MotionDirector):
            raise TypeError(f"MotionTrainer trains MotionDirector adapters, not {type(method).__name__}")
        config = method.config if config is None else config
        if config.to_dict() != method.config.to_dict():
            raise ValueError("config differs from the method's own config; build the method from this config")
        config.validate()
        if dataset.resolution != config.resolution:
            raise ValueError(f"dataset resolution {dataset.resolution} differs from config resolution "
                             f"{config.resolution}")
        if dataset.num_frames != config.num_frames:
            raise ValueError(f"dataset clips have {dataset.num_frames} frames, the config wants {config.num_frames}")
        require_motion_unet(pipe.unet)
        longest = getattr(pipe.unet.config, "motion_max_seq_length", None)
        if longest is not None and config.num_frames > longest:
            raise ValueError(f"num_frames {config.num_frames} is more than this model's motion modules take "
                             f"({longest})")
        self.method = method
        self.pipe = pipe
        self.dataset = dataset
        self.config = config
        self.trigger_word = trigger_word
        self.callback: TrainerCallback = callback or NullCallback()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.keep_adapter = keep_adapter
        self.cpu_threads = cpu_threads
        self.prompts = [build_prompt(c, trigger_word, "motion") for c in dataset.captions]
        self.preview_prompt = config.preview_prompt.strip() or self.prompts[0]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ----------------------------------------------------------------------------------------------- setup --

    def _setup(self) -> None:
        cfg, unet = self.config, self.pipe.unet
        unet.to(self.device)
        self._cache_inputs()
        self.method.inject(unet)
        self.spatial_params = list(self.method.spatial_params)
        self.temporal_params = list(self.method.temporal_params)
        for p in self.spatial_params + self.temporal_params:
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        warmup = cfg.lr_warmup_steps
        self.optimizers = {
            "spatial": make_optimizer(self.spatial_params, cfg.spatial_learning_rate, cfg.weight_decay),
            "temporal": make_optimizer(self.temporal_params, cfg.learning_rate, cfg.weight_decay),
        }
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / (warmup + 1)))
                           for k, o in self.optimizers.items()}
        self._setup_noise_schedule()

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """Latents ``(variants, N, C, F, h, w)`` (variant 1: every frame mirrored) and prompt embeddings."""
        pipe, device = self.pipe, self.device
        vae = pipe.vae
        encoders = [m for name, m in self._models().items() if name not in ("unet", "vae")]
        vae.to(device)
        for m in encoders:
            m.to(device)
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        variants = [False, True] if self.config.hflip_prob > 0 else [False]
        latents: list[list[torch.Tensor]] = [[] for _ in variants]
        for i in range(len(self.dataset)):
            pixels = self.dataset.pixels(i).to(device, vae.dtype)  # (F, 3, R, R)
            for out, flipped in zip(latents, variants):
                source = pixels.flip(-1) if flipped else pixels
                frames = [vae.encode(source[s:s + _ENCODE_FRAMES]).latent_dist.mean
                          for s in range(0, len(source), _ENCODE_FRAMES)]
                out.append(((torch.cat(frames) - shift) * scaling).permute(1, 0, 2, 3))  # (C, F, h, w)
        dtype = pipe.unet.dtype
        self.latents = torch.stack([torch.stack(v) for v in latents]).to(dtype).contiguous()
        position = {p: i for i, p in enumerate(dict.fromkeys(self.prompts))}
        distinct = list(position)
        embeds = [pipe.encode_prompt(prompt=distinct[s:s + 8], device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0] for s in range(0, len(distinct), 8)]
        self.embeddings = torch.cat(embeds).to(dtype).contiguous()
        self.prompt_index = torch.tensor([position[p] for p in self.prompts], device=device)
        if device.type != "cpu":
            vae.to("cpu")
            for m in encoders:
                m.to("cpu")
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ data --

    def _draw(self) -> dict[str, torch.Tensor]:
        """Every random number of one step, drawn in a fixed order whether or not a path uses it."""
        cfg, gen = self.config, self.noise_gen
        batch = cfg.batch_size
        _, _, channels, frames, h, w = self.latents.shape
        u = torch.rand(batch, generator=gen)
        if cfg.timestep_bias:
            u = u.pow(4.0 ** (-cfg.timestep_bias))
        timesteps = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        noise = torch.randn((batch, channels, frames, h, w), generator=gen)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn(batch, channels, 1, 1, 1, generator=gen)
        return {
            "timesteps": timesteps,
            "noise": noise,
            "skip_spatial": torch.rand((), generator=gen) < cfg.spatial_skip_prob,
            "frame": torch.randint(frames, (batch,), generator=gen),
            "flip": torch.rand(batch, generator=gen) < cfg.hflip_prob,
            "fresh_noise": torch.randn((batch, channels, h, w), generator=gen),
            "anchor": torch.randint(frames, (batch,), generator=gen),
        }

    # ------------------------------------------------------------------------------------------------ step --

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _update(self, which: str, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        loss.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm, foreach=True)
        self.optimizers[which].step()
        self.schedulers[which].step()
        self.optimizers[which].zero_grad(set_to_none=True)

    def spatial_step(self, latents: torch.Tensor, draw: dict[str, torch.Tensor], embeds: torch.Tensor) -> float:
        """One frame per clip as a 1-frame clip through the image model (motion modules bypassed); steps only the
        spatial optimizer. ``latents`` is ``(variants, B, C, F, h, w)``."""
        device = self.device
        rows = torch.arange(latents.shape[1], device=device)
        frame, flip = draw["frame"].to(device), draw["flip"].to(device)
        variant = flip.long() if latents.shape[0] > 1 else torch.zeros_like(frame)
        picked = latents[variant, rows, :, frame]  # (B, C, h, w)
        noise = torch.where(flip.view(-1, 1, 1, 1), draw["fresh_noise"].to(device),
                            draw["noise"].to(device)[rows, :, frame])
        noisy, target = self._noisy_and_target(picked, draw["timesteps"].to(device), noise.to(picked.dtype))
        with temporal_bypassed(self.pipe.unet), self._autocast():
            pred = self.pipe.unet(noisy.unsqueeze(2), draw["timesteps"].to(device), embeds, return_dict=False)[0]
        loss = F.mse_loss(pred.float().squeeze(2), target.float())
        self._update("spatial", loss, self.spatial_params)
        return float(loss.detach())

    def temporal_step(self, latents: torch.Tensor, draw: dict[str, torch.Tensor], embeds: torch.Tensor) -> float:
        """The whole clip with the spatial LoRAs frozen (off when the spatial path was skipped); the debiased
        loss steps only the temporal optimizer. ``latents`` is ``(B, C, F, h, w)``."""
        device, frames = self.device, latents.shape[2]
        timesteps = draw["timesteps"].to(device)
        noisy, target = self._noisy_and_target(latents, timesteps, draw["noise"].to(device, latents.dtype))
        for p in self.spatial_params:
            p.requires_grad_(False)
        try:
            scale = 0.0 if bool(draw["skip_spatial"]) else 1.0
            with self.method.spatial_scaled(scale), self._autocast():
                # UNetMotionModel takes one text row per frame, a UNet3D one per clip (it repeats them itself)
                text = embeds if is_unet3d(self.pipe.unet) else embeds.repeat_interleave(frames, dim=0)
                pred = self.pipe.unet(noisy, timesteps, text, return_dict=False)[0]
            loss = debiased_loss(pred, target, draw["anchor"], self.config.debias_beta)
            self._update("temporal", loss, self.temporal_params)
        finally:
            for p in self.spatial_params:
                p.requires_grad_(True)
        return float(loss.detach())

    def _train_step(self) -> tuple[float, float]:
        index = torch.tensor(self._next_indices(), device=self.device)
        draw = self._draw()
        latents = self.latents[:, index]
        embeds = self.embeddings[self.prompt_index[index]]
        spatial = math.nan
        if not bool(draw["skip_spatial"]):
            spatial = self.spatial_step(latents, draw, embeds)
        temporal = self.temporal_step(latents[0], draw, embeds)
        return temporal, spatial

    # ------------------------------------------------------------------------------------------------- run --

    def run(self, resume_from: str | os.PathLike[str] | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (continuing from checkpoint ``resume_from`` if given).

        Raises ``JobCancelled`` as soon as the callback's ``should_stop`` says so; this run's checkpoints are
        then deleted.
        """
        cfg = self.config
        started = time.perf_counter()
        with self._pipeline_borrowed():
            self._seed_everything()
            self._setup()
            self.step, self.losses, self.spatial_losses = 0, [], []
            if resume_from is not None:
                self._load_checkpoint(Path(resume_from))
            try:
                with self._threads():
                    self._loop()
            except JobCancelled:
                if self.work_dir is not None:
                    shutil.rmtree(self.work_dir / CHECKPOINT_DIR, ignore_errors=True)
                raise
            preview = self._preview() if cfg.preview_every else None
            tensors = self.method.adapter_state_dict()
            metadata = self.method.adapter_metadata()
        return TrainResult(tensors=tensors, metadata=metadata, config=cfg.to_dict(), steps_done=self.step,
                           final_loss=self.losses[-1] if self.losses else math.nan, losses=list(self.losses),
                           seconds=time.perf_counter() - started, preview=preview)

    def _loop(self) -> None:
        cfg, callback = self.config, self.callback
        total = cfg.max_steps
        recent: deque[float] = deque(maxlen=10)
        while self.step < total:
            if callback.should_stop():
                raise JobCancelled(f"training stopped at step {self.step} of {total}")
            tick = time.perf_counter()
            loss, spatial = self._train_step()
            if not math.isfinite(loss) or not (math.isnan(spatial) or math.isfinite(spatial)):
                raise FloatingPointError(f"loss became {loss} (spatial {spatial}) at step {self.step + 1}; lower "
                                         "the learning rates")
            self.step += 1
            self.losses.append(loss)
            self.spatial_losses.append(spatial)
            recent.append(time.perf_counter() - tick)
            it_per_s = len(recent) / max(sum(recent), 1e-9)
            callback.on_step(self.step, total, loss, it_per_s, (total - self.step) / it_per_s)
            if self.step < total:
                requested = getattr(callback, "pending_requests", set)()
                periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if (periodic or "checkpoint" in requested) and self.work_dir is not None:
                    path = self._save_checkpoint()
                    callback.on_checkpoint(self.step, str(path))
                if (cfg.preview_every and self.step % cfg.preview_every == 0) or "preview" in requested:
                    self._preview()

    # --------------------------------------------------------------------------------------------- preview --

    def sample(self, prompt: str | None = None, steps: int | None = None,
               seed: int | None = None) -> list[Image.Image]:
        """A clip sampled with the adapter as it is now (spatial LoRAs at ``spatial_scale``), as PIL frames."""
        cfg, pipe, device = self.config, self.pipe, self.device
        encoders = [m for name, m in self._models().items() if name != "unet"]
        pipe.unet.eval()
        for m in encoders:
            m.to(device)
        try:
            generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
            with self.method.spatial_scaled(cfg.spatial_scale), torch.inference_mode():
                frames = pipe(prompt or self.preview_prompt, num_frames=cfg.num_frames,
                              num_inference_steps=steps or cfg.preview_steps, height=cfg.resolution,
                              width=cfg.resolution, generator=generator, output_type="pil").frames[0]
        finally:
            if device.type != "cpu":
                for m in encoders:
                    m.to("cpu")
            pipe.unet.train()
        return list(frames)

    def _preview(self) -> Image.Image:
        frames = self.sample()
        strip = frames_strip(frames)
        self.callback.on_preview(self.step, strip)
        on_frames = getattr(self.callback, "on_preview_frames", None)
        if callable(on_frames):
            on_frames(self.step, frames)
        return strip

    # ------------------------------------------------------------------------------------------ checkpoint --

    def _params(self) -> list[nn.Parameter]:
        return self.spatial_params + self.temporal_params

    def _save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXX/`` atomically (``training.checkpoints``), keep the latest ones."""
        assert self.work_dir is not None
        tensors = param_tensors(self._params())
        optimizers: dict[str, Any] = {}
        for which, optimizer in self.optimizers.items():
            optim_tensors, entry = optimizer_state(optimizer, f"optim.{which}.")
            tensors.update(optim_tensors)
            optimizers[which] = {**entry, "lr_scheduler": json_safe(self.schedulers[which].state_dict())}
        rng_tensors, rng_entry = rng_state(self.noise_gen)
        tensors.update(rng_tensors)
        info = {
            "format": CHECKPOINT_FORMAT,
            "kind": CHECKPOINT_KIND,
            "step": self.step,
            "method": self.method.registry_name,
            "config": self.config.to_dict(),
            "prompts": self.prompts,
            "dataset_size": len(self.dataset),
            "losses": self.losses,
            "spatial_losses": [None if math.isnan(x) else x for x in self.spatial_losses],
            "data": {"epoch": self.epoch, "offset": self.offset},
            "optimizers": optimizers,
            "n_spatial": len(self.spatial_params),
            "rng": rng_entry,
        }
        return write_checkpoint(self.work_dir, self.step, self.method, tensors, info)

    def _load_checkpoint(self, path: Path) -> None:
        info, tensors = read_checkpoint(path)
        if info.get("format") != CHECKPOINT_FORMAT or info.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{path}: not a motion training checkpoint of a supported format")
        check_method(path, info, self.method.registry_name)
        check_settings(path, info["config"], self.config.to_dict(), _RESUME_FREE)
        if info["dataset_size"] != len(self.dataset) or info["prompts"] != self.prompts:
            raise ValueError(f"{path}: the dataset (clips or captions) differs from the checkpoint's")
        if info["step"] > self.config.max_steps:
            raise ValueError(f"{path}: checkpoint is at step {info['step']}, beyond max_steps {self.config.max_steps}")
        restore_params(path, tensors, self._params(), layout_matches=info.get("n_spatial") == len(self.spatial_params))
        for which in _OPTIMIZERS:
            entry = info["optimizers"][which]
            load_optimizer_state(self.optimizers[which], tensors, f"optim.{which}.", entry)
            self.schedulers[which].load_state_dict(entry["lr_scheduler"])
        restore_rng(tensors, info["rng"], self.noise_gen)
        self.epoch, self.offset = info["data"]["epoch"], info["data"]["offset"]
        self.step = int(info["step"])
        self.losses = [float(x) for x in info["losses"]]
        self.spatial_losses = [math.nan if x is None else float(x) for x in info["spatial_losses"]]
