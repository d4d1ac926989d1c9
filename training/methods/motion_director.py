"""MotionDirector: dual-path LoRA motion customization (Zhao et al., 2023, https://arxiv.org/abs/2310.08465).

Spec: ``../shared/reference/methods.md`` §4. On a video UNet, either AnimateDiff's ``UNetMotionModel`` or the
ModelScope/ZeroScope ``UNet3DConditionModel`` the reference trains, two LoRA sets are trained at once, each with
its own AdamW optimizer:

* **spatial** LoRAs (appearance) on the spatial transformer blocks
  ``…attentions.j.transformer_blocks.k.{attn1.to_q,to_k,to_v,to_out.0, ff.net.0.proj, ff.net.2}``;
* **temporal** LoRAs (motion) on the temporal transformer blocks — AnimateDiff's
  ``…motion_modules.j.transformer_blocks.k``, UNet3D's ``transformer_in.transformer_blocks.k`` and
  ``…temp_attentions.j.transformer_blocks.k`` — on ``{attn1,attn2}.{to_q,to_k,to_v,to_out.0}``, ``ff.net.0.proj``,
  ``ff.net.2`` (UNet3D's temporal convolutions ``…temp_convs.j`` are not adapted, as in the reference).

Each training step (``training.motion_trainer``), with one timestep ``t`` and one noise ``ε`` per clip:

1. with probability ``spatial_skip_prob`` the spatial path is skipped (and the spatial LoRAs are off in step 2);
   otherwise the **spatial path** denoises ONE random frame as a 1-frame clip with every temporal module bypassed
   (``temporal_bypassed``: its forward returns its input, a pure image model), optionally mirrored with fresh
   noise, and steps only the spatial optimizer on ``‖ε_θ − ε‖²``;
2. the **temporal path** denoises the whole clip with the spatial LoRAs on but frozen and steps only the temporal
   optimizer on the appearance-debiased loss ``L_org + L_ad`` (``debiased_loss``): with an anchor frame ``a``
   drawn at random and ``φ(v) = α·v_f − β·v_a`` (α = √(β²+1), applied to every frame ``f``),
   ``L_ad = ‖φ(ε_θ) − φ(ε)‖²``.

LoRA layers are peft's: ``ΔW = (alpha/r)·B·A``, A Gaussian (std 1/r), B zero, dropout ``lora_dropout`` on the
LoRA input (the reference applies it to the LoRA output: a small difference).

Saved file (native): peft keys ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` for both sets, header
``lorastudio.rank``, ``lorastudio.alpha``, ``lorastudio.motion.spatial_scale`` and ``lorastudio.motion.num_frames``.
Sampling loads the temporal LoRAs as one peft adapter, as the reference does; the spatial LoRAs join it only when
``spatial_scale`` > 0, with their update multiplied by that scale (folded into ``lora_B``). ``export_lora`` gives
exactly what ``attach`` loads, and ``diffusers_lora_file`` writes it as a diffusers-format file that
``AnimateDiffPipeline.load_lora_weights`` reads.

diffusers' ``UNet3DConditionModel`` lacks the peft adapter methods other UNets have (stock
``TextToVideoSDPipeline.load_lora_weights`` fails: it has no ``load_lora_adapter``); ``peft_ready`` gives them to
the instance, which ``inject`` and ``attach`` do, after which ``load_lora_weights`` reads the export there too.
UNet3D also takes one text embedding per clip (it repeats them per frame itself) where ``UNetMotionModel`` takes
one per frame (``is_unet3d`` tells them apart).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from core.pipelines import peft_ready
from training.base import METHODS, LoRAFactors, Method, MethodConfig, PeftAttachedAdapter, remove_peft_adapter
from training.methods.lora import (
    DIFFUSERS_METADATA_KEY,
    _alpha_from,
    _check_pair,
    _parse_tensors,
    diffusers_lora_metadata,
)

TRAIN_ADAPTER = "lorastudio_train"
SPATIAL_SCALE_KEY = "lorastudio.motion.spatial_scale"
FRAMES_KEY = "lorastudio.motion.num_frames"
ATTENTION_LAYERS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
FF_LAYERS = ("ff.net.0.proj", "ff.net.2")
TEMPORAL_LAYERS = ATTENTION_LAYERS + FF_LAYERS  # both attentions of a motion module attend across frames
SPATIAL_LAYERS = ATTENTION_LAYERS[:4] + FF_LAYERS  # the reference leaves cross-attention (attn2) alone
_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)"
# temporal transformers: AnimateDiff's motion modules; UNet3D's transformer_in and temp_attentions
_TEMPORAL_TRANSFORMER = rf"(?:{_BLOCK}\.(?:motion_modules|temp_attentions)\.\d+|transformer_in)"
# every module that mixes frames (what the spatial path bypasses): the above plus UNet3D's temporal convolutions
_TEMPORAL_MODULE = re.compile(rf"{_BLOCK}\.(?:motion_modules|temp_attentions|temp_convs)\.\d+|transformer_in")


def _layers_regex(container: str, layers: tuple[str, ...] | list[str]) -> str:
    choices = "|".join(re.escape(layer) for layer in layers)
    return rf"{container}\.transformer_blocks\.\d+\.(?:{choices})"


def temporal_regex(layers: tuple[str, ...] | list[str] = TEMPORAL_LAYERS) -> str:
    """Module paths of the layers ``layers`` of every temporal transformer block (full match): AnimateDiff's
    ``…motion_modules.j``, UNet3D's ``transformer_in`` and ``…temp_attentions.j``."""
    return _layers_regex(_TEMPORAL_TRANSFORMER, layers)


def spatial_regex(layers: tuple[str, ...] | list[str] = SPATIAL_LAYERS) -> str:
    """Module paths of the spatial transformer layers ``layers``; anchored on ``.attentions.`` so neither motion
    modules nor ``temp_attentions`` ever match (full match)."""
    return _layers_regex(rf"{_BLOCK}\.attentions\.\d+", layers)


_ANY_TEMPORAL = re.compile(temporal_regex(TEMPORAL_LAYERS))
_ANY_SPATIAL = re.compile(spatial_regex(ATTENTION_LAYERS + FF_LAYERS))


def debiased_loss(pred: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """MotionDirector's temporal loss ``L_org + L_ad`` on ``(B, C, F, h, w)`` predictions and targets.

    ``anchor`` holds one frame index per clip (shape ``(B,)``); ``φ(v) = α·v − β·v[:, :, anchor]`` with
    ``α = √(β²+1)`` removes the part every frame shares with the anchor (its appearance), so ``L_ad`` weighs
    what changes between frames. Both terms are mean squared errors over every element.
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"pred and target must both be (B, C, F, h, w), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    alpha = math.sqrt(beta * beta + 1.0)
    rows = torch.arange(pred.shape[0], device=pred.device)
    anchor = anchor.to(pred.device)

    def phi(v: torch.Tensor) -> torch.Tensor:
        return alpha * v - beta * v[rows, :, anchor].unsqueeze(2)

    return F.mse_loss(pred, target) + F.mse_loss(phi(pred), phi(target))


def motion_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's temporal modules by path: AnimateDiff's motion modules (``…motion_modules.j``), or UNet3D's
    ``transformer_in``, ``…temp_convs.j`` and ``…temp_attentions.j``; empty for an image UNet."""
    return {n: m for n, m in unet.named_modules() if _TEMPORAL_MODULE.fullmatch(n)}


def is_unet3d(unet: nn.Module) -> bool:
    """Whether ``unet`` is a ModelScope/ZeroScope-style UNet3D (a ``transformer_in`` before its blocks)."""
    return isinstance(getattr(unet, "transformer_in", None), nn.Module)


def require_motion_unet(unet: nn.Module, what: str = "motion_director") -> None:
    """``ValueError`` unless ``unet`` is a video UNet: AnimateDiff motion modules or UNet3D temporal layers."""
    if not motion_modules(unet):
        raise ValueError(f"{what} needs a video base model (an AnimateDiff UNetMotionModel with motion modules, or "
                         f"a ModelScope/ZeroScope UNet3DConditionModel), got a {type(unet).__name__} without "
                         "temporal layers; use a video base such as builtin:tiny-video or builtin:tiny-video3d")


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _identity_forward(module: nn.Module) -> Callable[..., Any]:
    """A forward for ``module`` that returns its input, in the structure its own forward returns: a
    ``TransformerTemporalModel`` (UNet3D's ``transformer_in`` and ``temp_attentions``) gives a 1-tuple with
    ``return_dict=False`` (what UNet3D passes; its blocks take ``[0]``) and a ``TransformerTemporalModelOutput``
    otherwise; motion modules and temporal convolutions give the tensor."""
    from diffusers.models.transformers.transformer_temporal import (
        TransformerTemporalModel,
        TransformerTemporalModelOutput,
    )

    if not isinstance(module, TransformerTemporalModel):
        return _identity
    signature = inspect.signature(module.forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hidden_states = bound.arguments["hidden_states"]
        if bound.arguments["return_dict"]:
            return TransformerTemporalModelOutput(sample=hidden_states)
        return (hidden_states,)

    return forward


@contextmanager
def temporal_bypassed(unet: nn.Module) -> Iterator[None]:
    """Every temporal module returns its input unchanged (not even computed): the UNet is its image model.

    diffusers runs AnimateDiff's motion modules, and UNet3D's ``transformer_in``, temporal convolutions and
    temporal transformers, also for 1-frame clips, where they still change the features (value projections,
    positional embeddings, convolutions over zero padding), so the spatial path needs this bypass; the reference
    MotionDirector's UNet3D skips the same modules when a clip has one frame.
    """
    modules = list(motion_modules(unet).values())
    for module in modules:
        module.forward = _identity_forward(module)
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def _check_layer_names(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a non-empty list of layer names, got {values!r}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown layer(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a layer twice: {values!r}")


@dataclass
class MotionDirectorConfig(MethodConfig):
    rank: int = field(default=32, metadata={
        "help": "LoRA rank r of both the temporal (motion) and the spatial (appearance) LoRAs", "min": 1,
        "max": 1024})
    learning_rate: float = field(default=5e-4, metadata={
        "help": "AdamW learning rate of the temporal (motion) LoRAs", "min": 1e-8, "max": 1.0})
    max_steps: int = field(default=300, metadata={
        "help": "Number of training steps (each: a spatial and a temporal update)", "min": 1, "max": 1_000_000})
    batch_size: int = field(default=1, metadata={"help": "Clips per step", "min": 1, "max": 64})
    target_modules: list[str] = field(default_factory=lambda: list(TEMPORAL_LAYERS), metadata={
        "help": "Layers of every temporal transformer block (motion module; UNet3D transformer_in, temp_attentions) "
                "that get a temporal LoRA: "
                + ", ".join(TEMPORAL_LAYERS), "advanced": True})
    spatial_target_modules: list[str] = field(default_factory=lambda: list(SPATIAL_LAYERS), metadata={
        "help": "Layers of every spatial transformer block that get a spatial LoRA: any of "
                + ", ".join(ATTENTION_LAYERS + FF_LAYERS), "advanced": True})
    spatial_learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate of the spatial (appearance) LoRAs", "min": 1e-8, "max": 1.0})
    lora_dropout: float = field(default=0.1, metadata={
        "help": "Dropout on the LoRA input while training", "min": 0.0, "max": 0.9, "advanced": True})
    weight_decay: float = field(default=1e-2, metadata={
        "help": "AdamW weight decay of both optimizers", "min": 0.0, "max": 1.0, "advanced": True})
    spatial_skip_prob: float = field(default=0.2, metadata={
        "help": "Probability of skipping the spatial path in a step (the spatial LoRAs are then also off in the "
                "temporal path), so the motion does not rely on them", "min": 0.0, "max": 1.0})
    debias_beta: float = field(default=1.0, metadata={
        "help": "Strength beta of the appearance-debiased temporal loss (0 = plain MSE plus a scaled copy)",
        "min": 0.0, "max": 100.0, "advanced": True})
    hflip_prob: float = field(default=0.0, metadata={
        "help": "Probability of mirroring the spatial path's frame (appearance only; the clip's motion is never "
                "mirrored)", "min": 0.0, "max": 1.0, "advanced": True})
    num_frames: int = field(default=16, metadata={
        "help": "Frames per training clip; clips are resampled to it (evenly spaced frames). Also the preview "
                "length", "min": 2, "max": 64})
    spatial_scale: float = field(default=0.0, metadata={
        "help": "Scale of the spatial (appearance) LoRAs when the adapter is used: 0 = motion only, as "
                "MotionDirector samples; >0 also brings the training clips' look", "min": 0.0, "max": 2.0})

    def validate(self) -> None:
        super().validate()
        _check_layer_names("target_modules", self.target_modules, TEMPORAL_LAYERS)
        _check_layer_names("spatial_target_modules", self.spatial_target_modules, ATTENTION_LAYERS + FF_LAYERS)
        if self.prior_preservation:
            raise ValueError("prior_preservation is for subjects; motion_director trains motions, turn it off")
        if self.flip:
            raise ValueError("flip would mirror whole clips and so their motion; use hflip_prob, which mirrors "
                             "only the spatial path's frame")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"motion_director trains in fp32 or bf16 autocast; mixed_precision "
                             f"{self.mixed_precision!r} is not supported")


def _lora_layers(unet: nn.Module, adapter: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _spatial_scale_from(metadata: Mapping[str, str]) -> float:
    raw = metadata.get(SPATIAL_SCALE_KEY, "0")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SPATIAL_SCALE_KEY} must be a number, got {raw!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{SPATIAL_SCALE_KEY} must be a finite number >= 0, got {raw!r}")
    return value


@METHODS.register("motion_director")
class MotionDirector(Method):
    """MotionDirector: a motion LoRA learned from clips, its appearance kept apart by a dual-path training."""

    config_cls = MotionDirectorConfig
    config: MotionDirectorConfig
    kind: ClassVar[str] = "motion"  # the kind of concept it learns
    base_kind: ClassVar[str] = "video"  # the kind of base model it trains on (training.bench's extension point)

    def __init__(self, config: MotionDirectorConfig) -> None:
        super().__init__(config)
        self.unet: nn.Module | None = None
        self.spatial_params: list[nn.Parameter] = []
        self.temporal_params: list[nn.Parameter] = []
        self.spatial_layers: dict[str, Any] = {}
        self.temporal_layers: dict[str, Any] = {}
        self._original_class: type | None = None  # the UNet's class before ``peft_ready`` changed it

    # ---------------------------------------------------------------------------------------------- training --

    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        """Add both LoRA sets as one peft adapter; returns the spatial parameters, then the temporal ones."""
        from peft import LoraConfig

        if self.unet is not None:
            raise RuntimeError("this MotionDirector is already injected; create a new method object per run")
        require_motion_unet(unet)
        original_class = peft_ready(unet)
        cfg = self.config
        spatial_re = re.compile(spatial_regex(cfg.spatial_target_modules))
        temporal_re = re.compile(temporal_regex(cfg.target_modules))
        peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                                 init_lora_weights="gaussian",
                                 target_modules=f"(?:{spatial_re.pattern})|(?:{temporal_re.pattern})")
        try:
            unet.add_adapter(peft_config, adapter_name=TRAIN_ADAPTER)
        except ValueError as exc:
            if not getattr(unet, "peft_config", None):
                if hasattr(unet, "_hf_peft_config_loaded"):
                    unet._hf_peft_config_loaded = False
                if original_class is not None:
                    unet.__class__ = original_class
            raise ValueError(f"cannot add MotionDirector LoRAs to the UNet: {exc}") from exc
        self.unet = unet
        self._original_class = original_class
        layers = _lora_layers(unet, TRAIN_ADAPTER)
        self.spatial_layers = {n: m for n, m in layers.items() if spatial_re.fullmatch(n)}
        self.temporal_layers = {n: m for n, m in layers.items() if temporal_re.fullmatch(n)}
        if not self.spatial_layers or not self.temporal_layers:
            self.remove()
            raise ValueError("the UNet has no spatial or no temporal transformer layers to adapt")
        spatial_prefixes = tuple(f"{n}." for n in self.spatial_layers)
        self.spatial_params, self.temporal_params = [], []
        for name, p in unet.named_parameters():
            if f".{TRAIN_ADAPTER}." in f".{name}." and "lora_" in name:
                (self.spatial_params if name.startswith(spatial_prefixes) else self.temporal_params).append(p)
        return self.spatial_params + self.temporal_params

    def _require_unet(self) -> nn.Module:
        if self.unet is None:
            raise RuntimeError("inject() has not been called")
        return self.unet

    @contextmanager
    def spatial_scaled(self, scale: float) -> Iterator[None]:
        """The spatial LoRAs at ``scale`` (1 = as trained, 0 = off) for the duration of the block."""
        self._require_unet()
        for layer in self.spatial_layers.values():
            layer.set_scale(TRAIN_ADAPTER, float(scale))
        try:
            yield
        finally:
            for layer in self.spatial_layers.values():
                layer.set_scale(TRAIN_ADAPTER, 1.0)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self._require_unet(), adapter_name=TRAIN_ADAPTER)
        return {f"unet.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def adapter_metadata(self) -> dict[str, str]:
        cfg = self.config
        return {"lorastudio.rank": str(cfg.rank), "lorastudio.alpha": repr(cfg.effective_alpha),
                SPATIAL_SCALE_KEY: repr(float(cfg.spatial_scale)), FRAMES_KEY: str(cfg.num_frames)}

    def remove(self) -> None:
        unet = self.unet
        if unet is None:
            return
        remove_peft_adapter(unet, TRAIN_ADAPTER)
        if self._original_class is not None and not getattr(unet, "peft_config", None):
            unet.__class__ = self._original_class
        self._original_class = None
        self.unet = None
        self.spatial_layers, self.temporal_layers = {}, {}
        self.spatial_params, self.temporal_params = [], []

    # --------------------------------------------------------------------------------------------- inference --

    @classmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        unet = getattr(pipe, "unet", None)
        if unet is None or not motion_modules(unet):
            raise ValueError(f"this is a motion adapter for a video base model; {type(pipe).__name__} has no motion "
                             "modules or other temporal layers (pick a video base model such as builtin:tiny-video "
                             "or builtin:tiny-video3d)")
        if not tensors:
            raise ValueError("the adapter has no tensors")
        pairs, problems = _parse_tensors(tensors)
        modules = dict(unet.named_modules())
        for path, pair in sorted(pairs.items()):
            if not (_ANY_TEMPORAL.fullmatch(path) or _ANY_SPATIAL.fullmatch(path)):
                problems.append(f"{path}: not a motion-module or spatial transformer layer MotionDirector adapts")
                continue
            problem = _check_pair(path, modules.get(path), pair)
            if problem:
                problems.append(problem)
        if not any(_ANY_TEMPORAL.fullmatch(p) for p in pairs):
            problems.append("no temporal (motion-module) LoRA layer")
        ranks = {pair["A"].shape[0] for pair in pairs.values() if "A" in pair and pair["A"].ndim}
        if len(ranks) > 1:
            problems.append(f"layers have different ranks {sorted(ranks)}; one rank is expected")
        try:
            alpha = _alpha_from(metadata, min(ranks) if ranks else 1)
            if not (math.isfinite(alpha) and alpha > 0):
                problems.append(f"alpha must be > 0, got {alpha}")
            _spatial_scale_from(metadata)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            problems.append(f"unreadable adapter metadata ({exc})")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"adapter does not match the base model: {'; '.join(problems[:5])}{more}")

    @classmethod
    def export_lora(cls, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> dict[str, LoRAFactors]:
        """What ``attach`` loads: every temporal layer, plus the spatial ones scaled by the file's spatial scale
        when it is above 0."""
        pairs, problems = _parse_tensors(tensors)
        incomplete = sorted(path for path, pair in pairs.items() if set(pair) != {"A", "B"})
        unknown = sorted(p for p in pairs if not (_ANY_TEMPORAL.fullmatch(p) or _ANY_SPATIAL.fullmatch(p)))
        if problems or incomplete or unknown:
            raise ValueError(f"not a complete MotionDirector file: {'; '.join(problems + incomplete + unknown)[:500]}")
        spatial_scale = _spatial_scale_from(metadata)
        out = {}
        for path, pair in sorted(pairs.items()):
            rank = pair["A"].shape[0]
            scale = _alpha_from(metadata, rank) / rank
            if _ANY_TEMPORAL.fullmatch(path):
                out[path] = LoRAFactors(pair["A"], pair["B"], scale)
            elif spatial_scale > 0:
                out[path] = LoRAFactors(pair["A"], pair["B"], scale * spatial_scale)
        if not out:
            raise ValueError("not a complete MotionDirector file: no temporal (motion-module) LoRA layer")
        return out

    @classmethod
    def attach(cls, pipe: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
               name: str) -> PeftAttachedAdapter:
        """Load the temporal LoRAs (and the scaled spatial ones, see ``export_lora``) as peft adapter ``name``."""
        cls.validate_tensors(pipe, tensors, metadata)
        if name in (getattr(pipe.unet, "peft_config", None) or {}):
            raise ValueError(f"an adapter named {name!r} is already loaded in this pipeline")
        state, header = diffusers_lora_file(tensors, metadata)
        config = json.loads(header[DIFFUSERS_METADATA_KEY])
        peft_ready(pipe.unet)
        pipe.unet.load_lora_adapter(state, prefix="unet", adapter_name=name, metadata=config, _pipeline=pipe)
        return PeftAttachedAdapter(pipe, name)


def diffusers_lora_file(tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A MotionDirector adapter as a diffusers-format LoRA file (tensors, header) for ``load_lora_weights``.

    Keys ``unet.<path>.lora_A.weight`` / ``lora_B.weight``; the ``lora_adapter_metadata`` header entry carries
    rank and alpha. Layers whose scale differs from the temporal one (spatial layers at a spatial scale) have the
    ratio folded into ``lora_B``: the same update.
    """
    layers = MotionDirector.export_lora(tensors, metadata)
    ranks = {f.rank for f in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"layers have different ranks {sorted(ranks)}; one rank is expected")
    rank = ranks.pop()
    base_scale = next(f.scale for p, f in layers.items() if _ANY_TEMPORAL.fullmatch(p))
    state: dict[str, torch.Tensor] = {}
    for path, f in layers.items():
        up = f.up if f.scale == base_scale else f.up * (f.scale / base_scale)
        state[f"unet.{path}.lora_A.weight"] = f.down.contiguous()
        state[f"unet.{path}.lora_B.weight"] = up.contiguous()
    header = {**diffusers_lora_metadata(rank, base_scale * rank, list(layers)), "format": "pt"}
    return state, header
