"""Hub ids: loaded from a local Hugging Face cache, never downloaded while offline, failing fast when absent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.pipelines import (
    BaseModelError,
    base_model_hash,
    downloads_disabled,
    hub_cache_dir,
    load_pipeline,
    resolve_base,
)
from tests.core.conftest import CPU32, HUB_ID, assert_same_weights, make_hub_cache


@pytest.mark.parametrize("ref", [HUB_ID, "CompVis/stable-diffusion-v1-4", "org/name.v2", " someorg/tiny-sd "])
def test_hub_ids_are_recognised(ref: str, models_dir: Path) -> None:
    source = resolve_base(ref, models_dir)
    assert source.kind == "hub"
    assert source.location == ref.strip()
    assert source.cache_dir is None


@pytest.mark.parametrize("ref", ["a/b/c", "org/..", "org--x/name", "/org/name", "./org/name"])
def test_paths_that_are_not_hub_ids(ref: str, models_dir: Path) -> None:
    with pytest.raises(BaseModelError):
        resolve_base(ref, models_dir)


def test_loads_from_explicit_cache_dir(models_dir: Path, hub_cache: Path, folder_pipe,
                                       network_attempts: list) -> None:
    source = resolve_base(HUB_ID, models_dir, cache_dir=hub_cache)
    assert source.kind == "hub" and source.cache_dir == str(hub_cache)
    pipe = load_pipeline(source, CPU32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert_same_weights(pipe, folder_pipe)
    assert network_attempts == []


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_loads_from_cache_named_by_environment(variable: str, models_dir: Path, hub_cache: Path, folder_pipe,
                                               builtin_folder: Path,
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               network_attempts: list) -> None:
    # huggingface_hub reads these at import; the loader reads them again when it loads.
    if variable == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    else:
        monkeypatch.delenv("HF_HUB_CACHE")
        home = tmp_path / "hf-home"
        make_hub_cache(home / "hub", builtin_folder)
        monkeypatch.setenv("HF_HOME", str(home))
    pipe = load_pipeline(resolve_base(HUB_ID, models_dir), CPU32)
    assert_same_weights(pipe, folder_pipe, ("unet",))
    assert network_attempts == []


def test_missing_hub_model_fails_fast_offline(models_dir: Path, offline_hub: Path, network_attempts: list) -> None:
    source = resolve_base("someorg/not-downloaded", models_dir)
    start = time.monotonic()
    with pytest.raises(BaseModelError) as err:
        load_pipeline(source, CPU32)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "someorg/not-downloaded" in message
    assert "not in the local Hugging Face cache" in message and str(offline_hub) in message
    assert "HF_HUB_OFFLINE" in message and "local diffusers folder" in message
    assert network_attempts == []


def test_partly_cached_hub_model_offline(models_dir: Path, builtin_folder: Path, tmp_path: Path,
                                         network_attempts: list) -> None:
    cache = tmp_path / "configs-only"
    make_hub_cache(cache, builtin_folder, weights=False)
    with pytest.raises(BaseModelError, match="cached only in part"):
        load_pipeline(resolve_base(HUB_ID, models_dir, cache_dir=cache), CPU32)
    assert network_attempts == []


def test_failed_download_is_explained_quickly(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Downloads allowed but no network (the socket guard refuses every lookup); huggingface_hub retries with
    # back-off, so its sleeps are skipped here.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    source = resolve_base("someorg/not-downloaded", models_dir)
    with pytest.raises(BaseModelError, match="downloading it failed") as err:
        load_pipeline(source, CPU32, allow_download=True)
    assert "check the network" in str(err.value) and "someorg/not-downloaded" in str(err.value)


def test_offline_setting_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert downloads_disabled() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert downloads_disabled() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert downloads_disabled() is True
    assert hub_cache_dir("/explicit") == "/explicit"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    assert hub_cache_dir() == str(tmp_path / "h" / "hub")


def test_hub_hash_is_the_id(models_dir: Path) -> None:
    a = resolve_base(HUB_ID, models_dir)
    assert base_model_hash(a) == base_model_hash(resolve_base(HUB_ID, models_dir))
    assert base_model_hash(a) != base_model_hash(resolve_base("someorg/other", models_dir))
