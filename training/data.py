"""Training images and their prompts.

Images arrive already normalized (RGB PNG); here they are only resized so the shorter side equals the training
resolution, center-cropped to a square and scaled to [-1, 1], the VAE's input range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PROMPT_KINDS = ("subject", "style", "motion")
_WORD = re.compile(r"[\w'-]+")


def load_square(path: str | Path, resolution: int) -> Image.Image:
    """Open ``path`` as RGB, resize its shorter side to ``resolution`` (bicubic) and center-crop a square."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a float CHW tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(Dataset):
    """(image, caption) pairs; ``__getitem__`` returns ``{"pixels": (3, R, R) tensor in [-1, 1], "caption": str}``."""

    def __init__(self, records: Sequence[tuple[Path, str]], resolution: int, flip: bool = False) -> None:
        if not records:
            raise ValueError("the dataset has no images")
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.records = [(Path(p), str(c or "")) for p, c in records]
        missing = [str(p) for p, _ in self.records if not p.is_file()]
        if missing:
            raise ValueError(f"missing image file(s): {', '.join(missing[:5])}")
        self.resolution = resolution
        self.flip = flip

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.records]

    def image(self, index: int) -> Image.Image:
        return load_square(self.records[index][0], self.resolution)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        pixels = to_tensor(self.image(index))
        if self.flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixels": pixels, "caption": self.records[index][1]}


def build_prompt(caption: str, trigger_word: str, kind: str = "subject") -> str:
    """The training prompt of one image.

    For a subject the trigger word is prepended unless the caption already contains it as a word; a style (or
    motion) caption is used as it is, and an empty caption falls back to the trigger word.
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(PROMPT_KINDS)}, got {kind!r}")
    caption = " ".join(caption.split())
    trigger = trigger_word.strip()
    if not caption:
        return trigger
    if kind == "subject" and trigger and not _contains_words(caption, trigger):
        return f"{trigger} {caption}"
    return caption


def _contains_words(text: str, phrase: str) -> bool:
    words, wanted = _WORD.findall(text.lower()), _WORD.findall(phrase.lower())
    n = len(wanted)
    return n > 0 and any(words[i:i + n] == wanted for i in range(len(words) - n + 1))
