"""Method registry, config validation, prompts and the image dataset (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.base import METHODS, MethodConfig
from training.data import ImageCaptionDataset, build_prompt
from training.methods.lora import LoRA, LoRAConfig


def test_registry_lists_lora() -> None:
    assert "lora" in METHODS.names()
    assert METHODS.get("lora") is LoRA
    assert LoRA.config_cls is LoRAConfig
    with pytest.raises(KeyError, match="known: .*lora"):
        METHODS.get("no_such_method")


def test_defaults() -> None:
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.learning_rate, cfg.max_steps, cfg.batch_size, cfg.resolution) == (8, 1e-4, 200, 2, 64)
    assert cfg.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.effective_alpha == 8.0
    assert LoRAConfig.from_dict({"rank": 4, "alpha": 16}).effective_alpha == 16.0
    assert cfg.flip is False and cfg.mixed_precision == "no"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"rank": "many"}, "rank must be of type int"),
        ({"bogus": 1}, "unknown setting.*bogus"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"resolution": 60}, "multiple of 8"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of no, fp16, bf16"),
        ({"target_modules": ""}, "target_modules"),
        ({"timestep_bias": 2}, "timestep_bias must be <= 1"),
        ({"init": "zeros"}, "init must be one of"),
    ],
)
def test_config_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig.from_dict(data)


def test_every_setting_is_documented() -> None:
    fields = LoRAConfig.describe()
    assert all(f["help"] for f in fields)
    advanced = {f["name"] for f in fields if f["advanced"]}
    assert {"timestep_bias", "noise_offset", "mixed_precision", "target_modules"} <= advanced
    assert "rank" not in advanced and "learning_rate" not in advanced


def test_method_needs_its_own_config() -> None:
    with pytest.raises(TypeError, match="LoRAConfig"):
        LoRA(MethodConfig())
    assert isinstance(LoRA.from_dict({"rank": 2}).config, LoRAConfig)


@pytest.mark.parametrize(
    ("caption", "kind", "expected"),
    [
        ("a dog on the grass", "subject", "sks a dog on the grass"),
        ("a photo of sks, sitting", "subject", "a photo of sks, sitting"),
        ("SKS dog", "subject", "SKS dog"),
        ("a sksy thing", "subject", "sks a sksy thing"),
        ("", "subject", "sks"),
        ("watercolor landscape", "style", "watercolor landscape"),
        ("  two   spaces ", "style", "two spaces"),
    ],
)
def test_build_prompt(caption: str, kind: str, expected: str) -> None:
    assert build_prompt(caption, "sks", kind) == expected


def test_build_prompt_multiword_trigger_and_bad_kind() -> None:
    assert build_prompt("photo of ohwx man smiling", "ohwx man") == "photo of ohwx man smiling"
    assert build_prompt("photo of a man", "ohwx man") == "ohwx man photo of a man"
    with pytest.raises(ValueError, match="kind must be one of"):
        build_prompt("x", "sks", "sculpture")


def test_dataset_resizes_and_center_crops(tmp_path: Path) -> None:
    array = np.zeros((96, 64, 3), np.uint8)  # tall: 64 wide, 96 high
    array[:16] = 255  # white band at the top is cropped away
    array[40:56, :32] = [255, 0, 0]
    path = tmp_path / "tall.png"
    Image.fromarray(array).save(path)
    ds = ImageCaptionDataset([(path, "caption")], resolution=32)
    item = ds[0]
    pixels = item["pixels"]
    assert item["caption"] == "caption" and len(ds) == 1
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[:, 0, :].mean() < 0  # the top row is no longer white
    red = pixels[0] > 0.5
    assert red[:, :16].any() and not red[:, 16:].any()  # no flip by default: red stays on the left


def test_dataset_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionDataset([], 64)
    with pytest.raises(ValueError, match="missing image"):
        ImageCaptionDataset([(tmp_path / "nope.png", "")], 64)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageCaptionDataset([(tmp_path / "a.png", "")], 60)
