"""Training speed: the trainer against a straightforward diffusers + peft loop on the same model and data.

The baseline is what diffusers' ``train_text_to_image_lora`` example does, on accelerate: a DataLoader reading
and transforming the images, the VAE and the text encoder run on every step, peft's LoRA forward, default
``torch.optim.AdamW``, gradient clipping and a constant LR schedule. Both loops use the same LoRA (rank, alpha,
targets), batch and resolution. Steps/s come from the median step time after a warm-up, excluding one-time setup
(for the trainer: the caching pass), best of a few alternating rounds, so a shared machine hurts both alike.
By default each loop keeps its own thread setting (torch's for the baseline, the trainer's CPU policy for the
trainer); ``--threads N`` pins both.

    .venv/bin/python -m training.bench [--threads N] [--rounds R] [--steps S]
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import training.methods  # noqa: F401  (registers the methods)
from training.base import METHODS, MethodConfig
from training.data import ImageCaptionDataset, build_prompt
from training.trainer import Trainer, make_accelerator

BASELINE_ADAPTER = "bench_baseline"


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


def baseline_steps_per_s(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str = "sks",
                         steps: int = 30, warmup: int = 5, threads: int | None = None) -> float:
    """Steps/s of a plain uncached diffusers + peft LoRA loop (the pipeline is restored afterwards).

    ``threads``: torch intra-op threads for the run (default: leave torch's setting).
    """
    from peft import LoraConfig

    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    flags = {p: p.requires_grad for m in (unet, vae, text_encoder) for p in m.parameters()}
    mode = unet.training
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.effective_alpha, init_lora_weights="gaussian",
                                target_modules=list(config.target_modules)), adapter_name=BASELINE_ADAPTER)
    try:
        with _torch_threads(threads):
            stamps = _baseline_loop(pipe, dataset, config, trigger_word, steps + warmup + 1)
        return _rate(stamps, warmup)
    finally:
        unet.delete_adapters(BASELINE_ADAPTER)
        unet.train(mode)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _baseline_loop(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str,
                   total: int) -> list[float]:
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
    return stamps


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


def trainer_steps_per_s(pipe: Any, dataset: ImageCaptionDataset, config: MethodConfig, trigger_word: str = "sks",
                        steps: int = 30, warmup: int = 5, method: str = "lora", threads: int | None = None) -> float:
    """Steps/s of ``Trainer`` running ``method`` (no previews or checkpoints; setup and caching excluded).

    ``threads``: the trainer's ``cpu_threads`` (default: its own choice).
    """
    data = {**config.to_dict(), "max_steps": steps + warmup + 1, "preview_every": 0, "checkpoint_every": 0}
    method_cls = METHODS.get(method)
    method_config = method_cls.config_cls.from_dict(data)
    callback = _Stamps()
    Trainer(method_cls(method_config), pipe, dataset, method_config, trigger_word, callback, cpu_threads=threads).run()
    return _rate(callback.stamps, warmup)


def make_images(folder: Path, count: int = 4, size: int = 64) -> list[tuple[Path, str]]:
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
    """Best-of-``rounds`` steps/s of the baseline and the trainer, alternating, and their ratio.

    ``threads`` pins both loops to that many torch threads; by default each uses its own setting (torch's for
    the baseline, the trainer's policy for the trainer).
    """
    from core.builtin import build_pipeline

    pipe = pipe if pipe is not None else build_pipeline()
    config = MethodConfig(batch_size=batch_size, resolution=resolution)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = ImageCaptionDataset(make_images(Path(tmp), size=resolution), resolution)
        base, ours = [], []
        for _ in range(rounds):
            base.append(baseline_steps_per_s(pipe, dataset, config, steps=steps, threads=threads))
            ours.append(trainer_steps_per_s(pipe, dataset, config, steps=steps, method=method, threads=threads))
    return {"baseline_steps_per_s": max(base), "trainer_steps_per_s": max(ours), "speedup": max(ours) / max(base)}


def main() -> None:
    import argparse
    import warnings

    parser = argparse.ArgumentParser(description="Trainer vs plain diffusers+peft loop, steps/s on the tiny model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="pin both loops to this many torch threads")
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    result = compare(rounds=args.rounds, steps=args.steps, method=args.method, threads=args.threads)
    print(f"torch threads (default): {torch.get_num_threads()}, pinned: {args.threads}")
    for key, value in result.items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
