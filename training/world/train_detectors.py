"""Train the shapes-world detectors on fresh renders, resumably, and measure them on renders they never saw.

    python -m training.world.train_detectors --out DIR [--kind image|clip|all] [--steps N] [--batch B] ...

Data: the steps walk through chunks of ``detector_dataset(seed=--seed)`` (chunk c holds items c*C .. c*C+C-1);
each chunk is rendered in a helper process while the previous one trains, and is seen ``--repeat`` times in a
seeded order. Everything (data order, augmentation noise, initialization) follows from ``--seed``, and a resumed
run continues exactly where the checkpoint stopped: ``DIR/<kind>.ckpt.safetensors`` (model and optimizer
tensors) + ``DIR/<kind>.ckpt.json`` (step, settings, elapsed time), written atomically every
``--checkpoint-every`` steps. At the end the detector is evaluated on ``--eval-count`` renders of
``detector_dataset(seed=--eval-seed)`` (a disjoint random stream) and saved as ``DIR/<kind>.safetensors`` +
``DIR/<kind>.json`` (architecture, classes, settings, metrics, training time); ``DIR/metrics.json`` gathers both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from training.world.concepts import STYLE_CLASSES
from training.world.dataset import detector_dataset, render_labels
from training.world.detectors import (
    build_model,
    clip_targets,
    clips_to_tensor,
    correct,
    image_targets,
    images_to_tensor,
    losses,
    save_detector,
    stack_targets,
)

HUGE = 10**9  # the training stream's nominal length: chunks index into it


@dataclass(frozen=True)
class TrainSettings:
    kind: str = "image"
    steps: int = 3000
    batch: int = 64
    chunk: int = 2048
    repeat: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    seed: int = 0
    eval_seed: int = 1_000_003
    eval_count: int = 2000
    noise: float = 0.03  # max std of the added Gaussian noise, in [-1, 1] units
    blur: float = 0.25  # probability of a light blur
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.kind not in ("image", "clip"):
            raise ValueError(f"kind must be 'image' or 'clip', got {self.kind!r}")
        for name in ("steps", "batch", "chunk", "repeat", "eval_count", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk % self.batch:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of batch ({self.batch})")

    @property
    def steps_per_chunk(self) -> int:
        return self.chunk * self.repeat // self.batch


def render_chunk(kind: str, seed: int, start: int, count: int) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Render items ``start .. start+count-1`` of the detector stream: (pixels, stacked targets, styles)."""
    dataset = detector_dataset(HUGE, seed, clips=kind == "clip")
    pixels, targets, styles = [], [], []
    for index in range(start, start + count):
        array, _, labels = render_labels(dataset.labels(index))
        pixels.append(array)
        targets.append(clip_targets(labels) if kind == "clip" else image_targets(labels))
        styles.append(labels.style)
    return np.stack(pixels), stack_targets(targets), styles


def to_input(kind: str, pixels: np.ndarray) -> torch.Tensor:
    return clips_to_tensor(pixels) if kind == "clip" else images_to_tensor(pixels)


def augment(x: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Light Gaussian noise on every input and, on some, a [1, 2, 1] blur: the detectors will read generated
    images, which are never as crisp as renders."""
    n = len(x)
    blur = torch.rand(n, generator=generator) < settings.blur
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
        kernel = (kernel[:, None] * kernel[None, :]).expand(x.shape[1], 1, 3, 3)
        blurred = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
        x = x.clone()
        x[blur] = blurred
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * settings.noise
    return x + sigma * torch.randn(x.shape, generator=generator)


def learning_rate(settings: TrainSettings, step: int) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class ChunkFeed:
    """Batches for steps ``start..``: chunk c is rendered by a helper process while chunk c-1 trains."""

    def __init__(self, settings: TrainSettings, pool: ProcessPoolExecutor | None) -> None:
        self.settings, self.pool = settings, pool
        self._pending: dict[int, Future] = {}

    def _submit(self, chunk: int) -> None:
        s = self.settings
        if chunk in self._pending:
            return
        args = (s.kind, s.seed, chunk * s.chunk, s.chunk)
        if self.pool is None:
            done: Future = Future()
            done.set_result(render_chunk(*args))
            self._pending[chunk] = done
        else:
            self._pending[chunk] = self.pool.submit(render_chunk, *args)

    def batches(self, start: int) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        s = self.settings
        step = start
        while step < s.steps:
            chunk = step // s.steps_per_chunk
            self._submit(chunk)
            if self.pool is not None and (chunk + 1) * s.steps_per_chunk < s.steps:
                self._submit(chunk + 1)  # rendered while this chunk trains
            pixels, targets, _ = self._pending.pop(chunk).result()
            rng = np.random.default_rng([s.seed, chunk])
            order = np.concatenate([rng.permutation(s.chunk) for _ in range(s.repeat)])
            while step < s.steps and step // s.steps_per_chunk == chunk:
                rows = order[(step % s.steps_per_chunk) * s.batch:][: s.batch]
                yield step, to_input(s.kind, pixels[rows]), {k: torch.from_numpy(v[rows]) for k, v in targets.items()}
                step += 1


# ---- checkpoints ----------------------------------------------------------------------------------------------

def _ckpt_paths(out: Path, kind: str) -> tuple[Path, Path]:
    return out / f"{kind}.ckpt.safetensors", out / f"{kind}.ckpt.json"


def save_checkpoint(out: Path, settings: TrainSettings, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, elapsed: float, history: list[dict[str, float]]) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().contiguous()
    weights, meta = _ckpt_paths(out, settings.kind)
    tmp_weights, tmp_meta = weights.with_name(weights.name + ".tmp"), meta.with_name(meta.name + ".tmp")
    save_file(tensors, str(tmp_weights))
    tmp_meta.write_text(json.dumps({"step": step, "elapsed_s": elapsed, "settings": asdict(settings),
                                    "history": history}, indent=1))
    os.replace(tmp_weights, weights)
    os.replace(tmp_meta, meta)


def load_checkpoint(out: Path, settings: TrainSettings, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[int, float, list[dict[str, float]]]:
    """Restore a checkpoint of the same settings; returns (step, elapsed seconds, history), (0, 0, []) if none."""
    weights, meta_path = _ckpt_paths(out, settings.kind)
    if not weights.is_file() or not meta_path.is_file():
        return 0, 0.0, []
    meta = json.loads(meta_path.read_text())
    saved = {k: v for k, v in meta["settings"].items() if k not in ("eval_count", "checkpoint_every")}
    wanted = {k: v for k, v in asdict(settings).items() if k not in ("eval_count", "checkpoint_every")}
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ValueError(f"{meta_path}: the checkpoint was made with other settings ({', '.join(changed)}); "
                         "use the same settings or another --out")
    tensors = load_file(str(weights))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            entry = state["state"].setdefault(int(index), {})
            entry[name] = value
    optimizer.load_state_dict(state)
    return int(meta["step"]), float(meta["elapsed_s"]), list(meta["history"])


# ---- evaluation -----------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(model: torch.nn.Module, kind: str, seed: int, count: int, pool: ProcessPoolExecutor | None = None,
             batch: int = 250) -> dict[str, Any]:
    """Accuracy per head on ``count`` fresh renders of ``detector_dataset(seed=seed)`` (and per style, for
    images)."""
    model.eval()
    starts = list(range(0, count, batch))
    sizes = [min(batch, count - s) for s in starts]
    if pool is None:
        chunks: Iterator = (render_chunk(kind, seed, s, n) for s, n in zip(starts, sizes))
    else:
        chunks = pool.map(render_chunk, [kind] * len(starts), [seed] * len(starts), starts, sizes)
    totals: dict[str, list[int]] = {}
    for pixels, targets, styles in chunks:
        outputs = model(to_input(kind, pixels))
        tensors = {k: torch.from_numpy(v) for k, v in targets.items()}
        groups = {"all": np.ones(len(styles), bool)}
        if kind == "image":
            groups.update({style: np.array([s == style for s in styles]) for style in STYLE_CLASSES})
        for group, rows in groups.items():
            if not rows.any():
                continue
            index = torch.from_numpy(np.nonzero(rows)[0])
            part = correct(kind, {k: v[index] for k, v in outputs.items()}, {k: v[index] for k, v in tensors.items()})
            for head, (right, counted) in part.items():
                slot = totals.setdefault(f"{group}/{head}", [0, 0])
                slot[0] += right
                slot[1] += counted
    model.train()
    accuracy = {key.split("/", 1)[1]: round(r / n, 4) for key, (r, n) in totals.items()
                if key.startswith("all/") and n}
    by_style = {}
    for key, (r, n) in totals.items():
        group, head = key.split("/", 1)
        if group != "all" and n:
            by_style.setdefault(group, {})[head] = round(r / n, 4)
    counted = {key.split("/", 1)[1]: n for key, (_, n) in totals.items() if key.startswith("all/")}
    result: dict[str, Any] = {"seed": seed, "count": count, "accuracy": accuracy, "counted": counted}
    if by_style:
        result["accuracy_by_style"] = by_style
    return result


# ---- training -------------------------------------------------------------------------------------------------

def train(settings: TrainSettings, out: Path, workers: int = 1, progress: bool = True, stop_at: int | None = None,
          time_limit_s: float | None = None) -> dict[str, Any] | None:
    """Train (or resume) one detector and save it with its metrics; returns its JSON config.

    ``stop_at`` (a step) or ``time_limit_s`` (seconds in this call) end the call early, at a checkpoint, and
    return None: calling again with the same settings resumes.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = build_model(settings.kind)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
    step, elapsed, history = load_checkpoint(out, settings, model, optimizer)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        if step < settings.steps:
            deadline = time.perf_counter() + time_limit_s if time_limit_s else None
            step, elapsed, history = _train_steps(settings, out, model, optimizer, step, elapsed, history,
                                                  pool, progress, stop_at, deadline)
            if step < settings.steps:
                return None
        started = time.perf_counter()
        metrics = evaluate(model, settings.kind, settings.eval_seed, settings.eval_count, pool)
        eval_s = time.perf_counter() - started
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    config = {"settings": asdict(settings), "metrics": metrics, "train_seconds": round(elapsed, 1),
              "eval_seconds": round(eval_s, 1), "parameters": sum(p.numel() for p in model.parameters()),
              "torch_threads": torch.get_num_threads(), "final_loss": history[-1] if history else None}
    save_detector(model, settings.kind, out, config)
    return config


def _train_steps(settings: TrainSettings, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 step: int, elapsed: float, history: list[dict[str, float]], pool: ProcessPoolExecutor | None,
                 progress: bool, stop_at: int | None = None, deadline: float | None = None,
                 ) -> tuple[int, float, list[dict[str, float]]]:
    """Steps from ``step`` to the end (or to ``stop_at`` / ``deadline``); returns the step reached."""
    model.train()
    feed = ChunkFeed(settings, pool)
    bar = tqdm(total=settings.steps, initial=step, desc=f"{settings.kind} detector", unit="step",
               dynamic_ncols=True, disable=not progress)
    running: dict[str, float] = {}
    last = time.perf_counter()
    for index, x, targets in feed.batches(step):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, index)
        outputs = model(augment(x, settings, generator))
        parts = losses(settings.kind, outputs, targets)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in [("loss", float(loss.detach()))] + [(k, float(v.detach())) for k, v in parts.items()]:
            running[name] = 0.95 * running.get(name, value) + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss']:.3f}", refresh=False)
        now = time.perf_counter()
        elapsed += now - last
        last = now
        done = index + 1
        stopping = done == stop_at or (deadline is not None and now > deadline)
        if done % settings.checkpoint_every == 0 or done == settings.steps or stopping:
            history.append({"step": done, **{k: round(v, 4) for k, v in running.items()}})
            save_checkpoint(out, settings, model, optimizer, done, elapsed, history)
            last = time.perf_counter()  # checkpoint writing is not training time
        if stopping:
            bar.close()
            return done, elapsed, history
    bar.close()
    return settings.steps, elapsed, history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m training.world.train_detectors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, weights and metrics")
    parser.add_argument("--kind", choices=["image", "clip", "all"], default="all")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 3500 image, 800 clip)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--chunk", type=int, help="renders per chunk (default 2048 image, 1024 clip)")
    parser.add_argument("--repeat", type=int, help="passes over each chunk (default 2 image, 4 clip: a clip takes "
                                                   "longer to render)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-seed", type=int, default=defaults.eval_seed)
    parser.add_argument("--eval-count", type=int, default=defaults.eval_count)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--workers", type=int, default=1, help="render processes (0: render in this process)")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="stop at a checkpoint after this long; run the same command again to resume")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the render process takes another core)")
    return parser.parse_args(argv)


KIND_DEFAULTS = {"image": {"steps": 3500, "chunk": 2048, "repeat": 2},
                 "clip": {"steps": 800, "chunk": 1024, "repeat": 4}}


def write_summary(out: Path) -> dict[str, Any]:
    """``out/metrics.json`` from the detectors saved in ``out``: accuracy, training time, size per kind."""
    summary = {}
    for kind in ("image", "clip"):
        config_path = out / f"{kind}.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            summary[kind] = {"accuracy": config["metrics"]["accuracy"], "eval_count": config["metrics"]["count"],
                             "eval_seed": config["metrics"]["seed"], "train_seconds": config["train_seconds"],
                             "steps": config["settings"]["steps"], "parameters": config["parameters"],
                             "bytes": (out / f"{kind}.safetensors").stat().st_size}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["image", "clip"] if args.kind == "all" else [args.kind]
    for kind in kinds:
        defaults: Mapping[str, int] = KIND_DEFAULTS[kind]
        settings = TrainSettings(kind=kind, steps=args.steps or defaults["steps"], batch=args.batch,
                                 chunk=args.chunk or defaults["chunk"], repeat=args.repeat or defaults["repeat"],
                                 lr=args.lr, seed=args.seed, eval_seed=args.eval_seed, eval_count=args.eval_count,
                                 checkpoint_every=args.checkpoint_every)
        limit = args.time_limit * 60 if args.time_limit else None
        config = train(settings, args.out, workers=args.workers, time_limit_s=limit)
        if config is None:
            print(f"{kind}: stopped at the time limit; run the same command again to resume", file=sys.stderr)
            return 3
        print(json.dumps({kind: write_summary(args.out)[kind]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
