"""T-LoRA: timestep-dependent rank masking with an orthogonal (Ortho-LoRA) initialisation.

Soboleva et al., "T-LoRA: Single Image Diffusion Model Customization Without Overfitting" (arXiv:2507.05964,
code: ControlGenAI/T-LoRA); spec: shared/reference/methods.md section 1.

Each targeted Linear ``W`` (default: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention) gets

    ΔW(t) = P diag(λ ⊙ m_t) Q − P0 diag(λ0 ⊙ m_t) Q0,

with trainable ``Q`` (r×d_in), ``P`` (d_out×r), ``λ`` (r) and frozen copies ``Q0, P0, λ0`` of their initial values,
so ΔW = 0 at the start. ``m_t`` keeps the first ``r(t)`` of the R rank components,

    r(t) = floor(((T − t) / T)^α · (R − r_min)) + r_min,

full rank R on clean inputs (t = 0), ``r_min`` at the noisiest step. The layer rank is ``min(R, d_in, d_out)``;
its mask is the same prefix, cut to that rank. The scale is 1 (no alpha / r factor), as in the reference.

Initialisation: ``M ~ N(0, (1/r)²)`` of shape d_out×d_in (seeded by the run seed and the layer path),
``M = U S Vh``; for ``sig_type`` principal / last / middle take the first / last / centred r indices ``idx`` and set
``Q = Vh[idx]``, ``P = U[:, idx]``, ``λ = S[idx]``. Deviation: the reference takes rows of U and columns of Vh,
which are orthonormal but not paired singular vectors (and only fit together for square layers); the paired form
is what the method describes (``P diag(λ) Q`` is a truncated SVD of M) and works for any layer shape.

Deviation: the reference computes one mask per batch from ``timesteps[0]``; here every sample gets the mask of
its own timestep. The timestep is read by a forward pre-hook on the UNet (positional argument 1 or keyword
``timestep``), so training steps, preview sampling and inference all use the same mechanism. Code that calls the
UNet's sub-modules directly (not through ``unet(...)``) keeps the mask of the last full UNet call.

Saved tensors: ``unet.<path>.tlora.{q,p,lam,q0,p0,lam0}``; the frozen copies are required. For inference each
layer becomes a peft LoRA of rank 2r (``lora_A = [Q; Q0]``, ``lora_B = [Pλ, −P0λ0]``, scale 1) whose ``lora_A``
output is multiplied by ``[m_t, m_t]`` through a forward hook, so it mixes with other peft adapters through
``set_adapters``. Such adapters must not be fused (``fuse_lora`` ignores the mask) and are refused by per-sample
routing. Exported as a plain LoRA the adapter is its full-rank (t = 0) update.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.base import METHODS, LoRAFactors, Method, MethodConfig, PeftAttachedAdapter

_FOLD_LIMIT = 1 << 22  # tokens·d_in·d_out below which folding ΔW into the weight beats the low-rank matmuls

SIG_TYPES = ["principal", "last", "middle"]
PARTS = ("q", "p", "lam", "q0", "p0", "lam0")
META_RANK = "lorastudio.tlora.rank"
META_MIN_RANK = "lorastudio.tlora.min_rank"
META_EXPONENT = "lorastudio.tlora.rank_exponent"
META_TIMESTEPS = "lorastudio.tlora.num_train_timesteps"
# Set on a peft ``lora_A[adapter]`` module whose output carries the timestep mask; composition.routing reads it.
MASK_MARK = "_lorastudio_timestep_mask"
_CLOCK_ATTR = "_lorastudio_tlora_clock"
_KEY = re.compile(r"unet\.(?P<path>.+)\.tlora\.(?P<part>q0|p0|lam0|q|p|lam)")


@dataclass
class TLoRAConfig(MethodConfig):
    rank: int = field(default=8, metadata={
        "help": "Maximum rank R, used on clean inputs (t = 0); each layer uses at most min(R, its in/out size)",
        "min": 1, "max": 1024})
    alpha: float | None = field(default=None, metadata={
        "help": "Not used by T-LoRA: its update has scale 1. Leave empty", "advanced": True})
    min_rank: int = field(default=4, metadata={
        "help": "Minimum rank r_min, used at the noisiest timestep; 1 <= min_rank <= rank", "min": 1, "max": 1024})
    rank_exponent: float = field(default=1.0, metadata={
        "help": "Exponent α of the rank schedule r(t) = floor(((T - t) / T)^α · (R - r_min)) + r_min; "
                "> 1 drops rank faster as noise grows", "min": 1e-3, "max": 100.0})
    sig_type: str = field(default="last", metadata={
        "help": "Which singular vectors of a random matrix start the adapter: last (smallest singular values, the "
                "reference default), principal (largest) or middle", "choices": SIG_TYPES, "advanced": True})
    num_train_timesteps: int = field(default=1000, metadata={
        "help": "T of the rank schedule: the base model's number of training timesteps (1000 for Stable "
                "Diffusion); a file is refused by pipelines whose scheduler says otherwise",
        "min": 1, "max": 100_000, "advanced": True})

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None:
            raise ValueError(f"alpha is not used by T-LoRA (its update has scale 1); leave it empty, got {self.alpha}")
        if self.min_rank > self.rank:
            raise ValueError(f"min_rank ({self.min_rank}) must be <= rank ({self.rank})")
        if not (self.rank_exponent > 0 and math.isfinite(self.rank_exponent)):
            raise ValueError(f"rank_exponent must be a positive number, got {self.rank_exponent}")


@dataclass(frozen=True)
class RankSchedule:
    """``r(t) = floor(((T - t) / T)^α · (R - r_min)) + r_min`` and its prefix masks."""

    rank: int
    min_rank: int
    exponent: float
    num_train_timesteps: int

    @classmethod
    def from_config(cls, config: TLoRAConfig) -> RankSchedule:
        return cls(config.rank, config.min_rank, config.rank_exponent, config.num_train_timesteps)

    def ranks(self, timesteps: Tensor) -> Tensor:
        """Per-sample rank (long) for a 1-D tensor of timesteps; t outside [0, T] is clamped."""
        dtype = torch.float32 if timesteps.device.type == "mps" else torch.float64
        total = float(self.num_train_timesteps)
        frac = ((total - timesteps.to(dtype)) / total).clamp(0.0, 1.0)
        return torch.floor(frac.pow(self.exponent) * (self.rank - self.min_rank)).long() + self.min_rank

    def masks(self, timesteps: Tensor) -> Tensor:
        """``(len(timesteps), R)`` float masks, 1 on the first ``r(t)`` components."""
        ranks = self.ranks(timesteps)
        return (torch.arange(self.rank, device=ranks.device) < ranks[:, None]).float()

    def to_metadata(self) -> dict[str, str]:
        return {META_RANK: str(self.rank), META_MIN_RANK: str(self.min_rank), META_EXPONENT: repr(self.exponent),
                META_TIMESTEPS: str(self.num_train_timesteps)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> RankSchedule:
        missing = [k for k in (META_RANK, META_MIN_RANK, META_EXPONENT, META_TIMESTEPS) if not metadata.get(k)]
        if missing:
            raise ValueError(f"T-LoRA metadata is missing {', '.join(missing)}")
        try:
            schedule = cls(int(metadata[META_RANK]), int(metadata[META_MIN_RANK]), float(metadata[META_EXPONENT]),
                           int(metadata[META_TIMESTEPS]))
        except ValueError as exc:
            raise ValueError(f"unreadable T-LoRA metadata ({exc})") from None
        if not 1 <= schedule.min_rank <= schedule.rank:
            raise ValueError(f"T-LoRA metadata needs 1 <= min_rank <= rank, got {schedule.min_rank} and "
                             f"{schedule.rank}")
        if not (schedule.exponent > 0 and math.isfinite(schedule.exponent)) or schedule.num_train_timesteps < 1:
            raise ValueError(f"T-LoRA metadata has an invalid rank_exponent ({schedule.exponent}) or "
                             f"num_train_timesteps ({schedule.num_train_timesteps})")
        return schedule


class TimestepClock:
    """The per-sample timesteps of the UNet call in progress, read by a forward pre-hook; one per UNet."""

    def __init__(self, unet: nn.Module) -> None:
        self.timesteps: Tensor | None = None
        self.version = 0
        self.users = 0
        self._handle = unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    @classmethod
    def acquire(cls, unet: nn.Module) -> TimestepClock:
        clock = unet.__dict__.get(_CLOCK_ATTR)
        if clock is None:
            clock = cls(unet)
            unet.__dict__[_CLOCK_ATTR] = clock
        clock.users += 1
        return clock

    def release(self, unet: nn.Module) -> None:
        self.users -= 1
        if self.users <= 0 and unet.__dict__.get(_CLOCK_ATTR) is self:
            self._handle.remove()
            del unet.__dict__[_CLOCK_ATTR]

    def set(self, timesteps: Tensor | float) -> None:
        t = torch.as_tensor(timesteps).detach()
        self.timesteps = t.reshape(-1)
        self.version += 1

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is not None:
            self.set(t)


class RankMasks:
    """One adapter's masks for the clock's current timesteps, computed once per UNet call and cut per layer."""

    def __init__(self, schedule: RankSchedule, clock: TimestepClock) -> None:
        self.schedule = schedule
        self.clock = clock
        self._version = -1
        self._full = torch.ones(1, schedule.rank)
        self._cache: dict[tuple[int, bool, torch.device, torch.dtype], Tensor] = {}

    def current(self, rank: int, like: Tensor, doubled: bool = False) -> Tensor:
        """``(rows, rank)`` masks (``[m, m]``, ``(rows, 2·rank)``, when ``doubled``) on ``like``'s device and dtype.

        ``rows`` is 1 (one timestep for the whole batch) or one per sample.
        """
        if self.clock.timesteps is None:
            raise RuntimeError("T-LoRA layers need the timestep: run them inside a UNet call")
        if self._version != self.clock.version:
            self._full = self.schedule.masks(self.clock.timesteps)
            self._cache = {}
            self._version = self.clock.version
        key = (rank, doubled, like.device, like.dtype)
        mask = self._cache.get(key)
        if mask is None:
            mask = self._full[:, :rank]
            mask = torch.cat([mask, mask], dim=1) if doubled else mask
            mask = self._cache[key] = mask.to(like.device, like.dtype)
        return mask


def broadcast_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` (rows, k) viewed to multiply ``like`` (N, ..., k): one row for all, or one per sample.

    N may be a multiple of ``rows`` (video UNets fold frames or pixels into the batch, sample-major); each row is
    then repeated for its ``N / rows`` consecutive entries.
    """
    rows = mask.shape[0]
    if like.ndim < 2:
        if rows != 1:
            raise ValueError(f"an unbatched input cannot take {rows} per-sample T-LoRA masks")
        return mask[0]
    batch = like.shape[0]
    if rows not in (1, batch):
        if batch % rows:
            raise ValueError(f"a batch of {batch} does not fit {rows} per-sample T-LoRA timesteps")
        mask = mask.repeat_interleave(batch // rows, dim=0)
    return mask.view(mask.shape[0], *([1] * (like.ndim - 2)), mask.shape[1])


def layer_seed(seed: int, path: str) -> int:
    """A stable 63-bit seed for one layer's initialisation."""
    digest = hashlib.sha256(f"tlora/{seed}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def ortho_init(d_out: int, d_in: int, rank: int, sig_type: str, seed: int,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """``(Q, P, λ)``: ``rank`` paired singular triplets of a seeded Gaussian d_out×d_in matrix with std 1/rank.

    The SVD runs on ``device``; the results are float32 on the CPU.
    """
    if sig_type not in SIG_TYPES:
        raise ValueError(f"sig_type must be one of {', '.join(SIG_TYPES)}, got {sig_type!r}")
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(d_out, d_in, generator=generator) / rank
    u, s, vh = torch.linalg.svd(matrix.to(device), full_matrices=False)
    count = s.shape[0]
    start = {"principal": 0, "last": count - rank, "middle": (count - rank) // 2}[sig_type]
    idx = slice(start, start + rank)
    return vh[idx].cpu().contiguous(), u[:, idx].cpu().contiguous(), s[idx].cpu().contiguous()


def _per_sample_linear(x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
    """``x`` (N, ..., d_in) through ``weights`` (rows, d_out, d_in), ``rows`` dividing N sample-major.

    Written so that an untrained adapter reproduces the base output bit for bit: one row is a single linear; on
    CPUs one batched matmul rounds like the base layer's matmul; elsewhere each row gets its own linear.
    """
    rows = weights.shape[0]
    if rows == 1:
        return F.linear(x, weights[0], bias)
    parts = x.reshape(rows, -1, x.shape[-1])
    if x.device.type == "cpu":
        out = torch.bmm(parts, weights.transpose(1, 2)) if bias is None else torch.baddbmm(
            bias, parts, weights.transpose(1, 2))
    else:
        out = torch.cat([F.linear(parts[i], weights[i], bias) for i in range(rows)])
    return out.view(*x.shape[:-1], weights.shape[1])


class FoldedTLoRAFunction(torch.autograd.Function):
    """``y_b = x_b (W + P diag(λ⊙m_b) Q − P0 diag(λ0⊙m_b) Q0)^T + bias`` with a hand-written backward.

    Small layers with a frozen base only: the forward folds each mask row's update into a per-sample weight
    without recording a graph; with ``G_b = dy_b^T x_b`` the backward is ``dP = Σ_b G_b Q^T diag(λ⊙m_b)``,
    ``dQ = Σ_b diag(λ⊙m_b) P^T G_b``, ``dλ = Σ_b m_b ⊙ diag(P^T G_b Q^T)``, ``dx_b = dy_b W_b``, evaluated
    through the rank-r projections so ``G_b`` is never formed. ``W``, the bias and the frozen copies get no
    gradient. Only tensors are saved, so it is safe under gradient checkpointing.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, p: Tensor, q: Tensor, lam: Tensor,
                p0: Tensor, q0: Tensor, lam0: Tensor, masks: Tensor) -> Tensor:
        # The two branches are formed the same way, so they cancel exactly at initialisation.
        trained = (p * (lam * masks).unsqueeze(1)) @ q
        frozen = (p0 * (lam0 * masks).unsqueeze(1)) @ q0
        weights = weight + (trained - frozen)  # (rows, d_out, d_in)
        out = _per_sample_linear(x, weights, bias)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(x if any(needs[3:6]) else None, weights if needs[0] else None, p, q, lam, masks)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weights, p, q, lam, masks = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows, d_out = masks.shape[0], p.shape[0]
        dy = grad_out.contiguous().view(rows, -1, d_out)  # the grad of a sum() is an expanded view
        grad_x = grad_p = grad_q = grad_lam = None
        if needs[0]:
            grad_x = torch.bmm(dy, weights.to(dy.dtype)).view(grad_out.shape[:-1] + weights.shape[-1:])
        if any(needs[3:6]):
            # Through the rank-r projections instead of forming G_b, with m_b repeated over sample b's tokens:
            # (Σ_b G_b Q^T diag(m_b))^T = ((Q x^T) ⊙ m) dy and Σ_b diag(m_b) P^T G_b = ((P^T dy^T) ⊙ m) x.
            # Kept transposed (r × tokens): matmuls with a rank-wide output are several times slower on CPUs.
            r, d_in = q.shape
            mt = masks.to(p.dtype).t().unsqueeze(2)  # (r, rows, 1)
            xf = x.reshape(-1, d_in).to(p.dtype)
            dyf = dy.reshape(-1, d_out).to(p.dtype)
            if needs[3] or needs[5]:
                tt = (q @ xf.t()).view(r, rows, -1).mul_(mt).view(r, -1) @ dyf  # (r, d_out)
                grad_p = (tt * lam.unsqueeze(1)).t() if needs[3] else None
                grad_lam = (tt * p.t()).sum(1) if needs[5] else None
            if needs[4]:
                grad_q = ((p.t() @ dyf.t()).view(r, rows, -1).mul_(mt).view(r, -1) @ xf).mul_(lam.unsqueeze(1))
        return grad_x, None, None, grad_p, grad_q, grad_lam, None, None, None, None


class TLoRALinear(nn.Module):
    """A frozen Linear plus the masked orthogonal update; used while training."""

    def __init__(self, base: nn.Linear, q: Tensor, p: Tensor, lam: Tensor, masks: RankMasks) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.q = nn.Parameter(q.to(device, torch.float32, copy=True))
        self.p = nn.Parameter(p.to(device, torch.float32, copy=True))
        self.lam = nn.Parameter(lam.to(device, torch.float32, copy=True))
        self.register_buffer("q0", q.to(device, torch.float32, copy=True))
        self.register_buffer("p0", p.to(device, torch.float32, copy=True))
        self.register_buffer("lam0", lam.to(device, torch.float32, copy=True))
        self.rank = int(q.shape[0])
        self.masks = masks

    def delta(self, x: Tensor, mask: Tensor) -> Tensor:
        """``ΔW(t) x`` for a mask already shaped to ``x``; the two branches cancel exactly at initialisation."""
        dtype = self.base.weight.dtype
        trained = F.linear(F.linear(x, self.q.to(dtype)) * (self.lam.to(dtype) * mask), self.p.to(dtype))
        frozen = F.linear(F.linear(x, self.q0.to(dtype)) * (self.lam0.to(dtype) * mask), self.p0.to(dtype))
        return trained - frozen

    def forward(self, x: Tensor) -> Tensor:
        masks = self.masks.current(self.rank, x)
        weight, bias = self.base.weight, self.base.bias
        if x.ndim >= 2 and x.shape[0] % masks.shape[0] == 0 and not weight.requires_grad and not (
                bias is not None and bias.requires_grad) and (
                x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1] <= _FOLD_LIMIT:
            # Small layer: fold ΔW(t) of each mask row into a per-sample weight (no fused LoRA path of peft
            # covers per-sample masks), with the analytic backward.
            params = (self.p, self.q, self.lam, self.p0, self.q0, self.lam0)
            if weight.dtype != torch.float32:
                params = tuple(t.to(weight.dtype) for t in params)
            return FoldedTLoRAFunction.apply(x, weight, bias, *params, masks)
        return self.base(x) + self.delta(x, broadcast_mask(masks, x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _parse_tensors(tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    layers: dict[str, dict[str, Tensor]] = {}
    problems = []
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            problems.append(f"{key}: not a T-LoRA key (expected unet.<module>.tlora.{{{','.join(PARTS)}}})")
            continue
        layers.setdefault(match["path"], {})[match["part"]] = value
    return layers, problems


def _check_layer(path: str, module: nn.Module | None, parts: dict[str, Tensor], max_rank: int) -> str | None:
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        return f"{path}: no Linear layer of that name in the base UNet"
    missing = [p for p in PARTS if p not in parts]
    if missing:
        return f"{path}: missing tensor(s) {', '.join('tlora.' + p for p in missing)}"
    if not all(t.is_floating_point() for t in parts.values()):
        return f"{path}: tensors must be floating point"
    rank = parts["q"].shape[0] if parts["q"].ndim == 2 else 0
    d_in, d_out = base.in_features, base.out_features
    want = {"q": (rank, d_in), "q0": (rank, d_in), "p": (d_out, rank), "p0": (d_out, rank), "lam": (rank,),
            "lam0": (rank,)}
    wrong = [f"{p} {tuple(parts[p].shape)} (expected {want[p]})" for p in PARTS if tuple(parts[p].shape) != want[p]]
    if wrong:
        return f"{path}: shapes do not fit the base layer: {', '.join(wrong)}"
    if not 1 <= rank <= min(max_rank, d_in, d_out):
        return f"{path}: rank {rank} is outside 1..min(rank {max_rank}, {d_in}, {d_out})"
    if not all(torch.isfinite(t).all() for t in parts.values()):
        return f"{path}: contains NaN or infinite values"
    return None


def _factors(parts: Mapping[str, Tensor]) -> LoRAFactors:
    """The full-rank (all-ones mask) update as ``up @ down`` with rank 2r and scale 1."""
    down = torch.cat([parts["q"], parts["q0"]], dim=0)
    up = torch.cat([parts["p"] * parts["lam"], -(parts["p0"] * parts["lam0"])], dim=1)
    return LoRAFactors(down.contiguous(), up.contiguous(), 1.0)


def _mask_hook(masks: RankMasks, rank: int) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output * broadcast_mask(masks.current(rank, output, doubled=True), output)

    return hook


class TLoRAAttachedAdapter(PeftAttachedAdapter):
    """A T-LoRA file living as peft adapter ``name``, its ``lora_A`` outputs masked by the sampler's timestep."""

    def __init__(self, pipe: Any, name: str, schedule: RankSchedule, ranks: Mapping[str, int]) -> None:
        super().__init__(pipe, name)
        self.schedule = schedule
        unet = pipe.unet
        self._clock = TimestepClock.acquire(unet)
        masks = RankMasks(schedule, self._clock)
        self._handles = []
        self._marked: list[nn.Module] = []
        for path, rank in ranks.items():
            lora_a = unet.get_submodule(path).lora_A[name]
            self._handles.append(lora_a.register_forward_hook(_mask_hook(masks, rank)))
            setattr(lora_a, MASK_MARK, True)
            self._marked.append(lora_a)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._marked:
            module.__dict__.pop(MASK_MARK, None)
        self._handles, self._marked = [], []
        super().remove()
        if self._clock is not None:
            self._clock.release(self.pipe.unet)
            self._clock = None


@METHODS.register("tlora")
class TLoRA(Method):
    """T-LoRA (Ortho-LoRA layers with a timestep rank mask) on the UNet's attention projections."""

    config_cls = TLoRAConfig
    config: TLoRAConfig

    def __init__(self, config: TLoRAConfig) -> None:
        super().__init__(config)
        self.schedule = RankSchedule.from_config(config)
        self.unet: nn.Module | None = None
        self.layers: dict[str, TLoRALinear] = {}
        self.clock: TimestepClock | None = None

    def _targets(self, unet: nn.Module) -> list[tuple[str, nn.Linear]]:
        wanted = list(self.config.target_modules)
        found = [(n, m) for n, m in unet.named_modules() if any(n == t or n.endswith(f".{t}") for t in wanted)]
        unmatched = [t for t in wanted if not any(n == t or n.endswith(f".{t}") for n, _ in found)]
        if unmatched:
            raise ValueError(f"target_modules {', '.join(unmatched)} match no UNet layer; use names such as "
                             "to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.2")
        not_linear = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
        if not_linear:
            raise ValueError(f"T-LoRA adapts plain Linear layers only; target_modules {wanted} also match "
                             f"{', '.join(not_linear[:3])}")
        return found

    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        """Wrap every target Linear; returns Q, P, λ per layer in module order. SVDs run on CUDA when present."""
        if self.unet is not None:
            raise RuntimeError("this T-LoRA is already injected; create a new method object per training run")
        targets = self._targets(unet)
        cfg = self.config
        svd_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.unet = unet
        self.clock = TimestepClock.acquire(unet)
        masks = RankMasks(self.schedule, self.clock)
        try:
            for path, linear in targets:
                rank = min(cfg.rank, linear.in_features, linear.out_features)
                q, p, lam = ortho_init(linear.out_features, linear.in_features, rank, cfg.sig_type,
                                       layer_seed(cfg.seed, path), svd_device)
                layer = TLoRALinear(linear, q, p, lam, masks)
                _set_submodule(unet, path, layer)
                self.layers[path] = layer
        except BaseException:
            self.remove()
            raise
        return [param for layer in self.layers.values() for param in (layer.q, layer.p, layer.lam)]

    def on_timesteps(self, timesteps: Tensor) -> None:
        if self.clock is None:
            raise RuntimeError("inject() has not been called")
        if timesteps.numel() and float(timesteps.max()) > self.schedule.num_train_timesteps:
            raise ValueError(f"timestep {float(timesteps.max())} exceeds num_train_timesteps "
                             f"{self.schedule.num_train_timesteps}; set it to the base model's scheduler value")
        self.clock.set(timesteps)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        if self.unet is None:
            raise RuntimeError("inject() has not been called")
        out = {}
        for path, layer in self.layers.items():
            for part in PARTS:
                out[f"unet.{path}.tlora.{part}"] = getattr(layer, part).detach().to("cpu", copy=True).contiguous()
        return out

    def adapter_metadata(self) -> dict[str, str]:
        return self.schedule.to_metadata()

    def remove(self) -> None:
        unet = self.unet
        if unet is None:
            return
        for path, layer in self.layers.items():
            _set_submodule(unet, path, layer.base)
        self.layers = {}
        if self.clock is not None:
            self.clock.release(unet)
            self.clock = None
        self.unet = None

    @classmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
        if not tensors:
            raise ValueError("the adapter has no tensors")
        layers, problems = _parse_tensors(tensors)
        try:
            schedule = RankSchedule.from_metadata(metadata)
            max_rank = schedule.rank
            expected = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
            if expected is not None and int(expected) != schedule.num_train_timesteps:
                problems.append(f"the adapter's rank schedule uses num_train_timesteps {schedule.num_train_timesteps}"
                                f", the pipeline's scheduler {expected}")
        except ValueError as exc:
            problems.append(str(exc))
            max_rank = 1 << 30
        modules = dict(pipe.unet.named_modules())
        for path, parts in sorted(layers.items()):
            problem = _check_layer(path, modules.get(path), parts, max_rank)
            if problem:
                problems.append(problem)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"adapter does not match the base model: {'; '.join(problems[:5])}{more}")

    @classmethod
    def attach(cls, pipe: Any, tensors: dict[str, Tensor], metadata: Mapping[str, str],
               name: str) -> TLoRAAttachedAdapter:
        """Load as peft adapter ``name`` of rank 2r per layer, plus the hooks that apply the timestep mask."""
        cls.validate_tensors(pipe, tensors, metadata)
        unet = pipe.unet
        if name in (getattr(unet, "peft_config", None) or {}):
            raise ValueError(f"an adapter named {name!r} is already loaded in this pipeline")
        layers, _ = _parse_tensors(tensors)
        state: dict[str, Tensor] = {}
        ranks: dict[str, int] = {}
        for path, parts in sorted(layers.items()):
            factors = _factors(parts)
            state[f"unet.{path}.lora_A.weight"] = factors.down
            state[f"unet.{path}.lora_B.weight"] = factors.up
            ranks[path] = int(parts["q"].shape[0])
        common = Counter(2 * r for r in ranks.values()).most_common(1)[0][0]
        pattern = {f"^{re.escape(path)}": 2 * r for path, r in ranks.items() if 2 * r != common}
        config = {"unet.r": common, "unet.lora_alpha": common, "unet.rank_pattern": pattern,
                  "unet.alpha_pattern": dict(pattern), "unet.target_modules": sorted(ranks),
                  "unet.init_lora_weights": False}
        unet.load_lora_adapter(state, prefix="unet", adapter_name=name, metadata=config, _pipeline=pipe)
        return TLoRAAttachedAdapter(pipe, name, RankSchedule.from_metadata(metadata), ranks)

    @classmethod
    def export_lora(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, LoRAFactors]:
        """Each layer's full-rank update (mask all ones, as at t = 0): rank 2r, scale 1."""
        layers, problems = _parse_tensors(tensors)
        incomplete = sorted(f"{path} lacks {', '.join(p for p in PARTS if p not in parts)}"
                            for path, parts in layers.items() if set(parts) != set(PARTS))
        if problems or incomplete or not layers:
            raise ValueError(f"not a complete T-LoRA file: {'; '.join(problems + incomplete)[:500] or 'no tensors'}")
        return {path: _factors(parts) for path, parts in sorted(layers.items())}
