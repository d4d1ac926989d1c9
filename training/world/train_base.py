"""Train the built-in world base model: first the VAE, then the UNet and text encoder on the VAE's latents.

Run ``python -m training.world.train_base --work DIR --out DIR`` (or ``lorastudio world train-base``). Each stage
checkpoints into ``--work`` every ``checkpoint_every`` steps (atomically) and resumes from there when started
again with the same settings; ``--out`` receives the finished diffusers pipeline (fp16 weights), its
``training.json`` (settings, stage times, hardware) and ``metrics.json`` (the detector's verdict on generations).

The architecture is the built-in one of ``core.builtin`` (the same UNet and text encoder every test uses), with a
tokenizer capped at ``max_tokens`` (world captions are shorter than 25 tokens) and a multistep DPM-Solver++
scheduler, so 20 sampling steps suffice. Only held-in concepts are rendered for training; colour permutations
widen the VAE's palette so that held-out subjects (grey, cyan, brown, cream parts) survive its round trip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.world.dataset import base_dataset

STAGES = ("vae", "decoder", "unet")


@dataclass(frozen=True)
class BaseSettings:
    """Everything that shapes the result; a checkpoint is resumed only under the same settings."""

    seed: int = 0
    pool: int = 60_000  # rendered base images (the VAE uses the first ``vae_pool``)
    vae_pool: int = 20_000
    vae_steps: int = 1_500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_object_weight: float = 9.0  # extra loss weight on object pixels (objects are small next to the background)
    vae_recolour: float = 0.3  # share of VAE batches' images whose colours are permuted/inverted
    vae_logvar_init: float = -6.0  # start with little posterior noise, so reconstruction can be learned at once
    vae_stop: int = 0  # stop the VAE stage after this many steps (0: run all ``vae_steps``); the schedule is kept
    decoder_steps: int = 0  # then tune the decoder alone on the encoder's latents (the UNet's latents stay put)
    decoder_batch: int = 32
    decoder_lr: float = 2e-4
    decoder_object_weight: float = 24.0
    unet_stop: int = 0  # likewise for the UNet stage: a time-boxed run, continued later from its checkpoint
    unet_steps: int = 8_000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    snr_gamma: float = 5.0
    max_tokens: int = 32
    checkpoint_every: int = 250
    eval_every: int = 1_000
    eval_prompts: int = 64
    guidance: float = 4.0
    threads: int = 2
    init_from: str = ""  # a world pipeline folder (e.g. the shipped one) to start every stage from: continue training

    def stage_key(self, stage: str) -> dict[str, Any]:
        """The settings a stage's checkpoint depends on (evaluation and checkpoint cadence excluded)."""
        skip = {"checkpoint_every", "eval_every", "eval_prompts", "guidance", "threads", "vae_stop", "unet_stop"}
        unet_only = {f.name for f in fields(self) if f.name.startswith("unet_")} | {"warmup", "ema_decay",
                                                                                    "cond_dropout", "snr_gamma"}
        decoder_only = {f.name for f in fields(self) if f.name.startswith("decoder_")}
        if stage == "vae":
            skip |= unet_only | decoder_only
        elif stage == "decoder":
            skip |= unet_only
        else:  # the UNet learns the encoder's latents: the decoder's tuning does not concern it
            skip |= decoder_only
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---------------------------------------------------------------- data


def _render(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    seed, start, count = args
    ds = base_dataset(start + count, seed=seed)
    items = [ds[i] for i in range(start, start + count)]
    masks = np.stack([s.masks.max(axis=0) for s in items])  # where any object is, 0..255
    return np.stack([s.pixels for s in items]), masks, [s.caption for s in items]


def render_pool(settings: BaseSettings, work: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rendered training images (cached in ``work``): pixels, the union of their objects' masks, captions."""
    cache = work / f"pool-{settings.seed}-{settings.pool}.npz"
    if cache.is_file():
        data = np.load(cache)
        if "masks" in data:
            return data["pixels"], data["masks"], json.loads(str(data["captions"]))
    chunk = 2_000
    jobs = [(settings.seed, s, min(chunk, settings.pool - s)) for s in range(0, settings.pool, chunk)]
    pixels, masks, captions = [], [], []
    with ProcessPoolExecutor(max_workers=max(1, settings.threads)) as pool:
        for i, (p, m, c) in enumerate(pool.map(_render, jobs)):
            pixels.append(p)
            masks.append(m)
            captions += c
            if progress:
                print(f"rendered {min((i + 1) * chunk, settings.pool)}/{settings.pool}", flush=True)
    out, out_masks = np.concatenate(pixels), np.concatenate(masks)
    _atomic_npz(cache, pixels=out, masks=out_masks, captions=np.array(json.dumps(captions)))
    return out, out_masks, captions


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def recolour(x: torch.Tensor, generator: torch.Generator, share: float = 1.0) -> torch.Tensor:
    """Channel permutations and inversions for ``share`` of the images: the VAE sees colours beyond the world's
    eight."""
    b = x.shape[0]
    perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])
    keep = torch.rand(b, generator=generator) >= share
    perms[keep] = torch.arange(3)
    x = torch.gather(x, 1, perms[:, :, None, None].expand_as(x))
    invert = (torch.rand(b, generator=generator) < 0.25) & ~keep
    return torch.where(invert[:, None, None, None], -x, x)


# ---------------------------------------------------------------- checkpoints


def _save(path: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)  # our own checkpoint, written and read only by this script
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)  # our own checkpoint in the work folder, never an upload
    if state.get("key") != key:
        raise ValueError(f"{path} was made with other settings; use another --work folder or the same settings")
    return state


def _resume_vae(path: Path, key: dict[str, Any], vae: torch.nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator) -> tuple[dict[str, Any] | None, int]:
    """Restore a VAE stage (weights, optimizer, data generator) from its checkpoint when there is one; returns
    (the checkpoint or ``None``, the step to continue from)."""
    state = _load(path, key)
    if state is None:
        return None, 0
    vae.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return state, state["step"]


def _warm_start(model: torch.nn.Module, folder: str, component: str) -> bool:
    """Load ``folder/component``'s safetensors weights into ``model`` (same architecture) when ``folder`` has them;
    a folder without that component leaves ``model`` as it is (e.g. a VAE-only progress folder)."""
    if not folder:
        return False
    if not Path(folder).is_dir():
        raise ValueError(f"--init-from {folder}: no such folder")
    from safetensors.torch import load_file

    files = sorted((Path(folder) / component).glob("*.safetensors"))
    if not files:
        return False
    state = {k: v.float() for f in files for k, v in load_file(f).items()}
    model.load_state_dict(state, strict=True)
    return True


# ---------------------------------------------------------------- VAE


def train_vae(settings: BaseSettings, work: Path, pixels: np.ndarray, masks: np.ndarray, progress: bool = True):
    """Train the AutoencoderKL; returns it with ``scaling_factor`` set so scaled latents have unit variance."""
    from diffusers import AutoencoderKL

    from core.builtin import VAE_CONFIG

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():  # the posterior's log-variance is the second half of quant_conv's output
        vae.quant_conv.bias[vae.config.latent_channels:] = settings.vae_logvar_init
    _warm_start(vae, settings.init_from, "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    path = work / "vae.ckpt"
    key = settings.stage_key("vae")
    gen = torch.Generator().manual_seed(settings.seed)
    state, step = _resume_vae(path, key, vae, opt, gen)
    last = min(settings.vae_steps, settings.vae_stop or settings.vae_steps)
    if step >= last and state is not None and "scaling_factor" in state:
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        return vae
    pool = pixels[: settings.vae_pool]
    probe = to_tensor(_fresh_pixels(64))
    started, window, start_step = time.time(), [], step
    vae.train()
    while step < last:
        idx = torch.randint(len(pool), (settings.vae_batch,), generator=gen).numpy()
        x = recolour(to_tensor(pool[idx]), gen, settings.vae_recolour)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        weight = 1.0 + settings.vae_object_weight * torch.from_numpy(masks[idx]).float()[:, None].div(255.0)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        weight = torch.where(flip[:, None, None, None], weight.flip(-1), weight)
        lr = settings.vae_lr * 0.5 * (1 + math.cos(math.pi * step / settings.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        error = (recon - x).abs() + (recon - x).square()
        loss = (error * weight).sum() / (weight.sum() * 3) + settings.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.item())
        if progress and (step % 25 == 0 or step == last):
            rate = (step - start_step) / max(time.time() - started, 1e-9)
            print(f"vae step {step}/{last} loss {np.mean(window):.4f} ({rate:.2f} steps/s)", flush=True)
            window.clear()
        if progress and step % 100 == 0:
            print(f"vae step {step}: probe PSNR {_psnr(vae, probe):.2f} dB", flush=True)
            vae.train()
        if step % settings.checkpoint_every == 0 or step == last:
            _save(path, {"key": key, "model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "generator": gen.get_state()})
    vae.eval()
    scaling = 1.0 / float(encode_pool(vae, pool[:2_000], scaled=False)[0].std())
    vae.register_to_config(scaling_factor=scaling)
    _save(path, {"key": key, "model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "generator": gen.get_state(), "scaling_factor": scaling})
    return vae


@torch.inference_mode()
def _psnr(vae, x: torch.Tensor) -> float:
    vae.eval()
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(4.0 / max(float(F.mse_loss(recon, x)), 1e-12))


@torch.inference_mode()
def encode_pool(vae, pixels: np.ndarray, scaled: bool = True, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of ``pixels`` (times the scaling factor when ``scaled``)."""
    means, stds = [], []
    factor = vae.config.scaling_factor if scaled else 1.0
    for s in range(0, len(pixels), batch):
        dist = vae.encode(to_tensor(pixels[s:s + batch])).latent_dist
        means.append(dist.mean * factor)
        stds.append(dist.std * factor)
    return torch.cat(means), torch.cat(stds)


@torch.inference_mode()
def vae_metrics(vae, pixels: np.ndarray) -> dict[str, float]:
    """Reconstruction PSNR and the detector's agreement between originals and round trips."""
    from training.world.detectors import detect

    x = to_tensor(pixels)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float(F.mse_loss(recon, x))
    images = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    before, after = detect(pixels), detect(images)
    same = [sorted((o.name, o.colour) for o in a.objects) == sorted((o.name, o.colour) for o in b.objects)
            and a.background == b.background and a.texture == b.texture for a, b in zip(before, after)]
    small = [(o.name, o.colour) in {(q.name, q.colour) for q in b.objects}
             for a, b in zip(before, after) for o in a.objects if o.size == "small"]
    return {"psnr": 10 * math.log10(4.0 / max(mse, 1e-12)), "round_trip_agreement": float(np.mean(same)),
            "small_objects_kept": float(np.mean(small)) if small else float("nan")}


def _fingerprint(*modules: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{i}.{name}".encode())
            digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()[:12]


def pool_latents(vae, pixels: np.ndarray, work: Path, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior means and standard deviations of the pool (fp16), cached in ``work`` under a fingerprint
    of what made them: the encoder, its ``quant_conv`` and the scaling factor (not the decoder)."""
    key = _fingerprint(vae.encoder, vae.quant_conv) + f"-{vae.config.scaling_factor:.6g}-{len(pixels)}"
    path = work / f"latents-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    if progress:
        print("encoding the pool with the VAE", flush=True)
    means, stds = encode_pool(vae, pixels)
    means, stds = means.half(), stds.half()
    _save(path, (means, stds))
    return means, stds


# ---------------------------------------------------------------- decoder tuning


def tune_decoder(settings: BaseSettings, work: Path, vae, pixels: np.ndarray, masks: np.ndarray,
                 progress: bool = True):
    """Fine-tune ``post_quant_conv`` and the decoder alone on latents the frozen encoder made of the whole pool,
    object pixels weighted ``decoder_object_weight`` times more: small shapes come out sharper while the latent
    space (what the UNet learned to generate) is untouched. Resumable like the other stages."""
    if settings.decoder_steps <= 0:
        return vae
    means, stds = pool_latents(vae, pixels, work, progress)
    scale = vae.config.scaling_factor
    trained = _parameters(vae.post_quant_conv, vae.decoder)
    frozen = [p for p in vae.parameters() if all(p is not q for q in trained)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trained, lr=settings.decoder_lr, weight_decay=0.0)
    path = work / "decoder.ckpt"
    key = settings.stage_key("decoder")
    gen = torch.Generator().manual_seed(settings.seed + 20)
    _, step = _resume_vae(path, key, vae, opt, gen)
    started, window, start_step = time.time(), [], step
    vae.train()
    while step < settings.decoder_steps:
        idx = torch.randint(len(means), (settings.decoder_batch,), generator=gen)
        latents = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=gen)
        x = to_tensor(pixels[idx.numpy()])
        weight = 1.0 + settings.decoder_object_weight * torch.from_numpy(masks[idx.numpy()]).float()[:, None] / 255
        recon = vae.decode(latents / scale).sample
        error = (recon - x).abs() + (recon - x).square()
        lr = warmup_cosine(settings.decoder_lr, step, settings.decoder_steps, 50)
        optimizer_step(opt, trained, (error * weight).sum() / (weight.sum() * 3), lr)
        step += 1
        window.append(float(error.detach().mean()))
        if progress and (step % 25 == 0 or step == settings.decoder_steps):
            print(progress_line("decoder", step, settings.decoder_steps, window, lr, step - start_step,
                                time.time() - started), flush=True)
            window.clear()
        if step % settings.checkpoint_every == 0 or step == settings.decoder_steps:
            _save(path, {"key": key, "model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "generator": gen.get_state()})
    for p in frozen:
        p.requires_grad_(True)
    return vae.eval()


# ---------------------------------------------------------------- UNet and text encoder


def build_tokenizer(max_tokens: int):
    from core.builtin import build_tokenizer as world_tokenizer

    tokenizer = world_tokenizer()
    tokenizer.model_max_length = max_tokens
    return tokenizer


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def build_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    from core.builtin import SCHEDULER_CONFIG

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, algorithm_type="dpmsolver++", steps_offset=1,
                                       timestep_spacing="leading")


class EMA:
    """Exponential moving average of parameters (warm-started: decay grows as (1+n)/(10+n))."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s)


def _parameters(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def warmup_cosine(base_lr: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps times a cosine decay to 0 over ``total`` steps."""
    return base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def optimizer_step(opt: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], loss: torch.Tensor,
                   lr: float) -> None:
    """One clipped (norm 1) optimizer step at learning rate ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def progress_line(stage: str, step: int, total: int, losses: list[float], lr: float, done: int,
                  seconds: float) -> str:
    """``stage step/total loss lr (rate, minutes left)``, the rate over the ``done`` steps of this run."""
    rate = done / max(seconds, 1e-9)
    return (f"{stage} step {step}/{total} loss {np.mean(losses):.4f} lr {lr:.2e} ({rate:.2f} steps/s, "
            f"{(total - step) / max(rate, 1e-9) / 60:.0f} min left)")


def _snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(settings: BaseSettings, work: Path, vae, captions: list[str], pixels: np.ndarray,
               progress: bool = True):
    """Train the UNet and text encoder on scaled VAE latents; returns (unet, text_encoder, tokenizer, history)
    with the EMA weights loaded."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.builtin import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG

    tokenizer = build_tokenizer(settings.max_tokens)
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(settings.seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    _warm_start(unet, settings.init_from, "unet")
    _warm_start(text_encoder, settings.init_from, "text_encoder")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    ema = EMA(_parameters(unet, text_encoder), settings.ema_decay)
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    path = work / "unet.ckpt"
    key = settings.stage_key("unet")
    step, history, gen = 0, [], torch.Generator().manual_seed(settings.seed + 10)
    state = _load(path, key)
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step, history = state["step"], state["history"]
        gen.set_state(state["generator"])
    means, stds = pool_latents(vae, pixels, work, progress)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    started, window, start_step = time.time(), [], step
    unet.train()
    text_encoder.train()
    last = min(settings.unet_steps, settings.unet_stop or settings.unet_steps)
    while step < last:
        idx = torch.randint(len(means), (settings.unet_batch,), generator=gen)
        latents = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=gen)
        tokens = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < settings.cond_dropout
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        lr = warmup_cosine(settings.unet_lr, step, settings.unet_steps, settings.warmup)
        pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _snr_weights(noise_scheduler, t, settings.snr_gamma)).mean()
        optimizer_step(opt, params, loss, lr)
        step += 1
        ema.update(step)
        window.append(loss.item())
        if progress and (step % 25 == 0 or step == settings.unet_steps):
            print(progress_line("unet", step, settings.unet_steps, window, lr, step - start_step,
                                time.time() - started), flush=True)
            window.clear()
        if step % settings.eval_every == 0 or step == last:
            metrics = _evaluate_ema(settings, vae, unet, text_encoder, tokenizer, ema)
            history.append({"step": step, "elapsed_s": time.time() - started, **metrics})
            if progress:
                print(f"eval at step {step}: {json.dumps(metrics)}", flush=True)
            unet.train()
            text_encoder.train()
        if step % settings.checkpoint_every == 0 or step == last:
            _save(path, {"key": key, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "optimizer": opt.state_dict(), "ema": ema.shadow, "step": step, "history": history,
                         "generator": gen.get_state()})
    ema.copy_to(_parameters(unet, text_encoder))
    return unet.eval(), text_encoder.eval(), tokenizer, history


def _evaluate_ema(settings: BaseSettings, vae, unet, text_encoder, tokenizer, ema: EMA) -> dict[str, Any]:
    import copy

    unet_e, te_e = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema.copy_to(_parameters(unet_e, te_e))
    pipe = assemble(vae, unet_e, te_e, tokenizer)
    return base_quality(pipe, settings.eval_prompts, guidance=settings.guidance)


def assemble(vae, unet, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---------------------------------------------------------------- quality


PROMPT_SEED = 4242  # held-in prompts for measuring a base model: a seed no training pool uses


def quality_prompts(count: int) -> list[str]:
    """``count`` fixed held-in prompts (the base grammar, one or two objects)."""
    ds = base_dataset(count, seed=PROMPT_SEED)
    return [ds.caption(ds.labels(i)) for i in range(count)]


def obeys(asked, seen) -> dict[str, bool]:
    """Which parts of an asked scene (Labels parsed from a prompt) the detected Labels show."""
    found = {(o.name, o.colour) for o in seen.objects}
    objects = all((o.name, o.colour) in found for o in asked.objects)
    shapes = all(o.name in {s.name for s in seen.objects} for o in asked.objects)
    positions = objects and all(
        any(s.name == o.name and s.colour == o.colour and s.position == o.position for s in seen.objects)
        for o in asked.objects)
    background = seen.background == asked.background
    texture = seen.texture == asked.texture
    return {"shape": shapes, "shape_colour": objects, "background": background, "texture": texture,
            "position": positions, "scene": objects and background}


@torch.inference_mode()
def generate(pipe, prompts: Sequence[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
             batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(prompts), batch):
        chunk = list(prompts[s:s + batch])
        gen = [torch.Generator().manual_seed(seed + s + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                      output_type="np").images
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def base_quality(pipe, count: int, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> dict[str, Any]:
    """The detector's verdict on ``count`` held-in prompts: the share of images that show each asked part."""
    from training.world.captions import parse_caption
    from training.world.detectors import detect

    prompts = quality_prompts(count)
    seen = detect(generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed))
    verdicts = [obeys(parse_caption(p)[0], s) for p, s in zip(prompts, seen)]
    single = [v for p, v in zip(prompts, verdicts) if " and " not in p]
    rates = {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}
    rates["scene_single_object"] = float(np.mean([v["scene"] for v in single])) if single else float("nan")
    return {"prompts": count, "steps": steps, "guidance": guidance, **rates}


# ---------------------------------------------------------------- output


def save_pipeline(pipe, out: Path, record: dict[str, Any]) -> Path:
    """Write the pipeline in diffusers format with fp16 weights (atomically), plus its training record."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        (tmp / "training.json").write_text(json.dumps(record["training"], indent=2))
        (tmp / "metrics.json").write_text(json.dumps(record["metrics"], indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_vae(vae, out: Path, record: dict[str, Any]) -> Path:
    """Write a VAE (fp32, diffusers format) and its record atomically: a stage's progress, to continue from."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "record.json").write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hardware() -> dict[str, Any]:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def run(settings: BaseSettings, work: Path, out: Path, progress: bool = True, final_prompts: int = 200,
        stages: str = "all") -> dict:
    """Train the stages (``all``, or ``vae`` alone: then ``out`` receives the VAE and its record only)."""
    torch.set_num_threads(settings.threads)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    pixels, masks, captions = render_pool(settings, work, progress)
    times["render_s"] = time.time() - t0
    t0 = time.time()
    vae = train_vae(settings, work, pixels, masks, progress)
    times["vae_s"] = time.time() - t0
    t0 = time.time()
    vae = tune_decoder(settings, work, vae, pixels, masks, progress)
    times["decoder_s"] = time.time() - t0
    vae_quality = vae_metrics(vae, _fresh_pixels(500))
    if progress:
        print(f"vae: {json.dumps(vae_quality)}", flush=True)
    if stages == "vae":
        record = {"training": {"settings": asdict(settings), "times_s": times, "hardware": hardware(),
                               "command": "python -m training.world.train_base --stages vae"},
                  "metrics": {"vae": vae_quality}}
        save_vae(vae, out, record)
        return record
    t0 = time.time()
    unet, text_encoder, tokenizer, history = train_unet(settings, work, vae, captions, pixels, progress)
    times["unet_s"] = time.time() - t0
    pipe = assemble(vae, unet, text_encoder, tokenizer)
    final = base_quality(pipe, final_prompts, guidance=settings.guidance)
    if progress:
        print(f"final: {json.dumps(final)}", flush=True)
    record = {"training": {"settings": asdict(settings), "times_s": times, "hardware": hardware(),
                           "command": "python -m training.world.train_base",
                           "continued_from": _previous_record(settings.init_from)},
              "metrics": {"vae": vae_quality, "base": final, "history": history}}
    save_pipeline(pipe, out, record)
    return record


def _previous_record(init_from: str, name: str = "training.json") -> dict[str, Any] | None:
    """The record ``name`` (``training.json`` or ``metrics.json``) of the weights this run started from (itself
    holding its own predecessor's), so the whole lineage of a model travels with it."""
    path = Path(init_from) / name if init_from else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError:
        return None


def _fresh_pixels(count: int) -> np.ndarray:
    ds = base_dataset(count, seed=PROMPT_SEED + 1)
    return np.stack([ds[i].pixels for i in range(count)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_base", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoints and caches (resumable)")
    parser.add_argument("--out", type=Path, required=True, help="where the finished diffusers pipeline goes")
    parser.add_argument("--final-prompts", type=int, default=200)
    parser.add_argument("--stages", choices=("all", "vae"), default="all", help="vae: train and write the VAE only")
    parser.add_argument("--quiet", action="store_true")
    for f in fields(BaseSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = BaseSettings(**{f.name: getattr(args, f.name) for f in fields(BaseSettings)})
    run(settings, args.work, args.out, progress=not args.quiet, final_prompts=args.final_prompts, stages=args.stages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
