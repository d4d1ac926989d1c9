"""The plug-in contract of training: ``MethodConfig``, the ``Method`` ABC, its registry, and trainer callbacks.

A method owns what it adds to the UNet (``inject``), what it saves (``adapter_state_dict``) and how a saved file
is put back for inference (``attach``); the one loop in ``training.trainer`` drives any of them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from core.config import BaseConfig
from core.registry import Registry

MIXED_PRECISION_CHOICES = ["no", "fp16", "bf16"]


@dataclass
class MethodConfig(BaseConfig):
    """Settings every method shares; a method adds its own fields in a subclass."""

    rank: int = field(default=8, metadata={"help": "Adapter rank r: size of the low-rank update", "min": 1,
                                           "max": 1024})
    alpha: float | None = field(default=None, metadata={
        "help": "Scale numerator: the update is multiplied by alpha / rank. Empty = same as rank (scale 1)",
        "min": 1e-6})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate", "min": 1e-8, "max": 1.0})
    max_steps: int = field(default=200, metadata={"help": "Number of optimizer steps", "min": 1, "max": 1_000_000})
    batch_size: int = field(default=2, metadata={"help": "Images per step", "min": 1, "max": 256})
    resolution: int = field(default=64, metadata={
        "help": "Training size in pixels; images are resized (shorter side) and center-cropped to it. "
                "Multiple of 8", "min": 8, "max": 4096})
    seed: int = field(default=0, metadata={"help": "Random seed for adapter init, data order, noise and timesteps",
                                           "min": 0, "max": 2**63 - 1})
    checkpoint_every: int = field(default=50, metadata={
        "help": "Save a resumable checkpoint every N steps (0 = off); the latest 2 are kept", "min": 0})
    preview_every: int = field(default=50, metadata={
        "help": "Render a preview image every N steps and at the end (0 = off)", "min": 0})
    preview_prompt: str = field(default="", metadata={
        "help": "Prompt of the preview images. Empty = the trigger word plus the dataset's first caption"})
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={
        "help": "UNet modules that get an adapter (names or name suffixes, comma separated)", "advanced": True})
    flip: bool = field(default=False, metadata={
        "help": "Random horizontal flips. Off by default: subjects can be asymmetric (text, logos, hair parting)",
        "advanced": True})
    lr_warmup_steps: int = field(default=0, metadata={
        "help": "Linear learning-rate warm-up over the first N steps", "min": 0, "advanced": True})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip the gradient norm to this value (0 = no clipping)", "min": 0.0, "advanced": True})
    mixed_precision: str = field(default="no", metadata={
        "help": "Autocast precision: no (fp32), fp16 (CUDA only) or bf16", "choices": MIXED_PRECISION_CHOICES,
        "advanced": True})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute UNet activations in the backward pass: less memory, about 30% slower",
        "advanced": True})
    timestep_bias: float = field(default=0.0, metadata={
        "help": "Skew timestep sampling: >0 favours noisy (composition) steps, <0 favours clean (detail) steps, "
                "0 = uniform", "min": -1.0, "max": 1.0, "advanced": True})
    noise_offset: float = field(default=0.0, metadata={
        "help": "Add per-channel constant noise of this strength (helps very dark or bright images)",
        "min": 0.0, "max": 1.0, "advanced": True})
    preview_steps: int = field(default=10, metadata={
        "help": "Denoising steps of each preview image", "min": 1, "max": 200, "advanced": True})
    prior_preservation: bool = field(default=False, metadata={
        "help": "DreamBooth class-prior preservation (subjects only): also train on images the base model makes for "
                "the class prompt, so the subject does not take over its whole class"})
    class_prompt: str = field(default="", metadata={
        "help": "The subject's class in a prompt without the trigger word, e.g. 'a photo of a dog'; required with "
                "prior preservation"})
    num_class_images: int = field(default=8, metadata={
        "help": "How many class images the base model generates once before training (prior preservation)",
        "min": 1, "max": 10_000, "advanced": True})
    prior_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the class images' loss next to the subject's (prior preservation)", "min": 0.0,
        "max": 100.0, "advanced": True})
    class_image_steps: int = field(default=25, metadata={
        "help": "Denoising steps of each generated class image (prior preservation)", "min": 1, "max": 200,
        "advanced": True})

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self) -> None:
        super().validate()
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not self.target_modules or not all(isinstance(m, str) and m.strip() for m in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.prior_preservation and not self.class_prompt.strip():
            raise ValueError("class_prompt is required with prior_preservation, e.g. 'a photo of a dog'")


@runtime_checkable
class AttachedAdapter(Protocol):
    """What inference sees of a loaded adapter."""

    name: str

    def set_scale(self, scale: float) -> None: ...


def remove_peft_adapter(model: nn.Module, name: str) -> None:
    """Delete peft adapter ``name``; when it was the last one, unwrap the layers so ``model`` is as it was."""
    adapters = set(getattr(model, "peft_config", {}) or {})
    if name not in adapters:
        return
    if adapters == {name}:
        model.unload_lora()
    else:
        model.delete_adapters(name)


class PeftAttachedAdapter:
    """An adapter living as a peft adapter named ``name`` inside ``pipe.unet``."""

    def __init__(self, pipe: Any, name: str) -> None:
        self.pipe = pipe
        self.name = name

    def _layers(self) -> list[Any]:
        unet = self.pipe.unet
        return [m for m in unet.modules() if hasattr(m, "set_scale") and self.name in getattr(m, "scaling", {})]

    def set_scale(self, scale: float) -> None:
        """Scale the adapter's update (1.0 = as trained, 0.0 = off) without touching other adapters."""
        for layer in self._layers():
            layer.set_scale(self.name, float(scale))

    def remove(self) -> None:
        remove_peft_adapter(self.pipe.unet, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Method(ABC):
    """One adapter family. Instances hold the config and, after ``inject``, the model they modified."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    registry_name: ClassVar[str]
    uses_rank: ClassVar[bool] = True  # False: the ``rank`` setting means nothing to this method (forms hide it)

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Method:
        return cls(cls.config_cls.from_dict(dict(data or {})))

    @abstractmethod
    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        """Add the trainable modules to ``unet``; return exactly the parameters to optimize, in a fixed order."""

    def on_timesteps(self, timesteps: torch.Tensor) -> None:
        """Called with the batch's timesteps before each UNet call (T-LoRA sets its rank mask here)."""
        return None

    @abstractmethod
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that get saved, detached CPU copies, keys ``unet.<module path>.<tensor>``."""

    def adapter_metadata(self) -> dict[str, str]:
        """Method-specific string entries for the safetensors header (what ``attach`` needs besides tensors)."""
        return {}

    @abstractmethod
    def remove(self) -> None:
        """Undo ``inject`` so the UNet is the base model again (a no-op when nothing is injected)."""

    @classmethod
    @abstractmethod
    def attach(cls, pipe: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
               name: str) -> AttachedAdapter:
        """Load a saved adapter into ``pipe`` as adapter ``name`` for inference."""

    @classmethod
    @abstractmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """Raise ``ValueError`` if ``tensors`` do not fit ``pipe``'s base model; never apply part of a file."""

    @classmethod
    def export_lora(cls, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> dict[str, LoRAFactors]:
        """The adapter as plain low-rank updates, one per UNet module path (for kohya/diffusers export).

        Methods whose update is not a fixed low-rank ``ΔW`` raise ``ValueError`` saying so.
        """
        raise ValueError(f"{cls.__name__} adapters are not plain low-rank updates and cannot be exported as LoRA")


METHODS: Registry[Method] = Registry("method")


@dataclass(frozen=True)
class LoRAFactors:
    """One layer's update ``ΔW = scale · up @ down``: ``down`` is r×d_in (peft ``lora_A``), ``up`` d_out×r."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha(self) -> float:
        """kohya's ``alpha``: the value with ``alpha / rank == scale``."""
        return self.scale * self.rank


@runtime_checkable
class TrainerCallback(Protocol):
    """How the trainer reports to its caller; ``should_stop`` is polled before every step."""

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None: ...

    def on_preview(self, step: int, image: Image.Image) -> None: ...

    def on_checkpoint(self, step: int, path: str) -> None: ...

    def should_stop(self) -> bool: ...

    def pending_requests(self) -> set[str]:
        """On-demand work asked for since the last step: a subset of ``{"checkpoint", "preview"}``."""
        ...


class NullCallback:
    """A callback that ignores everything and never stops."""

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None:
        pass

    def on_preview(self, step: int, image: Image.Image) -> None:
        pass

    def on_checkpoint(self, step: int, path: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def pending_requests(self) -> set[str]:
        return set()


class JobCancelled(Exception):
    """Raised by the trainer when the callback asked it to stop; no result is produced."""


@dataclass
class TrainResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any]
    steps_done: int
    final_loss: float
    losses: list[float]
    seconds: float
    preview: Image.Image | None = dataclasses.field(default=None, repr=False)
