"""LoRA Merge (Zhong et al., Multi-LoRA Composition, §5a-1): the baseline of multi-adapter sampling.

All adapters are active at once for the whole run, each at its weight, so every adapted layer computes
``W + sum_i w_i * s_i * B_i A_i``: a weighted SUM of the deltas (not an average) with one UNet call per step and
standard CFG. Adapters are applied once before prompt encoding, so text-encoder parts merge too. Fidelity
drops as more adapters are summed; ``normalize`` turns the sum into a weighted average.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from composition.base import COMPOSERS, Composer, ComposerConfig, StepContext, UNetFn
from composition.routing import evaluate_groups


@dataclass
class MergeConfig(ComposerConfig):
    normalize: bool = field(
        default=False,
        metadata={"help": "Divide the weights by the sum of their absolute values, so they add up to 1 "
                          "(a weighted average instead of the reference's plain sum)"},
    )
    routed: bool = field(
        default=True,
        metadata={"help": "Run the UNet with the mix folded into the weights through per-sample routing "
                          "(base-model speed); off = peft's unfused LoRA forward with set_adapters"},
    )


@COMPOSERS.register("merge")
class MergeComposer(Composer):
    """Weighted sum of all adapters, applied once in ``setup``; the default one-call prediction does the rest."""

    config_cls = MergeConfig
    config: MergeConfig

    def merged_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The weights actually applied: zero weights dropped, optionally normalized."""
        active = {name: w for name, w in weights.items() if w != 0.0}
        if self.config.normalize and active:
            total = sum(abs(w) for w in active.values())
            active = {name: w / total for name, w in active.items()}
        return active

    def setup(self, ctx: StepContext) -> None:
        ctx.activate(self.merged_weights(ctx.weights))

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        (pred,) = evaluate_groups(ctx, unet_fn, [self.merged_weights(ctx.weights)], batched=self.config.routed)
        return ctx.guide(pred)
