"""The loaded models: one base pipeline kept warm for generation, with adapters resident and unfused.

Only the worker thread calls into this object, so the pipeline is never used from two threads at once; the
lock makes that a guarantee rather than a convention.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from composition.routing import router_for
from core.devices import DevicePlacement
from core.io import load_safetensors
from core.pipelines import BaseModelSource, base_model_hash, load_pipeline, resolve_base
from training.artifact import load_adapter

MAX_RESIDENT_ADAPTERS = 16


class PeftAdapterSet:
    """``composition.base.AdapterSet`` over adapters loaded into a diffusers pipeline with peft."""

    def __init__(self, pipe, names: list[str]) -> None:
        self._pipe = pipe
        self._names = list(names)
        self._applied: dict[str, float] | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def can_route(self, names: Iterable[str]) -> bool:
        """Whether per-sample routing (``composition.routing``) can serve these adapters."""
        return router_for(self._pipe.unet).can_route(names)

    def route(self, groups: Sequence[Mapping[str, float]]) -> AbstractContextManager[None]:
        """One batched UNet call, chunk ``i`` with mix ``groups[i]``; peft's own adapter state is left as is."""
        unknown = sorted({n for g in groups for n in g} - set(self._names))
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        return router_for(self._pipe.unet).route(groups)

    def apply(self, weights: dict[str, float]) -> None:
        active = {n: float(w) for n, w in weights.items() if w != 0.0}
        if active == self._applied:
            return
        unknown = sorted(set(active) - set(self._names))
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        if active:
            self._pipe.enable_lora()
            self._pipe.set_adapters(list(active), list(active.values()))
        elif self._names:
            self._pipe.disable_lora()
        self._applied = active


class ModelRuntime:
    """Owns the generation pipeline and its resident adapters."""

    def __init__(self, models_dir: Path, placement: DevicePlacement, single_file_config: str | None = None) -> None:
        self.models_dir = models_dir
        self.placement = placement
        self.single_file_config = single_file_config
        self.lock = threading.RLock()
        self._base_ref: str | None = None
        self._pipe = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter id -> sha256 of its file

    def resolve(self, ref: str) -> BaseModelSource:
        return resolve_base(ref, self.models_dir, config=self.single_file_config)

    def base_hash(self, ref: str) -> str:
        return base_model_hash(self.resolve(ref))

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

    def adapter_set(self, ref: str, adapters: list[tuple[str, str, Path]]) -> PeftAdapterSet:
        """Make sure each ``(adapter_id, sha256, file)`` is resident in the pipeline; return them as a set."""
        with self.lock:
            pipe = self.pipeline(ref)
            for adapter_id, sha, path in adapters:
                if self._adapters.get(adapter_id) == sha:
                    self._adapters.move_to_end(adapter_id)
                    continue
                if adapter_id in self._adapters:
                    pipe.delete_adapters(adapter_id)
                    del self._adapters[adapter_id]
                tensors, metadata = load_safetensors(path)
                load_adapter(pipe, tensors, metadata, adapter_id)
                self._adapters[adapter_id] = sha
            wanted = {a[0] for a in adapters}
            while len(self._adapters) > max(MAX_RESIDENT_ADAPTERS, len(wanted)):
                oldest = next(a for a in self._adapters if a not in wanted)
                pipe.delete_adapters(oldest)
                del self._adapters[oldest]
            return PeftAdapterSet(pipe, [a[0] for a in adapters])

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
