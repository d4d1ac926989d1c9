"""CMLoRA, Cached Multi-LoRA composition (Zou et al., "Cached Multi-LoRA Composition for Multi-Concept Image
Generation", ICLR 2025, arXiv:2502.04923).

https://arxiv.org/abs/2502.04923 — LoRA Composite with a frequency-ordered dominant adapter and a per-adapter
DeepCache:

1. profile: measure each adapter's high-frequency contribution; high-frequency adapters (H) rotate first,
   low-frequency ones (Lo, e.g. backgrounds) join the rotation only late, so their deep features stay cached longest;
2. refresh steps follow ``cache_interval`` c (every c steps; c = 0: every 2 steps in the first 37.5 %, every 3
   until 87.5 %, every 2 after); at each one the next adapter of the rotation runs the full UNet, refreshes its
   cached deep feature and becomes dominant;
3. every other adapter (and every adapter between refresh steps) runs a shallow pass: first down block and last
   up block only, with its own cached deep feature;
4. combine the guided per-adapter predictions with weights (N - 0.5) / (2N - 1.5) for the dominant adapter and
   1 / (2N - 1.5) for each other one.

Deviations: the profile is measured online at step 0 (not offline from generated images): each adapter's guided
noise prediction minus the base model's, scored by the fraction of its spectral energy above
``high_frequency_cutoff`` of the Nyquist radius (one extra batched sample at step 0); Lo = scores below
``low_frequency_ratio`` of the highest. The non-uniform schedule (c = 0) caches too (the reference caches only for
c >= 2). All adapters' passes of one kind run in one batched UNet call with per-sample routing; each adapter runs
at its slider weight. The reference's dead dominance decay and its step-120 constant are replaced by
``background_after`` (a fraction of the steps). Shallow passes run the UNet's forward pre-hooks
(``composition.unet_cache``), so adapters that read the timestep there (T-LoRA) use the current step's rank mask.
The pass counts, the rotation and the measured scores are left in ``ctx.state["report"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from composition.base import COMPOSERS, Composer, ComposerConfig, StepContext, UNetFn
from composition.methods.composite import combine
from composition.routing import evaluate_groups
from composition.unet_cache import cache_unsupported_reason, capture_deep_feature, shallow_forward


@dataclass
class CMLoRAConfig(ComposerConfig):
    cache_interval: int = field(
        default=2,
        metadata={"help": "Refresh step every this many steps (1 = every step, no caching; 0 = the paper's "
                          "non-uniform schedule: every 2, 3, then 2 steps)", "min": 0},
    )
    use_cache: bool = field(
        default=True,
        metadata={"help": "Reuse each non-refreshed adapter's deep features between refreshes; off = every "
                          "adapter runs the full UNet every step (the uncached form, same dominance rotation)"},
    )
    dominant_weighting: bool = field(
        default=True,
        metadata={"help": "Weight the dominant adapter (N-0.5)/(2N-1.5) and the others 1/(2N-1.5); off = "
                          "uniform mean as in LoRA Composite"},
    )
    high_frequency_cutoff: float = field(
        default=0.28,
        metadata={"help": "Frequencies above this fraction of the Nyquist radius count as high frequency in "
                          "the profile (the reference's 72 px of 256 at 512x512)", "min": 0.0, "max": 1.0},
    )
    low_frequency_ratio: float = field(
        default=0.8,
        metadata={"help": "Adapters whose high-frequency score is below this fraction of the highest score are "
                          "low-frequency (background-like) and join the refresh rotation late", "min": 0.0,
                  "max": 1.0},
    )
    background_after: float = field(
        default=0.55,
        metadata={"help": "Fraction of the steps after which low-frequency adapters join the refresh rotation "
                          "(the reference's step 120 of 220)", "min": 0.0, "max": 1.0},
    )
    batched: bool = field(
        default=True,
        metadata={"help": "Evaluate the adapters' passes in one batched UNet call with per-sample routing; off "
                          "= one call per adapter with adapter switching"},
    )
    max_adapters_per_call: int = field(
        default=0,
        metadata={"help": "Split batched calls into chunks of at most this many adapters (0 = no limit)",
                  "min": 0},
    )


def refresh_schedule(interval: int, total: int) -> list[bool]:
    """Whether each step is a refresh step; step 0 always is."""
    if interval == 1:
        return [True] * total
    if interval >= 2:
        return [i % interval == 0 for i in range(total)]
    marks, i = [], 0
    while i < total:
        marks.append(i)
        i += 2 if (i < 0.375 * total or i >= 0.875 * total) else 3
    return [i in set(marks) for i in range(total)]


def high_frequency_score(delta: Tensor, cutoff: float) -> float:
    """Fraction of the spectral energy of ``delta`` (``[..., H, W]``, channel-averaged) above ``cutoff`` Nyquist."""
    image = delta.float().reshape(-1, *delta.shape[-2:]).mean(0)
    power = torch.fft.fftshift(torch.fft.fft2(image - image.mean())).abs() ** 2
    h, w = image.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.float() ** 2 + xx.float() ** 2) / (min(h, w) / 2)
    total = power.sum()
    if total <= 0:
        return 0.0
    return float(power[radius >= cutoff].sum() / total)


def dominant_shares(count: int, dominant: int, weighted: bool) -> list[float]:
    if count == 1:
        return [1.0]
    if not weighted:
        return [1.0 / count] * count
    other = 1.0 / (2 * count - 1.5)
    return [(count - 0.5) * other if i == dominant else other for i in range(count)]


@COMPOSERS.register("cmlora")
class CMLoRAComposer(Composer):
    """Composite backbone, frequency-ordered dominant adapter, per-adapter deep-feature cache."""

    config_cls = CMLoRAConfig
    config: CMLoRAConfig

    @property
    def caching(self) -> bool:
        return self.config.use_cache and self.config.cache_interval != 1

    def setup(self, ctx: StepContext) -> None:
        active = {n: w for n, w in ctx.weights.items() if w != 0.0}
        if self.caching and active:
            reason = cache_unsupported_reason(ctx.pipe.unet)
            if reason is not None:
                raise ValueError(f"CMLoRA caching cannot run on this model: {reason}; set use_cache to false")
        ctx.state.update(names=list(active), caches={}, rotation=list(active), high=list(active), refreshes=1,
                         dominant=0, scores={}, full_passes=0, shallow_passes=0,
                         schedule=refresh_schedule(self.config.cache_interval, ctx.total_steps))
        ctx.activate(active)

    def _groups(self, ctx: StepContext, names: list[str]) -> list[dict[str, float]]:
        return [{n: ctx.weights[n]} for n in names]

    def _full(self, ctx: StepContext, unet_fn: UNetFn, names: list[str], extra_base: bool = False) -> list[Tensor]:
        groups = self._groups(ctx, names) + ([{}] if extra_base else [])
        caches = ctx.state["caches"]
        capture = self.caching

        def call(sample: Tensor, ehs: Tensor, indices: list[int]) -> Tensor:
            if not capture:
                return unet_fn(sample, ehs)
            feats: list[Tensor] = []
            with capture_deep_feature(ctx.pipe.unet, feats):
                out = unet_fn(sample, ehs)
            for index, feat in zip(indices, feats[0].chunk(len(indices)), strict=True):
                if index < len(names):
                    caches[names[index]] = feat
            return out

        ctx.state["full_passes"] += len(names)
        return evaluate_groups(ctx, unet_fn, groups, batched=self.config.batched,
                               max_groups_per_call=self.config.max_adapters_per_call, call=call)

    def _shallow(self, ctx: StepContext, unet_fn: UNetFn, names: list[str]) -> list[Tensor]:
        caches = ctx.state["caches"]
        unet = ctx.pipe.unet

        def call(sample: Tensor, ehs: Tensor, indices: list[int]) -> Tensor:
            deep = torch.cat([caches[names[i]] for i in indices])
            return shallow_forward(unet, sample, ctx.timestep, ehs, deep)

        ctx.state["shallow_passes"] += len(names)
        return evaluate_groups(ctx, unet_fn, self._groups(ctx, names), batched=self.config.batched,
                               max_groups_per_call=self.config.max_adapters_per_call, call=call)

    def _profile(self, ctx: StepContext, guided: list[Tensor], base: Tensor) -> None:
        names = ctx.state["names"]
        scores = {n: high_frequency_score(g - base, self.config.high_frequency_cutoff)
                  for n, g in zip(names, guided, strict=True)}
        top = max(scores.values())
        ranked = sorted(names, key=lambda n: -scores[n])
        high = [n for n in ranked if scores[n] >= self.config.low_frequency_ratio * top]
        ctx.state.update(scores=scores, rotation=high + [n for n in ranked if n not in high], high=high)

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        state = ctx.state
        names: list[str] = state["names"]
        if not names:
            (pred,) = evaluate_groups(ctx, unet_fn, [{}], batched=self.config.batched)
            return ctx.guide(pred)
        step = ctx.step
        if step == 0:
            profile = len(names) > 1
            guided = [ctx.guide(p) for p in self._full(ctx, unet_fn, names, extra_base=profile)]
            if profile:
                self._profile(ctx, guided[:-1], guided[-1])
                guided = guided[:-1]
            state["dominant"] = names.index(state["rotation"][0])
        else:
            if state["schedule"][step]:
                pool = state["high"] if step < self.config.background_after * ctx.total_steps else state["rotation"]
                refreshed = pool[state["refreshes"] % len(pool)]
                state["refreshes"] += 1
                state["dominant"] = names.index(refreshed)
            else:
                refreshed = None
            if not self.caching:
                guided = [ctx.guide(p) for p in self._full(ctx, unet_fn, names)]
            else:
                others = [n for n in names if n != refreshed]
                preds = dict(zip(others, self._shallow(ctx, unet_fn, others), strict=True))
                if refreshed is not None:
                    preds[refreshed] = self._full(ctx, unet_fn, [refreshed])[0]
                guided = [ctx.guide(preds[n]) for n in names]
        shares = dominant_shares(len(names), state["dominant"], self.config.dominant_weighting)
        state["report"] = {"full_passes": state["full_passes"], "shallow_passes": state["shallow_passes"],
                           "rotation": list(state["rotation"]), "high_frequency": dict(state["scores"])}
        return combine(guided, shares)
