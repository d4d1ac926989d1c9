"""Train the built-in world video model: an AnimateDiff motion module over the trained world image model.

Run ``python -m training.world.train_video --image DIR --work DIR --out DIR`` after ``train_base``. By default only
the motion modules learn (the image model stays frozen, as in AnimateDiff); ``--train-cross-attention`` adds the
spatial text cross-attention and ``--train-spatial`` every UNet weight; ``--train-text-encoder``, ``--zero-snr``,
``--high-noise-share``, ``--reversed-pairs`` and ``--pair-difference`` are the ways tried to make the words set the
direction (docs/world.md; the last one did it). The clips show the four base moves (left, right, up, down),
captioned "... moving up ...". Checkpoints and resume work as in ``train_base``; ``--out`` receives the AnimateDiff
pipeline in diffusers format (fp16) with ``training.json`` and ``metrics.json`` (the motion detector's verdict on
generated clips).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.world.clips import LINEAR_STEP
from training.world.dataset import base_clip_dataset
from training.world.train_base import (
    EMA,
    _atomic_npz,
    _fingerprint,
    _load,
    _previous_record,
    _save,
    _snr_weights,
    _warm_start,
    encode_pool,
    hardware,
    optimizer_step,
    progress_line,
    save_pipeline,
    tokenize,
    warmup_cosine,
)


@dataclass(frozen=True)
class VideoSettings:
    seed: int = 0
    clips: int = 6_000
    steps: int = 1_500
    batch: int = 4
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    snr_gamma: float = 5.0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_prompts: int = 32
    guidance: float = 4.0
    threads: int = 2
    stop: int = 0  # end this run after that many steps (0: all ``steps``); a later run continues from the checkpoint
    init_from: str = ""  # a world video pipeline folder whose motion modules this run starts from (continue training)
    train_cross_attention: bool = False  # also train the spatial cross-attention, so motion words reach the features
    train_spatial: bool = False  # train every UNet weight (a full fine-tune on clips), not only the motion path
    high_noise_share: float = 0.0  # share of each batch noised in the top ``high_noise_top`` of timesteps, where
    # only the text can tell the direction (elsewhere the noisy clip shows it, and the model learns to ignore words)
    high_noise_top: float = 0.4
    train_text_encoder: bool = False  # also train the text encoder, so the motion words can move apart from the
    # rest of the caption (the image model's encoder never saw "moving up" and encodes it near "moving down")
    reversed_pairs: bool = False  # half of each batch is the other half played backwards, captioned with the
    # opposite direction and noised with the same noise: only the words tell such a pair apart at high noise
    zero_snr: bool = False  # v-prediction on a schedule whose last step is pure noise (see zero_snr_schedule)
    pair_difference: float = 0.0  # with --reversed-pairs: weight of the loss on the difference of each pair's
    # predictions (see pair_difference_loss), which only the direction words can lower

    def key(self) -> dict[str, Any]:
        skip = {"checkpoint_every", "eval_every", "eval_prompts", "guidance", "threads", "stop"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _render(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, start, count = args
    ds = base_clip_dataset(start + count, seed=seed)
    items = [ds[i] for i in range(start, start + count)]
    return np.stack([s.pixels for s in items]), [s.caption for s in items]


def render_clips(settings: VideoSettings, work: Path, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """The training clips (cached in ``work``): (clips, 8, 64, 64, 3) uint8 and their captions."""
    cache = work / f"clips-{settings.seed}-{settings.clips}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["pixels"], json.loads(str(data["captions"]))
    chunk = 500
    jobs = [(settings.seed, s, min(chunk, settings.clips - s)) for s in range(0, settings.clips, chunk)]
    pixels, captions = [], []
    with ProcessPoolExecutor(max_workers=max(1, settings.threads)) as pool:
        for i, (p, c) in enumerate(pool.map(_render, jobs)):
            pixels.append(p)
            captions += c
            if progress:
                print(f"rendered {min((i + 1) * chunk, settings.clips)}/{settings.clips} clips", flush=True)
    out = np.concatenate(pixels)
    _atomic_npz(cache, pixels=out, captions=np.array(json.dumps(captions)))
    return out, captions


def motion_parameters(unet, cross_attention: bool = False, spatial: bool = False) -> list[torch.nn.Parameter]:
    """The motion modules' parameters, and with ``cross_attention`` those of the spatial blocks' text
    cross-attention (``attentions.j.transformer_blocks.k.attn2``): AnimateDiff's motion modules never see the
    text, so on a small base that was never taught "moving up" the words must shape the spatial features they
    read. ``spatial`` selects every weight of the UNet."""
    return [p for name, p in unet.named_parameters() if spatial or ".motion_modules." in f".{name}"
            or (cross_attention and ".attentions." in f".{name}" and ".attn2." in name)]


def _warm_start_motion(unet, folder: str, cross_attention: bool = False, spatial: bool = False) -> None:
    """Load the weights this stage trains (``motion_parameters``) from the video pipeline in ``folder`` (same
    architecture) into ``unet``."""
    if not folder:
        return
    from safetensors.torch import load_file

    files = sorted((Path(folder) / "unet").glob("*.safetensors"))
    if not files:
        raise ValueError(f"--init-from {folder}: no unet/*.safetensors there")
    chosen = motion_parameters(unet, cross_attention, spatial)
    trained = {n for n, p in unet.named_parameters() if any(p is q for q in chosen)}
    trained |= {k for k in unet.state_dict() if ".motion_modules." in f".{k}"}  # buffers too
    saved = {k: v.float() for f in files for k, v in load_file(f).items() if k in trained}
    if set(saved) != trained:
        raise ValueError(f"--init-from {folder}: its motion modules do not match this architecture")
    unet.load_state_dict(saved, strict=False)


# Sampling starts from pure noise, but the stock schedule's noisiest training step still keeps ~7 % of the clip
# (and "leading" spacing starts sampling at t=951): the model learns to read the direction off that remnant and at
# sampling time reads a random one off the starting noise. With zero terminal SNR the noisiest step holds no clip
# at all, so only the words can give the direction (Lin et al., "Common Diffusion Noise Schedules and Sample Steps
# are Flawed"); epsilon is undefined there, hence v-prediction, and "trailing" spacing samples from t=999.
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def zero_snr_schedule(scheduler):
    """``scheduler`` (an instance) rebuilt as the same class with ``ZERO_SNR``."""
    return type(scheduler).from_config(scheduler.config, **ZERO_SNR)


# The straight moves' opposites and axes, read off the step vectors the clips are rendered with.
OPPOSITE_DIRECTION = {m: next(o for o, v in LINEAR_STEP.items() if v == (-dx, -dy))
                      for m, (dx, dy) in LINEAR_STEP.items()}


def reversed_caption(caption: str) -> str:
    """``caption`` of a straight move with the opposite direction: the caption of the clip played backwards."""
    for direction, opposite in OPPOSITE_DIRECTION.items():
        phrase = f" moving {direction} "
        if phrase in caption:
            return caption.replace(phrase, f" moving {opposite} ", 1)
    raise ValueError(f"not the caption of a straight move: {caption!r}")


def _loss_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for the schedule's prediction type; for v-prediction ``(min(SNR, gamma) + 1) /
    (SNR + 1)``, which keeps weight 1 at the zero-SNR step (plain min-SNR-v would give it none)."""
    if scheduler.config.prediction_type == "epsilon":
        return _snr_weights(scheduler, timesteps, gamma)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return (torch.clamp(snr, max=gamma) + 1) / (snr + 1)


def pair_difference_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
    """Weighted MSE between the differences of the two halves of a reversed-pair batch (a clip, then the same clip
    played backwards with the same noise and the opposite words), over the pairs where ``keep`` (captioned ones).

    Why: at high noise the plain loss is dominated by what both clips share (background, colour, where the object
    is across the move), and the direction is worth under 1 % of it, so a model that ignores the words loses almost
    nothing. In the difference the shared part cancels, and what is left is exactly what the words must decide."""
    half = len(pred) // 2
    per_pair = F.mse_loss(pred[:half] - pred[half:], target[:half] - target[half:], reduction="none")
    per_pair = per_pair.mean(dim=tuple(range(1, pred.ndim))) * weights[:half] * keep
    return per_pair.sum() / keep.sum().clamp(min=1)


def _timesteps(total: int, count: int, high_share: float, gen: torch.Generator, top: float = 0.4) -> torch.Tensor:
    """Uniform training timesteps, the first ``round(high_share * count)`` of them drawn from the top ``top``."""
    t = torch.randint(0, total, (count,), generator=gen)
    high = round(high_share * count)
    if high:
        t[:high] = torch.randint(int(total * (1 - top)), total, (high,), generator=gen)
    return t


def train_motion(settings: VideoSettings, work: Path, image_dir: Path, progress: bool = True):
    """Train the motion modules (and what ``settings`` adds); returns (pipeline with EMA weights, history, training
    seconds of this run and of the earlier runs it resumed)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from core.builtin import SCHEDULER_CONFIG, build_motion_adapter, build_video_pipeline

    if settings.reversed_pairs and settings.batch % 2:
        raise ValueError("--reversed-pairs needs an even --batch")
    if settings.pair_difference and not settings.reversed_pairs:
        raise ValueError("--pair-difference needs --reversed-pairs")
    work.mkdir(parents=True, exist_ok=True)
    image_pipe = StableDiffusionPipeline.from_pretrained(image_dir, torch_dtype=torch.float32, local_files_only=True)
    adapter = build_motion_adapter(settings.seed)
    pipe = build_video_pipeline(settings.seed, image_pipe=image_pipe, motion_adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    if settings.zero_snr:
        pipe.scheduler = zero_snr_schedule(pipe.scheduler)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    _warm_start_motion(unet, settings.init_from, settings.train_cross_attention, settings.train_spatial)
    params = motion_parameters(unet, settings.train_cross_attention, settings.train_spatial)
    if settings.train_text_encoder:
        _warm_start(text_encoder, settings.init_from, "text_encoder")  # when that folder has one
        params += list(text_encoder.parameters())
        text_encoder.train()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    ema = EMA(params, settings.ema_decay)
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    if settings.zero_snr:
        noise_scheduler = zero_snr_schedule(noise_scheduler)
    path, key = work / "motion.ckpt", settings.key()
    step, history, gen = 0, [], torch.Generator().manual_seed(settings.seed + 20)
    state = _load(path, key)
    spent = state.get("elapsed_s", 0.0) if state else 0.0  # seconds the earlier runs of this checkpoint took
    if state is not None:
        for p, saved in zip(params, state["params"]):
            p.data.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step, history = state["step"], state["history"]
        gen.set_state(state["generator"])
    pixels, captions = render_clips(settings, work, progress)
    latents_path = work / f"clip-latents-{_fingerprint(vae.encoder, vae.quant_conv)}.pt"  # tied to the encoder
    if latents_path.is_file():
        means, stds = torch.load(latents_path, weights_only=True)
    else:
        if progress:
            print("encoding the clips with the VAE", flush=True)
        frames = pixels.reshape(-1, *pixels.shape[2:])
        means, stds = encode_pool(vae, frames)
        shape = (len(pixels), pixels.shape[1], *means.shape[1:])
        means, stds = means.reshape(shape).half(), stds.reshape(shape).half()
        _save(latents_path, (means, stds))
    ids, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [""])
    if settings.reversed_pairs:
        reversed_ids = tokenize(tokenizer, [reversed_caption(c) for c in captions])
    frames = means.shape[1]
    started, window, start_step = time.time(), [], step
    unet.train()
    last = min(settings.steps, settings.stop or settings.steps)
    pairs = 2 if settings.reversed_pairs else 1
    while step < last:
        idx = torch.randint(len(means), (settings.batch // pairs,), generator=gen)
        lat = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=gen)
        lat = lat.permute(0, 2, 1, 3, 4)  # (B, C, F, h, w) as UNetMotionModel takes it
        batch_ids = ids[idx]
        if pairs == 2:
            lat, batch_ids = torch.cat([lat, lat.flip(2)]), torch.cat([batch_ids, reversed_ids[idx]])
        with torch.set_grad_enabled(settings.train_text_encoder):
            cond, empty = text_encoder(torch.cat([batch_ids, empty_ids]))[0].split([len(batch_ids), 1])
        drop = (torch.rand(len(idx), generator=gen) < settings.cond_dropout).repeat(pairs)
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        noise = torch.randn(lat[:len(idx)].shape, generator=gen).repeat(pairs, 1, 1, 1, 1)
        t = _timesteps(noise_scheduler.config.num_train_timesteps, len(idx), settings.high_noise_share, gen,
                       settings.high_noise_top).repeat(pairs)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        lr = warmup_cosine(settings.lr, step, settings.steps, settings.warmup)
        pred = unet(noisy, t, cond.repeat_interleave(frames, dim=0)).sample
        target = noise_scheduler.get_velocity(lat, noise, t) if settings.zero_snr else noise
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3, 4))
        weights = _loss_weights(noise_scheduler, t, settings.snr_gamma)
        loss = (per_sample * weights).mean()
        if settings.pair_difference:
            keep = (~drop[:len(idx)]).float()
            loss = loss + settings.pair_difference * pair_difference_loss(pred, target, weights, keep)
        optimizer_step(opt, params, loss, lr)
        step += 1
        ema.update(step)
        window.append(loss.item())
        if progress and (step % 10 == 0 or step == settings.steps):
            print(progress_line("motion", step, settings.steps, window, lr, step - start_step,
                                time.time() - started), flush=True)
            window.clear()
        if step % settings.eval_every == 0 or step == last:
            live = [p.detach().clone() for p in params]
            ema.copy_to(params)
            unet.eval()
            text_encoder.eval()
            metrics = video_quality(pipe, settings.eval_prompts, guidance=settings.guidance)
            for p, v in zip(params, live):
                p.data.copy_(v)
            unet.train()
            text_encoder.train(settings.train_text_encoder)
            history.append({"step": step, "elapsed_s": spent + time.time() - started, **metrics})
            if progress:
                print(f"eval at step {step}: {json.dumps(metrics)}", flush=True)
        if step % settings.checkpoint_every == 0 or step == last:
            _save(path, {"key": key, "params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                         "ema": ema.shadow, "step": step, "history": history, "generator": gen.get_state(),
                         "elapsed_s": spent + time.time() - started})
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    for p in params:
        p.requires_grad_(False)
    return pipe, history, spent + time.time() - started


VIDEO_PROMPT_SEED = 4343
AXIS = {m: "horizontal" if dx else "vertical" for m, (dx, _) in LINEAR_STEP.items()}


def video_prompts(count: int) -> list[str]:
    """``count`` fixed held-in clip prompts: one shape moving left, right, up or down."""
    ds = base_clip_dataset(count, seed=VIDEO_PROMPT_SEED)
    return [ds.caption(ds.labels(i)) for i in range(count)]


@torch.inference_mode()
def generate_clips(pipe, prompts: Sequence[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
                   batch: int = 8) -> np.ndarray:
    out = []
    for s in range(0, len(prompts), batch):
        chunk = list(prompts[s:s + batch])
        gen = [torch.Generator().manual_seed(seed + s + i) for i in range(len(chunk))]
        frames = pipe(chunk, num_frames=8, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                      height=64, width=64, output_type="np").frames
        out.append((np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def video_quality(pipe, count: int, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> dict[str, Any]:
    """The motion detector's verdict on ``count`` held-in clip prompts: the shares moving the asked direction, along
    the asked axis (horizontal or vertical, either way) and showing the asked shape."""
    from training.world.captions import parse_caption
    from training.world.detectors import load_detectors

    prompts = video_prompts(count)
    clips = generate_clips(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
    seen = load_detectors().detect_clips(list(clips))
    asked = [parse_caption(p)[0] for p in prompts]
    direction = [s.motion == a.motion for a, s in zip(asked, seen)]
    axis = [AXIS.get(s.motion) == AXIS[a.motion] for a, s in zip(asked, seen)]
    shape = [all(o.name in {x.name for x in s.objects} for o in a.objects) for a, s in zip(asked, seen)]
    return {"prompts": count, "steps": steps, "guidance": guidance, "direction": float(np.mean(direction)),
            "axis": float(np.mean(axis)), "shape": float(np.mean(shape))}


def sync_motion_adapter(pipe) -> None:
    """Copy the trained motion modules from the UNet into the pipeline's ``motion_adapter`` component: the UNet
    took copies of the adapter's weights when it was built, so without this the saved adapter (what someone pairs
    with another image model) would hold the untrained ones."""
    unet_state = pipe.unet.state_dict()
    adapter_state = pipe.motion_adapter.state_dict()
    missing = sorted(set(adapter_state) - set(unet_state))
    if missing:
        raise ValueError(f"the UNet has no motion-module weights named like the adapter's, e.g. {missing[0]}")
    pipe.motion_adapter.load_state_dict({k: unet_state[k] for k in adapter_state})


def run(settings: VideoSettings, work: Path, image_dir: Path, out: Path, progress: bool = True,
        final_prompts: int = 80) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    pipe, history, train_s = train_motion(settings, work, image_dir, progress)
    sync_motion_adapter(pipe)
    final = video_quality(pipe, final_prompts, guidance=settings.guidance)
    if progress:
        print(f"final: {json.dumps(final)}", flush=True)
    record = {"training": {"settings": asdict(settings), "image_model": str(image_dir), "times_s": {"train": train_s},
                           "hardware": hardware(), "command": "python -m training.world.train_video",
                           "continued_from": _previous_record(settings.init_from)},
              "metrics": {"video": final, "history": history,
                          "continued_from": _previous_record(settings.init_from, "metrics.json")}}
    save_pipeline(pipe, out, record)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_video", description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="the trained world image pipeline folder")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--final-prompts", type=int, default=80)
    parser.add_argument("--quiet", action="store_true")
    for f in fields(VideoSettings):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=f.default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = VideoSettings(**{f.name: getattr(args, f.name) for f in fields(VideoSettings)})
    run(settings, args.work, args.image, args.out, progress=not args.quiet, final_prompts=args.final_prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
