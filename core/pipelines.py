"""One loader for base models: hub id, local diffusers folder, single-file checkpoint, or a built-in model.

``resolve_base`` turns a user's reference into a ``BaseModelSource``; ``load_pipeline`` loads it with diffusers'
own ``from_pretrained`` / ``from_single_file``, placed on the chosen device and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.builtin import BUILTIN_PREFIX, ensure_builtin, is_builtin
from core.devices import DevicePlacement, choose_placement
from core.io import SAFETENSORS_SUFFIX, read_safetensors_metadata

SourceKind = Literal["builtin", "folder", "single_file", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HASH_FILE = ".lorastudio-hash.json"


class BaseModelError(ValueError):
    """A base model reference that cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class BaseModelSource:
    ref: str  # what the user wrote
    kind: SourceKind
    location: str  # folder, file or hub id
    config: str | None = None  # diffusers folder or hub id giving the component configs of a single file


def resolve_base(ref: str, models_dir: str | os.PathLike[str], config: str | None = None) -> BaseModelSource:
    """Classify ``ref``; builds the built-in model on first use. Raises ``BaseModelError`` with guidance."""
    ref = ref.strip()
    if not ref:
        raise BaseModelError("no base model given; use 'builtin:tiny-sd', a diffusers folder, a .safetensors file "
                             "or a hub id like 'org/name'")
    if is_builtin(ref):
        try:
            folder = ensure_builtin(models_dir, ref.removeprefix(BUILTIN_PREFIX))
        except ValueError as exc:
            raise BaseModelError(str(exc)) from None
        return BaseModelSource(ref, "builtin", str(folder))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{ref}: folder has no model_index.json, so it is not a diffusers pipeline folder")
        return BaseModelSource(ref, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != SAFETENSORS_SUFFIX:
            raise BaseModelError(f"{ref}: only .safetensors single-file checkpoints are loaded "
                                 "(.ckpt/.pt/.bin files can run code when opened)")
        read_safetensors_metadata(path)  # fail early on a corrupt header
        return BaseModelSource(ref, "single_file", str(path.resolve()), config)
    if ref.endswith(SAFETENSORS_SUFFIX) or os.sep in ref and not _HUB_ID.match(ref):
        raise BaseModelError(f"{ref}: no such file or folder")
    if _HUB_ID.match(ref):
        return BaseModelSource(ref, "hub", ref)
    raise BaseModelError(f"{ref!r} is not a built-in model, a local folder, a .safetensors file or a hub id")


def _single_file_pipeline_class(path: str):
    """SDXL checkpoints carry a second text encoder under ``conditioner.embedders.1``; the rest load as SD."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        keys = fh.keys()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_pipeline(source: BaseModelSource, placement: DevicePlacement | None = None):
    """Load a diffusers pipeline from ``source`` onto ``placement`` (default: chosen from the hardware)."""
    from diffusers import DiffusionPipeline

    placement = placement or choose_placement()
    try:
        if source.kind == "single_file":
            cls = _single_file_pipeline_class(source.location)
            kwargs = {"config": source.config} if source.config else {}
            pipe = cls.from_single_file(source.location, torch_dtype=placement.dtype, **kwargs)
        else:
            pipe = DiffusionPipeline.from_pretrained(source.location, torch_dtype=placement.dtype,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        hint = ""
        if source.kind == "hub":
            hint = (" (hub models must already be in the local Hugging Face cache when the network is off; "
                    "or point to a local diffusers folder)")
        elif source.kind == "single_file" and not source.config:
            hint = " (pass the matching diffusers folder as the config of this checkpoint)"
        raise BaseModelError(f"could not load base model {source.ref!r}: {exc}{hint}") from exc
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(placement.device)


def base_model_hash(source: BaseModelSource) -> str:
    """A short, stable content hash of a base model, for telling apart bases that share a name."""
    if source.kind == "hub":
        return hashlib.sha256(source.location.encode()).hexdigest()[:16]
    location = Path(source.location)
    files = [location] if location.is_file() else sorted(location.rglob("*.safetensors"))
    cache = location.with_name(location.name + _HASH_FILE) if location.is_file() else location / _HASH_FILE
    stamp = [[str(f.relative_to(location.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("stamp") == stamp:
                return cached["hash"]
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    value = digest.hexdigest()[:16]
    try:
        cache.write_text(json.dumps({"stamp": stamp, "hash": value}))
    except OSError:  # read-only model folders are fine; the hash is just recomputed
        pass
    return value
