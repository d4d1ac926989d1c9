"""``base_model_hash``: stable across calls, cached, content-based, different for different weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from core.pipelines import BaseModelError, BaseModelSource, base_model_hash, resolve_base

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder_copy(builtin_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(builtin_folder, tmp_path / "copy", ignore=shutil.ignore_patterns(".lorastudio*")))


def _change_one_weight(file: Path) -> None:
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, str(file))


def test_folder_hash_is_stable_and_cached(folder_copy: Path, models_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_base(str(folder_copy), models_dir)
    first = base_model_hash(source)
    assert len(first) == 16 and int(first, 16) >= 0
    assert (folder_copy / ".lorastudio-hash.json").is_file()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read again although the cache is fresh")

    monkeypatch.setattr("builtins.open", no_reading)
    assert base_model_hash(source) == first
    monkeypatch.undo()
    (folder_copy / ".lorastudio-hash.json").unlink()
    assert base_model_hash(source) == first  # recomputed from the bytes: same value


def test_hash_depends_on_content_only(folder_copy: Path, builtin_folder: Path, models_dir: Path,
                                      tmp_path: Path) -> None:
    reference = base_model_hash(resolve_base(str(builtin_folder), models_dir))
    assert base_model_hash(resolve_base(str(folder_copy), models_dir)) == reference  # another name and place
    weights = folder_copy / UNET_FILE
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    assert base_model_hash(resolve_base(str(folder_copy), models_dir)) == reference


def test_different_weights_give_a_different_hash(folder_copy: Path, builtin_folder: Path, models_dir: Path) -> None:
    reference = base_model_hash(resolve_base(str(builtin_folder), models_dir))
    source = resolve_base(str(folder_copy), models_dir)
    assert base_model_hash(source) == reference
    _change_one_weight(folder_copy / UNET_FILE)
    changed = base_model_hash(source)  # the cached value is stale and must not be used
    assert changed != reference
    assert base_model_hash(source) == changed


def test_single_file_hash(single_file: Path, builtin_folder: Path, models_dir: Path, tmp_path: Path) -> None:
    source = resolve_base(str(single_file), models_dir, config=str(builtin_folder))
    first = base_model_hash(source)
    assert base_model_hash(source) == first
    assert (single_file.parent / f".{single_file.name}.lorastudio-hash.json").is_file()
    renamed = tmp_path / "renamed.safetensors"
    shutil.copyfile(single_file, renamed)
    assert base_model_hash(resolve_base(str(renamed), models_dir, config=str(builtin_folder))) == first
    _change_one_weight(renamed)
    assert base_model_hash(resolve_base(str(renamed), models_dir, config=str(builtin_folder))) != first
    assert base_model_hash(source) != base_model_hash(resolve_base(str(builtin_folder), models_dir))


def test_corrupt_cache_file_is_ignored(folder_copy: Path, models_dir: Path) -> None:
    source = resolve_base(str(folder_copy), models_dir)
    first = base_model_hash(source)
    (folder_copy / ".lorastudio-hash.json").write_text("{not json")
    assert base_model_hash(source) == first
    (folder_copy / ".lorastudio-hash.json").write_text('["a list"]')
    assert base_model_hash(source) == first


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(BaseModelError, match="no .safetensors weights"):
        base_model_hash(BaseModelSource("empty", "folder", str(tmp_path)))


def test_weights_change_is_seen_even_with_same_size(folder_copy: Path, models_dir: Path) -> None:
    source = resolve_base(str(folder_copy), models_dir)
    first = base_model_hash(source)
    weights = folder_copy / UNET_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert base_model_hash(source) != first
