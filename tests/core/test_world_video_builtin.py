"""The shipped world video model: it is the default video base, it loads through the public loader as an
AnimateDiff pipeline (v-prediction on a zero-terminal-SNR schedule), and 20-step clips of fixed held-in prompts show
the asked shape making the asked straight move, as the world's clip detector judges them; with the same starting
noise, the opposite direction word reverses the move (the words set the direction, not the noise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.builtin import BUILTIN_PREFIX, DEFAULT_VIDEO_BUILTIN, SHIPPED_DIR, WORLD_VIDEO
from core.pipelines import load_pipeline, resolve_base
from training.world.captions import parse_caption
from training.world.concepts import BASE_MOTIONS
from training.world.detectors import load_detectors
from training.world.train_video import AXIS, generate_clips, reversed_caption, video_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_world_video_is_shipped_small_and_the_default_video_base() -> None:
    folder = SHIPPED_DIR / WORLD_VIDEO
    assert (folder / "model_index.json").is_file() and DEFAULT_VIDEO_BUILTIN == WORLD_VIDEO
    weights = list(folder.rglob("*.safetensors"))
    assert {"unet", "vae", "text_encoder"} <= {w.parent.name for w in weights}
    assert sum(w.stat().st_size for w in weights) < 30 * 2**20
    assert (folder / "training.json").is_file() and (folder / "metrics.json").is_file()


def test_20_step_clips_show_the_asked_shape_moving(tmp_path: Path) -> None:
    source = resolve_base(f"{BUILTIN_PREFIX}{WORLD_VIDEO}", tmp_path)
    pipe = load_pipeline(source)
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    prompts = video_prompts(8)  # the first eight of the fixed held-in clip prompts of the quality bar
    clips = generate_clips(pipe, prompts, steps=20, guidance=4.0)
    assert clips.shape == (8, 8, 64, 64, 3)
    seen = load_detectors().detect_clips(list(clips))
    asked = [parse_caption(p)[0] for p in prompts]
    moves = [s.motion for s in seen]
    assert sum(m in BASE_MOTIONS for m in moves) >= 7, moves  # a straight move, not still or jittering
    axis = [AXIS.get(m) == AXIS[a.motion] for a, m in zip(asked, moves)]
    assert sum(axis) >= 7, list(zip([a.motion for a in asked], moves))  # horizontal or vertical as asked
    direction = [m == a.motion for a, m in zip(asked, moves)]
    assert sum(direction) >= 6, list(zip([a.motion for a in asked], moves))
    shapes = [a.objects[0].name in {o.name for o in s.objects} for a, s in zip(asked, seen)]
    assert sum(shapes) >= 5, shapes


def test_the_opposite_word_reverses_the_move_from_the_same_noise(tmp_path: Path) -> None:
    pipe = load_pipeline(resolve_base(f"{BUILTIN_PREFIX}{WORLD_VIDEO}", tmp_path))
    prompts = video_prompts(12)[8:]  # four fixed prompts the other test does not sample
    opposite = [reversed_caption(p) for p in prompts]
    clips = generate_clips(pipe, prompts, steps=20, guidance=4.0, seed=100)
    flipped = generate_clips(pipe, opposite, steps=20, guidance=4.0, seed=100)  # the same seeds, so the same noise
    seen = [s.motion for s in load_detectors().detect_clips([*clips, *flipped])]
    asked = [parse_caption(p)[0].motion for p in [*prompts, *opposite]]
    assert sum(s == a for s, a in zip(seen, asked)) >= 6, list(zip(asked, seen))
