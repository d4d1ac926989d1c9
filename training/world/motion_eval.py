"""Does a motion adapter carry its motion to subjects it never saw move?

A MotionDirector adapter is trained on world clips of one held-out motion (zigzag, orbit or bounce) made by a few
shapes (``TRAIN_SHAPES``), captioned without naming the motion ("a big red circle moving on a ..."). Then clips are
sampled for prompts of OTHER shapes (``EVAL_SHAPES``) written the same way, one seed each, with the adapter at scale
1 and at scale 0 (the base model), and the world's clip detector names each clip's motion. The result is the share
of clips detected as the trained motion, with and without the adapter, and the share in which the prompted shape is
still seen (the adapter must not replace the subject by the training shapes).

Run on a video base model (a diffusers AnimateDiff folder or ``builtin:tiny-video``)::

    python -m training.world.motion_eval --base DIR --motion zigzag [--clips 16] [--steps 300] [--json OUT]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.base import TrainerCallback
from training.methods.motion_director import MotionDirector, MotionDirectorConfig
from training.motion_trainer import MotionTrainer
from training.video import ClipDataset
from training.world.captions import parse_caption
from training.world.concepts import CLIP_FRAMES, HELD_OUT_MOTIONS, IMAGE_SIZE
from training.world.dataset import SceneRules, WorldDataset
from training.world.detectors import Detectors, load_detectors

TRAIN_SHAPES = ("circle", "square", "triangle", "hexagon")
EVAL_SHAPES = ("star", "heart", "diamond", "cross", "ring")
EVAL_ADAPTER = "motion_eval"
DEFAULT_TRAINING: dict[str, Any] = {"rank": 8, "num_frames": CLIP_FRAMES, "resolution": IMAGE_SIZE, "max_steps": 300,
                                    "preview_every": 0, "checkpoint_every": 0}


@dataclass(frozen=True)
class MotionEvalResult:
    """Shares of sampled clips detected as ``motion`` with the adapter and without it (the base model)."""

    motion: str
    with_adapter: float
    without_adapter: float
    subject_kept_with: float  # share of clips (with the adapter) in which the prompted shape is detected
    subject_kept_without: float
    seeds: int
    prompts: list[str]
    detected_with: list[str]
    detected_without: list[str]
    train_clips: int
    train_steps: int
    final_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_clips(motion: str, count: int, seed: int = 0, shapes: Sequence[str] = TRAIN_SHAPES,
                   trigger: str | None = None) -> WorldDataset:
    """``count`` clips of ``shapes`` making held-out ``motion``, captioned "... moving [trigger] on a ..."."""
    if motion not in HELD_OUT_MOTIONS:
        raise ValueError(f"motion must be a held-out one ({', '.join(HELD_OUT_MOTIONS)}), got {motion!r}")
    rules = SceneRules(objects=tuple(shapes), motions=(motion,))
    return WorldDataset(rules, count, seed, stream=f"motion-eval:{motion}:train", trigger=trigger, name_motion=False)


def eval_prompts(motion: str, count: int, seed: int = 0, shapes: Sequence[str] = EVAL_SHAPES,
                 trigger: str | None = None) -> list[str]:
    """``count`` prompts of ``shapes`` written like the training captions (the motion unnamed)."""
    rules = SceneRules(objects=tuple(shapes), motions=(motion,))
    data = WorldDataset(rules, count, seed, stream=f"motion-eval:{motion}:eval", trigger=trigger, name_motion=False)
    return [data.caption(data.labels(i)) for i in range(count)]


@torch.inference_mode()
def sample_clips(pipe: Any, prompts: Sequence[str], num_frames: int, steps: int = 25, guidance: float = 4.0,
                 seed: int = 0, batch: int = 8, size: int = IMAGE_SIZE) -> np.ndarray:
    """One clip per prompt, prompt ``i`` from seed ``seed + i``: ``(N, F, size, size, 3)`` uint8."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        frames = pipe(chunk, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, height=size, width=size, output_type="np").frames
        out.append((np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def _shares(detectors: Detectors, clips: np.ndarray, prompts: Sequence[str],
            motion: str) -> tuple[float, float, list[str]]:
    labels = detectors.detect_clips(list(clips))
    wanted = [parse_caption(p)[0].objects[0].name for p in prompts]
    moved = [lab.motion or "" for lab in labels]
    kept = [any(o.name == name for o in lab.objects) for lab, name in zip(labels, wanted)]
    return float(np.mean([m == motion for m in moved])), float(np.mean(kept)), moved


def motion_transfer_rate(pipe: Any, motion: str = "zigzag", *, train_clips: int = 16, seeds: int = 20,
                         training: Mapping[str, Any] | None = None, steps: int = 25, guidance: float = 4.0,
                         seed: int = 0, trigger: str | None = None, train_shapes: Sequence[str] = TRAIN_SHAPES,
                         eval_shapes: Sequence[str] = EVAL_SHAPES, detectors: Detectors | None = None,
                         callback: TrainerCallback | None = None) -> MotionEvalResult:
    """Train a MotionDirector adapter on ``train_clips`` clips of ``motion`` (settings ``DEFAULT_TRAINING`` updated
    by ``training``), then sample ``seeds`` clips of other shapes with and without it and judge their motion.

    ``pipe`` (an AnimateDiff pipeline) is left as found. ``steps`` and ``guidance`` are the sampling settings.
    """
    if set(train_shapes) & set(eval_shapes):
        raise ValueError(f"train and eval shapes overlap: {sorted(set(train_shapes) & set(eval_shapes))}")
    started = time.perf_counter()
    detectors = detectors or load_detectors()
    cfg = MotionDirectorConfig.from_dict({**DEFAULT_TRAINING, "seed": seed, **(training or {})})
    data = training_clips(motion, train_clips, seed, train_shapes, trigger)
    samples = list(data)
    clips = ClipDataset([s.pixels for s in samples], [s.caption for s in samples], cfg.num_frames, cfg.resolution)
    result = MotionTrainer(MotionDirector(cfg), pipe, clips, cfg, callback=callback).run()
    prompts = eval_prompts(motion, seeds, seed, eval_shapes, trigger)
    progress = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    attached = MotionDirector.attach(pipe, dict(result.tensors), result.metadata, EVAL_ADAPTER)
    try:
        attached.set_scale(0.0)
        base = sample_clips(pipe, prompts, cfg.num_frames, steps, guidance, seed, size=cfg.resolution)
        attached.set_scale(1.0)
        adapted = sample_clips(pipe, prompts, cfg.num_frames, steps, guidance, seed, size=cfg.resolution)
    finally:
        attached.remove()
        pipe._progress_bar_config = progress
    rate_with, kept_with, moved_with = _shares(detectors, adapted, prompts, motion)
    rate_without, kept_without, moved_without = _shares(detectors, base, prompts, motion)
    return MotionEvalResult(motion=motion, with_adapter=rate_with, without_adapter=rate_without,
                            subject_kept_with=kept_with, subject_kept_without=kept_without, seeds=seeds,
                            prompts=prompts, detected_with=moved_with, detected_without=moved_without,
                            train_clips=train_clips, train_steps=result.steps_done, final_loss=result.final_loss,
                            seconds=time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import warnings
    from pathlib import Path

    from core.pipelines import load_pipeline, resolve_base

    parser = argparse.ArgumentParser(description="Motion-adapter transfer to unseen shapes, judged by the detector")
    parser.add_argument("--base", required=True, help="video base model: AnimateDiff folder or builtin:tiny-video")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where built-in models are kept")
    parser.add_argument("--motion", default="zigzag", choices=HELD_OUT_MOTIONS)
    parser.add_argument("--clips", type=int, default=16, help="training clips")
    parser.add_argument("--steps", type=int, default=DEFAULT_TRAINING["max_steps"], help="training steps")
    parser.add_argument("--rank", type=int, default=DEFAULT_TRAINING["rank"])
    parser.add_argument("--seeds", type=int, default=20, help="sampled clips per side (with / without)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    pipe = load_pipeline(resolve_base(args.base, args.models_dir))
    result = motion_transfer_rate(pipe, args.motion, train_clips=args.clips, seeds=args.seeds,
                                  training={"max_steps": args.steps, "rank": args.rank}, steps=args.sample_steps,
                                  guidance=args.guidance, seed=args.seed)
    print(f"{result.motion}: detected in {result.with_adapter:.0%} of {result.seeds} clips with the adapter, "
          f"{result.without_adapter:.0%} without; prompted shape kept in {result.subject_kept_with:.0%} "
          f"(base {result.subject_kept_without:.0%}); {result.seconds:.0f} s")
    if args.json:
        from core.io import atomic_write_json

        atomic_write_json(args.json, result.to_dict())


if __name__ == "__main__":
    main()
