"""CLoRA: concept parsing, masks that partition the image, contrastive loss, sampling and restoration."""

from __future__ import annotations

import pytest
import torch

from composition.base import COMPOSERS
from composition.methods.clora import (
    CLoRAComposer,
    build_masks,
    contrastive_loss,
    nt_xent,
    parse_concepts,
    token_positions,
)
from composition.sampler import SampleRequest, sample
from tests.composition.conftest import max_diff

REQUEST = SampleRequest("a sks dog near a tree", negative_prompt="blurry", seed=5, steps=4, guidance_scale=7.5)
WEIGHTS = {"a": 1.0, "b": 1.0}
CONCEPTS = {"concepts": "a=dog; b=tree"}


def test_registered_with_documented_settings() -> None:
    assert COMPOSERS.get("clora") is CLoRAComposer and CLoRAComposer.requires_grad
    assert all(f["help"] for f in CLoRAComposer.config_cls.describe())


def test_parse_concepts_and_tokens(lora_pipe) -> None:
    assert parse_concepts("a=dog; b=red, tree", ["a", "b", "c"]) == {"a": ["dog"], "b": ["red", "tree"], "c": ["c"]}
    with pytest.raises(ValueError, match="unknown adapter"):
        parse_concepts("z=dog", ["a"])
    assert parse_concepts("dog; red,cat", ["a", "b"]) == {"a": ["dog"], "b": ["red", "cat"]}
    assert parse_concepts("b=cat; dog", ["a", "b"]) == {"a": ["dog"], "b": ["cat"]}
    with pytest.raises(ValueError, match="3 concept entries"):
        parse_concepts("x; y; z", ["a", "b"])
    with pytest.raises(ValueError, match="word,word"):
        parse_concepts("a=", ["a"])
    tok = lora_pipe.tokenizer
    dog, tree = token_positions(tok, REQUEST.prompt, ["dog"]), token_positions(tok, REQUEST.prompt, ["tree"])
    assert dog and tree and not set(dog) & set(tree) and min(dog) >= 1  # after the start token
    with pytest.raises(ValueError, match="not in the prompt"):
        token_positions(tok, REQUEST.prompt, ["cat"])


@pytest.mark.parametrize("seed", range(5))
def test_masks_are_disjoint_and_cover_the_image(seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(4, 8, 8, 10, generator=gen) ** 4  # base + 3 branches, peaky maps that overlap
    masks = build_masks(maps, [[], [1], [2, 3], [4]], threshold=0.3)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(8, 8))  # every pixel in exactly one mask
    assert masks[1:].sum() > 0
    averaged = build_masks(maps, [[], [1], [2, 3], [4]], threshold=0.3, overlap="average")
    assert (averaged.sum(0) >= 1).all()  # reference mode covers too, overlaps allowed


def test_contrastive_loss_prefers_consistent_concepts() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    crossed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert nt_xent(aligned, labels, 0.5) < nt_xent(crossed, labels, 0.5)
    maps = torch.rand(3, 4, 4, 6, requires_grad=True)
    loss = contrastive_loss(maps, [[1], [2]], 0.5)
    loss.backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_clora_samples_and_restores(lora_pipe, lora_adapters) -> None:
    unet = lora_pipe.unet
    processors = dict(unet.attn_processors)
    composer = CLoRAComposer.from_settings(CONCEPTS)
    image = sample(lora_pipe, composer, lora_adapters, WEIGHTS, REQUEST)
    assert composer.masks is not None and composer.masks.shape == (3, 16, 16)
    assert torch.equal(composer.masks.sum(0), torch.ones(16, 16))
    assert lora_adapters.routes[0] == [{}, {"a": 1.0}, {"b": 1.0}]
    assert dict(unet.attn_processors) == processors  # the very same processor objects are back
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert lora_adapters.calls[-1] == {}
    no_update = sample(lora_pipe, CLoRAComposer.from_settings({**CONCEPTS, "latent_update": False}), lora_adapters,
                       WEIGHTS, REQUEST)
    assert max_diff(image, no_update) > 0  # the latent update changes the result
    sequential = sample(lora_pipe, CLoRAComposer.from_settings({**CONCEPTS, "batched": False}), lora_adapters,
                        WEIGHTS, REQUEST)
    assert max_diff(image, sequential) <= 2


def test_clora_refuses_missing_concept_and_restores(lora_pipe, lora_adapters) -> None:
    processors = dict(lora_pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="not in the prompt"):
        sample(lora_pipe, CLoRAComposer(), lora_adapters, WEIGHTS, REQUEST)  # adapter names 'a'/'b' as words
    assert dict(lora_pipe.unet.attn_processors) == processors


def test_adapter_prompts_override_the_concepts_setting(lora_pipe, lora_adapters) -> None:
    from composition.methods.clora import split_words

    assert split_words(" red, car ,") == ["red", "car"]
    composer = CLoRAComposer(CLoRAComposer.config_cls.from_dict({"concepts": "cat; b=tree"}),
                             adapter_prompts={"a": "dog"})
    assert composer.concepts_for(["a", "b"]) == {"a": ["dog"], "b": ["tree"]}  # 'cat' (slot 1) is overridden
    report: dict = {}
    sample(lora_pipe, composer, lora_adapters, WEIGHTS, REQUEST, report=report)
    assert report["branches"] == ["", "a", "b"] and report["concepts"] == {"a": ["dog"], "b": ["tree"]}
    masks = report["masks"]
    assert masks.shape == (3, 16, 16) and torch.equal(masks.sum(0), torch.ones(16, 16))
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        sample(lora_pipe, CLoRAComposer(composer.config), lora_adapters, WEIGHTS, REQUEST)  # no override: 'cat'


def test_region_overlay_paints_each_branch_in_its_colour() -> None:
    from PIL import Image

    from composition.methods.clora import region_colour, region_overlay

    image = Image.new("RGB", (32, 32), (100, 100, 100))
    masks = torch.zeros(3, 4, 4)
    masks[0, :2], masks[1, 2:, :2], masks[2, 2:, 2:] = 1, 1, 1  # top: base, bottom left: 1, bottom right: 2
    pixels = torch.tensor(list(region_overlay(image, masks, alpha=0.5).getdata())).view(32, 32, 3).float()

    def expected(branch: int) -> torch.Tensor:
        return ((torch.tensor(region_colour(branch)[1]) + 100) / 2).round()

    assert torch.equal(pixels[0, 0], expected(0)) and torch.equal(pixels[31, 0], expected(1))
    assert torch.equal(pixels[31, 31], expected(2)) and region_colour(1)[0] != region_colour(2)[0]
    with pytest.raises(ValueError, match="branches, h, w"):
        region_overlay(image, masks[0])
