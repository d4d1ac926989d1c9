"""The vocabulary of the shapes world: held-in and held-out concepts, and the label types of a render.

Held-in concepts are what a base model is trained on: nine shapes, eight colours, two sizes, five positions,
five background textures and four linear motions. Held-out concepts never appear in base training data: four
subjects (fixed multi-part sprites with their own colours), three styles and three motions. They are what
customization methods learn from a handful of renders and what the benchmark measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

IMAGE_SIZE = 64
CLIP_FRAMES = 8

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross", "ring")
SUBJECTS = ("robot", "tree", "house", "fish")
OBJECTS = SHAPES + SUBJECTS  # everything that can stand in a scene, in detector class order

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "orange": (245, 140, 30),
    "yellow": (250, 215, 45),
    "green": (50, 170, 70),
    "blue": (40, 90, 215),
    "purple": (135, 70, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = ("plain", "striped", "dotted", "checkered", "gradient")
SIZES: dict[str, float] = {"small": 8.0, "big": 12.0}  # nominal radius in pixels
SIZE_NAMES = tuple(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {  # nominal centre (x, y) in pixels
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "center": (32.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
}
POSITION_NAMES = tuple(POSITIONS)
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "center": "in the center",
                    "top": "at the top", "bottom": "at the bottom"}
PAIRS = (("left", "right"), ("top", "bottom"))  # the positions two objects may take together

STYLES = ("outline", "pixelated", "sepia")
STYLE_CLASSES = ("none",) + STYLES
BASE_MOTIONS = ("left", "right", "up", "down")  # linear moves: the motion is its direction
HELD_OUT_MOTIONS = ("zigzag", "orbit", "bounce")
MOTION_CLASSES = ("still",) + BASE_MOTIONS + HELD_OUT_MOTIONS


@dataclass(frozen=True)
class Concept:
    """One entry of the registry: ``kind`` is shape, subject, style or motion."""

    name: str
    kind: str
    held_out: bool
    description: str


_DESCRIPTIONS = {
    "robot": "a grey square head with two cyan eyes, a mouth and an antenna with a red tip",
    "tree": "a brown trunk under a round dark-green crown",
    "house": "a cream wall under a dark-red roof, with a brown door and a light-blue window",
    "fish": "an orange oval body with a tail fin and a white eye",
    "outline": "every object drawn as a coloured outline, its inside showing the background",
    "pixelated": "the whole image in 4x4-pixel blocks",
    "sepia": "a brown-to-cream duotone palette: colour gone, brightness kept",
    "zigzag": "moves sideways while jumping up and down every frame",
    "orbit": "goes once around the centre of the image",
    "bounce": "bounces twice on a floor without moving sideways",
}

CONCEPTS: dict[str, Concept] = {}
for _name in SHAPES:
    CONCEPTS[_name] = Concept(_name, "shape", False, f"a {_name} in one of the colours")
for _name in SUBJECTS:
    CONCEPTS[_name] = Concept(_name, "subject", True, _DESCRIPTIONS[_name])
for _name in STYLES:
    CONCEPTS[_name] = Concept(_name, "style", True, _DESCRIPTIONS[_name])
for _name in BASE_MOTIONS:
    CONCEPTS[f"move-{_name}"] = Concept(f"move-{_name}", "motion", False, f"moves in a straight line {_name}")
for _name in HELD_OUT_MOTIONS:
    CONCEPTS[_name] = Concept(_name, "motion", True, _DESCRIPTIONS[_name])


def concept(name: str) -> Concept:
    """The registry entry ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(CONCEPTS)}") from None


def held_out_concepts(kind: str | None = None) -> list[Concept]:
    return [c for c in CONCEPTS.values() if c.held_out and (kind is None or c.kind == kind)]


def held_in_concepts(kind: str | None = None) -> list[Concept]:
    return [c for c in CONCEPTS.values() if not c.held_out and (kind is None or c.kind == kind)]


def held_out_words() -> frozenset[str]:
    """Words that must never occur in a base-model caption: the held-out concept names."""
    return frozenset(c.name for c in held_out_concepts())


@dataclass(frozen=True)
class ObjectLabel:
    """One object of a scene. ``colour`` is None for a subject (its colours are fixed); ``center`` and ``bbox``
    (x0, y0, x1, y1, exclusive, in pixels) are those of the first frame for a clip; a detector leaves ``radius``
    and ``bbox`` None and reports the nominal centre of the position it found."""

    name: str
    colour: str | None
    size: str
    position: str
    center: tuple[float, float]
    radius: float | None = None  # None: the nominal radius of ``size``
    bbox: tuple[int, int, int, int] | None = None

    @property
    def kind(self) -> str:
        return "subject" if self.name in SUBJECTS else "shape"


@dataclass(frozen=True)
class Labels:
    """Ground truth of one render (or what a detector saw in one image or clip).

    ``motion`` is None for a still image, else one of ``MOTION_CLASSES``; ``direction`` qualifies it (left/right
    for a linear or zigzag move, cw/ccw for an orbit, None otherwise). ``path`` lists the first object's centre in
    every frame of a clip. ``texture_phase`` shifts the background pattern (whole pixels). ``scores`` holds a
    detector's confidences (probabilities) by head.
    """

    objects: tuple[ObjectLabel, ...]
    background: str
    texture: str
    style: str = "none"
    motion: str | None = None
    direction: str | None = None
    path: tuple[tuple[float, float], ...] | None = None
    texture_phase: tuple[int, int] = (0, 0)
    scores: Mapping[str, float] = field(default_factory=dict, compare=False)

    def concepts(self) -> set[str]:
        """Every registry concept present: object names, the style and the held-out motion."""
        found = {o.name for o in self.objects}
        if self.style != "none":
            found.add(self.style)
        if self.motion in HELD_OUT_MOTIONS:
            found.add(self.motion)
        elif self.motion in BASE_MOTIONS:
            found.add(f"move-{self.motion}")
        return found

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = dict(self.scores)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Labels:
        objects = tuple(
            ObjectLabel(name=o["name"], colour=o.get("colour"), size=o["size"], position=o["position"],
                        center=tuple(o["center"]), radius=o.get("radius"),
                        bbox=tuple(o["bbox"]) if o.get("bbox") is not None else None)
            for o in data["objects"])
        path = tuple(tuple(p) for p in data["path"]) if data.get("path") is not None else None
        return cls(objects=objects, background=data["background"], texture=data["texture"],
                   style=data.get("style", "none"), motion=data.get("motion"), direction=data.get("direction"),
                   path=path, texture_phase=tuple(data.get("texture_phase", (0, 0))),
                   scores=dict(data.get("scores") or {}))
