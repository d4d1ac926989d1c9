"""Orthogonal Adaptation for modular customization (Po et al., CVPR 2024, paper:2312.02432; methods.md section 2).

Concepts are trained apart and merged later by summing their updates. Each adapted layer W (d_out×d_in) gets a
LoRA update ΔW = s·B·A whose input side A (peft ``lora_A``, r×d_in) is FROZEN to r orthonormal rows of an
orthogonal basis O ∈ R^{d_in×d_in} shared by every concept, and whose output side B (``lora_B``, d_out×r) is the
only trained tensor, starting at zero. Slot k owns the rows [k·r, (k+1)·r) of O, so two concepts in different
slots have orthogonal input subspaces: ΔW_i·ΔW_jᵀ = s²·B_i·A_i·A_jᵀ·B_jᵀ = 0. A feature in concept i's subspace
gets no response from concept j's update, which is why the plain sum W + ΣΔW_i keeps each concept intact.

The basis of a layer depends only on (``basis_seed``, the layer's module path, d_in): a standard Gaussian matrix
drawn from a SHAKE-256 stream keyed by both, then QR-decomposed with R's diagonal made positive (which makes the
factor unique). The stream is hashlib's, so the basis is the same on every machine and torch version. A slot
holds ``floor(min d_in / r)`` concepts per (seed, rank): every concept that is to merge with others must use the
same rank and seed. The catalog hands out free slots (``services.orthogonal_slots``); ``basis_slot = -1`` means
"let the catalog choose", and a method built directly with -1 (library use, no catalog) trains slot 0.

Saved files are standard peft LoRA files (``lora_A`` included, so they load with diffusers' ``load_lora_weights``)
plus the header entries ``lorastudio.ortho.slot``, ``lorastudio.ortho.basis_seed`` and ``lorastudio.ortho.rank``.
Deviations from the reference: UNet attention only (no text-encoder LoRA, no learned token embeddings), and the
basis is regenerated from the seed instead of being shipped as a file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.base import METHODS, MethodConfig
from training.methods.lora import TRAIN_ADAPTER, LoRA, _lora_layers, _parse_tensors

AUTO_SLOT = -1
DEFAULT_BASIS_SEED = 231202432  # the paper's arXiv number; changing it makes new adapters non-orthogonal to old ones
META_SLOT = "lorastudio.ortho.slot"
META_SEED = "lorastudio.ortho.basis_seed"
META_RANK = "lorastudio.ortho.rank"
_ORTHONORMAL_TOL = 1e-3  # |A·Aᵀ - I| allowed in a file (fp16 copies stay well inside it)


@dataclass
class OrthogonalConfig(MethodConfig):
    rank: int = field(default=4, metadata={
        "help": "Rows of the frozen basis slice per layer (adapter rank). Concepts that should merge must share "
                "rank and basis seed; a smaller rank leaves room for more concepts", "min": 1, "max": 1024})
    basis_slot: int = field(default=AUTO_SLOT, metadata={
        "help": "Which slice of the shared orthogonal basis this concept owns: -1 = a free one picked by the "
                "catalog; a fixed number only to reproduce a run (two concepts in one slot interfere)",
        "min": AUTO_SLOT, "max": 1 << 20})
    basis_seed: int = field(default=DEFAULT_BASIS_SEED, metadata={
        "help": "Seed of the shared orthogonal basis. Only concepts with the same seed (and rank) are orthogonal "
                "to each other", "min": 0, "max": 2**63 - 1, "advanced": True})

    @property
    def slot(self) -> int:
        """The slot actually trained: ``basis_slot``, or 0 when it is left on auto."""
        return max(self.basis_slot, 0)

    @property
    def init(self) -> str:
        """``LoRA.inject``'s init switch: peft's default, a placeholder (A is overwritten, B zeroed)."""
        return "default"


# the shared basis --------------------------------------------------------------------------------------------


def _gaussian_columns(basis_seed: int, path: str, d_in: int, columns: int) -> np.ndarray:
    """The first ``columns`` columns of layer ``path``'s d_in×d_in standard Gaussian matrix G.

    G is filled column by column from a SHAKE-256 stream keyed by (seed, path): consecutive 64-bit words become
    53-bit uniforms in (0, 1), each pair of uniforms two Gaussians (Box-Muller). The stream is an extendable
    output, so the first columns are a prefix of it and cost only what they hold.
    """
    n = d_in * columns
    pairs = (n + 1) // 2
    key = f"lorastudio.orthogonal-basis/{int(basis_seed)}/{path}".encode()
    words = np.frombuffer(hashlib.shake_256(key).digest(16 * pairs), dtype="<u8").reshape(pairs, 2)
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[:, 0]))
    angle = 2.0 * np.pi * uniform[:, 1]
    normal = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:n]
    return normal.reshape(columns, d_in).T


def orthogonal_basis(basis_seed: int, path: str, d_in: int, rows: int | None = None) -> torch.Tensor:
    """The first ``rows`` rows (default all) of layer ``path``'s shared orthogonal basis O, float64, rows × d_in.

    O = Qᵀ for the QR decomposition G = Q·R of the Gaussian G (``_gaussian_columns``) with diag(R) > 0. The first
    m columns of Q depend only on the first m columns of G, so only those are drawn and factorised.
    """
    rows = d_in if rows is None else int(rows)
    if not 0 < rows <= d_in:
        raise ValueError(f"{path}: cannot take {rows} basis rows of a layer with input size {d_in}")
    gauss = torch.from_numpy(np.ascontiguousarray(_gaussian_columns(basis_seed, path, d_in, rows)))
    q, r = torch.linalg.qr(gauss)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T.contiguous()


def slot_rows(basis_seed: int, path: str, d_in: int, rank: int, slot: int) -> torch.Tensor:
    """Rows [slot·rank, (slot+1)·rank) of the basis: the frozen ``lora_A`` of that slot, float64."""
    return orthogonal_basis(basis_seed, path, d_in, (slot + 1) * rank)[slot * rank:]


# slots -------------------------------------------------------------------------------------------------------


def _input_size(module: nn.Module) -> int | None:
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return int(base.in_features)
    if isinstance(base, nn.Conv2d):
        return int(base.in_channels * base.kernel_size[0] * base.kernel_size[1])
    return None


def adapted_input_sizes(unet: nn.Module, target_modules: list[str]) -> dict[str, int]:
    """Input size d_in (Linear: in_features; Conv2d: in_channels·kh·kw) of every layer ``target_modules`` select,
    by module path. ``ValueError`` when a target matches nothing or a matched layer is neither Linear nor Conv2d."""
    targets = [t.strip() for t in target_modules]
    sizes: dict[str, int] = {}
    matched: set[str] = set()
    for name, module in unet.named_modules():
        hits = [t for t in targets if name == t or name.endswith(f".{t}")]
        if not hits:
            continue
        matched.update(hits)
        size = _input_size(module)
        if size is None:
            raise ValueError(f"target_modules: {name} is a {type(module).__name__}; orthogonal adaptation needs "
                             "Linear or Conv2d layers")
        sizes[name] = size
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise ValueError(f"target_modules {', '.join(unmatched)} match no UNet layer; use names such as to_q, to_k, "
                         "to_v, to_out.0, proj_in, proj_out, ff.net.2")
    return sizes


def slot_count(input_sizes: Mapping[str, int], rank: int) -> int:
    """How many disjoint rank-``rank`` slices every adapted layer has room for: floor(min d_in / rank)."""
    return min(input_sizes.values()) // rank if input_sizes else 0


def check_slot(input_sizes: Mapping[str, int], rank: int, slot: int) -> int:
    """``ValueError`` unless ``slot`` fits; returns the number of slots."""
    slots = slot_count(input_sizes, rank)
    smallest = min(input_sizes.values()) if input_sizes else 0
    if slots == 0:
        raise ValueError(f"rank {rank} is larger than the smallest adapted layer's input size {smallest}: no basis "
                         "slot fits; use a smaller rank")
    if not 0 <= slot < slots:
        raise ValueError(f"basis_slot {slot} is out of range: rank {rank} on this UNet allows slots 0 to {slots - 1} "
                         f"({slots} slots, smallest adapted input size {smallest})")
    return slots


def unet_skeleton(unet_folder: str | Path) -> nn.Module:
    """The UNet described by a diffusers ``unet/config.json`` folder, built on the meta device (no weights read, no
    memory used): enough to count slots before any model is loaded."""
    import diffusers

    config_file = Path(unet_folder) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_file}: not a readable UNet config ({exc})") from exc
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{config_file}: names no diffusers model class ({config.get('_class_name')!r})")
    with torch.device("meta"):
        return cls.from_config(config)


def basis_header(metadata: Mapping[str, str]) -> tuple[int, int, int]:
    """(slot, basis_seed, rank) from a file header; ``ValueError`` naming the missing or bad entry."""
    values = []
    for key, lowest in ((META_SLOT, 0), (META_SEED, 0), (META_RANK, 1)):
        raw = metadata.get(key)
        if raw is None:
            raise ValueError(f"orthogonal adapter header lacks {key!r}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"orthogonal adapter header {key!r} must be an integer, got {raw!r}") from None
        if value < lowest:
            raise ValueError(f"orthogonal adapter header {key!r} must be >= {lowest}, got {value}")
        values.append(value)
    return values[0], values[1], values[2]


# the method --------------------------------------------------------------------------------------------------


@METHODS.register("orthogonal")
class OrthogonalAdaptation(LoRA):
    """Orthogonal adaptation: LoRA on a frozen slice of a shared orthogonal basis, so concepts merge by summing."""

    config_cls = OrthogonalConfig
    config: OrthogonalConfig

    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        """Add the LoRA layers, set each ``lora_A`` to the slot's basis rows (frozen) and ``lora_B`` to zero;
        returns the ``lora_B`` weights only."""
        cfg = self.config
        check_slot(adapted_input_sizes(unet, list(cfg.target_modules)), cfg.rank, cfg.slot)
        super().inject(unet)
        with torch.no_grad():
            for path, layer in _lora_layers(unet, TRAIN_ADAPTER).items():
                down = layer.lora_A[TRAIN_ADAPTER].weight
                if down.dtype != torch.float32:  # keep the saved basis exact whatever the UNet's dtype
                    down.data = down.data.float()
                rows = slot_rows(cfg.basis_seed, path, down[0].numel(), cfg.rank, cfg.slot)
                down.copy_(rows.reshape(down.shape).to(down.dtype))
                down.requires_grad_(False)
                layer.lora_B[TRAIN_ADAPTER].weight.zero_()
        return [p for n, p in unet.named_parameters() if f".lora_B.{TRAIN_ADAPTER}." in f".{n}"]

    def adapter_metadata(self) -> dict[str, str]:
        cfg = self.config
        return {**super().adapter_metadata(), META_SLOT: str(cfg.slot), META_SEED: str(cfg.basis_seed),
                META_RANK: str(cfg.rank)}

    @classmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """LoRA's checks, plus: the basis header is present and fits the tensors, and every ``lora_A`` has
        orthonormal rows (a basis slice)."""
        super().validate_tensors(pipe, tensors, metadata)
        slot, _, rank = basis_header(metadata)
        pairs, _ = _parse_tensors(tensors)
        problems = []
        for path, pair in sorted(pairs.items()):
            down = pair["A"].detach().to("cpu", torch.float64).reshape(pair["A"].shape[0], -1)
            if down.shape[0] != rank:
                problems.append(f"{path}: lora_A has rank {down.shape[0]}, the header says {rank}")
                continue
            if (slot + 1) * rank > down.shape[1]:
                problems.append(f"{path}: slot {slot} at rank {rank} does not fit input size {down.shape[1]}")
                continue
            error = (down @ down.T - torch.eye(rank, dtype=down.dtype)).abs().max().item()
            if error > _ORTHONORMAL_TOL:
                problems.append(f"{path}: lora_A rows are not orthonormal (|A·Aᵀ - I| = {error:.2g})")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"not a valid orthogonal adapter: {'; '.join(problems[:5])}{more}")
