"""What the customization benchmark measures, as pure functions of asked scenes, detected labels and pixels.

Every function here takes what a prompt asked (``Labels`` parsed from it with ``captions.parse_caption``, plus
the style an adapter was meant to add) and what the detectors saw (``detectors.detect``), or the generated pixels
themselves; nothing runs a model. Rates are shares of images in [0, 1].

* **subject fidelity** of one image: every asked object is found by name, anywhere in the image (for a held-out
  subject: the adapter's subject is there);
* **prompt alignment** of one image: the asked background colour is seen and every asked object stands at its
  asked position (the object by name, and by colour for shapes); ``background`` and ``position`` are also
  reported apart. A render of another subject scores 0: its object is not the asked one;
* **diversity across seeds**, over the images of one prompt (one per seed), averaged over prompts:
  ``pixel_diversity`` is the mean over all pairs of images of their mean absolute pixel difference divided by
  255 (0: identical images; 1: black against white everywhere); ``layout_diversity`` is the share of distinct
  detected layouts, ``(distinct - 1) / (images - 1)``, a layout being the detected objects (name, colour, size,
  position), background colour, texture and style (0: every seed gave the same layout; 1: all differ);
* **all-concepts rate** of a composition: every asked subject is found by name, every asked style is the detected
  style, and the detected background colour is the asked one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.world.concepts import SUBJECTS, Labels
from training.world.train_base import obeys

Layout = tuple[Any, ...]


def subject_fidelity(asked: Labels, seen: Labels) -> bool:
    """Whether every asked object is detected (by name, at any position)."""
    return obeys(asked, seen)["shape"]


def alignment_parts(asked: Labels, seen: Labels) -> dict[str, bool]:
    """``background``: the asked background colour is seen; ``position``: every asked object (by name, and by
    colour for shapes) stands at its asked position; ``aligned``: both."""
    verdict = obeys(asked, seen)
    return {"background": verdict["background"], "position": verdict["position"],
            "aligned": verdict["background"] and verdict["position"]}


def prompt_alignment(asked: Labels, seen: Labels) -> bool:
    """Whether the asked background colour and every asked object's position are obeyed."""
    return alignment_parts(asked, seen)["aligned"]


def all_concepts(asked: Labels, seen: Labels) -> bool:
    """Whether a composed image shows every asked concept: each asked subject (by name), the asked style (when
    ``asked.style`` is not ``none``) and the asked background colour."""
    return all(concept_parts(asked, seen).values())


def concept_parts(asked: Labels, seen: Labels) -> dict[str, bool]:
    """``subjects``: every asked subject is detected; ``style``: the asked style is the detected one (true when no
    style is asked); ``background``: the asked background colour is seen."""
    names = {o.name for o in seen.objects}
    subjects = all(o.name in names for o in asked.objects if o.name in SUBJECTS)
    style = asked.style == "none" or seen.style == asked.style
    return {"subjects": subjects, "style": style, "background": seen.background == asked.background}


def layout(labels: Labels) -> Layout:
    """The detected layout of an image: sorted objects (name, colour, size, position), background, texture, style."""
    objects = tuple(sorted((o.name, o.colour or "", o.size, o.position) for o in labels.objects))
    return objects, labels.background, labels.texture, labels.style


def layout_diversity(seen: Sequence[Labels]) -> float:
    """``(distinct layouts - 1) / (images - 1)`` over the images of one prompt; 0.0 for fewer than two images."""
    if len(seen) < 2:
        return 0.0
    return (len({layout(s) for s in seen}) - 1) / (len(seen) - 1)


def pixel_diversity(images: Sequence[np.ndarray] | np.ndarray) -> float:
    """Mean over all pairs of images of their mean absolute difference / 255 (uint8 HxWx3 images of one size);
    0.0 for fewer than two images."""
    stack = np.asarray(images)
    if stack.ndim != 4 or stack.shape[-1] != 3:
        raise ValueError(f"images must be N x H x W x 3, got shape {stack.shape}")
    if len(stack) < 2:
        return 0.0
    stack = stack.astype(np.float32) / 255.0
    distances = [float(np.abs(stack[i] - stack[j]).mean()) for i, j in itertools.combinations(range(len(stack)), 2)]
    return float(np.mean(distances))


def rate(values: Sequence[bool]) -> float:
    """The share of true values (``nan`` when there are none)."""
    return float(np.mean(values)) if len(values) else float("nan")


def subject_scores(asked: Sequence[Labels], images: Sequence[np.ndarray], seen: Sequence[Sequence[Labels]]
                   ) -> dict[str, float]:
    """Fidelity, alignment (and its parts) and diversity of the images of several prompts.

    ``asked[i]`` is prompt ``i``'s scene, ``images[i]`` its images (one per seed, N x H x W x 3) and ``seen[i]``
    their detected labels. Rates are over all images; diversities are means over prompts.
    """
    if not (len(asked) == len(images) == len(seen)):
        raise ValueError(f"one entry per prompt expected: {len(asked)} scenes, {len(images)} image sets, "
                         f"{len(seen)} label sets")
    fidelity, parts = [], []
    for scene, labels in zip(asked, seen):
        for s in labels:
            fidelity.append(subject_fidelity(scene, s))
            parts.append(alignment_parts(scene, s))
    return {"fidelity": rate(fidelity), "alignment": rate([p["aligned"] for p in parts]),
            "background": rate([p["background"] for p in parts]), "position": rate([p["position"] for p in parts]),
            "pixel_diversity": float(np.mean([pixel_diversity(i) for i in images])) if len(images) else float("nan"),
            "layout_diversity": float(np.mean([layout_diversity(s) for s in seen])) if len(seen) else float("nan")}


def composition_scores(asked: Sequence[Labels], seen: Sequence[Labels]) -> dict[str, float]:
    """All-concepts rate and its parts over composed images (``asked[i]`` the scene image ``i`` was asked for)."""
    if len(asked) != len(seen):
        raise ValueError(f"one asked scene per image expected: {len(asked)} scenes, {len(seen)} images")
    parts = [concept_parts(a, s) for a, s in zip(asked, seen)]
    return {"all_concepts": rate([all(p.values()) for p in parts]),
            **{key: rate([p[key] for p in parts]) for key in ("subjects", "style", "background")}}
