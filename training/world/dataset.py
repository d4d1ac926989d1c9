"""Seeded scenes and datasets of the shapes world.

Item ``i`` of a dataset is drawn from ``numpy.random.default_rng([seed, stream, i])`` (PCG64 seeded through
SeedSequence), where ``stream`` is a fixed number per kind of dataset, so the same (seed, index) gives the same
scene, caption and pixels on any machine, and items can be rendered lazily, in any order, in any process.

Datasets:
  - ``base_dataset`` / ``base_clip_dataset``: held-in concepts only, what a base model is trained on;
  - ``concept_dataset(name)``: renders of one held-out concept (a subject with a trigger word, a style or a
    motion captioned without one, as adapters of those kinds are trained);
  - ``detector_dataset``: every concept mixed, for training and measuring the detectors.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from training.world.captions import caption
from training.world.clips import motion_path
from training.world.concepts import (
    BASE_MOTIONS,
    COLOUR_NAMES,
    COLOURS,
    IMAGE_SIZE,
    MOTION_CLASSES,
    OBJECTS,
    PAIRS,
    POSITION_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLE_CLASSES,
    SUBJECTS,
    TEXTURES,
    Labels,
    ObjectLabel,
    concept,
)
from training.world.render import Placement, bbox, key_colours, luminance, render_frame

JITTER = 2.5  # pixels around the nominal position
SIZE_JITTER = (0.92, 1.08)
MIN_CONTRAST = 90.0  # RGB distance between an object's key colours and the background colour
MIN_SEPIA_CONTRAST = 40.0  # luminance difference, for the sepia style where only brightness is left
MAX_TRIES = 100


@dataclass(frozen=True)
class SceneRules:
    """What a dataset's scenes may contain.

    ``motions`` empty: still images; otherwise clips, one object moving by one of ``motions``. ``two_objects``:
    probability of a second object (images only). ``anywhere``: probability that a single object stands at a
    random place instead of one of the five positions (detector training only; its label is the nearest position).
    """

    objects: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOUR_NAMES
    backgrounds: tuple[str, ...] = COLOUR_NAMES
    textures: tuple[str, ...] = TEXTURES
    styles: tuple[str, ...] = ("none",)
    style_weights: tuple[float, ...] | None = None
    motions: tuple[str, ...] = ()
    two_objects: float = 0.35
    anywhere: float = 0.0

    def __post_init__(self) -> None:
        for name, values, known in (("objects", self.objects, OBJECTS), ("colours", self.colours, COLOUR_NAMES),
                                    ("backgrounds", self.backgrounds, COLOUR_NAMES),
                                    ("textures", self.textures, TEXTURES), ("styles", self.styles, STYLE_CLASSES),
                                    ("motions", self.motions, MOTION_CLASSES)):
            unknown = [v for v in values if v not in known]
            if unknown or (not values and name != "motions"):
                raise ValueError(f"SceneRules.{name}: unknown or empty {unknown or values}; known: {', '.join(known)}")
        if self.style_weights is not None and len(self.style_weights) != len(self.styles):
            raise ValueError("SceneRules.style_weights needs one weight per style")

    @property
    def clips(self) -> bool:
        return bool(self.motions)


@dataclass(frozen=True)
class Sample:
    """One render: ``pixels`` is (64, 64, 3) uint8 for an image or (8, 64, 64, 3) for a clip; ``masks`` the objects'
    coverage (n, 64, 64) or (8, n, 64, 64), 0..255."""

    index: int
    pixels: np.ndarray
    caption: str
    labels: Labels
    masks: np.ndarray = field(repr=False)

    @property
    def is_clip(self) -> bool:
        return self.pixels.ndim == 4

    @property
    def image(self) -> Image.Image:
        """The image (the first frame of a clip) as PIL."""
        return Image.fromarray(self.pixels[0] if self.is_clip else self.pixels)

    @property
    def frames(self) -> list[Image.Image]:
        return [Image.fromarray(f) for f in self.pixels] if self.is_clip else [self.image]


def stream_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def item_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, stream_id(stream), index])


def _q(value: float) -> float:
    return round(value * 4) / 4


def nearest_position(center: tuple[float, float]) -> str:
    return min(POSITION_NAMES, key=lambda p: math.dist(POSITIONS[p], center))


def contrasts(obj: ObjectLabel, bg_colour: str, style: str) -> bool:
    """Whether ``obj`` stands out from a ``bg_colour`` background (also in sepia, where only brightness is left)."""
    bg = COLOURS[bg_colour]
    for key in key_colours(obj.name, obj.colour):
        if math.dist(key, bg) < MIN_CONTRAST:
            return False
        if style == "sepia" and abs(luminance(key) - luminance(bg)) < MIN_SEPIA_CONTRAST:
            return False
    return True


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def _object(rng: np.random.Generator, rules: SceneRules, position: str | None) -> ObjectLabel:
    name = _pick(rng, rules.objects)
    colour = _pick(rng, rules.colours) if name not in SUBJECTS else None
    size = _pick(rng, tuple(SIZES))
    radius = _q(SIZES[size] * rng.uniform(*SIZE_JITTER))
    if position is None:  # anywhere in the frame
        low, high = radius + 1, IMAGE_SIZE - 1 - radius
        center = (_q(rng.uniform(low, high)), _q(rng.uniform(low, high)))
        position = nearest_position(center)
    else:
        nx, ny = POSITIONS[position]
        center = (_q(nx + rng.uniform(-JITTER, JITTER)), _q(ny + rng.uniform(-JITTER, JITTER)))
    return ObjectLabel(name=name, colour=colour, size=size, position=position, center=center, radius=radius)


def sample_labels(rules: SceneRules, rng: np.random.Generator) -> Labels:
    """Draw a scene (without boxes; rendering adds them) that follows ``rules``."""
    weights = None
    if rules.style_weights is not None:
        weights = np.asarray(rules.style_weights, dtype=np.float64) / sum(rules.style_weights)
    style = rules.styles[int(rng.choice(len(rules.styles), p=weights))]
    motion = _pick(rng, rules.motions) if rules.clips else None
    for _ in range(MAX_TRIES):
        if motion is not None:
            path, direction = motion_path(motion, rng)
            obj = _object(rng, rules, "center")
            objects = (replace(obj, center=path[0], position=nearest_position(path[0])),)
        else:
            path = direction = None
            if rng.random() < rules.two_objects:
                pair = PAIRS[int(rng.integers(len(PAIRS)))]
                first = int(rng.integers(2))
                objects = (_object(rng, rules, pair[first]), _object(rng, rules, pair[1 - first]))
            else:
                anywhere = rng.random() < rules.anywhere
                objects = (_object(rng, rules, None if anywhere else _pick(rng, POSITION_NAMES)),)
        backgrounds = [b for b in rules.backgrounds if all(contrasts(o, b, style) for o in objects)]
        if backgrounds:
            break
    else:
        raise ValueError(f"no background of {rules.backgrounds} stands out from the objects of {rules.objects} "
                         f"in style {style!r}")
    phase = (int(rng.integers(8)), int(rng.integers(8)))
    return Labels(objects=objects, background=_pick(rng, backgrounds), texture=_pick(rng, rules.textures),
                  style=style, motion=motion, direction=direction, path=path, texture_phase=phase)


def render_labels(labels: Labels) -> tuple[np.ndarray, np.ndarray, Labels]:
    """Render ``labels``: (pixels, masks, labels with every object's box filled in).

    A clip (``labels.path`` set) moves its first object along the path; objects without a radius get the
    nominal radius of their size, so a parsed caption renders too.
    """
    placements = [Placement(o.name, o.colour, o.center, o.radius or SIZES[o.size]) for o in labels.objects]
    if labels.path is None:
        image, masks = render_frame(labels.background, labels.texture, placements, labels.style, labels.texture_phase)
        boxes = [bbox(m) for m in masks]
        pixels = image
    else:
        frames, frame_masks = [], []
        for center in labels.path:
            moved = [replace(placements[0], center=center)] + placements[1:]
            image, masks = render_frame(labels.background, labels.texture, moved, labels.style, labels.texture_phase)
            frames.append(image)
            frame_masks.append(masks)
        pixels, masks = np.stack(frames), np.stack(frame_masks)
        boxes = [bbox(m) for m in masks[0]]
    objects = tuple(replace(o, bbox=b) for o, b in zip(labels.objects, boxes))
    return pixels, masks, replace(labels, objects=objects)


class WorldDataset(Sequence[Sample]):
    """``count`` lazily rendered samples of ``rules``, item ``i`` drawn from (``seed``, ``stream``, ``i``).

    ``trigger``, ``name_motion`` and ``style_word`` shape the captions (see ``captions.caption``).
    """

    def __init__(self, rules: SceneRules, count: int, seed: int = 0, stream: str = "custom",
                 trigger: str | None = None, name_motion: bool = True, style_word: str | None = None) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.rules, self.count, self.seed, self.stream = rules, count, seed, stream
        self.trigger, self.name_motion, self.style_word = trigger, name_motion, style_word

    def __len__(self) -> int:
        return self.count

    def labels(self, index: int) -> Labels:
        """The scene of item ``index`` without rendering it (no boxes)."""
        return sample_labels(self.rules, item_rng(self.seed, self.stream, self._check(index)))

    def caption(self, labels: Labels) -> str:
        return caption(labels, trigger=self.trigger, name_motion=self.name_motion, style_word=self.style_word)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("WorldDataset does not slice; iterate over range(...) instead")
        labels = self.labels(index)
        pixels, masks, labels = render_labels(labels)
        return Sample(index=index, pixels=pixels, caption=self.caption(labels), labels=labels, masks=masks)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(self.count))

    def _check(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for a dataset of {self.count}")
        return index


BASE_RULES = SceneRules()
BASE_CLIP_RULES = SceneRules(motions=BASE_MOTIONS)
DETECTOR_RULES = SceneRules(objects=OBJECTS, styles=STYLE_CLASSES, style_weights=(0.4, 0.2, 0.2, 0.2),
                            two_objects=0.45, anywhere=0.1)
DETECTOR_CLIP_RULES = SceneRules(objects=OBJECTS, motions=MOTION_CLASSES)


def base_dataset(count: int, seed: int = 0) -> WorldDataset:
    """Still images of held-in concepts only: the base text-to-image training set."""
    return WorldDataset(BASE_RULES, count, seed, stream="base")


def base_clip_dataset(count: int, seed: int = 0) -> WorldDataset:
    """Clips of held-in shapes making the four straight moves: the base video training set."""
    return WorldDataset(BASE_CLIP_RULES, count, seed, stream="base-clips")


def concept_rules(name: str, clips: bool | None = None) -> SceneRules:
    """The scenes of a held-out concept's dataset: a subject alone, held-in scenes in a style, or held-in shapes
    making a held-out motion (always clips). ``clips`` makes a subject or style move by the base motions."""
    entry = concept(name)
    if not entry.held_out:
        raise ValueError(f"{name!r} is a held-in concept; concept datasets exist for held-out ones only")
    if entry.kind == "motion":
        if clips is False:
            raise ValueError(f"{name!r} is a motion: its dataset is made of clips")
        return SceneRules(motions=(name,))
    motions = BASE_MOTIONS if clips else ()
    if entry.kind == "subject":
        return SceneRules(objects=(name,), two_objects=0.0, motions=motions)
    return SceneRules(styles=(name,), motions=motions)


def concept_dataset(name: str, count: int, seed: int = 0, trigger: str | None = None,
                    clips: bool | None = None) -> WorldDataset:
    """``count`` renders of held-out concept ``name`` with captions for adapter training.

    A subject is captioned with a trigger word before its name (default ``sks``): "a big sks robot on the left on
    a blue plain background". A style or a motion is captioned by the content only, unless ``trigger`` is given
    (then ", in TRIGGER style" or "moving TRIGGER").
    """
    rules = concept_rules(name, clips)
    kind = concept(name).kind
    stream = f"concept:{name}" + (":clips" if rules.clips else "")
    if kind == "subject":
        return WorldDataset(rules, count, seed, stream, trigger=trigger or "sks")
    if kind == "style":
        return WorldDataset(rules, count, seed, stream, style_word=trigger)
    return WorldDataset(rules, count, seed, stream, trigger=trigger, name_motion=False)


def detector_dataset(count: int, seed: int, clips: bool = False) -> WorldDataset:
    """Every concept mixed (held-in and held-out, every style; clips: every motion and ``still``)."""
    if clips:
        return WorldDataset(DETECTOR_CLIP_RULES, count, seed, stream="detector-clips")
    return WorldDataset(DETECTOR_RULES, count, seed, stream="detector")
