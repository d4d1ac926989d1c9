"""LoRA Merge over real peft LoRA adapters: equal to diffusers' own multi-adapter path and to folded weights."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from composition.base import COMPOSERS, Composer
from composition.methods.merge import MergeComposer, MergeConfig
from composition.sampler import SampleRequest, sample
from core.builtin import build_pipeline
from tests.composition.conftest import ADAPTERS, max_diff, quiet, reference_image, set_lora

REQUEST = SampleRequest("a sks dog near a tree", negative_prompt="blurry", seed=5, steps=4, guidance_scale=7.5)


def diffusers_image(pipe, weights: dict[str, float]):
    set_lora(pipe, weights)
    return reference_image(pipe, REQUEST)


def test_merge_one_adapter_equals_that_adapter_through_diffusers(lora_pipe, lora_adapters) -> None:
    image = sample(lora_pipe, MergeComposer(), lora_adapters, {"a": 1.0}, REQUEST)
    assert max_diff(image, diffusers_image(lora_pipe, {"a": 1.0})) <= 1
    assert max_diff(image, diffusers_image(lora_pipe, {})) > 10  # the adapter really changes the image
    assert lora_adapters.calls == [{"a": 1.0}, {}]  # applied once, base restored by teardown


def test_merge_weights_equal_diffusers_set_adapters(lora_pipe, lora_adapters) -> None:
    weights = {"a": 0.6, "b": 1.3}
    image = sample(lora_pipe, MergeComposer(), lora_adapters, weights, REQUEST)
    assert max_diff(image, diffusers_image(lora_pipe, weights)) <= 1
    assert max_diff(image, diffusers_image(lora_pipe, {"a": 0.6})) > 10


def test_merge_is_the_weighted_sum_of_deltas(lora_pipe, lora_adapters) -> None:
    """Independent oracle: fold ``sum_i w_i * scaling_i * B_i A_i`` into a fresh copy of the base weights."""
    composer = MergeComposer.from_settings({"normalize": True})
    image = sample(lora_pipe, composer, lora_adapters, {"a": 1.0, "b": 3.0}, REQUEST)
    # Same base UNet weights (seeded), but the tokenizer and text encoder of ``lora_pipe``: the built-in BPE
    # tokenizer is not reproducible between two builds in one process.
    folded = quiet(type(lora_pipe)(**{**lora_pipe.components, "unet": build_pipeline().unet}))
    merged = {"a": 0.25, "b": 0.75}
    with torch.no_grad():
        for name, module in lora_pipe.unet.named_modules():
            if isinstance(module, LoraLayer):
                target = folded.unet.get_submodule(name)
                for adapter, w in merged.items():
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                    target.weight += w * module.lora_alpha[adapter] / module.r[adapter] * delta
    assert max_diff(image, reference_image(folded, REQUEST)) <= 2


def test_zero_weight_equals_base_model(lora_pipe, lora_adapters) -> None:
    image = sample(lora_pipe, MergeComposer(), lora_adapters, {"a": 0.0}, REQUEST)
    assert max_diff(image, diffusers_image(lora_pipe, {})) <= 1
    assert lora_adapters.calls == [{}]  # zero weights are skipped, nothing to restore


def test_cancel_restores_base_model(lora_pipe, lora_adapters) -> None:
    def on_step(i: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(lora_pipe, MergeComposer(), lora_adapters, {"a": 1.0, "b": 0.5}, REQUEST, on_step=on_step)
    assert lora_adapters.calls == [{"a": 1.0, "b": 0.5}, {}]


def test_merge_config_is_self_describing() -> None:
    assert COMPOSERS.get("merge").config_cls is MergeConfig
    fields = {f["name"]: f for f in MergeConfig.describe()}
    assert set(fields) == {"normalize", "routed"}
    assert fields["normalize"]["default"] is False and "sum" in fields["normalize"]["help"]
    assert fields["routed"]["default"] is True and "routing" in fields["routed"]["help"]
    assert MergeComposer.from_settings({"normalize": "yes"}).config.normalize is True
    with pytest.raises(ValueError, match="unknown setting"):
        MergeComposer.from_settings({"tau": 5})
    assert MergeComposer(MergeConfig(normalize=True)).merged_weights({"a": 2.0, "b": -2.0, "c": 0.0}) == {
        "a": 0.5,
        "b": -0.5,
    }
    assert set(ADAPTERS) == {"a", "b"}


class _PerAdapterAverage(Composer):
    """Composite-style sketch: one CFG call per adapter through ``ctx.activate`` and ``unet_fn``, averaged."""

    def predict_noise(self, ctx, unet_fn):
        preds = []
        for name, weight in ctx.weights.items():
            ctx.activate({name: weight})
            preds.append(ctx.guide(unet_fn()))
        return torch.stack(preds).mean(0)


def test_hooks_express_per_adapter_passes(lora_pipe, lora_adapters) -> None:
    single = sample(lora_pipe, _PerAdapterAverage(), lora_adapters, {"a": 1.0}, REQUEST)
    assert max_diff(single, diffusers_image(lora_pipe, {"a": 1.0})) <= 1
    assert lora_adapters.calls == [{"a": 1.0}, {}]  # unchanged activations are not re-applied
    lora_adapters.calls.clear()
    sample(lora_pipe, _PerAdapterAverage(), lora_adapters, {"a": 1.0, "b": 1.0}, REQUEST)
    assert len(lora_adapters.calls) == 1 + 2 * REQUEST.steps + 1  # all before encoding, 2 per step, teardown
