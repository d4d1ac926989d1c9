"""Shared fixtures: a session-wide built-in model folder, settings on a temp data dir, small test images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models folder for the whole run, so the built-in models are built (or copied) once."""
    from core.builtin import DEFAULT_BUILTIN, TINY_SD, ensure_builtin

    folder = tmp_path_factory.mktemp("models")
    for name in {DEFAULT_BUILTIN, TINY_SD}:
        ensure_builtin(folder, name)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread: tiny models gain nothing from more, and spinning OpenMP threads crawl on
    a busy shared CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def settings(tmp_path: Path, models_dir: Path):
    from services.settings import Settings

    # the tests' jobs train on the random tiny model: a mechanism shows on it as well, and it never changes
    return Settings(data_dir=tmp_path / "data", models_path=models_dir, base_model="builtin:tiny-sd",
                    lease_seconds=30.0, heartbeat_seconds=1.0, poll_seconds=0.05)


def write_images(folder: Path, count: int, size: int = 64, captions: bool = True, seed: int = 0) -> list[Path]:
    """Small PNGs of a coloured disc on a plain background (each with a kohya-style caption)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        background = rng.integers(0, 255, 3)
        colour = rng.integers(0, 255, 3)
        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (size // 5) ** 2
        pixels = np.where(disc[..., None], colour, background).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        if captions:
            (folder / f"img{i}.txt").write_text(f"a disc on a plain background, view {i}")
        paths.append(path)
    return paths


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    write_images(folder, 3)
    return folder
