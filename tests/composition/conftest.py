"""Shared fixtures: the tiny built-in pipeline and an AdapterSet over real peft LoRA adapters on its UNet."""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from composition.routing import router_for
from composition.sampler import SampleRequest
from core.builtin import build_pipeline

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTERS = {"a": 11, "b": 12}  # name -> init seed


class PeftAdapterSet:
    """AdapterSet over peft LoRA adapters added to the UNet, switched with diffusers' pipeline LoRA API."""

    def __init__(self, pipe, names: list[str]) -> None:
        self.pipe = pipe
        self._names = list(names)
        self.calls: list[dict[str, float]] = []
        self.routes: list[list[dict[str, float]]] = []

    def names(self) -> list[str]:
        return list(self._names)

    def apply(self, weights: dict[str, float]) -> None:
        self.calls.append(dict(weights))
        set_lora(self.pipe, weights)

    def can_route(self, names) -> bool:
        return router_for(self.pipe.unet).can_route(names)

    def route(self, groups):
        self.routes.append([dict(g) for g in groups])
        return router_for(self.pipe.unet).route(groups)


class NoAdapters:
    """An empty AdapterSet that records its calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, float]] = []

    def names(self) -> list[str]:
        return []

    def apply(self, weights: dict[str, float]) -> None:
        self.calls.append(dict(weights))


def set_lora(pipe, weights: dict[str, float]) -> None:
    """Activate ``weights`` through diffusers (``set_adapters`` does not re-enable layers after ``disable_lora``)."""
    if not weights:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(weights), list(weights.values()))


def add_lora(pipe, name: str, seed: int) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        pipe.unet.add_adapter(config, adapter_name=name)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, request: SampleRequest) -> Image.Image:
    """The same request through diffusers' own ``pipe(...)``."""
    return pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator().manual_seed(request.seed),
        width=request.width,
        height=request.height,
    ).images[0]


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every composition test module runs on one torch thread (see ``tests/conftest.py``)."""


@pytest.fixture(scope="module")
def pipe():
    return quiet(build_pipeline())


@pytest.fixture(scope="module")
def lora_pipe():
    pipe = quiet(build_pipeline())
    for name, seed in ADAPTERS.items():
        add_lora(pipe, name, seed)
    return pipe


@pytest.fixture
def lora_adapters(lora_pipe) -> PeftAdapterSet:
    return PeftAdapterSet(lora_pipe, list(ADAPTERS))
