"""The motion-transfer measurement, as a smoke test on the untrained tiny-video model: it trains, samples both
sides from the same seeds, asks the shipped detector, and leaves the pipeline as it was. (Its real figures need
the trained world video model.)"""

from __future__ import annotations

import pytest

from training.world.captions import parse_caption
from training.world.motion_eval import EVAL_SHAPES, TRAIN_SHAPES, eval_prompts, motion_transfer_rate, training_clips

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_datasets_keep_train_and_eval_shapes_apart() -> None:
    train = training_clips("orbit", 6)
    assert {o.name for i in range(6) for o in train.labels(i).objects} <= set(TRAIN_SHAPES)
    assert all(train[i].labels.motion == "orbit" for i in range(2))
    prompts = eval_prompts("orbit", 6)
    assert len(set(prompts)) > 1 and all(" moving on " in p for p in prompts)
    assert {parse_caption(p)[0].objects[0].name for p in prompts} <= set(EVAL_SHAPES)
    with pytest.raises(ValueError, match="held-out"):
        training_clips("left", 2)


def test_motion_transfer_rate_smoke_on_tiny_video() -> None:
    from core.builtin import build_video_pipeline

    pipe = build_video_pipeline()
    keys = set(pipe.unet.state_dict())
    result = motion_transfer_rate(pipe, "zigzag", train_clips=2, seeds=2, steps=2,
                                  training={"rank": 2, "max_steps": 2, "num_frames": 4, "resolution": 32})
    assert result.seeds == 2 and len(result.prompts) == 2
    assert len(result.detected_with) == len(result.detected_without) == 2
    assert all(0.0 <= x <= 1.0 for x in (result.with_adapter, result.without_adapter, result.subject_kept_with,
                                         result.subject_kept_without))
    assert result.train_steps == 2 and result.to_dict()["motion"] == "zigzag"
    assert set(pipe.unet.state_dict()) == keys and not getattr(pipe.unet, "peft_config", {})
