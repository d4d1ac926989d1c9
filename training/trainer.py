"""The one training loop: any registered ``Method`` on a Stable-Diffusion-architecture pipeline.

Standard denoising objective (Ho et al., 2020): noise a latent to a random timestep with the DDPM schedule of the
pipeline's scheduler config and regress the UNet's output on the noise (or the velocity, for v-prediction) with
MSE. Only the method's parameters train; the VAE and text encoder(s) run once per image and prompt before the loop
(latents and embeddings are cached) and then leave the device. Resumable checkpoints hold everything the loop
needs to continue bit-for-bit: adapter parameters, optimizer and LR-schedule state, RNG states, data position.

Architectures: SD 1.x and 2.x (epsilon or v-prediction, from the scheduler config) and SDXL, whose UNet also takes
the pooled text embedding of its second text encoder and the size/crop conditioning (Podell et al., 2023,
https://arxiv.org/abs/2307.01952, §2.2); training images are square crops, so original size = target size =
the resolution and the crop corner is (0, 0).

Optional DreamBooth class-prior preservation (Ruiz et al., 2023, https://arxiv.org/abs/2208.12242): every step
adds a batch of the base model's own class images under the class prompt (see ``training.prior``), and the loss
is ``mse(subject) + prior_loss_weight · mse(class)``.

Data parallel (``accelerate launch`` or ``torchrun``, see docs/distributed.md): every process draws the same global
batch of ``batch_size × num_processes`` samples, timesteps and noise from the shared seeded streams and trains on
its own slice; the UNet is wrapped in ``DistributedDataParallel``, so the averaged gradient equals the gradient of
one process training on the whole global batch. The main process alone reports to the callback and writes
checkpoints and previews; its stop and on-demand decisions are broadcast, so every process acts on the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.base import JobCancelled, Method, MethodConfig, NullCallback, TrainerCallback, TrainResult
from training.checkpoints import (
    CHECKPOINT_DIR,
    check_method,
    check_settings,
    checkpoint_path,
    config_defaults,
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
from training.checkpoints import KEEP_CHECKPOINTS as KEEP_CHECKPOINTS  # re-exported: the trainer's public names
from training.checkpoints import checkpoint_dirs as checkpoint_dirs
from training.checkpoints import latest_checkpoint as latest_checkpoint
from training.data import ImageCaptionDataset, build_prompt, to_tensor
from training.prior import cached_class_images, images_digest

CHECKPOINT_FORMAT = 1
# Settings that may change between a checkpoint and its resumption without changing the result.
_RESUME_FREE = {"max_steps", "checkpoint_every", "preview_every", "preview_prompt", "preview_steps"}
_ENCODE_BATCH = 8
SMALL_UNET_PARAMS = 20_000_000
_ACCELERATE_ATTRS = ("forward", "_original_forward", "_is_accelerate_prepared")  # set on the UNet by prepare()
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_SDXL_TIME_IDS = 6  # original height and width, crop top and left, target height and width
log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "no") -> Any:
    """An ``Accelerator`` on CUDA when present, else CPU, with ``mixed_precision`` autocast.

    Launched by ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group: NCCL on
    CUDA, gloo on CPU; ``prepare`` then wraps the UNet in ``DistributedDataParallel``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("mixed_precision 'fp16' needs a CUDA device; use 'no' or 'bf16' on CPU")
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()  # one trainer at a time; each run picks its own precision
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision)


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW (``weight_decay`` 0.01 is its default), fused where this torch build supports it for these tensors,
    else multi-tensor (foreach)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _text_encoders(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's text encoders by attribute name: one for SD 1.x/2.x, two for SDXL."""
    return {name: m for name in _TEXT_ENCODERS if isinstance(m := getattr(pipe, name, None), nn.Module)}


def uses_text_time(unet: nn.Module) -> bool:
    """True for SDXL-style UNets, which also take pooled text embeddings and size/crop ids."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


class SeededLoop:
    """What every training loop here shares: seeding all generators from ``config.seed``, running on the right
    number of CPU threads (``cpu_threads``; None: one thread for small UNets, which gain nothing from more),
    borrowing the pipeline, the DDPM noise schedule and the seeded order of the data."""

    config: Any
    pipe: Any
    method: Any
    dataset: Any
    device: Any
    cpu_threads: int | None
    keep_adapter: bool
    world: int = 1  # processes sharing each global batch

    def _seed_everything(self) -> None:
        seed = self.config.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        wanted = self.cpu_threads
        if wanted is None:
            small = sum(p.numel() for p in self.pipe.unet.parameters()) < SMALL_UNET_PARAMS
            wanted = 1 if small else before
        if self.device.type != "cpu" or wanted == before:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _models(self) -> dict[str, nn.Module]:
        """The pipeline's models by attribute name: the UNet, the VAE and the text encoder(s)."""
        return {"unet": self.pipe.unet, "vae": self.pipe.vae, **_text_encoders(self.pipe)}

    @contextlib.contextmanager
    def _pipeline_borrowed(self) -> Iterator[None]:
        """Freeze the pipeline for training and put back everything touched, whatever happens."""
        pipe = self.pipe
        models = self._models()
        grad_flags = {id(p): (p, p.requires_grad) for m in models.values() for p in m.parameters()}
        modes = {name: m.training for name, m in models.items()}
        devices = {name: next(m.parameters()).device for name, m in models.items()}
        unet_attrs = {k for k in _ACCELERATE_ATTRS if k in pipe.unet.__dict__}
        checkpointing = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))
        progress = dict(getattr(pipe, "_progress_bar_config", {}) or {})
        try:
            for m in models.values():
                m.requires_grad_(False)
                m.eval()
            pipe.set_progress_bar_config(disable=True)
            yield
        finally:
            if not self.keep_adapter:
                self.method.remove()
            for key in _ACCELERATE_ATTRS:
                if key not in unet_attrs:
                    pipe.unet.__dict__.pop(key, None)
            if self.config.gradient_checkpointing and not checkpointing:
                pipe.unet.disable_gradient_checkpointing()
            for p, flag in grad_flags.values():
                p.requires_grad_(flag)
            for name, m in models.items():
                m.train(modes[name])
                if next(m.parameters()).device != devices[name]:
                    m.to(devices[name])
            pipe._progress_bar_config = progress

    def _setup_noise_schedule(self) -> None:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        alphas = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.sqrt_alpha = alphas.sqrt()
        self.sqrt_one_minus_alpha = (1.0 - alphas).sqrt()

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def _next_indices(self) -> list[int]:
        """The next global batch (``batch_size`` samples per process) of an endless stream of per-epoch shuffles."""
        out: list[int] = []
        n = len(self.dataset)
        wanted = self.config.batch_size * self.world
        while len(out) < wanted:
            if self.offset >= n:
                self.epoch, self.offset = self.epoch + 1, 0
            take = min(wanted - len(out), n - self.offset)
            out.extend(int(i) for i in self._permutation(self.epoch)[self.offset:self.offset + take])
            self.offset += take
        return out

    def _noisy_and_target(self, latents: torch.Tensor, timesteps: torch.Tensor,
                          noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised latents at ``timesteps`` and what the UNet should predict (by the schedule's prediction type)."""
        shape = (-1,) + (1,) * (latents.ndim - 1)
        a = self.sqrt_alpha[timesteps].view(shape)
        b = self.sqrt_one_minus_alpha[timesteps].view(shape)
        noisy = (a * latents + b * noise).to(latents.dtype)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, a * noise - b * latents
        return noisy, latents


class Trainer(SeededLoop):
    """Trains ``method`` on ``dataset`` with ``pipe``'s frozen base model; ``run()`` returns a ``TrainResult``.

    The pipeline is left as it was found (adapter removed, devices, train/eval modes and ``requires_grad`` flags
    restored) unless ``keep_adapter`` is set, in which case the trained adapter stays in ``pipe.unet``.

    On CPU the loop runs with ``cpu_threads`` intra-op threads; by default 1 for small UNets, whose kernels are
    too small to gain from splitting and lose much when the cores are shared, else torch's setting.
    """

    def __init__(self, method: Method, pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig | None = None,
                 trigger_word: str = "", callback: TrainerCallback | None = None,
                 work_dir: str | os.PathLike[str] | None = None, *, kind: str = "subject",
                 keep_adapter: bool = False, cpu_threads: int | None = None) -> None:
        config = method.config if config is None else config
        if config.to_dict() != method.config.to_dict():
            raise ValueError("config differs from the method's own config; build the method from this config")
        config.validate()
        if dataset.resolution != config.resolution:
            raise ValueError(f"dataset resolution {dataset.resolution} differs from config resolution "
                             f"{config.resolution}")
        if config.prior_preservation and kind != "subject":
            raise ValueError(f"prior_preservation only applies to subjects (kind 'subject'), not kind {kind!r}; "
                             "turn it off")
        self.method = method
        self.pipe = pipe
        self.dataset = dataset
        self.config = config
        self.trigger_word = trigger_word
        self.kind = kind
        self.callback: TrainerCallback = callback or NullCallback()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.keep_adapter = keep_adapter
        self.cpu_threads = cpu_threads
        self.prompts = [build_prompt(c, trigger_word, kind) for c in dataset.captions]
        first = dataset.captions[0] if dataset.captions else ""
        self.preview_prompt = config.preview_prompt.strip() or build_prompt(first, trigger_word, "subject")
        self.rank, self.world, self.is_main = 0, 1, True  # this process among the launched ones; set in _setup

    # ----------------------------------------------------------------------------------------------- setup --

    def _setup(self) -> None:
        cfg = self.config
        unet = self.pipe.unet
        self.accelerator = make_accelerator(cfg.mixed_precision)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.class_digest: str | None = None
        images = self._class_images() if cfg.prior_preservation else None
        self._cache_inputs(images)
        params = self.method.inject(unet)
        if not params:
            raise ValueError(f"{type(self.method).__name__}.inject returned no trainable parameters")
        for p in params:
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()
        self.params = params
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = make_optimizer(params, cfg.learning_rate)
        warmup = cfg.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, schedule)
        self._setup_noise_schedule()

    def _class_images(self) -> list[Image.Image]:
        """The base model's class images (generated before the adapter exists, or read from the work folder)."""
        cfg, pipe = self.config, self.pipe
        for m in (pipe.unet, pipe.vae, *_text_encoders(pipe).values()):
            m.to(self.device)

        def progress(done: int, total: int) -> None:
            log.info("prior preservation: class image %d of %d", done, total)
            if self.callback.should_stop():
                raise JobCancelled(f"training stopped while generating class image {done} of {total}")

        images = None
        if self.is_main:
            images = cached_class_images(pipe, cfg.class_prompt.strip(), cfg.num_class_images, cfg.seed,
                                         cfg.resolution, cfg.class_image_steps, self.work_dir, progress)
        if self.world > 1:
            images = self._broadcast_images(images)
        assert images is not None
        self.class_digest = images_digest(images)
        return images

    def _broadcast_images(self, images: list[Image.Image] | None) -> list[Image.Image]:
        """The main process's class images on every process, sent as pixels (generated once, same everywhere)."""
        from accelerate.utils import broadcast

        cfg = self.config
        shape = (cfg.num_class_images, cfg.resolution, cfg.resolution, 3)
        if images is not None:
            pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
            if tuple(pixels.shape) != shape:
                raise ValueError(f"class images have shape {tuple(pixels.shape)}, expected {shape}")
        else:
            pixels = torch.zeros(shape, dtype=torch.uint8)
        pixels = broadcast(pixels.to(self.device), from_process=0).cpu()
        return [Image.fromarray(a) for a in pixels.numpy()]

    @torch.no_grad()
    def _encode_images(self, count: int, image_at: Callable[[int], Image.Image]) -> torch.Tensor:
        """Scaled VAE latents ``(variants, count, C, h, w)``; variant 1 is the mirror image (when flipping)."""
        vae = self.pipe.vae
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        variants = [False, True] if self.config.flip else [False]
        latents: list[list[torch.Tensor]] = [[] for _ in variants]
        for start in range(0, count, _ENCODE_BATCH):
            stop = min(start + _ENCODE_BATCH, count)
            pixels = torch.stack([to_tensor(image_at(i)) for i in range(start, stop)])
            pixels = pixels.to(self.device, vae.dtype)
            for out, flipped in zip(latents, variants):
                out.append(vae.encode(pixels.flip(-1) if flipped else pixels).latent_dist.mean)
        return ((torch.stack([torch.cat(v) for v in latents]) - shift) * scaling).to(self.pipe.unet.dtype)

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings ``(P, L, D)`` and, for SDXL, pooled embeddings ``(P, D2)`` (else None)."""
        embeds, pooled = [], []
        for i in range(0, len(prompts), _ENCODE_BATCH):
            out = self.pipe.encode_prompt(prompt=prompts[i:i + _ENCODE_BATCH], device=self.device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=False)
            embeds.append(out[0])
            if len(out) == 4:  # SDXL: (embeds, negative embeds, pooled, negative pooled)
                pooled.append(out[2])
        dtype = self.pipe.unet.dtype
        return (torch.cat(embeds).to(dtype).contiguous(),
                torch.cat(pooled).to(dtype).contiguous() if pooled else None)

    def _time_ids(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """SDXL's size/crop conditioning of a square crop, one row ``(1, 6)``; None for other UNets."""
        unet = self.pipe.unet
        if not uses_text_time(unet):
            return None
        if pooled is None:
            raise ValueError(f"the UNet takes pooled text embeddings (addition_embed_type 'text_time') but "
                             f"{type(self.pipe).__name__}.encode_prompt gives none; load it as an SDXL pipeline")
        expected = unet.add_embedding.linear_1.in_features
        got = unet.config.addition_time_embed_dim * _SDXL_TIME_IDS + pooled.shape[-1]
        if expected != got:
            raise ValueError(f"the UNet's added embedding takes {expected} values but SDXL size/crop ids and pooled "
                             f"text give {got}; only SDXL base UNets (not the refiner) are supported")
        res = self.config.resolution
        return torch.tensor([[res, res, 0, 0, res, res]], device=self.device, dtype=unet.dtype)

    @torch.no_grad()
    def _cache_inputs(self, class_images: list[Image.Image] | None = None) -> None:
        """Encode every image (and its mirror image when flipping), every distinct prompt and any class images."""
        pipe, device = self.pipe, self.device
        pipe.vae.to(device)
        encoders = _text_encoders(pipe)
        for m in encoders.values():
            m.to(device)
        self.latents = self._encode_images(len(self.dataset), self.dataset.image)
        position = {p: i for i, p in enumerate(dict.fromkeys(self.prompts))}
        self.embeddings, self.pooled = self._encode_prompts(list(position))
        self.prompt_index = torch.tensor([position[p] for p in self.prompts], device=device)
        self.time_ids = self._time_ids(self.pooled)
        self.class_latents = self.class_embedding = self.class_pooled = None
        if class_images is not None:
            self.class_latents = self._encode_images(len(class_images), class_images.__getitem__)
            self.class_embedding, self.class_pooled = self._encode_prompts([self.config.class_prompt.strip()])
        if device.type != "cpu":
            pipe.vae.to("cpu")
            for m in encoders.values():
                m.to("cpu")
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ data --

    def _share(self, count: int) -> slice:
        """This process's contiguous slice of a global batch of ``count`` rows."""
        per = count // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    # ------------------------------------------------------------------------------------------------ loop --

    def _sample_timesteps(self, batch: int) -> torch.Tensor:
        u = torch.rand(batch, generator=self.noise_gen)
        if self.config.timestep_bias:
            u = u.pow(4.0 ** (-self.config.timestep_bias))
        return (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)

    def _draw(self, latents: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pick ``latents[variant, index]`` (a random mirror image when flipping), timesteps and noise.

        Every process draws the random numbers of the whole global batch ``index`` (so the shared generator stays
        in step) and keeps its own share of the rows.
        """
        cfg, device = self.config, self.device
        batch = len(index)
        variant = (torch.rand(batch, generator=self.noise_gen) < 0.5).long() if cfg.flip else torch.zeros_like(index)
        timesteps = self._sample_timesteps(batch)
        noise = torch.randn((batch, *latents.shape[2:]), generator=self.noise_gen, dtype=torch.float32)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn(batch, latents.shape[2], 1, 1, generator=self.noise_gen)
        mine = self._share(batch)
        picked = latents[variant[mine].to(device), index[mine].to(device)]
        return picked, timesteps[mine].to(device), noise[mine].to(device, picked.dtype)

    def _batch(self) -> tuple[torch.Tensor, ...]:
        """Latents, timesteps, noise, text embeddings and pooled embeddings (or None) of this step's UNet call.

        With prior preservation the subject batch is followed by as many class samples, drawn after it from the
        same generator. With several processes, each gets its share of the subject and of the class samples.
        """
        index = torch.tensor(self._next_indices())
        latents, timesteps, noise = self._draw(self.latents, index)
        rows = self.prompt_index[index[self._share(len(index))].to(self.device)]
        embeds = self.embeddings[rows]
        pooled = self.pooled[rows] if self.pooled is not None else None
        if self.class_latents is not None:
            count = self.class_latents.shape[1]
            class_index = torch.randint(count, (len(index),), generator=self.noise_gen)
            c_latents, c_timesteps, c_noise = self._draw(self.class_latents, class_index)
            latents, timesteps = torch.cat([latents, c_latents]), torch.cat([timesteps, c_timesteps])
            noise = torch.cat([noise, c_noise])
            embeds = torch.cat([embeds, self.class_embedding.expand(len(c_latents), -1, -1)])
            if pooled is not None:
                pooled = torch.cat([pooled, self.class_pooled.expand(len(c_latents), -1)])
        return latents, timesteps, noise, embeds, pooled

    def _train_step(self) -> float:
        cfg = self.config
        latents, timesteps, noise, embeds, pooled = self._batch()
        noisy, target = self._noisy_and_target(latents, timesteps, noise)
        kwargs: dict[str, Any] = {}
        if self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(noisy), -1)}
        self.method.on_timesteps(timesteps)
        pred = self.unet(noisy, timesteps, embeds, return_dict=False, **kwargs)[0]
        if self.class_latents is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            pred_subject, pred_class = pred.float().chunk(2)
            target_subject, target_class = target.float().chunk(2)
            loss = F.mse_loss(pred_subject, target_subject) + cfg.prior_loss_weight * F.mse_loss(pred_class,
                                                                                                  target_class)
        self.accelerator.backward(loss)
        if cfg.max_grad_norm > 0:
            if self.accelerator.scaler is not None:
                self.accelerator.unscale_gradients()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:  # the loss of the global batch: the mean of the processes' equal-sized shares
            return float(self.accelerator.reduce(loss.detach().clone(), reduction="mean"))
        return float(loss.detach())

    def run(self, resume_from: str | os.PathLike[str] | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (continuing from checkpoint ``resume_from`` if given).

        Raises ``JobCancelled`` as soon as the callback's ``should_stop`` says so; then no result exists and this
        run's checkpoints are deleted.
        """
        cfg = self.config
        started = time.perf_counter()
        with self._pipeline_borrowed():
            self._seed_everything()
            self._setup()
            self.step, self.losses = 0, []
            if resume_from is not None:
                self._load_checkpoint(Path(resume_from))
            try:
                with self._threads():
                    self._loop()
            except JobCancelled:
                if self.work_dir is not None and self.is_main:
                    shutil.rmtree(self.work_dir / CHECKPOINT_DIR, ignore_errors=True)
                raise
            preview = self._preview() if cfg.preview_every and self.is_main else None
            tensors = self.method.adapter_state_dict()
            metadata = self.method.adapter_metadata()
            self.accelerator.free_memory()
        return TrainResult(
            tensors=tensors,
            metadata=metadata,
            config=cfg.to_dict(),
            steps_done=self.step,
            final_loss=self.losses[-1] if self.losses else math.nan,
            losses=list(self.losses),
            seconds=time.perf_counter() - started,
            preview=preview,
        )

    def _loop(self) -> None:
        cfg, callback = self.config, self.callback
        total = cfg.max_steps
        recent: deque[float] = deque(maxlen=10)
        main = self.is_main
        while self.step < total:
            (stop,) = self._agree(main and callback.should_stop())
            if stop:
                raise JobCancelled(f"training stopped at step {self.step} of {total}")
            tick = time.perf_counter()
            loss = self._train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step + 1}; lower the learning rate")
            self.step += 1
            self.losses.append(loss)
            recent.append(time.perf_counter() - tick)
            it_per_s = len(recent) / max(sum(recent), 1e-9)
            if main:
                callback.on_step(self.step, total, loss, it_per_s, (total - self.step) / it_per_s)
            if self.step < total:
                requested = getattr(callback, "pending_requests", set)() if main else set()
                want_checkpoint, want_preview = self._agree("checkpoint" in requested, "preview" in requested)
                periodic_checkpoint = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if (periodic_checkpoint or want_checkpoint) and self.work_dir is not None:
                    path = self._checkpoint()
                    if main:
                        callback.on_checkpoint(self.step, str(path))
                if main and ((cfg.preview_every and self.step % cfg.preview_every == 0) or want_preview):
                    self._preview()

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """The main process's ``flags`` on every process (one broadcast), so all of them act on the same step."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        from accelerate.utils import broadcast

        sent = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        return tuple(bool(v) for v in broadcast(sent, from_process=0).tolist())

    # --------------------------------------------------------------------------------------------- preview --

    def _preview(self) -> Image.Image:
        """A short fixed-seed sample with the adapter active, handed to ``callback.on_preview``."""
        pipe, unet, device = self.pipe, self.pipe.unet, self.device
        unet.eval()
        encoders = _text_encoders(pipe).values()
        pipe.vae.to(device)
        for m in encoders:
            m.to(device)
        try:
            generator = torch.Generator().manual_seed(self.config.seed)
            with torch.inference_mode():
                image = pipe(self.preview_prompt, num_inference_steps=self.config.preview_steps,
                             height=self.config.resolution, width=self.config.resolution,
                             generator=generator).images[0]
        finally:
            if device.type != "cpu":
                pipe.vae.to("cpu")
                for m in encoders:
                    m.to("cpu")
            unet.train()
        self.callback.on_preview(self.step, image)
        return image

    # ------------------------------------------------------------------------------------------ checkpoint --

    def _checkpoint(self) -> Path:
        """Save a checkpoint on the main process while the others wait; every process gets its path."""
        self.accelerator.wait_for_everyone()
        path = self._save_checkpoint() if self.is_main else self._checkpoint_path()
        self.accelerator.wait_for_everyone()
        return path

    def _checkpoint_path(self) -> Path:
        assert self.work_dir is not None
        return checkpoint_path(self.work_dir, self.step)

    def _save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXX/`` atomically (``training.checkpoints``), keep the latest ones."""
        assert self.work_dir is not None
        optim_tensors, optim_entry = optimizer_state(self.optimizer, "optim.")
        rng_tensors, rng_entry = rng_state(self.noise_gen)
        info = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "method": self._method_name(),
            "config": self.config.to_dict(),
            "dataset_size": len(self.dataset),
            "num_processes": self.world,
            "prompts": self.prompts,
            "losses": self.losses,
            "class_images": self.class_digest,
            "data": {"epoch": self.epoch, "offset": self.offset},
            "optimizer": optim_entry,
            "lr_scheduler": json_safe(self.lr_scheduler.state_dict()),
            "rng": rng_entry,
        }
        tensors = {**param_tensors(self.params), **optim_tensors, **rng_tensors}
        return write_checkpoint(self.work_dir, self.step, self.method, tensors, info)

    def _method_name(self) -> str:
        return getattr(self.method, "registry_name", type(self.method).__name__)

    def _load_checkpoint(self, path: Path) -> None:
        info, tensors = read_checkpoint(path)
        if info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {info.get('format')!r} is not supported")
        check_method(path, info, self._method_name())
        # settings added since the checkpoint was written count as their defaults
        check_settings(path, {**config_defaults(type(self.config)), **info["config"]}, self.config.to_dict(),
                       _RESUME_FREE)
        saved_world = int(info.get("num_processes", 1))
        if saved_world != self.world:
            raise ValueError(f"{path}: checkpoint of a run on {saved_world} process(es) (a global batch of "
                             f"{saved_world}×batch_size); this run has {self.world}; resume it with "
                             f"{saved_world} process(es)")
        if info["dataset_size"] != len(self.dataset) or info["prompts"] != self.prompts:
            raise ValueError(f"{path}: the dataset (images or captions) differs from the checkpoint's")
        if info.get("class_images") != self.class_digest:
            raise ValueError(f"{path}: the class images for prior preservation differ from the checkpoint's (the base "
                             "model changed or they were regenerated on other hardware); start the training over")
        if info["step"] > self.config.max_steps:
            raise ValueError(f"{path}: checkpoint is at step {info['step']}, beyond max_steps {self.config.max_steps}")
        restore_params(path, tensors, self.params)
        load_optimizer_state(self.optimizer, tensors, "optim.", info["optimizer"])
        self.lr_scheduler.load_state_dict(info["lr_scheduler"])
        restore_rng(tensors, info["rng"], self.noise_gen)
        self.epoch, self.offset = info["data"]["epoch"], info["data"]["offset"]
        self.step = int(info["step"])
        self.losses = [float(x) for x in info["losses"]]
