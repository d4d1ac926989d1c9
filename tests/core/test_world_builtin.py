"""The shipped world base model: it is the default, it loads through the public loader like any other model, and
a 20-step generation shows what fixed held-in prompts ask for, as the world's detectors judge it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.builtin import BUILTIN_PREFIX, DEFAULT_BUILTIN, SHIPPED_DIR, WORLD_SD
from core.pipelines import load_pipeline, resolve_base
from training.world.captions import parse_caption
from training.world.detectors import detect
from training.world.train_base import generate, obeys, quality_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_world_sd_is_shipped_small_and_the_default() -> None:
    folder = SHIPPED_DIR / WORLD_SD
    assert (folder / "model_index.json").is_file() and DEFAULT_BUILTIN == WORLD_SD
    weights = list(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) < 30 * 2**20  # "a few tens of MB at most"
    assert (folder / "training.json").is_file() and (folder / "metrics.json").is_file()


def test_a_20_step_generation_shows_the_asked_scene(tmp_path: Path) -> None:
    source = resolve_base(f"{BUILTIN_PREFIX}{WORLD_SD}", tmp_path)
    assert source.kind == "builtin"
    pipe = load_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    prompts = quality_prompts(8)  # the first eight of the 200 fixed held-in prompts of the quality bar
    images = generate(pipe, prompts, steps=20, guidance=4.0)
    verdicts = [obeys(parse_caption(p)[0], seen) for p, seen in zip(prompts, detect(images))]
    assert sum(v["scene"] for v in verdicts) >= 6, verdicts  # shape, colour and background as asked
    assert sum(v["background"] for v in verdicts) >= 7, verdicts  # 99.5 % of the 200 (a big white square on a
    # blue checkered background, third of these eight, reads as a white background)
