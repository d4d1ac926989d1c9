"""LoRA Composite (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv:2402.16843).

https://arxiv.org/abs/2402.16843 — the adapters stay separate and each one guides every step:

1. at every step, for each adapter i run the UNet on the CFG batch with only adapter i active -> (eps_i^0, eps_i^c);
2. combine ``eps = mean_i eps_i^0 + w * (mean_i eps_i^c - mean_i eps_i^0)``, i.e. the mean of the per-adapter
   guided predictions;
3. the prompt is encoded once with all adapters active (their text-encoder parts merged, as in the reference).

Deviations: each adapter runs at its slider weight (the reference uses one global LoRA scale), and the N passes
run as ONE batched UNet call of batch 2N with per-sample adapter routing (``composition.routing``) instead of N
calls with ``set_adapters`` in between; when the adapter set cannot route (non-LoRA adapters) it falls back to the
reference's sequential passes. ``weighted_mean`` optionally averages with the slider weights instead of 1/N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from composition.base import COMPOSERS, Composer, ComposerConfig, StepContext, UNetFn
from composition.routing import evaluate_groups


@dataclass
class CompositeConfig(ComposerConfig):
    batched: bool = field(
        default=True,
        metadata={"help": "Evaluate all adapters in one batched UNet call with per-sample adapter routing; off = "
                          "one call per adapter with adapter switching in between (the reference's way)"},
    )
    max_adapters_per_call: int = field(
        default=0,
        metadata={"help": "Split the batched call into chunks of at most this many adapters to bound memory "
                          "(0 = all adapters in one call)", "min": 0},
    )
    weighted_mean: bool = field(
        default=False,
        metadata={"help": "Average the per-adapter predictions with the slider weights (normalised) instead of "
                          "uniformly; each adapter then runs at full strength"},
    )


@COMPOSERS.register("composite")
class CompositeComposer(Composer):
    """Mean of per-adapter guided predictions, all adapters evaluated in one routed batch."""

    config_cls = CompositeConfig
    config: CompositeConfig

    def groups(self, weights: dict[str, float]) -> tuple[list[dict[str, float]], list[float]]:
        """Each adapter's own mix and its share in the mean (no adapters: the base model alone)."""
        active = {n: w for n, w in weights.items() if w != 0.0}
        if not active:
            return [{}], [1.0]
        if self.config.weighted_mean:
            total = sum(abs(w) for w in active.values())
            return [{n: 1.0} for n in active], [abs(w) / total for w in active.values()]
        return [{n: w} for n, w in active.items()], [1.0 / len(active)] * len(active)

    def setup(self, ctx: StepContext) -> None:
        ctx.state["groups"], ctx.state["shares"] = self.groups(ctx.weights)
        ctx.activate({n: w for n, w in ctx.weights.items() if w != 0.0})

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        preds = evaluate_groups(ctx, unet_fn, ctx.state["groups"], batched=self.config.batched,
                                max_groups_per_call=self.config.max_adapters_per_call)
        return combine([ctx.guide(p) for p in preds], ctx.state["shares"])


def combine(preds: list[Tensor], shares: list[float]) -> Tensor:
    """``sum_i share_i * pred_i`` (one prediction is returned as is)."""
    if len(preds) == 1 and shares[0] == 1.0:
        return preds[0]
    stacked = torch.stack(preds)
    coeffs = torch.tensor(shares, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * preds[0].dim()))
    return (stacked * coeffs).sum(0)
