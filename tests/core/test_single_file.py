"""Single-file checkpoints in the original LDM layout, loaded through diffusers' ``from_single_file`` offline."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.builtin import DEFAULT_BUILTIN
from core.devices import DevicePlacement
from core.pipelines import BaseModelError, BaseModelSource, load_pipeline, resolve_base
from tests.core.checkpoint_convert import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, diffusers_to_ldm, write_single_file
from tests.core.conftest import CPU32, HUB_ID, assert_same_weights, generate


def _component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    weights = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / name / weights))


def test_converted_keys_use_the_original_layout(builtin_folder: Path) -> None:
    ldm = diffusers_to_ldm(builtin_folder)
    sizes = {name: len(_component(builtin_folder, name)) for name in ("unet", "vae", "text_encoder")}
    assert sum(k.startswith(UNET_PREFIX) for k in ldm) == sizes["unet"]
    assert sum(k.startswith(VAE_PREFIX) for k in ldm) == sizes["vae"]
    assert sum(k.startswith(CLIP_PREFIX + "text_model.") for k in ldm) == sizes["text_encoder"]
    assert len(ldm) == sum(sizes.values())
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",  # conv_in
        "model.diffusion_model.input_blocks.2.0.op.weight",  # down block 0 downsampler
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",  # down block 2 attention
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # up block 0 upsampler, after its attention
        "model.diffusion_model.output_blocks.3.1.proj_out.weight",
        "model.diffusion_model.output_blocks.5.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.2.upsample.conv.weight",  # diffusers up_blocks.0 is LDM up.2
        "first_stage_model.decoder.mid.block_2.conv2.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in ldm, key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv, as in LDM
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" not in ldm  # the last up block has no upsampler


def test_diffusers_own_conversion_inverts_the_utility(builtin_folder: Path) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ldm = diffusers_to_ldm(builtin_folder)
    config = {n: json.loads((builtin_folder / n / "config.json").read_text()) for n in ("unet", "vae")}
    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, config["unet"]),
        "vae": convert_ldm_vae_checkpoint(ldm, config["vae"]),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()},
    }
    for name, converted in back.items():
        original = _component(builtin_folder, name)
        assert set(converted) == set(original), name
        assert all(torch.equal(converted[k], original[k]) for k in original), name


def test_single_file_loads_offline_like_the_folder(single_file: Path, builtin_folder: Path, models_dir: Path,
                                                   folder_pipe, network_attempts: list) -> None:
    source = resolve_base(str(single_file), models_dir, config=str(builtin_folder))
    assert source.kind == "single_file"
    assert source.location == str(single_file.resolve())
    assert source.config == str(builtin_folder.resolve())
    pipe = load_pipeline(source, CPU32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert_same_weights(pipe, folder_pipe)
    assert pipe.tokenizer.get_vocab() == folder_pipe.tokenizer.get_vocab()
    assert dict(pipe.scheduler.config) == dict(folder_pipe.scheduler.config)
    image = generate(pipe)
    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, generate(folder_pipe))
    assert network_attempts == []


def test_builtin_ref_as_config(single_file: Path, builtin_folder: Path, models_dir: Path) -> None:
    source = resolve_base(str(single_file), models_dir, config=f"builtin:{DEFAULT_BUILTIN}")
    assert source.config == str(builtin_folder)


def test_hub_config_taken_from_the_local_cache(single_file: Path, models_dir: Path, hub_cache: Path, folder_pipe,
                                               network_attempts: list) -> None:
    source = resolve_base(str(single_file), models_dir, config=HUB_ID, cache_dir=hub_cache)
    assert source.config == HUB_ID
    pipe = load_pipeline(source, CPU32)
    assert_same_weights(pipe, folder_pipe, ("unet",))
    assert network_attempts == []


def test_hub_config_missing_from_cache(single_file: Path, models_dir: Path, network_attempts: list) -> None:
    source = resolve_base(str(single_file), models_dir, config="someorg/not-cached")
    with pytest.raises(BaseModelError, match="not in the local Hugging Face cache") as err:
        load_pipeline(source, CPU32)
    assert "someorg/not-cached" in str(err.value)
    assert network_attempts == []


def test_without_config_fails_fast_and_says_what_to_pass(single_file: Path, models_dir: Path,
                                                         offline_hub: Path, network_attempts: list) -> None:
    source = resolve_base(str(single_file), models_dir)
    assert source.config is None
    start = time.monotonic()
    with pytest.raises(BaseModelError) as err:
        load_pipeline(source, CPU32)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "config=" in message and "builtin:tiny-sd" in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message  # the standard config diffusers would use
    assert "HF_HUB_OFFLINE" in message and str(offline_hub) in message
    assert network_attempts == []


def test_placement_dtype_is_honoured(single_file: Path, builtin_folder: Path, models_dir: Path) -> None:
    source = resolve_base(str(single_file), models_dir, config=str(builtin_folder))
    pipe = load_pipeline(source, DevicePlacement(torch.device("cpu"), torch.bfloat16))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16


def test_fp16_checkpoint_loads(builtin_folder: Path, models_dir: Path, tmp_path: Path, folder_pipe) -> None:
    path = write_single_file(builtin_folder, tmp_path / "half.safetensors", dtype=torch.float16)
    pipe = load_pipeline(resolve_base(str(path), models_dir, config=str(builtin_folder)), CPU32)
    assert pipe.unet.dtype == torch.float32
    want = folder_pipe.unet.state_dict()["conv_in.weight"].to(torch.float16).to(torch.float32)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], want)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_named(damage: str, single_file: Path, models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{damage}.safetensors"
    data = single_file.read_bytes()
    path.write_bytes({"garbage": b"\x13\x37" * 512, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(BaseModelError, match="corrupt") as err:
        resolve_base(str(path), models_dir, config=f"builtin:{DEFAULT_BUILTIN}")
    assert str(path) in str(err.value)


def test_file_corrupted_after_resolving(single_file: Path, builtin_folder: Path, models_dir: Path,
                                        tmp_path: Path) -> None:
    path = tmp_path / "later.safetensors"
    shutil.copyfile(single_file, path)
    source = resolve_base(str(path), models_dir, config=str(builtin_folder))
    path.write_bytes(b"not a checkpoint any more")
    with pytest.raises(BaseModelError) as err:
        load_pipeline(source, CPU32)
    assert str(path.resolve()) in str(err.value)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".CKPT", ".pt", ".bin"])
def test_pickle_checkpoint_refused_unopened(suffix: str, models_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _Boom(str(marker))}))
    opened: list[str] = []
    real_open = open

    def spy_open(file, *args, **kwargs):
        if str(file) == str(path) or str(file) == str(path.resolve()):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append("torch.load"))
    monkeypatch.setattr("safetensors.safe_open", lambda *a, **k: opened.append("safe_open"))
    with pytest.raises(BaseModelError, match="pickle") as err:
        resolve_base(str(path), models_dir)
    assert str(path) in str(err.value)
    with pytest.raises(BaseModelError, match=".safetensors"):
        load_pipeline(BaseModelSource(str(path), "single_file", str(path)), CPU32)
    assert opened == [] and not marker.exists()


def test_missing_weights_are_reported(builtin_folder: Path, models_dir: Path, tmp_path: Path) -> None:
    tensors = diffusers_to_ldm(builtin_folder)
    dropped = [k for k in tensors if k.startswith(UNET_PREFIX + "output_blocks.1.")]
    assert dropped
    path = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(path))
    with pytest.raises(BaseModelError, match="weights missing") as err:
        load_pipeline(resolve_base(str(path), models_dir, config=str(builtin_folder)), CPU32)
    assert str(path) in str(err.value)


def test_config_of_another_architecture(single_file: Path, builtin_folder: Path, models_dir: Path,
                                        tmp_path: Path) -> None:
    other = tmp_path / "other-arch"
    shutil.copytree(builtin_folder, other, ignore=shutil.ignore_patterns("*.safetensors"))
    config_file = other / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [32, 64, 128]
    config_file.write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="same architecture"):
        load_pipeline(resolve_base(str(single_file), models_dir, config=str(other)), CPU32)


def test_adapter_and_foreign_files_are_not_base_models(models_dir: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(BaseModelError, match="adapter"):
        resolve_base(str(lora), models_dir)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(BaseModelError, match="not an original-layout Stable Diffusion"):
        resolve_base(str(other), models_dir)
    nothing = tmp_path / "nothing.safetensors"
    save_file({}, str(nothing))
    with pytest.raises(BaseModelError, match="no weights"):
        resolve_base(str(nothing), models_dir)


def test_bad_config_values(single_file: Path, models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(BaseModelError, match="model_index.json"):
        resolve_base(str(single_file), models_dir, config=str(tmp_path / "plain"))
    with pytest.raises(BaseModelError, match="no such diffusers folder"):
        resolve_base(str(single_file), models_dir, config=str(tmp_path / "missing" / "folder"))
    with pytest.raises(BaseModelError, match="unknown built-in"):
        resolve_base(str(single_file), models_dir, config="builtin:nope")


def test_config_is_ignored_for_other_kinds(builtin_folder: Path, models_dir: Path) -> None:
    source = resolve_base(str(builtin_folder), models_dir, config="builtin:tiny-sd")
    assert source.kind == "folder" and source.config is None

