"""Per-sample adapter routing: one batched UNet forward in which each contiguous group of samples sees its own mix.

``LoraRouter.route(groups)`` temporarily replaces the forward of every peft LoRA ``Linear`` in a module tree. A
batch of ``len(groups) * k`` samples is split into ``len(groups)`` contiguous chunks of ``k``; chunk ``i`` is
computed with ``W + sum_{a in groups[i]} w_a * s_a * B_a A_a`` (``s_a`` = peft's ``lora_alpha / r``, or
``/ sqrt(r)`` with rsLoRA, the same scale ``set_adapters`` multiplies). Two kernels:

* ``fused``: per-group merged weights, stacked ``[G, d_in, d_out]``, one batched matmul: exactly the base FLOPs,
  no LoRA overhead; costs ``G`` copies of each adapted weight (cached while the mix is unchanged).
* ``lowrank``: the base matmul on the whole batch plus one batched low-rank product with the group's adapters
  stacked along the rank (zero-padded): no weight copies, ``O(r)`` extra work.

``auto`` picks ``fused`` for layers up to ``FUSED_MAX_NUMEL`` weights. Nothing of peft's state is changed: on exit
the original forwards are back and the adapters are exactly as they were (active set, scales, merged flags).
Routing plans (per-layer forwards with their merged weights) are cached per mix and dropped whenever peft's adapter
configuration changes (an adapter added, deleted or reloaded); editing weights in place needs ``invalidate()``.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from composition.base import RoutableAdapterSet, StepContext, UNetFn

FUSED_MAX_NUMEL = 1 << 18  # 512 x 512: per-mix weight copies stay small; larger layers go low-rank
ROUTING_MODES = ("auto", "fused", "lowrank")

Group = tuple[tuple[str, float], ...]


def group_key(weights: Mapping[str, float]) -> Group:
    """Canonical, hashable form of one group's mix (zero weights dropped)."""
    return tuple(sorted((name, float(w)) for name, w in weights.items() if w != 0.0))


def _scale(layer: LoraLinear, name: str) -> float:
    if layer.use_rslora.get(name, False):
        return layer.lora_alpha[name] / math.sqrt(layer.r[name])
    return layer.lora_alpha[name] / layer.r[name]


class LoraRouter:
    """Routes mixes of the peft LoRA adapters inside ``module`` (a UNet) per sample group."""

    def __init__(self, module: nn.Module, mode: str = "auto", max_cached_mixes: int = 16) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing mode must be one of {', '.join(ROUTING_MODES)}, got {mode!r}")
        self.module = module
        self.mode = mode
        self.max_cached_mixes = max_cached_mixes
        self._cache: OrderedDict[tuple[int, Group], tuple[tuple[int, ...], Tensor]] = OrderedDict()
        self._layer_count = 0
        self._layers: tuple[tuple, list[tuple[str, nn.Module]]] | None = None
        self._reasons: dict[frozenset[str], str | None] = {}
        self._plans: OrderedDict[tuple, list[tuple[nn.Module, Any]]] = OrderedDict()

    def _config_key(self) -> tuple:
        """Changes whenever peft adds, removes or re-creates an adapter (a new config object per load)."""
        return tuple((name, id(cfg)) for name, cfg in (getattr(self.module, "peft_config", None) or {}).items())

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        """The peft LoRA layers inside ``module``, rescanned only when the adapter configuration changed."""
        key = self._config_key()
        if self._layers is None or self._layers[0] != key:
            self._layers = (key, [(n, m) for n, m in self.module.named_modules() if isinstance(m, LoraLayer)])
            self._reasons.clear()
            self._plans.clear()
            self._cache.clear()
        return self._layers[1]

    def invalidate(self) -> None:
        """Forget every cached merged weight and routing plan (needed after editing weights in place)."""
        self._layers = None
        self._reasons.clear()
        self._plans.clear()
        self._cache.clear()

    def unsupported_reason(self, names: Iterable[str]) -> str | None:
        """Why the adapters ``names`` cannot be routed here, or ``None`` when they can."""
        names = frozenset(names)
        layers = self.lora_layers()
        if names not in self._reasons:
            self._reasons[names] = self._check(layers, names)
        return self._reasons[names]

    @staticmethod
    def _check(layers: list[tuple[str, nn.Module]], names: frozenset[str]) -> str | None:
        found: set[str] = set()
        for path, layer in layers:
            if not isinstance(layer, LoraLinear):
                return f"{path} is a {type(layer).__name__} LoRA layer; routing supports Linear layers only"
            if layer.merged:
                return f"{path} has adapters merged into its weight"
            if layer.fan_in_fan_out:
                return f"{path} stores its weight transposed (fan_in_fan_out)"
            for name in names & set(layer.lora_A):
                if name in layer.lora_variant or layer.use_dora.get(name, False):
                    return f"adapter {name!r} uses a LoRA variant (DoRA/...) at {path}"
                if getattr(layer.lora_A[name], "_lorastudio_timestep_mask", False):  # set by T-LoRA's attach
                    return f"adapter {name!r} has a timestep-dependent rank mask (T-LoRA); routing does not support it"
                found.add(name)
        missing = sorted(names - found)
        if missing:
            return f"adapter(s) {', '.join(missing)} have no peft LoRA layer in the UNet (not a LoRA adapter?)"
        return None

    def can_route(self, names: Iterable[str]) -> bool:
        return self.unsupported_reason(names) is None

    def _fused_weight(self, layer: LoraLinear, group: Group) -> Tensor:
        """``W + sum w * s * B A`` for one layer and mix, cached while no parameter involved was replaced."""
        base = layer.get_base_layer().weight
        present = [(n, w) for n, w in group if n in layer.lora_A]
        params = [base] + [p for n, _ in present for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
        stamp = tuple(v for p in params for v in (id(p), p.data_ptr(), 0 if p.is_inference() else p._version))
        key = (id(layer), group)
        hit = self._cache.get(key)
        fresh = hit is not None and hit[0] == stamp
        if fresh and hit[1].is_inference() and not torch.is_inference_mode_enabled():
            fresh = False  # built under inference_mode: cannot take part in a graph that needs grad
        if fresh:
            self._cache.move_to_end(key)
            return hit[1]
        weight = base.detach().float().clone()
        for name, w in present:
            a, b = layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float()
            weight.addmm_(b, a, alpha=w * _scale(layer, name))
        weight = weight.to(base.dtype)
        self._cache[key] = (stamp, weight)
        while len(self._cache) > self.max_cached_mixes * max(1, self._layer_count):
            self._cache.popitem(last=False)
        return weight

    def _lowrank(self, layer: LoraLinear, groups: Sequence[Group], dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """Stacked ``A [G, R, d_in]`` and scaled ``B^T [G, R, d_out]``, zero-padded to the largest rank sum."""
        per_group = [[(n, w) for n, w in g if n in layer.lora_A] for g in groups]
        ranks = [sum(layer.r[n] for n, _ in g) for g in per_group]
        if not any(ranks):
            return None
        base = layer.get_base_layer().weight
        total = max(ranks)
        a_stack = base.new_zeros(len(groups), total, base.shape[1], dtype=dtype)
        bt_stack = base.new_zeros(len(groups), total, base.shape[0], dtype=dtype)
        for gi, entries in enumerate(per_group):
            offset = 0
            for name, w in entries:
                r = layer.r[name]
                a_stack[gi, offset:offset + r] = layer.lora_A[name].weight.to(dtype)
                bt_stack[gi, offset:offset + r] = (layer.lora_B[name].weight.to(dtype) * (w * _scale(layer, name))).T
                offset += r
        return a_stack, bt_stack

    def _routed_forward(self, layer: LoraLinear, groups: Sequence[Group]):
        base = layer.get_base_layer()
        mode = self.mode
        if mode == "auto":
            mode = "fused" if base.weight.numel() <= FUSED_MAX_NUMEL else "lowrank"
        count = len(groups)
        if mode == "fused":
            weights = [self._fused_weight(layer, g) for g in groups]
            stacked = torch.stack(weights).transpose(1, 2) if count > 1 else None
        else:
            lowrank = self._lowrank(layer, groups, base.weight.dtype)

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if x.shape[0] % count:
                raise ValueError(f"batch of {x.shape[0]} does not split into {count} routing groups")
            if mode == "fused":
                if stacked is None:
                    return F.linear(x, weights[0], base.bias)
                xg = x.reshape(count, -1, x.shape[-1])
                out = torch.bmm(xg, stacked)
                if base.bias is not None:
                    out = out + base.bias
                return out.reshape(*x.shape[:-1], out.shape[-1])
            result = base(x)
            if lowrank is None:
                return result
            a_stack, bt_stack = lowrank
            xg = x.reshape(count, -1, x.shape[-1]).to(a_stack.dtype)
            delta = torch.bmm(torch.bmm(xg, a_stack.transpose(1, 2)), bt_stack)
            return result + delta.reshape(result.shape).to(result.dtype)

        return forward

    @contextmanager
    def route(self, groups: Sequence[Mapping[str, float]]) -> Iterator[None]:
        """Within the block, forwards through ``module`` use ``groups[i]`` on the ``i``-th contiguous chunk."""
        if not groups:
            raise ValueError("routing needs at least one group")
        keys = [group_key(g) for g in groups]
        reason = self.unsupported_reason({n for g in keys for n, _ in g})
        if reason is not None:
            raise ValueError(f"cannot route these adapters: {reason}")
        layers = self.lora_layers()  # cached by unsupported_reason just above
        merged = next((path for path, layer in layers if layer.merged), None)
        if merged is not None:
            raise ValueError(f"cannot route these adapters: {merged} has adapters merged into its weight")
        self._layer_count = len(layers)
        plan_key = (self._layers[0] if self._layers else (), tuple(keys), torch.is_inference_mode_enabled())
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = [(layer, self._routed_forward(layer, keys)) for _, layer in layers]
            self._plans[plan_key] = plan
            while len(self._plans) > self.max_cached_mixes:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(plan_key)
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for layer, forward in plan:
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = forward
            yield
        finally:
            for layer, previous in saved:
                if previous is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous


_ROUTERS: weakref.WeakKeyDictionary[nn.Module, LoraRouter] = weakref.WeakKeyDictionary()


def router_for(module: nn.Module) -> LoraRouter:
    """The shared router of ``module``, so merged-weight caches outlive one request."""
    router = _ROUTERS.get(module)
    if router is None:
        router = _ROUTERS[module] = LoraRouter(module)
    return router


def routable(ctx: StepContext, groups: Sequence[Mapping[str, float]]) -> bool:
    """Whether ``ctx.adapters`` can route these groups in one batched call."""
    names = {n for g in groups for n, w in g.items() if w != 0.0}
    return isinstance(ctx.adapters, RoutableAdapterSet) and ctx.adapters.can_route(names)


def evaluate_groups(
    ctx: StepContext,
    unet_fn: UNetFn,
    groups: Sequence[Mapping[str, float]],
    batched: bool = True,
    max_groups_per_call: int = 0,
    sample: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    call: Callable[[Tensor, Tensor, list[int]], Tensor] | None = None,
) -> list[Tensor]:
    """The raw (CFG-batched) UNet output for each group's mix, in order.

    With ``batched`` and a routable adapter set, the groups' inputs are stacked along the batch and evaluated in
    ``ceil(len(groups) / max_groups_per_call)`` routed calls (``0`` = all in one); otherwise one call per group
    with ``ctx.activate`` in between (the reference implementation's adapter switching). ``call(sample,
    encoder_hidden_states, group_indices)`` replaces ``unet_fn`` when given (e.g. a partial UNet forward); its
    batch holds the groups ``group_indices`` in that order.
    """
    x = ctx.model_input if sample is None else sample
    ehs = ctx.encoder_hidden_states if encoder_hidden_states is None else encoder_hidden_states
    fn = call if call is not None else (lambda s, e, _: unet_fn(s, e))
    if not groups:
        return []
    if not (batched and routable(ctx, groups)):
        outputs = []
        for index, group in enumerate(groups):
            ctx.activate({n: w for n, w in group.items() if w != 0.0})
            outputs.append(fn(x, ehs, [index]))
        return outputs
    size = len(groups) if max_groups_per_call <= 0 else max_groups_per_call
    outputs = []
    for start in range(0, len(groups), size):
        chunk = list(groups[start:start + size])
        indices = list(range(start, start + len(chunk)))
        with ctx.adapters.route(chunk):
            out = fn(x.repeat(len(chunk), *([1] * (x.dim() - 1))), ehs.repeat(len(chunk), *([1] * (ehs.dim() - 1))),
                     indices)
        outputs.extend(out.chunk(len(chunk)))
    return outputs
