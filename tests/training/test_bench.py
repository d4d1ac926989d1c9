"""The speed benchmark: its functions run and leave the pipeline untouched; the full comparison is ``slow``."""

from __future__ import annotations

import pytest

from training.base import MethodConfig
from training.bench import baseline_steps_per_s, compare, trainer_steps_per_s
from training.data import ImageCaptionDataset


def test_bench_functions_measure_and_restore(pipe, records) -> None:
    keys = set(pipe.unet.state_dict())
    dataset = ImageCaptionDataset(records, 64)
    assert baseline_steps_per_s(pipe, dataset, MethodConfig(), steps=2, warmup=1) > 0
    assert trainer_steps_per_s(pipe, dataset, MethodConfig(), steps=2, warmup=1) > 0
    assert set(pipe.unet.state_dict()) == keys
    assert not getattr(pipe.unet, "peft_config", {})


@pytest.mark.slow
def test_trainer_beats_the_plain_loop_by_half_again(pipe) -> None:
    result = compare(pipe, rounds=3, steps=30)
    assert result["speedup"] >= 1.5, result
