"""Device and dtype selection: CUDA with bf16/fp16 when present, else CPU float32; both overridable."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_AUTO = (None, "", "auto")


@dataclass(frozen=True)
class DevicePlacement:
    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device} / {str(self.dtype).removeprefix('torch.')}"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} requested but only {count} CUDA device(s) are present "
                             f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available; use 'cpu' or 'auto'")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
    return dev


def choose_placement(device: str | None = None, dtype: str | torch.dtype | None = None) -> DevicePlacement:
    """Pick where models run. ``device``/``dtype`` of ``None`` or ``"auto"`` mean: decide from the hardware.

    Raises ``ValueError`` for an unknown or unavailable device and for an unknown dtype.
    """
    device = device.strip().lower() if isinstance(device, str) else device
    dtype = dtype.strip().lower() if isinstance(dtype, str) else dtype
    if device in _AUTO:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = _parse_device(device)
    if dtype in _AUTO:
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return DevicePlacement(dev, dt)


def device_memory_gb(device: torch.device | str) -> float:
    """Total memory of ``device`` in GiB: the GPU's own memory, or the system RAM for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return 0.0
