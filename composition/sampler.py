"""The project's one denoise loop, written over public diffusers pieces so composers can own the noise prediction.

With composer ``merge`` and no adapters it reproduces ``StableDiffusionPipeline.__call__`` for the same seed,
scheduler and settings: same prompt encoding, same initial noise order, same CFG batch, same decode.

A composer may leave results for the caller in ``ctx.state["report"]`` (a dict, e.g. CLoRA's final region masks);
``sample(..., report=d)`` copies it into ``d`` when the image is done.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from composition.base import AdapterSet, Composer, StepContext

SCHEDULERS: dict[str, type] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
_SCHEDULER_OVERRIDES: dict[str, dict[str, object]] = {"dpm++": {"algorithm_type": "dpmsolver++"}}
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SampleRequest:
    """One image to sample. ``width``/``height`` default to the UNet's native size; ``scheduler`` to the pipeline's."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(pipe, name: str | None = None):
    """A fresh scheduler for one call (``None``: the pipeline's own class), so the pipeline's stays untouched.

    Built from the pipeline's scheduler config exactly as it is: diffusers' ``from_config`` would otherwise reset
    the keys listed in ``_use_default_values`` to class defaults, even ones the pipeline patched after
    construction (``steps_offset``, ``clip_sample``).
    """
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
    config = {key: value for key, value in pipe.scheduler.config.items() if key != "_use_default_values"}
    if name is None:
        return type(pipe.scheduler).from_config(config)
    return SCHEDULERS[name].from_config(config, **_SCHEDULER_OVERRIDES.get(name, {}))


def default_size(pipe) -> tuple[int, int]:
    """The pipeline's native ``(height, width)``: UNet sample size times the VAE scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_request(pipe, request: SampleRequest) -> tuple[int, int]:
    """Refuse bad input with a clear ``ValueError`` (never silently fixed); return the ``(height, width)`` to use."""
    if not isinstance(request.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(request.prompt).__name__}")
    if not isinstance(request.negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, got {type(request.negative_prompt).__name__}")
    if not _is_int(request.seed) or not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer between 0 and {MAX_SEED}, got {request.seed!r}")
    if not _is_int(request.steps) or request.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {request.steps!r}")
    if not _is_real(request.guidance_scale) or request.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {request.guidance_scale!r}")
    if request.scheduler is not None and request.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {request.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    factor = pipe.vae_scale_factor
    default_h, default_w = default_size(pipe)
    height = default_h if request.height is None else request.height
    width = default_w if request.width is None else request.width
    for label, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < factor or value % factor:
            raise ValueError(f"{label} must be a positive multiple of {factor} (the VAE scale factor), got {value!r}")
    return int(height), int(width)


def _check_weights(adapters: AdapterSet, weights: dict[str, float]) -> dict[str, float]:
    if not isinstance(weights, dict):
        raise ValueError(f"weights must be a dict of adapter name to weight, got {type(weights).__name__}")
    known = adapters.names()
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; attached: {', '.join(known) or 'none'}")
    bad = [name for name, w in weights.items() if not _is_real(w)]
    if bad:
        listed = ", ".join(f"{name}={weights[name]!r}" for name in bad)
        raise ValueError(f"adapter weights must be finite numbers; bad: {listed}")
    return {name: float(w) for name, w in weights.items()}


def _step_kwargs(scheduler, generator: torch.Generator) -> dict[str, object]:
    """The same optional ``step`` arguments diffusers passes (``eta`` 0, the generator)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, object] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def sample(
    pipe,
    composer: Composer,
    adapters: AdapterSet,
    weights: dict[str, float],
    request: SampleRequest,
    on_step: Callable[[int, int], None] | None = None,
    report: dict[str, Any] | None = None,
) -> Image.Image:
    """Sample one image with ``composer`` deciding the noise prediction of every step.

    ``on_step(i, total)`` is called after step ``i`` (0-based) of ``total``; raising from it cancels: ``teardown``
    still runs and the exception propagates. The random stream is a CPU ``torch.Generator`` seeded with
    ``request.seed``, so a seed gives the same image on every run and device. ``report``, when given, receives
    what the composer left in ``ctx.state["report"]``.
    """
    if not isinstance(composer, Composer):
        raise TypeError(f"composer must be a Composer, got {type(composer).__name__}")
    if not isinstance(adapters, AdapterSet):
        raise TypeError(f"adapters must provide names() and apply(weights), got {type(adapters).__name__}")
    height, width = validate_request(pipe, request)
    weights = _check_weights(adapters, weights)
    scheduler = make_scheduler(pipe, request.scheduler)
    train_steps = scheduler.config.num_train_timesteps
    if request.steps > train_steps:
        raise ValueError(f"steps must be <= {train_steps} (the scheduler's training timesteps), got {request.steps}")

    grad_mode = torch.no_grad() if composer.requires_grad else torch.inference_mode()
    with grad_mode:
        latents = _denoise(pipe, composer, adapters, weights, request, scheduler, height, width, on_step, report)
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _denoise(pipe, composer, adapters, weights, request, scheduler, height, width, on_step, report) -> Tensor:
    unet = pipe.unet
    device = pipe._execution_device
    generator = torch.Generator().manual_seed(request.seed)
    time_cond_dim = unet.config.time_cond_proj_dim
    do_cfg = request.guidance_scale > 1 and time_cond_dim is None

    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else unet.dtype
    factor = pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, height // factor, width // factor)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma

    ctx = StepContext(
        pipe=pipe,
        adapters=adapters,
        weights=weights,
        scheduler=scheduler,
        generator=generator,
        guidance_scale=float(request.guidance_scale),
        do_cfg=do_cfg,
        timesteps=timesteps,
        total_steps=len(timesteps),
        latents=latents,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
    )
    timestep_cond = None
    if time_cond_dim is not None:
        guidance = torch.tensor(request.guidance_scale - 1).repeat(1)
        timestep_cond = pipe.get_guidance_scale_embedding(guidance, embedding_dim=time_cond_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=dtype)

    def unet_fn(sample: Tensor | None = None, encoder_hidden_states: Tensor | None = None) -> Tensor:
        embeds = ctx.encoder_hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return unet(
            ctx.model_input if sample is None else sample,
            ctx.timestep,
            encoder_hidden_states=embeds,
            timestep_cond=timestep_cond,
            return_dict=False,
        )[0]

    step_kwargs = _step_kwargs(scheduler, generator)
    total = ctx.total_steps
    try:
        composer.setup(ctx)
        ctx.ensure_active()
        cond, uncond = pipe.encode_prompt(request.prompt, device, 1, do_cfg, request.negative_prompt)
        ctx.prompt_embeds, ctx.negative_prompt_embeds = cond, uncond
        ctx.encoder_hidden_states = torch.cat([uncond, cond]) if do_cfg else cond
        for i, t in enumerate(timesteps):
            ctx.step, ctx.timestep = i, t
            composer.before_step(ctx)
            model_input = torch.cat([ctx.latents] * 2) if do_cfg else ctx.latents
            ctx.model_input = scheduler.scale_model_input(model_input, t)
            ctx.noise_pred = composer.predict_noise(ctx, unet_fn)
            ctx.latents = scheduler.step(ctx.noise_pred, t, ctx.latents, **step_kwargs, return_dict=False)[0]
            composer.after_step(ctx)
            if on_step is not None:
                on_step(i, total)
        if report is not None:
            report.update(ctx.state.get("report") or {})
        return ctx.latents
    finally:
        composer.teardown(ctx)
