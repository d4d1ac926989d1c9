"""One loader for base models: hub id, local diffusers folder, single-file checkpoint, or a built-in model.

``resolve_base`` turns a user's reference into a ``BaseModelSource``; ``load_pipeline`` loads it with diffusers'
own ``from_pretrained`` / ``from_single_file``, placed on the chosen device and dtype.

Network use: local folders, built-in models and single files with a local ``config`` never touch the network.
Hub models (and the hub configs of single files) are looked up in the local Hugging Face cache first; only when
they are missing there, and downloads are allowed (``HF_HUB_OFFLINE`` unset), does diffusers download them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from core.builtin import BUILTIN_PREFIX, ensure_builtin, is_builtin
from core.devices import DevicePlacement, choose_placement
from core.io import SAFETENSORS_SUFFIX, atomic_write_json

SourceKind = Literal["builtin", "folder", "single_file", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HASH_FILE = ".lorastudio-hash.json"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_UNET_KEY = "model.diffusion_model."
_ADAPTER_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora_unet_", "lora_te", "hada_w", "lokr_w",
                    "oft_blocks")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Building a built-in model seeds torch's global RNG; two builds at once in one process would mix their
# random streams and save non-reproducible weights, so builds started from here run one at a time.
_BUILTIN_LOCK = threading.Lock()
# diffusers builds models under accelerate's init_empty_weights, which patches torch.nn.Module process-wide, so two
# threads loading at once can leave each other's weights on the meta device: loads run one at a time.
_LOAD_LOCK = threading.Lock()


class BaseModelError(ValueError):
    """A base model reference that cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class BaseModelSource:
    ref: str  # what the user wrote
    kind: SourceKind
    location: str  # folder, file or hub id
    config: str | None = None  # diffusers folder or hub id giving the component configs of a single file
    cache_dir: str | None = None  # Hugging Face hub cache to use; None: HF_HUB_CACHE / HF_HOME at load time


def _is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and ".." not in ref and "--" not in ref


def _ensure_builtin(ref: str, models_dir: str | os.PathLike[str]) -> Path:
    try:
        with _BUILTIN_LOCK:
            return ensure_builtin(models_dir, ref.removeprefix(BUILTIN_PREFIX))
    except ValueError as exc:
        raise BaseModelError(str(exc)) from None
    except OSError as exc:
        raise BaseModelError(f"{ref}: could not save the built-in model under {models_dir}: {exc}") from None


def _resolve_config(config: str, models_dir: str | os.PathLike[str]) -> str:
    """A single file's ``config`` as an absolute diffusers folder, or a hub id kept as given."""
    config = config.strip()
    if is_builtin(config):
        return str(_ensure_builtin(config, models_dir))
    path = Path(config).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"config {config!r}: folder has no model_index.json; the config of a single-file "
                                 "checkpoint must be a diffusers pipeline folder of the same architecture")
        return str(path.resolve())
    if _is_hub_id(config) and not path.exists():
        return config
    raise BaseModelError(f"config {config!r}: no such diffusers folder (or hub id); pass the diffusers folder whose "
                         "architecture matches the checkpoint, e.g. 'builtin:tiny-sd' for checkpoints of the "
                         "built-in model")


def _check_single_file(path: Path, ref: str) -> None:
    """Read the header (never the data) and refuse files that are corrupt or are not base-model checkpoints."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises several types for a bad header
        raise BaseModelError(f"{path}: not a readable .safetensors checkpoint, the file is corrupt or incomplete "
                             f"({exc})") from None
    if not keys:
        raise BaseModelError(f"{path}: the checkpoint holds no weights")
    if not any(k.startswith(_UNET_KEY) for k in keys):
        if any(marker in k for k in keys for marker in _ADAPTER_MARKERS):
            raise BaseModelError(f"{path}: this is an adapter (LoRA-family) file, not a base model; pick it as an "
                                 "adapter and use a full checkpoint as the base")
        raise BaseModelError(f"{path}: no '{_UNET_KEY}*' weights, so this is not an original-layout Stable "
                             f"Diffusion (1.x/2.x/XL) checkpoint (ref {ref!r}); use a diffusers folder instead")


def resolve_base(ref: str, models_dir: str | os.PathLike[str], config: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> BaseModelSource:
    """Classify ``ref``; builds the built-in model on first use. Raises ``BaseModelError`` with guidance.

    ``ref`` is one of: ``builtin:<name>``; a diffusers pipeline folder (with ``model_index.json``); a single
    ``.safetensors`` checkpoint in the original A1111/Civitai layout (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*``); or a hub id ``org/name``. Pickle-based files (``.ckpt``,
    ``.pt``, ``.bin``...) are refused without being opened, since opening them can run code.

    ``config`` only matters for single files: a single file holds weights but no architecture, so diffusers
    needs the component configs (``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``,
    ``tokenizer/``, ``scheduler/``) of a pipeline with the *same architecture*. Pass either a local diffusers
    folder (e.g. the folder the checkpoint was made from), ``builtin:<name>`` for checkpoints of a built-in
    model, or a hub id that is in the local Hugging Face cache. Without it, diffusers guesses the standard model
    from the weight names (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5`` for SD 1.x), whose configs must
    then be in the Hugging Face cache or downloadable; non-standard sizes such as the built-in tiny model always
    need ``config``.

    ``cache_dir`` is the Hugging Face hub cache for hub ids and hub configs; by default ``HF_HUB_CACHE`` /
    ``HF_HOME`` as set when the model is loaded.
    """
    ref = ref.strip()
    cache = str(Path(cache_dir).expanduser()) if cache_dir else None
    if not ref:
        raise BaseModelError("no base model given; use 'builtin:tiny-sd', a diffusers folder, a .safetensors file "
                             "or a hub id like 'org/name'")
    if is_builtin(ref):
        return BaseModelSource(ref, "builtin", str(_ensure_builtin(ref, models_dir)))
    path = Path(ref).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise BaseModelError(f"{ref}: {path.suffix} files are pickles, which can run code when opened, so they are "
                             "not loaded; convert the checkpoint to .safetensors first")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{ref}: folder has no model_index.json, so it is not a diffusers pipeline folder")
        return BaseModelSource(ref, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != SAFETENSORS_SUFFIX:
            raise BaseModelError(f"{ref}: only .safetensors single-file checkpoints are loaded "
                                 "(.ckpt/.pt/.bin files can run code when opened)")
        _check_single_file(path, ref)
        resolved_config = _resolve_config(config, models_dir) if config and config.strip() else None
        return BaseModelSource(ref, "single_file", str(path.resolve()), resolved_config, cache)
    if path.exists():
        raise BaseModelError(f"{ref}: not a regular file or folder")
    if ref.lower().endswith(SAFETENSORS_SUFFIX) or "\\" in ref or (os.sep in ref and not _is_hub_id(ref)):
        raise BaseModelError(f"{ref}: no such file or folder")
    if _is_hub_id(ref):
        return BaseModelSource(ref, "hub", ref, cache_dir=cache)
    raise BaseModelError(f"{ref!r} is not a built-in model, a local folder, a .safetensors file or a hub id")


def downloads_disabled() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, read now (huggingface_hub itself reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache folder: ``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME`` as set now."""
    if cache_dir:
        return cache_dir
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str, cache_dir: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (revision ``main``) holding a pipeline, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    except Exception:  # an invalid id or an unreadable cache means: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


class _HeaderView(dict):
    """Weight names and shapes of a safetensors file, read from its header, for diffusers' model-type guess."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            super().__init__({k: SimpleNamespace(shape=tuple(fh.get_slice(k).get_shape())) for k in fh.keys()})


def _default_single_file_config(path: str) -> str | None:
    """The hub repo whose configs diffusers would use for ``path`` when no config is given."""
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        return fetch_diffusers_config(_HeaderView(path))["pretrained_model_name_or_path"]
    except Exception:
        return None


def _single_file_pipeline_class(path: str):
    """SDXL checkpoints carry a second text encoder under ``conditioner.embedders.1``; the rest load as SD."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        keys = fh.keys()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _offline_hint(what: str, cache_dir: str) -> str:
    return (f"{what} is not in the local Hugging Face cache ({cache_dir}) and downloads are off (HF_HUB_OFFLINE is "
            "set), so nothing was fetched; download it where there is network (e.g. `hf download <id>`) into that "
            "cache (or set HF_HUB_CACHE / pass cache_dir), or use a local diffusers folder")


def _load_hub(source: BaseModelSource, dtype: Any, allow_download: bool):
    from diffusers import DiffusionPipeline

    cache_dir = hub_cache_dir(source.cache_dir)
    common = {"torch_dtype": dtype, "use_safetensors": True, "cache_dir": cache_dir}
    try:
        return DiffusionPipeline.from_pretrained(source.location, local_files_only=True, **common)
    except Exception as exc:
        local_error = exc
    if not allow_download:
        if _cached_snapshot(source.location, cache_dir) is None:
            raise BaseModelError(f"could not load base model {source.ref!r}: "
                                 f"{_offline_hint(f'hub model {source.location!r}', cache_dir)}") from local_error
        raise BaseModelError(f"could not load base model {source.ref!r} from the Hugging Face cache ({cache_dir}); "
                             "it is cached only in part or its files are broken, and downloads are off "
                             f"(HF_HUB_OFFLINE is set): {local_error}") from local_error
    try:
        return DiffusionPipeline.from_pretrained(source.location, local_files_only=False, **common)
    except Exception as exc:
        raise BaseModelError(f"could not load base model {source.ref!r}: it is not complete in the local Hugging "
                             f"Face cache ({cache_dir}) and downloading it failed ({exc}); check the network, the "
                             "id and HF_TOKEN for gated models, or set HF_HUB_OFFLINE=1 and use a cached or local "
                             "model") from exc


def _load_single_file(source: BaseModelSource, dtype: Any, allow_download: bool):
    path = Path(source.location)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise BaseModelError(f"{path}: only .safetensors single-file checkpoints are loaded "
                             "(.ckpt/.pt/.bin files can run code when opened)")
    if not path.is_file():
        raise BaseModelError(f"{path}: no such file")
    _check_single_file(path, source.ref)  # the file may have changed since it was resolved
    cache_dir = hub_cache_dir(source.cache_dir)
    config = source.config
    if config is None or not Path(config).is_dir():
        guessed = config is None
        repo = config or _default_single_file_config(str(path))
        snapshot = _cached_snapshot(repo, cache_dir) if repo else None
        if snapshot is not None:
            config = str(snapshot)
        elif not allow_download or repo is None:
            what = (f"the standard configs this checkpoint would use ({repo!r})" if guessed and repo
                    else f"config {repo!r}" if repo else "a matching config")
            reason = _offline_hint(what, cache_dir) if repo else "its architecture could not be recognised"
            raise BaseModelError(f"could not load base model {source.ref!r}: a single-file checkpoint needs the "
                                 f"component configs of a pipeline with the same architecture; {reason}. Pass "
                                 "config=<local diffusers folder of that architecture> ('builtin:tiny-sd' for "
                                 "checkpoints of the built-in model)")
        else:
            config = repo
    local_only = Path(config).is_dir() or not allow_download
    try:
        cls = _single_file_pipeline_class(str(path))
        return cls.from_single_file(str(path), config=config, torch_dtype=dtype, local_files_only=local_only,
                                    cache_dir=cache_dir)
    except Exception as exc:
        if "meta tensor" in str(exc):  # diffusers leaves weights the checkpoint lacks on the meta device
            raise BaseModelError(f"could not load base model {source.ref!r} from {path}: weights missing, the "
                                 f"checkpoint lacks weights that config {config!r} expects ({exc}); the config must "
                                 "describe the same architecture as the checkpoint") from exc
        raise BaseModelError(f"could not load base model {source.ref!r} from {path} with config {config!r}: "
                             f"{exc} (the config must describe the same architecture as the checkpoint)") from exc


def _missing_weights(pipe) -> dict[str, list[str]]:
    """Parameters left on the meta device: diffusers does not complain when a checkpoint lacks some weights."""
    import torch

    missing: dict[str, list[str]] = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            names = [n for n, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
            if names:
                missing[name] = names
    return missing


def load_pipeline(source: BaseModelSource, placement: DevicePlacement | None = None,
                  allow_download: bool | None = None):
    """Load a diffusers pipeline from ``source`` onto ``placement`` (default: chosen from the hardware).

    ``allow_download``: ``None`` (default) allows hub downloads unless ``HF_HUB_OFFLINE`` is set (read at call
    time). Local folders, built-in models and single files with a local config are never looked up online; hub
    models are taken from the local cache first. Every failure is a ``BaseModelError`` naming the model.
    """
    placement = placement or choose_placement()
    if allow_download is None:
        allow_download = not downloads_disabled()
    with _LOAD_LOCK:
        pipe = _load(source, placement, allow_download)
    return _check_loaded(pipe, source, placement)


def _load(source: BaseModelSource, placement: DevicePlacement, allow_download: bool):
    from diffusers import DiffusionPipeline

    if source.kind == "hub":
        return _load_hub(source, placement.dtype, allow_download)
    if source.kind == "single_file":
        return _load_single_file(source, placement.dtype, allow_download)
    if not (Path(source.location) / "model_index.json").is_file():
        raise BaseModelError(f"could not load base model {source.ref!r}: {source.location} is not a diffusers "
                             "pipeline folder (no model_index.json)")
    try:
        return DiffusionPipeline.from_pretrained(source.location, torch_dtype=placement.dtype,
                                                 use_safetensors=True, local_files_only=True)
    except Exception as exc:
        raise BaseModelError(f"could not load base model {source.ref!r} from {source.location}: {exc}") from exc


def _check_loaded(pipe, source: BaseModelSource, placement: DevicePlacement):
    missing = _missing_weights(pipe)
    if missing:
        detail = "; ".join(f"{name}: {len(keys)} (e.g. {keys[0]})" for name, keys in missing.items())
        raise BaseModelError(f"could not load base model {source.ref!r}: weights missing for {detail}; the "
                             "checkpoint does not match its config")
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if getattr(pipe, "unet", None) is not None:
        peft_ready(pipe.unet)  # so LoRA files load into every base, UNet3D (ModelScope/ZeroScope) included
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(placement.device)
    except Exception as exc:
        raise BaseModelError(f"could not move base model {source.ref!r} to {placement}: {exc}") from exc


def _weight_files(source: BaseModelSource) -> tuple[Path, list[Path]]:
    location = Path(source.location)
    if location.is_file():
        return location, [location]
    files = sorted(f for f in location.rglob("*.safetensors") if f.is_file())
    if not files:
        raise BaseModelError(f"{source.ref!r}: no .safetensors weights under {location}")
    return location, files


def base_model_hash(source: BaseModelSource) -> str:
    """A short, stable content hash of a base model, for telling apart bases that share a name.

    Local models hash their ``.safetensors`` weights (names within the folder, sizes and bytes), so renaming or
    moving the folder keeps the hash and changing any weight changes it. The result is cached next to the
    weights, keyed on sizes and modification times. Hub models are identified by their id.
    """
    if source.kind == "hub":
        return hashlib.sha256(source.location.encode()).hexdigest()[:16]
    location, files = _weight_files(source)
    is_file = location.is_file()
    cache = location.with_name(f".{location.name}{_HASH_FILE}") if is_file else location / _HASH_FILE
    names = [f.name if is_file else f.relative_to(location).as_posix() for f in files]
    try:
        stamp = [[name, f.stat().st_size, f.stat().st_mtime_ns] for name, f in zip(names, files, strict=True)]
    except OSError as exc:
        raise BaseModelError(f"{source.ref!r}: cannot read its weights: {exc}") from None
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("stamp") == stamp and isinstance(cached.get("hash"), str):
                return cached["hash"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = hashlib.sha256()
    try:
        for name, f in zip(names, files, strict=True):
            digest.update(f"{'' if is_file else name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
    except OSError as exc:
        raise BaseModelError(f"{source.ref!r}: cannot read its weights: {exc}") from None
    value = digest.hexdigest()[:16]
    try:
        atomic_write_json(cache, {"stamp": stamp, "hash": value})
    except OSError:  # read-only model folders are fine; the hash is just recomputed
        pass
    return value


@functools.cache
def _with_peft_methods(cls: type) -> type:
    from diffusers.loaders.peft import PeftAdapterMixin

    return type(cls.__name__, (cls, PeftAdapterMixin), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def peft_ready(unet: Any) -> type | None:
    """Give ``unet`` diffusers' peft adapter methods (``add_adapter``, ``load_lora_adapter``, ``set_adapters``,
    ``unload_lora``...) when its class lacks them; returns the class it had when it was changed, else ``None``.

    diffusers' ``UNet3DConditionModel`` is such a class (its ``TextToVideoSDPipeline.load_lora_weights`` fails with
    ``AttributeError: 'UNet3DConditionModel' object has no attribute 'load_lora_adapter'``). The instance becomes
    a subclass of the same name that adds ``PeftAdapterMixin``; its weights, config and saved form are unchanged.
    diffusers offers no public hook for this, hence the class swap.
    """
    from diffusers.loaders.peft import PeftAdapterMixin

    if isinstance(unet, PeftAdapterMixin):
        return None
    original = type(unet)
    unet.__class__ = _with_peft_methods(original)
    return original
