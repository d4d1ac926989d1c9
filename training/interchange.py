"""LoRA interchange formats: export as a kohya ``.safetensors`` file, import kohya, diffusers and peft files.

Pure tensor and header conversion (no database, no files); ``services.interchange`` does the I/O. The formats
are described in ``docs/formats.md``.

* kohya (sd-scripts ``networks/lora.py``, also read by A1111, ComfyUI and diffusers): per layer
  ``lora_unet_<module path, '.' → '_'>.lora_down.weight`` (r×d_in), ``.lora_up.weight`` (d_out×r) and ``.alpha``
  (a 0-d tensor; the update is ``alpha / r · up @ down``), plus ``ss_*`` and SAI ``modelspec.*`` header entries.
* diffusers (``save_lora_weights``): ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (or the older
  ``.lora.down/up`` and attention-processor spellings), alpha in the ``lora_adapter_metadata`` header entry.
* peft (``save_pretrained``): ``base_model.model.<path>.lora_A.weight``; alpha lives in ``adapter_config.json``,
  which is not part of the weights file, so it is passed in (default: alpha = rank).

Export works for every method whose ``Method.export_lora`` returns plain low-rank updates. Import reuses
diffusers' own kohya-name conversion (``lora_state_dict``) and key normalisation
(``convert_unet_state_dict_to_peft``), then checks every layer against the base UNet with
``LoRA.validate_tensors``: a file is imported whole or refused, never in part.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from torch import nn

from core.builtin import BUILTIN_PREFIX, is_builtin
from training.base import LoRAFactors
from training.methods.lora import DIFFUSERS_METADATA_KEY, LoRA, diffusers_lora_metadata

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
DIFFUSERS_UNET_PREFIX = "unet."
DIFFUSERS_TE_PREFIXES = ("text_encoder.", "text_encoder_2.")
PEFT_PREFIX = "base_model.model."
PEFT_TE_PREFIX = PEFT_PREFIX + "text_model."
IMPORT_FORMATS = ("kohya", "diffusers", "peft")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_ENCODER_REFUSAL = "contains text-encoder LoRA layers, which are not supported yet"
SD_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DIFFUSERS_IMPLEMENTATION = "https://github.com/huggingface/diffusers"

# cross-attention width of the UNet (d_in of attn2.to_k) -> (ss_base_model_version, modelspec.architecture, pixels)
_ARCHITECTURES = {
    768: ("sd_v1", "stable-diffusion-v1/lora", 512),
    1024: ("sd_v2", "stable-diffusion-v2-512/lora", 512),
    2048: ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024),
}
_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<ab>[AB])\.weight")
_MAX_LISTED = 5


# export ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the kohya header says about the adapter besides its tensors."""

    title: str
    method: str
    base_model: str
    trigger_words: tuple[str, ...] = ()
    steps: int = 0
    created_at: datetime | None = None
    resolution: int | None = None
    num_train_images: int | None = None


def kohya_name(path: str) -> str:
    """``down_blocks.1.attentions.0.proj_in`` → ``lora_unet_down_blocks_1_attentions_0_proj_in``."""
    return KOHYA_UNET_PREFIX + path.replace(".", "_")


def kohya_tensors(layers: Mapping[str, LoRAFactors], precision: str = "fp16") -> dict[str, torch.Tensor]:
    """The kohya state dict of ``layers``; ``alpha`` stays float32 so ``alpha / r`` is exact at any precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not layers:
        raise ValueError("the adapter has no layers to export")
    dtype = PRECISIONS[precision]
    alpha = file_alpha(layers)
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for path, factors in sorted(layers.items()):
        name = kohya_name(path)
        if name in owners:
            raise ValueError(f"layers {owners[name]} and {path} get the same kohya name {name}")
        owners[name] = path
        down, up = factors.down.detach().to("cpu"), factors.up.detach().to("cpu")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: factor shapes {tuple(down.shape)} / {tuple(up.shape)} are not a low-rank pair")
        if not math.isfinite(factors.scale):
            raise ValueError(f"{path}: scale {factors.scale} is not finite")
        if factors.alpha != alpha:
            up = up.to(torch.float32) * (factors.alpha / alpha)  # same ΔW with the file's one alpha
        down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError(f"{path}: values do not fit {precision} (or are NaN/infinite); export as fp32")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def file_alpha(layers: Mapping[str, LoRAFactors]) -> float:
    """The one alpha every layer of an exported file gets: the most common layer alpha (scale · rank).

    Layers with another alpha have ``alpha_i / alpha`` multiplied into their up factor, so each ΔW is unchanged.
    kohya's format allows an alpha per layer, but diffusers (0.42) applies per-layer alphas to attention layers
    under names that match no module, so their scale silently falls back to the majority alpha.
    """
    counts = Counter(float(f.alpha) for f in layers.values())
    return max(counts, key=lambda a: (counts[a], a))


def architecture(layers: Mapping[str, LoRAFactors], base_model: str) -> tuple[str, str, str, int | None]:
    """(``ss_base_model_version``, ``modelspec.architecture``, ``modelspec.implementation``, default pixels).

    Built-in bases are named as such; otherwise the cross-attention width read off ``attn2.to_k`` tells
    SD 1.x (768), SD 2.x (1024) and SDXL (2048) apart, and anything else is ``unknown``.
    """
    if is_builtin(base_model):
        name = base_model.removeprefix(BUILTIN_PREFIX)
        return name, f"lorastudio-{name}/lora", DIFFUSERS_IMPLEMENTATION, None
    widths = {int(f.down.shape[1]) for p, f in layers.items() if p.endswith(("attn2.to_k", "attn2.to_v"))}
    if len(widths) == 1 and (known := _ARCHITECTURES.get(widths.pop())):
        version, arch, pixels = known
        return version, arch, SD_IMPLEMENTATION, pixels
    return "unknown", "unknown/lora", SD_IMPLEMENTATION, None


def _uniform(values: list[float]) -> str:
    distinct = set(values)
    if len(distinct) != 1:
        return "Dynamic"  # what sd-scripts' resize_lora writes for per-layer ranks
    value = distinct.pop()
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def kohya_metadata(layers: Mapping[str, LoRAFactors], info: ExportInfo,
                   source_metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header: sd-scripts' ``ss_*`` entries, SAI model-spec ``modelspec.*`` entries, and the source file's
    ``lorastudio.*`` entries (so a re-import knows the trigger words, kind and steps)."""
    version, arch, implementation, pixels = architecture(layers, info.base_model)
    pixels = info.resolution or pixels
    when = info.created_at.isoformat() if info.created_at else ""
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _uniform([f.rank for f in layers.values()]),
        "ss_network_alpha": _uniform([file_alpha(layers)]),
        "ss_base_model_version": version,
        "ss_output_name": info.title,
        "ss_training_comment": f"{info.method} adapter exported from LoRA Studio",
        "ss_sd_model_name": info.base_model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1],
        "ss_steps": str(int(info.steps)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": implementation,
        "modelspec.title": info.title,
        "modelspec.date": when,
        "modelspec.trigger_phrase": ", ".join(info.trigger_words),
    }
    if pixels:
        header["ss_resolution"] = f"({pixels}, {pixels})"
        header["modelspec.resolution"] = f"{pixels}x{pixels}"
    if info.num_train_images is not None:
        header["ss_num_train_images"] = str(int(info.num_train_images))
    for key, value in (source_metadata or {}).items():
        if key.startswith("lorastudio."):
            header[key] = value
    header["lorastudio.export_format"] = "kohya"
    return header


def _data_sha256(blob: bytes) -> str:
    """sha256 of the tensor data after the safetensors header (what A1111 calls the model hash)."""
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def kohya_file_bytes(layers: Mapping[str, LoRAFactors], info: ExportInfo,
                     source_metadata: Mapping[str, str] | None = None, precision: str = "fp16") -> bytes:
    """The complete kohya ``.safetensors`` file, with ``sshs_model_hash`` / ``modelspec.hash_sha256`` set to the
    sha256 of its tensor data (the data bytes do not depend on the header, so they are computed once)."""
    from safetensors.torch import save

    tensors = kohya_tensors(layers, precision)
    header = kohya_metadata(layers, info, source_metadata)
    digest = _data_sha256(save(tensors, metadata=header))
    header.update({"sshs_model_hash": digest, "modelspec.hash_sha256": f"0x{digest}"})
    blob = save(tensors, metadata=header)
    if _data_sha256(blob) != digest:
        raise RuntimeError("safetensors laid the tensor data out differently on the second save")
    return blob


# import ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedLoRA:
    """A foreign LoRA file normalised to the ``lora`` method's saved format (keys ``unet.<path>.lora_A/B``)."""

    format: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]  # method metadata: the diffusers LoraConfig entry, lorastudio.rank / alpha
    rank: int
    alpha: float | None  # None when the ranks differ per layer (each layer then has scale 1)
    layers: int
    folded: bool  # True when per-layer alpha/r was multiplied into lora_B


def _refuse(what: str, problems: list[str]) -> ValueError:
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    return ValueError(f"{what}: {'; '.join(problems[:_MAX_LISTED])}{more}")


def detect_format(keys: list[str]) -> str:
    """kohya, diffusers or peft from the key names; ValueError for anything else (or a mix)."""
    if not keys:
        raise ValueError("the file holds no tensors")
    kohya = [k for k in keys if k.startswith((KOHYA_UNET_PREFIX, *KOHYA_TE_PREFIXES))]
    if kohya:
        if len(kohya) != len(keys):
            stray = next(k for k in keys if k not in set(kohya))
            raise ValueError(f"mixes kohya keys with other keys (e.g. {stray!r}); not a LoRA file this app reads")
        return "kohya"
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith((DIFFUSERS_UNET_PREFIX, *DIFFUSERS_TE_PREFIXES)) for k in keys) or any(
            ".lora" in k or "_lora." in k for k in keys):
        return "diffusers"
    raise ValueError(f"not a LoRA file: no kohya (lora_unet_*), diffusers (unet.*.lora_A) or peft "
                     f"(base_model.model.*.lora_A) keys; the first key is {keys[0]!r}")


def _unsupported_key(key: str) -> str:
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        return f"{key}: DoRA layers are not supported (plain LoRA only)"
    if any(tag in key for tag in ("hada_", "lokr_", "lora_mid", ".diff", "oft_", "boft_")):
        return f"{key}: a LyCORIS/other-network tensor, not plain LoRA"
    if key.endswith(".bias"):
        return f"{key}: LoRA bias terms are not supported"
    return f"{key}: not a LoRA tensor name"


def _scalar(value: torch.Tensor, key: str) -> float:
    if value.numel() != 1:
        raise ValueError(f"{key}: alpha must be a single number, got shape {tuple(value.shape)}")
    number = float(value.reshape(()).to(torch.float64))
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{key}: alpha must be a finite number >= 0, got {number}")
    return number


def _loader_class(pipe: Any) -> Any:
    """The pipeline class whose ``lora_state_dict`` reads kohya files for this base (SD or SDXL family)."""
    cls = type(pipe)
    if hasattr(cls, "lora_state_dict"):
        return cls
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def _kohya_path(loader: Any, unet_config: Any, lora_name: str, down: torch.Tensor, up: torch.Tensor) -> str:
    """The diffusers module path of one kohya layer, by diffusers' own conversion (it also maps the SGM block
    names kohya uses for SDXL). One layer at a time, so a conversion can never merge or drop layers."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = {f"{lora_name}.lora_down.weight": down, f"{lora_name}.lora_up.weight": up}
    converted, _ = loader.lora_state_dict(state, unet_config=unet_config)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix(DIFFUSERS_UNET_PREFIX): v
                                                 for k, v in converted.items()})
    paths = {m["path"] for k in peft_keys if (m := _LORA_KEY.fullmatch(k))}
    if len(paths) != 1 or len(peft_keys) != 2:
        raise ValueError(f"{lora_name}: diffusers cannot map this kohya name to a UNet layer")
    return paths.pop()


def _read_kohya(tensors: Mapping[str, torch.Tensor], pipe: Any) -> tuple[dict[str, LoRAFactors], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        lora_name, _, suffix = key.partition(".")
        if suffix not in KOHYA_SUFFIXES:
            problems.append(_unsupported_key(key))
            continue
        groups.setdefault(lora_name, {})[suffix] = value
    text_layers = sorted(n for n in groups if n.startswith(KOHYA_TE_PREFIXES))
    if text_layers:
        raise ValueError(f"the file {TEXT_ENCODER_REFUSAL} ({len(text_layers)} layer(s), e.g. {text_layers[0]}); "
                         "it was not imported")
    loader, layers, owners = _loader_class(pipe), {}, {}
    modules = dict(pipe.unet.named_modules())
    for lora_name, group in sorted(groups.items()):
        if "lora_down.weight" not in group or "lora_up.weight" not in group:
            problems.append(f"{lora_name}: needs both lora_down.weight and lora_up.weight")
            continue
        down, up = group["lora_down.weight"], group["lora_up.weight"]
        try:
            path = _kohya_path(loader, pipe.unet.config, lora_name, down, up)
            rank = int(down.shape[0]) if down.ndim else 0
            alpha = _scalar(group["alpha"], f"{lora_name}.alpha") if "alpha" in group else 0.0
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(getattr(modules.get(path), "base_layer", modules.get(path)), (nn.Linear, nn.Conv2d)):
            problems.append(f"{lora_name}: names {path}, which is not a Linear or Conv2d layer of the base UNet")
            continue
        if path in owners:
            problems.append(f"{lora_name} and {owners[path]} both map to UNet layer {path}")
            continue
        owners[path] = lora_name
        # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        layers[path] = LoRAFactors(down, up, (alpha or rank) / rank if rank else 1.0)
    return layers, problems


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """peft's ``alpha_pattern`` lookup: an exact module path, else a regex matching the path's tail."""
    if path in patterns:
        return patterns[path]
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
            return value
    return None


def _header_alpha(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, Any]]:
    """(alpha, alpha_pattern) from the diffusers ``lora_adapter_metadata`` entry or ``lorastudio.alpha``."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"unreadable {DIFFUSERS_METADATA_KEY} header entry ({exc})") from None
        if not isinstance(config, dict):
            raise ValueError(f"the {DIFFUSERS_METADATA_KEY} header entry is not a JSON object")
        if any(k.startswith(DIFFUSERS_TE_PREFIXES) for k in config) and not any(
                k.startswith(DIFFUSERS_UNET_PREFIX) for k in config):
            raise ValueError(f"the file {TEXT_ENCODER_REFUSAL}")
        if config.get("unet.use_dora"):
            raise ValueError("DoRA adapters are not supported (plain LoRA only)")
        if "unet.lora_alpha" in config:
            return float(config["unet.lora_alpha"]), dict(config.get("unet.alpha_pattern") or {})
    if metadata.get("lorastudio.alpha"):
        return float(metadata["lorastudio.alpha"]), {}
    return None, {}


def _read_diffusers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], fmt: str, pipe: Any,
                    alpha: float | None) -> tuple[dict[str, LoRAFactors], list[str]]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    te_prefixes = (PEFT_TE_PREFIX,) if fmt == "peft" else DIFFUSERS_TE_PREFIXES
    text_keys = sorted(k for k in tensors if k.startswith(te_prefixes))
    if text_keys:
        raise ValueError(f"the file {TEXT_ENCODER_REFUSAL} ({len(text_keys)} tensor(s), e.g. {text_keys[0]}); "
                         "it was not imported")
    prefix = PEFT_PREFIX if fmt == "peft" else DIFFUSERS_UNET_PREFIX
    unprefixed = fmt == "diffusers" and not any(k.startswith(prefix) for k in tensors)  # pre-0.20 diffusers files
    problems: list[str] = []
    stripped: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        if not (unprefixed or key.startswith(prefix)):
            problems.append(f"{key}: not a UNet LoRA key (expected the {prefix!r} prefix)")
            continue
        inner = key if unprefixed else key.removeprefix(prefix)
        if inner.endswith(".alpha"):
            try:
                alphas[inner.removesuffix(".alpha")] = _scalar(value, key)
            except ValueError as exc:
                problems.append(str(exc))
        else:
            stripped[inner] = value
    converted = convert_unet_state_dict_to_peft(stripped)
    if len(converted) != len(stripped):
        problems.append("two tensors name the same LoRA layer once the key spellings are normalised")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            problems.append(_unsupported_key(key))
            continue
        pairs.setdefault(match["path"], {})[match["ab"]] = value
    header_alpha, pattern = _header_alpha(metadata)
    if alpha is not None and (header_alpha is not None or alphas) and header_alpha != alpha:
        raise ValueError(f"the file gives its own alpha ({header_alpha if header_alpha is not None else 'per layer'})"
                         "; an alpha is only accepted for files that do not")
    stray = sorted(set(alphas) - set(pairs))
    problems.extend(f"{p}.alpha: no LoRA layer of that name in the file" for p in stray)
    layers: dict[str, LoRAFactors] = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{path}: needs both lora_A (down) and lora_B (up)")
            continue
        rank = int(pair["A"].shape[0]) if pair["A"].ndim else 0
        value = alphas.get(path, _pattern_value(pattern, path))
        if value is None:
            value = header_alpha if header_alpha is not None else alpha
        layer_alpha = float(value) if value is not None else float(rank)  # no alpha anywhere: scale 1
        layers[path] = LoRAFactors(pair["A"], pair["B"], layer_alpha / rank if rank else 1.0)
    return layers, problems


def read_lora_layers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], pipe: Any,
                     alpha: float | None = None) -> tuple[str, dict[str, LoRAFactors]]:
    """(format, UNet module path → factors) of a kohya, diffusers or peft LoRA file for ``pipe``'s UNet.

    ``alpha`` is used only for files that carry none (peft files keep it in ``adapter_config.json``); without
    it such files get alpha = rank, diffusers' convention. Text-encoder layers, DoRA and LyCORIS tensors and any
    unknown key are refused with ``ValueError``.
    """
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha}")
    fmt = detect_format(list(tensors))
    if fmt == "kohya":
        layers, problems = _read_kohya(tensors, pipe)
        if alpha is not None:
            raise ValueError("kohya files carry their own alpha per layer; an alpha is only accepted for files "
                             "that do not")
    else:
        layers, problems = _read_diffusers(tensors, metadata, fmt, pipe, alpha)
    if problems:
        raise _refuse(f"{fmt} file refused", problems)
    if not layers:
        raise ValueError(f"{fmt} file refused: it holds no UNet LoRA layers")
    return fmt, layers


def to_lora_format(layers: Mapping[str, LoRAFactors]) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """(tensors, method metadata, folded) in the ``lora`` method's saved format, float32.

    The ``lora`` method has one alpha for the whole adapter. When the layers' scales (alpha / r) differ, each
    layer's scale is multiplied into its ``lora_B`` (``scale · B @ A`` is the same update), so one alpha = rank,
    scale 1, serves every layer. With per-layer ranks no single ``LoraConfig`` fits, so the diffusers header
    entry is left out and the loader reads each layer's rank off its tensors (scale 1, diffusers' convention).
    """
    ranks = Counter(f.rank for f in layers.values())
    scales = {f.scale for f in layers.values()}
    fold = len(ranks) > 1 or len(scales) > 1
    tensors: dict[str, torch.Tensor] = {}
    for path, f in sorted(layers.items()):
        up = f.up.detach().to("cpu", torch.float32)
        tensors[f"unet.{path}.lora_A.weight"] = f.down.detach().to("cpu", torch.float32).contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = (up * f.scale if fold else up).contiguous()
    folded = fold and scales != {1.0}
    if len(ranks) > 1:
        return tensors, {"lorastudio.rank": str(max(ranks))}, folded
    rank = next(iter(ranks))
    alpha = float(rank) if fold else next(iter(scales)) * rank
    metadata = {**diffusers_lora_metadata(rank, alpha, list(layers)), "lorastudio.rank": str(rank),
                "lorastudio.alpha": repr(alpha)}
    return tensors, metadata, folded


def import_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], pipe: Any,
                alpha: float | None = None) -> ImportedLoRA:
    """Read a foreign LoRA file, check every value is finite and every layer fits ``pipe``'s UNet, and return
    it in the ``lora`` method's format. ``ValueError`` (naming the keys) refuses the whole file."""
    try:
        fmt, layers = read_lora_layers(tensors, metadata, pipe, alpha)
    except ValueError as exc:
        method = metadata.get("lorastudio.method")
        if method and method != "lora":
            raise ValueError(f"{exc} (this is a LoRA Studio {method} adapter file; export it with --format kohya "
                             "to get a plain LoRA file, where the method allows it)") from None
        raise
    bad = sorted(p for p, f in layers.items() if not (torch.isfinite(f.down).all() and torch.isfinite(f.up).all()
                                                       and math.isfinite(f.scale)))
    if bad:
        raise _refuse(f"{fmt} file refused", [f"{p}: contains NaN or infinite values" for p in bad])
    ours, method_metadata, folded = to_lora_format(layers)
    try:
        LoRA.validate_tensors(pipe, ours, method_metadata)
    except ValueError as exc:
        raise ValueError(f"{fmt} file refused: {exc}") from None
    ranks = {f.rank for f in layers.values()}
    rank = max(ranks)
    alpha_out = float(method_metadata["lorastudio.alpha"]) if "lorastudio.alpha" in method_metadata else None
    return ImportedLoRA(fmt, ours, method_metadata, rank, alpha_out, len(layers), folded)


def header_hints(metadata: Mapping[str, str]) -> dict[str, Any]:
    """What a file's header says about its concept: ``trigger_words``, ``kind``, ``steps`` and ``base_model``
    (from ``lorastudio.*`` entries, else kohya/model-spec ones); absent keys are left out."""
    hints: dict[str, Any] = {}
    try:
        words = json.loads(metadata.get("lorastudio.trigger_words") or "null")
    except json.JSONDecodeError:
        words = None
    if isinstance(words, list) and all(isinstance(w, str) for w in words):
        hints["trigger_words"] = [w for w in words if w.strip()]
    elif metadata.get("modelspec.trigger_phrase", "").strip():
        hints["trigger_words"] = [w.strip() for w in metadata["modelspec.trigger_phrase"].split(",") if w.strip()]
    if metadata.get("lorastudio.kind"):
        hints["kind"] = metadata["lorastudio.kind"]
    for key in ("lorastudio.steps", "ss_steps"):
        if metadata.get(key, "").strip().isdigit():
            hints["steps"] = int(metadata[key])
            break
    if metadata.get("lorastudio.base_model"):
        hints["base_model"] = metadata["lorastudio.base_model"]
    return hints
