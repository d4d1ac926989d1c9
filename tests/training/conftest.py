"""Fixtures for the training tests: the tiny built-in pipeline, small images, fast configs, a recording callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import training.methods  # noqa: F401  (registers the methods)
from training.methods.lora import LoRAConfig

FAST = {"max_steps": 4, "batch_size": 2, "preview_every": 0, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def pipe():
    from core.builtin import build_pipeline

    return build_pipeline()


@pytest.fixture(scope="module")
def _second_pipe():
    """Another tiny pipeline, to load back what was trained on ``pipe`` (each module's ``fresh_pipe`` cleans it)."""
    from core.builtin import build_pipeline

    return build_pipeline()


def save_trained(path: Path, method_name: str, config: Any, result: Any) -> dict[str, str]:
    """Save a ``TrainResult`` as an adapter file of the built-in base (subject, trigger "sks"); returns its header."""
    from core.io import save_safetensors
    from training.artifact import adapter_file_metadata

    metadata = adapter_file_metadata(method_name, config, "builtin:tiny-sd", "0" * 16, ["sks"], "subject",
                                     result.steps_done, method_metadata=result.metadata)
    save_safetensors(path, result.tensors, metadata)
    return metadata


def write_images(folder: Path, count: int = 3, size: int = 64, seed: int = 0) -> list[tuple[Path, str]]:
    """``count`` PNGs of a coloured square on a plain background, with captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        pixels = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        pixels[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        records.append((path, f"a red square on a plain background {i}"))
    return records


@pytest.fixture()
def records(tmp_path: Path) -> list[tuple[Path, str]]:
    return write_images(tmp_path / "images")


def lora_config(**overrides: Any) -> LoRAConfig:
    return LoRAConfig.from_dict({**FAST, **overrides})


class Recorder:
    """A ``TrainerCallback`` that keeps everything it is told; stops (or crashes) after a given step."""

    def __init__(self, stop_after: int | None = None, crash_at: int | None = None) -> None:
        self.steps: list[tuple[int, int, float, float, float]] = []
        self.previews: list[tuple[int, Image.Image]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.stop_after = stop_after
        self.crash_at = crash_at

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None:
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        self.steps.append((step, total, loss, it_per_s, eta_s))

    def on_preview(self, step: int, image: Image.Image) -> None:
        self.previews.append((step, image))

    def on_checkpoint(self, step: int, path: str) -> None:
        self.checkpoints.append((step, path))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def unet_inputs(pipe, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed UNet inputs (latents, timesteps, text embeddings) for comparing outputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    embeds = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return latents, torch.tensor([10, 600]), embeds


@torch.no_grad()
def unet_out(pipe, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return pipe.unet(*inputs, return_dict=False)[0]
