"""Resumable training checkpoints, shared by the image trainer (``training.trainer``) and the motion trainer.

A checkpoint is a folder ``<work_dir>/checkpoints/step-XXXXXX/`` holding ``adapter.safetensors`` (the adapter as it
is), ``state.safetensors`` (parameters, optimizer tensors, RNG states) and ``state.json`` (everything else). It is
written into a temporary folder and renamed into place, so a crash never leaves a half-written checkpoint; the
latest ``KEEP_CHECKPOINTS`` are kept. The helpers here save and restore the parts every loop has (parameters,
AdamW state, Python/NumPy/torch RNGs); each trainer adds its own fields and checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from core.io import atomic_write_json, load_safetensors, save_safetensors

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
_CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")


class _Adapter(Protocol):
    """What a checkpoint stores of the method being trained."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...

    def adapter_metadata(self) -> dict[str, str]: ...


def checkpoint_dirs(work_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``work_dir``, oldest first."""
    root = Path(work_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(work_dir: str | os.PathLike[str]) -> Path | None:
    found = checkpoint_dirs(work_dir)
    return found[-1] if found else None


def checkpoint_path(work_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` goes."""
    return Path(work_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and keys as strings; ``TypeError`` for anything JSON cannot hold."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def config_defaults(cls: type) -> dict[str, Any]:
    """The default of every field of dataclass ``cls`` that has one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# -- saving -----------------------------------------------------------------------------------------------------------


def param_tensors(params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained parameters, in order, as ``param.00000``, ``param.00001``, …"""
    return {f"param.{i:05d}": p.detach() for i, p in enumerate(params)}


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state split into tensors (``<prefix><index>.<name>``) and a JSON entry with its parameter
    groups and non-tensor values (``param_groups``, ``scalars``)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": json_safe(state["param_groups"]), "scalars": json_safe(scalars)}


def rng_state(noise_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of every random generator the loops draw from: torch's (and CUDA's) and ``noise_gen`` as tensors,
    Python's and NumPy's as a JSON entry."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.noise": noise_gen.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    entry = {
        "python": json_safe(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, entry


def write_checkpoint(work_dir: str | os.PathLike[str], step: int, method: _Adapter,
                     tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
    """Write ``checkpoints/step-XXXXXX/`` into a temp folder, rename it into place, keep the latest ones."""
    root = Path(work_dir) / CHECKPOINT_DIR
    final = checkpoint_path(work_dir, step)
    tmp = root / f".{final.name}.tmp"
    for stale in root.glob(".step-*.tmp") if root.is_dir() else ():  # left by a crash while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(tmp / "adapter.safetensors", method.adapter_state_dict(), method.adapter_metadata())
    save_safetensors(tmp / "state.safetensors", dict(tensors), {"format": "pt"})
    atomic_write_json(tmp / "state.json", dict(info))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(work_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- loading ----------------------------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's ``state.json`` and tensors; ``ValueError`` when they cannot be read."""
    try:
        info = json.loads((path / "state.json").read_text())
        tensors, _ = load_safetensors(path / "state.safetensors")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({exc})") from exc
    return info, tensors


def check_method(path: Path, info: Mapping[str, Any], method_name: str) -> None:
    if info.get("method") != method_name:
        raise ValueError(f"{path}: checkpoint of method {info.get('method')!r}, not {method_name!r}")


def check_settings(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any], free: Iterable[str]) -> None:
    """``ValueError`` naming the settings that differ between the checkpoint and this run, except ``free`` ones."""
    free = set(free)
    changed = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{path}: cannot resume with changed settings: {', '.join(changed)}")


def restore_params(path: Path, tensors: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor], *,
                   layout_matches: bool = True) -> None:
    """Copy the saved parameters into ``params``; ``ValueError`` when their number (or, ``layout_matches`` False,
    their split between parameter sets) or a shape differs."""
    n_params = sum(1 for k in tensors if k.startswith("param."))
    if n_params != len(params) or not layout_matches:
        raise ValueError(f"{path}: checkpoint has {n_params} parameters, the method has {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i:05d}"]
            if saved.shape != p.shape:
                raise ValueError(f"{path}: parameter {i} has shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
            p.copy_(saved)


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], prefix: str,
                         entry: Mapping[str, Any]) -> None:
    """Put back what :func:`optimizer_state` saved under ``prefix`` and in ``entry``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in entry["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = entry["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any], noise_gen: torch.Generator) -> None:
    """Put back what :func:`rng_state` saved, so the run goes on drawing the same numbers."""
    torch.set_rng_state(tensors["rng.torch"])
    noise_gen.set_state(tensors["rng.noise"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    py = entry["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = entry["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
