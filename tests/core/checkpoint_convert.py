"""Turn a diffusers Stable Diffusion 1.x folder into one original-LDM-layout ``.safetensors`` checkpoint.

This is the inverse of the key conversion in ``diffusers.loaders.single_file_utils``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), so tests can
produce the kind of single file A1111/Civitai users have (``model.diffusion_model.*`` for the UNet,
``first_stage_model.*`` for the VAE, ``cond_stage_model.transformer.text_model.*`` for the CLIP text encoder)
from the built-in tiny model. The mapping is derived from each component's config, so it follows
``layers_per_block``, the number of blocks and which blocks carry attention. Any diffusers key it does not know
raises ``KeyError``: a silently dropped weight would make a broken checkpoint look fine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        raise KeyError(f"unexpected parameter {key!r}")
    return module, param


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of diffusers UNet2DConditionModel parameter ``key``."""
    per_block = int(config["layers_per_block"])
    module, param = _split_param(key)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (per_block + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_UNET_RESNET[rest]}.{param}"
        return f"input_blocks.{index}.1.{rest}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        index = 1 + int(m[1]) * (per_block + 1) + per_block
        return f"input_blocks.{index}.0.op.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (per_block + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_UNET_RESNET[rest]}.{param}"
        return f"output_blocks.{index}.1.{rest}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        block = int(m[1])
        index = block * (per_block + 1) + per_block
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"output_blocks.{index}.{slot}.conv.{param}"
    raise KeyError(f"no LDM name known for UNet parameter {key!r}")


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """The LDM name (without ``first_stage_model.``) of diffusers AutoencoderKL parameter ``key``."""
    module, param = _split_param(key)
    if module in _VAE_FIXED:
        return f"{_VAE_FIXED[module]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{m[1]}.downsample.conv.{param}"
    num_up = len(config["up_block_types"])
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        level = num_up - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{param}"
    raise KeyError(f"no LDM name known for VAE parameter {key!r}")


def clip_key_to_ldm(key: str) -> str:
    """The LDM name (without ``cond_stage_model.transformer.``) of a transformers CLIPTextModel parameter.

    transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; original checkpoints have it.
    """
    return key if key.startswith("text_model.") else f"text_model.{key}"


def _read_config(folder: Path, component: str) -> dict[str, Any]:
    return json.loads((folder / component / "config.json").read_text())


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder / component}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def diffusers_to_ldm(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All weights of the diffusers SD folder ``folder`` under their original single-file names."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        if name in out:
            raise KeyError(f"two parameters map to {name!r}")
        out[name] = tensor

    unet_config = _read_config(folder, "unet")
    for key, tensor in _weights(folder, "unet").items():
        put(UNET_PREFIX + unet_key_to_ldm(key, unet_config), tensor)
    vae_config = _read_config(folder, "vae")
    for key, tensor in _weights(folder, "vae").items():
        name = vae_key_to_ldm(key, vae_config)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        put(VAE_PREFIX + name, tensor)
    for key, tensor in _weights(folder, "text_encoder").items():
        put(CLIP_PREFIX + clip_key_to_ldm(key), tensor)
    return out


def write_single_file(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save the diffusers folder ``folder`` as one original-layout SD 1.x checkpoint at ``path``."""
    tensors = diffusers_to_ldm(folder)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path
