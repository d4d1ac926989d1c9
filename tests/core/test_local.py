"""Local diffusers folders and the built-in model: resolving, loading, building once, concurrent first use."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import core.builtin as builtin
from core.builtin import DEFAULT_BUILTIN, ensure_builtin
from core.pipelines import BaseModelError, BaseModelSource, load_pipeline, resolve_base
from tests.core.conftest import CPU32

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    for name in WEIGHT_FILES:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if set(x) != set(y) or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def test_builtin_ref_resolves_to_its_folder(builtin_folder: Path, models_dir: Path) -> None:
    source = resolve_base(f"builtin:{DEFAULT_BUILTIN}", models_dir)
    assert source == BaseModelSource(f"builtin:{DEFAULT_BUILTIN}", "builtin", str(builtin_folder))


def test_folder_loads(builtin_folder: Path, models_dir: Path, folder_pipe, network_attempts: list) -> None:
    source = resolve_base(str(builtin_folder), models_dir)
    assert source.kind == "folder" and source.location == str(builtin_folder.resolve())
    assert type(folder_pipe).__name__ == "StableDiffusionPipeline"
    assert folder_pipe.unet.device.type == "cpu" and folder_pipe.unet.dtype == torch.float32
    assert getattr(folder_pipe, "safety_checker", None) is None
    assert list(folder_pipe.unet.config.block_out_channels) == [32, 64, 64]
    assert network_attempts == []


def test_builtin_source_loads(models_dir: Path, network_attempts: list) -> None:
    pipe = load_pipeline(resolve_base(f"builtin:{DEFAULT_BUILTIN}", models_dir), CPU32)
    assert pipe.vae.config.latent_channels == 4
    assert network_attempts == []


def test_folder_without_model_index(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(BaseModelError, match="no model_index.json") as err:
        resolve_base(str(tmp_path), models_dir)
    assert str(tmp_path) in str(err.value)


def test_folder_removed_after_resolving(builtin_folder: Path, models_dir: Path) -> None:
    source = BaseModelSource("gone", "folder", str(builtin_folder.parent / "gone"))
    with pytest.raises(BaseModelError, match="no model_index.json"):
        load_pipeline(source, CPU32)


@pytest.mark.parametrize("ref", ["/no/such/model", "./missing-model", "~/no-such-model-here/x",
                                 "missing.safetensors", "/no/such/model.safetensors"])
def test_nonexistent_paths(ref: str, models_dir: Path) -> None:
    with pytest.raises(BaseModelError, match="no such file or folder") as err:
        resolve_base(ref, models_dir)
    assert ref in str(err.value)


@pytest.mark.parametrize("ref", ["", "   ", "just-a-name"])
def test_unusable_refs(ref: str, models_dir: Path) -> None:
    with pytest.raises(BaseModelError):
        resolve_base(ref, models_dir)


def test_unknown_builtin(models_dir: Path) -> None:
    with pytest.raises(BaseModelError, match=f"available: {DEFAULT_BUILTIN}"):
        resolve_base("builtin:huge-sd", models_dir)


def test_builtin_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_builtin(tmp_path)
    files = sorted(p for p in first.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the built-in model was built a second time")

    monkeypatch.setattr(builtin, "build_pipeline", no_rebuild)
    assert ensure_builtin(tmp_path) == first
    assert resolve_base(f"builtin:{DEFAULT_BUILTIN}", tmp_path).location == str(first)
    assert sorted(p for p in first.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp folders left behind


def _race(call, count: int = 2) -> list:
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as exc:  # reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture(scope="module")
def raced_builtin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    models = tmp_path_factory.mktemp("raced")
    return models, _race(lambda: ensure_builtin(models))


def test_concurrent_first_use_gives_one_valid_folder(raced_builtin: tuple[Path, list]) -> None:
    models, results = raced_builtin
    assert all(isinstance(r, Path) for r in results), results
    assert results[0] == results[1]
    folder = results[0]
    assert (folder / "model_index.json").is_file()
    assert all((folder / name).is_file() for name in WEIGHT_FILES)
    assert [p.name for p in models.iterdir()] == [folder.name]  # the loser's temp folder is gone
    pipe = load_pipeline(BaseModelSource("raced", "builtin", str(folder)), CPU32)
    assert pipe.unet is not None


def test_concurrent_direct_builds_are_reproducible(raced_builtin: tuple[Path, list], builtin_folder: Path) -> None:
    _, results = raced_builtin
    assert _same_weights(results[0], builtin_folder)


def test_concurrent_resolves_build_reproducible_weights(tmp_path: Path, builtin_folder: Path) -> None:
    results = _race(lambda: resolve_base(f"builtin:{DEFAULT_BUILTIN}", tmp_path))
    assert all(isinstance(r, BaseModelSource) for r in results), results
    assert results[0] == results[1]
    assert _same_weights(Path(results[0].location), builtin_folder)


@pytest.mark.parametrize("word", ["red", "circle", "striped", "background", "sks"])
def test_builtin_tokenizer_keeps_world_words_whole(word: str, folder_pipe) -> None:
    tokenizer = folder_pipe.tokenizer
    assert tokenizer.tokenize(word) == [f"{word}</w>"]
    ids = tokenizer(word).input_ids
    assert ids == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(f"{word}</w>"), tokenizer.eos_token_id]


def test_builtin_tokenizer_prompt(folder_pipe) -> None:
    tokens = folder_pipe.tokenizer.tokenize("a red circle on a striped background")
    assert tokens == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "striped</w>", "background</w>"]
