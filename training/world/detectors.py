"""Detectors of the shapes world: small CNNs trained on rendered ground truth, never on model output.

``ImageDetector`` is fully convolutional (in the manner of CenterNet, Zhou et al. 2019, "Objects as Points"):
on a 16x16 grid of 4x4-pixel cells it says, per cell, whether an object's centre lies within 4 pixels and which
of the 13 objects (9 shapes, 4 held-out subjects) it is, with its colour and size. Decoding keeps the cells that
are the strongest within 12 pixels, so it finds objects anywhere and names the nearest of the five positions.
Pooled features give the background colour, its texture and the style (none or one of the held-out styles).
``MotionDetector`` reads an 8-frame clip (frames stacked as channels) and names its motion: still, the four
straight moves, or a held-out motion; a clip's objects come from the image detector on its frames.

Weights are safetensors with a JSON config next to them (``image.safetensors`` + ``image.json``, ``clip.*``);
``load_detectors()`` reads the shipped ones from ``training/world/weights``. ``detect(images)`` and
``detect_clip(frames)`` return ``Labels`` like the renderer's, with confidences in ``scores``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from training.world.concepts import (
    CLIP_FRAMES,
    COLOUR_NAMES,
    IMAGE_SIZE,
    MOTION_CLASSES,
    OBJECTS,
    POSITION_NAMES,
    POSITIONS,
    SIZE_NAMES,
    STYLE_CLASSES,
    SUBJECTS,
    TEXTURES,
    Labels,
    ObjectLabel,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IGNORE = -100
CELL = 4  # pixels per cell of the dense map
GRID = IMAGE_SIZE // CELL
CELL_CLASSES = ("none",) + OBJECTS
POSITIVE_RADIUS = 4.0  # cells whose centre is this close (per axis) to an object's centre are that object's cells
IGNORE_RADIUS = 8.0  # cells a bit farther are neither the object nor empty
NONE_WEIGHT = 0.1  # loss weight of an empty cell against an object's cell
PEAK_WINDOW = 7  # cells: a detection suppresses the rest of its 7x7 neighbourhood (objects stand >= 30 px apart)
THRESHOLD = 0.6
ON_GRID = 2.5 + 0.01  # an object this close (per axis) to a position's centre stands at that position

DENSE_HEADS = {"cells": len(CELL_CLASSES), "cell_colour": len(COLOUR_NAMES), "cell_size": len(SIZE_NAMES)}
GLOBAL_HEADS = {"background": len(COLOUR_NAMES), "texture": len(TEXTURES), "style": len(STYLE_CLASSES)}
CLIP_HEADS = {"motion": len(MOTION_CLASSES)}
IMAGE_METRICS = ("objects", "present", "object", "colour", "size", "background", "texture", "style")


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stack(in_channels: int, unshuffle: int, widths: Sequence[int], strides: Sequence[int],
           dilations: Sequence[int] | None = None) -> tuple[nn.Sequential, int]:
    """3x3 conv-BN-ReLU layers; ``unshuffle`` first folds each k x k pixel block into channels (lossless, and
    k*k times cheaper than a full-resolution first layer)."""
    layers: list[nn.Module] = [nn.PixelUnshuffle(unshuffle)] if unshuffle > 1 else []
    cin = in_channels * unshuffle * unshuffle
    for width, stride, dilation in zip(widths, strides, dilations or [1] * len(widths)):
        layers.append(_conv(cin, width, stride, dilation))
        cin = width
    return nn.Sequential(*layers), cin


class ImageDetector(nn.Module):
    """Dense cell heads (object class, colour, size) and pooled global heads (background, texture, style)."""

    def __init__(self, in_channels: int = 3, unshuffle: int = 2, widths: Sequence[int] = (32, 48, 64, 64, 96),
                 strides: Sequence[int] = (1, 2, 1, 1, 1), dilations: Sequence[int] = (1, 1, 1, 2, 4),
                 hidden: int = 64) -> None:
        super().__init__()
        if unshuffle * math.prod(strides) != CELL:
            raise ValueError(f"unshuffle x strides must be the cell size {CELL}, got {unshuffle} x {list(strides)}")
        self.arch = {"in_channels": in_channels, "unshuffle": unshuffle, "widths": list(widths),
                     "strides": list(strides), "dilations": list(dilations), "hidden": hidden}
        self.features, channels = _stack(in_channels, unshuffle, widths, strides, dilations)
        self.dense = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, sum(DENSE_HEADS.values()), 1))
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, n) for name, n in GLOBAL_HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.features(x)
        out = dict(zip(DENSE_HEADS, self.dense(fmap).split(list(DENSE_HEADS.values()), dim=1)))
        pooled = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        out.update({name: head(pooled) for name, head in self.heads.items()})
        return out


class MotionDetector(nn.Module):
    """Strided convolutions over the stacked frames down to an 8x8 map, flattened (where the object went matters)
    and pooled, then the motion head."""

    def __init__(self, in_channels: int = 3 * CLIP_FRAMES, unshuffle: int = 1,
                 widths: Sequence[int] = (32, 48, 64, 64), strides: Sequence[int] = (2, 2, 1, 2), squeeze: int = 16,
                 hidden: int = 128) -> None:
        super().__init__()
        self.arch = {"in_channels": in_channels, "unshuffle": unshuffle, "widths": list(widths),
                     "strides": list(strides), "squeeze": squeeze, "hidden": hidden}
        self.features, channels = _stack(in_channels, unshuffle, widths, strides)
        side = IMAGE_SIZE // unshuffle // math.prod(strides)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, squeeze, 1), nn.ReLU(inplace=True))
        self.spatial = nn.Sequential(nn.Linear(squeeze * side * side, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden + 2 * channels, n) for name, n in CLIP_HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.features(x)
        features = torch.cat([self.spatial(self.squeeze(fmap).flatten(1)), fmap.mean(dim=(2, 3)),
                              fmap.amax(dim=(2, 3))], dim=1)
        return {name: head(features) for name, head in self.heads.items()}


def build_model(kind: str, arch: Mapping[str, Any] | None = None) -> nn.Module:
    if kind == "image":
        return ImageDetector(**(arch or {}))
    if kind == "clip":
        return MotionDetector(**(arch or {}))
    raise ValueError(f"detector kind must be 'image' or 'clip', got {kind!r}")


# ---- targets from ground truth ---------------------------------------------------------------------------------

def on_grid(labels: Labels) -> bool:
    """Whether every object stands within the jitter of its named position."""
    return all(abs(o.center[0] - POSITIONS[o.position][0]) <= ON_GRID
               and abs(o.center[1] - POSITIONS[o.position][1]) <= ON_GRID for o in labels.objects)


def image_targets(labels: Labels) -> dict[str, np.ndarray]:
    """Training targets of one still render (class indices, ``IGNORE`` where unknown): per cell of the 16x16 map
    ``cells`` (0 = empty), ``cell_colour`` and ``cell_size`` (only in an object's own 2x2 or 3x3 cells); per image
    ``background`` (unknown under sepia), ``texture``, ``style``; and, to score decoded objects, ``present``
    (multi-hot) and per position ``slots``/``slot_colour``/``slot_size`` (unknown unless every object stands
    at its position)."""
    cells = np.zeros((GRID, GRID), np.int64)
    cell_colour = np.full((GRID, GRID), IGNORE, np.int64)
    cell_size = np.full((GRID, GRID), IGNORE, np.int64)
    centres = np.arange(GRID) * CELL + CELL / 2
    n_pos = len(POSITION_NAMES)
    present = np.zeros(len(OBJECTS), np.float32)
    slots = np.zeros(n_pos, np.int64)
    slot_colour = np.full(n_pos, IGNORE, np.int64)
    slot_size = np.full(n_pos, IGNORE, np.int64)
    sepia = labels.style == "sepia"
    for o in labels.objects:  # first the ignore bands, so that no band covers another object's cells
        near_x = np.abs(centres - o.center[0]) <= IGNORE_RADIUS
        near_y = np.abs(centres - o.center[1]) <= IGNORE_RADIUS
        cells[np.ix_(near_y, near_x)] = IGNORE
    for o in labels.objects:
        rows = np.abs(centres - o.center[1]) <= POSITIVE_RADIUS
        block = np.ix_(rows, np.abs(centres - o.center[0]) <= POSITIVE_RADIUS)
        cls, size = CELL_CLASSES.index(o.name), SIZE_NAMES.index(o.size)
        colour = COLOUR_NAMES.index(o.colour) if o.colour is not None and not sepia else IGNORE
        cells[block], cell_size[block], cell_colour[block] = cls, size, colour
        present[OBJECTS.index(o.name)] = 1
        p = POSITION_NAMES.index(o.position)
        slots[p], slot_size[p], slot_colour[p] = cls, size, colour
    if not on_grid(labels):
        slots[:] = slot_colour[:] = slot_size[:] = IGNORE
    return {"cells": cells, "cell_colour": cell_colour, "cell_size": cell_size,
            "background": np.int64(IGNORE if sepia else COLOUR_NAMES.index(labels.background)),
            "texture": np.int64(TEXTURES.index(labels.texture)), "style": np.int64(STYLE_CLASSES.index(labels.style)),
            "present": present, "slots": slots, "slot_colour": slot_colour, "slot_size": slot_size}


def clip_targets(labels: Labels) -> dict[str, np.ndarray]:
    if labels.motion is None:
        raise ValueError("clip_targets needs the labels of a clip (motion is None)")
    return {"motion": np.int64(MOTION_CLASSES.index(labels.motion))}


def stack_targets(items: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not (target != IGNORE).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def losses(kind: str, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    """One loss per head. Dense heads: cross-entropy summed over cells (empty cells weighted ``NONE_WEIGHT``)
    per image; global heads: mean cross-entropy, ignoring ``IGNORE``."""
    if kind == "clip":
        return {"motion": _ce(outputs["motion"], targets["motion"])}
    batch = len(targets["cells"])
    out = {}
    for name in DENSE_HEADS:
        target = targets[name]
        per_cell = F.cross_entropy(outputs[name], target, ignore_index=IGNORE, reduction="none")
        if name == "cells":
            per_cell = per_cell * torch.where(target == 0, NONE_WEIGHT, 1.0)
        out[name] = per_cell.sum() / batch
    out.update({name: _ce(outputs[name], targets[name]) for name in GLOBAL_HEADS})
    return out


# ---- decoding -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """One decoded object: where its cell is, what it is, and how sure the detector is."""

    name: str
    colour: str | None
    size: str
    center: tuple[float, float]
    score: float

    @property
    def position(self) -> str:
        return min(POSITION_NAMES, key=lambda p: math.dist(POSITIONS[p], self.center))


def decode_objects(outputs: Mapping[str, torch.Tensor], threshold: float = THRESHOLD) -> list[list[Found]]:
    """Objects per image, strongest first: cells whose object probability passes ``threshold``, taken greedily by
    object score (the log-odds of "some object" against "none", which unlike the probability does not saturate)
    and suppressing every other cell within ``PEAK_WINDOW // 2`` cells of one already taken."""
    logits = outputs["cells"].float()
    probs = F.softmax(logits, dim=1)
    objectness = 1 - probs[:, 0]
    log_odds = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
    classes = probs[:, 1:].argmax(1)
    colours = outputs["cell_colour"].argmax(1)
    sizes = outputs["cell_size"].argmax(1)
    reach = PEAK_WINDOW // 2
    found: list[list[Found]] = []
    for b in range(len(logits)):
        candidates = (objectness[b] > threshold).nonzero().tolist()
        candidates.sort(key=lambda yx: -float(log_odds[b, yx[0], yx[1]]))
        taken: list[tuple[int, int]] = []
        objects = []
        for y, x in candidates:
            if any(abs(y - ty) <= reach and abs(x - tx) <= reach for ty, tx in taken):
                continue
            taken.append((y, x))
            name = OBJECTS[int(classes[b, y, x])]
            colour = None if name in SUBJECTS else COLOUR_NAMES[int(colours[b, y, x])]
            objects.append(Found(name=name, colour=colour, size=SIZE_NAMES[int(sizes[b, y, x])],
                                 center=(x * CELL + CELL / 2, y * CELL + CELL / 2), score=float(objectness[b, y, x])))
        found.append(objects)
    return found


def _slot_arrays(found: Sequence[Sequence[Found]]) -> dict[str, torch.Tensor]:
    """Decoded objects as per-position arrays like the targets (the strongest object wins a position)."""
    n, n_pos = len(found), len(POSITION_NAMES)
    slots = torch.zeros(n, n_pos, dtype=torch.long)
    colour = torch.full((n, n_pos), IGNORE, dtype=torch.long)
    size = torch.full((n, n_pos), IGNORE, dtype=torch.long)
    present = torch.zeros(n, len(OBJECTS))
    for b, objects in enumerate(found):
        for o in reversed(objects):  # weakest first, so the strongest overwrites
            p = POSITION_NAMES.index(o.position)
            slots[b, p] = CELL_CLASSES.index(o.name)
            size[b, p] = SIZE_NAMES.index(o.size)
            colour[b, p] = COLOUR_NAMES.index(o.colour) if o.colour else IGNORE
            present[b, OBJECTS.index(o.name)] = 1
    return {"slots": slots, "slot_colour": colour, "slot_size": size, "present": present}


def correct(kind: str, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
            ) -> dict[str, tuple[int, int]]:
    """(right, counted) per metric. Images: ``objects`` (every position right: nothing missed, nothing extra;
    images whose objects all stand at positions), ``present`` (the set of objects right), ``object`` / ``colour``
    / ``size`` (per object at its position), ``background``, ``texture``, ``style``. Clips: ``motion``."""
    def count(right: torch.Tensor, keep: torch.Tensor) -> tuple[int, int]:
        return int((right & keep).sum()), int(keep.sum())

    if kind == "clip":
        return {"motion": count(outputs["motion"].argmax(-1) == targets["motion"],
                                torch.ones_like(targets["motion"], dtype=torch.bool))}
    pred = _slot_arrays(decode_objects(outputs))
    slots = targets["slots"]
    grid = (slots != IGNORE).all(dim=1)
    occupied = (slots != IGNORE) & (slots != 0)
    out = {"objects": count((pred["slots"] == slots).all(dim=1), grid),
           "present": count((pred["present"] == targets["present"]).all(dim=1), torch.ones_like(grid)),
           "object": count(pred["slots"] == slots, occupied),
           "colour": count(pred["slot_colour"] == targets["slot_colour"],
                           occupied & (targets["slot_colour"] != IGNORE)),
           "size": count(pred["slot_size"] == targets["slot_size"], occupied)}
    for name in GLOBAL_HEADS:
        target = targets[name]
        out[name] = count(outputs[name].argmax(-1) == target, target != IGNORE)
    return out


# ---- inputs -------------------------------------------------------------------------------------------------

def _as_array(image: Any) -> np.ndarray:
    """One image (PIL, HxWx3 uint8 array) as a 64x64x3 uint8 array."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"an image must be HxWx3, got shape {array.shape}")
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        if array.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return array
        pil = Image.fromarray(array)
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(pil)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def clips_to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, 64, 64, 3) -> float (N, T*3, 64, 64) in [-1, 1], frames stacked as channels."""
    n, t = clips.shape[:2]
    return images_to_tensor(clips.reshape(n * t, *clips.shape[2:])).reshape(n, t * 3, IMAGE_SIZE, IMAGE_SIZE)


def _as_clip(frames: Any) -> np.ndarray:
    """A clip (T frames as PIL images or a (T, H, W, 3) array) as 8 evenly spaced 64x64 frames."""
    frames = list(frames)
    if len(frames) < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {len(frames)}")
    pick = np.linspace(0, len(frames) - 1, CLIP_FRAMES).round().astype(int)
    return np.stack([_as_array(frames[i]) for i in pick])


# ---- files ----------------------------------------------------------------------------------------------------

def class_lists(kind: str) -> dict[str, list[str]]:
    if kind == "clip":
        return {"motion": list(MOTION_CLASSES)}
    return {"objects": list(OBJECTS), "positions": list(POSITION_NAMES), "colours": list(COLOUR_NAMES),
            "sizes": list(SIZE_NAMES), "textures": list(TEXTURES), "styles": list(STYLE_CLASSES)}


def save_detector(model: nn.Module, kind: str, folder: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write ``<kind>.safetensors`` (fp32) and ``<kind>.json`` (architecture, classes, ``config``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    save_file(state, str(folder / f"{kind}.safetensors"), metadata={"kind": kind})
    meta = {"kind": kind, "arch": model.arch, "classes": class_lists(kind), **config}
    (folder / f"{kind}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / f"{kind}.safetensors"


def load_detector(kind: str, folder: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Read one detector; its config's class lists must match this code's (else the heads would be misread)."""
    folder = Path(folder)
    config_path, weights_path = folder / f"{kind}.json", folder / f"{kind}.safetensors"
    if not weights_path.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"no {kind} detector in {folder} (expected {weights_path.name} and "
                                f"{config_path.name}); train one with `python -m training.world.train_detectors`")
    config = json.loads(config_path.read_text())
    if config.get("classes") != class_lists(kind):
        raise ValueError(f"{config_path}: its classes differ from this version of the world; retrain the detectors")
    model = build_model(kind, config["arch"])
    tensors = load_file(str(weights_path))
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"{weights_path}: tensors differ from the architecture in {config_path.name} "
                         f"(missing {missing}, unexpected {unexpected})")
    model.load_state_dict(tensors, strict=False)
    return model.eval(), config


# ---- the detectors ------------------------------------------------------------------------------------------

@dataclass
class Detectors:
    """The image detector and (optionally) the clip motion detector, ready for inference."""

    image: nn.Module
    clip: nn.Module | None = None
    config: dict[str, Any] | None = None
    batch_size: int = 256

    @torch.inference_mode()
    def _image_outputs(self, array: np.ndarray) -> list[dict[str, torch.Tensor]]:
        return [self.image(images_to_tensor(array[s:s + self.batch_size]))
                for s in range(0, len(array), self.batch_size)]

    def detect(self, images: Sequence[Any] | np.ndarray) -> list[Labels]:
        """What is in each image: objects (name, colour, size, nearest position, cell centre), background,
        texture, style."""
        if not len(images):
            return []
        array = np.stack([_as_array(im) for im in images])
        out = []
        for outputs in self._image_outputs(array):
            found = decode_objects(outputs)
            glob = {name: F.softmax(outputs[name], dim=-1).numpy() for name in GLOBAL_HEADS}
            for i, objects in enumerate(found):
                out.append(_labels(objects, {k: v[i] for k, v in glob.items()}))
        return out

    @torch.inference_mode()
    def detect_clips(self, clips: Sequence[Any]) -> list[Labels]:
        """Each clip's motion, with its objects and background as seen in most of its frames (an object's
        ``center`` and ``position`` are those of the first frame it was seen in)."""
        if self.clip is None:
            raise ValueError("these detectors have no clip (motion) detector")
        out = []
        for frames in clips:
            array = _as_clip(frames)
            motion = F.softmax(self.clip(clips_to_tensor(array[None]))["motion"], dim=-1)[0].numpy()
            per_frame = self.detect(array)
            out.append(_clip_labels(per_frame, motion))
        return out

    def detect_clip(self, frames: Any) -> Labels:
        return self.detect_clips([frames])[0]


def _labels(objects: Sequence[Found], glob: Mapping[str, np.ndarray]) -> Labels:
    style = STYLE_CLASSES[int(glob["style"].argmax())]
    scores = {name: float(glob[name].max()) for name in GLOBAL_HEADS}
    labels = []
    for o in objects:
        colour = None if style == "sepia" else o.colour
        labels.append(ObjectLabel(name=o.name, colour=colour, size=o.size, position=o.position, center=o.center))
        scores.setdefault(f"object:{o.name}", o.score)
    return Labels(objects=tuple(labels), background=COLOUR_NAMES[int(glob["background"].argmax())],
                  texture=TEXTURES[int(glob["texture"].argmax())], style=style, scores=scores)


def _majority(values: Sequence[Any]) -> Any:
    return max(dict.fromkeys(values), key=list(values).count)


def _clip_labels(frames: Sequence[Labels], motion: np.ndarray) -> Labels:
    names = [o.name for f in frames for o in f.objects]
    objects = []
    for name in dict.fromkeys(names):
        seen = [o for f in frames for o in f.objects if o.name == name]
        if len(seen) * 2 < len(frames):
            continue
        objects.append(ObjectLabel(name=name, colour=_majority([o.colour for o in seen]),
                                   size=_majority([o.size for o in seen]), position=seen[0].position,
                                   center=seen[0].center))
    scores = {"motion": float(motion.max())}
    return Labels(objects=tuple(objects), background=_majority([f.background for f in frames]),
                  texture=_majority([f.texture for f in frames]), style=_majority([f.style for f in frames]),
                  motion=MOTION_CLASSES[int(motion.argmax())], scores=scores)


def load_detectors(folder: str | os.PathLike[str] | None = None, clip: bool = True) -> Detectors:
    """The detectors in ``folder`` (default: the shipped ones, loaded once); ``clip=False`` skips the motion
    detector."""
    if folder is None:
        return _shipped(clip)
    image, config = load_detector("image", folder)
    clip_model = load_detector("clip", folder)[0] if clip else None
    return Detectors(image=image, clip=clip_model, config=config)


@functools.lru_cache(maxsize=2)
def _shipped(clip: bool) -> Detectors:
    return load_detectors(WEIGHTS_DIR, clip=clip)


def detect(images: Sequence[Any] | np.ndarray) -> list[Labels]:
    """``Detectors.detect`` with the shipped detectors."""
    return load_detectors().detect(images)


def detect_clip(frames: Any) -> Labels:
    """``Detectors.detect_clip`` with the shipped detectors."""
    return load_detectors().detect_clip(frames)
