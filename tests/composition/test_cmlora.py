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


# ---------------------------------------------------------------------------------------- T-LoRA adapters --

TLORA = "t"


def sd_layout_pipe():
    """The tiny pipeline with a UNet laid out like SD 1.5 (cross-attention in the first down and the last up
    block), so the shallow pass of the cache runs attention layers and hence adapter layers."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from core.builtin import UNET_CONFIG, build_pipeline
    from tests.composition.conftest import quiet

    pipe = build_pipeline()
    config = {**UNET_CONFIG, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config)
    return quiet(StableDiffusionPipeline(**{**pipe.components, "unet": unet}))


@pytest.fixture(scope="module")
def tlora_pipe():
    """An SD-layout pipeline with LoRA ``a`` and a real T-LoRA ``t`` (random weights, rank 8 down to 1), attached
    the way generation attaches files: a peft adapter whose rank mask follows the timestep the UNet's pre-hook
    sees."""
    from tests.composition.conftest import add_lora
    from training.methods.tlora import TLoRA, TLoRAConfig

    pipe = sd_layout_pipe()
    assert cache_unsupported_reason(pipe.unet) is None
    method = TLoRA(TLoRAConfig(rank=8, min_rank=1))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in method.inject(pipe.unet):
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    tensors, metadata = method.adapter_state_dict(), method.adapter_metadata()
    method.remove()
    TLoRA.attach(pipe, tensors, metadata, TLORA)
    add_lora(pipe, "a", 11)
    return pipe


def _clock(unet):
    from training.methods.tlora import _CLOCK_ATTR

    return unet.__dict__[_CLOCK_ATTR]


def test_shallow_pass_uses_the_current_timestep_for_tlora(tlora_pipe) -> None:
    from tests.composition.conftest import set_lora

    unet = tlora_pipe.unet
    set_lora(tlora_pipe, {TLORA: 1.0})
    gen = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
    feats: list[torch.Tensor] = []
    with torch.inference_mode():
        with capture_deep_feature(unet, feats):
            full = unet(x, 100, encoder_hidden_states=ehs).sample
        other = unet(x, 900, encoder_hidden_states=ehs).sample  # the last full call ran at another timestep
        shallow = shallow_forward(unet, x, torch.tensor(100), ehs, feats[0])
    assert (other - full).abs().max() > 1e-3  # the rank mask matters at these timesteps
    torch.testing.assert_close(shallow, full)
    assert _clock(unet).timesteps.tolist() == [100]


def test_cmlora_with_tlora_masks_every_pass_with_its_step(tlora_pipe) -> None:
    from tests.composition.conftest import PeftAdapterSet

    unet = tlora_pipe.unet
    adapters = PeftAdapterSet(tlora_pipe, ["a", TLORA])
    weights = {"a": 1.0, TLORA: 0.9}
    assert not adapters.can_route(weights)  # T-LoRA is refused by routing: the composer falls back
    uncached = sample(tlora_pipe, CMLoRAComposer.from_settings({"cache_interval": 1, "use_cache": False}), adapters,
                      weights, REQUEST)
    assert max_diff(sample(tlora_pipe, CMLoRAComposer.from_settings({"cache_interval": 1}), adapters, weights,
                           REQUEST), uncached) == 0

    seen: list[tuple[int, float]] = []
    step = [0]
    last = f"up_blocks.{len(unet.up_blocks) - 1}."  # runs in full and in shallow passes
    lora_a = next(m.lora_A[TLORA] for n, m in unet.named_modules() if n.startswith(last) and n.endswith("attn1.to_q"))
    handle = lora_a.register_forward_hook(lambda *_: seen.append((step[0], float(_clock(unet).timesteps[0]))))
    composer = CMLoRAComposer.from_settings({"cache_interval": 3})
    try:
        report: dict = {}
        cached = sample(tlora_pipe, composer, adapters, weights, REQUEST, report=report,
                        on_step=lambda i, _: step.__setitem__(0, i + 1))
    finally:
        handle.remove()
    timesteps = [float(t) for t in make_timesteps(tlora_pipe, REQUEST.steps)]
    assert report["shallow_passes"] > 0 and report["full_passes"] > 0
    assert {s for s, _ in seen} == set(range(REQUEST.steps))
    assert all(t == timesteps[s] for s, t in seen), seen  # shallow passes no longer see the previous step's mask
    assert max_diff(cached, uncached) > 0  # caching is an approximation, but it ran


def make_timesteps(pipe, steps: int) -> list:
    from composition.sampler import make_scheduler

    scheduler = make_scheduler(pipe)
    scheduler.set_timesteps(steps)
    return list(scheduler.timesteps)
