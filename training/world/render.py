"""Drawing the shapes world with numpy and PIL, exactly reproducible on any machine.

Every object is drawn 4x supersampled as binary masks (PIL, integer rasterization), then box-reduced to the
64x64 frame as integer coverage (0..4080 = 16 samples x 255), which anti-aliases its edges. Compositing, the
background textures and the styles use integer arithmetic only, so a scene gives the same bytes everywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from training.world.concepts import COLOURS, IMAGE_SIZE, SHAPES, STYLE_CLASSES, SUBJECTS, TEXTURES

SS = 4  # supersampling factor
FULL = 16 * 255  # coverage of a fully covered pixel
TEXTURE_PERIOD = 8  # pixels, for dots and checkers (and the phase)
STRIPE_PERIOD = 12  # pixels along x; not 8, which the pixelated style would turn into a checkerboard
OUTLINE_WIDTH = 5  # supersampled pixels (1.25 px)
PIXEL_BLOCK = 4
SEPIA_DARK = np.array((50, 32, 20), dtype=np.int64)
SEPIA_LIGHT = np.array((250, 234, 200), dtype=np.int64)

Op = tuple  # ("ellipse", (cx, cy, rx, ry), value) | ("rect", (x0, y0, x1, y1), value) | ("polygon", points, value)
Part = tuple[tuple[int, int, int], tuple[Op, ...]]  # colour, drawing ops in unit coordinates (radius 1)


def _regular(count: int, radii: Sequence[float], start_deg: float = -90.0) -> tuple[tuple[float, float], ...]:
    """Vertices of a regular (star) polygon, rounded so every platform's libm gives the same points."""
    points = []
    for i in range(count):
        angle = math.radians(start_deg + 360.0 * i / count)
        r = radii[i % len(radii)]
        points.append((round(r * math.cos(angle), 4), round(r * math.sin(angle), 4)))
    return tuple(points)


SHAPE_OPS: dict[str, tuple[Op, ...]] = {
    "circle": (("ellipse", (0.0, 0.0, 1.0, 1.0), 255),),
    "square": (("rect", (-0.82, -0.82, 0.82, 0.82), 255),),
    "triangle": (("polygon", ((0.0, -0.98), (1.0, 0.76), (-1.0, 0.76)), 255),),
    "star": (("polygon", _regular(10, (1.0, 0.45)), 255),),
    "heart": (("ellipse", (-0.45, -0.3, 0.52, 0.52), 255), ("ellipse", (0.45, -0.3, 0.52, 0.52), 255),
              ("polygon", ((-0.95, -0.14), (0.95, -0.14), (0.0, 0.98)), 255)),
    "diamond": (("polygon", ((0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)), 255),),
    "hexagon": (("polygon", _regular(6, (1.0,), start_deg=0.0), 255),),
    "cross": (("rect", (-0.3, -0.95, 0.3, 0.95), 255), ("rect", (-0.95, -0.3, 0.95, 0.3), 255)),
    "ring": (("ellipse", (0.0, 0.0, 1.0, 1.0), 255), ("ellipse", (0.0, 0.0, 0.5, 0.5), 0)),
}

SUBJECT_PARTS: dict[str, tuple[Part, ...]] = {
    "robot": (
        ((95, 100, 110), (("rect", (-0.07, -0.95, 0.07, -0.5), 255),)),
        ((230, 45, 45), (("ellipse", (0.0, -0.86, 0.17, 0.17), 255),)),
        ((175, 180, 190), (("rect", (-0.72, -0.55, 0.72, 0.85), 255),)),
        ((0, 200, 235), (("ellipse", (-0.32, 0.0, 0.18, 0.18), 255), ("ellipse", (0.32, 0.0, 0.18, 0.18), 255))),
        ((55, 60, 70), (("rect", (-0.38, 0.45, 0.38, 0.62), 255),)),
    ),
    "tree": (
        ((125, 80, 40), (("rect", (-0.17, 0.15, 0.17, 1.0), 255),)),
        ((35, 125, 55), (("ellipse", (0.0, -0.35, 0.62, 0.6), 255), ("ellipse", (-0.42, 0.0, 0.45, 0.4), 255),
                         ("ellipse", (0.42, 0.0, 0.45, 0.4), 255))),
    ),
    "house": (
        ((235, 215, 170), (("rect", (-0.7, -0.15, 0.7, 0.9), 255),)),
        ((150, 45, 40), (("polygon", ((-0.95, -0.1), (0.95, -0.1), (0.0, -0.95)), 255),)),
        ((110, 70, 35), (("rect", (-0.45, 0.3, -0.12, 0.9), 255),)),
        ((150, 210, 240), (("rect", (0.15, 0.15, 0.5, 0.5), 255),)),
    ),
    "fish": (
        ((215, 85, 20), (("polygon", ((0.3, 0.0), (1.0, -0.55), (1.0, 0.55)), 255),
                         ("polygon", ((-0.4, -0.38), (0.2, -0.38), (0.05, -0.72)), 255))),
        ((255, 130, 35), (("ellipse", (-0.2, 0.0, 0.72, 0.48), 255),)),
        ((250, 250, 250), (("ellipse", (-0.55, -0.08, 0.15, 0.15), 255),)),
        ((20, 20, 20), (("ellipse", (-0.58, -0.08, 0.075, 0.075), 255),)),
    ),
}
SUBJECT_KEY_PARTS = {"robot": (2,), "tree": (1,), "house": (0, 1), "fish": (1,)}  # parts that must stand out


@dataclass(frozen=True)
class Placement:
    """An object to draw: ``center`` (x, y) and ``radius`` in pixels of the 64x64 frame."""

    name: str
    colour: str | None
    center: tuple[float, float]
    radius: float


def parts_of(name: str, colour: str | None) -> tuple[Part, ...]:
    """The coloured parts of an object: one part for a shape (in ``colour``), several for a subject."""
    if name in SHAPE_OPS:
        if colour not in COLOURS:
            raise ValueError(f"shape {name!r} needs a colour from {', '.join(COLOURS)}, got {colour!r}")
        return ((COLOURS[colour], SHAPE_OPS[name]),)
    if name in SUBJECT_PARTS:
        return SUBJECT_PARTS[name]
    raise ValueError(f"unknown object {name!r}; known: {', '.join(SHAPES + SUBJECTS)}")


def key_colours(name: str, colour: str | None) -> list[tuple[int, int, int]]:
    """The colours of an object that must contrast with the background for it to be seen."""
    if name in SUBJECT_PARTS:
        return [SUBJECT_PARTS[name][i][0] for i in SUBJECT_KEY_PARTS[name]]
    return [COLOURS[colour]]


def luminance(rgb: Sequence[int]) -> float:
    return (299 * rgb[0] + 587 * rgb[1] + 114 * rgb[2]) / 1000


def _draw_op(draw: ImageDraw.ImageDraw, op: Op, cx: float, cy: float, r: float) -> None:
    kind, geometry, value = op
    if kind == "ellipse":
        ex, ey, rx, ry = geometry
        draw.ellipse((cx + (ex - rx) * r, cy + (ey - ry) * r, cx + (ex + rx) * r, cy + (ey + ry) * r), fill=value)
    elif kind == "rect":
        x0, y0, x1, y1 = geometry
        draw.rectangle((cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r), fill=value)
    elif kind == "polygon":
        draw.polygon([(cx + x * r, cy + y * r) for x, y in geometry], fill=value)
    else:
        raise ValueError(f"unknown drawing op {kind!r}")


def part_mask(ops: Sequence[Op], center: tuple[float, float], radius: float) -> np.ndarray:
    """A binary (0/255) uint8 mask of one part, supersampled (256x256 for a 64x64 frame)."""
    canvas = Image.new("L", (IMAGE_SIZE * SS, IMAGE_SIZE * SS), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = center[0] * SS, center[1] * SS, radius * SS
    for op in ops:
        _draw_op(draw, op, cx, cy, r)
    return np.asarray(canvas)


def reduce(mask: np.ndarray) -> np.ndarray:
    """Box-reduce a supersampled uint8 mask (H*SS, W*SS) to integer coverage sums (H, W) as int64."""
    h, w = mask.shape[0] // SS, mask.shape[1] // SS
    rows = mask.reshape(h, SS, w * SS).sum(axis=1, dtype=np.uint16)
    return rows.reshape(h, w, SS).sum(axis=2, dtype=np.int64)


def erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion by a (2*width+1)^2 square, the outside counting as empty."""
    out = mask.copy()
    for axis in (0, 1):
        source = out.copy()
        for shift in range(1, width + 1):
            ahead = np.zeros_like(source)
            behind = np.zeros_like(source)
            if axis == 0:
                ahead[:-shift] = source[shift:]
                behind[shift:] = source[:-shift]
            else:
                ahead[:, :-shift] = source[:, shift:]
                behind[:, shift:] = source[:, :-shift]
            np.minimum(out, ahead, out=out)
            np.minimum(out, behind, out=out)
    return out


def texture_tone(colour: str) -> np.ndarray:
    """The second tone of a textured background: lighter for a dark colour, darker for a light one."""
    rgb = np.array(COLOURS[colour], dtype=np.int64)
    if luminance(COLOURS[colour]) < 140:
        return rgb + (255 - rgb) * 2 // 5
    return rgb * 3 // 5


def background(colour: str, texture: str, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The background as an int64 (64, 64, 3) array; ``phase`` shifts the pattern by whole pixels."""
    return _background(colour, texture, (phase[0] % TEXTURE_PERIOD, phase[1] % TEXTURE_PERIOD)).copy()


@functools.lru_cache(maxsize=4096)
def _background(colour: str, texture: str, phase: tuple[int, int]) -> np.ndarray:
    if colour not in COLOURS:
        raise ValueError(f"unknown background colour {colour!r}; known: {', '.join(COLOURS)}")
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    base = np.array(COLOURS[colour], dtype=np.int64)
    tone = texture_tone(colour)
    n = IMAGE_SIZE
    if texture == "plain":
        return np.broadcast_to(base, (n, n, 3)).copy()
    if texture == "gradient":
        y = np.arange(n, dtype=np.int64)[:, None, None]
        row = (base * (n - 1 - y) + tone * y + (n - 1) // 2) // (n - 1)
        return np.broadcast_to(row, (n, n, 3)).copy()
    ys, xs = np.mgrid[: n * SS, : n * SS]
    px, py = phase[0] * SS, phase[1] * SS
    period = TEXTURE_PERIOD * SS
    if texture == "striped":
        stripe = STRIPE_PERIOD * SS
        pattern = ((xs + ys + px) % stripe) < stripe // 2
    elif texture == "checkered":
        pattern = (((xs + px) // (period // 2)) + ((ys + py) // (period // 2))) % 2 == 1
    else:  # dotted: a dot of radius 1.6 px in every period x period cell
        dx = (xs + px) % period - period // 2
        dy = (ys + py) % period - period // 2
        pattern = dx * dx + dy * dy <= (16 * SS * SS * 16) // 100  # (1.6 * SS)^2, in integers
    weight = reduce(pattern.astype(np.uint8))[..., None]  # 0..16 covered samples
    return (base * (16 - weight) + tone * weight + 8) // 16


def _composite(image: np.ndarray, rgb: Sequence[int], coverage: np.ndarray) -> np.ndarray:
    colour = np.array(rgb, dtype=np.int64)
    a = coverage[..., None]
    return (image * (FULL - a) + colour * a + FULL // 2) // FULL


def apply_style(image: np.ndarray, style: str) -> np.ndarray:
    """Image-level styles on an int64 (H, W, 3) array (``outline`` acts while drawing, see ``render_frame``)."""
    if style not in STYLE_CLASSES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLE_CLASSES)}")
    if style == "pixelated":
        h, w = image.shape[0] // PIXEL_BLOCK, image.shape[1] // PIXEL_BLOCK
        blocks = image.reshape(h, PIXEL_BLOCK, w, PIXEL_BLOCK, 3).sum(axis=(1, 3))
        area = PIXEL_BLOCK * PIXEL_BLOCK
        blocks = (blocks + area // 2) // area
        return np.repeat(np.repeat(blocks, PIXEL_BLOCK, axis=0), PIXEL_BLOCK, axis=1)
    if style == "sepia":
        lum = (299 * image[..., 0] + 587 * image[..., 1] + 114 * image[..., 2] + 500) // 1000
        return (SEPIA_DARK * (255 - lum[..., None]) + SEPIA_LIGHT * lum[..., None] + 127) // 255
    return image


def render_frame(bg_colour: str, texture: str, objects: Sequence[Placement], style: str = "none",
                 phase: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """One 64x64 frame: (RGB uint8 (64, 64, 3), object coverage masks uint8 (len(objects), 64, 64)).

    The masks are each object's filled area (also under the outline style), in 0..255 coverage.
    """
    image = background(bg_colour, texture, phase)
    masks = np.zeros((len(objects), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for index, obj in enumerate(objects):
        union = None
        for rgb, ops in parts_of(obj.name, obj.colour):
            mask = part_mask(ops, obj.center, obj.radius)
            union = mask if union is None else np.maximum(union, mask)
            drawn = mask - erode(mask, OUTLINE_WIDTH) if style == "outline" else mask
            image = _composite(image, rgb, reduce(drawn))
        masks[index] = (reduce(union) + 8) // 16
    image = apply_style(image, style)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def bbox(mask: np.ndarray, threshold: int = 64) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive, of the pixels whose coverage reaches ``threshold``; None when empty."""
    ys, xs = np.nonzero(mask >= threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
