"""Motion paths of 8-frame clips: where the object's centre is in every frame.

Base motions are straight moves (left, right, up, down) of 18-24 px over the clip. Held-out motions: ``zigzag``
(a sideways move while jumping 10 px up or down every frame), ``orbit`` (one full turn around the image centre,
clockwise or counter-clockwise on screen) and ``bounce`` (two bounces on a floor, no sideways drift). ``still``
keeps the object in place; it is only rendered for detector training.
"""

from __future__ import annotations

import math

import numpy as np

from training.world.concepts import BASE_MOTIONS, CLIP_FRAMES, MOTION_CLASSES

Path = tuple[tuple[float, float], ...]
LINEAR_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
ZIGZAG_AMPLITUDE = 5.0


def _q(value: float) -> float:
    """Quantize to a quarter pixel, the supersampling grid."""
    return round(value * 4) / 4


def motion_path(motion: str, rng: np.random.Generator, frames: int = CLIP_FRAMES) -> tuple[Path, str | None]:
    """Draw a path for ``motion``: (centres per frame, direction or None)."""
    if motion not in MOTION_CLASSES:
        raise ValueError(f"unknown motion {motion!r}; known: {', '.join(MOTION_CLASSES)}")
    t = np.arange(frames) / (frames - 1)
    direction: str | None = None
    if motion == "still":
        x = np.full(frames, rng.uniform(20, 44))
        y = np.full(frames, rng.uniform(20, 44))
    elif motion in BASE_MOTIONS:
        dx, dy = LINEAR_STEP[motion]
        along = 32 + rng.uniform(-3, 3) + rng.uniform(18, 24) * (t - 0.5) * (dx + dy)
        across = np.full(frames, rng.uniform(22, 42))
        x, y = (along, across) if dx else (across, along)
        direction = motion
    elif motion == "zigzag":
        direction = "left" if rng.random() < 0.5 else "right"
        sign = 1 if direction == "right" else -1
        distance = rng.uniform(18, 24)
        x = 32 + rng.uniform(-3, 3) + sign * distance * (t - 0.5)
        first = 1 if rng.random() < 0.5 else -1
        y = 32 + rng.uniform(-4, 4) + first * ZIGZAG_AMPLITUDE * (-1.0) ** np.arange(frames)
    elif motion == "orbit":
        direction = "cw" if rng.random() < 0.5 else "ccw"
        sign = 1 if direction == "cw" else -1  # the y axis points down, so a growing angle turns clockwise
        radius = rng.uniform(10, 13)
        start = rng.uniform(0, 2 * math.pi)
        angle = start + sign * 2 * math.pi * np.arange(frames) / frames
        cx, cy = 32 + rng.uniform(-2, 2), 32 + rng.uniform(-2, 2)
        x = cx + radius * np.cos(angle)
        y = cy + radius * np.sin(angle)
    else:  # bounce
        height = rng.uniform(14, 20)
        floor = 44 + rng.uniform(-2, 2)
        offset = int(rng.integers(0, 4))
        x = np.full(frames, 32 + rng.uniform(-8, 8))
        y = floor - height * np.abs(np.sin(np.pi * (np.arange(frames) + offset) / 4))
    return tuple((_q(float(a)), _q(float(b))) for a, b in zip(x, y)), direction
