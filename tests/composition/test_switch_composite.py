"""LoRA Switch and LoRA Composite through ``sample()``: reductions to a single adapter, schedule, restoration."""

from __future__ import annotations

import pytest
import torch

from composition.base import COMPOSERS, RoutableAdapterSet
from composition.methods.composite import CompositeComposer
from composition.methods.merge import MergeComposer
from composition.methods.switch import SwitchComposer
from composition.sampler import SampleRequest, sample
from core.builtin import build_pipeline
from tests.composition.conftest import PeftAdapterSet, add_lora, max_diff, quiet

REQUEST = SampleRequest("a sks dog near a tree", negative_prompt="blurry", seed=5, steps=4, guidance_scale=7.5)
COPIES = ["a", "a2", "a3"]


@pytest.fixture(scope="module")
def copies_pipe():
    """Three adapters with identical weights (same init seed) plus a different one."""
    pipe = quiet(build_pipeline())
    for name in COPIES:
        add_lora(pipe, name, 11)
    add_lora(pipe, "b", 12)
    return pipe


def unet_state(pipe) -> tuple:
    unet = pipe.unet
    processors = tuple(sorted((k, type(v).__name__) for k, v in unet.attn_processors.items()))
    patched = tuple(n for n, m in unet.named_modules() if "forward" in m.__dict__)
    return processors, patched


def base_output(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    ehs = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.inference_mode():
        return pipe.unet(x, 300, encoder_hidden_states=ehs).sample


def test_registry_lists_new_composers() -> None:
    assert {"switch", "composite"} <= set(COMPOSERS.names())
    for name in ("switch", "composite"):
        for field in COMPOSERS.get(name).config_cls.describe():
            assert field["help"], field


@pytest.mark.parametrize("routed", [True, False])
def test_switch_one_adapter_equals_that_adapter(lora_pipe, lora_adapters, routed) -> None:
    alone = sample(lora_pipe, MergeComposer(), lora_adapters, {"a": 0.8}, REQUEST)
    composer = SwitchComposer.from_settings({"interval": 1, "routed": routed})
    switched = sample(lora_pipe, composer, lora_adapters, {"a": 0.8}, REQUEST)
    assert max_diff(switched, alone) <= 1


def test_switch_schedule_and_order() -> None:
    composer = SwitchComposer.from_settings({"interval": 2, "order": "c, a"})
    assert composer.rotation({"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}) == ["c", "a", "b"]
    assert [composer.index_at(j, 3) for j in range(8)] == [0, 0, 0, 1, 1, 2, 2, 0]
    plain = SwitchComposer.from_settings({"interval": 2, "reference_schedule": False})
    assert [plain.index_at(j, 3) for j in range(7)] == [0, 0, 1, 1, 2, 2, 0]
    with pytest.raises(ValueError, match="unknown adapter"):
        composer.rotation({"a": 1.0})
    by_slot = SwitchComposer.from_settings({"order": "3,1"})
    assert by_slot.rotation({"x": 1.0, "y": 1.0, "z": 1.0}) == ["z", "x", "y"]
    with pytest.raises(ValueError):
        SwitchComposer.from_settings({"interval": 0})


def test_switch_routes_the_scheduled_adapter(lora_pipe, lora_adapters) -> None:
    composer = SwitchComposer.from_settings({"interval": 1})
    sample(lora_pipe, composer, lora_adapters, {"a": 1.0, "b": 0.5}, REQUEST)
    assert lora_adapters.routes == [[{"a": 1.0}], [{"a": 1.0}], [{"b": 0.5}], [{"a": 1.0}]]
    assert lora_adapters.calls == [{"a": 1.0}, {}]  # prompt encoded with the first adapter, base restored


@pytest.mark.parametrize("batched", [True, False])
def test_composite_of_copies_equals_the_adapter(copies_pipe, batched) -> None:
    adapters = PeftAdapterSet(copies_pipe, [*COPIES, "b"])
    alone = sample(copies_pipe, MergeComposer(), adapters, {"a": 1.0}, REQUEST)
    composer = CompositeComposer.from_settings({"batched": batched})
    composed = sample(copies_pipe, composer, adapters, dict.fromkeys(COPIES, 1.0), REQUEST)
    assert max_diff(composed, alone) <= 1
    # composite of two different adapters differs from either alone
    mixed = sample(copies_pipe, composer, adapters, {"a": 1.0, "b": 1.0}, REQUEST)
    assert max_diff(mixed, alone) > 3


def test_composite_batched_equals_sequential_and_restores(copies_pipe) -> None:
    adapters = PeftAdapterSet(copies_pipe, [*COPIES, "b"])
    before, base = unet_state(copies_pipe), base_output(copies_pipe)
    weights = {"a": 0.9, "b": 1.2}
    batched = sample(copies_pipe, CompositeComposer(), adapters, weights, REQUEST)
    assert adapters.routes and all(len(r) == 2 for r in adapters.routes)
    chunked = sample(copies_pipe, CompositeComposer.from_settings({"max_adapters_per_call": 1}), adapters, weights,
                     REQUEST)
    sequential = sample(copies_pipe, CompositeComposer.from_settings({"batched": False}), adapters, weights, REQUEST)
    assert max_diff(batched, sequential) <= 1 and max_diff(chunked, sequential) <= 1
    assert adapters.calls[-1] == {}
    assert unet_state(copies_pipe) == before
    torch.testing.assert_close(base_output(copies_pipe), base)


def test_switch_restores_after_cancel(lora_pipe, lora_adapters) -> None:
    before, base = unet_state(lora_pipe), base_output(lora_pipe)

    def on_step(i: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(lora_pipe, SwitchComposer(), lora_adapters, {"a": 1.0, "b": 1.0}, REQUEST, on_step=on_step)
    assert unet_state(lora_pipe) == before
    assert lora_adapters.calls[-1] == {}
    torch.testing.assert_close(base_output(lora_pipe), base)


def test_production_adapter_set_routes(copies_pipe) -> None:
    from services.runtime import PeftAdapterSet as RuntimeAdapterSet

    production = RuntimeAdapterSet(copies_pipe, [*COPIES, "b"])
    assert isinstance(production, RoutableAdapterSet) and production.can_route(["a", "b"])
    weights = {"a": 1.0, "b": 0.7}
    ours = sample(copies_pipe, CompositeComposer(), production, weights, REQUEST)
    reference = sample(copies_pipe, CompositeComposer.from_settings({"batched": False}),
                       PeftAdapterSet(copies_pipe, [*COPIES, "b"]), weights, REQUEST)
    assert max_diff(ours, reference) <= 1
    with pytest.raises(KeyError, match="not loaded"):
        production.route([{"zzz": 1.0}])
