"""Per-sample adapter routing: one batched UNet call equals sequential per-adapter calls; the UNet is restored."""

from __future__ import annotations

import pytest
import torch

from composition.routing import LoraRouter
from tests.composition.conftest import set_lora


def _inputs(pipe, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    return x, ehs


@pytest.mark.parametrize("mode", ["fused", "lowrank"])
def test_batched_routing_equals_sequential(lora_pipe, mode) -> None:
    unet = lora_pipe.unet
    x, ehs = _inputs(lora_pipe)
    t = torch.tensor(500)
    groups = [{"a": 1.0}, {"b": 0.7}, {"a": 0.5, "b": 1.5}, {}]
    with torch.inference_mode():
        expected = []
        for group in groups:
            set_lora(lora_pipe, group)
            expected.append(unet(x, t, encoder_hidden_states=ehs).sample)
        set_lora(lora_pipe, {})
        router = LoraRouter(unet, mode=mode)
        with router.route(groups):
            batched = unet(x.repeat(len(groups), 1, 1, 1), t, encoder_hidden_states=ehs.repeat(len(groups), 1, 1))
        chunks = batched.sample.chunk(len(groups))
        for got, want in zip(chunks, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (chunks[0] - chunks[1]).abs().max() > 1e-3  # the groups really differ
        after = unet(x, t, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(after, expected[3])  # base restored, peft state untouched
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_routing_refuses_what_it_cannot_serve(lora_pipe) -> None:
    router = LoraRouter(lora_pipe.unet)
    assert router.can_route(["a", "b"])
    assert "no peft LoRA layer" in router.unsupported_reason(["nope"])
    with pytest.raises(ValueError, match="cannot route"), router.route([{"nope": 1.0}]):
        pass
    with pytest.raises(ValueError, match="routing mode"):
        LoraRouter(lora_pipe.unet, mode="fast")


def test_batch_must_split_into_groups(lora_pipe) -> None:
    x, ehs = _inputs(lora_pipe, batch=3)
    with torch.inference_mode(), LoraRouter(lora_pipe.unet).route([{"a": 1.0}, {"b": 1.0}]):
        with pytest.raises(ValueError, match="does not split"):
            lora_pipe.unet(x, 10, encoder_hidden_states=ehs)
    assert not any("forward" in m.__dict__ for m in lora_pipe.unet.modules())
