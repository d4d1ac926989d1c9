"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

Each targeted projection W (by default the attention q/k/v/out projections of the UNet) stays frozen and gains a
low-rank update ΔW = (α/r)·B·A, with A ∈ R^{r×d_in} randomly initialised and B ∈ R^{d_out×r} zero, so training
starts from the base model. Only A and B are trained and saved. Injection and the saved format are peft's; files
load with diffusers' ``load_lora_weights``.

Deviation: while training, each LoRA layer runs a lean forward that skips peft's generic dispatch (and, for small
layers, folds B·A into one matmul); it is numerically the same update.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.base import METHODS, LoRAFactors, Method, MethodConfig, PeftAttachedAdapter, remove_peft_adapter

TRAIN_ADAPTER = "lorastudio_train"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers reads LoraConfig kwargs from this header entry
_KEY = re.compile(r"unet\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight")
_MERGE_LIMIT = 1 << 22  # rows·d_in·d_out below which folding B·A into W beats two extra small matmuls


@dataclass
class LoRAConfig(MethodConfig):
    init: str = field(default="gaussian", metadata={
        "help": "Initialisation of A: gaussian (std 1/r) or default (Kaiming-uniform, peft's default); B starts at 0",
        "choices": ["gaussian", "default"], "advanced": True})


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward`` for the one-active-adapter, no-dropout case; anything else goes to peft."""
    name = self._lorastudio_adapter
    if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    weight = base.weight
    lora_a = self.lora_A[name].weight.to(weight.dtype)
    lora_b = self.lora_B[name].weight.to(weight.dtype)
    scale = self.scaling[name]
    if (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1] <= _MERGE_LIMIT:
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scale), base.bias)
    return F.linear(x, weight, base.bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def _lora_layers(unet: nn.Module, adapter: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _parse_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            problems.append(f"{key}: not a UNet LoRA key (expected unet.<module>.lora_A/lora_B.weight)")
            continue
        pairs.setdefault(match["path"], {})[match["ab"]] = value
    return pairs, problems


def _check_pair(path: str, module: nn.Module | None, pair: dict[str, torch.Tensor]) -> str | None:
    base = getattr(module, "base_layer", module)
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        return f"{path}: no Linear or Conv2d layer of that name in the base UNet"
    if set(pair) != {"A", "B"}:
        return f"{path}: has lora_{''.join(pair)} but not both lora_A and lora_B"
    a, b = pair["A"], pair["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        return f"{path}: tensors must be floating point, got {a.dtype} and {b.dtype}"
    rank = a.shape[0] if a.ndim else 0
    if isinstance(base, nn.Linear):
        want_a, want_b = (rank, base.in_features), (base.out_features, rank)
    else:
        want_a, want_b = (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
    if rank < 1 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        return (f"{path}: shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base layer "
                f"(expected {want_a} / {want_b})")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return f"{path}: contains NaN or infinite values"
    return None


def _alpha_from(metadata: Mapping[str, str], rank: int) -> float:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw:
        cfg = json.loads(raw)
        if "unet.lora_alpha" in cfg:
            return float(cfg["unet.lora_alpha"])
    if metadata.get("lorastudio.alpha"):
        return float(metadata["lorastudio.alpha"])
    return float(rank)


def diffusers_lora_metadata(rank: int, alpha: float, module_paths: list[str], init: Any = True) -> dict[str, str]:
    """The header entry diffusers' ``load_lora_weights`` reads to rebuild the exact ``LoraConfig``."""
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(module_paths),
              "unet.init_lora_weights": init}
    return {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)}


@METHODS.register("lora")
class LoRA(Method):
    """Plain LoRA through peft; the reference every other method is compared to."""

    config_cls = LoRAConfig
    config: LoRAConfig

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__(config)
        self.unet: nn.Module | None = None

    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        from peft import LoraConfig

        if self.unet is not None:
            raise RuntimeError("this LoRA is already injected; create a new method object per training run")
        cfg = self.config
        peft_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.effective_alpha,
            target_modules=list(cfg.target_modules),
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        )
        names = [n for n, _ in unet.named_modules()]
        unmatched = [t for t in cfg.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            raise ValueError(f"target_modules {', '.join(unmatched)} match no UNet layer; use names such as "
                             "to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.2")
        try:
            unet.add_adapter(peft_config, adapter_name=TRAIN_ADAPTER)
        except ValueError as exc:
            if not getattr(unet, "peft_config", None) and hasattr(unet, "_hf_peft_config_loaded"):
                unet._hf_peft_config_loaded = False  # let the next add_adapter start from scratch
            raise ValueError(f"cannot add LoRA to the UNet with target_modules={cfg.target_modules}: {exc}") from exc
        self.unet = unet
        from peft.tuners.lora import Linear as LoraLinear

        for layer in _lora_layers(unet, TRAIN_ADAPTER).values():
            if type(layer) is LoraLinear and isinstance(layer.lora_dropout[TRAIN_ADAPTER], nn.Identity) \
                    and TRAIN_ADAPTER not in layer.lora_variant:
                layer._lorastudio_adapter = TRAIN_ADAPTER
                layer.forward = types.MethodType(_lean_forward, layer)
        return [p for n, p in unet.named_parameters() if f".{TRAIN_ADAPTER}." in f".{n}." and "lora_" in n]

    def _require_unet(self) -> nn.Module:
        if self.unet is None:
            raise RuntimeError("inject() has not been called")
        return self.unet

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self._require_unet(), adapter_name=TRAIN_ADAPTER)
        return {f"unet.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def adapter_metadata(self) -> dict[str, str]:
        paths = sorted(_lora_layers(self._require_unet(), TRAIN_ADAPTER))
        init = "gaussian" if self.config.init == "gaussian" else True
        return {
            **diffusers_lora_metadata(self.config.rank, self.config.effective_alpha, paths, init),
            "lorastudio.rank": str(self.config.rank),
            "lorastudio.alpha": repr(self.config.effective_alpha),
        }

    def remove(self) -> None:
        unet = self.unet
        if unet is None:
            return
        for layer in _lora_layers(unet, TRAIN_ADAPTER).values():
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_lorastudio_adapter", None)
        remove_peft_adapter(unet, TRAIN_ADAPTER)
        self.unet = None

    @classmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        if not tensors:
            raise ValueError("the adapter has no tensors")
        pairs, problems = _parse_tensors(tensors)
        modules = dict(pipe.unet.named_modules())
        for path, pair in sorted(pairs.items()):
            problem = _check_pair(path, modules.get(path), pair)
            if problem:
                problems.append(problem)
        try:
            ranks = {pair["A"].shape[0] for pair in pairs.values() if "A" in pair}
            alpha = _alpha_from(metadata, min(ranks) if ranks else 1)
            if not alpha > 0:
                problems.append(f"alpha must be > 0, got {alpha}")
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            problems.append(f"unreadable LoRA metadata ({exc})")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"adapter does not match the base model: {'; '.join(problems[:5])}{more}")

    @classmethod
    def attach(cls, pipe: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
               name: str) -> PeftAttachedAdapter:
        """Load as peft adapter ``name`` via diffusers (``load_lora_adapter``, what ``load_lora_weights`` runs for
        the UNet), passing the LoraConfig explicitly because an in-memory state dict carries no alpha."""
        cls.validate_tensors(pipe, tensors, metadata)
        if name in getattr(pipe.unet, "peft_config", {}):
            raise ValueError(f"an adapter named {name!r} is already loaded in this pipeline")
        pairs, _ = _parse_tensors(tensors)
        ranks = {pair["A"].shape[0] for pair in pairs.values()}
        lora_metadata = None
        if len(ranks) == 1:
            rank = ranks.pop()
            lora_metadata = json.loads(diffusers_lora_metadata(rank, _alpha_from(metadata, rank), list(pairs))[
                DIFFUSERS_METADATA_KEY])
        pipe.unet.load_lora_adapter(dict(tensors), prefix="unet", adapter_name=name, metadata=lora_metadata,
                                    _pipeline=pipe)
        return PeftAttachedAdapter(pipe, name)

    @classmethod
    def export_lora(cls, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> dict[str, LoRAFactors]:
        pairs, problems = _parse_tensors(tensors)
        incomplete = sorted(path for path, pair in pairs.items() if set(pair) != {"A", "B"})
        if problems or incomplete:
            raise ValueError(f"not a complete LoRA file: {'; '.join(problems + incomplete)[:500]}")
        out = {}
        for path, pair in sorted(pairs.items()):
            rank = pair["A"].shape[0]
            out[path] = LoRAFactors(pair["A"], pair["B"], _alpha_from(metadata, rank) / rank)
        return out
