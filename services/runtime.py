"""The loaded models: one base pipeline kept warm for generation, with adapters resident and unfused.

Only the worker thread calls into this object, so the pipeline is never used from two threads at once; the
lock makes that a guarantee rather than a convention.
"""

from __future__ import annotations

import gc
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from composition.routing import router_for
from core.devices import DevicePlacement
from core.io import load_safetensors
from core.pipelines import BaseModelSource, base_model_hash, load_pipeline, resolve_base
from training.artifact import load_adapter
from training.base import AttachedAdapter

MAX_RESIDENT_ADAPTERS = 16
# pipelines whose call makes clips (``num_frames``): AnimateDiff and ModelScope/ZeroScope text-to-video
VIDEO_PIPELINES = frozenset({"AnimateDiffPipeline", "TextToVideoSDPipeline"})


class ResidentAdapterSet:
    """``composition.base.RoutableAdapterSet`` over the adapters resident in a diffusers pipeline.

    Two kinds live side by side: peft LoRA adapters (a ``peft_config`` entry in ``pipe.unet`` under their name),
    switched with ``pipe.set_adapters``, and hook adapters such as SCEdit's skip tuners, switched through the
    ``set_scale`` of their ``AttachedAdapter`` (given in ``attached``, which should hold every resident adapter
    so that resident ones outside ``names`` can be turned off). A hook adapter can be routed per sample when its
    attached object has a ``host`` with ``can_route(names)`` and ``route(groups)`` (``SkipTunerHost``).
    """

    def __init__(self, pipe, names: list[str], attached: Mapping[str, AttachedAdapter] | None = None) -> None:
        self._pipe = pipe
        self._names = list(names)
        self._attached = dict(attached or {})
        self._applied: dict[str, float] | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def _peft_names(self) -> set[str]:
        return set(getattr(self._pipe.unet, "peft_config", None) or {})

    def _hook_adapters(self) -> dict[str, AttachedAdapter]:
        """Resident adapters that are not peft adapters: they act through their own hooks."""
        peft = self._peft_names()
        return {n: a for n, a in self._attached.items() if n not in peft}

    def _hosts(self, hooks: Mapping[str, AttachedAdapter]) -> list[tuple[_RoutingHost, set[str]]] | None:
        """The routing hosts of ``hooks`` with their adapters' names; ``None`` when one has no routing host."""
        hosts: dict[int, tuple[_RoutingHost, set[str]]] = {}
        for name, adapter in hooks.items():
            host = getattr(adapter, "host", None)
            if not isinstance(host, _RoutingHost):
                return None
            hosts.setdefault(id(host), (host, set()))[1].add(name)
        return list(hosts.values())

    def can_route(self, names: Iterable[str]) -> bool:
        """Whether per-sample routing can serve these adapters (peft part by ``composition.routing``)."""
        names = set(names)
        hooks = self._hook_adapters()
        if not hooks:
            return router_for(self._pipe.unet).can_route(names)
        hosts = self._hosts(hooks)
        if hosts is None or not router_for(self._pipe.unet).can_route(names - set(hooks)):
            return False
        return all(host.can_route(names & members) for host, members in hosts)

    def route(self, groups: Sequence[Mapping[str, float]]) -> AbstractContextManager[None]:
        """One batched UNet call, chunk ``i`` with mix ``groups[i]``; adapters' own state is left as is."""
        unknown = sorted({n for g in groups for n in g} - set(self._names))
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        hooks = self._hook_adapters()
        router = router_for(self._pipe.unet)
        if not hooks:
            return router.route(groups)
        hosts = self._hosts(hooks)
        if hosts is None:
            raise ValueError("cannot route these adapters: a resident hook adapter has no per-sample routing")
        peft_groups = [{n: w for n, w in g.items() if n not in hooks} for g in groups]
        contexts = [router.route(peft_groups)]
        contexts += [host.route([{n: w for n, w in g.items() if n in members} for g in groups])
                     for host, members in hosts]
        return _entered_together(contexts)

    def apply(self, weights: dict[str, float]) -> None:
        active = {n: float(w) for n, w in weights.items() if w != 0.0}
        if active == self._applied:
            return
        unknown = sorted(set(active) - set(self._names))
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        hooks = self._hook_adapters()
        peft_active = {n: w for n, w in active.items() if n not in hooks}
        if peft_active:
            self._pipe.enable_lora()
            self._pipe.set_adapters(list(peft_active), list(peft_active.values()))
        elif self._peft_names():
            self._pipe.disable_lora()
        for name, adapter in hooks.items():
            adapter.set_scale(active.get(name, 0.0))
        self._applied = active


PeftAdapterSet = ResidentAdapterSet  # the name the benchmarks use for sets of plain peft LoRAs


@runtime_checkable
class _RoutingHost(Protocol):
    """What a hook adapter's ``host`` offers for per-sample routing (``training.methods.scedit.SkipTunerHost``)."""

    def can_route(self, names: Iterable[str]) -> bool: ...

    def route(self, groups: Sequence[Mapping[str, float]]) -> AbstractContextManager[None]: ...


@contextmanager
def _entered_together(contexts: Sequence[AbstractContextManager[None]]) -> Iterator[None]:
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def is_video_base(source: BaseModelSource) -> bool | None:
    """Whether a base model is a text-to-video pipeline (``VIDEO_PIPELINES``), read from its ``model_index.json``
    without loading it; ``None`` when that cannot be told without loading it (hub ids, single files, a folder
    without a readable index)."""
    if source.kind not in ("builtin", "folder"):
        return None
    try:
        index = json.loads((Path(source.location) / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return isinstance(index, dict) and index.get("_class_name") in VIDEO_PIPELINES


@dataclass(frozen=True)
class _Resident:
    sha256: str
    attached: AttachedAdapter


class ModelRuntime:
    """Owns the generation pipeline and its resident adapters."""

    def __init__(self, models_dir: Path, placement: DevicePlacement, single_file_config: str | None = None) -> None:
        self.models_dir = models_dir
        self.placement = placement
        self.single_file_config = single_file_config
        self.lock = threading.RLock()
        self._base_ref: str | None = None
        self._pipe = None
        self._adapters: OrderedDict[str, _Resident] = OrderedDict()  # adapter id -> its file's sha256, attached

    def resolve(self, ref: str) -> BaseModelSource:
        return resolve_base(ref, self.models_dir, config=self.single_file_config)

    def base_hash(self, ref: str) -> str:
        return base_model_hash(self.resolve(ref))

    def is_video_base(self, ref: str) -> bool:
        """Whether ``ref`` is a text-to-video pipeline (:func:`is_video_base`); a base that cannot be told without
        loading it (single files, hub ids) counts as an image model."""
        return bool(is_video_base(self.resolve(ref)))

    def fresh_pipeline(self, ref: str):
        """A private pipeline (for training, which changes the UNet); the shared one is released first on GPU."""
        if self.placement.device.type == "cuda":
            self.release()
        return load_pipeline(self.resolve(ref), self.placement)

    def pipeline(self, ref: str):
        with self.lock:
            if self._pipe is None or self._base_ref != ref:
                self.release()
                self._pipe = load_pipeline(self.resolve(ref), self.placement)
                self._base_ref = ref
            return self._pipe

    def adapter_set(self, ref: str, adapters: list[tuple[str, str, Path]]) -> ResidentAdapterSet:
        """Make sure each ``(adapter_id, sha256, file)`` is resident in the pipeline; return them as a set."""
        with self.lock:
            pipe = self.pipeline(ref)
            for adapter_id, sha, path in adapters:
                resident = self._adapters.get(adapter_id)
                if resident is not None and resident.sha256 == sha:
                    self._adapters.move_to_end(adapter_id)
                    continue
                if resident is not None:
                    self._evict(pipe, adapter_id)
                tensors, metadata = load_safetensors(path)
                attached = load_adapter(pipe, tensors, metadata, adapter_id)
                self._adapters[adapter_id] = _Resident(sha, attached)
            wanted = {a[0] for a in adapters}
            while len(self._adapters) > max(MAX_RESIDENT_ADAPTERS, len(wanted)):
                self._evict(pipe, next(a for a in self._adapters if a not in wanted))
            attached = {adapter_id: r.attached for adapter_id, r in self._adapters.items()}
            return ResidentAdapterSet(pipe, [a[0] for a in adapters], attached)

    def _evict(self, pipe, adapter_id: str) -> None:
        """Take adapter ``adapter_id`` out of ``pipe``: peft adapters through diffusers, others by ``remove()``."""
        resident = self._adapters.pop(adapter_id)
        remove = getattr(resident.attached, "remove", None)
        if adapter_id in (getattr(pipe.unet, "peft_config", None) or {}) or remove is None:
            pipe.delete_adapters(adapter_id)
        else:
            remove()

    def release(self) -> None:
        with self.lock:
            self._pipe = None
            self._base_ref = None
            self._adapters.clear()
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
