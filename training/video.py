"""Training clips and their captions: uint8 frame arrays resampled to the model's frame count and size.

Decoding uploaded video files happens elsewhere; this module receives clips as ``(F, H, W, 3)`` uint8 arrays. Each
clip is resampled in time to ``num_frames`` evenly spaced frames (frames are repeated when the clip is shorter) and
every frame is resized so its shorter side equals the training resolution (bicubic) and center-cropped to a
square, as still images are in ``training.data``.

A clip dataset on disk (``load_clip_folder``) is a folder of clips, each a subfolder of numbered PNG frames with an
optional caption file beside it::

    <folder>/<clip>/frame-000.png, frame-001.png, ...   (numbered from 0 without gaps; 3 digits or more)
    <folder>/<clip>.txt                                 (optional: the clip's caption, UTF-8)

Clips are read in the order of their folder names.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.io import atomic_write_bytes

FRAME_NAME = re.compile(r"frame-(\d{3,})\.png")
MIN_FRAMES = 2
MAX_FRAMES = 1024
MAX_CAPTION_BYTES = 4096


def frame_indices(count: int, num_frames: int) -> np.ndarray:
    """``num_frames`` evenly spaced indices into a clip of ``count`` frames (first and last kept; repeats when
    the clip is shorter)."""
    if count < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame, got a clip of {count} for {num_frames} wanted")
    if num_frames == 1:
        return np.zeros(1, dtype=np.int64)
    return np.round(np.linspace(0, count - 1, num_frames)).astype(np.int64)


def square_frame(frame: np.ndarray, resolution: int) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 frame resized (shorter side to ``resolution``, bicubic) and center-cropped."""
    h, w = frame.shape[:2]
    if (h, w) == (resolution, resolution):
        return frame
    img = Image.fromarray(frame)
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


def check_clip(clip: np.ndarray, what: str = "clip") -> np.ndarray:
    """``clip`` as a contiguous ``(F, H, W, 3)`` uint8 array, or a ``ValueError`` naming ``what``."""
    array = np.asarray(clip)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{what}: expected a (frames, height, width, 3) uint8 array, got {array.dtype} "
                         f"{tuple(array.shape)}")
    if not MIN_FRAMES <= array.shape[0] <= MAX_FRAMES:
        raise ValueError(f"{what}: has {array.shape[0]} frames; a clip needs {MIN_FRAMES} to {MAX_FRAMES}")
    if min(array.shape[1:3]) < 8:
        raise ValueError(f"{what}: frames of {array.shape[2]}x{array.shape[1]} pixels are too small")
    return np.ascontiguousarray(array)


def resample_clip(clip: np.ndarray, num_frames: int, resolution: int) -> np.ndarray:
    """``clip`` as ``(num_frames, resolution, resolution, 3)`` uint8: evenly spaced frames, square-cropped."""
    return np.stack([square_frame(clip[i], resolution) for i in frame_indices(len(clip), num_frames)])


def clip_to_tensor(clip: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 as a float ``(F, 3, H, W)`` tensor in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.asarray(clip, dtype=np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


class ClipDataset:
    """Captioned clips for video training; ``clip(i)`` is ``(num_frames, resolution, resolution, 3)`` uint8.

    Clips are checked and resampled once, here, so a bad clip fails before any training starts.
    """

    def __init__(self, clips: Sequence[np.ndarray], captions: Sequence[str], num_frames: int, resolution: int,
                 names: Sequence[str] | None = None) -> None:
        if not len(clips):
            raise ValueError("the dataset has no clips")
        if len(captions) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(captions)} captions")
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        if num_frames < MIN_FRAMES:
            raise ValueError(f"num_frames must be >= {MIN_FRAMES}, got {num_frames}")
        names = list(names) if names is not None else [f"clip {i}" for i in range(len(clips))]
        self.names = names
        self.num_frames = num_frames
        self.resolution = resolution
        self._captions = [" ".join(str(c or "").split()) for c in captions]
        self._clips = [resample_clip(check_clip(c, n), num_frames, resolution) for c, n in zip(clips, names)]

    @classmethod
    def from_records(cls, records: Sequence[tuple[np.ndarray, str]], num_frames: int, resolution: int,
                     names: Sequence[str] | None = None) -> ClipDataset:
        """From ``(clip, caption)`` pairs (what ``load_clip_folder`` returns)."""
        return cls([r[0] for r in records], [r[1] for r in records], num_frames, resolution, names)

    def __len__(self) -> int:
        return len(self._clips)

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    def clip(self, index: int) -> np.ndarray:
        return self._clips[index]

    def pixels(self, index: int) -> torch.Tensor:
        """Clip ``index`` as a float ``(F, 3, R, R)`` tensor in [-1, 1]."""
        return clip_to_tensor(self._clips[index])


def _read_frame(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise ValueError(f"{path}: not a PNG file (found {img.format})")
            return np.asarray(img.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable PNG frame ({exc})") from None


def read_clip_frames(folder: str | os.PathLike[str]) -> np.ndarray:
    """The frames ``frame-000.png, frame-001.png, ...`` of one clip folder as ``(F, H, W, 3)`` uint8."""
    folder = Path(folder)
    numbered: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = FRAME_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink():
            continue
        index = int(match.group(1))
        if index in numbered:
            raise ValueError(f"{folder}: frame {index} appears twice ({numbered[index].name}, {entry.name})")
        numbered[index] = entry
    if len(numbered) < MIN_FRAMES:
        raise ValueError(f"{folder}: a clip needs at least {MIN_FRAMES} frames named frame-000.png, "
                         f"frame-001.png, ...; found {len(numbered)}")
    if len(numbered) > MAX_FRAMES:
        raise ValueError(f"{folder}: {len(numbered)} frames; at most {MAX_FRAMES} are read")
    missing = sorted(set(range(len(numbered))) - set(numbered))
    if missing:
        raise ValueError(f"{folder}: frames must be numbered from 0 without gaps; frame {missing[0]} is missing")
    frames = [_read_frame(numbered[i]) for i in range(len(numbered))]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: frames differ in size ({', '.join(f'{s[1]}x{s[0]}' for s in sorted(sizes))})")
    return check_clip(np.stack(frames), str(folder))


def load_clip_folder(folder: str | os.PathLike[str]) -> list[tuple[np.ndarray, str, str]]:
    """Every clip of a clip-dataset folder (layout in the module docstring) as ``(frames, caption, name)``.

    Raises ``ValueError`` naming the file for a bad frame, a gap in the numbering or an unreadable caption.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such clip-dataset folder")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                      and not p.name.startswith(".")):
        caption_file = folder / f"{sub.name}.txt"
        caption = ""
        if caption_file.is_file():
            raw = caption_file.read_bytes()
            if len(raw) > MAX_CAPTION_BYTES:
                raise ValueError(f"{caption_file}: caption longer than {MAX_CAPTION_BYTES} bytes")
            try:
                caption = " ".join(raw.decode("utf-8").split())
            except UnicodeDecodeError:
                raise ValueError(f"{caption_file}: caption is not UTF-8 text") from None
        out.append((read_clip_frames(sub), caption, sub.name))
    if not out:
        raise ValueError(f"{folder}: no clip folders found (expected <clip>/frame-000.png, frame-001.png, ...)")
    return out


def write_clip_folder(folder: str | os.PathLike[str], name: str, clip: np.ndarray, caption: str | None = None) -> Path:
    """Write one clip in the ``load_clip_folder`` layout (``<folder>/<name>/frame-NNN.png`` and ``<name>.txt``)."""
    if not re.fullmatch(r"[\w][\w.\-]{0,63}", name):
        raise ValueError(f"clip name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    clip = check_clip(clip, name)
    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(clip):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        atomic_write_bytes(target / f"frame-{i:03d}.png", buffer.getvalue())
    if caption is not None:
        atomic_write_bytes(Path(folder) / f"{name}.txt", caption.encode("utf-8"))
    return target
