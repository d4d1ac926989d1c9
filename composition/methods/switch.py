"""LoRA Switch (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv:2402.16843).

https://arxiv.org/abs/2402.16843 — exactly one adapter is active at each denoising step, cycled in a fixed order:

1. order the adapters (``order``, else the order of the weights; the paper found "character first" best);
2. step 0 uses the first adapter; after step ``i > 0`` with ``i % interval == 0`` the next one takes over, so the
   adapter of step ``j >= 1`` is ``floor((j - 1) / interval) mod N`` (the first gets ``interval + 1`` steps);
3. one UNet call per step with standard CFG; the prompt is encoded with the first adapter active.

Deviations: the active adapter runs at its slider weight (the reference uses one global LoRA scale), and by
default it is applied through per-sample routing with a merged weight (``composition.routing``) instead of peft's
``set_adapters`` plus unfused LoRA forward: same maths, base-model cost. ``reference_schedule=False`` gives every
adapter exactly ``interval`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from composition.base import COMPOSERS, Composer, ComposerConfig, StepContext, UNetFn
from composition.routing import evaluate_groups


@dataclass
class SwitchConfig(ComposerConfig):
    interval: int = field(
        default=5,
        metadata={"help": "Steps each adapter stays active before the next one takes over (the paper's tau)",
                  "min": 1},
    )
    order: str = field(
        default="",
        metadata={"help": "Comma-separated adapter names or 1-based slot numbers giving the rotation order "
                          "(e.g. '2,1'); empty = slot order. Adapters not listed follow in slot order"},
    )
    reference_schedule: bool = field(
        default=True,
        metadata={"help": "Switch after steps interval, 2*interval, ... as the reference does (the first adapter "
                          "gets one extra step); off = every adapter gets exactly interval steps"},
    )
    routed: bool = field(
        default=True,
        metadata={"help": "Apply the active adapter as a merged weight through per-sample routing (base-model "
                          "speed); off = peft set_adapters switching with the unfused LoRA forward"},
    )


@COMPOSERS.register("switch")
class SwitchComposer(Composer):
    """One adapter per step, rotating every ``interval`` steps."""

    config_cls = SwitchConfig
    config: SwitchConfig

    def rotation(self, weights: dict[str, float]) -> list[str]:
        """Adapters in switching order (zero weights left out); unknown names in ``order`` raise ``ValueError``."""
        active = [name for name, w in weights.items() if w != 0.0]
        slots = list(weights)
        listed = [n.strip() for n in self.config.order.split(",") if n.strip()]
        listed = [slots[int(n) - 1] if n not in weights and n.isdigit() and 1 <= int(n) <= len(slots) else n
                  for n in listed]
        unknown = [n for n in listed if n not in weights]
        if unknown:
            raise ValueError(f"switch order names unknown adapter(s): {', '.join(unknown)}")
        ordered = [n for n in dict.fromkeys(listed) if n in active]
        return ordered + [n for n in active if n not in ordered]

    def index_at(self, step: int, count: int) -> int:
        """Position in the rotation of the adapter active at ``step``."""
        tau = self.config.interval
        if self.config.reference_schedule:
            return 0 if step == 0 else ((step - 1) // tau) % count
        return (step // tau) % count

    def _mix(self, ctx: StepContext) -> dict[str, float]:
        order = ctx.state["order"]
        if not order:
            return {}
        name = order[self.index_at(ctx.step, len(order))]
        return {name: ctx.weights[name]}

    def setup(self, ctx: StepContext) -> None:
        ctx.state["order"] = self.rotation(ctx.weights)
        ctx.activate(self._mix(ctx))

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        (pred,) = evaluate_groups(ctx, unet_fn, [self._mix(ctx)], batched=self.config.routed)
        return ctx.guide(pred)
