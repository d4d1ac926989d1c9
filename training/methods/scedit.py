"""SCEdit: Skip Connection Editing (Jiang et al., CVPR 2024, https://arxiv.org/abs/2312.11392).

Spec: ``../shared/reference/methods.md`` §3. The UNet stays frozen; every skip connection gets an SC-Tuner, a
per-pixel residual MLP over channels applied to the skip feature before the decoder concatenates it:

    SC(x) = x + W2·GELU(W1·x + b1) + b2,   W1 ∈ R^{C'×C}, W2 ∈ R^{C×C'}, C' = max(1, round(C·down_ratio)).

W1 is Kaiming-uniform (a=√5) and b1 keeps ``nn.Linear``'s default init; W2 and b2 start at zero, so a fresh tuner is
the identity. In diffusers the skip is the LAST ``C`` channels of the input of decoder resnet
``up_blocks.i.resnets.j`` (input = ``cat([h, skip])``); a forward pre-hook replaces them by
``skip + γ·(SC(skip) − skip)`` with strength γ (1 = as trained, 0 = off). All trainable parameters sit on the
decoder side, so the encoder (conv_in, time embedding, down blocks, mid block) never enters the autograd graph:
no encoder activations are kept and the backward pass stops at the skips.

Inference: a per-UNet ``SkipTunerHost`` (one pre-hook per decoder resnet) holds any number of named SCEdit adapters
and adds the sum of the active ones, ``skip + Σ_a γ_a·(SC_a(skip) − skip)``; ``SkipTunerHost.route`` gives each
contiguous chunk of a batch its own weights (per-sample scale tensors), as ``composition.base.RoutableAdapterSet``
describes. Removing the last adapter removes the hooks, leaving the base UNet.

Saved file (our own documented format; diffusers and scepter cannot load it):

* tensors ``unet.up_blocks.{i}.resnets.{j}.sc.w1`` (C'×C), ``.b1`` (C'), ``.w2`` (C×C'), ``.b2`` (C), one complete
  set for every decoder resnet of the base UNet;
* header ``lorastudio.scedit.down_ratio`` (the float, as text) and ``lorastudio.scedit.dims`` (JSON list of the
  skip channel counts C, in ``up_blocks.i.resnets.j`` order).

Deviation from the reference: tuners are placed per decoder resnet of any diffusers ``UNet2DConditionModel``
(12 on SD-1.5/2.x, 9 on SDXL, as in the reference's ms-swift "decoder" mode); the ControlNet-like CSC-Tuner is not
implemented.
"""

from __future__ import annotations

import functools
import json
import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.base import METHODS, Method, MethodConfig

TRAIN_ADAPTER = "lorastudio_train"
DOWN_RATIO_KEY = "lorastudio.scedit.down_ratio"
DIMS_KEY = "lorastudio.scedit.dims"
TUNERS_ATTR = "sc_tuners"  # the ModuleDict each decoder resnet holds its tuners in (so .to() moves them)
PARTS = ("w1", "b1", "w2", "b2")
TARGET = "up_blocks.*.resnets.*"
_RESNET = re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)")
_KEY = re.compile(r"unet\.(?P<path>up_blocks\.\d+\.resnets\.\d+)\.sc\.(?P<part>w1|b1|w2|b2)")


@dataclass
class SCEditConfig(MethodConfig):
    rank: int | None = field(default=None, metadata={
        "help": "Not used by SCEdit (the tuner width is set by down_ratio); leave empty", "min": 1, "max": 1024,
        "advanced": True})
    alpha: float | None = field(default=None, metadata={
        "help": "Not used by SCEdit (the tuner strength is its weight at generation time); leave empty",
        "min": 1e-6, "advanced": True})
    target_modules: list[str] = field(default_factory=lambda: [TARGET], metadata={
        "help": "Fixed for SCEdit: one tuner on the skip input of every decoder resnet (up_blocks.i.resnets.j)",
        "advanced": True})
    down_ratio: float = field(default=1.0, metadata={
        "help": "Hidden width of each skip tuner relative to its channel count C. Each tuner has about "
                "2·C²·down_ratio parameters: 1.0 (the reference) gives 19.7 M on SD-1.5, 0.25 a quarter of that",
        "min": 1e-3, "max": 4.0})

    def validate(self) -> None:
        super().validate()
        if self.rank is not None:
            raise ValueError(f"rank does not apply to SCEdit (got {self.rank}); set down_ratio to size the tuners")
        if self.alpha is not None:
            raise ValueError(f"alpha does not apply to SCEdit (got {self.alpha}); leave it empty")
        if list(self.target_modules) != [TARGET]:
            raise ValueError(f"target_modules cannot be changed for SCEdit (got {self.target_modules!r}); its tuners "
                             f"always sit on the decoder skip connections {TARGET}")


def hidden_width(channels: int, down_ratio: float) -> int:
    """C' = max(1, round(C·down_ratio)): the hidden width of one tuner."""
    return max(1, round(channels * down_ratio))


def tuner_parameter_count(dims: Iterable[int], down_ratio: float) -> int:
    """Parameters of a full tuner set: per tuner W1, b1, W2, b2 = 2·C·C' + C' + C."""
    return sum(2 * c * hidden_width(c, down_ratio) + hidden_width(c, down_ratio) + c for c in dims)


def trainable_parameter_count(params: Iterable[nn.Parameter]) -> int:
    """Number of scalars in ``params`` (what ``Method.inject`` returned)."""
    return sum(p.numel() for p in params)


def _out_channels(block: nn.Module | None) -> int | None:
    resnets = getattr(block, "resnets", None)
    return int(resnets[-1].out_channels) if resnets else None


def _in_channels(resnet: nn.Module) -> int:
    if hasattr(resnet, "in_channels"):
        return int(resnet.in_channels)
    return int(resnet.conv1.in_channels)


def skip_channels(unet: nn.Module) -> dict[str, int]:
    """Skip channel count C of every decoder resnet ``up_blocks.i.resnets.j``, in decoder (skip pop) order.

    The resnet input is ``cat([h, skip])``: ``h`` has the mid block's (or, without one, the last encoder block's)
    out channels for the first resnet of up block 0, the previous up block's out channels for the first resnet
    of a later block (upsamplers keep channels), else the previous resnet's out channels.
    """
    up_blocks = getattr(unet, "up_blocks", None)
    if not up_blocks:
        raise ValueError(f"{type(unet).__name__} has no up_blocks; SCEdit needs a diffusers UNet2DConditionModel")
    h = _out_channels(getattr(unet, "mid_block", None))
    if h is None:
        h = int(unet.config.block_out_channels[-1])
    dims: dict[str, int] = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            path = f"up_blocks.{i}.resnets.{j}"
            c = _in_channels(resnet) - h
            if c <= 0:
                raise ValueError(f"{path}: input has {_in_channels(resnet)} channels, no room for a skip after "
                                 f"{h} decoder channels; this UNet layout is not supported")
            dims[path] = c
            h = int(resnet.out_channels)
    if not dims:
        raise ValueError("the UNet's up blocks have no resnets; nothing for SCEdit to tune")
    return dims


class SCTuner(nn.Module):
    """One skip connection's tuner; ``delta(x) = SC(x) − x = W2·GELU(W1·x + b1) + b2`` per pixel."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, channels))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.zeros(channels, hidden))
        self.b2 = nn.Parameter(torch.zeros(channels))

    @classmethod
    def fresh(cls, channels: int, hidden: int) -> SCTuner:
        """The reference init: W1 Kaiming-uniform(a=√5), b1 ``nn.Linear``'s default, W2 = b2 = 0 (identity)."""
        tuner = cls(channels, hidden)
        nn.init.kaiming_uniform_(tuner.w1, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(channels)
        nn.init.uniform_(tuner.b1, -bound, bound)
        return tuner

    @classmethod
    def from_tensors(cls, parts: Mapping[str, torch.Tensor]) -> SCTuner:
        hidden, channels = parts["w1"].shape
        tuner = cls(channels, hidden)
        with torch.no_grad():
            for name in PARTS:
                getattr(tuner, name).copy_(parts[name])
        return tuner.requires_grad_(False)

    @property
    def channels(self) -> int:
        return int(self.w1.shape[1])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ(x)`` for ``x`` of shape (B, C, H, W), computed in ``x``'s dtype (fp32 master weights are cast)."""
        w1, b1, w2, b2 = (p if p.dtype == x.dtype else p.to(x.dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        hidden = F.gelu(F.conv2d(x, w1[:, :, None, None], b1))
        return F.conv2d(hidden, w2[:, :, None, None], b2)


@dataclass(eq=False)
class _Adapter:
    slot: str
    tuners: dict[str, SCTuner]
    scale: float = 1.0


class SkipTunerHost:
    """All SCEdit adapters of one UNet: one pre-hook per decoder resnet adds ``Σ_a γ_a·Δ_a(skip)``.

    Get it with ``skip_tuner_host(unet)``. Tuners are registered as submodules (``<resnet>.sc_tuners``) so they
    follow the UNet's device and dtype; the last ``remove`` deletes them and the hooks.
    """

    def __init__(self, unet: nn.Module) -> None:
        self._unet = weakref.ref(unet)
        self.dims = skip_channels(unet)
        self._adapters: dict[str, _Adapter] = {}
        self._hooks: list[Any] = []
        self._slots = 0
        self._groups: list[dict[str, float]] | None = None
        self._scales: dict[tuple, torch.Tensor] = {}

    @property
    def unet(self) -> nn.Module:
        unet = self._unet()
        if unet is None:
            raise RuntimeError("the UNet of this skip tuner host no longer exists")
        return unet

    # ------------------------------------------------------------------------------------------- adapters --

    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def add(self, name: str, tuners: Mapping[str, SCTuner], scale: float = 1.0) -> None:
        """Add adapter ``name`` with one tuner per decoder resnet (channels must match ``dims``)."""
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded in this pipeline")
        if set(tuners) != set(self.dims):
            raise ValueError(f"adapter {name!r} must have a tuner for exactly these resnets: {', '.join(self.dims)}")
        for path, tuner in tuners.items():
            if tuner.channels != self.dims[path]:
                raise ValueError(f"{path}: tuner has {tuner.channels} channels, the skip has {self.dims[path]}")
        unet = self.unet
        slot = f"a{self._slots}"
        self._slots += 1
        for path in self.dims:
            resnet = unet.get_submodule(path)
            if not hasattr(resnet, TUNERS_ATTR):
                resnet.add_module(TUNERS_ATTR, nn.ModuleDict())
            getattr(resnet, TUNERS_ATTR)[slot] = tuners[path]
        self._adapters[name] = _Adapter(slot, {p: tuners[p] for p in self.dims}, float(scale))
        if not self._hooks:
            self._hooks = [unet.get_submodule(path).register_forward_pre_hook(
                functools.partial(self._pre_hook, path), with_kwargs=True) for path in self.dims]

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (no-op if absent); the last one takes the hooks and tuner containers with it."""
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            return
        unet = self._unet()
        if unet is None:
            return
        for path in self.dims:
            resnet = unet.get_submodule(path)
            container = getattr(resnet, TUNERS_ATTR, None)
            if container is not None and adapter.slot in container:
                del container[adapter.slot]
            if not self._adapters and container is not None:
                delattr(resnet, TUNERS_ATTR)
        if not self._adapters:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            _HOSTS.pop(unet, None)

    def tuners(self, name: str) -> dict[str, SCTuner]:
        return dict(self._get(name).tuners)

    def set_scale(self, name: str, scale: float) -> None:
        self._get(name).scale = float(scale)

    def scale(self, name: str) -> float:
        return self._get(name).scale

    def _get(self, name: str) -> _Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise KeyError(f"no SCEdit adapter named {name!r} in this UNet") from None

    # -------------------------------------------------------------------------------------------- routing --

    def can_route(self, names: Iterable[str]) -> bool:
        """Every adapter of this host can be routed; other names cannot."""
        return set(names) <= set(self._adapters)

    @contextmanager
    def route(self, groups: Sequence[Mapping[str, float]]) -> Iterator[None]:
        """Within the block, chunk ``i`` of each batch uses exactly ``groups[i]`` (``{}`` = no tuner)."""
        if not groups:
            raise ValueError("routing needs at least one group")
        unknown = sorted({n for g in groups for n in g} - set(self._adapters))
        if unknown:
            raise ValueError(f"cannot route these adapters: {', '.join(unknown)} are not SCEdit adapters of this UNet")
        previous = (self._groups, self._scales)
        self._groups = [{n: float(w) for n, w in g.items() if w != 0.0} for g in groups]
        self._scales = {}
        try:
            yield
        finally:
            self._groups, self._scales = previous

    def _routed_scale(self, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of adapter ``name``, shape (B, 1, 1, 1), cached for the routing block."""
        key = (name, batch, like.device, like.dtype)
        scale = self._scales.get(key)
        if scale is None:
            groups = self._groups or []
            per_group = torch.tensor([g.get(name, 0.0) for g in groups], dtype=torch.float32)
            scale = per_group.repeat_interleave(batch // len(groups)).view(-1, 1, 1, 1).to(like.device, like.dtype)
            self._scales[key] = scale
        return scale

    def _active(self, path: str, batch: int, like: torch.Tensor) -> list[tuple[SCTuner, float | torch.Tensor]]:
        groups = self._groups
        if groups is None:
            return [(a.tuners[path], a.scale) for a in self._adapters.values() if a.scale != 0.0]
        if batch % len(groups):
            raise ValueError(f"batch of {batch} does not split into {len(groups)} routing groups")
        names = dict.fromkeys(n for g in groups for n in g)
        return [(self._adapters[n].tuners[path], self._routed_scale(n, batch, like)) for n in names]

    # ----------------------------------------------------------------------------------------------- hook --

    def _pre_hook(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = bool(args)
        x = args[0] if positional else kwargs.get("input_tensor")
        if x is None:
            return None
        entries = self._active(path, x.shape[0], x)
        if not entries:
            return None
        c = self.dims[path]
        skip = x[:, -c:].contiguous()  # saved for backward on its own, so the whole input need not be kept
        total: torch.Tensor | None = None
        for tuner, scale in entries:
            delta = tuner.delta(skip)
            if not (isinstance(scale, float) and scale == 1.0):
                delta = delta * scale
            total = delta if total is None else total + delta
        out = torch.cat([x[:, :-c], (skip + total).to(x.dtype)], dim=1)
        if positional:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "input_tensor": out}


_HOSTS: weakref.WeakKeyDictionary[nn.Module, SkipTunerHost] = weakref.WeakKeyDictionary()


def skip_tuner_host(unet: nn.Module, create: bool = True) -> SkipTunerHost | None:
    """The skip tuner host of ``unet`` (created on first use unless ``create`` is false)."""
    host = _HOSTS.get(unet)
    if host is None and create:
        host = _HOSTS[unet] = SkipTunerHost(unet)
    return host


class SCEditAttachedAdapter:
    """A loaded SCEdit adapter inside its UNet's ``SkipTunerHost``."""

    def __init__(self, host: SkipTunerHost, name: str) -> None:
        self.host = host
        self.name = name

    def set_scale(self, scale: float) -> None:
        """Strength γ of this adapter's skip edits (1.0 = as trained, 0.0 = off)."""
        self.host.set_scale(self.name, scale)

    @property
    def scale(self) -> float:
        return self.host.scale(self.name)

    def remove(self) -> None:
        self.host.remove(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ------------------------------------------------------------------------------------------ file checks --

def _parse_header(metadata: Mapping[str, str]) -> tuple[float, list[int]]:
    try:
        down_ratio = float(metadata[DOWN_RATIO_KEY])
        dims = json.loads(metadata[DIMS_KEY])
    except KeyError as exc:
        raise ValueError(f"not an SCEdit file: the header has no {exc.args[0]!r} entry") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable SCEdit header ({exc})") from None
    if not (isinstance(dims, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in dims)):
        raise ValueError(f"{DIMS_KEY} must be a JSON list of integers, got {metadata[DIMS_KEY]!r}")
    if not (math.isfinite(down_ratio) and down_ratio > 0):
        raise ValueError(f"{DOWN_RATIO_KEY} must be a positive number, got {metadata[DOWN_RATIO_KEY]!r}")
    return down_ratio, dims


def _group(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            problems.append(f"{key}: not an SCEdit key (expected unet.up_blocks.<i>.resnets.<j>.sc.w1/b1/w2/b2)")
        else:
            groups.setdefault(match["path"], {})[match["part"]] = value
    return groups, problems


def _check_tuner(path: str, channels: int, hidden: int, parts: Mapping[str, torch.Tensor]) -> str | None:
    missing = [p for p in PARTS if p not in parts]
    if missing:
        return f"{path}: missing sc.{', sc.'.join(missing)}"
    want = {"w1": (hidden, channels), "b1": (hidden,), "w2": (channels, hidden), "b2": (channels,)}
    got = {p: tuple(parts[p].shape) for p in PARTS}
    if got != want:
        return f"{path}: shapes {got} do not fit a skip of {channels} channels with hidden width {hidden} " \
               f"(expected {want})"
    if not all(parts[p].is_floating_point() for p in PARTS):
        return f"{path}: tensors must be floating point"
    if not all(torch.isfinite(parts[p]).all() for p in PARTS):
        return f"{path}: contains NaN or infinite values"
    return None


@METHODS.register("scedit")
class SCEdit(Method):
    """SCEdit: tuners on the UNet's skip connections; the backward pass skips the encoder (less memory)."""

    config_cls = SCEditConfig
    config: SCEditConfig
    uses_rank = False

    def __init__(self, config: SCEditConfig) -> None:
        super().__init__(config)
        self.host: SkipTunerHost | None = None

    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        if self.host is not None:
            raise RuntimeError("this SCEdit is already injected; create a new method object per training run")
        host = skip_tuner_host(unet)
        assert host is not None
        reference = next(unet.parameters())
        tuners = {path: SCTuner.fresh(c, hidden_width(c, self.config.down_ratio)).to(reference.device)
                  for path, c in host.dims.items()}
        host.add(TRAIN_ADAPTER, tuners)
        self.host = host
        return [getattr(tuners[path], part) for path in host.dims for part in PARTS]

    def _require_host(self) -> SkipTunerHost:
        if self.host is None:
            raise RuntimeError("inject() has not been called")
        return self.host

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        tuners = self._require_host().tuners(TRAIN_ADAPTER)
        return {f"unet.{path}.sc.{part}": getattr(tuner, part).detach().to("cpu", torch.float32, copy=True)
                .contiguous() for path, tuner in tuners.items() for part in PARTS}

    def adapter_metadata(self) -> dict[str, str]:
        dims = list(self._require_host().dims.values())
        return {DOWN_RATIO_KEY: repr(float(self.config.down_ratio)), DIMS_KEY: json.dumps(dims)}

    def remove(self) -> None:
        if self.host is not None:
            self.host.remove(TRAIN_ADAPTER)
            self.host = None

    @classmethod
    def validate_tensors(cls, pipe: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        if not tensors:
            raise ValueError("the adapter has no tensors")
        down_ratio, header_dims = _parse_header(metadata)
        dims = skip_channels(pipe.unet)
        problems = []
        if header_dims != list(dims.values()):
            problems.append(f"{DIMS_KEY} {header_dims} differs from this UNet's skip channels {list(dims.values())}")
        groups, foreign = _group(tensors)
        problems += foreign
        problems += [f"{path}: no decoder resnet of that name in the base UNet"
                     for path in sorted(set(groups) - set(dims))]
        for path, channels in dims.items():
            if path not in groups:
                problems.append(f"{path}: no tuner for this skip connection in the file")
                continue
            problem = _check_tuner(path, channels, hidden_width(channels, down_ratio), groups[path])
            if problem:
                problems.append(problem)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"adapter does not match the base model: {'; '.join(problems[:5])}{more}")

    @classmethod
    def attach(cls, pipe: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
               name: str) -> SCEditAttachedAdapter:
        """Add the tuners to the UNet's ``SkipTunerHost`` as adapter ``name`` at scale 1."""
        cls.validate_tensors(pipe, tensors, metadata)
        unet = pipe.unet
        host = skip_tuner_host(unet, create=False)
        if (host is not None and name in host) or name in (getattr(unet, "peft_config", None) or {}):
            raise ValueError(f"an adapter named {name!r} is already loaded in this pipeline")
        groups, _ = _group(tensors)
        reference = next(unet.parameters())
        tuners = {path: SCTuner.from_tensors(groups[path]).to(reference.device, reference.dtype)
                  for path in skip_channels(unet)}
        host = skip_tuner_host(unet)
        assert host is not None
        host.add(name, tuners)
        return SCEditAttachedAdapter(host, name)
