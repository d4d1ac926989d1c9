"""Composer contract: the hooks a multi-adapter method plugs into the denoise loop owned by ``composition.sampler``.

A composer never touches adapter internals. It sees the attached adapters as an ``AdapterSet`` and switches them
only through ``AdapterSet.apply`` (via ``StepContext.activate``), so any adapter technique plugs in. Hook order
per image: ``setup`` -> prompt encoding -> for each step ``before_step``, ``predict_noise``, scheduler step,
``after_step`` -> ``teardown`` (always, in a ``finally``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from core.config import BaseConfig
from core.registry import Registry


@runtime_checkable
class AdapterHandle(Protocol):
    """What composition sees of one attached adapter."""

    name: str  # unique id within one AdapterSet
    kind: str  # e.g. "subject", "style", "motion"


@runtime_checkable
class AdapterSet(Protocol):
    """The adapters attached to a pipeline, given by the caller of ``sample``."""

    def names(self) -> list[str]:
        """Names of all attached adapters."""
        ...

    def apply(self, weights: dict[str, float]) -> None:
        """Activate exactly these adapters with these weights; ``{}`` means base model only, unlisted ones are off."""
        ...


@runtime_checkable
class RoutableAdapterSet(AdapterSet, Protocol):
    """An ``AdapterSet`` that can also give each group of samples in one batched UNet call its own mix.

    Inside ``route(groups)`` a UNet batch of ``len(groups) * k`` samples is split into contiguous chunks of ``k``
    and chunk ``i`` runs with exactly the adapters and weights of ``groups[i]`` (``{}`` = base model), whatever
    ``apply`` last activated. Leaving the block restores the UNet exactly. Text encoders are not routed.
    """

    def can_route(self, names: Iterable[str]) -> bool:
        """Whether these adapters can be routed per sample (``route`` raises ``ValueError`` otherwise)."""
        ...

    def route(self, groups: Sequence[Mapping[str, float]]) -> AbstractContextManager[None]:
        """Context in which UNet calls route ``groups[i]`` to the ``i``-th contiguous chunk of the batch."""
        ...


class UNetFn(Protocol):
    """One UNet call at the current timestep; arguments default to ``ctx.model_input`` and the CFG embeddings."""

    def __call__(self, sample: Tensor | None = None, encoder_hidden_states: Tensor | None = None) -> Tensor: ...


@dataclasses.dataclass(eq=False)
class StepContext:
    """Everything a composer may read or change during one ``sample`` call.

    ``prompt_embeds``/``negative_prompt_embeds``/``encoder_hidden_states`` are ``None`` during ``setup``: the
    prompt is encoded right after it, with the adapters ``setup`` activated. ``negative_prompt_embeds`` stays
    ``None`` without CFG. ``state`` is free for the composer's private data.
    """

    pipe: Any
    adapters: AdapterSet
    weights: dict[str, float]
    scheduler: Any  # per-call copy, never the pipeline's own
    generator: torch.Generator
    guidance_scale: float
    do_cfg: bool
    timesteps: Tensor
    total_steps: int
    latents: Tensor
    prompt: str = ""
    negative_prompt: str = ""
    step: int = 0
    timestep: Tensor | None = None
    prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    encoder_hidden_states: Tensor | None = None  # [uncond; cond] with CFG, else cond
    model_input: Tensor | None = None  # CFG-expanded, scheduler-scaled latents of the current step
    noise_pred: Tensor | None = None  # guided prediction of the last step
    active: dict[str, float] | None = None  # what was last passed to ``adapters.apply``; None = nothing yet
    state: dict[str, Any] = dataclasses.field(default_factory=dict)

    def activate(self, weights: dict[str, float]) -> None:
        """Apply ``weights`` to the adapter set, skipping the call when exactly these are already active."""
        if self.active is not None and weights == self.active:
            return
        weights = dict(weights)
        self.adapters.apply(weights)
        self.active = weights

    def ensure_active(self) -> None:
        """Activate ``self.weights`` unless something was already activated during this call."""
        if self.active is None:
            self.activate(self.weights)

    def guide(self, noise_pred: Tensor) -> Tensor:
        """Combine a CFG-batched prediction ``[uncond; cond]`` into the guided one (identity without CFG)."""
        if not self.do_cfg:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


@dataclasses.dataclass
class ComposerConfig(BaseConfig):
    """Base of composer settings; subclasses add fields with ``metadata={"help": ...}``."""


class Composer(ABC):
    """One multi-adapter sampling method. Subclasses override only the hooks they need.

    Set ``requires_grad = True`` for methods that backpropagate to the latents: the loop then runs under
    ``torch.no_grad`` (not ``inference_mode``) so the composer can enable grad locally.
    """

    config_cls: ClassVar[type[ComposerConfig]] = ComposerConfig
    requires_grad: ClassVar[bool] = False
    registry_name: ClassVar[str]

    def __init__(self, config: ComposerConfig | None = None) -> None:
        config = self.config_cls() if config is None else config
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        config.validate()
        self.config = config

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None = None) -> Composer:
        """Build from plain settings (form values, JSON); unknown or invalid settings raise ``ValueError``."""
        return cls(cls.config_cls.from_dict(settings))

    def setup(self, ctx: StepContext) -> None:  # noqa: B027  (optional hook)
        """Before prompt encoding and the first step (install processors, activate adapters)."""

    def before_step(self, ctx: StepContext) -> None:  # noqa: B027  (optional hook)
        """Before the UNet of step ``ctx.step``; may replace ``ctx.latents``."""

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        """Guided noise prediction for this step. Default: all weighted adapters on (applied once), one CFG call."""
        ctx.ensure_active()
        return ctx.guide(unet_fn())

    def after_step(self, ctx: StepContext) -> None:  # noqa: B027  (optional hook)
        """After the scheduler step; ``ctx.latents`` is the new sample."""

    def teardown(self, ctx: StepContext) -> None:
        """Always runs, also on errors and cancellation. Default: switch the adapters back to the base model."""
        if ctx.active:
            ctx.activate({})


COMPOSERS = Registry[Composer]("composer")
