"""CMLoRA: schedule, profile, shallow pass, cache interval 1 = uncached form, batched = sequential, restoration."""

from __future__ import annotations

import pytest
import torch

from composition.base import COMPOSERS
from composition.methods.cmlora import (
    CMLoRAComposer,
    dominant_shares,
    high_frequency_score,
    refresh_schedule,
)
from composition.methods.composite import CompositeComposer
from composition.sampler import SampleRequest, sample
from composition.unet_cache import cache_unsupported_reason, capture_deep_feature, shallow_forward
from tests.composition.conftest import max_diff

REQUEST = SampleRequest("a sks dog near a tree", negative_prompt="blurry", seed=5, steps=6, guidance_scale=7.5)
WEIGHTS = {"a": 1.0, "b": 0.8}


def test_registered_with_documented_settings() -> None:
    assert COMPOSERS.get("cmlora") is CMLoRAComposer
    assert all(f["help"] for f in CMLoRAComposer.config_cls.describe())


def test_schedules_and_weights() -> None:
    assert refresh_schedule(1, 4) == [True] * 4
    assert refresh_schedule(3, 7) == [True, False, False, True, False, False, True]
    nonuniform = [i for i, r in enumerate(refresh_schedule(0, 16)) if r]
    assert nonuniform == [0, 2, 4, 6, 9, 12, 15]
    assert dominant_shares(3, 1, True) == pytest.approx([2 / 9, 5 / 9, 2 / 9])
    assert sum(dominant_shares(5, 0, True)) == pytest.approx(1.0)
    assert dominant_shares(2, 0, False) == [0.5, 0.5]


def test_high_frequency_score_is_measured() -> None:
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.sin(xx / 16 * 2 * torch.pi).expand(4, 16, 16)
    checker = ((yy + xx) % 2 * 2 - 1).expand(4, 16, 16)
    assert high_frequency_score(checker, 0.28) > 0.9 > 0.1 > high_frequency_score(smooth, 0.28)


def test_shallow_pass_with_fresh_cache_equals_full_pass(lora_pipe) -> None:
    unet = lora_pipe.unet
    assert cache_unsupported_reason(unet) is None
    gen = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
    feats: list[torch.Tensor] = []
    with torch.inference_mode():
        with capture_deep_feature(unet, feats):
            full = unet(x, 321, encoder_hidden_states=ehs).sample
        shallow = shallow_forward(unet, x, torch.tensor(321), ehs, feats[0])
    torch.testing.assert_close(shallow, full)


def test_cache_interval_one_equals_uncached(lora_pipe, lora_adapters) -> None:
    cached = sample(lora_pipe, CMLoRAComposer.from_settings({"cache_interval": 1}), lora_adapters, WEIGHTS, REQUEST)
    uncached = sample(lora_pipe, CMLoRAComposer.from_settings({"cache_interval": 1, "use_cache": False}),
                      lora_adapters, WEIGHTS, REQUEST)
    assert max_diff(cached, uncached) == 0


def test_uniform_uncached_equals_composite(lora_pipe, lora_adapters) -> None:
    plain = CMLoRAComposer.from_settings({"use_cache": False, "dominant_weighting": False})
    image = sample(lora_pipe, plain, lora_adapters, WEIGHTS, REQUEST)
    assert max_diff(image, sample(lora_pipe, CompositeComposer(), lora_adapters, WEIGHTS, REQUEST)) <= 1


def test_cached_runs_shallow_passes_and_restores(lora_pipe, lora_adapters) -> None:
    composer = CMLoRAComposer.from_settings({"cache_interval": 2})
    processors = {k: type(v) for k, v in lora_pipe.unet.attn_processors.items()}
    batched = sample(lora_pipe, composer, lora_adapters, WEIGHTS, REQUEST)
    # step 0: both adapters + the base (profile) in one call; refresh steps 2, 4: 1 full + 1 shallow; others shallow
    assert [len(r) for r in lora_adapters.routes] == [3, 2, 1, 1, 2, 1, 1, 2]
    assert lora_adapters.calls[-1] == {}
    assert {k: type(v) for k, v in lora_pipe.unet.attn_processors.items()} == processors
    assert not any("forward" in m.__dict__ for m in lora_pipe.unet.modules())
    sequential = sample(lora_pipe, CMLoRAComposer.from_settings({"cache_interval": 2, "batched": False}),
                        lora_adapters, WEIGHTS, REQUEST)
    assert max_diff(batched, sequential) <= 1
