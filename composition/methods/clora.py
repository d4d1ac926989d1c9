"""CLoRA, contrastive test-time composition of multiple LoRAs (Meral et al., "CLoRA: A Contrastive Approach to
Compose Multiple LoRA Models", arXiv:2403.19776).

https://arxiv.org/abs/2403.19776 — branch 0 is the base model, branch i runs adapter i alone:

1. every step all branches run (one batched UNet call with per-sample routing); a processor on the cross-attention
   layers of the chosen resolution records each branch's attention maps of its concept tokens;
2. on the early steps the latent gets a contrastive update: NT-Xent over the min-max normalised maps (same
   concept across branches = positives, different concepts = negatives), ``z <- z - step_size * grad``; the
   scheduler then steps from the updated latent with the predictions of that forward;
3. masks: pixels where a concept token's map exceeds ``mask_threshold`` times its maximum belong to that
   adapter's branch, uncovered pixels to the base branch; the guided predictions are fused mask-weighted.

Deviations: all branches share the request's prompt (the reference lets each branch have its own) and it is
encoded once with all adapters active; maps are averaged over the conditional CFG half only (the reference also
averages the unconditional half); overlapping masks go by default to the branch with the strongest normalised
attention, so the masks partition the image (``overlap=average`` averages them as the reference does); the
reference's repeated "iterative steps" refinement is not implemented; each adapter runs at its slider weight.

Concept words come from ``concepts`` (config) unless the caller gives an adapter its own (``adapter_prompts``, the
per-adapter box of the Generate tab), which wins for that adapter. The masks of the last fused step are left in
``ctx.state["report"]`` (``masks`` ``[1 + N, h, w]`` at latent size, ``branches``, ``concepts``) and can be drawn
over the image with ``region_overlay``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from composition.base import COMPOSERS, Composer, ComposerConfig, StepContext, UNetFn
from composition.routing import evaluate_groups


@dataclass
class CLoRAConfig(ComposerConfig):
    concepts: str = field(
        default="",
        metadata={"help": "The prompt word(s) each adapter stands for, one entry per adapter separated by ';' in "
                          "slot order ('dog; red,cat') or by name ('adapter=dog'). An adapter's own concept word "
                          "wins over its entry; without either, its trigger words (else its name) are used. The "
                          "words must appear in the prompt"},
    )
    latent_update: bool = field(
        default=True,
        metadata={"help": "Apply the contrastive attention loss to the latent on the early steps"},
    )
    step_size: float = field(
        default=20.0,
        metadata={"help": "Gradient step of the latent update (the reference's step_size)", "min": 0.0},
    )
    update_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of the steps, from the start, that get the latent update (the reference's "
                          "max_iter_to_alter 50 of 100)", "min": 0.0, "max": 1.0},
    )
    temperature: float = field(
        default=0.5,
        metadata={"help": "Temperature of the NT-Xent contrastive loss", "min": 1e-3},
    )
    apply_mask_after: int = field(
        default=0,
        metadata={"help": "First step that fuses the branches with masks; earlier steps average them", "min": 0},
    )
    mask_threshold: float = field(
        default=0.3,
        metadata={"help": "A pixel belongs to a concept where its attention exceeds this fraction of the map's "
                          "maximum (the reference's mask_threshold_alpha)", "min": 0.0, "max": 1.0},
    )
    overlap: str = field(
        default="argmax",
        metadata={"help": "Pixels claimed by several concepts: 'argmax' gives them to the strongest (masks "
                          "partition the image), 'average' averages those branches (reference)",
                  "choices": ["argmax", "average"]},
    )
    attention_resolution: int = field(
        default=0,
        metadata={"help": "Side of the cross-attention maps used (0 = the largest cross-attention resolution "
                          "not above a quarter of the latent side, 16 for SD-1.5 at 512x512)", "min": 0},
    )
    batched: bool = field(
        default=True,
        metadata={"help": "Run all branches in one batched UNet call with per-sample routing; off = one call "
                          "per branch with adapter switching"},
    )


# Region colours: the base branch grey, then one colour per adapter in slot order (repeating after eight).
REGION_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("grey", (128, 128, 128)), ("red", (230, 25, 75)), ("green", (60, 180, 75)), ("blue", (0, 130, 200)),
    ("orange", (245, 130, 48)), ("purple", (145, 30, 180)), ("cyan", (70, 240, 240)), ("magenta", (240, 50, 230)),
    ("yellow", (255, 225, 25)),
)


def split_words(text: str) -> list[str]:
    """``'red, car'`` -> ``['red', 'car']`` (empty entries dropped)."""
    return [w.strip() for w in text.split(",") if w.strip()]


def region_colour(branch: int) -> tuple[str, tuple[int, int, int]]:
    """Name and RGB of branch ``branch`` (0 = base model) in region previews."""
    if branch == 0:
        return REGION_COLOURS[0]
    return REGION_COLOURS[1 + (branch - 1) % (len(REGION_COLOURS) - 1)]


def region_overlay(image: Image.Image, masks: Tensor, alpha: float = 0.55) -> Image.Image:
    """``image`` with each branch's mask (``[G, h, w]``, any resolution) painted in its ``region_colour``.

    Overlapping masks (``overlap=average``) mix their colours; the masks are scaled to the image (nearest)."""
    if masks.ndim != 3 or masks.shape[0] < 1:
        raise ValueError(f"masks must be [branches, h, w], got shape {tuple(masks.shape)}")
    resized = F.interpolate(masks.detach().float().cpu()[None], size=(image.height, image.width), mode="nearest")[0]
    palette = torch.tensor([region_colour(i)[1] for i in range(masks.shape[0])], dtype=torch.float32)
    total = resized.sum(0, keepdim=True).clamp_min(1e-6)
    colour = torch.einsum("ghw,gc->hwc", resized / total, palette)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    blended = (1 - alpha) * pixels + alpha * colour
    return Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy(), mode="RGB")


def parse_concepts(text: str, names: list[str]) -> dict[str, list[str]]:
    """Concept words per adapter from ``'a=dog; b=red,cat'`` or positionally ``'dog; red,cat'`` (slot order).

    Named entries go to that adapter; plain entries go, in order, to the adapters not named; an adapter left
    without an entry stands for its own name.
    """
    named: dict[str, list[str]] = {}
    positional: list[list[str]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, words = part.partition("=")
        if not sep:
            name, words = "", part
        name = name.strip()
        parsed = [w.strip() for w in words.split(",") if w.strip()]
        if not parsed:
            raise ValueError(f"concepts entries look like 'word,word' or 'adapter=word,word', got {part.strip()!r}")
        if not name:
            positional.append(parsed)
            continue
        if name not in names:
            raise ValueError(f"concepts names unknown adapter {name!r}; adapters: {', '.join(names)}")
        named[name] = parsed
    unnamed = [n for n in names if n not in named]
    if len(positional) > len(unnamed):
        raise ValueError(f"{len(positional)} concept entries for {len(unnamed)} adapter(s) without a named entry")
    out = dict(zip(unnamed, positional, strict=False))
    return {n: named.get(n) or out.get(n) or [n] for n in names}


def token_positions(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Positions of ``words`` in the padded, tokenised prompt (as the text encoder sees it)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    found: list[int] = []
    for word in words:
        sub = tokenizer(word, add_special_tokens=False).input_ids
        hits = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]
        if not hits:
            raise ValueError(f"CLoRA concept word {word!r} is not in the prompt {prompt!r}")
        for start in hits:
            found.extend(range(start, start + len(sub)))
    return sorted(set(found))


def build_masks(maps: Tensor, tokens: list[list[int]], threshold: float, overlap: str = "argmax") -> Tensor:
    """Branch masks ``[G, r, r]`` from maps ``[G, r, r, L]``; branches without tokens only get uncovered pixels.

    ``argmax``: one-hot per pixel (disjoint, covering); ``average``: 0/1 masks that may overlap, uncovered pixels
    go to branch 0.
    """
    strength = maps.new_zeros(maps.shape[:3])
    for i, toks in enumerate(tokens):
        if not toks:
            continue
        a = maps[i][..., toks]
        norm = a / a.amax(dim=(0, 1), keepdim=True).clamp_min(1e-12)
        best = norm.max(-1).values
        strength[i] = torch.where((norm > threshold).any(-1), best, torch.zeros_like(best))
    if overlap == "argmax":
        return F.one_hot(strength.argmax(0), maps.shape[0]).permute(2, 0, 1).to(maps.dtype)
    masks = (strength > 0).to(maps.dtype)
    masks[0] = torch.where(masks.sum(0) == 0, torch.ones_like(masks[0]), masks[0])
    return masks


def nt_xent(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """NT-Xent on cosine similarities: mean over positive pairs of ``-log(e^s_ap / (e^s_ap + sum_n e^s_an))``."""
    z = F.normalize(embeddings, dim=-1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    positives = same & ~eye
    negatives = ~same
    if not positives.any() or not negatives.any():
        return sim.sum() * 0.0
    neg_sum = torch.where(negatives, sim.exp(), torch.zeros_like(sim)).sum(1, keepdim=True)
    losses = -(sim - torch.log(sim.exp() + neg_sum))
    return losses[positives].mean()


def contrastive_loss(maps: Tensor, tokens_by_concept: list[list[int]], temperature: float) -> Tensor:
    """Every branch's min-max normalised map of every concept token, labelled by concept, through NT-Xent."""
    embeddings, labels = [], []
    for concept, toks in enumerate(tokens_by_concept):
        for branch in range(maps.shape[0]):
            for j in toks:
                e = maps[branch, :, :, j].flatten()
                e = (e - e.min()) / (e.max() - e.min()).clamp_min(1e-12)
                embeddings.append(e)
                labels.append(concept)
    return nt_xent(torch.stack(embeddings), torch.tensor(labels), temperature)


class _AttentionRecorder:
    """Cross-attention processor wrapper: records probabilities at one query length, else defers to the original."""

    def __init__(self, original: Any, target_len: int, store: list[Tensor]) -> None:
        self.original = original
        self.target_len = target_len
        self.store = store

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or hidden_states.shape[1] != self.target_len:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, seq, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.store.append(probs.view(batch, attn.heads, seq, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_sides(unet) -> list[int]:
    """Latent-side divisors of the blocks with cross-attention: side = latent side // divisor."""
    divisors = set()
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            divisors.add(2 ** i)
    if getattr(unet.mid_block, "has_cross_attention", False):
        divisors.add(2 ** (len(unet.down_blocks) - 1))
    return sorted(divisors)


@COMPOSERS.register("clora")
class CLoRAComposer(Composer):
    """Base + one branch per adapter, contrastive latent update, attention masks, mask-weighted fusion."""

    config_cls = CLoRAConfig
    config: CLoRAConfig
    requires_grad = True

    def __init__(self, config: CLoRAConfig | None = None, adapter_prompts: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        self.adapter_prompts = dict(adapter_prompts or {})  # adapter name -> its concept word(s), 'red, car'
        self.masks: Tensor | None = None  # last step's branch masks [1 + N, h, w] at latent size (for previews)

    def concepts_for(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Concept words per adapter: ``adapter_prompts`` where given, else the ``concepts`` setting."""
        concepts = parse_concepts(self.config.concepts, list(names))
        for name in names:
            words = split_words(self.adapter_prompts.get(name, ""))
            if words:
                concepts[name] = words
        return concepts

    def setup(self, ctx: StepContext) -> None:
        active = {n: w for n, w in ctx.weights.items() if w != 0.0}
        names = list(active)
        unet = ctx.pipe.unet
        height, width = ctx.latents.shape[-2:]
        divisors = [d for d in cross_attention_sides(unet) if height % d == 0 and width % d == 0]
        if names and not divisors:
            raise ValueError("CLoRA needs a UNet with cross-attention layers")
        if self.config.attention_resolution:
            matching = [d for d in divisors if width // d == self.config.attention_resolution]
            if names and not matching:
                raise ValueError(f"no cross-attention layer at width {self.config.attention_resolution}; "
                                 f"available: {', '.join(str(width // d) for d in divisors)}")
            divisor = matching[0] if matching else 1
        else:
            usable = [d for d in divisors if width // d <= max(1, width // 4)]
            divisor = min(usable) if usable else max(divisors, default=1)
        shape = (height // divisor, width // divisor)
        store: list[Tensor] = []
        ctx.state.update(names=names, store=store, shape=shape, saved=None, tokens=[])
        if names:
            concepts = self.concepts_for(names)
            ctx.state["concepts"] = concepts
            ctx.state["tokens"] = [token_positions(ctx.pipe.tokenizer, ctx.prompt, concepts[n]) for n in names]
            saved = dict(unet.attn_processors)
            ctx.state["saved"] = saved
            target = shape[0] * shape[1]
            unet.set_attn_processor({k: _AttentionRecorder(p, target, store) if k.endswith("attn2.processor") else p
                                     for k, p in saved.items()})
        ctx.activate(active)

    def teardown(self, ctx: StepContext) -> None:
        saved = ctx.state.get("saved")
        if saved is not None:
            ctx.pipe.unet.set_attn_processor(saved)
            ctx.state["saved"] = None
        super().teardown(ctx)

    def _forward(self, ctx: StepContext, unet_fn: UNetFn, sample: Tensor) -> tuple[list[Tensor], Tensor]:
        """Raw predictions of the base and adapter branches and their maps ``[1 + N, r, r, L]``."""
        names = ctx.state["names"]
        store: list[Tensor] = ctx.state["store"]
        shape = ctx.state["shape"]
        per_branch: dict[int, Tensor] = {}

        def call(x: Tensor, ehs: Tensor, indices: list[int]) -> Tensor:
            store.clear()
            out = unet_fn(x, ehs)
            maps = torch.stack(store).mean(0)  # [B, seq, L] averaged over layers
            if ctx.do_cfg:
                maps = maps[1::2]
            for index, m in zip(indices, maps.chunk(len(indices)), strict=True):
                per_branch[index] = m[0].reshape(*shape, m.shape[-1])
            store.clear()
            return out

        groups = [{}] + [{n: ctx.weights[n]} for n in names]
        preds = evaluate_groups(ctx, unet_fn, groups, batched=self.config.batched, sample=sample, call=call)
        return preds, torch.stack([per_branch[i] for i in range(len(groups))])

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        names = ctx.state["names"]
        if not names:
            (pred,) = evaluate_groups(ctx, unet_fn, [{}], batched=self.config.batched)
            return ctx.guide(pred)
        tokens: list[list[int]] = ctx.state["tokens"]
        update = (self.config.latent_update and self.config.step_size > 0 and len(names) > 1
                  and ctx.step < self.config.update_fraction * ctx.total_steps)
        if update:
            with torch.enable_grad():
                latents = ctx.latents.detach().requires_grad_(True)
                model_input = torch.cat([latents] * 2) if ctx.do_cfg else latents
                model_input = ctx.scheduler.scale_model_input(model_input, ctx.timestep)
                preds, maps = self._forward(ctx, unet_fn, model_input)
                loss = contrastive_loss(maps, tokens, self.config.temperature)
                (grad,) = torch.autograd.grad(loss, latents)
            ctx.state["loss"] = float(loss)
            ctx.latents = (latents - self.config.step_size * grad).detach()
            preds, maps = [p.detach() for p in preds], maps.detach()
        else:
            preds, maps = self._forward(ctx, unet_fn, ctx.model_input)
        guided = torch.stack([ctx.guide(p) for p in preds])  # [1 + N, 1, C, h, w]
        if ctx.step < self.config.apply_mask_after:
            return guided.mean(0)
        masks = build_masks(maps, [[]] + tokens, self.config.mask_threshold, self.config.overlap)
        masks = F.interpolate(masks[:, None], size=guided.shape[-2:], mode="nearest")  # [1 + N, 1, h, w]
        self.masks = masks[:, 0]
        ctx.state["report"] = {"masks": self.masks, "branches": ["", *names], "concepts": ctx.state["concepts"]}
        weights = masks[:, None]  # broadcast over the batch and channel dims
        return (guided * weights).sum(0) / weights.sum(0).clamp_min(1e-12)
