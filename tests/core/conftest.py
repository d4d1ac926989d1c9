"""Shared fixtures for the base-model loader tests: an offline, isolated Hugging Face setup and the tiny model.

Every test runs with ``HF_HUB_OFFLINE=1``, with ``HF_HOME`` / ``HF_HUB_CACHE`` pointing at empty folders (so a
developer's real cache never changes the outcome) and with DNS and socket connects refused and recorded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from core.builtin import ensure_builtin
from core.devices import DevicePlacement
from core.pipelines import load_pipeline, resolve_base
from tests.core.checkpoint_convert import write_single_file

HUB_ID = "someorg/tiny-sd"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "a red circle on a striped background"
CPU32 = DevicePlacement(torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Downloads off and an empty hub cache for every test; returns that cache folder."""
    empty = tmp_path / "empty-hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return empty / "hub"


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Refuse name lookups and connections; the list records every attempt."""
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[:3])
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def builtin_folder(models_dir: Path) -> Path:
    return ensure_builtin(models_dir)


@pytest.fixture(scope="session")
def single_file(builtin_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model as one original-layout SD 1.x checkpoint, as A1111/Civitai users have them."""
    return write_single_file(builtin_folder, tmp_path_factory.mktemp("ckpt") / "tiny-sd-ldm.safetensors")


@pytest.fixture(scope="session")
def folder_pipe(builtin_folder: Path, models_dir: Path):
    """The built-in model loaded from its diffusers folder (shared: tests must not change it)."""
    return load_pipeline(resolve_base(str(builtin_folder), models_dir), CPU32)


def make_hub_cache(cache: Path, folder: Path, repo_id: str = HUB_ID, commit: str = HUB_COMMIT,
                   weights: bool = True) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a repo: blobs, a snapshot of symlinks, and ``refs/main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if rel.name.startswith(".") or (not weights and f.suffix == ".safetensors"):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(builtin_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    make_hub_cache(cache, builtin_folder)
    return cache


def generate(pipe, seed: int = 0) -> np.ndarray:
    """A 4-step 64x64 image from a fixed seed, as a float array."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=64, width=64, generator=generator,
               output_type="np")
    return out.images[0]


def assert_same_weights(pipe, reference, components: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> None:
    for name in components:
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want), f"{name}: parameter names differ"
        different = [k for k in want if not torch.equal(got[k].to(want[k].dtype), want[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
